"""Scoring a trained bundle on labelled images: the figures `metrics.json` reports, computed through the
same Predictor that `skain predict` uses (fp32, calibrated), with the metadata fields present, each one
blanked, and all blanked.

The backbone runs once per image; only the small metadata branch and head run once per variant, so the
five variants cost about one prediction pass.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from skain.data.dataset import LesionDataset, metadata_variants
from skain.data.encoder import FIELDS
from skain.data.schema import CLASSES
from skain.data.transforms import tta_views
from skain.engine import predict_logits
from skain.metrics import classification_metrics

log = logging.getLogger(__name__)

VARIANTS: dict[str, set[str]] = {"present": set(), "age_blank": {"age"}, "sex_blank": {"sex"},
                                 "site_blank": {"site"}, "all_blank": set(FIELDS)}


@torch.no_grad()
def variant_logits(predictor, frame: pd.DataFrame, variants: dict[str, set[str]], batch_size: int = 64,
                   num_workers: int = 0, progress: bool = False, cache_dir=None, views: int = 1,
                   tta: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Raw logits of every image in `frame` for each metadata variant (fields blanked as if left empty), from
    one backbone pass per view. With `views` > 1, the variants named in `tta` are also averaged over the
    test-time-augmentation views (flips, 90-degree turns) as `skain predict --tta` does, under the key
    `<variant>_tta<views>`; the single-view logits come from the identity view, the first of them."""
    dataset = LesionDataset(frame, predictor.encoder, predictor.loader(cache_dir), predictor.transform)
    loader = DataLoader(dataset, predictor.batch_size(batch_size), shuffle=False, num_workers=num_workers)
    tta = tuple(tta) if views > 1 else ()
    res = predict_logits(predictor.model, loader, predictor.device, predictor.dtype, predictor.channels_last,
                         "scoring", progress, (lambda x: tta_views(x, views)) if tta else None,
                         metadata_variants(predictor.encoder, variants))
    single = "first" if tta else "logits"
    return {**{name: res[f"{single}/{name}"] for name in variants},
            **{f"{name}_tta{views}": res[f"logits/{name}"] for name in tta}}


def assess(predictor, frame: pd.DataFrame, batch_size: int = 64, num_workers: int = 0, progress: bool = False,
           cache_dir=None, views: int = 1,
           tta: tuple[str, ...] = ("present", "all_blank")) -> tuple[dict, pd.DataFrame, dict[str, np.ndarray]]:
    """-> (metrics per variant, per-image table of the 'present' variant with p_ and logit_ columns, the raw
    logits per variant).

    Image-only models have one variant. Probabilities are temperature-calibrated like `skain predict`'s; with
    `views` > 1 the `tta` variants are also scored over that many views (`<variant>_tta<views>`), calibrated as
    under `skain predict --tta` (the temperature fit for that many views, else the plain average)."""
    variants = {"present": set()} if predictor.model.meta is None else VARIANTS
    tta = tuple(n for n in tta if n in variants)
    logits = variant_logits(predictor, frame, variants, batch_size, num_workers, progress, cache_dir, views, tta)
    labels = frame["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    metrics = {}
    for name, z in logits.items():
        probs = (predictor.trust.for_views(views) if "_tta" in name else predictor.trust).calibrate(z)
        m = classification_metrics(labels, probs, CLASSES, pred=predictor.decide(probs))
        m["melanoma_recall"] = m["per_class"]["mel"]["recall"]
        metrics[name] = m
    probs = predictor.trust.calibrate(logits["present"])
    table = predictions_table(frame, probs, logits["present"], predictor.decide(probs))
    return metrics, table, logits


def predictions_table(frame: pd.DataFrame, probs: np.ndarray, logits: np.ndarray, pred: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame({"image_id": frame["image_id"].to_numpy(), "dx": frame["dx"].to_numpy()})
    out["pred"] = np.array(CLASSES)[pred]
    for j, c in enumerate(CLASSES):
        out[f"p_{c}"] = probs[:, j]
    for j, c in enumerate(CLASSES):
        out[f"logit_{c}"] = logits[:, j]
    return out


def summary_row(metrics: dict) -> dict:
    """The few numbers a table shows per variant."""
    return {"balanced_accuracy": metrics["balanced_accuracy"], "macro_auc": metrics["macro_auc"],
            "accuracy": metrics["accuracy"], "melanoma_recall": metrics["melanoma_recall"],
            "akiec_recall": metrics["per_class"]["akiec"]["recall"], "n": metrics["n"]}
