"""Tensor transforms after the shared resize: dermoscopy augmentation for training, a centre crop otherwise.

Dermoscopic images have no canonical orientation, so flips and 90-degree rotations are label-preserving;
colour jitter models differences between dermatoscopes; scale crops model zoom.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torchvision.transforms import v2


def resolve_preprocess(pretrained_cfg: dict[str, Any], input_size: int | None = None,
                       mean: tuple | None = None, std: tuple | None = None,
                       crop_pct: float | None = None) -> dict[str, Any]:
    """Input size, resize, mean and std from the backbone's pretrained config unless overridden."""
    size = int(input_size or pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    pct = float(crop_pct or pretrained_cfg.get("crop_pct", 0.875) or 0.875)
    pct = min(pct, 0.875)  # keep a margin so train-time scale crops and eval centre crops see the lesion whole
    return {
        "input_size": size,
        "resize": int(round(size / pct)),
        "mean": [float(x) for x in (mean or pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))],
        "std": [float(x) for x in (std or pretrained_cfg.get("std", (0.229, 0.224, 0.225)))],
    }


def image_to_tensor(image, pre: dict[str, Any]) -> torch.Tensor:
    """One image (path or bytes) -> the model's input tensor: decode, resize, centre crop, normalise.

    The single-image form of the path every batch takes (ImageLoader + eval_transform)."""
    from .images import open_image, resize_shorter
    return eval_transform(pre)(resize_shorter(open_image(image), pre["resize"]))


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


class RandomRot90(torch.nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(img, k, dims=(-2, -1)) if k else img


def eval_transform(pre: dict[str, Any]) -> Callable[[np.ndarray], torch.Tensor]:
    """Resized uint8 HxWx3 -> normalised float CxHxW centre crop."""
    ops = v2.Compose([
        v2.CenterCrop(pre["input_size"]),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(pre["mean"], pre["std"]),
    ])
    return lambda arr: ops(_to_tensor(arr))


def train_transform(pre: dict[str, Any], strength: float = 1.0) -> Callable[[np.ndarray], torch.Tensor]:
    size = pre["input_size"]
    ops = v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.35, 1.0), ratio=(0.75, 1.333), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        RandomRot90(),
        v2.ColorJitter(0.2 * strength, 0.2 * strength, 0.15 * strength, 0.03 * strength),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(pre["mean"], pre["std"]),
    ])
    return lambda arr: ops(_to_tensor(arr))


def tta_views(batch: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Up to 8 dihedral views (identity, flips, 90-degree rotations) of a batch of images."""
    views = []
    for k in range(4):
        rot = torch.rot90(batch, k, dims=(-2, -1)) if k else batch
        views.append(rot)
        views.append(torch.flip(rot, dims=(-1,)))
    order = [0, 1, 5, 4, 2, 6, 3, 7]  # identity, h-flip, v-flip, rot180, rot90, rot270, transposes
    return [views[i] for i in order[:max(1, min(n, 8))]]
