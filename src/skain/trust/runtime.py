"""What prediction does with the bundle's trust block: temperature, OOD score, triage.

Bundles written before the trust block existed (or by runs too small to fit it) still load: every piece
is optional, and a missing piece yields T = 1, no OOD verdict (None) and no triage.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from skain.trust.ood import (
    STATE_ARRAYS,
    BackboneTap,
    EnsembleScorer,
    MahalanobisScorer,
    MaxScorer,
    flat_ratio,
    scorer_from_state,
)
from skain.trust.triage import malignant_columns, triage_labels

# the one text for an image the OOD check turns away (CLI summaries, the API and the web page show this)
NOT_DERMOSCOPIC = ("This does not look like a dermoscopic image of a skin lesion, so the model gives no diagnosis. "
                   "It was trained on dermoscopy only.")


@dataclass
class TrustLayer:
    classes: list[str]
    temperature: float = 1.0
    ood: MahalanobisScorer | MaxScorer | EnsembleScorer | None = None
    ood_threshold: float | None = None
    triage_threshold: float | None = None
    figures: dict = field(default_factory=dict)
    views: dict = field(default_factory=dict)  # "N" -> temperature and triage fit for N TTA views
    min_spread: float | None = None  # flat-frame floor on the images' pixel spread (ood.spread_floor); None: none

    @classmethod
    def from_bundle(cls, bundle: dict) -> TrustLayer:
        trust, classes = bundle.get("trust") or {}, list(bundle["classes"])
        ood = trust.get("ood") or {}
        triage = trust.get("triage") or {}
        has_triage = triage.get("threshold") is not None and malignant_columns(classes) is not None
        return cls(classes, float(trust.get("temperature", 1.0)),
                   scorer_from_state(ood) if ood.get("means") is not None or ood.get("parts") else None,
                   float(ood["threshold"]) if ood.get("threshold") is not None else None,
                   float(triage["threshold"]) if has_triage else None,
                   {"triage": {k: v for k, v in triage.items()}, "ood": {k: v for k, v in ood.items()
                                                                       if k not in STATE_ARRAYS}},
                   dict(trust.get("views") or {}),
                   float(ood["min_pixel_spread"]) if ood.get("min_pixel_spread") is not None else None)

    def for_views(self, views: int) -> TrustLayer:
        """The layer that applies to predictions averaged over `views` TTA views. Averaged views are less
        confident and rank differently (README, TTA), so the single-view temperature and triage threshold do not
        carry over: the ones `skain calibrate --tta N` fit for N views apply when the bundle has them, else
        neither applies and both say so. The OOD check applies either way: it scores the identity view's
        features (BackboneTap keeps only those)."""
        if views <= 1:
            return self
        block = self.views.get(str(int(views)))
        if block:
            triage = dict(block.get("triage") or {})
            threshold = triage.get("threshold") if self.triage_threshold is not None else None
            note = f"temperature and triage threshold fit for {views} TTA views on the validation split"
            return replace(self, temperature=float(block["temperature"]),
                           triage_threshold=None if threshold is None else float(threshold),
                           figures={**self.figures, "triage": triage, "tta": note})
        note = (f"not applied with test-time augmentation ({views} views): the temperature and triage threshold "
                f"were fit on single-view predictions (`skain calibrate --model RUN --tta {views}` fits them for "
                f"{views} views on a training run's validation split); "
                "probabilities are the plain average of the views")
        figures = {**self.figures, "triage": {"threshold": None, "reason": note}, "tta": note}
        return replace(self, temperature=1.0, triage_threshold=None, figures=figures)

    @property
    def has_ood(self) -> bool:
        return self.ood is not None and self.ood_threshold is not None

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Logits (or TTA log-probabilities) -> calibrated probabilities softmax(logits / T)."""
        z = torch.from_numpy(np.asarray(logits))
        return (z / self.temperature if self.temperature != 1.0 else z).softmax(1).numpy()

    def tap(self, model: torch.nn.Module, views: int = 1) -> BackboneTap | NoTap:
        """Feature capture for the OOD score around one inference loop; a no-op when the bundle has no OOD
        scorer or the model exposes no backbone (the ONNX backend)."""
        if self.has_ood and isinstance(getattr(model, "backbone", None), torch.nn.Module):
            return BackboneTap(model, views)
        return NoTap()

    def ood_scores(self, features: np.ndarray | None, spreads: np.ndarray | None = None) -> np.ndarray | None:
        """Distance relative to the rejection threshold: above 1.0 means 'not a dermoscopic image'. With the
        images' pixel spreads and a bundle that has the flat-frame floor, a frame flatter than the floor scores
        above 1.0 too (floor / spread, or the feature score where that is larger); every other image keeps its
        feature score."""
        if not self.has_ood or features is None or len(features) == 0:
            return None
        assert self.ood is not None and self.ood_threshold is not None  # has_ood
        scores = self.ood.score(features) / max(self.ood_threshold, 1e-12)
        if self.min_spread is not None and spreads is not None and len(spreads) == len(scores):
            flat = flat_ratio(spreads, self.min_spread)
            scores = np.where(flat > 1.0, np.maximum(scores, flat), scores)  # other images keep the feature score
        return scores

    def annotate(self, probs: np.ndarray, features: np.ndarray | None,
                 spreads: np.ndarray | None = None) -> pd.DataFrame:
        """Per image: p_malignant, triage, ood_score, ood (True = rejected). NaN/None where unavailable."""
        n = len(probs)
        cols = malignant_columns(self.classes)
        p_mal = np.asarray(probs, dtype=np.float64)[:, cols].sum(1) if cols is not None else np.full(n, np.nan)
        triage = (triage_labels(p_mal, self.triage_threshold) if self.triage_threshold is not None
                  else np.full(n, None, dtype=object))
        scores = self.ood_scores(features, spreads)
        ood = scores > 1.0 if scores is not None else np.full(n, None, dtype=object)
        return pd.DataFrame({"p_malignant": p_mal, "triage": triage,
                             "ood_score": scores if scores is not None else np.full(n, np.nan), "ood": ood})

    def columns(self, probs: np.ndarray, features: np.ndarray | None, ok: np.ndarray,
                spreads: np.ndarray | None = None) -> pd.DataFrame:
        """Batch-prediction columns ood, ood_score, p_malignant, triage; blank for unreadable images."""
        cols = self.annotate(probs, features, spreads)[["ood", "ood_score", "p_malignant", "triage"]]
        cols = cols.astype({"ood": object, "triage": object})
        cols.loc[~np.asarray(ok, dtype=bool), :] = [None, np.nan, np.nan, None]
        return cols

    def summary(self) -> dict:
        """Validated figures for display next to a triage result or an OOD rejection."""
        out = {"temperature": self.temperature, "triage": self.figures.get("triage", {}),
               "ood": self.figures.get("ood", {}), "not_dermoscopic_message": NOT_DERMOSCOPIC}
        return out | ({"calibration": self.figures["tta"]} if "tta" in self.figures else {})


class NoTap(contextlib.AbstractContextManager):
    """Stands in for BackboneTap when there is nothing to score."""

    def __exit__(self, *exc) -> None:
        return None

    def features(self) -> None:
        return None

    def spreads(self) -> None:
        return None
