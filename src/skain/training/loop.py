"""The training loop: learning-rate schedule, the two phases (frozen backbone, then partial fine-tuning),
one epoch of training and validation with early stopping, EMA and the time budget."""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from skain.data.schema import CLASSES
from skain.engine import (
    EarlyStopping,
    ModelEma,
    predict_logits,
    train_one_epoch,
)
from skain.metrics import classification_metrics, history_row
from skain.model import SkainNet
from skain.modelfile.bundle import BUNDLE_NAME, atomic_torch_save, make_bundle
from skain.training.config import Config
from skain.training.distributed import (
    DistInfo,
    broadcast,
    gather_predictions,
    reduce_mean,
    sync_buffers,
)
from skain.training.runfolder import KEY as RUN_ID
from skain.training.runfolder import LAST_NAME, write_history

log = logging.getLogger(__name__)


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
        # the EMA's module is a deep copy of self.model, so a SkainNet too
        return cast(SkainNet, self.ema.module) if self.ema is not None else self.model

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
                            sched, run.ema, ctx["channels_last"], f"epoch {epoch}/{total} {phase.name}", progress,
                            consistency=t.consistency)
    stats["loss"] = reduce_mean(info, stats["loss"] * stats["images"], stats["images"])
    stats["consistency_js"] = reduce_mean(info, stats["consistency_js"] * stats["images"], stats["images"])
    stats["images_per_s"] *= info.world
    sync_buffers(info, run.scored())
    # validation in float32 whatever trains in bf16/fp16: the figures stored with the best bundle are those of
    # what the Predictor (float32) will answer; under bf16 autocast (AMX CPUs) a few decisions differed
    res = gather_predictions(info, predict_logits(run.scored(), ctx["val_dl"], ctx["device"], None,
                                                  ctx["channels_last"], "validate", progress))
    probs = torch.from_numpy(res["logits"]).softmax(1).numpy()
    metrics = classification_metrics(res["label"], probs, CLASSES)
    val_loss = float(ctx["criterion"](torch.from_numpy(res["logits"]).to(ctx["device"]),
                                      torch.from_numpy(res["label"]).long().to(ctx["device"])).item())
    stop = run.stopper.step(metrics["balanced_accuracy"]) and phase.stops_early
    run.elapsed += time.perf_counter() - started
    run.history.append({"epoch": epoch, "phase": phase.name, "lr": optimizer.param_groups[0]["lr"],
                        "train_loss": stats["loss"], "val_loss": val_loss, **history_row(metrics),
                        **({"train_consistency_js": stats["consistency_js"]} if t.consistency > 0 else {}),
                        "train_images_per_s": stats["images_per_s"], "elapsed_s": run.elapsed})
    if info.main:
        write_history(ctx["out"], run.history)
    if run.stopper.improved and info.main:
        bundle = make_bundle(run.scored(), metrics={**metrics, "epoch": epoch, "val_loss": val_loss},
                             classes=list(CLASSES), **ctx["bundle"])
        atomic_torch_save(bundle, ctx["out"] / BUNDLE_NAME)
    log.info("epoch %d/%d %-8s loss %.3f%s val_loss %.3f bal_acc %.3f acc %.3f f1 %.3f auc %.3f%s  %.0fs "
             "(%.1f img/s)", epoch, total, phase.name, stats["loss"],
             f" (js {stats['consistency_js']:.4f})" if t.consistency > 0 else "", val_loss, metrics["balanced_accuracy"],
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
