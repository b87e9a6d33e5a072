"""Files a user keeps: the predictions CSV (skAIn or ISIC 2018 format) and an evaluation report folder
(metrics.json, confusion-matrix and ROC PNGs, report.md)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from skain.evaluation.evaluate import ISIC2018_COLUMNS
from skain.fileio import atomic_json, atomic_write
from skain.trust.modelcard import trust_table, write_card

log = logging.getLogger(__name__)

FORMATS = ("skain", "isic2018")


def isic2018_table(pred: pd.DataFrame) -> pd.DataFrame:
    """ISIC 2018 Task 3 submission: image,MEL,NV,BCC,AKIEC,BKL,DF,VASC; images that failed are left out
    (the challenge format has no way to say "no prediction")."""
    prefix = "s_" if "s_mel" in pred.columns else "p_"  # decision scores when the model has a decision rule
    ok = pred[[f"{prefix}{c.lower()}" for c in ISIC2018_COLUMNS]].notna().all(axis=1)
    out = pd.DataFrame({"image": pred.loc[ok, "image_id"].to_numpy()})
    for col in ISIC2018_COLUMNS:
        out[col] = pred.loc[ok, f"{prefix}{col.lower()}"].to_numpy()
    return out


def write_predictions(pred: pd.DataFrame, path: str | Path, fmt: str = "skain") -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    table = isic2018_table(pred) if fmt == "isic2018" else pred
    path = Path(path)
    atomic_write(path, lambda fh: fh.write(table.to_csv(index=False).encode("utf-8")))
    return path


def write_report(metrics: dict, labels: np.ndarray, probs: np.ndarray, folder: str | Path,
                 context: dict | None = None, trust: dict | None = None) -> Path:
    """metrics.json + confusion_matrix.png + roc_curves.png + report.md into `folder`; with `trust`
    (`evaluate.folder_trust`) also the trust figures with and without metadata and model_card.md."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = list(metrics["classes"])
    trust = dict(trust or {})
    card = trust.pop("model_card", None)
    if trust:
        metrics = {**metrics, "trust": trust}
    atomic_json({**metrics, "context": context or {}}, folder / "metrics.json")
    plot_confusion(np.asarray(metrics["confusion_matrix"]), classes, folder / "confusion_matrix.png")
    plot_roc(labels, probs, classes, folder / "roc_curves.png")
    text = report_markdown(metrics, context or {}) + trust_markdown(trust)
    atomic_write(folder / "report.md", lambda fh: fh.write(text.encode("utf-8")))
    if card:
        write_card(folder, card)
    log.info("wrote the evaluation report to %s", folder)
    return folder


