"""Kernel time of CPU training and `skain predict` with each memory allocator, measured in one run.

    python -m benchmarks.speed.kernel_time [--data-root ../shared/ham10000] [--images 300] [--train-steps 6]
                                           [--rounds 2] [--variants system,glibc,tcmalloc] [--out benchmarks/out]

Every measurement is its own process (SKAIN_ALLOCATOR=<variant>, see skain.runtime_env), run in interleaved
rounds (the order rotates each round) so that a shared machine's load falls on all variants alike:

- train: the `cpu` preset's training step (tf_efficientnet_lite0, 224 px, batch 32, the preset's bf16 autocast
  where the CPU has it, channels-last, 95% of the backbone trainable, AdamW) on real images through skAIn's
  own data pipeline (augmentation, pre-resized image cache as in every epoch after the first), 2 warm-up steps
  then --train-steps timed steps; images/s and the user/system CPU time of the timed steps.
- predict: `python -m skain predict` end to end on --images real images, image cache off, fp32 (the default);
  wall, user and system time of the whole process (os.wait4), as /usr/bin/time reports them.

`system` is glibc malloc untouched (before this change), `glibc` the in-process mallopt fallback, `tcmalloc`
the preloaded tcmalloc that `skain` picks by default when it is installed. The bundle is the `cpu` preset's
network with its ImageNet weights and an untrained head: the speed does not depend on the weights. Prints a
table with ratios against `system` and the load average, and writes <out>/kernel_time.json (default
benchmarks/out/kernel_time.json); none was kept in benchmarks/results/: docs/performance.md, "CPU speed: the memory
allocator", quotes the printed tables. Every child process runs this checkout's src/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import DATA_ROOT, OUT_DIR, checkout_env, cpu_seconds, run_timed, write_json
from skain.runtime_env import find_tcmalloc, loaded_allocator, prepare_process  # stdlib only, as benchmarks.common


# ----------------------------------------------------------------------------- set-up (parent, once)
def make_inputs(root: Path, n_images: int, work: Path) -> tuple[Path, Path]:
    """The first n images of the sample (CSV) and a `cpu`-preset bundle; the training cache is filled once."""
    import pandas as pd

    from skain.data.encoder import MetadataEncoder
    from skain.data.schema import CLASSES
    from skain.modelfile.bundle import atomic_torch_save, make_bundle
    from skain.training.loaders import make_loader_fn, prepare_data, warm_images
    from skain.training.train import build_network
    work.mkdir(parents=True, exist_ok=True)
    csv, bundle = work / "subset.csv", work / "bundle.pt"
    pd.read_csv(root / "metadata.csv").head(n_images).to_csv(csv, index=False)
    cfg = train_config(csv, root, work)
    prep = prepare_data(cfg)
    model, args, pre, _ = build_network(cfg, MetadataEncoder.fit(prep.frame.iloc[prep.train_idx]))
    warm_images(prep.frame, make_loader_fn(cfg, pre), progress=False)
    atomic_torch_save(make_bundle(model, args, pre, prep.encoder, list(CLASSES)), bundle)
    return csv, bundle


def train_config(csv: Path, root: Path, work: Path):
    from skain.training.config import build_config
    return build_config("cpu", flags={"data": {"csv": str(csv), "images": [str(root / "images")],
                                               "cache_dir": str(work / "cache")},
                                      "train": {"progress": False, "output": str(work / "train")}})


# ----------------------------------------------------------------------------- child: training steps
def child_train(csv: Path, root: Path, work: Path, steps: int) -> dict:
    import torch
    from torch import nn

    from skain.engine import amp_dtype, resolve_device, train_one_epoch
    from skain.training.loaders import build_loaders, make_loader_fn, prepare_data
    from skain.training.loop import seed_everything
    from skain.training.train import build_network
    cfg = train_config(csv, root, work)
    seed_everything(0)
    device = resolve_device("cpu")
    dtype = amp_dtype(device, cfg.train.amp)
    prep = prepare_data(cfg)
    model, _, pre, _ = build_network(cfg, prep.encoder)
    train_dl, _ = build_loaders(cfg, prep, pre, make_loader_fn(cfg, pre), device)
    model.set_backbone_trainable(cfg.train.unfreeze_fraction)
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

    def batches(n: int):  # the loader again and again, n batches in all
        count = 0
        while True:
            for batch in train_dl:
                if count == n:
                    return
                count += 1
                yield batch

    run = lambda n: train_one_epoch(model, batches(n), opt, crit, device, dtype, channels_last=True,  # noqa: E731
                                    progress=False)
    run(2)
    before, start = cpu_seconds(), time.perf_counter()
    stats = run(steps)
    wall, after = time.perf_counter() - start, cpu_seconds()
    user, sys_, faults = (a - b for a, b in zip(after, before))
    return {"images_per_s": stats["images"] / wall, "images": stats["images"], "wall_s": wall, "user_s": user,
            "sys_s": sys_, "kernel_share": sys_ / max(user + sys_, 1e-9),
            "minor_faults": faults, "amp": str(dtype), "threads": torch.get_num_threads(),
            "workers": train_dl.num_workers}


# ----------------------------------------------------------------------------- parent: interleaved runs
def run_train(variant: str, args, csv: Path, bundle: Path, work: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.speed.kernel_time", "--child", "train", "--csv", str(csv),
           "--data-root", args.data_root, "--work", str(work), "--train-steps", str(args.train_steps)]
    proc, out = run_timed(cmd, env_for(variant), work / f"train-{variant}.log")
    child = json.loads(out.strip().splitlines()[-1])
    return {**child, "process": proc}


def run_predict(variant: str, args, csv: Path, bundle: Path, work: Path) -> dict:
    cmd = [sys.executable, "-m", "skain", "predict", "--csv", str(csv), "--images",
           str(Path(args.data_root) / "images"), "--model", str(bundle), "--cache-dir", "off",
           "--output", str(work / f"pred-{variant}.csv"), "--no-progress"]
    proc, _ = run_timed(cmd, env_for(variant), work / f"predict-{variant}.log")
    return {**proc, "images_per_s": args.images / proc["wall_s"]}


def env_for(variant: str) -> dict:
    """This checkout's skAIn with the allocator `variant` and no allocator settings inherited from this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "_SKAIN"))}
    env["LD_PRELOAD"] = " ".join(p for p in env.get("LD_PRELOAD", "").split() if "malloc" not in p)
    env["SKAIN_ALLOCATOR"] = variant
    return checkout_env(base=env)


