"""Load test of `POST /api/predict` against the real server (`skain serve`, waitress) in its own process.

    python benchmarks/web_load.py [--model /tmp/bench/out/multimodal] [--requests 200] [--concurrency 8]
                                  [--precision fast]

Sends real HAM10000 images (with their age/sex/site) from --images at the given concurrency, and prints
p50/p90/p99/max latency, throughput, the error count and the server's resident memory (RSS) before and after
the measured run (after a warm-up run of the same size, so allocator warm-up is not counted as growth).
Without a trained cpu-preset bundle it builds an UNTRAINED one with the same architecture
(tf_efficientnet_lite0 @ 224 + metadata branch): latency does not depend on the weights' values.
Exit status 1 when any request failed or RSS grew by more than --max-growth-mb.
"""
from __future__ import annotations

import argparse
import csv
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path("/tmp/bench/out/multimodal")
DEFAULT_DATA = ROOT / ".." / "shared" / "ham10000"


def untrained_cpu_bundle(folder: Path) -> Path:
    """A cpu-preset-shaped bundle with random weights, for timing only."""
    from skain.bundle import BUNDLE_NAME, atomic_torch_save, make_bundle
    from skain.data.encoder import MetadataEncoder
    from skain.data.schema import CLASSES
    from skain.data.transforms import resolve_preprocess
    from skain.model import SkainNet
    enc = MetadataEncoder(sex_vocab=["unknown", "female", "male"],
                          site_vocab=["unknown", "abdomen", "back", "face", "lower extremity", "trunk"])
    args = {"backbone": "tf_efficientnet_lite0", "n_sex": 3, "n_site": 6, "num_classes": 7, "image_only": False}
    model = SkainNet(**args)
    pre = resolve_preprocess(model.backbone.pretrained_cfg)
    atomic_torch_save(make_bundle(model, args, pre, enc, list(CLASSES), training={"synthetic": False,
                                  "note": "untrained, for web_load timing only"}), folder / BUNDLE_NAME)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, threads: int, precision: str = "fp32") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "skain", "serve", "--model", str(model), "--port", str(port),
           "--threads", str(threads), "--precision", precision]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stdout.read()}")
        try:
            if request("GET", port, "/api/health")[0] == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


def request(method: str, port: int, path: str, body: bytes | None = None, ctype: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
        res = conn.getresponse()
        return res.status, res.read()
    finally:
        conn.close()


def multipart(image: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def load_payloads(data: Path, n: int, vocab: dict[str, list[str]], heatmap: bool) -> list[tuple[bytes, str]]:
    rows = list(csv.DictReader(open(data / "metadata.csv", newline="")))[:n]
    out = []
    for r in rows:
        fields = {"age": r.get("age", ""),
                  "sex": r["sex"] if r.get("sex") in vocab["sex"] else "",
                  "localization": r["localization"] if r.get("localization") in vocab["localization"] else "",
                  "heatmap": "1" if heatmap else "0"}
        out.append(multipart((data / "images" / f"{r['image_id']}.jpg").read_bytes(), fields))
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_load(port: int, payloads: list, n: int, concurrency: int) -> tuple[np.ndarray, list[str], float]:
    def one(i: int):
        body, ctype = payloads[i % len(payloads)]
        t = time.perf_counter()
        status, text = request("POST", port, "/api/predict", body, ctype)
        return time.perf_counter() - t, None if status == 200 else f"{status}: {text[:200]!r}"

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    return np.array([r[0] for r in results]), [r[1] for r in results if r[1]], wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"bundle folder (default {DEFAULT_MODEL} if it exists)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder with metadata.csv and images/")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=4, help="waitress threads in the server")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fast", "channels_last"],
                    help="the server's --precision (fast: OpenVINO / ONNX Runtime)")
    ap.add_argument("--images", type=int, default=50, help="distinct images cycled through")
    ap.add_argument("--max-growth-mb", type=float, default=25.0)
    ap.add_argument("--heatmap", action="store_true", help="ask for the Grad-CAM heatmap too (what the page does)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else DEFAULT_MODEL
    if not (model / "best_model.pt").exists() and not model.is_file():
        print(f"no bundle at {model}: building an untrained cpu-preset bundle (timing only)")
        model = untrained_cpu_bundle(Path(tmp.name))
    port = free_port()
    server = start_server(model, port, args.threads, args.precision)
    try:
        info = json.loads(request("GET", port, "/api/model")[1])
        payloads = load_payloads(Path(args.data), args.images, info["vocabularies"], args.heatmap)
        print(f"model {info['backbone']} @ {info['input_size']} px (id {info['model_id']}), server pid "
              f"{server.pid}, waitress threads {args.threads}, {args.requests} requests at concurrency "
              f"{args.concurrency}, {len(payloads)} distinct real images{', with heatmaps' if args.heatmap else ''}")
        idle = rss_mb(server.pid)
        run_load(port, payloads, args.requests, args.concurrency)  # warm-up: same size as the measured run
        before = rss_mb(server.pid)
        lat, errors, wall = run_load(port, payloads, args.requests, args.concurrency)
        after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
        tmp.cleanup()
    ms = lat * 1000
    print(f"latency ms: p50 {np.percentile(ms, 50):.0f}  p90 {np.percentile(ms, 90):.0f}  "
          f"p99 {np.percentile(ms, 99):.0f}  max {ms.max():.0f}  mean {ms.mean():.0f}")
    print(f"throughput {len(ms) / wall:.2f} req/s ({wall:.1f} s wall); errors {len(errors)}")
    print(f"server RSS MB: idle {idle:.0f}; after warm-up {before:.0f}, after the measured run {after:.0f}, "
          f"growth {after - before:+.1f}")
    for e in errors[:5]:
        print("  error:", e)
    ok = not errors and after - before <= args.max_growth_mb
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
