"""Temperature scaling (Guo et al. 2017): one scalar T, fit by minimising validation NLL.

Dividing logits by T never changes which class wins, so accuracy and balanced accuracy stay as trained;
only how sure the probabilities sound changes. ECE and NLL come from `skain.metrics`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from skain.fileio import atomic_write
from skain.metrics import expected_calibration_error

log = logging.getLogger(__name__)
LOG_T_BOUNDS = (-3.0, 3.0)  # T in [e^-3, e^3] ~ [0.05, 20]: beyond that the model, not the temperature, is the problem


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / T)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), np.asarray(labels, dtype=int)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises NLL on (logits, labels); NLL is convex in log T so a bounded scalar search
    finds the optimum."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=int)
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on zero validation images")
    res = minimize_scalar(lambda t: nll(logits, labels, float(np.exp(t))), bounds=LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities softmax(logits / T)."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float, n_bins: int = 15) -> dict:
    """ECE and NLL of the same predictions before (T = 1) and after temperature scaling."""
    before, after = apply_temperature(logits, 1.0), apply_temperature(logits, temperature)
    return {"temperature": float(temperature), "n": int(len(labels)), "ece_bins": n_bins,
            "ece_before": expected_calibration_error(before, labels, n_bins),
            "ece_after": expected_calibration_error(after, labels, n_bins),
            "nll_before": nll(logits, labels, 1.0), "nll_after": nll(logits, labels, temperature)}


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per confidence bin: mean confidence, accuracy and count (the bins `expected_calibration_error` uses)."""
    conf, correct = probs.max(1), (probs.argmax(1) == np.asarray(labels)).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {"edges": edges, "count": count,
            "confidence": np.bincount(which, conf, n_bins) / safe,
            "accuracy": np.bincount(which, correct, n_bins) / safe}


def plot_reliability(logits: np.ndarray, labels: np.ndarray, temperature: float, path: str | Path,
                     n_bins: int = 15, title: str = "") -> Path:
    """Reliability diagram before/after temperature scaling, written as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, t, name in ((axes[0], 1.0, "before"), (axes[1], temperature, f"after (T = {temperature:.2f})")):
        probs = apply_temperature(logits, t)
        bins = reliability_bins(probs, labels, n_bins)
        centers, width = bins["edges"][:-1] + 0.5 / n_bins, 1.0 / n_bins
        shown = bins["count"] > 0
        ax.bar(centers[shown], bins["accuracy"][shown], width=width * 0.95, color="#4c72b0", label="accuracy")
        ax.bar(centers[shown], bins["confidence"][shown] - bins["accuracy"][shown], width=width * 0.95,
               bottom=bins["accuracy"][shown], color="#dd8452", alpha=0.5, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ece = expected_calibration_error(probs, labels, n_bins)
        ax.set(title=f"{name}: ECE {ece:.3f}", xlabel="confidence (top class)", xlim=(0, 1), ylim=(0, 1))
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return path
