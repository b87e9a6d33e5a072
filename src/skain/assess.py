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

from .data.dataset import LesionDataset
from .data.encoder import FIELDS
from .data.schema import CLASSES
from .engine import autocast, to_device
from .metrics import classification_metrics

log = logging.getLogger(__name__)

VARIANTS: dict[str, set[str]] = {"present": set(), "age_blank": {"age"}, "sex_blank": {"sex"},
                                 "site_blank": {"site"}, "all_blank": set(FIELDS)}


@torch.no_grad()
def variant_logits(predictor, frame: pd.DataFrame, variants: dict[str, set[str]], batch_size: int = 64,
                   num_workers: int = 0, progress: bool = False, cache_dir=None) -> dict[str, np.ndarray]:
    """Raw logits of every image in `frame` for each metadata variant (fields blanked as if left empty)."""
    from tqdm.auto import tqdm
    model, enc = predictor.model, predictor.encoder
    dataset = LesionDataset(frame, enc, predictor.loader(cache_dir), predictor.transform)
    loader = DataLoader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    out: dict[str, list] = {name: [] for name in variants}
    for batch in tqdm(loader, desc="scoring", leave=False, disable=None if progress else True):
        batch = to_device(batch, predictor.device, predictor.channels_last)
        with autocast(predictor.device, predictor.dtype):
            feats = model.backbone(batch["image"])
            for name, fields in variants.items():
                age, sex, site = batch["age"], batch["sex"], batch["site"]
                if fields:
                    age, sex, site = (torch.as_tensor(x, device=predictor.device) for x in enc.blank(
                        age.cpu().numpy(), sex.cpu().numpy(), site.cpu().numpy(), fields))
                out[name].append(model.classify(feats, age, sex, site).float().cpu())
    return {name: torch.cat(chunks).numpy() for name, chunks in out.items()}


def assess(predictor, frame: pd.DataFrame, batch_size: int = 64, num_workers: int = 0,
           progress: bool = False, cache_dir=None) -> tuple[dict, pd.DataFrame]:
    """-> (metrics per variant, per-image table of the 'present' variant with p_ and logit_ columns).

    Image-only models have one variant. Probabilities are temperature-calibrated like `skain predict`'s."""
    variants = {"present": set()} if predictor.model.meta is None else VARIANTS
    logits = variant_logits(predictor, frame, variants, batch_size, num_workers, progress, cache_dir)
    labels = frame["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    metrics = {}
    for name, z in logits.items():
        probs = predictor.trust.calibrate(z)
        m = classification_metrics(labels, probs, CLASSES, pred=predictor.decide(probs))
        m["melanoma_recall"] = m["per_class"]["mel"]["recall"]
        metrics[name] = m
    probs = predictor.trust.calibrate(logits["present"])
    table = predictions_table(frame, probs, logits["present"], predictor.decide(probs))
    return metrics, table


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
