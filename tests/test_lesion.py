"""One answer per lesion: the log-probability mean, the OOD and unreadable-image rules, the same decision rule and
trust layer as an image's, `skain predict --per-lesion` and lesion-level figures in the reports."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from skain.cli import main
from skain.data.schema import CLASSES
from skain.evaluation.bootstrap import Sample, lesion_counts, metric_values, paired_levels
from skain.evaluation.lesions import lesion_level, lesion_truth
from skain.inference.decision import Decision, log_prior_from_counts
from skain.inference.lesion import lesion_log_mean, lesion_table
from skain.trust.runtime import TrustLayer
from skain.trust.triage import INVESTIGATE

P_COLS = [f"p_{c}" for c in CLASSES]


def test_lesion_mean_is_the_renormalised_geometric_mean_in_order_of_first_image():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    ids, counts, mean = lesion_log_mean(probs, np.array(["b", "a", "b", "b"]))
    assert list(ids) == ["b", "a"] and list(counts) == [3, 1]
    geo = np.prod(probs[[0, 2, 3]], axis=0) ** (1 / 3)
    assert mean[0] == pytest.approx(geo / geo.sum(), abs=1e-12)
    assert mean[1] == pytest.approx(probs[1], abs=1e-12)  # one image: its own probabilities
    assert not np.allclose(mean[0], probs[[0, 2, 3]].mean(0))  # not the plain mean of probabilities
    with pytest.raises(ValueError, match="one lesion id per row"):
        lesion_log_mean(probs, np.array(["a"]))


def _table(probs, ood=None, scores=None):
    t = pd.DataFrame(probs, columns=P_COLS).assign(image_id=[f"img{i}" for i in range(len(probs))])
    if ood is not None:
        t["ood"], t["ood_score"] = ood, scores
    return t


def _probs(rng, n):
    z = rng.normal(size=(n, len(CLASSES))) * 2
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


def test_turned_away_and_unreadable_images_and_the_all_rule():
    rng = np.random.default_rng(0)
    probs = _probs(rng, 6)
    probs[5] = np.nan  # unreadable
    ood = [False, True, True, True, False, None]
    pred = _table(probs, ood, [0.5, 1.5, 1.2, 3.0, 0.9, np.nan])
    lesions = np.array(["A", "A", "B", "B", "C", "D"])  # A: one accepted + one rejected, B: both rejected
    out = lesion_table(pred, lesions, CLASSES).set_index("lesion_id")
    assert out.loc["A", "n_images"] == 2 and out.loc["A", "n_averaged"] == 1
    assert np.allclose(out.loc["A", P_COLS].to_numpy(float), probs[0])  # the rejected image left out
    assert out.loc["A", "ood"] is False or out.loc["A", "ood"] == False  # noqa: E712 (numpy bool)
    assert out.loc["A", "ood_score"] == pytest.approx(0.5)
    assert bool(out.loc["B", "ood"]) and out.loc["B", "n_averaged"] == 2 and out.loc["B", "ood_score"] == 1.2
    _, _, both = lesion_log_mean(probs[2:4], np.array(["B", "B"]))
    assert np.allclose(out.loc["B", P_COLS].to_numpy(float), both[0])
    assert out.loc["C", "n_averaged"] == 1 and out.loc["C", "error"] == ""
    assert out.loc["D", "pred"] == "" and np.isnan(out.loc["D", "p_mel"]) and "no readable image" in out.loc["D", "error"]
    assert out.loc["B", "image_ids"] == "img2;img3"


def test_the_models_decision_rule_and_trust_layer_decide_the_lesion():
    rng = np.random.default_rng(1)
    probs = _probs(rng, 400)
    lesions = np.repeat(np.arange(150), [3] * 100 + [2] * 50).astype(str)
    decide = Decision({"tau": 1.0, "log_prior": log_prior_from_counts({"nv": 700, "mel": 100, "bkl": 100}).tolist(),
                       "classes": list(CLASSES)})
    layer = TrustLayer(list(CLASSES), triage_threshold=0.4)
    pred = _table(probs)
    out = lesion_table(pred, lesions, CLASSES, decide, layer)
    mean = out[P_COLS].to_numpy(float)
    chosen = decide(mean)
    assert list(out["pred"]) == list(np.array(CLASSES)[chosen])
    assert (chosen != mean.argmax(1)).any()  # the adjusted rule, not the arg-max, decided some lesions
    assert np.allclose(out[[f"s_{c}" for c in CLASSES]].to_numpy(float), decide.scores(mean))
    mal = mean[:, [CLASSES.index(c) for c in ("mel", "bcc", "akiec")]].sum(1)
    assert np.allclose(out["p_malignant"].to_numpy(float), mal)
    assert list(out["triage"] == INVESTIGATE) == list(mal >= 0.4)
    # a predictions CSV scored without the model: the decision scores give the same lesion decision
    with_scores = pred.assign(**{f"s_{c}": decide.scores(probs)[:, j] for j, c in enumerate(CLASSES)})
    again = lesion_table(with_scores, lesions, CLASSES)
    assert list(again["pred"]) == list(out["pred"]) and "triage" not in again


def test_paired_levels_equal_a_slow_loop_over_the_same_resamples():
    rng = np.random.default_rng(2)
    n_les = 120
    cls = rng.choice(len(CLASSES), n_les)
    sizes = rng.integers(1, 4, n_les)
    groups = np.repeat([f"L{i:03d}" for i in range(n_les)], sizes)
    labels = np.repeat(cls, sizes)
    probs = _probs(rng, len(labels))
    probs[np.arange(len(labels)), labels] += 0.5
    probs /= probs.sum(1, keepdims=True)
    ids, _, mean = lesion_log_mean(probs, groups)
    lesion_labels = cls[[int(i[1:]) for i in ids]]
    images = Sample(labels, probs, probs.argmax(1), mel=CLASSES.index("mel"))
    shuffled = rng.permutation(len(ids))  # any row order of the lesions
    lesions = Sample(lesion_labels[shuffled], mean[shuffled], mean[shuffled].argmax(1), mel=CLASSES.index("mel"))
    res = paired_levels(images, groups, lesions, ids[shuffled], resamples=40, seed=5)
    counts, lesion_of = lesion_counts(labels, groups, 40, seed=5)
    ba = res["metrics"]["balanced_accuracy"]
    assert ba["a"] == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)))
    assert ba["b"] == pytest.approx(balanced_accuracy_score(lesion_labels, mean.argmax(1)))
    pos = {lesion: i for i, lesion in enumerate(ids)}
    column_row = np.array([pos[lesion] for lesion in np.unique(groups)])  # counts' column -> row of `ids`
    diffs = []
    for r in range(40):  # slow: repeat images and lesions as often as the resample drew their lesion
        img = np.repeat(np.arange(len(labels)), counts[r, lesion_of].astype(int))
        les = column_row[np.repeat(np.arange(len(column_row)), counts[r].astype(int))]
        diffs.append(balanced_accuracy_score(lesion_labels[les], mean[les].argmax(1))
                     - balanced_accuracy_score(labels[img], probs[img].argmax(1)))
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    assert ba["ci"] == pytest.approx((lo, hi), abs=1e-9)
    single = metric_values(np.ones((1, len(labels))), images)["balanced_accuracy"][0]
    assert single == pytest.approx(ba["a"])
    with pytest.raises(ValueError, match="each once"):
        paired_levels(images, groups, lesions, ids[shuffled][:-1], resamples=5)


def test_lesion_truth_leaves_out_lesions_whose_images_disagree():
    truth = pd.DataFrame({"image_id": list("abcd"), "dx": ["mel", "mel", "nv", "bkl"], "lesion_id": list("xxyy")})
    dx, conflicting = lesion_truth(truth)
    assert dx.to_dict() == {"x": "mel"} and conflicting == ["y"]


def _lesion_csv(synth_root, tmp_path):
    """The synthetic test set's CSV (1-3 images per lesion), checked to hold lesions of several images."""
    frame = pd.read_csv(synth_root / "dataset_test" / "text" / "metadata.csv")
    sizes = frame.groupby("lesion_id").size()
    assert (sizes > 1).sum() >= 3 and (sizes == 1).any()
    return frame


