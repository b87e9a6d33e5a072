"""The balanced-accuracy decision rule: prior adjustment chosen on out-of-fold predictions, applied everywhere."""
import numpy as np
import pandas as pd
import pytest
import torch

from skain.data.schema import CLASSES
from skain.evaluation.evaluate import align, evaluate
from skain.inference.decision import (
    Decision,
    adjusted_pred,
    decision_scores,
    fit_tau,
    nested_estimate,
)


def _oof(seed=0, n=1400):
    """Probabilities from a model that under-calls rare classes: the adjustment has something to fix."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.04, 0.05, 0.11, 0.01, 0.11, 0.66, 0.02])
    labels = rng.choice(7, size=n, p=prior)
    logits = rng.normal(0, 1, (n, 7)) + 2.0 * np.eye(7)[labels] + 1.5 * np.log(prior)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    frame = pd.DataFrame(probs, columns=[f"p_{c}" for c in CLASSES])
    return frame.assign(dx=np.array(CLASSES)[labels], fold=np.arange(n) % 5), np.log(prior)


def test_tau_zero_is_argmax_and_scores_decide_like_the_rule():
    frame, log_prior = _oof()
    probs = frame[[f"p_{c}" for c in CLASSES]].to_numpy()
    assert np.array_equal(adjusted_pred(probs, log_prior, 0.0), probs.argmax(1))
    for tau in (0.3, 1.0):
        assert np.array_equal(decision_scores(probs, log_prior, tau).argmax(1), adjusted_pred(probs, log_prior, tau))
    assert np.allclose(decision_scores(probs, log_prior, 0.7).sum(1), 1.0)


def test_adjustment_raises_balanced_accuracy_when_rare_classes_are_under_called():
    frame, log_prior = _oof()
    result = nested_estimate(frame, log_prior)
    assert result["tau"] > 0.2
    assert result["balanced_accuracy_adjusted"]["mean"] > result["balanced_accuracy_argmax"]["mean"] + 0.03


def test_nested_estimate_never_chooses_a_folds_tau_on_that_fold():
    frame, log_prior = _oof()
    poisoned = frame.copy()
    inside = poisoned["fold"] == 2
    poisoned.loc[inside, "dx"] = "df"  # fold 2's labels changed: fold 2's own tau must not move
    a, b = nested_estimate(frame, log_prior), nested_estimate(poisoned, log_prior)
    assert a["nested"][2]["tau"] == b["nested"][2]["tau"]
    assert a["nested"][2]["log_prior"] == b["nested"][2]["log_prior"]  # nor its prior: the other folds' labels
    assert a["nested"][1]["log_prior"] != b["nested"][1]["log_prior"]
    with pytest.raises(ValueError, match="at least 2 folds"):
        nested_estimate(frame[inside], log_prior)
    assert fit_tau(frame[inside].iloc[:, :7].to_numpy(), np.full(inside.sum(), 3), log_prior) > 0


def test_predictor_names_classes_by_the_bundle_rule(trained, synth_root, tmp_path):
    from skain.evaluation.report import isic2018_table
    from skain.inference.predictor import Predictor, prediction_table
    bundle = torch.load(trained / "best_model.pt", weights_only=True)
    frame, _ = prediction_table(synth_root / "dataset_test")
    plain = Predictor(bundle).predict_frame(frame, progress=False)
    prior = np.full(7, np.log(1 / 7))
    prior[5] = np.log(0.9)  # a large nv prior: the adjusted rule calls nv less often
    bundle["decision"] = {"rule": "argmax log p - tau * log prior", "tau": 3.0, "log_prior": prior.tolist(),
                          "classes": list(CLASSES)}
    adjusted = Predictor(bundle).predict_frame(frame, progress=False)
    probs = adjusted[[f"p_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs, plain[[f"p_{c}" for c in CLASSES]].to_numpy())  # probabilities never change
    want = np.array(CLASSES)[adjusted_pred(probs, prior, 3.0)]
    assert (adjusted["pred"].to_numpy() == want).all()
    assert np.allclose(adjusted["prob"], probs[np.arange(len(probs)), adjusted_pred(probs, prior, 3.0)])
    sub = isic2018_table(adjusted)  # the challenge scores the arg-max of what it is given: the decision
    assert (np.array(["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"])[sub.iloc[:, 1:].to_numpy().argmax(1)]
            == want).all()
    truth = frame[["image_id", "dx"]]
    labels, p, _, decided = align(adjusted, truth)
    assert np.array_equal(np.array(CLASSES)[decided], want) and evaluate(labels, p, decided=decided)["decision"] == "pred column"
    one = Predictor(bundle).predict_one(frame["path"].iloc[0])
    assert one.diagnosis == want[0] and one.probability == pytest.approx(probs[0][CLASSES.index(want[0])], abs=1e-5)


def test_decision_for_other_classes_is_refused():
    with pytest.raises(ValueError, match="other classes"):
        Decision({"tau": 1.0, "log_prior": [0.0] * 3, "classes": ["a", "b", "c"]})
