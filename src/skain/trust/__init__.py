"""Trustworthy outputs: calibrated probabilities, out-of-distribution rejection, malignancy triage, model card.

This package holds the maths and what prediction applies (`skain.trust.runtime.TrustLayer`); it runs no model.
Fitting it after training, which does run the model, lives in `skain.training.trust_fit`.
"""
