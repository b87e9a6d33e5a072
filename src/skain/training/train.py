"""fit(cfg): wiring only. Data -> split -> encoder -> model -> two training phases -> bundle and reports."""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from skain.data.dataset import LesionDataset
from skain.data.encoder import MetadataDropout, MetadataEncoder
from skain.data.images import ImageError, ImageLoader, default_cache_dir
from skain.data.layout import discover, load_table
from skain.data.schema import CLASSES, DataError
from skain.data.split import holdout_split, lesion_split, split_table
from skain.data.transforms import eval_transform, resolve_preprocess, train_transform
from skain.engine import (
    EarlyStopping,
    ModelEma,
    amp_dtype,
    predict_logits,
    resolve_device,
    train_one_epoch,
)
from skain.evaluation.variants import assess, summary_row
from skain.fileio import atomic_json, atomic_write
from skain.inference.predictor import Predictor
from skain.metrics import classification_metrics, history_row
from skain.model import SkainNet
from skain.modelfile.bundle import BUNDLE_NAME, atomic_torch_save, make_bundle
from skain.training.config import Config
from skain.training.distributed import (
    DistInfo,
    EpochSampler,
    ShardSampler,
    broadcast,
    cleanup,
    device_for,
    gather_predictions,
    init_distributed,
    on_main_rank,
    reduce_mean,
    sync_buffers,
)
from skain.training.runfolder import KEY as RUN_ID
from skain.training.runfolder import clear_run, fingerprints, resume_problem
from skain.training.trust_fit import after_training
from skain.training.weights import load_pretrained
from skain.trust.modelcard import write_card

log = logging.getLogger(__name__)
LAST_NAME = "last.pt"
MIN_FREE_BYTES = 300 * 2**20


@dataclass
class Prepared:
    """The data side of a run, built once."""

    frame: pd.DataFrame
    train_idx: np.ndarray
    val_idx: np.ndarray
    encoder: MetadataEncoder
    synthetic: bool
    source: str
    info: dict = field(default_factory=dict)
    test_idx: np.ndarray | None = None  # with --holdout: a lesion-grouped test fold that chooses nothing


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- output folder
def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse before any work: unwritable folder, full disk, or someone else's run in the folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"output folder {out} is not writable ({exc.strerror or exc}); choose another with --output") from exc
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise DataError(f"only {free / 2**20:.0f} MiB free on the disk of {out}; need at least "
                        f"{MIN_FREE_BYTES / 2**20:.0f} MiB for checkpoints")
    if resume and overwrite:
        raise DataError("--resume continues the run in the output folder and --overwrite replaces it; pass one")
    existing = [n for n in (BUNDLE_NAME, LAST_NAME) if (out / n).exists()]
    if existing and not (resume or overwrite):
        raise DataError(f"{out} already holds a training run ({', '.join(existing)}); pass --resume to continue "
                        "it, --overwrite to replace it, or choose another --output")


