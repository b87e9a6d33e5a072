"""fit(cfg): wiring only. Data -> split -> encoder -> model -> two training phases -> bundle and reports."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from skain.data.encoder import MetadataEncoder
from skain.data.schema import CLASSES, DataError
from skain.data.transforms import resolve_preprocess
from skain.engine import (
    EarlyStopping,
    ModelEma,
    amp_dtype,
    resolve_device,
)
from skain.evaluation.bootstrap import Sample, bootstrap
from skain.evaluation.variants import assess, summary_row
from skain.fileio import atomic_json, atomic_write
from skain.inference.predictor import Predictor
from skain.model import SkainNet
from skain.modelfile.bundle import BUNDLE_NAME, atomic_torch_save
from skain.training.config import Config
from skain.training.distributed import (
    DistInfo,
    broadcast,
    cleanup,
    device_for,
    init_distributed,
    on_main_rank,
)
from skain.training.loaders import Prepared, build_loaders, class_weights, make_loader_fn, prepare_data, warm_images
from skain.training.loop import Run, plan, run_phase, seed_everything
from skain.training.runfolder import (
    LAST_NAME,
    METRICS_NAME,
    TEST_LOGITS,
    TEST_PREDICTIONS,
    VAL_PREDICTIONS,
    RunLock,
    check_output,
    clear_run,
    fingerprints,
    resume_problem,
    save_logits,
    write_run_files,
)
from skain.training.trust_fit import after_training
from skain.training.weights import load_pretrained
from skain.trust.modelcard import interval_summary, write_card

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- output folder


# ----------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------- model
def build_network(cfg: Config, encoder: MetadataEncoder) -> tuple[SkainNet, dict, dict, str]:
    m = cfg.model
    args: dict[str, Any] = {  # SkainNet's keyword arguments, stored in the bundle as model_args
        "backbone": m.backbone, "n_sex": len(encoder.sex_vocab), "n_site": len(encoder.site_vocab),
        "num_classes": m.num_classes, "image_only": m.image_only, "drop_rate": m.drop_rate,
        "age_inputs": encoder.age_width}
    model = SkainNet(**args)
    weights = load_pretrained(model.backbone, m.backbone, m.pretrained)
    pretrained_cfg = cast(dict, model.backbone.pretrained_cfg)  # a timm model's plain-dict attribute
    pre = resolve_preprocess(pretrained_cfg, m.input_size, m.mean, m.std, m.crop_pct)
    log.info("model: %s (%s), %s, input %d px, %.1fM parameters", m.backbone, weights,
             "image only" if m.image_only else "image + metadata", pre["input_size"],
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model, args, pre, weights


# ----------------------------------------------------------------------------- the run


def fit(cfg: Config) -> dict:
    """Train as configured; returns the final metrics (also written to <output>/metrics.json).

    Under torchrun every rank calls this; rank 0 alone checks and locks the output folder and writes files.
    """
    out = Path(cfg.train.output)
    if not 1 <= cfg.train.test_tta <= 8:
        raise ValueError(f"test_tta must be between 1 and 8 views (got {cfg.train.test_tta})")
    if not 0 <= cfg.train.consistency < float("inf"):
        raise ValueError(f"--consistency must be a weight >= 0 (got {cfg.train.consistency})")
    info = init_distributed()
    try:
        error = None
        if info.main:
            try:
                check_output(out, cfg.train.resume, cfg.train.overwrite)
            except DataError as exc:
                error = str(exc)
        error = broadcast(info, error)
        if error:
            raise DataError(error)
        if not info.main:
            return _fit(cfg, out, info)
        with RunLock(out):
            return _fit(cfg, out, info)
    finally:
        cleanup(info)


def _fit(cfg: Config, out: Path, info: DistInfo) -> dict:
    t = cfg.train
    seed_everything(t.seed)
    device = device_for(info, resolve_device())
    dtype = amp_dtype(device, t.amp)
    prep = prepare_data(cfg)
    parts = {"train": prep.train_idx, "val": prep.val_idx}
    if prep.test_idx is not None:
        parts["test"] = prep.test_idx
    run_id = fingerprints(cfg, prep.frame, parts) if info.main else {}
    problem = broadcast(info, resume_problem(out / LAST_NAME, run_id) if t.resume and info.main else None)
    if problem:  # before anything is loaded or written: another seed, fold or data must not mix two runs
        raise DataError(problem)
    model, args, pre, weights = build_network(cfg, prep.encoder)
    loader_fn = make_loader_fn(cfg, pre)

    def check_and_write() -> None:  # one rank decodes and caches; the others wait, then read the cache
        warm_images(prep.frame, loader_fn, t.progress)
        if t.overwrite:  # only now that the new run's data and model are known to work
            clear_run(out)
        write_run_files(out, cfg, prep, pre)
    on_main_rank(info, check_and_write)  # a failure there stops every rank with the same error
    train_dl, val_dl = build_loaders(cfg, prep, pre, loader_fn, device, info)
    channels_last = t.channels_last and device.type in ("cuda", "cpu")
    # the ignore: torch's overloads of Module.to omit (device, memory_format=...), which Module.to accepts
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)  # type: ignore[call-overload]
    run = Run(model, ModelEma(model, t.ema_decay) if t.ema_decay > 0 else None, EarlyStopping(t.patience),
              run_id=run_id)
    if t.resume and (out / LAST_NAME).exists():
        run.restore(torch.load(out / LAST_NAME, map_location=device, weights_only=True))
        log.info("resuming from %s at epoch %d", out / LAST_NAME, run.next_epoch)
    labels = prep.frame["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()[prep.train_idx]
    weight = class_weights(labels, t.balance)
    criterion = nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None,
                                    label_smoothing=t.label_smoothing)
    bundle_extra = {"model_args": args, "preprocess": pre, "encoder": prep.encoder,
                    "training": {**prep.info, "pretrained": weights, "preset": cfg.preset,
                                 "config": cfg.to_dict(), "device": device.type,
                                 "amp": str(dtype).replace("torch.", "") if dtype else "off"}}
    ctx = {"device": device, "dtype": dtype, "channels_last": channels_last, "criterion": criterion,
           "train_dl": train_dl, "val_dl": val_dl, "out": out, "bundle": bundle_extra, "info": info}
    for phase in plan(t):
        if run.done:
            break
        run_phase(cfg, run, phase, ctx)
    run.done = True
    summary = None
    if info.main:
        budget = t.max_minutes * 60 - run.elapsed if t.max_minutes else None
        trust = after_training(out / BUNDLE_NAME, prep.frame, prep.train_idx, prep.val_idx, loader_fn, device,
                               t.progress, budget_s=budget) if t.fit_trust else {}
        summary = finish(out, run, prep, bundle_extra, trust, device, loader_fn.cache_dir, cfg.train.test_tta)
    return broadcast(info, summary)


def finish(out: Path, run: Run, prep: Prepared, bundle_extra: dict, trust: dict | None = None,
           device: torch.device | None = None, cache_dir: Path | None = None, test_views: int = 1) -> dict:
    """metrics.json from the best epoch's bundle (what predictions will use), with the trust figures and the
    held-out scores (`score_best`)."""
    best = torch.load(out / BUNDLE_NAME, map_location="cpu", weights_only=True)
    summary = {"validation": best["metrics"], "best_epoch": best["metrics"]["epoch"],
               "epochs_trained": len(run.history), "train_minutes": run.elapsed / 60,
               "data": prep.info, "pretrained": bundle_extra["training"]["pretrained"],
               "note": "SYNTHETIC demo data: these numbers say nothing about real lesions" if prep.synthetic
               else "validation = held-out lesions (lesion-grouped split) that chose the epoch, temperature and "
               "thresholds; `test` (with --holdout) = a lesion-grouped fold that chose nothing",
               "trust": trust or {}}
    summary.update(score_best(out, prep, device, cache_dir, test_views))
    atomic_json(summary, out / METRICS_NAME)
    store_scores(out, summary["metadata_ablation"], summary["intervals"])
    m = best["metrics"]
    log.info("best epoch %d: validation balanced accuracy %.3f, macro AUC %.3f, accuracy %.3f -> %s",
             summary["best_epoch"], m["balanced_accuracy"], m["macro_auc"], m["accuracy"], out / BUNDLE_NAME)
    if "test" in summary:
        t = summary["test"]
        log.info("test fold (chose nothing): balanced accuracy %.3f, macro AUC %.3f, melanoma recall %.3f",
                 t["balanced_accuracy"], t["macro_auc"], t["melanoma_recall"])
    return summary


def store_scores(out: Path, table: dict, intervals: dict) -> None:
    """Carry what `score_best` measured into the bundle: the scored split's 95% intervals into its `metrics`
    (the page, GET /api/model and the card read them from there) and the with/without-metadata table into its
    model card (and model_card.md, if written)."""
    bundle = torch.load(out / BUNDLE_NAME, map_location="cpu", weights_only=True)
    bundle["metrics"]["intervals"] = intervals
    card = bundle.get("model_card")
    if card:
        card["metadata_ablation"] = table
        card["metrics"]["intervals"] = interval_summary(intervals, list(bundle["classes"]))
    atomic_torch_save(bundle, out / BUNDLE_NAME)
    if card:
        write_card(out, card)


def score_best(out: Path, prep: Prepared, device: torch.device | None, cache_dir: Path | None,
               test_views: int = 1) -> dict:
    """Score the saved bundle through the Predictor (what `skain predict` runs) on the test fold (with
    --holdout) or else on validation, with metadata present / each field blanked / all blanked; writes the
    per-image predictions beside the bundle. On a test fold, also with `test_views` TTA views (metadata
    present and all blank), and every variant's logits to test_logits.npz (ensembles of runs, paired tests)."""
    held_out = prep.test_idx is not None
    idx = prep.test_idx if held_out else prep.val_idx
    frame = prep.frame.iloc[idx].reset_index(drop=True)
    predictor = Predictor.from_bundle(out / BUNDLE_NAME, device=device.type if device else "auto")
    started = time.perf_counter()
    views = test_views if held_out else 1
    log.info("scoring %d %s images with metadata present / blanked%s", len(frame), "test" if held_out else "validation",
             f", also over {views} TTA views (--test-tta 1 skips them)" if views > 1 else "")
    scores, table, logits = assess(predictor, frame, cache_dir=cache_dir, views=views)
    variants = {k: v for k, v in scores.items() if "_tta" not in k}
    name = TEST_PREDICTIONS if held_out else VAL_PREDICTIONS
    atomic_write(out / name, lambda fh: fh.write(table.to_csv(index=False).encode()))
    result = {"metadata_ablation": {"split": "test" if held_out else "validation",
                                    **{k: summary_row(v) for k, v in variants.items()}},
              "intervals": scored_intervals(frame, table, "test" if held_out else "validation")}
    if held_out:
        result["test"] = variants["present"]
        if views > 1:
            suffix = f"_tta{views}"
            result[f"test_tta{views}"] = {k[:-len(suffix)]: summary_row(v) for k, v in scores.items()
                                          if k.endswith(suffix)}
        save_logits(out / TEST_LOGITS, frame, logits)
    log.info("scored %d %s images with %d metadata variant(s)%s in %.0f s", len(frame),
             "test" if held_out else "validation", len(variants),
             f" and {test_views} TTA views" if held_out and test_views > 1 else "", time.perf_counter() - started)
    return result


def scored_intervals(frame: pd.DataFrame, table: pd.DataFrame, split: str, resamples: int = 2000,
                     seed: int = 0) -> dict:
    """95% bootstrap intervals of the scored split's figures (`split`: "validation" or "test"; metadata present,
    the decisions the model makes): lesions resampled within their diagnosis, as `skain evaluate` does
    (`evaluation.bootstrap`)."""
    index = {c: i for i, c in enumerate(CLASSES)}
    sample = Sample(frame["dx"].map(index).to_numpy(), table[[f"p_{c}" for c in CLASSES]].to_numpy(np.float64),
                    table["pred"].map(index).to_numpy(), mel=CLASSES.index("mel"))
    lesions = frame["lesion_id"].astype(str).to_numpy() if "lesion_id" in frame else None
    return {"split": split, "of": "scored images, metadata present", **bootstrap(sample, lesions, resamples, seed)}
