"""`skain decide`: choose the decision rule's tau on out-of-fold predictions of `skain train --all-folds`
(with its nested estimate) and optionally store it in a bundle. The rule itself is `skain.inference.decision`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from skain.data.schema import CLASSES
from skain.evaluation.bootstrap import Sample, bootstrap
from skain.inference.decision import Decision, figures, log_prior_from_counts, nested_estimate
from skain.modelfile.bundle import atomic_torch_save
from skain.modelfile.load import model_id, read_bundle, resolve_path
from skain.training.cvreport import oof_lesions
from skain.training.runfolder import TEST_PREDICTIONS, VAL_PREDICTIONS
from skain.trust.modelcard import write_card

# Where the rule's figures come from, said beside them wherever they are shown (bundle, page, /api/model, card).
MEASURED_ON = {
    "test": "test fold: lesions held out of training that chose nothing (not the epoch, temperature or tau)",
    "validation": "validation split: lesions held out of training; they chose the epoch and the temperature the "
                  "rule applies to (tau was chosen on other predictions), so these figures flatter the model a little",
    "validation_tau": "validation split: lesions held out of training; they chose the epoch, the temperature and "
                      "tau itself, so these figures flatter the model (the cross-fitted estimate does not)",
}

log = logging.getLogger(__name__)


def fit_from_oof(oof_csv: str | Path, model: str | Path | None = None) -> dict:
    """`skain decide`: fit tau on out-of-fold predictions (nested estimate included); with `model`, store the
    rule in that bundle so `skain predict`, the API and the web app name classes by it."""
    oof = pd.read_csv(oof_csv)
    missing = [c for c in ("dx", "fold", *(f"p_{c}" for c in CLASSES)) if c not in oof.columns]
    if missing:
        raise ValueError(f"{oof_csv}: not out-of-fold predictions of `skain train --all-folds` "
                         f"(missing {', '.join(missing)})")
    counts = oof["dx"].value_counts().to_dict()
    result = nested_estimate(oof, log_prior_from_counts(counts))
    if model is not None:
        path = resolve_path(model)
        bundle = read_bundle(path)
        bundle["decision"] = {k: result[k] for k in ("rule", "tau", "log_prior", "classes", "fit_on")}
        bundle["decision"]["nested_balanced_accuracy"] = {"argmax": result["balanced_accuracy_argmax"],
                                                          "adjusted": result["balanced_accuracy_adjusted"]}
        stored = rule_figures_from_run(bundle, path.parent)
        atomic_torch_save(bundle, path)
        log.info("decision rule tau=%.2f stored in %s%s", result["tau"], path,
                 f" (validation figures under the rule: balanced accuracy {stored['balanced_accuracy']:.4f}, "
                 f"arg-max {stored['argmax']['balanced_accuracy']:.4f}, on {stored['n']} {stored['split']} images)"
                 if stored else "; no predictions of its run beside it, so no figures under the rule")
        if stored and bundle.get("model_card"):
            write_card(path.parent, bundle["model_card"])
    return result


def take_rule(source: str | Path, model: str | Path) -> dict:
    """`skain decide --rule-from SOURCE --model M`: store SOURCE's decision rule (tau and log prior, as chosen on
    SOURCE's out-of-fold predictions) in M unchanged, for a model of the same classes that has no out-of-fold
    predictions of its own (e.g. networks trained on one split). The rule is not refit, and SOURCE's nested
    cross-validation figures are not M's: they are kept under `taken_from`, named by SOURCE's model id, and M's
    own figures under the rule come from its run's predictions (or later from `skain calibrate --tta N --default`)."""
    src_path, path = resolve_path(source), resolve_path(model)
    rule, bundle = dict(read_bundle(src_path).get("decision") or {}), read_bundle(path)
    if not rule:
        raise ValueError(f"{source}: holds no decision rule to take over")
    if list(rule.get("classes") or []) != list(bundle["classes"]):
        raise ValueError(f"{source} decides between {rule.get('classes')}, {model} between {bundle['classes']}")
    # a rule that was itself taken over names the model it was chosen on, not the one it passed through
    origin = rule.get("taken_from") or {"model_id": model_id(src_path), "fit_on": rule.get("fit_on"),
                                        "nested_balanced_accuracy": rule.get("nested_balanced_accuracy")}
    bundle["decision"] = {k: rule[k] for k in ("rule", "tau", "log_prior", "classes")}
    bundle["decision"]["fit_on"] = (f"taken over unchanged from model {origin['model_id']} (chosen there on "
                                    f"{origin['fit_on']}); not refit on this model's predictions")
    bundle["decision"]["taken_from"] = origin
    stored = rule_figures_from_run(bundle, path.parent)
    atomic_torch_save(bundle, path)
    if bundle.get("model_card"):
        write_card(path.parent, bundle["model_card"])
    log.info("decision rule tau=%.2f of %s stored in %s (%s)", float(rule["tau"]), src_path, path,
             f"validation balanced accuracy under it {stored['balanced_accuracy']:.4f}" if stored
             else "no predictions of its run beside it: its figures come with skain calibrate --tta N --default")
    return bundle["decision"]


