"""The steps `skain predict` and `skain evaluate --model` share on a folder of images: predict every image
(with metadata as given and, for labelled images, with every field blank for the trust figures, from one
backbone pass), then score the labelled ones and write the report. The commands only parse flags and print.
Where the CSV has `lesion_id`, the lesions are scored too (one answer per lesion, `per_lesion`).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from skain.data.layout import Source
from skain.data.schema import DataError
from skain.engine import default_workers
from skain.evaluation.evaluate import align, evaluate, folder_trust, headline, trust_variants, truth_columns, with_intervals
from skain.evaluation.lesions import lesion_headline, lesion_level
from skain.evaluation.report import write_report
from skain.inference.decision import Decision
from skain.inference.lesion import has_lesions, lesion_table
from skain.inference.predictor import Predictor
from skain.trust.runtime import TrustLayer


def workers(requested: int | None, device: torch.device) -> int:
    return requested if requested is not None else default_workers(device)


def predict_folder(predictor: Predictor, frame: pd.DataFrame, batch_size: int, num_workers: int,
                   cache_dir: Path | None, progress: bool) -> dict[str, pd.DataFrame]:
    """Predictions with metadata as given (`present`); for labelled images also every field blank
    (`all_blank`, for the trust figures), from the same backbone pass."""
    variants = trust_variants(predictor) if "dx" in frame else {"present": set()}
    return predictor.predict_variants(frame, variants, batch_size, num_workers, cache_dir, progress)


def per_lesion(predictor: Predictor, pred: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """`skain predict --per-lesion`: one row per lesion of `frame` (which must have lesion_id), its images'
    predictions `pred` (predict_folder's table, same rows) averaged through the model's decision rule and trust
    layer (skain.inference.lesion)."""
    if not has_lesions(frame):
        raise DataError("--per-lesion needs a lesion_id column in the CSV (which images show the same lesion)")
    return lesion_table(pred, frame["lesion_id"].astype(str).to_numpy(), predictor.classes, predictor.decide,
                        predictor.trust)


def inference_context(predictor: Predictor) -> dict:
    info = predictor.info
    return {"backbone": info["backbone"], **info["inference"]}


def report(pred: pd.DataFrame, truth: pd.DataFrame, folder: Path, context: dict,
           trust: dict | None = None, decide: Decision | None = None, layer: TrustLayer | None = None) -> list[str]:
    """Score predictions against the truth (with lesion-resampled intervals) and, where the truth has lesion_id,
    each lesion's one answer (`decide` / `layer`: the model's decision rule and trust layer, when a model made
    the predictions); write the report folder and return the lines a command prints."""
    labels, probs, info, decided, lesions = align(pred, truth, groups=True)
    metrics = with_intervals(evaluate(labels, probs, decided=decided), labels, probs, decided, lesions)
    level = lesion_level(pred, truth, decide=decide, trust=layer)
    if level:
        metrics["lesion_level"] = level
    write_report(metrics, labels, probs, folder, {**context, **info}, trust)
    lines = [headline(metrics)] + ([lesion_headline(level)] if level else [])
    lines += [f"{name}: " + trust_line(run) for name, run in (trust or {}).get("runs", {}).items()]
    return lines + [f"report: {folder}/report.md"]


def report_model(predictor: Predictor, model: str | Path, frame: pd.DataFrame, source: Source,
                 preds: dict[str, pd.DataFrame], folder: Path) -> list[str]:
    """The report of a model's predictions on labelled images, with its trust figures on them."""
    data = str(source.csv or source.image_dirs[0])
    context = {"model": str(model), "data": data, **inference_context(predictor)}
    return report(preds["present"], truth_columns(frame), folder, context, folder_trust(predictor, frame, data, preds),
                  predictor.decide, predictor.trust)


def trust_line(r: dict) -> str:
    def f(x, pct: bool = False) -> str:
        return "n/a" if x is None else (f"{100 * x:.1f}%" if pct else f"{x:.3f}")
    return (f"balanced accuracy {f(r.get('balanced_accuracy'))}, ECE {f(r.get('ece_before'))} -> "
            f"{f(r.get('ece_after'))}, OOD false rejection {f(r.get('ood_false_rejection'), True)}, triage "
            f"sensitivity {f(r.get('triage_sensitivity'), True)} specificity {f(r.get('triage_specificity'), True)}")
