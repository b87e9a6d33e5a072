"""Multi-process training on PyTorch's own engine (torchrun + DistributedDataParallel).

`torchrun --nproc_per_node=N -m skain train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; without them everything
here is a no-op and training runs in one process. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import logging
import math
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes in the environment (once); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    if not info.main:
        logging.getLogger("skain").setLevel(logging.WARNING)
    return info


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    return torch.device("cuda", info.local_rank) if info.enabled and device.type == "cuda" else device


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast(info: DistInfo, obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank (decisions are taken once, on rank 0)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main_rank(info: DistInfo, step: Callable[[], None]) -> None:
    """Run `step` on rank 0 while the others wait; if it fails, every rank raises the same error.

    Without this a failure on rank 0 (an unreadable image, a full disk) leaves the other ranks to walk into DDP
    set-up against a process group rank 0 is tearing down: unrelated errors, or a hang until the timeout."""
    failure: tuple[type, str] | None = None
    error: BaseException | None = None
    if info.main:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error, failure = exc, _portable(exc)
    failure = broadcast(info, failure)
    if failure is None:
        return
    if error is not None:
        raise error
    kind, message = failure
    try:
        same = kind(message)
    except Exception:  # noqa: BLE001 - a class that cannot be built from its message alone
        same = RuntimeError(message)
    raise same


def _portable(exc: Exception) -> tuple[type, str]:
    """(exception class, message) if the class can travel to the other ranks by name, else a RuntimeError."""
    try:
        pickle.dumps(type(exc))
        return type(exc), str(exc)
    except Exception:  # noqa: BLE001 - e.g. a class defined inside a function
        return RuntimeError, f"{type(exc).__name__}: {exc}"


def gather_predictions(info: DistInfo, res: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate every rank's shard and restore dataset order, so metrics equal a single-process run."""
    if not info.enabled:
        return res
    parts: list[Any] = [None] * info.world
    dist.all_gather_object(parts, res)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in res}
    _, first = np.unique(merged["index"], return_index=True)
    return {k: v[first] for k, v in merged.items()}


def sync_buffers(info: DistInfo, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics drift per rank in training mode), so all
    shards of the validation set are scored by exactly the weights that rank 0 saves."""
    if info.enabled:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def reduce_mean(info: DistInfo, total: float, count: int) -> float:
    if not info.enabled:
        return total / max(count, 1)
    t = torch.tensor([total, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0]) / max(float(t[1]), 1.0)


def cleanup(info: DistInfo) -> None:
    """Leave the group together: a rank that tears gloo down while another still talks to it aborts."""
    if info.enabled and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Evaluation shard: indices rank, rank+world, ... with no padding (nothing is counted twice)."""

    def __init__(self, n: int, info: DistInfo):
        self.indices = list(range(info.rank, n, info.world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(Sampler[int]):
    """Training order for one rank: a seeded shuffle (or weighted draw, for class balancing) of the whole set,
    re-drawn each epoch by `set_epoch`, split evenly across ranks. With world=1 it is an ordinary sampler."""

    def __init__(self, n: int, info: DistInfo, seed: int, weights: np.ndarray | None = None):
        self.n, self.info, self.seed, self.epoch = n, info, seed, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.per_rank = math.ceil(n / info.world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = self.per_rank * self.info.world
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
            order = torch.cat([order, order[: total - self.n]])  # pad by wrapping, as DistributedSampler does
        else:
            order = torch.multinomial(self.weights, total, replacement=True, generator=g)
        return iter(order[self.info.rank::self.info.world].tolist())

    def __len__(self) -> int:
        return self.per_rank
