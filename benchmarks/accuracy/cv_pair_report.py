"""The metadata table of issue 11 and the cross-validated accuracy of issue 12 from one paired k-fold run:
a multimodal and an image-only model trained on the same lesion-grouped folds (benchmarks/gpu/cv_pair.sh).

    python -m benchmarks.accuracy.cv_pair_report --mm /tmp/gpu/mm --img /tmp/gpu/img \\
        --out benchmarks/results/gpu_cv_pair.json --cpu-images-per-s 76

The table is `skain cv-report MM --image-only IMG` (skain.training.cvreport.metadata_table); this adds the training
statistics of both runs and the CPU-minutes estimate. Every figure is on test folds that chose nothing.
benchmarks/results/gpu_cv_pair.json is its output (docs/training.md, "Metadata present, blanked, and the image-only
model"; README, "Results").
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import kfold_training, what, write_json
from skain.training.cvreport import metadata_markdown, metadata_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mm", required=True, help="k-fold output of the multimodal model")
    ap.add_argument("--img", required=True, help="k-fold output of the image-only model, same split")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-images-per-s", type=float, default=76.0,
                    help="the cpu recipe's measured training speed on 2 cores, for the CPU-minutes estimate")
    ns = ap.parse_args()
    mm, img = Path(ns.mm), Path(ns.img)
    table = metadata_table(mm, img)
    train = {"multimodal": kfold_training(mm), "image-only": kfold_training(img)}
    minutes = {k: round(sum(v["train_images_seen"]) / ns.cpu_images_per_s / 60, 1) for k, v in train.items()}
    result = {"what": what(__doc__), "rows": table, "training": train,
              "cpu_minutes_estimate_5_folds": {
                  **minutes, "images_per_s_on_2_cores": ns.cpu_images_per_s,
                  "note": "training images the GPU run processed / the cpu recipe's measured 2-core speed "
                          "(validation and scoring not counted); an estimate, not a run on 2 cores"}}
    write_json(ns.out, result)
    print(metadata_markdown(table))
    print(json.dumps(result["cpu_minutes_estimate_5_folds"]))
    print(json.dumps(train))


if __name__ == "__main__":
    main()
