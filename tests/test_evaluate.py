"""Evaluation numbers: agreement with the official ISIC 2018 scorer, melanoma rates by hand, the report
from `skain evaluate`, and clear refusals of files that are not predictions."""
import json

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

from skain.cli import main
from skain.data.schema import DataError
from skain.evaluate import ISIC2018_COLUMNS, align, evaluate, read_predictions, read_truth
from skain.metrics import one_vs_rest_rates


def _real_subset(shared_data, tmp_path, per_class=12):
    """A few real HAM10000 images of every class, as a CSV next to the shared image folder."""
    meta = pd.read_csv(shared_data / "metadata.csv")
    pick = meta.groupby("dx").head(per_class)
    pick.to_csv(tmp_path / "subset.csv", index=False)
    return pick


def _isic_truth(frame: pd.DataFrame, path) -> None:
    truth = pd.DataFrame({"image": frame["image_id"]})
    for col in ISIC2018_COLUMNS:
        truth[col] = (frame["dx"].str.upper() == col).astype(float).to_numpy()
    truth.to_csv(path, index=False)


def test_balanced_accuracy_equals_the_official_isic_scorer(trained, shared_data, tmp_path, monkeypatch):
    if not hasattr(pd.DataFrame, "applymap"):  # isic-challenge-scoring 5.6 calls applymap, removed in pandas 3
        monkeypatch.setattr(pd.DataFrame, "applymap", pd.DataFrame.map, raising=False)
    pick = _real_subset(shared_data, tmp_path)
    sub = tmp_path / "submission.csv"
    code = main(["predict", "--csv", str(tmp_path / "subset.csv"), "--images", str(shared_data / "images"),
                 "--model", str(trained), "--format", "isic2018", "--output", str(sub),
                 "--report", str(tmp_path / "rep"), "--no-progress"])
    assert code == 0
    submission = pd.read_csv(sub)
    assert list(submission.columns) == ["image", *ISIC2018_COLUMNS] and len(submission) == len(pick)
    _isic_truth(pick, tmp_path / "truth.csv")
    with open(tmp_path / "truth.csv") as truth, open(sub) as pred:
        official = ClassificationScore.from_stream(truth, pred, ClassificationMetric.BALANCED_ACCURACY)
    ours = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert ours["balanced_accuracy"] == pytest.approx(official.overall, abs=1e-12)
    # the same number again from the submission file and the ISIC-format truth through `skain evaluate`
    assert main(["evaluate", "--predictions", str(sub), "--csv", str(tmp_path / "truth.csv"),
                 "--report", str(tmp_path / "rep2")]) == 0
    again = json.loads((tmp_path / "rep2" / "metrics.json").read_text())
    assert again["balanced_accuracy"] == pytest.approx(official.overall, abs=1e-12)
    assert again["melanoma"]["sensitivity"] == pytest.approx(
        _official_argmax_sensitivity(pick, submission, "MEL"), abs=1e-12)


def _official_argmax_sensitivity(truth: pd.DataFrame, submission: pd.DataFrame, col: str) -> float:
    pred = submission.set_index("image")[list(ISIC2018_COLUMNS)].idxmax(axis=1)
    true = truth.set_index("image_id")["dx"].str.upper()
    pos = true == col
    return float((pred[pos.index[pos]] == col).mean())


def test_melanoma_rates_on_a_hand_counted_example():
    labels = np.array([4, 4, 4, 4, 0, 1, 5, 5, 5, 5])
    pred = np.array([4, 4, 4, 5, 4, 1, 5, 5, 4, 5])
    rates = one_vs_rest_rates(labels, pred, 4)
    assert rates["sensitivity"] == 3 / 4 and rates["specificity"] == 4 / 6


def test_unreadable_rows_are_left_out_and_counted():
    pred = pd.DataFrame({"image_id": ["a", "b", "c"], **{f"p_{c}": [0.0, np.nan, 0.0] for c in
                                                         ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")}})
    pred.loc[[0, 2], "p_mel"] = 1.0
    truth = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "dx": ["mel", "nv", "nv", "bcc"]})
    labels, probs, info = align(pred, truth)
    assert len(labels) == 2 and info["failed"] == 1 and info["truth_without_prediction"] == 1
    assert evaluate(labels, probs)["melanoma"]["specificity"] == 0.0


def test_files_that_are_not_predictions_or_truth_are_refused(tmp_path):
    (tmp_path / "meta.csv").write_text("lesion_id,image_id,dx\nL1,a,mel\n")
    with pytest.raises(DataError, match="not a predictions CSV"):
        read_predictions(tmp_path / "meta.csv")
    (tmp_path / "nodx.csv").write_text("image_id,age\na,40\n")
    with pytest.raises(DataError, match="dx"):
        read_truth(tmp_path / "nodx.csv")
