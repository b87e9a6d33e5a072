"""Helpers shared by the benchmark scripts in benchmarks/speed/ and benchmarks/accuracy/ (see benchmarks/README.md).

Paths (the repository root, the shared HAM10000 copy, the shipped model), loading the HAM10000 frame, timing and
percentiles, child processes that time themselves, the web server the web benchmarks start, untrained bundles for
speed runs, k-fold report helpers and the non-dermoscopic probes, and writing a results JSON.

Only the standard library is imported here at module level: benchmarks.speed.kernel_time and
benchmarks.speed.scoring_batch import this module in child processes before skain.runtime_env.prepare_process()
has chosen the memory allocator. numpy, pandas, torch and skAIn are imported inside the functions that use them.
"""
from __future__ import annotations

import http.client
import json
import os
import resource
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shared HAM10000 copy beside the checkout (metadata.csv + images/: the 5,007-image sample;
# HAM10000_metadata.csv + images/ + images_part_2/: all 10,015 images); SKAIN_SHARED_DATA moves it.
DATA_ROOT = Path(os.environ.get("SKAIN_SHARED_DATA", REPO_ROOT.parent / "shared" / "ham10000"))
SHIPPED_MODEL = REPO_ROOT / "src" / "skain" / "models" / "ham10000.safetensors"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"  # the results the docs cite, committed
OUT_DIR = REPO_ROOT / "benchmarks" / "out"  # scratch output of a run (git-ignored)
CPU_SITES = ("unknown", "abdomen", "back", "face", "lower extremity", "trunk")  # a cpu-preset-like site vocabulary


# ----------------------------------------------------------------------------------------------- data
def ham10000(root: str | Path = DATA_ROOT, full: bool = False):
    """The shared HAM10000 copy as skAIn's labelled frame (image_id, lesion_id, dx, metadata, `path`), in the CSV's
    order: the sample (metadata.csv + images/) or, with `full`, all 10,015 images (HAM10000_metadata.csv +
    images/ + images_part_2/)."""
    from skain.data.layout import discover, load_table
    root = Path(root)
    if full:
        return load_table(discover(csv=root / "HAM10000_metadata.csv", images=[root / "images", root / "images_part_2"]))
    return load_table(discover(csv=root / "metadata.csv", images=[root / "images"]))


def split_rows(frame, run: str | Path, part: str = "val"):
    """The rows of `frame` in one part of a `skain train` run folder's split.csv (`val`: its validation lesions,
    `test`: the held-out test fold of a --holdout run), in the frame's order."""
    import pandas as pd
    split = pd.read_csv(Path(run) / "split.csv")
    wanted = set(split.loc[split["split"] == part, "image_id"])
    return frame[frame["image_id"].isin(wanted)].reset_index(drop=True)


def shipped_validation(frame, root: str | Path = DATA_ROOT):
    """The rows of `frame` (all 10,015 images, `ham10000(full=True)`) in the shipped model's validation split:
    lesion-grouped, 10 folds, fold 0, split seed 42 (the images that chose its epochs and thresholds)."""
    import pandas as pd

    from skain.data.split import lesion_split
    meta = pd.read_csv(Path(root) / "HAM10000_metadata.csv")
    _, val = lesion_split(meta, folds=10, fold=0, seed=42)
    return frame[frame["image_id"].isin(set(meta.iloc[val]["image_id"]))].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- timing
def best_of(fn: Callable[[], Any], rounds: int) -> float:
    """The fastest of `rounds` calls of fn(), in seconds (the least disturbed by a shared machine's load)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def percentiles_ms(seconds: Sequence[float], qs: Iterable[int] = (50, 90)) -> dict[str, float]:
    """{"p50_ms": ..., "p90_ms": ...} of durations given in seconds (numpy's linear interpolation)."""
    import numpy as np
    ms = np.asarray(seconds, dtype=float) * 1000
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in qs}


def cpu_seconds() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of this process so far; subtract two readings for a span."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def load_average() -> float:
    """The 1-minute load average: how busy the (shared) machine was."""
    return os.getloadavg()[0]


def checkout_env(src: str | Path = REPO_ROOT / "src", base: dict | None = None) -> dict:
    """The environment for a child process that should run the skAIn of one checkout (`src`: its src/ folder;
    this checkout's by default), whichever copy is installed."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_timed(cmd: list[str], env: dict, log_path: Path, cwd: Path = REPO_ROOT) -> tuple[dict, str]:
    """Run cmd (stderr to log_path); wall/user/sys seconds, kernel share, max RSS and minor faults of the process
    and its children (os.wait4, as /usr/bin/time reports them), the load average at the start, and its stdout.
    Exit statuses 0 and 3 (skain predict: some images failed) count as success."""
    load = load_average()
    start = time.perf_counter()
    with open(log_path, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in (0, 3):
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {os.waitstatus_to_exitcode(status)}); see {log_path}")
    return {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "kernel_share": usage.ru_stime / max(usage.ru_utime + usage.ru_stime, 1e-9),
            "max_rss_mib": usage.ru_maxrss / 1024, "minor_faults": usage.ru_minflt, "load_avg_1min": load}, out


# ----------------------------------------------------------------------------------------------- results
def what(doc: str | None) -> str:
    """The first paragraph of a script's docstring: the "what" field of its results JSON."""
    return (doc or "").split("\n\n")[0].strip()


def write_json(path: str | Path, data: Any, indent: int = 2, **dump: Any) -> Path:
    """Write a results JSON (parent folders made, trailing newline) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, **dump) + "\n")
    print(f"wrote {path}")
    return path


# ----------------------------------------------------------------------------------------------- models
def random_bundle(backbone: str = "tf_efficientnet_lite0", size: int | None = None, seed: int = 0,
                  sites: Sequence[str] = ("unknown", "back", "face"), **extra: Any) -> dict:
    """An untrained skAIn bundle (random head, no ImageNet weights) for speed and memory runs: they do not depend
    on the weights' values. `size` is the input size (the backbone's own by default); `extra` goes into the bundle
    (e.g. training={...})."""
    import torch

    from skain.data.encoder import MetadataEncoder
    from skain.data.schema import CLASSES
    from skain.data.transforms import resolve_preprocess
    from skain.model import SkainNet
    from skain.modelfile.bundle import make_bundle
    enc = MetadataEncoder(sex_vocab=["unknown", "female", "male"], site_vocab=list(sites))
    args = {"backbone": backbone, "n_sex": 3, "n_site": len(sites), "num_classes": len(CLASSES)}
    torch.manual_seed(seed)
    model = SkainNet(**args).eval()
    return make_bundle(model, args, resolve_preprocess(model.backbone.pretrained_cfg, size), enc, list(CLASSES), **extra)


def untrained_cpu_bundle(folder: Path) -> Path:
    """A cpu-preset-shaped bundle (tf_efficientnet_lite0 @ 224 + metadata branch) with random weights, saved in
    `folder` for `skain serve --model folder`: timing and memory only."""
    from skain.modelfile.bundle import BUNDLE_NAME, atomic_torch_save
    bundle = random_bundle(sites=CPU_SITES, training={"synthetic": False, "note": "untrained, for timing only"})
    atomic_torch_save(bundle, Path(folder) / BUNDLE_NAME)
    return Path(folder)


# ----------------------------------------------------------------------------------------------- web server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(method: str, port: int, path: str, body: bytes | None = None, ctype: str | None = None,
                 timeout: float = 120) -> tuple[int, bytes]:
    """(status, body) of one request to the local server on `port`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
        res = conn.getresponse()
        return res.status, res.read()
    finally:
        conn.close()


