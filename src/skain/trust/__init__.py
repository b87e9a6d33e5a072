"""Trustworthy outputs: calibrated probabilities, out-of-distribution rejection, malignancy triage, model card.

`fit_trust(...)` runs after training on the validation split (never test data) and stores everything in the
bundle; `TrustLayer.from_bundle(...)` is what prediction applies.
"""
from .fitting import TrustSettings, after_training, fit_trust, fit_trust_folder, fit_views, fit_views_folder
from .runtime import NOT_DERMOSCOPIC, TrustLayer

__all__ = ["NOT_DERMOSCOPIC", "TrustLayer", "TrustSettings", "after_training", "fit_trust", "fit_trust_folder",
           "fit_views", "fit_views_folder"]
