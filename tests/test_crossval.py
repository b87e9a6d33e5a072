"""Held-out test folds and k-fold training: figures that chose nothing, reproduced by predict + evaluate."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config
from skain.cli import main
from skain.data.schema import CLASSES
from skain.training.crossval import fit_all_folds


@pytest.fixture(scope="module")
def cv(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv")
    cfg = tiny_config(synth_root / "dataset_train", out, epochs=2, seed=1)
    cfg = replace(cfg, data=replace(cfg.data, folds=3, all_folds=True))
    return out, fit_all_folds(cfg)


def test_all_folds_score_every_image_once_by_a_model_that_never_saw_it(cv, synth_root):
    out, report = cv
    oof = pd.read_csv(out / "oof_predictions.csv")
    frame = pd.read_csv(next((synth_root / "dataset_train" / "text").glob("*.csv")))
    assert sorted(oof["image_id"]) == sorted(frame["image_id"])  # every image exactly once
    for k in range(3):
        split = pd.read_csv(out / f"fold{k}" / "split.csv")
        tested = set(split.loc[split["split"] == "test", "image_id"])
        assert tested == set(oof.loc[oof["fold"] == k, "image_id"])
        trained_on = split.loc[split["split"] != "test", "lesion_id"]
        assert not set(trained_on) & set(split.loc[split["split"] == "test", "lesion_id"])  # lesion-grouped
    assert {f"logit_{c}" for c in CLASSES} <= set(oof.columns)
    assert np.allclose(oof[[f"p_{c}" for c in CLASSES]].sum(1), 1.0, atol=1e-5)
    ba = report["per_fold_mean_std"]["balanced_accuracy"]
    assert len(ba["folds"]) == 3 and ba["mean"] == pytest.approx(np.mean(ba["folds"]))
    assert set(report["metadata_ablation_mean"]) == {"present", "age_blank", "sex_blank", "site_blank", "all_blank"}
    assert "tau" in report["decision_rule"] and json.loads((out / "cv_report.json").read_text())["folds"] == 3
    tta = report["test_tta8"]["all_blank"]["balanced_accuracy"]
    assert tta["folds"] == [json.loads((out / f"fold{k}" / "metrics.json").read_text())["test_tta8"]["all_blank"]
                            ["balanced_accuracy"] for k in range(3)]


def _predict_and_evaluate(fold, synth_root, tmp_path, *flags):
    """`skain predict` + `skain evaluate` on a fold's test images -> (the fold's metrics.json, evaluate's metrics)."""
    metrics = json.loads((fold / "metrics.json").read_text())
    split = pd.read_csv(fold / "split.csv")
    frame = pd.read_csv(next((synth_root / "dataset_train" / "text").glob("*.csv")))
    test = frame[frame["image_id"].isin(split.loc[split["split"] == "test", "image_id"])]
    test.to_csv(tmp_path / "test.csv", index=False)
    assert main(["predict", "--model", str(fold), "--csv", str(tmp_path / "test.csv"), "--images",
                 str(synth_root / "dataset_train" / "image"), "--output", str(tmp_path / "pred.csv"),
                 "--no-progress", *flags]) == 0
    assert main(["evaluate", "--predictions", str(tmp_path / "pred.csv"), "--csv", str(tmp_path / "test.csv"),
                 "--report", str(tmp_path / "report")]) == 0
    scored = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert scored["n"] == len(test)
    return metrics, scored


def test_test_fold_metrics_are_reproduced_by_skain_predict_and_evaluate(cv, synth_root, tmp_path):
    """metrics.json's `test` figures come from the same Predictor as `skain predict` (fp32, calibrated)."""
    out, _ = cv
    metrics, scored = _predict_and_evaluate(out / "fold1", synth_root, tmp_path, "--batch-size", "64")
    assert scored["n"] == metrics["test"]["n"]
    assert scored["balanced_accuracy"] == pytest.approx(metrics["test"]["balanced_accuracy"], abs=1e-9)
    assert scored["macro_auc"] == pytest.approx(metrics["test"]["macro_auc"], abs=1e-4)


