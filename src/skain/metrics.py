"""Balanced-accuracy-first classification metrics, computed the same way everywhere."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                           pred: np.ndarray | None = None) -> dict:
    """Headline and per-class metrics. AUCs are one-vs-rest; classes absent from `labels` get NaN AUC
    and are left out of the macro averages over present classes (balanced accuracy, macro F1, macro AUC).
    `pred` (class indices) is the decision that was made; default the arg-max of `probs`."""
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(1) if pred is None else np.asarray(pred, dtype=int)
    k = len(classes)
    present = sorted(set(labels.tolist()))
    prec, rec, f1, support = precision_recall_fscore_support(labels, pred, labels=list(range(k)), zero_division=0)
    aucs = [_auc((labels == i).astype(int), probs[:, i]) for i in range(k)]
    eps = 1e-12
    nll = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0))))
    return {
        "n": int(len(labels)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, labels=present, average="macro", zero_division=0)),
        "macro_auc": _nanmean(aucs),
        "nll": nll,
        "per_class": {c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                          "auc": aucs[i], "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(labels, pred, labels=list(range(k))).tolist(),
        "classes": list(classes),
    }


def history_row(metrics: dict) -> dict:
    """The flat per-epoch subset written to train_history.csv."""
    row = {k: metrics[k] for k in ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc")}
    row.update({f"recall_{c}": v["recall"] for c, v in metrics["per_class"].items()})
    return row


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al. 2017)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def one_vs_rest_rates(labels: np.ndarray, pred: np.ndarray, positive: int) -> dict:
    """Sensitivity and specificity of the decision "predicted class == positive" (e.g. melanoma)."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    pos, neg = labels == positive, labels != positive
    tp, tn = int((pos & (pred == positive)).sum()), int((neg & (pred != positive)).sum())
    return {"sensitivity": tp / int(pos.sum()) if pos.any() else float("nan"),
            "specificity": tn / int(neg.sum()) if neg.any() else float("nan"),
            "positives": int(pos.sum()), "negatives": int(neg.sum())}
