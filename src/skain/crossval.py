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


# ------------------------------------------------------------------ reports across runs (`skain cv-report`)
def fold_dirs(run: Path) -> list[tuple[int, Path]]:
    """(fold, folder) of every fold<k>/ under a k-fold output that has test-fold logits."""
    from .train import TEST_LOGITS
    found = sorted((int(p.name[4:]), p) for p in Path(run).glob("fold*")
                   if p.name[4:].isdigit() and (p / TEST_LOGITS).is_file())
    if not found:
        raise ValueError(f"{run}: no fold<k>/{TEST_LOGITS} (train with --all-folds or --holdout --fold k)")
    return found


def fold_probs(folder: Path, variant: str) -> pd.DataFrame:
    """One fold's test images: image_id, dx and p_<class> = softmax of the stored logits of `variant`.

    An image-only run has nothing to blank: its `present` logits stand for every metadata variant."""
    from .train import TEST_LOGITS
    with np.load(folder / TEST_LOGITS) as saved:
        key = variant
        if key not in saved.files:
            fallback = "present" + variant[len(variant.split("_tta")[0]):]  # all_blank_tta8 -> present_tta8
            if "all_blank" in saved.files or fallback not in saved.files:
                raise ValueError(f"{folder}: no {variant!r} logits (has {', '.join(saved.files[2:])})")
            key = fallback
        z = saved[key].astype(np.float64)
        table = pd.DataFrame({"image_id": saved["image_id"], "dx": saved["dx"]})
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for j, c in enumerate(CLASSES):
        table[f"p_{c}"] = probs[:, j]
    return table


def ensemble_oof(runs: list[Path], variant: str = "present") -> pd.DataFrame:
    """Out-of-fold probabilities averaged over runs trained on the same folds (same test images per fold)."""
    per_run = [dict(fold_dirs(run)) for run in runs]
    folds = sorted(per_run[0])
    for run, dirs in zip(runs[1:], per_run[1:]):
        if sorted(dirs) != folds:
            missing = sorted(set(folds) ^ set(dirs))
            raise ValueError(f"{run}: folds {sorted(dirs)} but {runs[0]} has {folds} (fold{missing[0]} is missing "
                             "in one); every run must have the same folds")
    frames = []
    for k in folds:
        tables = [fold_probs(dirs[k], variant) for dirs in per_run]
        first = tables[0]
        for run, t in zip(runs[1:], tables[1:]):  # same split: the same test images in the same order
            if list(t["image_id"]) != list(first["image_id"]):
                raise ValueError(f"{run}/fold{k}: other test images than {runs[0]}/fold{k}; the runs were not "
                                 "trained on the same split (same --folds and --split-seed)")
        cols = [f"p_{c}" for c in CLASSES]
        mean = np.mean([t[cols].to_numpy() for t in tables], axis=0)
        frames.append(first[["image_id", "dx"]].assign(fold=k, **{c: mean[:, j] for j, c in enumerate(cols)}))
    return pd.concat(frames, ignore_index=True)


def summarize_oof(oof: pd.DataFrame) -> dict:
    """Per-fold mean +- std of the headline metrics (arg-max), pooled metrics and the nested decision rule."""
    from .decision import log_prior_from_counts, nested_estimate
    cols = [f"p_{c}" for c in CLASSES]
    index = {c: i for i, c in enumerate(CLASSES)}
    per_fold = []
    for _, part in oof.groupby("fold", sort=True):
        m = classification_metrics(part["dx"].map(index).to_numpy(), part[cols].to_numpy(), CLASSES)
        m["melanoma_recall"] = m["per_class"]["mel"]["recall"]
        m["akiec_recall"] = m["per_class"]["akiec"]["recall"]
        per_fold.append(m)
    pooled = classification_metrics(oof["dx"].map(index).to_numpy(), oof[cols].to_numpy(), CLASSES)
    keys = HEADLINE + ("akiec_recall",)
    return {"images": int(len(oof)), "folds": len(per_fold),
            "per_fold_mean_std": {k: mean_std([m[k] for m in per_fold]) for k in keys},
            "per_class_recall_mean": {c: float(np.mean([m["per_class"][c]["recall"] for m in per_fold]))
                                      for c in CLASSES},
            "pooled_oof": pooled,
            "decision_rule": nested_estimate(oof, log_prior_from_counts(oof["dx"].value_counts().to_dict()))}


def cross_run_report(runs: list[str | Path], output: str | Path, variant: str = "present") -> dict:
    """`skain cv-report`: the cross-validated report of one k-fold run or of the ensemble of several (their
    probabilities averaged per test image), for one scored variant (present, all_blank, age_blank, ...; a
    `_tta8` suffix for the 8-view scores). Writes <output>/oof_<variant>.csv and cv_<variant>.json."""
    runs = [Path(r) for r in runs]
    oof = ensemble_oof(runs, variant)
    report = {"what": f"k-fold cross-validation, lesion-grouped, test folds that chose nothing; variant {variant}; "
                      + ("one run" if len(runs) == 1 else f"ensemble of {len(runs)} runs (probabilities averaged)")
                      + "; probabilities are the softmax of the stored logits (no temperature)",
              "runs": [str(r) for r in runs], "variant": variant, **summarize_oof(oof)}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"oof_{variant}.csv", lambda fh: fh.write(oof.to_csv(index=False).encode()))
    atomic_json(report, out / f"cv_{variant}.json")
    return report
