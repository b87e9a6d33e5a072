"""`skain predict` on labelled images end to end, this checkout against another (e.g. the commit before a change),
measured in one run.

    git worktree add /tmp/before <commit>
    python -m benchmarks.accuracy.predict_labelled --baseline-src /tmp/before/src [--data-root ../shared/ham10000]
                                                   [--images 300] [--rounds 2] [--tta 1] [--out benchmarks/out]

On labelled images `skain predict` also reports the trust figures with every metadata field blank. Each
measurement is its own process (`python -m skain predict`, the shipped model unless --model, image cache off,
fp32), run in interleaved rounds (the order alternates) so that a shared machine's load falls on both alike;
wall, user and system time from os.wait4. The two checkouts' prediction CSVs and reported metrics must agree
(checked), so only the speed differs. Writes <out>/predict_labelled.json; benchmarks/results/predict_labelled.json
is that file for 300 images, 1 view, the shipped model, `--rounds 3` (2026-11-26; docs/predict.md, "One inference
path, evaluation").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import DATA_ROOT, OUT_DIR, REPO_ROOT, SHIPPED_MODEL, checkout_env, run_timed, write_json


def subset(root: Path, n: int, work: Path) -> Path:
    """The first n images of the official metadata (with dx), spread over the classes by a fixed shuffle."""
    import pandas as pd
    meta = pd.read_csv(root / "HAM10000_metadata.csv").sample(frac=1.0, random_state=0).head(n)
    work.mkdir(parents=True, exist_ok=True)
    meta.to_csv(work / "subset.csv", index=False)
    return work / "subset.csv"


def run_once(src: Path, csv: Path, images: list[Path], model: Path, out: Path, tta: int) -> dict:
    cmd = [sys.executable, "-m", "skain", "predict", "--csv", str(csv), "--images", *map(str, images),
           "--model", str(model), "--cache-dir", "off", "--tta", str(tta), "--no-progress",
           "--output", str(out / "pred.csv"), "--report", str(out / "report")]
    out.mkdir(parents=True, exist_ok=True)
    res, _ = run_timed(cmd, checkout_env(src), out / "stderr.log")
    return {k: round(res[k], 2) for k in ("wall_s", "user_s", "sys_s")}


def same_results(a: Path, b: Path) -> dict:
    import numpy as np
    import pandas as pd
    pa, pb = pd.read_csv(a / "pred.csv"), pd.read_csv(b / "pred.csv")
    cols = [c for c in pa.columns if c.startswith("p_")]
    diff = float(np.abs(pa[cols].to_numpy() - pb[cols].to_numpy()).max())
    ma, mb = (json.loads((d / "report" / "metrics.json").read_text()) for d in (a, b))
    runs = {}
    for name in ("with metadata", "without metadata"):
        ra, rb = ma["trust"]["runs"][name], mb["trust"]["runs"][name]
        runs[name] = {"balanced_accuracy": [ra["balanced_accuracy"], rb["balanced_accuracy"]],
                      "triage_sensitivity": [ra.get("triage_sensitivity"), rb.get("triage_sensitivity")]}
    if diff > 1e-5 or (pa["pred"] != pb["pred"]).any():
        raise SystemExit(f"the two checkouts disagree (max probability difference {diff:g})")
    for name, r in runs.items():
        if abs(r["balanced_accuracy"][0] - r["balanced_accuracy"][1]) > 1e-9:
            raise SystemExit(f"{name}: balanced accuracy differs between the checkouts: {r}")
    return {"max_probability_difference": diff, "trust_runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-src", required=True, type=Path, help="the other checkout's src/ folder")
    ap.add_argument("--data-root", type=Path, default=DATA_ROOT)
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tta", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    a = ap.parse_args()
    a.out, a.data_root, a.model = (x.resolve() for x in (a.out, a.data_root, a.model))  # children run in REPO_ROOT
    if not (a.data_root / "HAM10000_metadata.csv").is_file():
        raise SystemExit(f"no HAM10000 at {a.data_root} (HAM10000_metadata.csv + images/, images_part_2/)")
    work = a.out / "predict_labelled"
    csv = subset(a.data_root, a.images, work)
    folders = [a.data_root / d for d in ("images", "images_part_2", "HAM10000_images_part_1",
                                         "HAM10000_images_part_2") if (a.data_root / d).is_dir()]
    variants = {"before": a.baseline_src.resolve(), "after": REPO_ROOT / "src"}
    results: dict[str, list] = {name: [] for name in variants}
    for r in range(a.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            res = run_once(variants[name], csv, folders, a.model, work / name, a.tta)
            results[name].append(res)
            print(f"round {r + 1} {name:6s} wall {res['wall_s']:6.1f} s  user {res['user_s']:6.1f} s  "
                  f"sys {res['sys_s']:5.1f} s", flush=True)
    agree = same_results(work / "before", work / "after")
    summary = {name: {k: statistics.median(x[k] for x in runs) for k in ("wall_s", "user_s", "sys_s")}
               for name, runs in results.items()}
    for s in summary.values():
        s["images_per_s"] = round(a.images / s["wall_s"], 1)
    speedup = summary["before"]["wall_s"] / summary["after"]["wall_s"]
    report = {"images": a.images, "tta": a.tta, "model": str(a.model), "rounds": a.rounds,
              "load_average": os.getloadavg(), "median": summary, "wall_speedup": round(speedup, 2),
              "agreement": agree, "runs": results,
              "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    write_json(a.out / "predict_labelled.json", report)
    print(f"median wall: before {summary['before']['wall_s']:.1f} s, after {summary['after']['wall_s']:.1f} s "
          f"({speedup:.2f}x); predictions and metrics agree (max |dp| {agree['max_probability_difference']:.1e})")


if __name__ == "__main__":
    main()
