"""Out-of-distribution scores: is this an image the model can speak about at all?

Class-conditional Gaussians with one shared, shrunk covariance on the backbone's pooled features of the
training images (Lee et al. 2018, "A simple unified framework for detecting OOD samples"); the score is
the squared Mahalanobis distance to the nearest class mean. Backbone features, not the fused ones, because
age/sex/site say nothing about whether the picture is a dermoscopic image. The rejection threshold is a
quantile of validation scores, so the false-rejection rate on new lesions is a stated, checked number.

Raw features (the default, `normalize=False`) keep the size of the activations, which is what gives noise away:
its feature vectors point roughly where lesions' do but are far larger or smaller. `MaxScorer` runs a
normalised and a raw scorer, each in units of its own validation quantile, and takes the larger; on the real
HAM10000 tuning photos it did no better than raw features alone (benchmarks/accuracy/trust_eval.py).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch.utils.hooks import RemovableHandle

log = logging.getLogger(__name__)


@dataclass
class MahalanobisScorer:
    """score(features) = min over classes of ||(f - mu_c) W||^2 with W W^T = inverse shared covariance.

    `fit` makes W the symmetric inverse square root of the covariance, so a portable file stores its upper
    triangle only; older bundles hold W = V diag(1/sqrt(lambda)) (not symmetric), which scores the same and which
    `skain.modelfile.compact.symmetric_state` turns into the symmetric form when such a bundle is exported."""

    means: np.ndarray        # (classes, D), already multiplied by W
    whitener: np.ndarray     # (D, D)
    normalize: bool = True   # L2-normalise features first (scale-free; loses the activation size)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, normalize: bool = True) -> MahalanobisScorer:
        x = _prep(features, normalize)
        labels = np.asarray(labels, dtype=int)
        present = np.unique(labels[labels >= 0])
        if len(x) < 2 or len(present) == 0:
            raise ValueError("need at least two labelled training images to fit the OOD scorer")
        means = np.stack([x[labels == c].mean(0) for c in present])
        centred = x - means[np.searchsorted(present, labels)]
        cov = LedoitWolf(assume_centered=True).fit(centred).covariance_
        return cls(*_symmetric_whitening(means, cov), normalize)

    def score(self, features: np.ndarray) -> np.ndarray:
        z = _prep(features, self.normalize) @ self.whitener
        d2 = (z ** 2).sum(1)[:, None] - 2 * z @ self.means.T + (self.means ** 2).sum(1)[None, :]
        return np.maximum(d2.min(1), 0.0)

    def rescaled(self, val_features: np.ndarray, rate: float) -> MahalanobisScorer:
        """A single scorer has no validation scales: itself."""
        return self

    def state_dict(self) -> dict:
        return {"method": "mahalanobis", "features": "backbone", "normalize": self.normalize,
                "means": torch.from_numpy(self.means.astype(np.float32)),
                "whitener": torch.from_numpy(self.whitener.astype(np.float32))}

    @classmethod
    def from_state(cls, state: dict) -> MahalanobisScorer:
        if state.get("method") != "mahalanobis":
            raise ValueError(f"unknown OOD method {state.get('method')!r} in the bundle")
        return cls(np.asarray(state["means"], dtype=np.float64), np.asarray(state["whitener"], dtype=np.float64),
                   bool(state.get("normalize", True)))


@dataclass
class MaxScorer:
    """score(f) = max_i score_i(f) / scale_i over Mahalanobis scorers; scale_i is scorer i's validation
    quantile at the stated false-rejection rate, so every part speaks in the same units."""

    parts: list[MahalanobisScorer]
    scales: list[float]

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, val_features: np.ndarray, rate: float) -> MaxScorer:
        parts = [MahalanobisScorer.fit(features, labels, normalize) for normalize in (True, False)]
        return cls(parts, [1.0] * len(parts)).rescaled(val_features, rate)

    def rescaled(self, val_features: np.ndarray, rate: float) -> MaxScorer:
        """The same Gaussians with scales set on `val_features` only (the cross-fit sets them per half)."""
        scales = [max(threshold_for_false_rejection(p.score(val_features), rate), 1e-12) for p in self.parts]
        return MaxScorer(self.parts, scales)

    def score(self, features: np.ndarray) -> np.ndarray:
        return np.max([p.score(features) / s for p, s in zip(self.parts, self.scales)], axis=0)

    def state_dict(self) -> dict:
        return {"method": "mahalanobis_max", "features": "backbone",
                "parts": [p.state_dict() for p in self.parts], "scales": [float(s) for s in self.scales]}

    @classmethod
    def from_state(cls, state: dict) -> MaxScorer:
        return cls([MahalanobisScorer.from_state(p) for p in state["parts"]], [float(s) for s in state["scales"]])


@dataclass
class EnsembleScorer:
    """An ensemble's OOD score from its members' own scorers: member i scores its columns of the concatenated
    backbone features (`widths`), in units of its own rejection threshold (set on its own validation split);
    the score is the mean over members. A score above 1.0 means the members, on average, reject the image."""

    parts: list
    widths: list[int]
    thresholds: list[float]

    def score(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features)
        if features.shape[1] != sum(self.widths):
            raise ValueError(f"the ensemble's OOD scorer expects {sum(self.widths)} feature columns, "
                             f"got {features.shape[1]}")
        bounds = np.cumsum([0, *self.widths])
        return np.mean([p.score(features[:, a:b]) / max(t, 1e-12)
                        for p, t, a, b in zip(self.parts, self.thresholds, bounds[:-1], bounds[1:])], axis=0)

    def state_dict(self) -> dict:
        return {"method": "ensemble_mean", "features": "backbone", "parts": [p.state_dict() for p in self.parts],
                "widths": [int(w) for w in self.widths], "thresholds": [float(t) for t in self.thresholds]}

    @classmethod
    def from_state(cls, state: dict) -> EnsembleScorer:
        return cls([scorer_from_state(p) for p in state["parts"]], [int(w) for w in state["widths"]],
                   [float(t) for t in state["thresholds"]])


def scorer_from_state(state: dict) -> MahalanobisScorer | MaxScorer | EnsembleScorer:
    """The OOD scorer a bundle stores (older bundles: a single Mahalanobis scorer)."""
    if state.get("method") == "mahalanobis_max":
        return MaxScorer.from_state(state)
    if state.get("method") == "ensemble_mean":
        return EnsembleScorer.from_state(state)
    return MahalanobisScorer.from_state(state)


STATE_ARRAYS = ("means", "whitener", "parts")  # what the figures (model card, API) leave out


def _symmetric_whitening(means: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(means @ S, S) with S = V diag(1/sqrt(lambda)) V^T, the symmetric inverse square root of `cov`
    (eigenvalues floored at 1e-6 of the largest), made exactly symmetric."""
    vals, vecs = np.linalg.eigh(cov)
    whitener = (vecs / np.sqrt(np.maximum(vals, vals.max() * 1e-6))) @ vecs.T
    whitener = (whitener + whitener.T) / 2
    return means @ whitener, whitener


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


