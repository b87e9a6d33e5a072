"""Train the `cpu` preset on the shared HAM10000 sample (lesion-grouped 80/20) and its image-only ablation.

    python -m benchmarks.accuracy.train_cpu [--data-root ../shared/ham10000] [--minutes 30] [--out benchmarks/out]

Prints validation balanced accuracy / macro AUC / per-class recall for both runs, the time each took and
the difference metadata makes. Writes each run's output folder and <out>/train_cpu.json under --out; none was kept
in benchmarks/results/ (docs/training.md, "Earlier measurement", quotes the printed table).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from benchmarks.common import DATA_ROOT, write_json
from skain.training.config import build_config
from skain.training.train import fit


def run(name: str, root: Path, out: Path, minutes: float, epochs: int | None, image_only: bool, cache: str) -> dict:
    flags = {"data": {"csv": str(root / "metadata.csv"), "images": [str(root / "images")], "folds": 5, "fold": 0,
                      "cache_dir": cache},
             "model": {"image_only": image_only},
             "train": {"output": str(out / name), "overwrite": True, "max_minutes": minutes, "progress": False}}
    if epochs:
        flags["train"]["epochs"] = epochs
    start = time.perf_counter()
    summary = fit(build_config("cpu", flags=flags))
    summary["wall_minutes"] = (time.perf_counter() - start) / 60
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--only", choices=["multimodal", "image_only"], default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root, out = Path(args.data_root), Path(args.out)
    results = {}
    for name, image_only in (("multimodal", False), ("image_only", True)):
        if args.only and args.only != name:
            continue
        results[name] = run(name, root, out, args.minutes, args.epochs, image_only, args.cache_dir)
    print("\nrun          bal_acc  macro_auc  acc    best_epoch  train_min  per-class recall")
    for name, s in results.items():
        v = s["validation"]
        recall = " ".join(f"{c}={r['recall']:.2f}" for c, r in v["per_class"].items())
        print(f"{name:12s} {v['balanced_accuracy']:.3f}    {v['macro_auc']:.3f}      {v['accuracy']:.3f}  "
              f"{s['best_epoch']:>5d}       {s['train_minutes']:.1f}      {recall}")
    if len(results) == 2:
        d = results["multimodal"]["validation"]["balanced_accuracy"] - results["image_only"]["validation"]["balanced_accuracy"]
        print(f"metadata adds {d:+.3f} balanced accuracy")
    write_json(out / "train_cpu.json", results)


if __name__ == "__main__":
    main()
