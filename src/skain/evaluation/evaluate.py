"""Score predictions against ground truth: the numbers a paper reports, from `metrics.py` only.

Inputs are a skAIn predictions CSV (`p_<class>` columns) or an ISIC 2018 Task 3 CSV (`image,MEL,NV,...`), and
a ground-truth CSV with `image_id,dx` (HAM10000 metadata) or the ISIC one-hot truth format.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import softmax

from skain.data.encoder import FIELDS
from skain.data.images import IMAGE_SUFFIXES
from skain.data.schema import CLASSES, MALIGNANT, DataError, clean_metadata, read_csv
from skain.evaluation.bootstrap import Sample, bootstrap
from skain.metrics import (
    classification_metrics,
    expected_calibration_error,
    one_vs_rest_rates,
)
from skain.trust.calibration import fit_temperature
from skain.trust.modelcard import VALIDATION_COLUMN, validation_figures
from skain.trust.triage import INVESTIGATE, triage_rates

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
    suffixes = "|".join(s.lstrip(".") for s in IMAGE_SUFFIXES)  # a file name in the CSV: the image id is its stem
    frame["image_id"] = frame["image_id"].astype(str).str.replace(rf"\.({suffixes})$", "", case=False, regex=True)
    return frame


def read_truth(path: str | Path) -> pd.DataFrame:
    """-> image_id, dx from HAM10000-style metadata or an ISIC 2018 one-hot ground-truth CSV."""
    raw = read_csv(path)
    upper = {c.upper(): c for c in raw.columns}
    if "dx" not in raw.columns and "image" in raw.columns and set(ISIC2018_COLUMNS) <= set(upper):
        onehot = raw[[upper[c] for c in ISIC2018_COLUMNS]].astype(float).to_numpy()
        raw = pd.DataFrame({"image_id": raw["image"], "dx": [ISIC2018_COLUMNS[i].lower() for i in onehot.argmax(1)]})
    return truth_columns(clean_metadata(raw, str(path), require=("image_id", "dx")))


def truth_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """image_id, dx and, where known, lesion_id (intervals then resample lesions)."""
    return frame[[c for c in ("image_id", "dx", "lesion_id") if c in frame.columns]]


def align(pred: pd.DataFrame, truth: pd.DataFrame, classes: tuple[str, ...] = CLASSES, groups: bool = False):
    """-> (labels, probs, info, decided[, lesion ids]) over the ground-truth images that were predicted (the lesion
    ids, from the truth's `lesion_id` column or None, with `groups=True`); `decided` holds the
    class indices of a skAIn CSV's `pred` column (the model's decision rule), else None. Truth rows without a
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
    decided = None
    if "pred" in merged.columns:
        decided = merged["pred"].map({c: i for i, c in enumerate(classes)}).to_numpy()[ok]
        decided = None if np.isnan(decided.astype(float)).any() else decided.astype(int)
    if groups:
        lesions = merged["lesion_id"].astype(str).to_numpy()[ok] if "lesion_id" in merged else None
        return labels[ok], probs[ok], info, decided, lesions
    return labels[ok], probs[ok], info, decided


def evaluate(labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...] = CLASSES,
             decided: np.ndarray | None = None) -> dict:
    """classification_metrics plus melanoma sensitivity/specificity at the decision that was made (the
    predictions' `pred` column, i.e. the bundle's decision rule; arg-max of the probabilities otherwise)."""
    rule = "argmax" if decided is None else "pred column"
    decided = probs.argmax(1) if decided is None else decided
    metrics = classification_metrics(labels, probs, classes, pred=decided)
    metrics["decision"] = rule
    if "mel" in classes:
        metrics["melanoma"] = one_vs_rest_rates(labels, decided, list(classes).index("mel"))
    return metrics


def with_intervals(metrics: dict, labels: np.ndarray, probs: np.ndarray, decided: np.ndarray | None,
                   lesions: np.ndarray | None, resamples: int = 2000, seed: int = 0) -> dict:
    """`metrics` plus 95% bootstrap intervals of the headline and per-class figures (lesions resampled within
    their class where lesion ids are known, else images), under "intervals"."""
    sample = Sample(labels, probs, probs.argmax(1) if decided is None else decided, mel=CLASSES.index("mel"))
    return {**metrics, "intervals": bootstrap(sample, lesions, resamples=resamples, seed=seed)}


def headline(metrics: dict) -> str:
    """One printable block: balanced accuracy first, as HAM10000 is 67% nevi."""
    mel = metrics.get("melanoma", {})
    ci = (metrics.get("intervals") or {}).get("metrics", {}).get("balanced_accuracy", {}).get("ci")
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return (f"balanced accuracy {metrics['balanced_accuracy']:.4f}{ci_text} | accuracy {metrics['accuracy']:.4f} | "
            f"macro F1 {metrics['macro_f1']:.4f} | macro AUC {metrics['macro_auc']:.4f} | "
            f"melanoma sensitivity {mel.get('sensitivity', float('nan')):.4f} specificity "
            f"{mel.get('specificity', float('nan')):.4f} (n={metrics['n']})")


