"""Evaluation numbers: agreement with the official ISIC 2018 scorer, melanoma rates by hand, the report
from `skain evaluate`, and clear refusals of files that are not predictions."""
import json

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring.classification import (
    ClassificationMetric,
    ClassificationScore,
)

from skain.cli import main
from skain.data.schema import DataError
from skain.evaluation.evaluate import (
    ISIC2018_COLUMNS,
    align,
    evaluate,
    read_predictions,
    read_truth,
)
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
    labels, probs, info, _ = align(pred, truth)
    assert len(labels) == 2 and info["failed"] == 1 and info["truth_without_prediction"] == 1
    assert evaluate(labels, probs)["melanoma"]["specificity"] == 0.0


def test_files_that_are_not_predictions_or_truth_are_refused(tmp_path):
    (tmp_path / "meta.csv").write_text("lesion_id,image_id,dx\nL1,a,mel\n")
    with pytest.raises(DataError, match="not a predictions CSV"):
        read_predictions(tmp_path / "meta.csv")
    (tmp_path / "nodx.csv").write_text("image_id,age\na,40\n")
    with pytest.raises(DataError, match="dx"):
        read_truth(tmp_path / "nodx.csv")


# ----------------------------------------------------------------------------- trust on labelled data from elsewhere
def test_trust_metrics_on_a_hand_counted_example():
    from skain.evaluation.evaluate import trust_metrics
    classes = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    dx = ["mel", "mel", "bcc", "nv", "nv", "nv", "bkl", "vasc"]
    probs = np.full((8, 7), 0.02)
    for i, c in enumerate(dx):
        probs[i, classes.index(c)] = 0.88  # every argmax right
    pred = pd.DataFrame({"image_id": list("abcdefgh"), **{f"p_{c}": probs[:, j] for j, c in enumerate(classes)},
                         "ood": [False, True, False, False, None, False, "True", False],
                         "triage": ["investigate further", "routine", "investigate further", "investigate further",
                                    "routine", None, "routine", "routine"]})
    truth = pd.DataFrame({"image_id": list("abcdefgh"), "dx": dx})
    r = trust_metrics(pred, truth, temperature=2.0)
    assert r["n"] == 8 and r["balanced_accuracy"] == 1.0 and r["recall"]["mel"] == 1.0
    assert r["ood_false_rejection"] == pytest.approx(2 / 7)  # one row has no verdict; "True" read back from a CSV
    assert r["triage_sensitivity"] == pytest.approx(2 / 3)   # mel, mel, bcc: two flagged
    assert r["triage_specificity"] == pytest.approx(3 / 4)   # nv, nv, bkl, vasc rated (one nv has no verdict)
    assert r["triage_melanoma_sensitivity"] == 0.5
    assert r["ece_after"] == pytest.approx(0.12)             # confidence 0.88, all right
    # "before" undoes T = 2: softmax(2 log p) is sharper, top probability 0.88^2 / (0.88^2 + 6 * 0.02^2)
    assert r["ece_before"] == pytest.approx(1 - 0.88 ** 2 / (0.88 ** 2 + 6 * 0.02 ** 2))
    assert trust_metrics(pred.drop(columns=["ood", "triage"]), truth, None).keys().isdisjoint(
        {"ood_false_rejection", "triage_sensitivity", "ece_before"})


def test_evaluate_a_labelled_folder_reports_trust_with_and_without_metadata(trained, synth_root, tmp_path):
    """`skain evaluate --model --data FOLDER`: ECE before/after temperature, OOD false rejection, triage
    sensitivity/specificity and per-class recall, with metadata as given and with every field blanked,
    beside the model card's validation figures; the card in the report says what was measured where."""
    from skain.inference.predictor import Predictor, prediction_table
    from skain.trust.modelcard import VALIDATION_COLUMN
    rep = tmp_path / "rep"
    assert main(["evaluate", "--model", str(trained), "--data", str(synth_root / "dataset_test"),
                 "--report", str(rep), "--no-progress"]) == 0
    metrics = json.loads((rep / "metrics.json").read_text())
    runs = metrics["trust"]["runs"]
    assert list(runs) == [VALIDATION_COLUMN, "with metadata", "without metadata"]
    predictor = Predictor.from_bundle(trained)
    preds = pd.read_csv(rep / "predictions.csv")
    frame, _ = prediction_table(synth_root / "dataset_test")
    for name in ("with metadata", "without metadata"):
        r = runs[name]
        assert {"ece_before", "ece_after", "ood_false_rejection", "triage_sensitivity", "triage_specificity"} <= set(r)
        assert set(r["recall"]) == set(predictor.classes) and r["n"] == len(frame)
        assert r["ece_before"] != r["ece_after"]  # the bundle's temperature (T != 1) was undone for "before"
    assert runs["with metadata"]["ood_false_rejection"] == pytest.approx(preds["ood"].astype(bool).mean())
    assert runs["with metadata"]["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    # the blanked run is what predict_one gives with no age, sex or site
    blank = [predictor.predict_one(p).diagnosis for p in frame["path"]]
    expected = classification_metrics_for(frame["dx"], blank)
    assert runs["without metadata"]["balanced_accuracy"] == pytest.approx(expected, abs=1e-9)
    card = (rep / "model_card.md").read_text()
    assert "Measured on an external folder" in card and "Trust figures measured on the validation split" in card
    # 95% intervals, resampling the CSV's lesions, around every headline figure
    iv = metrics["intervals"]
    assert iv["unit"] == "lesion" and iv["resamples"] == 2000 and iv["level"] == 0.95
    ba = iv["metrics"]["balanced_accuracy"]
    assert ba["value"] == pytest.approx(metrics["balanced_accuracy"]) and ba["ci"][0] <= ba["value"] <= ba["ci"][1]
    assert iv["metrics"]["macro_auc"]["value"] == pytest.approx(metrics["macro_auc"])
    assert "95% intervals: 2000 bootstrap resamples of lesions" in (rep / "report.md").read_text()
    assert "without metadata" in card and "Trust on these images" in (rep / "report.md").read_text()


def classification_metrics_for(dx: pd.Series, pred: list[str]) -> float:
    from sklearn.metrics import balanced_accuracy_score
    return float(balanced_accuracy_score(dx, pred))


def test_predict_with_dx_reports_trust_with_and_without_metadata(trained, synth_root, tmp_path):
    assert main(["predict", "--data", str(synth_root / "dataset_test"), "--model", str(trained),
                 "--output", str(tmp_path / "p.csv"), "--report", str(tmp_path / "rep"), "--no-progress"]) == 0
    runs = json.loads((tmp_path / "rep" / "metrics.json").read_text())["trust"]["runs"]
    assert {"with metadata", "without metadata"} <= set(runs)
    assert (tmp_path / "rep" / "model_card.md").exists()


def test_prediction_files_naming_images_by_file_name_give_the_stem_in_every_format(tmp_path):
    from skain.data.schema import CLASSES
    from skain.evaluation.evaluate import read_predictions
    names = ["ISIC_1.jpg", "ISIC_2.JPEG", "ISIC_3.png", "ISIC_4.webp", "ISIC_5.bmp", "ISIC_6.tif", "ISIC_7.heic",
             "ISIC_8"]
    pd.DataFrame({"image_id": names, **{f"p_{c}": 1 / len(CLASSES) for c in CLASSES}}).to_csv(
        tmp_path / "p.csv", index=False)
    assert read_predictions(tmp_path / "p.csv")["image_id"].tolist() == [f"ISIC_{i}" for i in range(1, 9)]
