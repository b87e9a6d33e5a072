"""Does the triage threshold chosen on validation keep its sensitivity on a test fold that chose nothing?

    python -m benchmarks.accuracy.triage_heldout --val VAL.csv --test TEST.csv
        [--truth ../shared/ham10000/HAM10000_metadata.csv] [--out benchmarks/out/triage_heldout.json]

VAL.csv and TEST.csv are `skain predict` outputs of one model on its validation split and on its held-out test
fold (with `p_malignant` and `triage` columns). Reports the malignant (mel + bcc + akiec) sensitivity and the
specificity of the model's own triage flag on both, per malignant class on the test fold, and what a more
cautious choice on validation would have given on the test fold: the threshold `skain calibrate
--triage-confidence C` chooses (enough validation positives flagged that the sensitivity's one-sided
Clopper-Pearson lower bound at confidence C is still >= the target, 95%), at C = 0.5, 0.8, 0.9 and 0.95, here on
the metadata-as-entered predictions only (calibrate also requires it with every field blank). skAIn's default
(no C) reaches the target on validation itself.

In benchmarks/results/: triage_heldout_ensemble.json (2026-12-05, the shipped recipe held out: the two-network
ensemble of `reencode_heldout_ensemble.json`, 8 views; docs/robustness.md).
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from benchmarks.common import DATA_ROOT, what, write_json
from skain.data.schema import MALIGNANT
from skain.trust.triage import INVESTIGATE, threshold_for_sensitivity


def rates(flag: np.ndarray, positive: np.ndarray) -> dict:
    return {"sensitivity": round(float(flag[positive].mean()), 4),
            "specificity": round(float((~flag[~positive]).mean()), 4),
            "positives": int(positive.sum()), "negatives": int((~positive).sum())}


def cautious_threshold(p_mal: np.ndarray, positive: np.ndarray, target: float, confidence: float) -> float:
    """The threshold `skain calibrate --triage-confidence` chooses on metadata as entered: enough positives flagged
    that the sensitivity's one-sided Clopper-Pearson lower bound at `confidence` reaches `target`."""
    return threshold_for_sensitivity(p_mal, positive, target, confidence)


def load(path: str, truth: pd.DataFrame) -> pd.DataFrame:
    pred = pd.read_csv(path).merge(truth[["image_id", "dx"]], on="image_id", how="inner")
    if pred.empty or pred["p_malignant"].isna().any():
        raise SystemExit(f"{path}: no scorable rows with p_malignant against the truth CSV")
    return pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--truth", default=str(DATA_ROOT / "HAM10000_metadata.csv"))
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--out", default="benchmarks/out/triage_heldout.json")
    ns = ap.parse_args()
    truth = pd.read_csv(ns.truth)
    val, test = load(ns.val, truth), load(ns.test, truth)
    vpos, tpos = val["dx"].isin(MALIGNANT).to_numpy(), test["dx"].isin(MALIGNANT).to_numpy()
    own = {name: rates((frame["triage"] == INVESTIGATE).to_numpy(), pos)
           for name, frame, pos in (("validation", val, vpos), ("test", test, tpos))}
    own["test_per_class"] = {c: round(float((test.loc[test["dx"] == c, "triage"] == INVESTIGATE).mean()), 4)
                             for c in MALIGNANT if (test["dx"] == c).any()}
    cautious = {}
    for confidence in (0.5, 0.8, 0.9, 0.95):
        t = cautious_threshold(val["p_malignant"].to_numpy(), vpos, ns.target, confidence)
        cautious[str(confidence)] = {"threshold": round(t, 4),
                                     "validation": rates(val["p_malignant"].to_numpy() >= t, vpos),
                                     "test": rates(test["p_malignant"].to_numpy() >= t, tpos)}
    result = {"what": what(__doc__), "val": ns.val, "test": ns.test, "target": ns.target,
              "models_own_threshold": own, "cautious_thresholds": cautious}
    write_json(ns.out, result, indent=1)
    print(result["models_own_threshold"])
    for k, v in cautious.items():
        print(k, v)


if __name__ == "__main__":
    main()
