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
from skain.inference.decision import Decision, figures, log_prior_from_counts, nested_estimate
from skain.modelfile.bundle import atomic_torch_save
from skain.modelfile.load import read_bundle, resolve_path
from skain.training.runfolder import TEST_PREDICTIONS, VAL_PREDICTIONS
from skain.trust.modelcard import write_card

# Where the rule's figures come from, said beside them wherever they are shown (bundle, page, /api/model, card).
MEASURED_ON = {
    "test": "test fold: lesions held out of training that chose nothing (not the epoch, temperature or tau)",
    "validation": "validation split: lesions held out of training; they chose the epoch and the temperature the "
                  "rule applies to (tau was chosen on other predictions), so these figures flatter the model a little",
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


def store_rule_figures(bundle: dict, logits: np.ndarray, labels: np.ndarray, split: str) -> dict | None:
    """Put the figures of the decision the bundle makes (its rule, arg-max beside it) on held-out rows into
    `bundle["decision"]["validation"]` and the model card, from raw logits and the bundle's temperature (what
    the Predictor does). No decision rule: nothing to do (the bundle's metrics are already arg-max figures)."""
    if not bundle.get("decision"):
        return None
    classes = list(bundle["classes"])
    temperature = float((bundle.get("trust") or {}).get("temperature", 1.0))
    probs = (torch.from_numpy(np.asarray(logits, dtype=np.float64)) / temperature).softmax(1).numpy()
    result = {**figures(probs, labels, Decision(bundle["decision"], classes), classes), "split": split,
              "temperature": temperature, "measured_on": MEASURED_ON[split]}
    bundle["decision"]["validation"] = result
    if bundle.get("model_card"):
        bundle["model_card"]["decision"] = result
    return result


def rule_figures_from_run(bundle: dict, run_dir: Path) -> dict | None:
    """store_rule_figures from the per-image predictions `skain train` wrote beside the bundle: the test fold's
    (chose nothing) where there is one, else the validation split's. None when neither file is there."""
    for name, split in ((TEST_PREDICTIONS, "test"), (VAL_PREDICTIONS, "validation")):
        table = run_dir / name
        if not table.is_file():
            continue
        frame = pd.read_csv(table)
        columns = [f"logit_{c}" for c in bundle["classes"]]
        if "dx" not in frame.columns or any(c not in frame.columns for c in columns):
            continue
        frame = frame.dropna(subset=["dx", *columns])
        index = {c: i for i, c in enumerate(bundle["classes"])}
        frame = frame[frame["dx"].isin(index)]
        if frame.empty:
            continue
        return store_rule_figures(bundle, frame[columns].to_numpy(), frame["dx"].map(index).to_numpy(), split)
    return None
