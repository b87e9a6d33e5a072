"""benchmarks/accuracy/reencode_effect.py's paired figures: the share of decisions a copy keeps, its change in
balanced accuracy and in the share turned away, with intervals that pair the copy with the original."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from benchmarks.accuracy.reencode_effect import against_original, figures_with_intervals, sample

from skain.data.schema import CLASSES
from skain.trust.triage import INVESTIGATE, ROUTINE


def predictions(ids: list[str], decided: list[str], ood: list[bool]) -> pd.DataFrame:
    rows = []
    for image_id, label, rejected in zip(ids, decided, ood):
        probs = {f"p_{c}": (0.94 if c == label else 0.01) for c in CLASSES}
        rows.append({"image_id": image_id, "pred": label, "prob": 0.94, "ood": rejected,
                     "triage": INVESTIGATE if label in ("mel", "bcc", "akiec") else ROUTINE, **probs})
    return pd.DataFrame(rows)


@pytest.fixture
def frame() -> pd.DataFrame:
    dx = ["nv"] * 6 + ["mel"] * 4 + ["bkl"] * 2
    return pd.DataFrame({"image_id": [f"I{i}" for i in range(12)], "dx": dx,
                         "lesion_id": [f"L{i // 2}" for i in range(12)]})


def test_a_copy_that_changes_nothing_keeps_every_decision_and_meets_the_bar(frame):
    pred = predictions(list(frame["image_id"]), list(frame["dx"]), [False] * 12)
    a = sample(pred, frame)
    out = against_original(a, sample(pred.sample(frac=1, random_state=0), frame), frame["lesion_id"].to_numpy(), 200)
    assert out["same_decision"] == {"value": 1.0, "ci": [1.0, 1.0]}
    assert out["balanced_accuracy_change"]["value"] == 0.0 and out["ood_rise_points"]["value"] == 0.0
    assert all(out["meets_bar"].values())


def test_changed_decisions_and_rejections_are_counted_against_the_original(frame):
    ids, lesions = list(frame["image_id"]), frame["lesion_id"].to_numpy()
    original = sample(predictions(ids, list(frame["dx"]), [False] * 12), frame)
    decided = list(frame["dx"])
    decided[6] = decided[7] = "nv"        # one melanoma lesion (two images) now called a naevus
    ood = [False] * 11 + [True]           # one image turned away
    copy = sample(predictions(ids, decided, ood), frame)
    out = against_original(original, copy, lesions, 500)
    assert out["same_decision"]["value"] == round(10 / 12, 4)
    lo, hi = out["same_decision"]["ci"]
    assert lo < 10 / 12 <= hi <= 1.0
    # melanoma recall 4/4 -> 2/4 over three classes present: balanced accuracy 1 -> (1 + 0.5 + 1) / 3
    assert out["balanced_accuracy_change"]["value"] == pytest.approx(-0.5 / 3, abs=1e-4)
    assert out["ood_rise_points"]["value"] == pytest.approx(100 / 12, abs=1e-2)
    assert out["triage_sensitivity_change"]["value"] == pytest.approx(-0.5)
    assert out["meets_bar"] == {"same_decision": False, "balanced_accuracy": False, "ood": False}
    figures = figures_with_intervals(copy, lesions, 200)
    assert figures["triage_sensitivity"]["value"] == 0.5
    low, high = figures["balanced_accuracy"]["ci"]
    assert low <= figures["balanced_accuracy"]["value"] <= high


def test_an_image_left_unpredicted_is_an_error_not_a_silent_drop(frame):
    pred = predictions(list(frame["image_id"])[:-1], list(frame["dx"])[:-1], [False] * 11)
    with pytest.raises(SystemExit, match="1 images were not predicted"):
        sample(pred, frame)


def test_the_sample_follows_the_frames_order_not_the_predictions(frame):
    pred = predictions(list(frame["image_id"]), list(frame["dx"]), [False] * 12).iloc[::-1]
    s = sample(pred, frame)
    assert np.array_equal(s.pred, s.labels)


def test_a_cautious_triage_threshold_keeps_the_target_sensitivitys_lower_bound():
    """benchmarks/accuracy/triage_heldout.py: at confidence 0.5 about the point estimate; asking for more
    confidence lowers the threshold, flagging more positives than the target needs."""
    from benchmarks.accuracy.triage_heldout import cautious_threshold
    p = np.linspace(0.01, 0.99, 100)
    positive = np.ones(100, dtype=bool)
    plain = cautious_threshold(p, positive, 0.90, 0.5)
    strict = cautious_threshold(p, positive, 0.90, 0.95)
    assert strict < plain
    assert 0.86 <= (p >= plain).mean() <= 0.92  # about 90% of the positives flagged
    assert (p >= strict).mean() >= 0.94         # 100 positives: the 95% lower bound of >= 90% needs about 95 of them


def test_two_models_kept_decisions_are_compared_on_the_same_resamples(frame, tmp_path):
    """benchmarks/accuracy/kept_between_models: A keeps 10 of 12 decisions on the copy, B keeps all 12; the paired
    difference is +2/12 and its interval never crosses zero (B never keeps fewer on any resample)."""
    from benchmarks.accuracy.kept_between_models import aligned, compare_copy
    ids, lesions, truth = list(frame["image_id"]), frame["lesion_id"].to_numpy(), list(frame["dx"])
    changed = list(truth)
    changed[6] = changed[7] = "nv"  # one melanoma lesion's two images
    for folder, copy in (("a", changed), ("b", truth)):
        (tmp_path / folder).mkdir()
        predictions(ids, truth, [False] * 12).to_csv(tmp_path / folder / "original.csv", index=False)
        predictions(ids, copy, [False] * 12).sample(frac=1, random_state=1).to_csv(
            tmp_path / folder / "phone.csv", index=False)  # row order must not matter
    a, b = (aligned(tmp_path / f, "original", frame) for f in ("a", "b"))
    out = compare_copy(a, aligned(tmp_path / "a", "phone", frame), b, aligned(tmp_path / "b", "phone", frame),
                       lesions, 500)
    assert out["kept_a"]["value"] == round(10 / 12, 4) and out["kept_b"] == {"value": 1.0, "ci": [1.0, 1.0]}
    assert out["kept_difference"]["value"] == round(2 / 12, 4)
    assert 0 <= out["kept_difference"]["ci"][0] <= 2 / 12 <= out["kept_difference"]["ci"][1]
    assert out["balanced_accuracy"]["difference"]["value"] == pytest.approx(0.5 / 3, abs=1e-4)
    with pytest.raises(SystemExit, match="1 images were not predicted"):
        pd.read_csv(tmp_path / "a" / "phone.csv").iloc[1:].to_csv(tmp_path / "a" / "phone.csv", index=False)
        aligned(tmp_path / "a", "phone", frame)


def test_a_rule_redecides_the_predictions_from_their_own_probabilities():
    """kept_between_models --rule-a/--rule-b: the same predictions named by another rule. A borderline nv/mel
    image (p 0.55 / 0.40) is nv at arg-max and mel once the nv prior weighs against it; triage and OOD stay."""
    from benchmarks.accuracy.kept_between_models import redecided
    pred = predictions(["I0", "I1"], ["nv", "mel"], [False, True])
    pred.loc[0, [f"p_{c}" for c in CLASSES]] = [0.01, 0.01, 0.01, 0.01, 0.40, 0.55, 0.01]
    prior = np.log([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    assert redecided(pred, None) is pred
    assert list(redecided(pred, {"tau": 0.0})["pred"]) == ["nv", "mel"]
    rule = {"tau": 0.5, "log_prior": prior.tolist(), "classes": list(CLASSES)}
    out = redecided(pred, rule)
    assert list(out["pred"]) == ["mel", "mel"]
    assert out[["ood", "triage"]].equals(pred[["ood", "triage"]]) and list(pred["pred"]) == ["nv", "mel"]


def test_tau_on_validation_pairs_one_models_predictions_under_two_rules(frame, trained, tmp_path):
    """benchmarks/accuracy/tau_on_validation: the stored predictions (arg-max here) against the same probabilities
    under the rule a `skain decide --validation` bundle holds; a bundle without such a rule is refused."""
    import shutil

    import torch
    from benchmarks.accuracy.tau_on_validation import chosen, entry
    ids, truth = list(frame["image_id"]), list(frame["dx"])
    (tmp_path / "pred").mkdir()
    pred = predictions(ids, truth, [False] * 12)
    pred.loc[6, [f"p_{c}" for c in CLASSES]] = [0.01, 0.01, 0.01, 0.01, 0.40, 0.55, 0.01]  # a melanoma called nv
    pred.loc[6, "pred"] = "nv"
    pred.to_csv(tmp_path / "pred" / "original.csv", index=False)
    own = tmp_path / "own"
    shutil.copytree(trained, own)
    with pytest.raises(SystemExit, match="skain decide --validation"):
        chosen(str(own))
    bundle = torch.load(own / "best_model.pt", map_location="cpu", weights_only=True)
    bundle["decision"] = {"rule": "argmax log p - tau * log prior", "tau": 0.5, "classes": list(CLASSES),
                          "log_prior": np.log([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02]).tolist(),
                          "cross_fitted_balanced_accuracy": {"adjusted": {"mean": 0.7}}}
    torch.save(bundle, own / "best_model.pt")
    out = entry(frame, "m", tmp_path / "pred", str(own), ("ref", tmp_path / "pred"), 200)
    assert out["own_rule"]["tau"] == 0.5 and out["own_rule"]["cross_fitted"]["adjusted"]["mean"] == 0.7
    ba = out["same_predictions_two_taus"]["original"]["balanced_accuracy"]
    assert ba["a"] == pytest.approx((1 + 0.75 + 1) / 3, abs=1e-4) and ba["b"] == 1.0  # the rule names it mel
    against = out["against_reference"]["original"]["balanced_accuracy"]
    assert against["difference"]["value"] == pytest.approx(ba["b"] - ba["a"], abs=1e-4)


def test_fast_parity_counts_each_disagreement_and_the_largest_differences():
    """benchmarks/accuracy/fast_parity.py, behind the web app's "fast" default: one changed decision out of four is
    75% kept; the largest probability, p(malignant) and relative OOD-score differences are the worst image's."""
    from benchmarks.accuracy.fast_parity import agreement

    from skain.inference.predictor import Prediction

    def answer(dx: str, p_mel: float, ood: float, in_dist: bool = True) -> Prediction:
        probs = {c: 0.0 for c in CLASSES} | {"mel": p_mel, "nv": 1 - p_mel}
        return Prediction(dx, probs[dx], probs, p_malignant=p_mel, triage=INVESTIGATE if p_mel > 0.3 else ROUTINE,
                          ood_score=ood, in_distribution=in_dist)

    ref = [answer("nv", 0.1, 0.5), answer("mel", 0.6, 0.8), answer("nv", 0.2, 2.0, False), answer("nv", 0.29, 1.0)]
    fast = [answer("nv", 0.1, 0.5), answer("mel", 0.6, 0.8), answer("nv", 0.2, 2.2, False), answer("mel", 0.31, 1.0)]
    got = agreement(ref, fast)
    assert got["same_decision"] == got["same_triage"] == 0.75 and got["same_in_distribution"] == 1.0
    assert got["max_probability_difference"] == pytest.approx(0.02)
    assert got["max_p_malignant_difference"] == pytest.approx(0.02)
    assert got["max_relative_ood_score_difference"] == pytest.approx(0.1)
