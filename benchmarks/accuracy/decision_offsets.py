"""One tau (prior adjustment, `skain decide`) against seven per-class logit offsets, both chosen on four folds'
out-of-fold predictions and scored on the fifth (nested), on `skain cv-report` outputs.

    python -m benchmarks.accuracy.decision_offsets report/oof_present.csv report/oof_present_tta8.csv \\
        --out benchmarks/results/decision_offsets.json

Offsets start at the tau rule's -tau * log prior and move one class at a time over a grid (3 passes), keeping a
move only when balanced accuracy on the fitting folds rises. The oof_<variant>.csv files are written by
`skain cv-report RUN --output report`. benchmarks/results/decision_offsets.json is its output (docs/training.md,
"Against the target").
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

from benchmarks.common import what, write_json
from skain.data.schema import CLASSES
from skain.inference.decision import adjusted_pred, fit_tau, log_prior_from_counts


def fit_offsets(logp: np.ndarray, y: np.ndarray, start: np.ndarray) -> np.ndarray:
    best_b, best = start.copy(), balanced_accuracy_score(y, (logp + start).argmax(1))
    for step in (0.1, 0.033, 0.011):
        for c in range(len(CLASSES)):
            for d in np.arange(-15, 16) * step:
                b = best_b.copy()
                b[c] += d
                score = balanced_accuracy_score(y, (logp + b).argmax(1))
                if score > best + 1e-9:
                    best, best_b = score, b
    return best_b


def nested(oof: pd.DataFrame) -> dict:
    p = oof[[f"p_{c}" for c in CLASSES]].to_numpy()
    y = oof["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    logp = np.log(np.clip(p, 1e-12, 1))
    rows = []
    for k in sorted(oof["fold"].unique()):
        inside, outside = (oof["fold"] == k).to_numpy(), (oof["fold"] != k).to_numpy()
        prior = log_prior_from_counts(oof.loc[outside, "dx"].value_counts().to_dict())
        tau = fit_tau(p[outside], y[outside], prior)
        b = fit_offsets(logp[outside], y[outside], -tau * prior)
        rows.append({"fold": int(k), "argmax": balanced_accuracy_score(y[inside], p[inside].argmax(1)),
                     "tau": balanced_accuracy_score(y[inside], adjusted_pred(p[inside], prior, tau)),
                     "offsets": balanced_accuracy_score(y[inside], (logp[inside] + b).argmax(1))})
    table = pd.DataFrame(rows)
    return {"per_fold": rows, **{k: {"mean": float(table[k].mean()), "std": float(table[k].std())}
                                 for k in ("argmax", "tau", "offsets")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("oof", nargs="+", help="oof_<variant>.csv files written by skain cv-report")
    ap.add_argument("--out", required=True)
    ns = ap.parse_args()
    result = {str(f): nested(pd.read_csv(f)) for f in ns.oof}
    write_json(ns.out, {"what": what(__doc__), "results": result})
    for name, r in result.items():
        print(f"{name}: argmax {r['argmax']['mean']:.4f}, one tau {r['tau']['mean']:.4f}, "
              f"per-class offsets {r['offsets']['mean']:.4f} (nested, mean of folds)")


if __name__ == "__main__":
    main()