def test_holdout_keeps_validation_and_test_apart_and_labels_them(cv):
    out, _ = cv
    metrics = json.loads((out / "fold0" / "metrics.json").read_text())
    assert metrics["data"]["holdout"] is True and metrics["metadata_ablation"]["split"] == "test"
    assert metrics["data"]["test_images"] > 0 and metrics["data"]["val_images"] > 0
    assert "SYNTHETIC" in metrics["note"]  # the synthetic note wins; real runs say the test fold chose nothing
    card = (out / "fold0" / "model_card.md").read_text()
    assert "With and without metadata (test fold (chose nothing))" in card and "| all three blank |" in card


def test_test_fold_tta_figures_are_reproduced_by_predict_tta_and_logits_are_saved(cv, synth_root, tmp_path):
    """The TTA row of metrics.json is what `skain predict --tta 8` + `skain evaluate` give on the test fold, and
    test_logits.npz holds every variant's logits for the same images (what ensembles of runs average)."""
    out, _ = cv
    fold = out / "fold2"
    metrics, scored = _predict_and_evaluate(fold, synth_root, tmp_path, "--tta", "8")
    tta = metrics["test_tta8"]["present"]
    assert scored["n"] == tta["n"] and scored["balanced_accuracy"] == pytest.approx(tta["balanced_accuracy"], abs=1e-9)
    assert scored["macro_auc"] == pytest.approx(tta["macro_auc"], abs=1e-4)
    saved = np.load(fold / "test_logits.npz")
    assert {"present", "all_blank", "age_blank", "present_tta8", "all_blank_tta8"} <= set(saved.files)
    table = pd.read_csv(fold / "test_predictions.csv")
    assert list(saved["image_id"]) == list(table["image_id"])
    assert np.allclose(saved["present"], table[[f"logit_{c}" for c in CLASSES]].to_numpy(), atol=1e-4)
    assert not np.allclose(saved["present"], saved["present_tta8"])


