"""Lesion-level bootstrap intervals and paired comparisons: equal to a slow loop over the same resamples, close
to nominal coverage, narrower when paired, and DeLong's test equal to its definition."""
from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score

from skain.evaluation.bootstrap import (
    Sample,
    auc,
    bootstrap,
    delong,
    ece,
    image_weights,
    interval,
    lesion_counts,
    metric_values,
    paired,
)
from skain.metrics import expected_calibration_error

K = 7


def fake(n_lesions: int = 300, seed: int = 0, skill: float = 1.5, noise: np.ndarray | None = None):
    """Lesions with 1-3 images each; a lesion's images share its class and part of its score noise."""
    rng = np.random.default_rng(seed)
    cls = rng.choice(K, n_lesions, p=[.05, .08, .12, .03, .12, .55, .05])
    sizes = rng.integers(1, 4, n_lesions)
    groups = np.repeat(np.arange(n_lesions), sizes)
    labels = cls[groups]
    lesion_noise = rng.normal(0, 1, (n_lesions, K))[groups]
    logits = lesion_noise + rng.normal(0, 1, (len(labels), K)) + (noise if noise is not None else 0)
    logits[np.arange(len(labels)), labels] += skill
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs, groups.astype(str)


def sample(labels, probs):
    p_mal = probs[:, [0, 1, 4]].sum(1)
    return Sample(labels, probs, probs.argmax(1), flagged=p_mal > 0.3, positive=np.isin(labels, [0, 1, 4]),
                  rejected=probs.max(1) < 0.25, mel=4)


def reference(s: Sample, idx: np.ndarray) -> dict:
    """The metrics of one resample, computed the slow way on the repeated images with scikit-learn."""
    y, p, d = s.labels[idx], s.probs[idx], s.pred[idx]
    out = {"balanced_accuracy": balanced_accuracy_score(y, d),
           "macro_auc": np.mean([roc_auc_score(y == c, p[:, c]) for c in range(K) if 0 < (y == c).sum() < len(y)]),
           "melanoma_auc": roc_auc_score(y == 4, p[:, 4]), "ece": expected_calibration_error(p, y, 15),
           "triage_sensitivity": s.flagged[idx][s.positive[idx]].mean(),
           "triage_specificity": (~s.flagged[idx][~s.positive[idx]]).mean(), "ood_rejection": s.rejected[idx].mean()}
    rec = recall_score(y, d, labels=list(range(K)), average=None, zero_division=0)
    out.update({f"recall_{c}": rec[c] for c in range(K)})
    return out


def test_vectorised_metrics_equal_a_slow_loop_over_the_same_lesion_resamples():
    labels, probs, groups = fake()
    s = sample(labels, probs)
    counts, lesion_of = lesion_counts(labels, groups, 20, seed=3)
    fast = metric_values(image_weights(counts, lesion_of), s)
    for b in range(20):
        idx = np.repeat(np.arange(len(labels)), counts[b][lesion_of].astype(int))  # each image as often as its lesion
        for key, value in reference(s, idx).items():
            assert fast[key][b] == pytest.approx(value, abs=1e-9), key


def test_resamples_keep_each_class_lesion_count_and_move_lesions_whole():
    labels, _, groups = fake()
    counts, lesion_of = lesion_counts(labels, groups, 50, seed=1)
    _, first = np.unique(groups, return_index=True)
    lesion_class = labels[first]
    for c in range(K):
        assert (counts[:, lesion_class == c].sum(1) == (lesion_class == c).sum()).all()
    w = image_weights(counts, lesion_of)
    for g in np.unique(groups)[:20]:  # every image of a lesion carries the lesion's count
        assert (w[:, groups == g] == w[:, groups == g][:, :1]).all()
    again, _ = lesion_counts(labels, groups, 50, seed=1)
    assert np.array_equal(counts, again)  # seeded


def test_intervals_cover_the_population_value_at_about_the_nominal_rate():
    """Draw many test sets of lesions from one population; the 95% interval should hold the population's
    balanced accuracy about 95% of the time (here: 88-99% of 150 draws, 400 resamples each)."""
    big_labels, big_probs, big_groups = fake(60_000, seed=100)
    truth = balanced_accuracy_score(big_labels, big_probs.argmax(1))
    hits = 0
    for i in range(150):
        labels, probs, groups = fake(250, seed=1000 + i)
        r = bootstrap(sample(labels, probs), groups, resamples=400, seed=i)
        lo, hi = r["metrics"]["balanced_accuracy"]["ci"]
        hits += lo <= truth <= hi
    assert 0.88 <= hits / 150 <= 0.99, hits


def test_ignoring_lesions_understates_the_uncertainty():
    labels, probs, groups = fake(400, seed=4)
    s = sample(labels, probs)
    by_lesion = bootstrap(s, groups, resamples=1000, seed=0)["metrics"]["balanced_accuracy"]["ci"]
    by_image = bootstrap(s, None, resamples=1000, seed=0)["metrics"]["balanced_accuracy"]["ci"]
    assert by_lesion[1] - by_lesion[0] > by_image[1] - by_image[0]


def test_paired_interval_is_narrower_than_either_models_own_on_correlated_predictions():
    rng = np.random.default_rng(7)
    labels, probs_a, groups = fake(400, seed=5)
    logits_b = np.log(probs_a) + rng.normal(0, 0.3, probs_a.shape)  # a close sibling of model A
    logits_b[np.arange(len(labels)), labels] += 0.2
    probs_b = np.exp(logits_b) / np.exp(logits_b).sum(1, keepdims=True)
    r = paired(sample(labels, probs_a), sample(labels, probs_b), groups, resamples=1000, seed=0)
    ba = r["metrics"]["balanced_accuracy"]
    width = ba["ci"][1] - ba["ci"][0]
    unpaired = np.hypot(ba["ci_a"][1] - ba["ci_a"][0], ba["ci_b"][1] - ba["ci_b"][0])  # independent samples
    assert width < 0.6 * unpaired
    assert ba["difference"] == pytest.approx(ba["b"] - ba["a"])
    assert ba["difference"] > 0 and ba["ci"][0] > 0 and ba["p_bootstrap"] < 0.05


