"""Out-of-distribution scores: is this an image the model can speak about at all?

Class-conditional Gaussians with one shared, shrunk covariance on the backbone's pooled features of the
training images (Lee et al. 2018, "A simple unified framework for detecting OOD samples"); the score is
the squared Mahalanobis distance to the nearest class mean. Backbone features, not the fused ones, because
age/sex/site say nothing about whether the picture is a dermoscopic image. The rejection threshold is a
quantile of validation scores, so the false-rejection rate on new lesions is a stated, checked number.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

log = logging.getLogger(__name__)


@dataclass
class MahalanobisScorer:
    """score(features) = min over classes of ||(f - mu_c) W||^2 with W W^T = inverse shared covariance."""

    means: np.ndarray        # (classes, D), already multiplied by W
    whitener: np.ndarray     # (D, D)
    normalize: bool = True   # L2-normalise features first (scale-free: blank images shrink activations)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, normalize: bool = True) -> "MahalanobisScorer":
        x = _prep(features, normalize)
        labels = np.asarray(labels, dtype=int)
        present = np.unique(labels[labels >= 0])
        if len(x) < 2 or len(present) == 0:
            raise ValueError("need at least two labelled training images to fit the OOD scorer")
        means = np.stack([x[labels == c].mean(0) for c in present])
        centred = x - means[np.searchsorted(present, labels)]
        cov = LedoitWolf(assume_centered=True).fit(centred).covariance_
        vals, vecs = np.linalg.eigh(cov)
        whitener = vecs / np.sqrt(np.maximum(vals, vals.max() * 1e-6))
        return cls(means @ whitener, whitener, normalize)

    def score(self, features: np.ndarray) -> np.ndarray:
        z = _prep(features, self.normalize) @ self.whitener
        d2 = (z ** 2).sum(1)[:, None] - 2 * z @ self.means.T + (self.means ** 2).sum(1)[None, :]
        return np.maximum(d2.min(1), 0.0)

    def state_dict(self) -> dict:
        return {"method": "mahalanobis", "features": "backbone", "normalize": self.normalize,
                "means": torch.from_numpy(self.means.astype(np.float32)),
                "whitener": torch.from_numpy(self.whitener.astype(np.float32))}

    @classmethod
    def from_state(cls, state: dict) -> "MahalanobisScorer":
        if state.get("method") != "mahalanobis":
            raise ValueError(f"unknown OOD method {state.get('method')!r} in the bundle")
        return cls(np.asarray(state["means"], dtype=np.float64), np.asarray(state["whitener"], dtype=np.float64),
                   bool(state.get("normalize", True)))


def _prep(features: np.ndarray, normalize: bool) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def threshold_for_false_rejection(scores: np.ndarray, rate: float) -> float:
    """The score above which only `rate` of in-distribution (validation) images fall."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"false-rejection rate must be in [0, 1), got {rate}")
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        raise ValueError("no validation images to set the OOD threshold on")
    return float(np.quantile(scores, 1.0 - rate, method="higher"))


class BackboneTap:
    """Collects the backbone's pooled features while the normal inference loop runs (no second pass).

    With test-time augmentation the backbone runs once per view and batch, views in order; only the
    first (identity) view of each batch is kept, so OOD scores do not depend on the TTA setting.
    """

    def __init__(self, model: torch.nn.Module, views: int = 1):
        self.backbone, self.views = model.backbone, max(1, int(views))
        self.outputs: list[torch.Tensor] = []
        self._handle = None

    def __enter__(self) -> "BackboneTap":
        self.outputs.clear()
        self._handle = self.backbone.register_forward_hook(
            lambda _m, _i, out: self.outputs.append(out.detach().float().cpu()))
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def features(self) -> np.ndarray:
        kept = self.outputs[::self.views]
        return torch.cat(kept).numpy() if kept else np.zeros((0, 0), dtype=np.float32)