# ----------------------------------------------------------------------------- trust on labelled data from elsewhere
WITH, WITHOUT = "with metadata", "without metadata"


def trust_metrics(pred: pd.DataFrame, truth: pd.DataFrame, temperature: float | None,
                  classes: tuple[str, ...] = CLASSES, n_bins: int = 15) -> dict:
    """On labelled images (all real lesions): balanced accuracy and per-class recall; ECE before/after the
    bundle's temperature (and the temperature these images would have chosen); the OOD check's false-rejection
    rate; triage sensitivity/specificity at the bundle's threshold. Columns a predictions CSV lacks give None."""
    labels, probs, info, decided = align(pred, truth, classes)
    merged = truth.merge(pred, on="image_id", how="inner")
    merged = merged[np.isfinite(merged[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)).all(1)]
    metrics = evaluate(labels, probs, classes, decided)
    out = {"n": int(len(labels)), "balanced_accuracy": metrics["balanced_accuracy"],
           "macro_auc": metrics["macro_auc"], "recall": {c: m["recall"] for c, m in metrics["per_class"].items()},
           "melanoma_sensitivity_argmax": metrics.get("melanoma", {}).get("sensitivity"),
           "ece_after": expected_calibration_error(probs, labels, n_bins), "ece_bins": n_bins, **info}
    if temperature is not None:
        logits = temperature * np.log(np.clip(probs, 1e-300, 1.0))  # softmax(T log p) = softmax(z): T undone
        out.update({"temperature": float(temperature), "temperature_fit_here": fit_temperature(logits, labels),
                    "ece_before": expected_calibration_error(softmax(logits, axis=1), labels, n_bins)})
    if "ood" in merged and merged["ood"].notna().any():
        ood = merged["ood"].dropna().astype(str).str.lower().isin(["true", "1"])
        out["ood_false_rejection"] = float(ood.mean())
    if "triage" in merged and merged["triage"].notna().any():
        rated = merged[merged["triage"].notna()]
        rates = triage_rates(rated["triage"].to_numpy() == INVESTIGATE, rated["dx"].isin(MALIGNANT).to_numpy(),
                             (rated["dx"] == "mel").to_numpy())
        out.update({f"triage_{k}": v for k, v in rates.items()})
    return out


def trust_variants(predictor) -> dict[str, set[str]]:
    """The metadata variants the trust figures on a labelled folder need: as given and (for a network that takes
    metadata) every field blank, scored in one pass by `Predictor.predict_variants`."""
    return {"present": set()} if predictor.info["image_only"] else {"present": set(), "all_blank": set(FIELDS)}


def with_and_without_metadata(frame: pd.DataFrame, preds: dict[str, pd.DataFrame], temperature: float | None) -> dict:
    """trust_metrics for the predictions with metadata as given (`preds["present"]`) and with age/sex/site blanked
    for every row (`preds["all_blank"]`; absent for an image-only model, whose predictions cannot differ)."""
    truth = frame[["image_id", "dx"]]
    runs = {WITH: trust_metrics(preds["present"], truth, temperature)}
    if "all_blank" in preds:
        runs[WITHOUT] = trust_metrics(preds["all_blank"], truth, temperature)
    else:
        runs[WITHOUT] = {**runs[WITH], "note": "image-only model: metadata is not an input"}
    return runs


def external_entry(data: str, runs: dict) -> dict:
    """The model card's record of an evaluation on another labelled folder."""
    from datetime import datetime, timezone
    return {"data": data, "images": runs[WITH]["n"], "runs": runs,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def folder_trust(predictor, frame: pd.DataFrame, data: str, preds: dict[str, pd.DataFrame]) -> dict:
    """Trust figures of `predictor` on a labelled folder (`preds`: its predictions for `trust_variants`),
    beside the model card's own validation figures, and the model card extended by what was measured here."""
    runs = with_and_without_metadata(frame, preds, predictor.trust.temperature)
    views = ((predictor.bundle.get("trust") or {}).get("views") or {}).get(str(predictor.tta)) \
        if predictor.tta > 1 else None
    entry = external_entry(data, runs) | ({"tta": predictor.tta, "tta_fitted": bool(views)} if predictor.tta > 1
                                          else {})
    card = predictor.info.get("model_card")
    if card and views:
        entry["validation"] = validation_figures(card, views)  # the card shows these beside this folder's TTA runs
    shown = {VALIDATION_COLUMN: validation_figures(card, views), **runs} if card else runs
    return {"measured_on": f"external labelled folder {data}", "runs": shown,
            "model_card": {**card, "external": [*(card.get("external") or []), entry]} if card else None}