def test_predict_per_lesion_writes_one_row_per_lesion_and_reports_both_levels(trained, synth_root, tmp_path):
    frame = _lesion_csv(synth_root, tmp_path)
    out = tmp_path / "lesions.csv"
    assert main(["predict", "--data", str(synth_root / "dataset_test"), "--model", str(trained), "--per-lesion",
                 "--output", str(out), "--report", str(tmp_path / "rep"), "--no-progress"]) == 0
    lesions = pd.read_csv(out, keep_default_na=False, na_values=[""])
    images = pd.read_csv(tmp_path / "lesions_images.csv", keep_default_na=False, na_values=[""])
    assert len(images) == len(frame) and sorted(lesions["lesion_id"]) == sorted(frame["lesion_id"].unique())
    assert lesions["n_images"].sum() == len(frame)
    by_image = images.merge(frame[["image_id", "lesion_id"]], on="image_id")
    ids, counts, mean = lesion_log_mean(by_image[P_COLS].to_numpy(), by_image["lesion_id"].to_numpy())
    got = lesions.set_index("lesion_id").loc[ids]
    assert list(got["n_images"]) == list(counts)
    assert np.allclose(got[P_COLS].to_numpy(float), mean, atol=1e-6)
    assert list(got["pred"]) == list(np.array(CLASSES)[mean.argmax(1)])  # the tiny model's rule is the arg-max
    assert {"p_malignant", "triage", "ood", "image_ids"} <= set(lesions.columns)
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    level = metrics["lesion_level"]
    truth = frame.groupby("lesion_id")["dx"].first().loc[ids]
    assert level["lesions"] == len(ids) and level["multi_image_lesions"] == int((counts > 1).sum())
    assert level["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, got["pred"]), abs=1e-12)
    assert level["intervals"]["unit"] == "lesion" and "ci" in level["intervals"]["metrics"]["balanced_accuracy"]
    vs = level["vs_image_level"]
    assert vs["lesions"] == level["multi_image_lesions"] and vs["images"] == int(counts[counts > 1].sum())
    assert "## Per lesion" in (tmp_path / "rep" / "report.md").read_text()
    # skain evaluate on the per-image predictions gives the same lesion-level figures without the model
    assert main(["evaluate", "--predictions", str(tmp_path / "lesions_images.csv"), "--csv",
                 str(synth_root / "dataset_test" / "text" / "metadata.csv"), "--report", str(tmp_path / "ev")]) == 0
    scored = json.loads((tmp_path / "ev" / "metrics.json").read_text())["lesion_level"]
    assert scored["balanced_accuracy"] == pytest.approx(level["balanced_accuracy"], abs=1e-12)
    assert scored["vs_image_level"]["metrics"]["balanced_accuracy"]["ci"] == pytest.approx(
        vs["metrics"]["balanced_accuracy"]["ci"])


def test_per_lesion_needs_lesion_ids_and_the_skain_format(trained, synth_root, tmp_path, capsys):
    frame = pd.read_csv(synth_root / "dataset_test" / "text" / "metadata.csv")
    frame.drop(columns=["lesion_id"]).to_csv(tmp_path / "no_lesions.csv", index=False)
    args = ["predict", "--csv", str(tmp_path / "no_lesions.csv"), "--images", str(synth_root / "dataset_test" / "image"),
            "--model", str(trained), "--output", str(tmp_path / "p.csv"), "--no-progress"]
    assert main([*args, "--per-lesion"]) == 2
    assert "needs a CSV with a lesion_id column" in capsys.readouterr().err
    assert main([*args[:2], str(synth_root / "dataset_test" / "text" / "metadata.csv"), *args[3:], "--per-lesion",
                 "--format", "isic2018"]) == 2
    assert "one row per image" in capsys.readouterr().err
    # without lesion ids the report has no lesion level
    assert main([*args, "--report", str(tmp_path / "rep")]) == 0
    assert "lesion_level" not in json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert lesion_level(pd.read_csv(tmp_path / "p.csv"), frame[["image_id", "dx"]]) is None
