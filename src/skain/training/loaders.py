"""The data side of a training run: read and split the table, fit the metadata encoder on the training split,
and build the image loaders (shared decode/resize/cache path, augmentation, class balancing, worker count)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from skain.data.dataset import LesionDataset
from skain.data.encoder import MetadataDropout, MetadataEncoder
from skain.data.images import ImageError, ImageLoader, cache_dir_from_flag, default_cache_dir
from skain.data.layout import discover, load_table
from skain.data.schema import CLASSES, DataError
from skain.data.split import holdout_split, lesion_split
from skain.data.transforms import eval_transform, train_transform
from skain.engine import default_workers
from skain.training.config import Config
from skain.training.distributed import (
    DistInfo,
    EpochSampler,
    ShardSampler,
)

log = logging.getLogger(__name__)


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
    return ImageLoader(pre["resize"], cache_dir_from_flag(cfg.data.cache_dir, default_cache_dir()))


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
    """--workers if given, else skain's default for this device (engine.default_workers)."""
    return cfg.data.num_workers if cfg.data.num_workers >= 0 else default_workers(device)


def build_loaders(cfg: Config, prep: Prepared, pre: dict, loader_fn: ImageLoader, device: torch.device,
                  info: DistInfo = DistInfo()):
    """Training order from a seeded per-epoch sampler (sharded across ranks); validation sharded without padding."""
    tr = prep.frame.iloc[prep.train_idx].reset_index(drop=True)
    va = prep.frame.iloc[prep.val_idx].reset_index(drop=True)
    dropout = MetadataDropout(prep.encoder, cfg.train.meta_dropout) if cfg.train.meta_dropout > 0 else None
    augment = train_transform(pre, photo=cfg.train.photo_augment, paired=cfg.train.consistency > 0)
    train_ds = LesionDataset(tr, prep.encoder, loader_fn, augment, meta_dropout=dropout)
    val_ds = LesionDataset(va, prep.encoder, loader_fn, eval_transform(pre))
    # no persistent_workers: a DataLoader seeds its workers from the main process's RNG each time an epoch's
    # iterator starts, which run_epoch seeds from (seed, epoch, rank); persistent workers keep one seed for the
    # whole run, so augmentation would depend on the epochs before it and --resume could not replay an epoch
    num_workers, pin_memory = workers(cfg, device), device.type == "cuda"  # the same for both loaders
    weights = None
    if cfg.train.balance == "sampler":
        weights = balanced_sample_weights(train_ds.labels)
    sampler = EpochSampler(len(train_ds), info, cfg.train.seed, weights)
    bs = cfg.train.batch_size
    train_dl = DataLoader(train_ds, bs, sampler=sampler, drop_last=len(sampler) > bs, num_workers=num_workers,
                          pin_memory=pin_memory)
    val_dl = DataLoader(val_ds, bs * 2, sampler=ShardSampler(len(val_ds), info), num_workers=num_workers,
                        pin_memory=pin_memory)
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
