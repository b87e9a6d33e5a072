"""Sensitivity-first malignancy triage: P(malignant) = P(mel) + P(bcc) + P(akiec) against one threshold.

The threshold is the highest one that still flags the requested share of malignant validation lesions,
so a miss costs more than a false alarm, as it does in the clinic.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import beta
from sklearn.metrics import roc_curve

from skain.data.schema import MALIGNANT

INVESTIGATE, ROUTINE = "investigate further", "routine"


def malignant_columns(classes: Sequence[str]) -> list[int] | None:
    """Indices of the malignant classes, or None when the model lacks one of them (no triage then)."""
    if not all(c in classes for c in MALIGNANT):
        return None
    return [list(classes).index(c) for c in MALIGNANT]


def p_malignant(probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    cols = malignant_columns(classes)
    if cols is None:
        raise ValueError(f"triage needs the classes {', '.join(MALIGNANT)}; this model has {', '.join(classes)}")
    return np.asarray(probs, dtype=np.float64)[:, cols].sum(1)


def check_confidence(confidence: float) -> None:
    """A triage confidence must lie in [0.5, 1): below 0.5 the bound would promise less than the estimate."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"triage confidence must be in [0.5, 1), got {confidence}")


def positives_needed(n: int, target: float, confidence: float | None = None) -> int:
    """How many of `n` validation positives the threshold must flag: ceil(target * n); with `confidence`, the
    fewest k whose one-sided Clopper-Pearson lower bound of the sensitivity k / n at that confidence is still
    >= target (all n when even that falls short), so the promise has margin for new images."""
    least = max(1, math.ceil(target * n - 1e-9))
    if confidence is None:
        return least
    check_confidence(confidence)
    for k in range(least, n):
        if beta.ppf(1.0 - confidence, k, n - k + 1) >= target:
            return k
    return n


def threshold_for_sensitivity(scores: np.ndarray, positive: np.ndarray, target: float = 0.95,
                              confidence: float | None = None) -> float:
    """A threshold flagging at least `target` of the positives with as few negatives as possible (with
    `confidence`: enough positives that the sensitivity's lower confidence bound reaches `target`).

    It lies halfway between the k-th highest positive score (k = positives_needed) and the next
    lower score of any image: validation decisions are those of the tightest threshold, while new
    borderline lesions get the margin instead of falling just below it."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos = np.sort(scores[positive])[::-1]
    if len(pos) == 0:
        raise ValueError("no malignant lesions in the validation split: cannot choose a triage threshold")
    kth = pos[positives_needed(len(pos), target, confidence) - 1]
    below = scores[scores < kth]
    return float((kth + below.max()) / 2) if len(below) else float(kth)


def operating_point(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict:
    """Sensitivity and specificity of `scores >= threshold`, with the counts behind them."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    flagged = scores >= threshold
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    tp, tn = int((flagged & positive).sum()), int((~flagged & ~positive).sum())
    return {"threshold": float(threshold), "sensitivity": tp / n_pos if n_pos else float("nan"),
            "specificity": tn / n_neg if n_neg else float("nan"), "positives": n_pos, "negatives": n_neg,
            "flagged_share": float(flagged.mean()) if len(flagged) else float("nan")}


def sensitivity_at_specificity(scores: np.ndarray, positive: np.ndarray, specificity: float) -> float:
    """Best sensitivity among ROC operating points whose specificity is at least `specificity`."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(positive.astype(int), np.asarray(scores, dtype=np.float64))
    ok = (1.0 - fpr) >= specificity - 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def triage_labels(p_mal: np.ndarray, threshold: float) -> np.ndarray:
    return np.where(np.asarray(p_mal) >= threshold, INVESTIGATE, ROUTINE)


def triage_rates(flagged: np.ndarray, positive: np.ndarray, melanoma: np.ndarray | None = None) -> dict:
    """Sensitivity/specificity of given triage decisions (NaN where a group is empty)."""
    flagged, positive = np.asarray(flagged, dtype=bool), np.asarray(positive, dtype=bool)
    out = {"sensitivity": float(flagged[positive].mean()) if positive.any() else float("nan"),
           "specificity": float((~flagged[~positive]).mean()) if (~positive).any() else float("nan"),
           "positives": int(positive.sum()), "negatives": int((~positive).sum())}
    if melanoma is not None and np.any(melanoma):
        out["melanoma_sensitivity"] = float(flagged[np.asarray(melanoma, dtype=bool)].mean())
    return out
