"""The metadata table of issue 11 and the cross-validated accuracy of issue 12 from one paired k-fold run:
a multimodal and an image-only model trained on the same lesion-grouped folds (benchmarks/gpu/cv_pair.sh).

    python benchmarks/cv_pair_report.py --mm /tmp/gpu/mm --img /tmp/gpu/img \
        --out benchmarks/results/gpu_cv_pair.json --cpu-images-per-s 76

The table is `skain cv-report MM --image-only IMG` (skain.crossval.metadata_table); this adds the training
statistics of both runs and the CPU-minutes estimate. Every figure is on test folds that chose nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from skain.crossval import metadata_markdown, metadata_table


def training(run: Path) -> dict:
    folds = sorted(run.glob("fold*"))
    metrics = [json.loads((p / "metrics.json").read_text()) for p in folds]
    hist = [pd.read_csv(p / "train_history.csv") for p in folds]
    return {"epochs": [m["epochs_trained"] for m in metrics], "best_epoch": [m["best_epoch"] for m in metrics],
            "train_minutes": [round(m["train_minutes"], 2) for m in metrics],
            "train_images_per_s_median": [round(float(h["train_images_per_s"].median()), 1) for h in hist],
            "train_images_seen": [len(h) * m["data"]["train_images"] for h, m in zip(hist, metrics)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mm", required=True, help="k-fold output of the multimodal model")
    ap.add_argument("--img", required=True, help="k-fold output of the image-only model, same split")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-images-per-s", type=float, default=76.0,
                    help="the cpu recipe's measured training speed on 2 cores, for the CPU-minutes estimate")
    ns = ap.parse_args()
    mm, img = Path(ns.mm), Path(ns.img)
    table = metadata_table(mm, img)
    train = {"multimodal": training(mm), "image-only": training(img)}
    minutes = {k: round(sum(v["train_images_seen"]) / ns.cpu_images_per_s / 60, 1) for k, v in train.items()}
    result = {"what": __doc__.split("\n\n")[0], "rows": table, "training": train,
              "cpu_minutes_estimate_5_folds": {
                  **minutes, "images_per_s_on_2_cores": ns.cpu_images_per_s,
                  "note": "training images the GPU run processed / the cpu recipe's measured 2-core speed "
                          "(validation and scoring not counted); an estimate, not a run on 2 cores"}}
    Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
    print(metadata_markdown(table))
    print(json.dumps(result["cpu_minutes_estimate_5_folds"]))
    print(json.dumps(train))


if __name__ == "__main__":
    main()
