"""`skain decide --validation --model RUN`: choose the decision rule's tau for one model on its own validation
split, through the inference it runs by default (its TTA views and their temperature), for a model that has no
out-of-fold predictions: one network trained on one split, or an ensemble of networks trained on it.

A rule taken over from another model (`--rule-from`) keeps that model's tau, which suits networks whose
probabilities are as sharp as the source's. Networks trained otherwise need their own: on the held-out split of
docs/robustness.md an ensemble of `--consistency 10` networks scored balanced accuracy 0.729 on its test fold with
the shipped file's tau 0.45 and 0.753 with the tau 0.75 its validation split chose (the photo-augment ensemble's
validation split chose 0.50, beside the 0.45 its recipe's out-of-fold predictions chose).

The validation split also chose the epoch and the temperature, and now tau: figures of it stored beside the rule
are therefore in-sample for tau, and say so. The estimate that is not is cross-fitted: each lesion-grouped half of
the validation split scored with the tau the other half chooses. A `--holdout` run answering with one view stores
its test fold's figures instead (chose nothing).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score

from skain.data.images import ImageLoader
from skain.data.schema import DataError
from skain.engine import resolve_device
from skain.inference.decision import adjusted_pred, fit_tau, log_prior_from_counts
from skain.inference.predictor import default_views
from skain.modelfile.bundle import BUNDLE_NAME, atomic_torch_save
from skain.modelfile.load import read_bundle
from skain.training.decide import rule_figures_from_table, store_rule_figures, views_temperature
from skain.training.runfolder import CONFIG_NAME, METRICS_NAME, SPLIT_NAME, TEST_PREDICTIONS
from skain.training.trust_fit import folder_split, lesion_ids, tta_outputs
from skain.trust.crossfit import TrustSettings, halves
from skain.trust.modelcard import write_card

log = logging.getLogger(__name__)

RULE = "argmax log p - tau * log prior"
CROSS_FITTED = "each lesion-grouped half of the validation split scored with the tau the other half chooses"


def require_every_class(labels: pd.Series, classes: list[str]) -> None:
    """Refuse, before any inference, a validation split missing a class: balanced accuracy would not weigh that
    class, so the tau chosen could name it as often as it liked."""
    missing = [c for c in classes if not (labels == c).any()]
    if missing:
        raise DataError(f"the validation split holds no image of {', '.join(missing)}: a tau chosen there would "
                        "not weigh those classes. Train with more data, or use `skain train --all-folds` and "
                        "`skain decide --oof`")


def cross_fitted(probs: np.ndarray, labels: np.ndarray, log_prior: np.ndarray, parts: list[np.ndarray] | None) -> dict | None:
    """Balanced accuracy of each half under the tau the other half chose (and at arg-max): {argmax, rule} as
    {mean, std} over the two halves (the shape of the nested estimate), with each half's tau and size."""
    if not parts:
        return None
    rows = []
    for i, inside in enumerate(parts):
        other = parts[1 - i]
        tau = fit_tau(probs[other], labels[other], log_prior)
        rows.append({"tau": tau, "n": int(len(inside)),
                     "argmax": float(balanced_accuracy_score(labels[inside], probs[inside].argmax(1))),
                     "adjusted": float(balanced_accuracy_score(labels[inside], adjusted_pred(probs[inside], log_prior, tau)))})
    table = pd.DataFrame(rows)
    return {"how": CROSS_FITTED, "halves": rows,
            "argmax": {"mean": float(table["argmax"].mean()), "std": float(table["argmax"].std())},
            "adjusted": {"mean": float(table["adjusted"].mean()), "std": float(table["adjusted"].std())}}


def fit_on_validation(model: str | Path, cache_dir: str | Path | None = None, device: str = "cpu",
                      progress: bool = False, seed: int = 0) -> dict:
    """`skain decide --validation --model RUN`: choose tau on RUN's validation split through its default
    inference, with the log prior of its training split's labels; store the rule, its cross-fitted estimate and
    its (in-sample) validation figures in RUN's bundle and model card. Returns the stored rule."""
    out = Path(model)
    if not out.is_dir():
        raise ValueError(f"{model}: --validation needs a training or ensemble output folder (its split), not a file")
    if not (out / BUNDLE_NAME).is_file() or not ((out / CONFIG_NAME).is_file() or (out / METRICS_NAME).is_file()):
        raise ValueError(f"{model}: not a training or ensemble output folder ({BUNDLE_NAME} beside {CONFIG_NAME} and "
                         f"{SPLIT_NAME}, or an ensemble's {METRICS_NAME}): --validation needs the split it was trained on")
    frame, train_idx, val_idx, cfg = folder_split(out)
    bundle = read_bundle(out / BUNDLE_NAME)
    classes = list(bundle["classes"])
    require_every_class(frame.iloc[val_idx]["dx"], classes)
    views = default_views(bundle)
    temperature = views_temperature(bundle, views)  # refused here, before inference, when none is fitted
    log.info("decision rule: %d validation images x %d view(s), temperature %.3f", len(val_idx), views, temperature)
    # the views the model answers with, metadata as entered: the trust fit's own path (`skain predict --tta`'s mean)
    va = tta_outputs(bundle, frame.iloc[val_idx], ImageLoader(cfg["preprocess"]["resize"], cache_dir),
                     resolve_device(device), views, TrustSettings(), progress)
    logits, labels = va.logits, va.labels
    probs = torch.from_numpy(logits / temperature).softmax(1).numpy()
    log_prior = log_prior_from_counts(frame.iloc[train_idx]["dx"].value_counts().to_dict(), classes)
    tau = fit_tau(probs, labels, log_prior)
    held = cross_fitted(probs, labels, log_prior, halves(frame.iloc[val_idx].reset_index(drop=True), seed))
    bundle["decision"] = {"rule": RULE, "tau": tau, "log_prior": [float(x) for x in log_prior], "classes": classes,
                          "fit_on": f"{len(val_idx)} validation images of this model's own split, "
                                    f"{'a single view' if views == 1 else f'{views} TTA views'} (the inference it "
                                    "runs by default); prior from its training split's labels",
                          **({"cross_fitted_balanced_accuracy": held} if held else {})}
    # a --holdout run's test fold chose nothing, tau included: its figures where they are of the same inference
    # (the single view the run scored it with), else the validation split's, which say they chose tau
    on_test = rule_figures_from_table(bundle, out, TEST_PREDICTIONS, "test") if views == 1 else None
    if on_test is None:
        store_rule_figures(bundle, logits, labels, "validation_tau", views=views, groups=lesion_ids(frame, val_idx))
    atomic_torch_save(bundle, out / BUNDLE_NAME)
    if bundle.get("model_card"):
        write_card(out, bundle["model_card"])
    stored = bundle["decision"]["validation"]
    log.info("decision rule tau=%.2f stored in %s (%s balanced accuracy %.4f with it, %.4f at arg-max%s%s)", tau,
             out / BUNDLE_NAME, stored["split"], stored["balanced_accuracy"], stored["argmax"]["balanced_accuracy"],
             ", in-sample for tau" if stored["split"] == "validation" else ", chose nothing",
             f"; cross-fitted {held['adjusted']['mean']:.4f} against {held['argmax']['mean']:.4f}" if held else "")
    return bundle["decision"]