# ------------------------------------------------------------------------------------------- flat frames
# A blank or near-uniform frame (any colour) has almost no pixel variation; fitting the feature check on
# re-saved copies moved such frames inside its threshold (docs/robustness.md), so the floor below rejects them
# on their pixels instead. Measured on the model input of a cpu-preset run (224 px crops, fold-0 split, 2026-12-05):
# 1,500 training images spread 0.050 at the least, 0.072 at the 0.1% quantile; 400 test images and their phone,
# WebP and screenshot copies 0.062 at the least; blank frames 0.0; noise and text screenshots 0.25-0.61.
SPREAD_QUANTILE, SPREAD_MARGIN = 0.001, 0.5
MAX_FLAT_RATIO = 1e3  # the OOD score of a perfectly flat frame (anything above 1 is rejected)


def pixel_spread(images: torch.Tensor) -> torch.Tensor:
    """Per image (N, C, H, W model input): the mean over channels of the pixels' standard deviation within each
    channel. 0 for a blank frame of any colour; independent of the image's average colour."""
    return images.detach().float().flatten(2).std(2).mean(1).cpu()


def spread_floor(spreads: np.ndarray) -> float:
    """The least pixel spread a dermoscopic image may have: half the 0.1% quantile of the training images'."""
    spreads = np.asarray(spreads, dtype=np.float64)
    if len(spreads) == 0:
        raise ValueError("no training images to set the flat-frame floor on")
    return float(SPREAD_MARGIN * np.quantile(spreads, SPREAD_QUANTILE))


def flat_ratio(spreads: np.ndarray, floor: float) -> np.ndarray:
    """floor / spread, capped: above 1.0 means flatter than the floor (not a dermoscopic image)."""
    spreads = np.asarray(spreads, dtype=np.float64)
    return np.minimum(floor / np.maximum(spreads, floor / MAX_FLAT_RATIO), MAX_FLAT_RATIO)


class BackboneTap:
    """Collects the backbone's pooled features, and the pixel spread of the images that go in, while the normal
    inference loop runs (no second pass).

    With test-time augmentation the backbone runs once per view and batch, views in order; only the
    first (identity) view of each batch is kept, so OOD scores do not depend on the TTA setting. The images are
    read where they enter the network: the backbone's input, or `image_in` for exported graphs (OnnxModel), whose
    backbone only passes the graph's features through.
    """

    def __init__(self, model: torch.nn.Module, views: int = 1):
        self.backbone, self.views = cast(torch.nn.Module, model.backbone), max(1, int(views))
        self.entry = cast(torch.nn.Module, getattr(model, "image_in", None) or model.backbone)
        self.outputs: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> BackboneTap:
        self.outputs.clear()
        self.inputs.clear()
        self._thread = threading.get_ident()
        self._handles = [self.backbone.register_forward_hook(self._keep),
                         self.entry.register_forward_pre_hook(self._keep_input)]
        return self

    def _keep(self, _module, _inputs, out: torch.Tensor) -> None:
        # The web server runs one model from several threads, and every thread's tap sees every forward pass:
        # keep only this thread's, so concurrent requests never swap OOD features.
        if threading.get_ident() == self._thread:
            self.outputs.append(out.detach().float().cpu())

    def _keep_input(self, _module, inputs: tuple) -> None:
        if threading.get_ident() == self._thread and inputs and isinstance(inputs[0], torch.Tensor):
            self.inputs.append(pixel_spread(inputs[0]))

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def features(self) -> np.ndarray:
        kept = self.outputs[::self.views]
        return torch.cat(kept).numpy() if kept else np.zeros((0, 0), dtype=np.float32)

    def spreads(self) -> np.ndarray:
        """The pixel spread of each image (identity view), in the order of `features()`."""
        kept = self.inputs[::self.views]
        return torch.cat(kept).numpy().astype(np.float64) if kept else np.zeros(0)