def _fake_image_only(out, dest, seed=0):
    """A stand-in image-only run on the same folds as `out`: one variant (plus its TTA views), other logits."""
    rng = np.random.default_rng(seed)
    for k in range(3):
        (dest / f"fold{k}").mkdir(parents=True)
        saved = np.load(out / f"fold{k}" / "test_logits.npz")
        fake = {"present": rng.normal(size=saved["present"].shape), "present_tta8": rng.normal(size=saved["present"].shape)}
        np.savez(dest / f"fold{k}" / "test_logits.npz", image_id=saved["image_id"], dx=saved["dx"], **fake)
    return dest


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_cv_report_of_one_run_matches_its_test_folds_and_ensembles_average_runs(cv, tmp_path):
    """`skain cv-report`: one run reproduces each fold's test balanced accuracy; two runs on the same split are
    scored as the average of their probabilities; an image-only run stands in with its one variant; runs on
    other test images are refused."""
    import shutil

    from skain.training.cvreport import cross_run_report
    out, _ = cv
    one = cross_run_report([out], tmp_path / "one", "present")
    for k in range(3):
        test = json.loads((out / f"fold{k}" / "metrics.json").read_text())["test"]
        assert one["per_fold_mean_std"]["balanced_accuracy"]["folds"][k] == pytest.approx(test["balanced_accuracy"])
    other = _fake_image_only(out, tmp_path / "image_only")
    fake_k = np.load(other / "fold0" / "test_logits.npz")["present_tta8"]
    assert main(["cv-report", str(out), str(other), "--output", str(tmp_path / "ens"), "--variant", "all_blank_tta8"]) == 0
    ens = pd.read_csv(tmp_path / "ens" / "oof_all_blank_tta8.csv")
    first = np.load(out / "fold0" / "test_logits.npz")
    expected = (_softmax(first["all_blank_tta8"].astype(float)) + _softmax(fake_k)) / 2
    got = ens.loc[ens["fold"] == 0, [f"p_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(got, expected, atol=1e-6)
    report = json.loads((tmp_path / "ens" / "cv_all_blank_tta8.json").read_text())
    assert report["images"] == len(ens) == len(pd.read_csv(out / "oof_predictions.csv")) and "tau" in report["decision_rule"]
    with pytest.raises(ValueError, match="unknown variant 'colour'"):
        cross_run_report([other], tmp_path / "bad", "colour")  # not even on an image-only run
    single = tmp_path / "single" / "fold0"  # one fold: reported, without a decision rule to nest
    shutil.copytree(out / "fold0", single)
    alone = cross_run_report([single.parent], tmp_path / "alone", "present")
    assert alone["folds"] == 1 and "2 folds" in alone["decision_rule"]["note"]
    shutil.copytree(out / "fold0", tmp_path / "stale" / "fold0")  # a fold left from another split
    shutil.copytree(out / "fold0", tmp_path / "stale" / "fold7")
    with pytest.raises(ValueError, match="is a test image of fold0 and fold7"):
        cross_run_report([tmp_path / "stale"], tmp_path / "bad", "present")
    shuffled = dict(np.load(other / "fold1" / "test_logits.npz"))
    shuffled["image_id"] = shuffled["image_id"][::-1]
    np.savez(other / "fold1" / "test_logits.npz", **shuffled)
    with pytest.raises(ValueError, match="fold1: other test images"):
        cross_run_report([out, other], tmp_path / "bad", "present")
    shutil.rmtree(other / "fold2")
    with pytest.raises(ValueError, match="fold2 is missing"):
        cross_run_report([out, other], tmp_path / "bad", "present")


def test_cv_report_image_only_writes_the_paired_metadata_table(cv, tmp_path, capsys):
    """`skain cv-report MM --image-only IMG`: every metadata variant, the image-only row and their ensemble, single
    view and 8 views, each paired per fold against the image-only row of the same views."""
    from sklearn.metrics import balanced_accuracy_score

    from skain.training.cvreport import fold_probs
    out, _ = cv
    img = _fake_image_only(out, tmp_path / "img", seed=3)
    assert main(["cv-report", str(out), "--image-only", str(img), "--output", str(tmp_path / "t")]) == 0
    table = json.loads((tmp_path / "t" / "metadata_table.json").read_text())["rows"]
    assert "| multimodal, all blank |" in (tmp_path / "t" / "metadata_table.md").read_text()
    assert {"image-only", "multimodal, site blank", "ensemble mm + image-only, all blank, 8-view TTA"} <= set(table)
    diffs = []
    for k in range(3):
        ba = []
        for folder, variant in ((out, "all_blank"), (img, "present")):
            t = fold_probs(folder / f"fold{k}", variant)
            ba.append(balanced_accuracy_score(t["dx"], np.array(CLASSES)[t[[f"p_{c}" for c in CLASSES]].to_numpy().argmax(1)]))
        diffs.append(ba[0] - ba[1])
    paired = table["multimodal, all blank"]["vs_image_only_paired"]["balanced_accuracy_argmax"]
    assert paired["folds"] == pytest.approx(diffs, abs=1e-4) and paired["mean"] == pytest.approx(np.mean(diffs))
    assert "vs_image_only_paired" not in table["image-only"]
    capsys.readouterr()
    assert main(["cv-report", str(out), str(img), "--image-only", str(img), "--output", str(tmp_path / "t")]) == 2
    assert "give one RUN" in capsys.readouterr().err
    assert main(["cv-report", str(img), "--image-only", str(out), "--output", str(tmp_path / "t")]) == 2
    assert "an image-only run; give the multimodal run first" in capsys.readouterr().err


def test_all_folds_with_image_only_trains_the_baseline_on_the_same_folds_and_pairs_them(synth_root, tmp_path,
                                                                                         capsys):
    """`--all-folds --with-image-only`: the image-only model on the same test folds (image_only/fold<k>), and
    cv_report.json / metadata_table.md with every metadata variant paired against it."""
    out = tmp_path / "cv"
    cfg = tiny_config(synth_root / "dataset_train", out, epochs=1, seed=2)
    cfg = replace(cfg, data=replace(cfg.data, folds=2, all_folds=True, with_image_only=True),
                  train=replace(cfg.train, test_tta=2))
    report = fit_all_folds(cfg)
    for k in range(2):
        mm, img = (pd.read_csv(d / f"fold{k}" / "split.csv") for d in (out, out / "image_only"))
        assert mm.equals(img)  # the same split, image for image
        assert json.loads((out / "image_only" / f"fold{k}" / "config.json").read_text())["model"]["image_only"]
    table = report["metadata_vs_image_only"]
    assert {"multimodal, all blank", "image-only, 2-view TTA"} <= set(table)
    assert json.loads((out / "cv_report.json").read_text())["metadata_vs_image_only"] == table
    assert "| multimodal, all blank |" in (out / "metadata_table.md").read_text()
    assert main(["train", "--data", str(synth_root / "dataset_train"), "--with-image-only", "--output",
                 str(tmp_path / "x")]) == 2
    assert "needs --all-folds" in capsys.readouterr().err


def test_cv_reports_carry_lesion_resampled_intervals_of_the_pooled_out_of_fold_figures(cv, tmp_path):
    """cv_report.json and cv_<variant>.json: 95% intervals of the pooled out-of-fold figures, lesions (from the folds'
    split.csv) resampled within their class, seed and resamples recorded; equal to skain.evaluation.bootstrap on the
    same predictions; images are resampled where a run has no split.csv."""
    from sklearn.metrics import balanced_accuracy_score

    from skain.evaluation.bootstrap import Sample, bootstrap
    from skain.inference.decision import adjusted_pred
    from skain.training.cvreport import cross_run_report
    out, report = cv
    iv = report["pooled_oof_intervals"]
    assert (iv["resamples"], iv["seed"], iv["unit"], iv["level"]) == (2000, 0, "lesion", 0.95)
    ba = iv["metrics"]["balanced_accuracy"]
    assert ba["value"] == pytest.approx(report["pooled_oof"]["balanced_accuracy"], abs=1e-9)
    assert ba["ci"][0] <= ba["value"] <= ba["ci"][1] and ba["ci"][1] - ba["ci"][0] > 0.005
    assert {f"recall_{c}" for c in CLASSES} | {"macro_auc", "melanoma_auc"} <= set(iv["metrics"])
    assert iv["metrics"]["recall_mel"]["value"] == pytest.approx(report["pooled_oof"]["per_class"]["mel"]["recall"])
    oof = pd.read_csv(out / "oof_predictions.csv")  # the rule's interval: each image decided by its fold's nested rule
    decided = np.zeros(len(oof), dtype=int)
    for r in report["decision_rule"]["nested"]:
        inside = (oof["fold"] == r["fold"]).to_numpy()
        decided[inside] = adjusted_pred(oof.loc[inside, [f"p_{c}" for c in CLASSES]].to_numpy(),
                                        np.asarray(r["log_prior"]), r["tau"])
    y_oof = oof["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    rule = iv["rule"]["balanced_accuracy"]
    assert rule["value"] == pytest.approx(balanced_accuracy_score(y_oof, decided), abs=1e-12)

    one = cross_run_report([out], tmp_path / "one", "present", resamples=300, seed=7)
    table = pd.read_csv(tmp_path / "one" / "oof_present.csv")
    split = pd.concat(pd.read_csv(out / f"fold{k}" / "split.csv") for k in range(3)).drop_duplicates("image_id")
    lesions = table["image_id"].map(split.set_index("image_id")["lesion_id"]).to_numpy()
    labels = table["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    probs = table[[f"p_{c}" for c in CLASSES]].to_numpy()
    expected = bootstrap(Sample(labels, probs, probs.argmax(1), mel=CLASSES.index("mel")), lesions, 300, 7)
    got = one["pooled_oof_intervals"]
    assert (got["resamples"], got["seed"], got["unit"]) == (300, 7, "lesion")
    for key in ("balanced_accuracy", "macro_auc", "melanoma_auc"):
        assert got["metrics"][key]["ci"] == pytest.approx(expected["metrics"][key]["ci"], abs=1e-12)
    assert got["metrics"]["recall_nv"]["ci"] == pytest.approx(expected["metrics"][f"recall_{CLASSES.index('nv')}"]["ci"])
    assert got["metrics"]["balanced_accuracy"]["value"] == pytest.approx(
        balanced_accuracy_score(labels, probs.argmax(1)))
    saved = json.loads((tmp_path / "one" / "cv_present.json").read_text())
    assert saved["pooled_oof_intervals"]["metrics"]["balanced_accuracy"]["ci"] == pytest.approx(
        got["metrics"]["balanced_accuracy"]["ci"])
    other = _fake_image_only(out, tmp_path / "img_no_split", seed=5)  # test_logits.npz only: no split.csv
    assert cross_run_report([other], tmp_path / "o", "present", resamples=50)["pooled_oof_intervals"]["unit"] == "image"
    assert "pooled_oof_intervals" not in cross_run_report([out], tmp_path / "none", "present", resamples=0)


def test_metadata_table_pairs_rows_on_the_pooled_out_of_fold_predictions_with_delong(cv, tmp_path):
    """`vs_image_only_pooled`: the row minus the image-only row on the pooled out-of-fold predictions of the same
    images, with the paired bootstrap interval over lesions and DeLong's test for the AUCs; the per-fold pairs
    stay as they were."""
    from sklearn.metrics import balanced_accuracy_score

    from skain.evaluation.bootstrap import delong
    from skain.training.cvreport import ensemble_oof, write_metadata_table
    out, _ = cv
    img = _fake_image_only(out, tmp_path / "img", seed=3)
    table = write_metadata_table(out, img, tmp_path / "t", resamples=400, seed=2)
    assert "vs_image_only_pooled" not in table["image-only"]
    pooled = table["multimodal, all blank"]["vs_image_only_pooled"]
    assert (pooled["resamples"], pooled["seed"], pooled["unit"]) == (400, 2, "lesion")
    mm, base = ensemble_oof([out], "all_blank"), ensemble_oof([img], "all_blank")
    cols = [f"p_{c}" for c in CLASSES]
    base = base.set_index("image_id").loc[mm["image_id"]].reset_index()
    y = mm["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    ba = pooled["metrics"]["balanced_accuracy"]
    assert ba["a"] == pytest.approx(balanced_accuracy_score(y, base[cols].to_numpy().argmax(1)))
    assert ba["b"] == pytest.approx(balanced_accuracy_score(y, mm[cols].to_numpy().argmax(1)))
    assert ba["difference"] == pytest.approx(ba["b"] - ba["a"]) and ba["ci"][0] < ba["ci"][1]
    mel = CLASSES.index("mel")
    expected = delong(y == mel, base[cols].to_numpy()[:, mel], mm[cols].to_numpy()[:, mel])
    assert pooled["delong"]["melanoma_auc"]["p_value"] == pytest.approx(expected["p_value"], abs=1e-9)
    assert pooled["metrics"]["melanoma_auc"]["difference"] == pytest.approx(expected["difference"], abs=1e-9)
    assert "vs_image_only_paired" in table["multimodal, all blank"]  # the per-fold pair is kept
    assert "vs_image_only_pooled" in table["ensemble mm + image-only, all blank, 8-view TTA"]
    md = (tmp_path / "t" / "metadata_table.md").read_text()
    assert f"{ba['difference']:+.3f} [{ba['ci'][0]:+.3f}, {ba['ci'][1]:+.3f}]" in md
