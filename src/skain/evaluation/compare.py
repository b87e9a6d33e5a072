"""`skain compare A.csv B.csv --truth CSV`: two models' predictions of the same labelled images, paired.

Each metric's difference (B - A) comes with its paired bootstrap interval (the same lesion resamples for both
models, `skain.evaluation.bootstrap.paired`) and a p-value: DeLong's test for the AUCs, the bootstrap's for the rest.
Where the truth CSV has `lesion_id`, lesions are resampled; otherwise images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from skain.data.schema import CLASSES, MALIGNANT, DataError
from skain.evaluation.bootstrap import Sample, delong, paired
from skain.evaluation.evaluate import read_predictions, read_truth
from skain.trust.triage import INVESTIGATE

NAMES = {"balanced_accuracy": "balanced accuracy", "macro_auc": "macro AUC", "melanoma_auc": "melanoma AUC",
         "ece": "ECE", "triage_sensitivity": "triage sensitivity", "triage_specificity": "triage specificity",
         "ood_rejection": "turned away (OOD)"}


def sample_of(pred: pd.DataFrame, labels: np.ndarray, classes: tuple[str, ...] = CLASSES) -> Sample:
    """A predictions table (aligned to `labels`) -> Sample: its decision (`pred` column, else arg-max), triage
    flags and OOD verdicts where the CSV has them."""
    probs = pred[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)
    index = {c: i for i, c in enumerate(classes)}
    decided = pred["pred"].map(index) if "pred" in pred else None
    choice = decided.to_numpy(dtype=int) if decided is not None and decided.notna().all() else probs.argmax(1)
    flagged = rejected = None
    if "triage" in pred and pred["triage"].notna().all():
        flagged = (pred["triage"].astype(str) == INVESTIGATE).to_numpy()
    if "ood" in pred and pred["ood"].notna().all():
        rejected = pred["ood"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
    positive = np.isin(labels, [index[c] for c in MALIGNANT if c in index])
    return Sample(labels, probs, choice, flagged, positive if flagged is not None else None, rejected,
                  index.get("mel"))


def load_pair(a: str | Path, b: str | Path, truth: str | Path) -> tuple[Sample, Sample, np.ndarray | None, dict]:
    """Both prediction files and the truth, on the images all three share (scorable in both)."""
    t = read_truth(truth)  # with lesion_id where the CSV has it
    pa, pb = read_predictions(a), read_predictions(b)
    cols = [f"p_{c}" for c in CLASSES]
    ok_a = pa.loc[np.isfinite(pa[cols].to_numpy(float)).all(1), "image_id"]
    ok_b = pb.loc[np.isfinite(pb[cols].to_numpy(float)).all(1), "image_id"]
    shared = t[t["image_id"].isin(set(ok_a) & set(ok_b))].reset_index(drop=True)
    if shared.empty:
        raise DataError(f"{a} and {b} share no scorable image with the truth {truth}")
    labels = shared["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    align = lambda p: shared[["image_id"]].merge(p.drop_duplicates("image_id"), on="image_id")  # noqa: E731
    groups = shared["lesion_id"].to_numpy() if "lesion_id" in shared else None
    info = {"images": int(len(shared)), "lesions": int(len(np.unique(groups))) if groups is not None else None,
            "left_out": {"a": int(len(pa) - len(shared)), "b": int(len(pb) - len(shared))}}
    return sample_of(align(pa), labels), sample_of(align(pb), labels), groups, info


def compare(a: str | Path, b: str | Path, truth: str | Path, resamples: int = 2000, seed: int = 0) -> dict:
    sa, sb, groups, info = load_pair(a, b, truth)
    result = {"a": str(a), "b": str(b), "truth": str(truth), **info,
              **paired(sa, sb, groups, resamples=resamples, seed=seed)}
    per_class = {c: delong(sa.labels == i, sa.probs[:, i], sb.probs[:, i]) for i, c in enumerate(CLASSES)
                 if 2 <= (sa.labels == i).sum() <= len(sa.labels) - 2}
    result["delong"] = {"per_class_auc": per_class}
    if "mel" in per_class:  # melanoma's AUC is reported on its own row of the table
        result["delong"]["melanoma_auc"] = per_class["mel"]
    return result


def table(result: dict) -> str:
    """The paired table as printable text: metric, A, B, B - A [95% CI], p."""
    level = int(round(100 * result["level"]))
    unit = f"{result['lesions']} lesions" if result.get("lesions") else "images"
    lines = [f"{result['images']} images ({unit} resampled {result['resamples']} times, seed {result['seed']}); "
             f"A = {result['a']}, B = {result['b']}",
             f"{'metric':24s} {'A':>7s} {'B':>7s} {'B - A':>8s}  {level}% CI (paired)      p"]
    rows = dict(NAMES)
    rows.update({f"recall_{i}": f"recall {c}" for i, c in enumerate(CLASSES)})
    for key, name in rows.items():
        m = result["metrics"].get(key)
        if m is None:
            continue
        p = result["delong"].get(key, {}).get("p_value", m["p_bootstrap"])
        lo, hi = m["ci"]
        lines.append(f"{name:24s} {m['a']:7.3f} {m['b']:7.3f} {m['difference']:+8.3f}  [{lo:+.3f}, {hi:+.3f}]  "
                     f"{p:6.3f}{' (DeLong)' if key in result['delong'] else ''}")
    return "\n".join(lines)
