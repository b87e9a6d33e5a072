"""The decision rule for the balanced-accuracy headline: post-hoc prior (logit) adjustment.

HAM10000 is two-thirds nevi, so the arg-max of calibrated probabilities under-calls the rare classes that
balanced accuracy weighs equally. The adjusted decision is

    argmax_c  log p_c - tau * log prior_c

(Menon et al. 2021, "Long-tail learning via logit adjustment"). tau = 0 is the plain arg-max; tau = 1 divides
out the training prior completely. Probabilities are never changed: only which class is named.

tau is chosen on out-of-fold predictions of k-fold training, and its effect is estimated by nested
cross-validation (chosen on k-1 folds' predictions, scored on the k-th), so the reported gain is held out. A model
without them gets its tau from its own validation split (`training.decide_validation`), its gain estimated on
cross-fitted halves of that split.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

from skain.data.schema import CLASSES
from skain.metrics import classification_metrics

log = logging.getLogger(__name__)

GRID = tuple(round(x, 2) for x in np.arange(0.0, 1.51, 0.05))


def decision_scores(probs: np.ndarray, log_prior: np.ndarray, tau: float) -> np.ndarray:
    """p_c * prior_c^-tau, renormalised per row: scores whose arg-max is the adjusted decision (what an ISIC
    submission needs, since the challenge scores the arg-max of what it is given). Not probabilities."""
    logs = _adjusted_logs(probs, log_prior, tau)
    scores = np.exp(logs - logs.max(1, keepdims=True))
    return scores / scores.sum(1, keepdims=True)


def adjusted_pred(probs: np.ndarray, log_prior: np.ndarray, tau: float) -> np.ndarray:
    """Class indices under the adjusted rule (tau = 0: arg-max)."""
    return _adjusted_logs(probs, log_prior, tau).argmax(1)


def _adjusted_logs(probs: np.ndarray, log_prior: np.ndarray, tau: float) -> np.ndarray:
    """log p_c - tau * log prior_c, per row."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) - tau * np.asarray(log_prior)


class Decision:
    """The bundle's decision rule (`bundle["decision"]`), or plain arg-max for bundles without one."""

    def __init__(self, state: dict | None = None, classes=CLASSES):
        state = state or {}
        self.tau = float(state.get("tau", 0.0))
        self.log_prior = np.asarray(state.get("log_prior", np.zeros(len(classes))), dtype=np.float64)
        if state and list(state.get("classes", classes)) != list(classes):
            raise ValueError("the decision rule was fit for other classes than the model's")

    @property
    def adjusted(self) -> bool:
        return self.tau != 0.0

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        probs = np.atleast_2d(probs)
        return adjusted_pred(probs, self.log_prior, self.tau) if self.adjusted else probs.argmax(1)

    def scores(self, probs: np.ndarray) -> np.ndarray:
        return decision_scores(probs, self.log_prior, self.tau) if self.adjusted else np.asarray(probs)

    def summary(self) -> dict:
        return {"rule": "argmax log p - tau * log prior" if self.adjusted else "argmax", "tau": self.tau}


def figures(probs: np.ndarray, labels: np.ndarray, decision: Decision, classes=CLASSES) -> dict:
    """Balanced accuracy, accuracy, macro F1 and per-class recall of the decision `decision` makes on calibrated
    probabilities `probs` (what the Predictor names), with the arg-max figures of the same rows beside them.
    Recall of a class absent from `labels` is None."""
    labels = np.asarray(labels, dtype=int)

    def scores(pred: np.ndarray) -> dict:
        m = classification_metrics(labels, probs, classes, pred)
        return {"balanced_accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                "recall": {c: (r["recall"] if r["support"] else None) for c, r in m["per_class"].items()}}
    probs = np.asarray(probs, dtype=np.float64)
    return {**decision.summary(), "n": int(len(labels)), **scores(decision(probs)),
            "argmax": scores(probs.argmax(1))}


def fit_tau(probs: np.ndarray, labels: np.ndarray, log_prior: np.ndarray, grid=GRID) -> float:
    """The tau of `grid` with the highest balanced accuracy (ties: the smallest adjustment)."""
    scores = [balanced_accuracy_score(labels, adjusted_pred(probs, log_prior, t)) for t in grid]
    return float(grid[int(np.argmax(scores))])


def log_prior_from_counts(counts: dict[str, int], classes=CLASSES) -> np.ndarray:
    n = np.array([max(int(counts.get(c, 0)), 1) for c in classes], dtype=np.float64)
    return np.log(n / n.sum())


def nested_estimate(oof: pd.DataFrame, log_prior: np.ndarray, classes=CLASSES) -> dict:
    """Per fold: the prior and tau taken from the other folds' labels and out-of-fold predictions only, balanced
    accuracy on this fold with and without the adjustment; plus the tau chosen on all folds with `log_prior`
    (what a bundle stores)."""
    probs = oof[[f"p_{c}" for c in classes]].to_numpy()
    labels = oof["dx"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    folds = sorted(oof["fold"].unique())
    if len(folds) < 2:
        raise ValueError(f"the decision rule's nested estimate needs predictions of at least 2 folds (got {len(folds)})")
    rows = []
    for k in folds:
        inside, outside = (oof["fold"] == k).to_numpy(), (oof["fold"] != k).to_numpy()
        prior = log_prior_from_counts(oof.loc[outside, "dx"].value_counts().to_dict(), classes)
        tau = fit_tau(probs[outside], labels[outside], prior)
        rows.append({"fold": int(k), "tau": tau, "log_prior": [float(x) for x in prior],
                     "argmax": float(balanced_accuracy_score(labels[inside], probs[inside].argmax(1))),
                     "adjusted": float(balanced_accuracy_score(labels[inside],
                                                               adjusted_pred(probs[inside], prior, tau)))})
    table = pd.DataFrame(rows)
    return {"rule": "argmax log p - tau * log prior", "tau": fit_tau(probs, labels, log_prior),
            "fit_on": f"{len(oof)} out-of-fold predictions of {len(folds)}-fold lesion-grouped training",
            "log_prior": [float(x) for x in log_prior], "classes": list(classes),
            "nested": rows,
            "balanced_accuracy_argmax": {"mean": float(table["argmax"].mean()), "std": float(table["argmax"].std())},
            "balanced_accuracy_adjusted": {"mean": float(table["adjusted"].mean()),
                                           "std": float(table["adjusted"].std())}}
