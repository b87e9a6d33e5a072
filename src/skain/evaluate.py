"""Score predictions against ground truth: the numbers a paper reports, from `metrics.py` only.

Inputs are a skAIn predictions CSV (`p_<class>` columns) or an ISIC 2018 Task 3 CSV (`image,MEL,NV,...`), and
a ground-truth CSV with `image_id,dx` (HAM10000 metadata) or the ISIC one-hot truth format.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .data.schema import CLASSES, DataError, clean_metadata, read_csv
from .metrics import classification_metrics, one_vs_rest_rates

log = logging.getLogger(__name__)

ISIC2018_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


def read_predictions(path: str | Path, classes: tuple[str, ...] = CLASSES) -> pd.DataFrame:
    """-> image_id + p_<class> columns (NaN where an image failed), from either supported format."""
    frame = pd.read_csv(path)
    if "image" in frame.columns and set(ISIC2018_COLUMNS) <= set(frame.columns):
        frame = frame.rename(columns={"image": "image_id", **{c: f"p_{c.lower()}" for c in ISIC2018_COLUMNS}})
    missing = [c for c in ("image_id", *(f"p_{c}" for c in classes)) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: not a predictions CSV: missing column(s) {', '.join(missing)} (expected "
                        f"skAIn's image_id,pred,prob,p_<class>... or ISIC 2018's image,{','.join(ISIC2018_COLUMNS)})")
    frame["image_id"] = frame["image_id"].astype(str).str.replace(r"\.(jpe?g|png)$", "", case=False, regex=True)
    return frame


def read_truth(path: str | Path) -> pd.DataFrame:
    """-> image_id, dx from HAM10000-style metadata or an ISIC 2018 one-hot ground-truth CSV."""
    raw = read_csv(path)
    upper = {c.upper(): c for c in raw.columns}
    if "dx" not in raw.columns and "image" in raw.columns and set(ISIC2018_COLUMNS) <= set(upper):
        onehot = raw[[upper[c] for c in ISIC2018_COLUMNS]].astype(float).to_numpy()
        raw = pd.DataFrame({"image_id": raw["image"], "dx": [ISIC2018_COLUMNS[i].lower() for i in onehot.argmax(1)]})
    return clean_metadata(raw, str(path), require=("image_id", "dx"))[["image_id", "dx"]]


def align(pred: pd.DataFrame, truth: pd.DataFrame, classes: tuple[str, ...] = CLASSES):
    """-> (labels, probs, info) over the ground-truth images that were predicted. Truth rows without a
    prediction and predictions without truth are counted (and warned about), never guessed; rows whose image
    failed to decode (NaN probabilities) are left out and counted."""
    merged = truth.merge(pred, on="image_id", how="inner")
    if merged.empty:
        raise DataError("no image_id is both in the predictions and in the ground truth; check the two files")
    unpredicted = len(truth) - len(merged)
    extra = len(pred) - len(merged)
    if unpredicted:
        log.warning("%d ground-truth image(s) have no prediction and are not scored", unpredicted)
    if extra:
        log.warning("%d predicted image(s) have no ground truth and are not scored", extra)
    probs = merged[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)
    ok = np.isfinite(probs).all(1)
    if not ok.all():
        log.warning("%d image(s) without a prediction (unreadable) are left out of the metrics", int((~ok).sum()))
    if not ok.any():
        raise DataError("no scorable predictions: every image failed")
    labels = merged["dx"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    info = {"scored": int(ok.sum()), "failed": int((~ok).sum()), "truth_without_prediction": unpredicted,
            "prediction_without_truth": extra}
    return labels[ok], probs[ok], info


def evaluate(labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...] = CLASSES) -> dict:
    """classification_metrics plus melanoma sensitivity/specificity at the argmax decision."""
    metrics = classification_metrics(labels, probs, classes)
    if "mel" in classes:
        metrics["melanoma"] = one_vs_rest_rates(labels, probs.argmax(1), list(classes).index("mel"))
    return metrics


def headline(metrics: dict) -> str:
    """One printable block: balanced accuracy first, as HAM10000 is 67% nevi."""
    mel = metrics.get("melanoma", {})
    return (f"balanced accuracy {metrics['balanced_accuracy']:.4f} | accuracy {metrics['accuracy']:.4f} | "
            f"macro F1 {metrics['macro_f1']:.4f} | macro AUC {metrics['macro_auc']:.4f} | "
            f"melanoma sensitivity {mel.get('sensitivity', float('nan')):.4f} specificity "
            f"{mel.get('specificity', float('nan')):.4f} (n={metrics['n']})")
