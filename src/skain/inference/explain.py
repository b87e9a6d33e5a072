"""Grad-CAM heatmaps: where in the image the model's evidence for a class comes from.

The image goes through the Predictor's own preprocessing (`Predictor.image_tensor`) and the metadata through its
encoder, so the map explains exactly the input a prediction saw. The feature map is taken at the input of the
backbone's global pool (the last spatial features of any timm CNN), weighted by the pooled gradient of the class
score (Selvaraju et al., 2017), rectified, upsampled to the model input and scaled to [0, 1]. For an ensemble,
each member's map is taken against the averaged prediction and the maps are summed before scaling.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from skain.inference.predictor import Predictor, metadata_frame

log = logging.getLogger(__name__)


class ExplainError(ValueError):
    """The model cannot be explained this way (for example a backbone without spatial features)."""


@dataclass
class Explanation:
    target: str            # the class explained
    heat: np.ndarray       # HxW float32 in [0, 1], aligned with `image`
    image: np.ndarray      # HxWx3 uint8: the centre crop the model saw, un-normalised


class GradCam:
    """One per Predictor: registers its hook once; safe to call from several threads at a time."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self._local = threading.local()
        for pool in _global_pools(predictor.model):
            pool.register_forward_pre_hook(self._capture)

    def _capture(self, module: torch.nn.Module, inputs: tuple) -> None:
        if getattr(self._local, "active", False) and inputs and inputs[0].dim() == 4:
            self._local.features.append(inputs[0])

    def __call__(self, image: bytes | str | Path, age: float | None = None, sex: str | None = None,
                 site: str | None = None, target: str | None = None) -> Explanation:
        p = self.predictor
        x = p.image_tensor(image)[None].to(p.device).requires_grad_(True)
        b = p._batch(x.detach().cpu(), metadata_frame(age, sex, site))  # the encoding predict_one uses
        meta = tuple(b[k].to(p.device) for k in ("age", "sex", "site"))
        self._local.active, self._local.features = True, []
        try:
            with torch.enable_grad():
                logits = p.model(x, *meta)
                features = self._local.features
                if not features:
                    raise ExplainError("the backbone's global pool saw no spatial feature map")
                index = p.classes.index(target) if target else int(logits[0].argmax())
                grads = torch.autograd.grad(logits[0, index], features)
        finally:
            self._local.active, self._local.features = False, None
        heat = _cam([f.detach() for f in features], grads, x.shape[-2:])
        return Explanation(p.classes[index], heat, _display_image(x.detach()[0], p.preprocess))


def _global_pools(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The backbone's global pool; for an ensemble (EnsembleBackbone), every member backbone's."""
    backbone = getattr(model, "backbone", None)
    pools = [getattr(b, "global_pool", None) for b in getattr(backbone, "parts", [backbone])]
    modules = [pool for pool in pools if isinstance(pool, torch.nn.Module)]
    if len(modules) != len(pools):
        raise ExplainError(f"{type(backbone or model).__name__} has no global pool to take "
                           "Grad-CAM features from; heatmaps need a CNN backbone")
    return modules


def _cam(features: list[torch.Tensor], grads: tuple[torch.Tensor, ...], size: tuple[int, ...]) -> np.ndarray:
    """One map per feature map (one per ensemble member), upsampled and summed: an ensemble member's map counts
    as much as its gradient says it does towards the averaged probability."""
    # a tensor, not sum()'s start value 0: GradCam.__call__ raises before this when there are no feature maps
    cam = cast(torch.Tensor, sum(_member_cam(f, g, size) for f, g in zip(features, grads)))
    top = float(cam.max())
    return (cam / top if top > 0 else torch.zeros_like(cam)).cpu().numpy().astype(np.float32)


def _member_cam(features: torch.Tensor, grad: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(1, keepdim=True)).float()
    return F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[0, 0]


def _display_image(x: torch.Tensor, preprocess: dict) -> np.ndarray:
    """Undo the normalisation: the exact crop the model saw, as uint8 RGB."""
    mean = torch.tensor(preprocess["mean"], device=x.device)[:, None, None]
    std = torch.tensor(preprocess["std"], device=x.device)[:, None, None]
    rgb = (x.float() * std + mean).clamp(0, 1).mul(255).round().byte()
    return rgb.permute(1, 2, 0).cpu().numpy()