def summarise(results: dict, variants: list[str]) -> dict:
    table = {}
    for task, per_variant in results.items():
        for v in variants:
            runs = per_variant[v]
            key = "images_per_s"
            row = {key: statistics.median(r[key] for r in runs),
                   "kernel_share": statistics.median(r["kernel_share"] for r in runs),
                   "wall_s": statistics.median((r["process"] if task == "train" else r)["wall_s"] for r in runs),
                   "user_s": statistics.median((r["process"] if task == "train" else r)["user_s"] for r in runs),
                   "sys_s": statistics.median((r["process"] if task == "train" else r)["sys_s"] for r in runs),
                   "max_rss_mib": statistics.median((r["process"] if task == "train" else r)["max_rss_mib"]
                                                    for r in runs)}
            table.setdefault(task, {})[v] = row
        base = table[task].get("system")
        for v in variants:
            if base:
                table[task][v]["speedup_vs_system"] = table[task][v][key] / base[key]
    return table


def print_table(table: dict, loads: list[float]) -> None:
    print(f"\n{'task':8s} {'allocator':9s} {'img/s':>7s} {'x system':>8s} {'kernel %':>8s} {'wall s':>7s} "
          f"{'user s':>7s} {'sys s':>6s} {'RSS MiB':>8s}")
    for task, rows in table.items():
        for v, r in rows.items():
            print(f"{task:8s} {v:9s} {r['images_per_s']:7.1f} {r.get('speedup_vs_system', float('nan')):8.2f} "
                  f"{100 * r['kernel_share']:8.1f} {r['wall_s']:7.1f} {r['user_s']:7.1f} {r['sys_s']:6.1f} "
                  f"{r['max_rss_mib']:8.0f}")
    print(f"train: timed steps only (kernel % of their CPU time); wall/user/sys/RSS: the whole process. "
          f"predict: the whole `skain predict` process. 1-min load average during the runs: "
          f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--images", type=int, default=300, help="images for `skain predict` and the training set")
    ap.add_argument("--train-steps", type=int, default=6, help="timed training steps (batch 32) per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="system,glibc,tcmalloc")
    ap.add_argument("--tasks", default="train,predict")
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--child", choices=["train"], help=argparse.SUPPRESS)
    ap.add_argument("--csv", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        allocator = prepare_process()  # as `skain` does it: may restart this process with tcmalloc
        result = child_train(Path(args.csv), Path(args.data_root), Path(args.work), args.train_steps)
        print(json.dumps({**result, "allocator": loaded_allocator() or allocator}))
        return
    variants = [v for v in args.variants.split(",") if v != "tcmalloc" or find_tcmalloc()]
    if "tcmalloc" in args.variants and "tcmalloc" not in variants:
        print("tcmalloc is not installed (apt-get install libtcmalloc-minimal4): measuring without it")
    args.data_root, out = str(Path(args.data_root).resolve()), Path(args.out).resolve()  # children run in REPO_ROOT
    work = out / "kernel_time"
    csv, bundle = make_inputs(Path(args.data_root), args.images, work)
    runners = {"train": run_train, "predict": run_predict}
    tasks = args.tasks.split(",")
    results = {t: {v: [] for v in variants} for t in tasks}
    loads = []
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for task in tasks:
            for v in order:
                res = runners[task](v, args, csv, bundle, work)
                results[task][v].append(res)
                loads.append((res.get("process") or res)["load_avg_1min"])
                print(f"round {r + 1} {task:7s} {v:9s} {res['images_per_s']:6.1f} img/s  kernel "
                      f"{100 * res['kernel_share']:4.1f}%  load {loads[-1]:.1f}", flush=True)
    table = summarise(results, variants)
    print_table(table, loads)
    report = {"when": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "images": args.images,
              "train_steps": args.train_steps, "rounds": args.rounds, "load_avg_1min": loads,
              "summary": table, "runs": results}
    write_json(out / "kernel_time.json", report)


if __name__ == "__main__":
    main()
