"""`skain decide`: choose the decision rule's tau on out-of-fold predictions of `skain train --all-folds`
(with its nested estimate) and optionally store it in a bundle. The rule itself is `skain.inference.decision`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from skain.data.schema import CLASSES
from skain.inference.decision import log_prior_from_counts, nested_estimate
from skain.modelfile.bundle import atomic_torch_save
from skain.modelfile.load import read_bundle, resolve_path

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
        atomic_torch_save(bundle, path)
        log.info("decision rule tau=%.2f stored in %s", result["tau"], path)
    return result