def multipart(image: bytes, fields: dict[str, str], filename: str = "x.jpg") -> tuple[bytes, str]:
    """A multipart/form-data body for POST /api/predict: the form fields, then the image. -> (body, content type)"""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def start_server(model: Path, port: int, threads: int, precision: str = "fp32", limit: float = 120) -> subprocess.Popen:
    """`skain serve` (waitress) in its own process, returned once /api/health answers."""
    import sys
    cmd = [sys.executable, "-m", "skain", "serve", "--model", str(model), "--port", str(port),
           "--threads", str(threads), "--precision", precision]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stdout.read()}")
        try:
            if http_request("GET", port, "/api/health")[0] == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server did not start within {limit:.0f} s")


def proc_memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc/PID/status in MB (VmRSS: resident now; VmHWM: the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------------------------- accuracy
def kfold_training(run: Path) -> dict:
    """Training statistics of a k-fold output (fold<k>/ with metrics.json and train_history.csv), per fold."""
    import pandas as pd
    folds = sorted(Path(run).glob("fold*"))
    metrics = [json.loads((p / "metrics.json").read_text()) for p in folds]
    hist = [pd.read_csv(p / "train_history.csv") for p in folds]
    return {"epochs": [m["epochs_trained"] for m in metrics], "best_epoch": [m["best_epoch"] for m in metrics],
            "train_minutes": [round(m["train_minutes"], 2) for m in metrics],
            "train_images_per_s_median": [round(float(h["train_images_per_s"].median()), 1) for h in hist],
            "train_images_seen": [len(h) * m["data"]["train_images"] for h, m in zip(hist, metrics)]}


def fold_differences(a: dict, b: dict, variants: Iterable[str]) -> dict:
    """`skain cv-report` rows a - b per test fold (the same split, so the same test images): balanced accuracy and
    melanoma recall by arg-max and by the rule with the folds not worse (skain.training.cvreport.paired_diff, as
    `skain cv-report --image-only` pairs its rows), and macro AUC."""
    from skain.training.cvreport import paired_diff
    return {v: {**paired_diff(a[v], b[v]),
                "macro_auc": [round(x - y, 4) for x, y in zip(a[v]["macro_auc"]["folds"], b[v]["macro_auc"]["folds"])]}
            for v in variants}


def non_dermoscopic_probes(seed: int = 5) -> dict[str, list[bytes]]:
    """Non-dermoscopic images every model must turn away, as PNG bytes: skAIn's probes (blank frames, noise, text
    screenshots) and scikit-image's sample photos."""
    import numpy as np
    import skimage.data as sk

    from skain.trust.probes import probe_set, to_png
    photos = []
    for name in ("chelsea", "coffee", "rocket", "astronaut", "horse", "page", "text", "logo", "camera", "clock"):
        arr = getattr(sk, name)()
        arr = (arr.astype(np.uint8) * (255 if arr.dtype == bool else 1))
        photos.append(to_png(arr[..., :3] if arr.ndim == 3 else arr))
    return {**probe_set(seed), "photos": photos}