def _figure():
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, **kwargs) -> None:
    """A matplotlib figure -> PNG, atomically (a killed run never leaves half a picture)."""
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", **kwargs))


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    """Row-normalised colours (recall per true class) with raw counts written in each cell."""
    plt = _figure()
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="Confusion matrix (count, row fraction)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_roc(labels: np.ndarray, probs: np.ndarray, classes: list[str], path: Path) -> None:
    """One-vs-rest ROC per class present in the labels, AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for i, c in enumerate(classes):
        y = (np.asarray(labels) == i).astype(int)
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, probs[:, i])
            ax.plot(fpr, tpr, lw=1.5, label=f"{c} (AUC {roc_auc_score(y, probs[:, i]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curves (one vs rest)",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _f(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def report_markdown(metrics: dict, context: dict) -> str:
    mel = metrics.get("melanoma", {})
    lines = ["# skAIn evaluation report", "",
             "Research and education only; not a medical device.", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()] + ([""] if context else [])
    lines += ["| metric | value |", "|---|---|",
              f"| **balanced accuracy** | **{_f(metrics['balanced_accuracy'])}** |",
              f"| accuracy | {_f(metrics['accuracy'])} |", f"| macro F1 | {_f(metrics['macro_f1'])} |",
              f"| macro AUC (one vs rest) | {_f(metrics['macro_auc'])} |",
              f"| melanoma sensitivity | {_f(mel.get('sensitivity'))} |",
              f"| melanoma specificity | {_f(mel.get('specificity'))} |", f"| images scored | {metrics['n']} |", "",
              "| class | precision | recall | F1 | AUC | support |", "|---|---|---|---|---|---|"]
    for c, m in metrics["per_class"].items():
        lines.append(f"| {c} | {_f(m['precision'])} | {_f(m['recall'])} | {_f(m['f1'])} | {_f(m['auc'])} | "
                     f"{m['support']} |")
    lines += interval_lines(metrics.get("intervals"), list(metrics["per_class"]))
    lines += lesion_lines(metrics.get("lesion_level"))
    lines += ["", "Balanced accuracy is the mean per-class recall (HAM10000 is ~67% nevi, so plain accuracy "
              "flatters a model that favours nevi). Melanoma sensitivity/specificity use the argmax decision.",
              "", "![confusion matrix](confusion_matrix.png)", "", "![ROC curves](roc_curves.png)", ""]
    return "\n".join(lines)


def interval_lines(intervals: dict | None, classes: list[str] | None = None) -> list[str]:
    """The bootstrap intervals as a table (skain.evaluation.evaluate.with_intervals); per-class rows
    (`recall_<column>`) named by their class where `classes` are given."""
    if not intervals:
        return []
    level = int(round(100 * intervals["level"]))
    lines = ["", f"{level}% intervals: {intervals['resamples']} bootstrap resamples of {intervals['unit']}s within "
             f"each class (seed {intervals['seed']}).", "", f"| metric | value | {level}% interval |", "|---|---|---|"]
    for key, m in intervals["metrics"].items():
        lo, hi = m["ci"]
        name, _, column = key.rpartition("_")
        if classes and name == "recall" and column.isdigit() and int(column) < len(classes):
            key = f"recall {classes[int(column)]}"
        lines.append(f"| {key.replace('_', ' ')} | {_f(m['value'])} | {_f(lo)} - {_f(hi)} |")
    return lines


def lesion_lines(level: dict | None) -> list[str]:
    """The lesion-level section (skain.evaluation.lesions.lesion_level): one answer per lesion."""
    if not level:
        return []
    mel = level.get("melanoma", {})
    lines = ["", "## Per lesion", "",
             f"{level['lesions']} lesions ({level['images']} images; {level['multi_image_lesions']} lesions with "
             f"several images). A lesion's answer: {level['rule']}; the same decision rule as an image's.", "",
             "| metric | value |", "|---|---|",
             f"| **balanced accuracy** | **{_f(level['balanced_accuracy'])}** |",
             f"| macro AUC (one vs rest) | {_f(level['macro_auc'])} |",
             f"| melanoma sensitivity | {_f(mel.get('sensitivity'))} |",
             f"| melanoma specificity | {_f(mel.get('specificity'))} |"]
    lines += interval_lines(level.get("intervals"), list(level.get("per_class") or []) or None)
    vs = level.get("vs_image_level")
    if vs:
        level_pct = int(round(100 * vs["level"]))
        lines += ["", f"Image level (A) against lesion level (B) on the {vs['lesions']} lesions with several images "
                  f"({vs['images']} images), paired over the same {vs['resamples']} lesion resamples:", "",
                  f"| metric | image level | lesion level | B - A | {level_pct}% interval (paired) |", "|---|---|---|---|---|"]
        for key in ("balanced_accuracy", "macro_auc", "melanoma_auc"):
            m = vs["metrics"].get(key)
            if m:
                lo, hi = m["ci"]
                lines.append(f"| {key.replace('_', ' ')} | {_f(m['a'])} | {_f(m['b'])} | {m['difference']:+.4f} | "
                             f"{lo:+.4f} - {hi:+.4f} |")
    return lines


def trust_markdown(trust: dict) -> str:
    """The trust section: these images with and without metadata, beside the model's own validation figures."""
    if not trust.get("runs"):
        return ""
    lines = ["", "## Trust on these images", "",
             f"Measured on the {trust.get('measured_on', 'images above')}. 'without metadata' = age, sex and site "
             "left blank for every image; every image here is a real lesion, so each OOD rejection is a false one. "
             "Triage uses the bundle's threshold (sensitivity = malignant lesions flagged 'investigate further').", ""]
    return "\n".join(lines + trust_table(trust["runs"]) + [""])