def test_weighted_auc_handles_ties_like_scikit_learn():
    y = np.array([1, 0, 1, 0, 0, 1, 0, 1])
    s = np.array([0.9, 0.9, 0.5, 0.5, 0.1, 0.7, 0.7, 0.3])
    assert auc(np.ones((1, 8)), y == 1, s)[0] == pytest.approx(roc_auc_score(y, s))


def test_ece_with_unit_weights_equals_the_metrics_module():
    labels, probs, _ = fake(200, seed=9)
    assert ece(np.ones((1, len(labels))), labels, probs)[0] == pytest.approx(
        expected_calibration_error(probs, labels, 15))


def test_delong_equals_its_definition_on_a_known_case():
    """The O(m n) definition of DeLong's structural components (psi(x, y) = 1, 1/2, 0) gives the same AUCs,
    variance and p-value as the fast mid-rank form."""
    rng = np.random.default_rng(0)
    y = rng.random(120) < 0.35
    a = y * 0.8 + rng.normal(0, 1, 120)
    b = y * 1.3 + 0.6 * a + rng.normal(0, 0.8, 120)
    got = delong(y, a, b)
    comps = []
    for score in (a, b):
        x, z = score[y], score[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        comps.append((psi.mean(), psi.mean(1), psi.mean(0)))
    (auc_a, v10a, v01a), (auc_b, v10b, v01b) = comps
    var = np.cov(v10b - v10a) / y.sum() + np.cov(v01b - v01a) / (~y).sum()
    assert got["auc_a"] == pytest.approx(auc_a) and got["auc_b"] == pytest.approx(auc_b)
    assert got["se"] == pytest.approx(np.sqrt(var))
    from scipy.stats import norm
    assert got["p_value"] == pytest.approx(2 * norm.sf(abs((auc_b - auc_a) / np.sqrt(var))))
    assert got["p_value"] < 0.05  # b is the better score here
    same = delong(y, a, a)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_interval_ignores_undefined_resamples():
    assert interval(np.array([np.nan, 0.1, 0.2, 0.3])) == pytest.approx((0.105, 0.295))
    assert np.isnan(interval(np.array([np.nan]))[0])


@pytest.mark.slow
def test_two_thousand_lesion_resamples_of_ten_thousand_images_take_seconds():
    labels, probs, groups = fake(7470, seed=11)  # about 15,000 images in 7,470 lesions
    labels, probs, groups = labels[:10_015], probs[:10_015], groups[:10_015]
    start = time.perf_counter()
    r = bootstrap(sample(labels, probs), groups, resamples=2000, seed=0)
    assert time.perf_counter() - start < 60 and r["resamples"] == 2000


def test_skain_compare_prints_the_paired_table_for_two_prediction_files(tmp_path, capsys):
    import json

    import pandas as pd

    from skain.cli import main
    from skain.data.schema import CLASSES
    rng = np.random.default_rng(2)
    labels, probs_a, groups = fake(300, seed=8)
    probs_b = probs_a * np.exp(rng.normal(0, 0.2, probs_a.shape))
    probs_b[np.arange(len(labels)), labels] *= 1.5
    probs_b /= probs_b.sum(1, keepdims=True)
    ids = [f"ISIC_{i:07d}" for i in range(len(labels))]
    for name, p in (("a", probs_a), ("b", probs_b)):
        frame = pd.DataFrame({"image_id": ids, "pred": np.array(CLASSES)[p.argmax(1)], **{f"p_{c}": p[:, i]
                              for i, c in enumerate(CLASSES)}, "error": ""})
        frame.loc[3, [f"p_{c}" for c in CLASSES]] = np.nan  # an unreadable image in A: left out of both
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    pd.DataFrame({"lesion_id": groups, "image_id": ids, "dx": np.array(CLASSES)[labels]}).to_csv(
        tmp_path / "truth.csv", index=False)
    out = tmp_path / "cmp.json"
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--truth", str(tmp_path / "truth.csv"),
                 "--resamples", "300", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "balanced accuracy" in text and "macro AUC" in text and "(DeLong)" in text and "recall mel" in text
    result = json.loads(out.read_text())
    assert result["images"] == len(labels) - 1 and result["lesions"] == len(np.unique(np.delete(groups, 3)))
    assert result["unit"] == "lesion" and result["resamples"] == 300
    ba = result["metrics"]["balanced_accuracy"]
    assert ba["ci"][0] <= ba["difference"] <= ba["ci"][1] and ba["difference"] > 0
    assert 0 <= result["delong"]["melanoma_auc"]["p_value"] <= 1


def test_the_reports_interval_rows_name_each_recall_by_its_class():
    from skain.evaluation.report import interval_lines
    intervals = {"level": 0.95, "resamples": 10, "unit": "lesion", "seed": 0,
                 "metrics": {"balanced_accuracy": {"value": 0.8, "ci": [0.7, 0.9]},
                             "recall_4": {"value": 0.5, "ci": [0.4, 0.6]}}}
    lines = interval_lines(intervals, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])
    assert "| recall mel | 0.5000 | 0.4000 - 0.6000 |" in lines and "| balanced accuracy | 0.8000 | 0.7000 - 0.9000 |" in lines
    assert "| recall 4 | 0.5000 | 0.4000 - 0.6000 |" in interval_lines(intervals)  # no classes given: the column
