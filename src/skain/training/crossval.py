"""`skain train --all-folds`: every fold of the lesion-grouped split, each with a test fold that chooses
nothing, then out-of-fold predictions and a cross-validated report (mean +- std per metric).

The pooled out-of-fold figures carry 95% bootstrap intervals (`pooled_oof_intervals`: lesions resampled within
their diagnosis, the lesion ids read from the folds' split.csv), and each per-fold pair of the metadata table also
gets the paired interval of its difference on the pooled out-of-fold predictions of the same images
(`vs_image_only_pooled`, with DeLong's test for the melanoma and per-class AUCs)."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from skain.fileio import atomic_json, atomic_write
from skain.training.config import Config
from skain.training.cvreport import mean_std, oof_lesions, summarize_oof, write_metadata_table
from skain.training.runfolder import (
    CV_REPORT_NAME,
    METRICS_NAME,
    OOF_NAME,
    TEST_PREDICTIONS,
)
from skain.training.train import fit

log = logging.getLogger(__name__)

REPORT_NAME = CV_REPORT_NAME


def fold_config(cfg: Config, fold: int) -> Config:
    """The run of one fold: holdout on, its own sub-folder of the output."""
    data = replace(cfg.data, fold=fold, holdout=True, all_folds=False, with_image_only=False)
    train = replace(cfg.train, output=str(Path(cfg.train.output) / f"fold{fold}"))
    return replace(cfg, data=data, train=train)


IMAGE_ONLY_DIR = "image_only"


def fit_all_folds(cfg: Config) -> dict:
    """Train fold 0..K-1 (each resumable in its own folder), then write the out-of-fold report. With
    `with_image_only`, the image-only model is trained on the same folds into <output>/image_only/ and the
    report gains the paired metadata table (`metadata_vs_image_only`, also metadata_table.md)."""
    out = Path(cfg.train.output)
    if cfg.data.with_image_only and cfg.model.image_only:
        raise ValueError("--with-image-only compares a multimodal run with the image-only one; drop --image-only")
    for fold in range(cfg.data.folds):
        log.info("=== fold %d/%d ===", fold + 1, cfg.data.folds)
        fit(fold_config(cfg, fold))
    report = write_report(out, cfg.data.folds)
    if not cfg.data.with_image_only:
        return report
    baseline = replace(cfg, model=replace(cfg.model, image_only=True),
                       train=replace(cfg.train, output=str(out / IMAGE_ONLY_DIR)))
    for fold in range(cfg.data.folds):
        log.info("=== image-only baseline, fold %d/%d ===", fold + 1, cfg.data.folds)
        fit(fold_config(baseline, fold))
    write_report(out / IMAGE_ONLY_DIR, cfg.data.folds)
    report["metadata_vs_image_only"] = write_metadata_table(out, out / IMAGE_ONLY_DIR, out)
    atomic_json(report, out / REPORT_NAME)
    row = report["metadata_vs_image_only"]["multimodal, all blank"]["vs_image_only_paired"]
    log.info("all fields blank vs image only, per fold: balanced accuracy %+.3f, melanoma recall %+.3f -> %s",
             row["balanced_accuracy_argmax"]["mean"], row["melanoma_recall_argmax"]["mean"],
             out / "metadata_table.md")
    return report


def collect(out: Path, folds: int) -> tuple[pd.DataFrame, list[dict]]:
    frames, metrics = [], []
    for fold in range(folds):
        folder = out / f"fold{fold}"
        table = pd.read_csv(folder / TEST_PREDICTIONS)
        frames.append(table.assign(fold=fold))
        metrics.append(json.loads((folder / METRICS_NAME).read_text(encoding="utf-8")))
    return pd.concat(frames, ignore_index=True), metrics


def write_report(out: Path, folds: int) -> dict:
    """oof_predictions.csv (each image scored by the one model that never saw it) and cv_report.json."""
    oof, per_fold = collect(out, folds)
    lesions = oof_lesions([out / f"fold{k}" for k in range(folds)], oof["image_id"])
    atomic_write(out / OOF_NAME, lambda fh: fh.write(oof.to_csv(index=False).encode()))
    variants = per_fold[0]["metadata_ablation"].keys() - {"split"}
    report = {
        "what": "k-fold cross-validation, lesion-grouped; each fold's test set chose nothing (epoch, temperature "
                "and thresholds were chosen on an inner validation fold)",
        "folds": folds, **summarize_oof(oof, lesions),
        "metadata_ablation_mean": {v: {k: float(np.mean([m["metadata_ablation"][v][k] for m in per_fold]))
                                       for k in ("balanced_accuracy", "macro_auc", "melanoma_recall")}
                                   for v in sorted(variants)},
        "train_minutes": [float(m["train_minutes"]) for m in per_fold],
        "best_epochs": [int(m["best_epoch"]) for m in per_fold],
    }
    tta = [k for k in per_fold[0] if k.startswith("test_tta")]
    if tta:  # the test folds were also scored with TTA views (metadata present and all blank)
        report[tta[0]] = {v: {k: mean_std([m[tta[0]][v][k] for m in per_fold])
                              for k in ("balanced_accuracy", "macro_auc", "melanoma_recall")}
                          for v in per_fold[0][tta[0]]}
    atomic_json(report, out / REPORT_NAME)
    h = report["per_fold_mean_std"]
    log.info("cross-validated (%d folds, test folds chose nothing): balanced accuracy %.3f +- %.3f, macro AUC "
             "%.3f +- %.3f, melanoma recall %.3f +- %.3f -> %s", folds, h["balanced_accuracy"]["mean"],
             h["balanced_accuracy"]["std"], h["macro_auc"]["mean"], h["macro_auc"]["std"],
             h["melanoma_recall"]["mean"], h["melanoma_recall"]["std"], out / REPORT_NAME)
    return report




# ------------------------------------------------------------------ metadata vs image only (`cv-report --image-only`)