def store_rule_figures(bundle: dict, logits: np.ndarray, labels: np.ndarray, split: str,
                       views: int = 1, groups: np.ndarray | None = None) -> dict | None:
    """Put the figures of the decision the bundle makes (its rule, arg-max beside it) on held-out rows into
    `bundle["decision"]["validation"]` and the model card, from raw logits of `views` TTA views and the
    temperature fit for that many views (what the Predictor does), with their 95% intervals (`rule_intervals`;
    `groups`: each row's lesion id, else images are resampled). `split` names the rows (a key of MEASURED_ON;
    "validation_tau": validation rows that also chose tau). No decision rule: nothing to do (the bundle's
    metrics are already arg-max figures)."""
    if not bundle.get("decision"):
        return None
    classes = list(bundle["classes"])
    temperature = views_temperature(bundle, views)
    probs = (torch.from_numpy(np.asarray(logits, dtype=np.float64)) / temperature).softmax(1).numpy()
    decision = Decision(bundle["decision"], classes)
    rows = "validation" if split == "validation_tau" else split
    result = {**figures(probs, labels, decision, classes), "split": rows,
              "temperature": temperature, "views": int(views), "measured_on": MEASURED_ON[split],
              "intervals": rule_intervals(probs, labels, decision(probs), classes, rows, int(views), groups)}
    bundle["decision"]["validation"] = result
    if bundle.get("model_card"):
        bundle["model_card"]["decision"] = result
    return result


def views_temperature(bundle: dict, views: int) -> float:
    """The temperature the Predictor applies to `views` TTA views averaged: the single-view trust block's for one
    view, else the block `skain calibrate --tta N` fitted (refused when there is none)."""
    trust = bundle.get("trust") or {}
    block = trust.get("views", {}).get(str(int(views))) if views > 1 else None
    if views > 1 and block is None:
        raise ValueError(f"no trust block fitted for {views} TTA views: skain calibrate --tta {views} first")
    return float((block or trust).get("temperature", 1.0))


def rule_intervals(probs: np.ndarray, labels: np.ndarray, pred: np.ndarray, classes: list[str], split: str,
                   views: int, groups: np.ndarray | None = None, resamples: int = 2000, seed: int = 0) -> dict:
    """95% bootstrap intervals of the rule's figures: balanced accuracy and recall of the rule's decisions
    `pred`, AUCs and ECE of the calibrated probabilities they were made from; lesions (`groups`) resampled
    within their diagnosis where known, else images (`evaluation.bootstrap`, the shape `metrics["intervals"]`
    has)."""
    sample = Sample(np.asarray(labels, dtype=int), probs, np.asarray(pred, dtype=int),
                    mel=classes.index("mel") if "mel" in classes else None)
    lesions = None if groups is None else np.asarray(groups).astype(str)
    of = (f"the decision rule's decisions over {f'{views} TTA views' if views > 1 else 'a single view'} "
          "(AUCs and ECE: the calibrated probabilities it decides from)")
    return {"split": split, "of": of, **bootstrap(sample, lesions, resamples, seed)}


def rule_figures_from_run(bundle: dict, run_dir: Path) -> dict | None:
    """store_rule_figures from the per-image predictions `skain train` wrote beside the bundle: the test fold's
    (chose nothing) where there is one, else the validation split's, lesions resampled for the intervals where
    the table or the run's split.csv names them. None when neither file is there."""
    for name, split in ((TEST_PREDICTIONS, "test"), (VAL_PREDICTIONS, "validation")):
        stored = rule_figures_from_table(bundle, run_dir, name, split)
        if stored is not None:
            return stored
    return None


def rule_figures_from_table(bundle: dict, run_dir: Path, name: str, split: str) -> dict | None:
    """store_rule_figures from one per-image predictions table of the run (single-view logits, as `skain train`
    writes them); None when it is not there or holds no labelled rows with logits."""
    table = run_dir / name
    if not table.is_file():
        return None
    frame = pd.read_csv(table)
    columns = [f"logit_{c}" for c in bundle["classes"]]
    if "dx" not in frame.columns or any(c not in frame.columns for c in columns):
        return None
    frame = frame.dropna(subset=["dx", *columns])
    index = {c: i for i, c in enumerate(bundle["classes"])}
    frame = frame[frame["dx"].isin(index)]
    if frame.empty:
        return None
    lesions = (frame["lesion_id"].astype(str).to_numpy() if "lesion_id" in frame
               else oof_lesions([run_dir], frame["image_id"]) if "image_id" in frame else None)
    return store_rule_figures(bundle, frame[columns].to_numpy(), frame["dx"].map(index).to_numpy(), split,
                              groups=lesions)
