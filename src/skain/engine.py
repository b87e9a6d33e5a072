"""The training/evaluation loop pieces: one epoch of training, evaluation, early stopping, weight EMA."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Protocol, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """oneDNN can run bf16 on this CPU (AVX-512-BF16 or AMX); whether that is faster is `cpu_bf16_pays`."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # older/newer torch without the op
        return False


CPUINFO = "/proc/cpuinfo"


def cpu_features() -> dict[str, bool]:
    """The CPU's instruction-set features as PyTorch sees them, else the flags in /proc/cpuinfo (Linux)."""
    try:
        return {k: v for k, v in torch._C._cpu._get_cpu_capability().items() if isinstance(v, bool)}
    except Exception:  # a PyTorch without the private helper
        try:
            with open(CPUINFO, encoding="ascii", errors="replace") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            return {}
        return {flag: True for flag in flags}


def cpu_bf16_pays() -> bool:
    """bf16 autocast speeds CPU training up only with AMX (Intel Sapphire Rapids and later, when the hypervisor
    exposes it). With AVX-512-BF16 alone the `cpu` preset's training step ran at 0.56x fp32's speed
    (benchmarks/results/cpu_amp.json), so `--amp auto` stays in fp32 there; `--amp bf16` still forces it."""
    return cpu_supports_bf16() and bool(cpu_features().get("amx_bf16"))


def amp_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """bf16 where it pays (CUDA Ampere+, CPUs with AMX), fp16 on older CUDA, else none (fp32)."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_pays() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if channels_last:
        for key in ("image", "resaved"):
            if key in out:
                out[key] = out[key].contiguous(memory_format=torch.channels_last)
    return out


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Mean Jensen-Shannon divergence (nats, 0 to ln 2) between the softmax distributions of matching rows."""
    p, q = logits_a.softmax(1), logits_b.softmax(1)
    log_mix = (0.5 * (p + q)).clamp_min(1e-7).log()
    kl = nn.functional.kl_div
    return 0.5 * (kl(log_mix, p, reduction="batchmean") + kl(log_mix, q, reduction="batchmean"))


