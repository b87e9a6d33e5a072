"""Lesion-level scores beside the image-level ones, where the truth has `lesion_id`.

Each lesion gets one answer (`skain.inference.lesion.lesion_table`: the mean of its images' log-probabilities
through the model's decision rule) and one truth (its diagnosis; lesions whose images disagree are left out and
counted). The figures are `evaluate`'s, with bootstrap intervals over lesions, plus the paired difference between
the two levels on the lesions with several images (on a one-image lesion both levels give the same answer).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from skain.data.schema import CLASSES
from skain.evaluation.bootstrap import Sample, paired_levels
from skain.evaluation.evaluate import align, evaluate, with_intervals
from skain.inference.decision import Decision
from skain.inference.lesion import RULE, lesion_table
from skain.trust.runtime import TrustLayer

log = logging.getLogger(__name__)


def lesion_truth(truth: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """lesion_id -> dx from a truth table with image_id, dx, lesion_id, and the lesions whose images disagree on
    dx (HAM10000 gives each lesion one diagnosis)."""
    per = truth.astype({"lesion_id": str}).groupby("lesion_id")["dx"]
    conflicting = sorted(per.nunique().loc[lambda n: n > 1].index)
    return per.first().drop(conflicting), conflicting


def lesion_predictions(pred: pd.DataFrame, truth: pd.DataFrame, classes: tuple[str, ...] = CLASSES,
                       decide: Decision | None = None, trust: TrustLayer | None = None) -> pd.DataFrame:
    """One row per lesion of the predicted images that have truth (lesion_table's columns, plus dx)."""
    merged = truth.astype({"lesion_id": str}).merge(pred.drop(columns=["dx"], errors="ignore"), on="image_id")
    table = lesion_table(merged, merged["lesion_id"].to_numpy(), classes, decide, trust)
    dx, _ = lesion_truth(truth)
    return table.assign(dx=table["lesion_id"].map(dx))


def lesion_level(pred: pd.DataFrame, truth: pd.DataFrame, classes: tuple[str, ...] = CLASSES,
                 decide: Decision | None = None, trust: TrustLayer | None = None, resamples: int = 2000,
                 seed: int = 0) -> dict | None:
    """Lesion-level figures of per-image predictions (None unless the truth's lesion_id gives some lesion several
    predicted images): `evaluate`'s metrics
    with bootstrap intervals (one row per lesion) and `vs_image_level`, image- against lesion-level on the lesions
    with several images, paired over the same lesion resamples."""
    if "lesion_id" not in truth:
        return None
    sizes = truth[truth["image_id"].isin(set(pred["image_id"]))].groupby("lesion_id").size()
    if not (sizes > 1).any():
        return None  # every lesion has one image here: the lesion level is the image level
    _, conflicting = lesion_truth(truth)
    if conflicting:
        log.warning("%d lesion(s) whose images have different diagnoses are left out of the lesion-level figures",
                    len(conflicting))
    table = lesion_predictions(pred, truth, classes, decide, trust)
    scored = table[(table["error"] == "") & table["dx"].notna()].reset_index(drop=True)
    if scored.empty:
        return None
    index = {c: i for i, c in enumerate(classes)}
    labels = scored["dx"].map(index).to_numpy()
    probs = scored[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)
    decided = scored["pred"].map(index).to_numpy(dtype=int)
    metrics = with_intervals(evaluate(labels, probs, classes, decided), labels, probs, decided,
                             scored["lesion_id"].to_numpy(), resamples, seed)
    multi = set(scored.loc[scored["n_images"] > 1, "lesion_id"])
    out = {"rule": RULE, "lesions": int(len(scored)), "images": int(scored["n_images"].sum()),
           "multi_image_lesions": int(len(multi)), "conflicting_truth": len(conflicting), **metrics}
    if multi:
        out["vs_image_level"] = image_vs_lesion(pred, truth[truth["lesion_id"].astype(str).isin(multi)], scored,
                                                classes, resamples, seed)
    return out


def image_vs_lesion(pred: pd.DataFrame, truth: pd.DataFrame, lesions: pd.DataFrame,
                    classes: tuple[str, ...] = CLASSES, resamples: int = 2000, seed: int = 0) -> dict:
    """Image-level (A) against lesion-level (B) figures on the lesions of `truth` (with lesion_id), paired over
    the same lesion resamples (`bootstrap.paired_levels`). `lesions`: lesion_predictions' rows of those lesions."""
    pred = pred[pred["image_id"].isin(set(truth["image_id"]))].drop(columns=["dx"], errors="ignore")
    labels, probs, _, decided, groups = align(pred, truth, classes, groups=True)
    keep = set(groups)
    rows = lesions[lesions["lesion_id"].isin(keep)]
    index = {c: i for i, c in enumerate(classes)}
    mel = index.get("mel")
    images = Sample(labels, probs, probs.argmax(1) if decided is None else decided, mel=mel)
    per_lesion = Sample(rows["dx"].map(index).to_numpy(), rows[[f"p_{c}" for c in classes]].to_numpy(np.float64),
                        rows["pred"].map(index).to_numpy(dtype=int), mel=mel)
    return paired_levels(images, groups, per_lesion, rows["lesion_id"].to_numpy(), resamples, seed)


def lesion_headline(level: dict) -> str:
    """One printable line: lesion-level balanced accuracy with its interval, and the change from image level."""
    ci = level["intervals"]["metrics"]["balanced_accuracy"]["ci"]
    text = (f"per lesion ({level['lesions']} lesions, {level['multi_image_lesions']} with several images): balanced "
            f"accuracy {level['balanced_accuracy']:.4f} [{ci[0]:.3f}, {ci[1]:.3f}] | macro AUC "
            f"{level['macro_auc']:.4f}")
    vs = (level.get("vs_image_level") or {}).get("metrics", {}).get("balanced_accuracy")
    if vs:
        text += (f" | on the multi-image lesions, lesion minus image level {vs['difference']:+.3f} "
                 f"[{vs['ci'][0]:+.3f}, {vs['ci'][1]:+.3f}]")
    return text