class RunLock:
    """A pid file that stops two trainings writing into one folder at the same time."""

    def __init__(self, out: Path):
        self.path = out / ".skain-train.lock"

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # umask applies: 0644
        except FileExistsError:
            pid = self._pid()
            if pid and _alive(pid):
                raise DataError(f"another training (pid {pid}) is writing into {self.path.parent}; "
                                "wait for it or choose another --output") from None
            self.path.unlink(missing_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return self

    def _pid(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return pid != os.getpid()
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# ----------------------------------------------------------------------------- data
def prepare_data(cfg: Config) -> Prepared:
    d = cfg.data
    src = discover(d.data, d.csv, d.images)
    frame = load_table(src, skip_missing=d.skip_missing)
    test_idx = None
    if d.holdout:
        train_idx, val_idx, test_idx = holdout_split(frame, d.folds, d.fold, d.split_seed, d.inner_folds)
    else:
        train_idx, val_idx = lesion_split(frame, d.folds, d.fold, d.split_seed)
    encoder = MetadataEncoder.fit(frame.iloc[train_idx])
    synthetic = _is_synthetic(src.csv)
    counts = frame["dx"].value_counts()
    info = {"source": str(src.csv), "layout": src.layout, "synthetic": synthetic, "images": len(frame),
            "lesions": int(frame["lesion_id"].nunique()), "train_images": len(train_idx),
            "val_images": len(val_idx), "test_images": 0 if test_idx is None else len(test_idx),
            "class_counts": {c: int(counts.get(c, 0)) for c in CLASSES}, "folds": d.folds, "fold": d.fold,
            "holdout": d.holdout}
    log.info("data: %d images, %d lesions (%s layout%s); train %d / val %d%s images, lesion-grouped",
             len(frame), info["lesions"], src.layout, ", SYNTHETIC" if synthetic else "", len(train_idx),
             len(val_idx), "" if test_idx is None else f" / test {len(test_idx)}")
    return Prepared(frame, train_idx, val_idx, encoder, synthetic, str(src.csv), info, test_idx)


def _is_synthetic(csv) -> bool:
    try:
        return "synthetic" in pd.read_csv(csv, nrows=5, dtype=str).get("dataset", pd.Series(dtype=str)).tolist()
    except Exception:
        return False


def make_loader_fn(cfg: Config, pre: dict) -> ImageLoader:
    cache = cfg.data.cache_dir
    cache_dir = None if cache == "off" else Path(cache) if cache else default_cache_dir()
    return ImageLoader(pre["resize"], cache_dir)


def warm_images(frame: pd.DataFrame, loader: ImageLoader, progress: bool) -> None:
    """Decode every image once before training: unreadable files stop the run now, and the cache fills."""
    from tqdm.auto import tqdm
    bad = []
    for path in tqdm(frame["path"], desc="checking images", leave=False, disable=None if progress else True):
        try:
            loader(path)
        except ImageError as exc:
            bad.append(str(exc))
    if bad:
        raise DataError(f"{len(bad)} unreadable image(s); fix or remove them from the CSV:\n  " + "\n  ".join(bad[:10]))


def workers(cfg: Config, device: torch.device) -> int:
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    cores = os.cpu_count() or 1
    # measured on 2 cores: loading in the main process beats a worker competing with the model for a core
    return min(8, cores) if device.type == "cuda" else (0 if cores <= 2 else min(4, cores // 2))


def build_loaders(cfg: Config, prep: Prepared, pre: dict, loader_fn: ImageLoader, device: torch.device,
                  info: DistInfo = DistInfo()):
    """Training order from a seeded per-epoch sampler (sharded across ranks); validation sharded without padding."""
    tr = prep.frame.iloc[prep.train_idx].reset_index(drop=True)
    va = prep.frame.iloc[prep.val_idx].reset_index(drop=True)
    dropout = MetadataDropout(prep.encoder, cfg.train.meta_dropout) if cfg.train.meta_dropout > 0 else None
    train_ds = LesionDataset(tr, prep.encoder, loader_fn, train_transform(pre, photo=cfg.train.photo_augment),
                            meta_dropout=dropout)
    val_ds = LesionDataset(va, prep.encoder, loader_fn, eval_transform(pre))
    # no persistent_workers: a DataLoader seeds its workers from the main process's RNG each time an epoch's
    # iterator starts, which run_epoch seeds from (seed, epoch, rank); persistent workers keep one seed for the
    # whole run, so augmentation would depend on the epochs before it and --resume could not replay an epoch
    common = {"num_workers": workers(cfg, device), "pin_memory": device.type == "cuda"}
    weights = None
    if cfg.train.balance == "sampler":
        weights = balanced_sample_weights(train_ds.labels)
    sampler = EpochSampler(len(train_ds), info, cfg.train.seed, weights)
    bs = cfg.train.batch_size
    train_dl = DataLoader(train_ds, bs, sampler=sampler, drop_last=len(sampler) > bs, **common)
    val_dl = DataLoader(val_ds, bs * 2, sampler=ShardSampler(len(val_ds), info), **common)
    return train_dl, val_dl


def balanced_sample_weights(labels: np.ndarray) -> np.ndarray:
    """Per-image draw weights 1 / (images of its class): every class present is drawn equally often."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(float)
    return 1.0 / counts[labels]


def class_weights(labels: np.ndarray, mode: str) -> torch.Tensor | None:
    """Loss weights against class imbalance: inverse frequency, its square root, or none."""
    if mode in ("none", "sampler"):
        return None
    counts = np.maximum(np.bincount(labels, minlength=len(CLASSES)), 1).astype(float)
    w = (1.0 / counts) ** (0.5 if mode == "sqrt" else 1.0)
    if mode not in ("sqrt", "inverse"):
        raise ValueError(f"unknown --balance {mode!r}; choose none, sqrt, inverse or sampler")
    return torch.tensor(w / (w * counts).sum() * counts.sum(), dtype=torch.float32)


# ----------------------------------------------------------------------------- model
def build_network(cfg: Config, encoder: MetadataEncoder) -> tuple[SkainNet, dict, dict, str]:
    m = cfg.model
    args = {"backbone": m.backbone, "n_sex": len(encoder.sex_vocab), "n_site": len(encoder.site_vocab),
            "num_classes": m.num_classes, "image_only": m.image_only, "drop_rate": m.drop_rate,
            "age_inputs": encoder.age_width}
    model = SkainNet(**args)
    weights = load_pretrained(model.backbone, m.backbone, m.pretrained)
    pre = resolve_preprocess(model.backbone.pretrained_cfg, m.input_size, m.mean, m.std, m.crop_pct)
    log.info("model: %s (%s), %s, input %d px, %.1fM parameters", m.backbone, weights,
             "image only" if m.image_only else "image + metadata", pre["input_size"],
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model, args, pre, weights


def lr_schedule(optimizer: torch.optim.Optimizer, base_lr: float, steps: int, warmup: int, kind: str,
                start: int = 0, time_fraction=None):
    """A per-step closure: linear warm-up then constant or cosine decay to 1% of base_lr.

    With `time_fraction` (a callable giving the used share of a wall-clock budget) the cosine follows
    whichever is further along, steps or time, so a run with --max-minutes always ends annealed even on a
    busy machine.
    """
    state = {"step": start}

    def lr_at(step: int) -> float:
        if warmup and step < warmup:
            return base_lr * (step + 1) / warmup
        if kind == "cosine":
            t = min(1.0, (step - warmup) / max(1, steps - warmup))
            if time_fraction is not None:
                t = max(t, min(1.0, time_fraction()))
            return base_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))
        return base_lr

    def step() -> None:
        state["step"] += 1
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state["step"])

    for group in optimizer.param_groups:
        group["lr"] = lr_at(start)
    return step


# ----------------------------------------------------------------------------- the run
@dataclass
class Phase:
    name: str
    first: int      # first global epoch (1-based)
    epochs: int
    lr: float
    fraction: float  # of the backbone trained
    stops_early: bool


def plan(t) -> list[Phase]:
    p1 = Phase("frozen", 1, t.frozen_epochs, t.lr_frozen, 0.0, False)
    p2 = Phase("finetune", 1 + t.frozen_epochs, t.epochs, t.lr, t.unfreeze_fraction, True)
    return [p for p in (p1, p2) if p.epochs > 0]


@dataclass
class Run:
    """Everything the loop mutates; saved to last.pt after every epoch."""

    model: SkainNet
    ema: ModelEma | None
    stopper: EarlyStopping
    history: list = field(default_factory=list)
    next_epoch: int = 1
    elapsed: float = 0.0
    done: bool = False
    optimizer_state: dict | None = None
    optimizer_phase: str = ""
    run_id: dict = field(default_factory=dict)  # config/data/split fingerprints: --resume checks them

    def scored(self) -> SkainNet:
        return self.ema.module if self.ema is not None else self.model

    def checkpoint(self, optimizer, phase: str) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "stopper": self.stopper.state_dict(), "history": self.history, "next_epoch": self.next_epoch,
                "elapsed": self.elapsed, "done": self.done, "optimizer": optimizer.state_dict(),
                "optimizer_phase": phase, RUN_ID: self.run_id}

    def restore(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        if self.ema is not None and ck.get("ema"):
            self.ema.load_state_dict(ck["ema"])
        self.stopper.load_state_dict(ck["stopper"])
        self.history, self.next_epoch = list(ck["history"]), int(ck["next_epoch"])
        self.elapsed, self.done = float(ck["elapsed"]), bool(ck["done"])
        self.optimizer_state, self.optimizer_phase = ck["optimizer"], ck["optimizer_phase"]


def fit(cfg: Config) -> dict:
    """Train as configured; returns the final metrics (also written to <output>/metrics.json).

    Under torchrun every rank calls this; rank 0 alone checks and locks the output folder and writes files.
    """
    out = Path(cfg.train.output)
    if not 1 <= cfg.train.test_tta <= 8:
        raise ValueError(f"test_tta must be between 1 and 8 views (got {cfg.train.test_tta})")
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
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
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


def run_phase(cfg: Config, run: Run, phase: Phase, ctx: dict) -> None:
    t, model = cfg.train, run.model
    end = phase.first + phase.epochs
    if run.next_epoch >= end:
        return
    model.set_backbone_trainable(phase.fraction)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=phase.lr,
                                  weight_decay=t.weight_decay)
    if run.optimizer_state is not None and run.optimizer_phase == phase.name:
        optimizer.load_state_dict(run.optimizer_state)
    if run.next_epoch <= phase.first and phase.stops_early:
        run.stopper.bad_epochs = 0
    per_epoch = len(ctx["train_dl"])
    start_epoch = max(run.next_epoch, phase.first)
    sched = lr_schedule(optimizer, phase.lr, phase.epochs * per_epoch, int(t.warmup_epochs * per_epoch),
                        t.schedule, start=(start_epoch - phase.first) * per_epoch,
                        time_fraction=_budget_fraction(run, t.max_minutes) if phase.stops_early else None)
    info: DistInfo = ctx["info"]
    # DDP registers the parameters that train when it is built, so it is rebuilt for each phase
    ctx["net"] = (DistributedDataParallel(model, device_ids=[ctx["device"].index] if ctx["device"].type == "cuda"
                                          else None) if info.enabled else model)
    if t.compile:  # compiled per phase: the set of trainable parameters changes the graph
        ctx["net"] = torch.compile(ctx["net"])
    for epoch in range(start_epoch, end):
        stop = run_epoch(cfg, run, phase, epoch, optimizer, sched, ctx)
        if info.main:
            atomic_torch_save(run.checkpoint(optimizer, phase.name), ctx["out"] / LAST_NAME)
        if stop:
            break


def _budget_fraction(run: Run, max_minutes: float | None):
    """Share of the --max-minutes budget used so far (None without a budget)."""
    if not max_minutes:
        return None
    base = time.perf_counter() - run.elapsed
    return lambda: (time.perf_counter() - base) / (max_minutes * 60)


def run_epoch(cfg: Config, run: Run, phase: Phase, epoch: int, optimizer, sched, ctx: dict) -> bool:
    """Train and validate one epoch, save the best bundle; returns True when training should stop."""
    t, started, info = cfg.train, time.perf_counter(), ctx["info"]
    # each epoch's order and augmentation depend only on (seed, epoch, rank): --resume replays them exactly
    seed_everything(t.seed * 1000 + epoch + 100_003 * info.rank)
    ctx["train_dl"].sampler.set_epoch(epoch)
    total, progress = t.frozen_epochs + t.epochs, t.progress and info.main
    stats = train_one_epoch(ctx["net"], ctx["train_dl"], optimizer, ctx["criterion"], ctx["device"], ctx["dtype"],
                            sched, run.ema, ctx["channels_last"], f"epoch {epoch}/{total} {phase.name}", progress)
    stats["loss"] = reduce_mean(info, stats["loss"] * stats["images"], stats["images"])
    stats["images_per_s"] *= info.world
    sync_buffers(info, run.scored())
    res = gather_predictions(info, predict_logits(run.scored(), ctx["val_dl"], ctx["device"], ctx["dtype"],
                                                  ctx["channels_last"], "validate", progress))
    probs = torch.from_numpy(res["logits"]).softmax(1).numpy()
    metrics = classification_metrics(res["label"], probs, CLASSES)
    val_loss = float(ctx["criterion"](torch.from_numpy(res["logits"]).to(ctx["device"]),
                                      torch.from_numpy(res["label"]).long().to(ctx["device"])).item())
    stop = run.stopper.step(metrics["balanced_accuracy"]) and phase.stops_early
    run.elapsed += time.perf_counter() - started
    run.history.append({"epoch": epoch, "phase": phase.name, "lr": optimizer.param_groups[0]["lr"],
                        "train_loss": stats["loss"], "val_loss": val_loss, **history_row(metrics),
                        "train_images_per_s": stats["images_per_s"], "elapsed_s": run.elapsed})
    if info.main:
        _write_history(ctx["out"], run.history)
    if run.stopper.improved and info.main:
        bundle = make_bundle(run.scored(), metrics={**metrics, "epoch": epoch, "val_loss": val_loss},
                             classes=list(CLASSES), **ctx["bundle"])
        atomic_torch_save(bundle, ctx["out"] / BUNDLE_NAME)
    log.info("epoch %d/%d %-8s loss %.3f val_loss %.3f bal_acc %.3f acc %.3f f1 %.3f auc %.3f%s  %.0fs "
             "(%.1f img/s)", epoch, total, phase.name, stats["loss"], val_loss, metrics["balanced_accuracy"],
             metrics["accuracy"], metrics["macro_f1"], metrics["macro_auc"],
             " *best*" if run.stopper.improved else "", time.perf_counter() - started, stats["images_per_s"])
    run.next_epoch = epoch + 1
    if stop:
        log.info("early stopping: no balanced-accuracy gain for %d epochs", t.patience)
        run.done = True
    if t.max_minutes and run.elapsed + (time.perf_counter() - started) > t.max_minutes * 60:  # next epoch would overrun
        log.info("time budget of %.1f min reached", t.max_minutes)
        run.done = True
    run.done = broadcast(info, run.done)  # decided once, on rank 0, so all ranks stop together
    return run.done


def _write_history(out: Path, history: list) -> None:
    atomic_write(out / "train_history.csv", lambda fh: fh.write(pd.DataFrame(history).to_csv(index=False).encode()))


def write_run_files(out: Path, cfg: Config, prep: Prepared, pre: dict) -> None:
    """The seed's side files plus the resolved config and the split, before training starts."""
    atomic_json({c: i for i, c in enumerate(CLASSES)}, out / "label_map.json")
    atomic_json(prep.encoder.vocabularies(), out / "vocabularies.json")
    atomic_json(prep.encoder.age_stats(), out / "age_stats.json")
    atomic_json({**cfg.to_dict(), "preprocess": pre}, out / "config.json")
    table = split_table(prep.frame, prep.train_idx, prep.val_idx, prep.test_idx)
    atomic_write(out / "split.csv", lambda fh: fh.write(table.to_csv(index=False).encode()))


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
    atomic_json(summary, out / "metrics.json")
    card_with_metadata(out, summary["metadata_ablation"])
    m = best["metrics"]
    log.info("best epoch %d: validation balanced accuracy %.3f, macro AUC %.3f, accuracy %.3f -> %s",
             summary["best_epoch"], m["balanced_accuracy"], m["macro_auc"], m["accuracy"], out / BUNDLE_NAME)
    if "test" in summary:
        t = summary["test"]
        log.info("test fold (chose nothing): balanced accuracy %.3f, macro AUC %.3f, melanoma recall %.3f",
                 t["balanced_accuracy"], t["macro_auc"], t["melanoma_recall"])
    return summary


def card_with_metadata(out: Path, table: dict) -> None:
    """Put the with/without-metadata table into the bundle's model card (and model_card.md, if written)."""
    bundle = torch.load(out / BUNDLE_NAME, map_location="cpu", weights_only=True)
    if not bundle.get("model_card"):
        return
    bundle["model_card"]["metadata_ablation"] = table
    atomic_torch_save(bundle, out / BUNDLE_NAME)
    write_card(out, bundle["model_card"])


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
    name = "test_predictions.csv" if held_out else "val_predictions.csv"
    atomic_write(out / name, lambda fh: fh.write(table.to_csv(index=False).encode()))
    result = {"metadata_ablation": {"split": "test" if held_out else "validation",
                                    **{k: summary_row(v) for k, v in variants.items()}}}
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


TEST_LOGITS = "test_logits.npz"


def save_logits(path: Path, frame: pd.DataFrame, logits: dict[str, np.ndarray]) -> None:
    """image_id, dx and one (n, classes) float32 array per scored variant."""
    import io

    def write(fh) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, image_id=np.asarray(frame["image_id"], dtype=str),
                            dx=np.asarray(frame["dx"], dtype=str),
                            **{k: np.asarray(v, dtype=np.float32) for k, v in logits.items()})
        fh.write(buf.getvalue())
    atomic_write(path, write)