def batch_loss(model: nn.Module, batch: dict, criterion: nn.Module, device: torch.device,
               dtype: torch.dtype | None, consistency: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of one batch -> (loss, its consistency term).

    A batch with `resaved` images (`transforms.PairedAugment`) runs both views in one forward pass: the loss is
    the mean of the two views' criteria plus `consistency` times the Jensen-Shannon divergence between their
    predictions, so the network learns to answer the same whatever re-save the image went through."""
    meta = (batch["age"], batch["sex"], batch["site"])
    if "resaved" not in batch:
        with autocast(device, dtype):
            logits = model(batch["image"], *meta)
        return criterion(logits.float(), batch["label"]), torch.zeros((), device=device)
    with autocast(device, dtype):
        logits = model(torch.cat([batch["image"], batch["resaved"]]), *(torch.cat([x, x]) for x in meta))
    first, second = logits.float().chunk(2)
    js = js_divergence(first, second)
    ce = 0.5 * (criterion(first, batch["label"]) + criterion(second, batch["label"]))
    return ce + consistency * js, js.detach()


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    criterion: nn.Module, device: torch.device, dtype: torch.dtype | None,
                    scheduler: Callable[[], None] | None = None, ema: ModelEma | None = None,
                    channels_last: bool = False, desc: str = "train", progress: bool = True,
                    consistency: float = 0.0) -> dict:
    """One pass over `loader`; with paired batches (see `batch_loss`) `consistency` weighs the agreement term,
    whose mean comes back as `consistency_js`."""
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    total, js_total, count, start = 0.0, 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=None if progress else True, dynamic_ncols=True)
    for batch in bar:
        batch = to_device(batch, device, channels_last)
        loss, js = batch_loss(model, batch, criterion, device, dtype, consistency)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler()
        if ema is not None:
            ema.update(model)
        n = batch["label"].shape[0]
        total, js_total, count = total + loss.item() * n, js_total + js.item() * n, count + n
        bar.set_postfix(loss=f"{total / count:.3f}")
    seconds = time.perf_counter() - start
    return {"loss": total / max(count, 1), "consistency_js": js_total / max(count, 1), "images": count,
            "seconds": seconds, "images_per_s": count / max(seconds, 1e-9)}


class SplitNet(Protocol):
    """A network that splits into `backbone` (images -> pooled features) and `classify` (pooled features and the
    metadata inputs -> logits): SkainNet and EnsembleNet."""

    backbone: nn.Module

    def classify(self, pooled: torch.Tensor, age: torch.Tensor, sex: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        ...


@torch.no_grad()
def predict_logits(model: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None,
                   channels_last: bool = False, desc: str = "eval", progress: bool = True,
                   views: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
                   variants: dict[str, Callable[[dict], tuple]] | None = None) -> dict[str, np.ndarray]:
    """Run the model over a loader -> logits (float32), labels, dataset indices, ok flags.

    With `views`, logits are averaged in probability space over the views of each image (test-time
    augmentation) and returned as log-probabilities; `first` holds the first (identity) view's logits.

    With `variants` (name -> the (age, sex, site) inputs of that variant, taken from the CPU batch), each
    variant's logits come back as `logits/<name>` (and `first/<name>`). With more than one variant the backbone
    runs once per image and view and only the metadata branch and head once per variant, so the model must
    split into `backbone` + `classify` (SkainNet, EnsembleNet).
    """
    model.eval()
    names = list(variants) if variants else [""]
    split = len(names) > 1
    if split and not callable(getattr(model, "classify", None)):
        raise TypeError(f"{type(model).__name__} has no backbone/classify split; score one variant per pass")
    net = cast(SplitNet, model)  # used only when split, which the check above guarantees
    kinds = ("logits", "first") if views is not None else ("logits",)
    out: dict[str, list] = {f"{kind}/{n}" if n else kind: [] for n in names for kind in kinds}
    out.update({k: [] for k in ("label", "index", "ok")})
    for batch in tqdm(loader, desc=desc, leave=False, disable=None if progress else True, dynamic_ncols=True):
        metas = {n: fn(batch) for n, fn in (variants or {}).items()}  # from the CPU batch
        batch = to_device(batch, device, channels_last)
        metas = ({n: tuple(t.to(device, non_blocking=True) for t in m) for n, m in metas.items()} if variants
                 else {"": (batch["age"], batch["sex"], batch["site"])})
        per: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        with autocast(device, dtype):
            for image in (views(batch["image"]) if views is not None else [batch["image"]]):
                if split:
                    feats = net.backbone(image)
                    for n in names:
                        per[n].append(net.classify(feats, *metas[n]).float())
                else:
                    for n in names:
                        per[n].append(model(image, *metas[n]).float())
        for n, zs in per.items():
            key = f"/{n}" if n else ""
            out["logits" + key].append((zs[0] if views is None else average_views([z.softmax(1) for z in zs])).cpu())
            if views is not None:
                out["first" + key].append(zs[0].cpu())
        for key in ("label", "index", "ok"):
            out[key].append(batch[key].cpu())
    return {k: torch.cat(v).numpy() if v else np.zeros((0,)) for k, v in out.items()}


def average_views(probs: list[torch.Tensor]) -> torch.Tensor:
    """Test-time augmentation: the mean of the views' probabilities, as log-probabilities (what the temperature
    and the metrics then take in place of logits)."""
    return torch.stack(probs).mean(0).clamp_min(1e-12).log()


class EarlyStopping:
    """step(metric) -> True when `patience` epochs passed without improving on the best (higher is better)."""

    def __init__(self, patience: int = 5, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best: float = float("-inf")
        self.bad_epochs = 0
        self.improved = False

    def step(self, metric: float) -> bool:
        self.improved = metric > self.best + self.min_delta
        if self.improved:
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


class ModelEma:
    """Exponential moving average of weights (and a copy of buffers): smoother validation curves."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Warm-up (1 + n) / (10 + n) keeps early averages from being dominated by the initial weights."""
        model = unwrap(model)
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        pairs = self._pairs(model)
        floats = [(e, v) for e, v in pairs if e.dtype.is_floating_point]
        torch._foreach_lerp_([e for e, _ in floats], [v for _, v in floats], 1.0 - decay)
        for e, v in pairs:
            if not e.dtype.is_floating_point:
                e.copy_(v)

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(ema tensor, model tensor) for parameters that train and all buffers, cached per trainable set."""
        trainable = tuple(p.requires_grad for p in model.parameters())
        if getattr(self, "_key", None) != (id(model), trainable):
            ema_p, ema_b = dict(self.module.named_parameters()), dict(self.module.named_buffers())
            self._cache: list[tuple[torch.Tensor, torch.Tensor]] = [
                (ema_p[n], p.detach()) for n, p in model.named_parameters() if p.requires_grad]
            self._cache += [(ema_b[n], b) for n, b in model.named_buffers()]
            self._key = (id(model), trainable)
        return self._cache

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])


def default_workers(device: torch.device) -> int:
    """Measured on 2 cores: decoding in the main process beats a worker competing with the model for a core."""
    cores = os.cpu_count() or 1
    return min(8, cores) if device.type == "cuda" else (0 if cores <= 2 else min(4, cores // 2))
