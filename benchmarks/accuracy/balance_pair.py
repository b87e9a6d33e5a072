"""`--balance sqrt` (the presets) against `--balance inverse` under the prior-adjusted decision rule, per test fold.

    python -m benchmarks.accuracy.balance_pair --sqrt SQRT_RUN --inverse INVERSE_RUN \\
        --out benchmarks/results/cpu_balance.json

Both runs are k-fold outputs (fold<k>/ with test_logits.npz) on the same lesion-grouped split and the same folds
(a folder of links to some folds of a larger run works). Figures by skain.training.cvreport.variant_row, as
`skain cv-report` computes them. benchmarks/results/cpu_balance.json is its output for folds 0-2 (2026-11-26;
docs/training.md, "The decision rule for balanced accuracy"); the `what`, `command` and `date` fields it writes
describe that run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import fold_differences, write_json
from skain.training.cvreport import variant_row

VARIANTS = ("present", "all_blank")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sqrt", required=True, type=Path)
    ap.add_argument("--inverse", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ns = ap.parse_args()
    runs = {"sqrt": ns.sqrt, "inverse": ns.inverse}
    rows = {name: {v: variant_row([run], v) for v in VARIANTS} for name, run in runs.items()}
    out = {"what": "--balance sqrt (the presets' loss weights) against --balance inverse, both scored with the "
                   "prior-adjusted decision rule (tau and prior from the other folds: nested); cpu preset on all "
                   "10,015 HAM10000 images, test folds 0-2 of the 5 lesion-grouped folds (chose nothing); "
                   "one training at a time on this 2-core machine, --max-minutes 12 each",
           "command": "skain train --preset cpu --data ../shared/ham10000 --holdout --fold K --max-minutes 12 "
                      "--balance inverse --test-tta 1 --output inv/foldK (K = 0, 1, 2); the sqrt folds are folds 0-2 "
                      "of the --all-folds run in cpu_cv.json; figures by skain.training.cvreport.variant_row "
                      "(skain cv-report)",
           "date": "2026-11-26", "rows": rows,
           # same test images: as `skain cv-report --image-only` pairs its rows
           "inverse_minus_sqrt_per_fold": fold_differences(rows["inverse"], rows["sqrt"], VARIANTS)}
    write_json(ns.out, out)
    for name in runs:
        for v, r in rows[name].items():
            print(f"{name:8s} {v:10s} BA {r['balanced_accuracy']['mean']:.3f} "
                  f"rule {r['balanced_accuracy_rule']['mean']:.3f} AUC {r['macro_auc']['mean']:.3f} "
                  f"mel {r['melanoma_recall']['mean']:.3f}/{r['melanoma_recall_rule']['mean']:.3f} tau {r['tau_per_fold']}")
    for v, d in out["inverse_minus_sqrt_per_fold"].items():
        print(v, "inverse - sqrt per fold:", {m: x if isinstance(x, list) else x["folds"] for m, x in d.items()})


if __name__ == "__main__":
    main()
