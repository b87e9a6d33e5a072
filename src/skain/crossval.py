"""`skain train --all-folds`: every fold of the lesion-grouped split, each with a test fold that chooses
nothing, then out-of-fold predictions and a cross-validated report (mean +- std per metric)."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .bundle import atomic_json, atomic_write
from .config import Config
from .data.schema import CLASSES
from .metrics import classification_metrics

log = logging.getLogger(__name__)

HEADLINE = ("balanced_accuracy", "macro_auc", "accuracy", "macro_f1", "melanoma_recall")
OOF_NAME = "oof_predictions.csv"
REPORT_NAME = "cv_report.json"


def fold_config(cfg: Config, fold: int) -> Config:
    """The run of one fold: holdout on, its own sub-folder of the output."""
    data = replace(cfg.data, fold=fold, holdout=True, all_folds=False)
    train = replace(cfg.train, output=str(Path(cfg.train.output) / f"fold{fold}"))
    return replace(cfg, data=data, train=train)


def fit_all_folds(cfg: Config) -> dict:
    """Train fold 0..K-1 (each resumable in its own folder), then write the out-of-fold report."""
    from .train import fit
    out = Path(cfg.train.output)
    for fold in range(cfg.data.folds):
        log.info("=== fold %d/%d ===", fold + 1, cfg.data.folds)
        fit(fold_config(cfg, fold))
    return write_report(out, cfg.data.folds)


def collect(out: Path, folds: int) -> tuple[pd.DataFrame, list[dict]]:
    frames, metrics = [], []
    for fold in range(folds):
        folder = out / f"fold{fold}"
        table = pd.read_csv(folder / "test_predictions.csv")
        frames.append(table.assign(fold=fold))
        metrics.append(json.loads((folder / "metrics.json").read_text(encoding="utf-8")))
    return pd.concat(frames, ignore_index=True), metrics


def mean_std(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else 0.0,
            "folds": [float(v) for v in arr]}


def write_report(out: Path, folds: int) -> dict:
    """oof_predictions.csv (each image scored by the one model that never saw it) and cv_report.json."""
    oof, per_fold = collect(out, folds)
    atomic_write(out / OOF_NAME, lambda fh: fh.write(oof.to_csv(index=False).encode()))
    labels = oof["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    pooled = classification_metrics(labels, oof[[f"p_{c}" for c in CLASSES]].to_numpy(), CLASSES)
    pooled["melanoma_recall"] = pooled["per_class"]["mel"]["recall"]
    variants = per_fold[0]["metadata_ablation"].keys() - {"split"}
    report = {
        "what": "k-fold cross-validation, lesion-grouped; each fold's test set chose nothing (epoch, temperature "
                "and thresholds were chosen on an inner validation fold)",
        "folds": folds, "images": int(len(oof)),
        "per_fold_mean_std": {k: mean_std([m["test"][k] for m in per_fold]) for k in HEADLINE},
        "metadata_ablation_mean": {v: {k: float(np.mean([m["metadata_ablation"][v][k] for m in per_fold]))
                                       for k in ("balanced_accuracy", "macro_auc", "melanoma_recall")}
                                   for v in sorted(variants)},
        "pooled_oof": pooled,
        "train_minutes": [float(m["train_minutes"]) for m in per_fold],
        "best_epochs": [int(m["best_epoch"]) for m in per_fold],
    }
    from .decision import log_prior_from_counts, nested_estimate
    report["decision_rule"] = nested_estimate(oof, log_prior_from_counts(oof["dx"].value_counts().to_dict()))
    atomic_json(report, out / REPORT_NAME)
    h = report["per_fold_mean_std"]
    log.info("cross-validated (%d folds, test folds chose nothing): balanced accuracy %.3f +- %.3f, macro AUC "
             "%.3f +- %.3f, melanoma recall %.3f +- %.3f -> %s", folds, h["balanced_accuracy"]["mean"],
             h["balanced_accuracy"]["std"], h["macro_auc"]["mean"], h["macro_auc"]["std"],
             h["melanoma_recall"]["mean"], h["melanoma_recall"]["std"], out / REPORT_NAME)
    return report
