"""benchmarks.accuracy.fold_intervals: the paired t-intervals the docs quote, and that the committed results file
is what the script computes from the stored per-fold results."""
from __future__ import annotations

import json

import numpy as np
import pytest
from benchmarks.accuracy.fold_intervals import bootstrap_results, fold_comparisons, paired
from benchmarks.common import RESULTS_DIR
from scipy import stats


def test_paired_interval_is_scipys_t_interval_and_the_corrected_one_is_half_as_wide_again():
    b, a = [0.71, 0.74, 0.68, 0.75, 0.72], [0.70, 0.71, 0.69, 0.72, 0.70]
    got = paired(b, a)
    d = np.subtract(b, a)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert got["mean"] == pytest.approx(d.mean()) and got["t"] == pytest.approx([lo, hi])
    width, corrected = hi - lo, got["t_corrected"][1] - got["t_corrected"][0]
    assert corrected / width == pytest.approx(np.sqrt((1 / 5 + 1 / 4) / (1 / 5)))  # 1.5
    assert got["n_folds"] == 5 and got["folds_not_worse"] == 4


@pytest.mark.parametrize("folds, verdict", [([0.02, 0.021, 0.019, 0.02, 0.022], "distinguishable"),
                                            ([0.001, 0.02, 0.03, 0.01, 0.04], "plain interval only"),
                                            ([-0.02, 0.03, 0.0, 0.01, -0.01], "not distinguishable")])
def test_verdict_follows_which_interval_excludes_zero(folds, verdict):
    assert paired(folds, [0.0] * 5)["verdict"] == verdict


def test_committed_results_are_what_the_script_computes_from_the_stored_files():
    stored = json.loads((RESULTS_DIR / "fold_intervals.json").read_text())
    assert json.loads(json.dumps(fold_comparisons())) == stored["comparisons"]
    assert json.loads(json.dumps(bootstrap_results())) == stored["bootstrap"]
    by_name = {c["comparison"]: c["metrics"] for c in stored["comparisons"]}
    meta = by_name["image + metadata (fields present) - image only, GPU"]["balanced_accuracy"]
    assert meta["verdict"] == "not distinguishable" and meta["folds_not_worse"] == 5  # the docs' reading
