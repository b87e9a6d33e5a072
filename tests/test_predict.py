"""Batch prediction through the one inference path: parity with direct Predictor calls, every input layout,
missing metadata, unreadable images, the report, bundle-only loading."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from skain.cli import main
from skain.data.schema import CLASSES
from skain.inference.predictor import Predictor, prediction_table
from skain.metrics import classification_metrics

P_COLS = [f"p_{c}" for c in CLASSES]


def _predict(args, tmp_path, name="pred.csv"):
    out = tmp_path / name
    code = main(["predict", *map(str, args), "--output", str(out), "--no-progress"])
    return code, (pd.read_csv(out, keep_default_na=False, na_values=[""]) if out.exists() else None)


def test_cli_and_direct_predict_one_give_bit_identical_probabilities(trained, synth_root, tmp_path):
    """Batch size 1 on both sides: the CLI (CSV -> DataLoader) and the web path (predict_one) agree exactly."""
    test = synth_root / "dataset_test"
    code, csv = _predict(["--data", test, "--model", trained, "--batch-size", 1], tmp_path)
    assert code == 0
    meta = pd.read_csv(test / "text" / "metadata.csv", keep_default_na=False)
    predictor = Predictor.from_bundle(trained)
    for row, got in zip(meta.head(12).itertuples(), csv.itertuples()):
        p = predictor.predict_one(test / "image" / f"{row.image_id}.jpg", row.age or None, row.sex, row.localization)
        assert got.image_id == row.image_id
        direct = np.array([p.probabilities[c] for c in CLASSES], dtype=np.float32)
        from_csv = np.array([getattr(got, f"p_{c}") for c in CLASSES], dtype=np.float32)  # model runs in float32
        np.testing.assert_array_equal(direct, from_csv)
        assert got.pred == p.diagnosis


def test_cli_and_direct_predict_frame_are_identical_for_the_same_batches(trained, synth_root, tmp_path):
    test = synth_root / "dataset_test"
    code, csv = _predict(["--data", test, "--model", trained, "--batch-size", 16], tmp_path)
    frame, _ = prediction_table(test)
    direct = Predictor.from_bundle(trained).predict_frame(frame, batch_size=16, progress=False)
    assert code == 0
    np.testing.assert_array_equal(csv[P_COLS].to_numpy(np.float32), direct[P_COLS].to_numpy(np.float32))
    # Different batch composition changes CPU kernel blocking; the documented tolerance is 1e-5.
    single = Predictor.from_bundle(trained).predict_frame(frame, batch_size=1, progress=False)
    np.testing.assert_allclose(single[P_COLS].to_numpy(), direct[P_COLS].to_numpy(), atol=1e-5)


def test_predict_one_cleans_metadata_like_the_csv_path(trained, synth_root):
    predictor = Predictor.from_bundle(trained)
    image = next((synth_root / "dataset_test" / "image").glob("*.jpg"))
    a = predictor.predict_one(image, 55, "male", "back").probabilities
    b = predictor.predict_one(image, "55", " Male ", "BACK").probabilities
    assert a == b
    with pytest.raises(ValueError, match="age"):
        predictor.predict_one(image, 250, "male", "back")


def test_predictor_needs_only_the_bundle_file(trained, synth_root, tmp_path):
    bundle = tmp_path / "alone" / "model.pt"
    bundle.parent.mkdir()
    shutil.copy(trained / "best_model.pt", bundle)
    code, csv = _predict(["--data", synth_root / "dataset_test", "--model", bundle], tmp_path)
    assert code == 0 and len(csv) == 40 and csv["pred"].isin(CLASSES).all()
    assert Predictor.from_bundle(bundle).info["backbone"] == "test_efficientnet"


def _layouts(root, tmp_path):
    """The same 12 images in the four supported layouts."""
    test = root / "dataset_test"
    meta = pd.read_csv(test / "text" / "metadata.csv").head(12)
    images = [test / "image" / f"{i}.jpg" for i in meta["image_id"]]
    official = tmp_path / "official"
    for k, part in enumerate(("HAM10000_images_part_1", "HAM10000_images_part_2")):
        (official / part).mkdir(parents=True)
        for img in images[k::2]:
            shutil.copy(img, official / part)
    meta.to_csv(official / "HAM10000_metadata.csv", index=False)
    loose = tmp_path / "loose"
    loose.mkdir()
    for img in images:
        shutil.copy(img, loose)
    meta.to_csv(tmp_path / "list.csv", index=False)
    return {"seed": ["--data", test], "official": ["--data", official],
            "csv+images": ["--csv", tmp_path / "list.csv", "--images", loose], "images only": ["--data", loose]}, meta


def test_every_input_layout_is_predicted(trained, synth_root, tmp_path):
    layouts, meta = _layouts(synth_root, tmp_path)
    results = {}
    for name, args in layouts.items():
        code, csv = _predict([*args, "--model", trained], tmp_path, f"{name}.csv")
        assert code == 0, name
        assert csv["pred"].isin(CLASSES).all(), name
        results[name] = csv.set_index("image_id").loc[meta["image_id"], P_COLS].to_numpy()
    np.testing.assert_array_equal(results["official"], results["csv+images"])
    assert not np.array_equal(results["images only"], results["csv+images"])  # metadata is used when present


def test_rows_with_missing_metadata_still_get_predictions(trained, synth_root, tmp_path):
    test = synth_root / "dataset_test"
    meta = pd.read_csv(test / "text" / "metadata.csv").head(6)
    meta.loc[0, "age"], meta.loc[1, "sex"], meta.loc[2, "localization"] = None, "", "nan"
    meta[["image_id", "age"]].iloc[3:].to_csv(tmp_path / "partial.csv", index=False)
    meta.to_csv(tmp_path / "gaps.csv", index=False)
    predictor = Predictor.from_bundle(trained)
    for csv_name in ("gaps.csv", "partial.csv"):
        code, csv = _predict(["--csv", tmp_path / csv_name, "--images", test / "image", "--model", trained],
                             tmp_path, f"out_{csv_name}")
        assert code == 0 and csv["pred"].isin(CLASSES).all() and csv["error"].isna().all()
    direct = predictor.predict_one(test / "image" / f"{meta.image_id[0]}.jpg", None, meta.sex[0], meta.localization[0])
    unknown_age = predictor.predict_frame(prediction_table(csv=tmp_path / "gaps.csv", images=[test / "image"])[0],
                                          batch_size=1, progress=False)
    assert [direct.probabilities[c] for c in CLASSES] == unknown_age.loc[0, P_COLS].tolist()


def test_unreadable_image_is_reported_by_name_and_the_rest_predicted(trained, synth_root, tmp_path, capsys):
    data = tmp_path / "broken"
    shutil.copytree(synth_root / "dataset_test", data)
    victim = sorted((data / "image").glob("*.jpg"))[5]
    victim.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    code, csv = _predict(["--data", data, "--model", trained, "--batch-size", 8], tmp_path)
    assert code == 3
    bad = csv[csv["image_id"] == victim.stem].iloc[0]
    assert victim.name in bad["error"] and pd.isna(bad["prob"])
    good = csv[csv["image_id"] != victim.stem]
    assert len(good) == 39 and good["pred"].isin(CLASSES).all()
    assert victim.stem in capsys.readouterr().err


def test_labelled_csv_gets_a_report_matching_the_predictions(trained, synth_root, tmp_path):
    code, csv = _predict(["--data", synth_root / "dataset_test", "--model", trained, "--report", tmp_path / "rep"],
                         tmp_path)
    assert code == 0
    for name in ("metrics.json", "confusion_matrix.png", "roc_curves.png", "report.md"):
        assert (tmp_path / "rep" / name).stat().st_size > 100, name
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    truth = pd.read_csv(synth_root / "dataset_test" / "text" / "metadata.csv")
    labels = truth["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    expected = classification_metrics(labels, csv[P_COLS].to_numpy(), CLASSES)
    assert metrics["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"], abs=1e-12)
    assert set(metrics["melanoma"]) >= {"sensitivity", "specificity"}
    assert "balanced accuracy" in (tmp_path / "rep" / "report.md").read_text()


def test_tta_averages_views_and_rejects_impossible_counts(trained, synth_root):
    frame, _ = prediction_table(synth_root / "dataset_test")
    one = Predictor.from_bundle(trained).predict_frame(frame.head(8), progress=False)[P_COLS].to_numpy()
    eight = Predictor.from_bundle(trained, tta=8).predict_frame(frame.head(8), progress=False)[P_COLS].to_numpy()
    np.testing.assert_allclose(eight.sum(1), 1.0, atol=1e-5)
    # the tiny synthetic model is very sure (probabilities round to 0 and 1), so compare log-probabilities
    assert np.abs(np.log(one + 1e-38) - np.log(eight + 1e-38)).max() > 1e-3
    with pytest.raises(ValueError, match="between 1 and 8"):
        Predictor.from_bundle(trained, tta=9)


def test_a_model_can_make_its_fitted_tta_views_the_default(trained, synth_root, tmp_path, capsys):
    """`skain calibrate --tta 2 --default`: predict (and serve) then run 2 views unless told --tta 1."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert Predictor.from_bundle(run).tta == 1
    assert main(["calibrate", "--model", str(run), "--default"]) == 2
    assert "--default needs --tta N" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(run), "--tta", "2", "--default"]) == 0
    assert Predictor.from_bundle(run).tta == 2 and Predictor.from_bundle(run, tta=1).tta == 1
    assert Predictor.from_bundle(trained).tta == 1  # the copy changed, not the original
    _, default = _predict(["--data", synth_root / "dataset_test", "--model", run], tmp_path, "default.csv")
    _, two = _predict(["--data", synth_root / "dataset_test", "--model", run, "--tta", "2"], tmp_path, "two.csv")
    _, one = _predict(["--data", synth_root / "dataset_test", "--model", run, "--tta", "1"], tmp_path, "one.csv")
    np.testing.assert_array_equal(default[P_COLS].to_numpy(), two[P_COLS].to_numpy())
    assert not np.array_equal(default[P_COLS].to_numpy(), one[P_COLS].to_numpy())


def test_missing_model_is_a_clear_error(synth_root, tmp_path, capsys):
    code, _ = _predict(["--data", synth_root / "dataset_test", "--model", tmp_path / "nothing"], tmp_path)
    assert code == 2 and "no trained model" in capsys.readouterr().err


def _blanked(frame):
    return frame.assign(age=np.nan, sex="unknown", localization="unknown")  # what clean_metadata makes of "" cells


@pytest.mark.parametrize("tta", [1, 8])
def test_variants_from_one_backbone_pass_equal_separate_predictions(trained, synth_root, tta):
    """`predict_variants` (what predict/evaluate on labelled data use for the with/without-metadata trust
    figures) runs the backbone once for both variants; each table equals its own full prediction pass, the
    blank one that of a CSV whose age, sex and site cells are all empty."""
    from skain.evaluation.evaluate import trust_variants
    frame, _ = prediction_table(synth_root / "dataset_test")
    frame = frame.head(12)
    predictor = Predictor.from_bundle(trained, tta=tta)
    calls = []
    hook = predictor.model.backbone.register_forward_hook(lambda *_: calls.append(1))
    both = predictor.predict_variants(frame, trust_variants(predictor), batch_size=4, progress=False)
    hook.remove()
    assert len(calls) == 3 * tta  # 3 batches of 4 images, each view once: not once per variant
    for name, alone in (("present", predictor.predict_frame(frame, batch_size=4, progress=False)),
                        ("all_blank", predictor.predict_frame(_blanked(frame), batch_size=4, progress=False))):
        got = both[name]
        np.testing.assert_allclose(got[P_COLS].to_numpy(), alone[P_COLS].to_numpy(), rtol=0, atol=1e-6)
        assert got["pred"].tolist() == alone["pred"].tolist()
        np.testing.assert_allclose(got["ood_score"].to_numpy(float), alone["ood_score"].to_numpy(float), atol=1e-6)
        assert got["triage"].tolist() == alone["triage"].tolist()
    assert not np.allclose(both["present"][P_COLS].to_numpy(), both["all_blank"][P_COLS].to_numpy(), atol=1e-6)


def test_variants_on_the_onnx_backend_take_one_pass_each(trained, synth_root):
    pytest.importorskip("onnxruntime")
    frame, _ = prediction_table(synth_root / "dataset_test")
    frame = frame.head(6)
    from skain.modelfile.load import read_bundle
    onnx = Predictor(read_bundle(trained), backend="onnx")  # exported in memory
    torch_ = Predictor.from_bundle(trained)
    variants = {"present": set(), "all_blank": {"age", "sex", "site"}}
    passes = []
    hook = onnx.model.backbone.register_forward_hook(lambda *_: passes.append(1))  # once per graph run
    got = onnx.predict_variants(frame, variants, progress=False)
    hook.remove()
    assert len(passes) == 2  # one batch, one pass per variant: the graph has no backbone/head split
    ref = torch_.predict_variants(frame, variants, progress=False)
    for name in variants:
        np.testing.assert_allclose(got[name][P_COLS].to_numpy(), ref[name][P_COLS].to_numpy(), atol=1e-4)
        np.testing.assert_allclose(got[name]["ood_score"].to_numpy(float), ref[name]["ood_score"].to_numpy(float),
                                   rtol=1e-3)
    assert not np.allclose(got["present"][P_COLS].to_numpy(), got["all_blank"][P_COLS].to_numpy(), atol=1e-6)


def test_cpu_batches_are_capped_by_pixels_and_give_the_same_predictions(trained, synth_root, monkeypatch):
    """On CPU a batch holds at most CPU_PIXELS_PER_BATCH input pixels (64 images at 288 px made buffers that
    glibc maps and unmaps on every call); batch prediction and the scoring of `skain train` both take the cap,
    and the predictions do not change."""
    import torch

    import skain.inference.predictor as predict_module
    from skain.evaluation.evaluate import trust_variants
    from skain.evaluation.variants import variant_logits
    predictor = Predictor.from_bundle(trained, tta=2)
    size = predictor.preprocess["input_size"]
    assert predictor.batch_size(64) == min(64, predict_module.CPU_PIXELS_PER_BATCH // size ** 2)
    frame = prediction_table(synth_root / "dataset_test")[0].head(12)
    free = predictor.predict_variants(frame, trust_variants(predictor), batch_size=12, progress=False)
    free_logits = variant_logits(predictor, frame, trust_variants(predictor), batch_size=12, views=2,
                                 tta=("present",))
    monkeypatch.setattr(predict_module, "CPU_PIXELS_PER_BATCH", 5 * size ** 2)
    assert predictor.batch_size(64) == 5 and predictor.batch_size(3) == 3
    seen = []
    hook = predictor.model.backbone.register_forward_hook(lambda _m, inputs, _o: seen.append(len(inputs[0])))
    capped = predictor.predict_variants(frame, trust_variants(predictor), batch_size=12, progress=False)
    assert seen == [5, 5, 5, 5, 2, 2]  # 3 batches, 2 views each
    seen.clear()
    capped_logits = variant_logits(predictor, frame, trust_variants(predictor), batch_size=12, views=2,
                                   tta=("present",))
    hook.remove()
    assert seen == [5, 5, 5, 5, 2, 2]
    for name in free:
        np.testing.assert_allclose(capped[name][P_COLS].to_numpy(), free[name][P_COLS].to_numpy(), atol=1e-5)
        np.testing.assert_allclose(capped[name]["ood_score"].to_numpy(float), free[name]["ood_score"].to_numpy(float),
                                   atol=1e-4)
    for name, z in free_logits.items():
        np.testing.assert_allclose(capped_logits[name], z, atol=1e-5)
    predictor.device = torch.device("cuda")  # the cap is for CPU memory only; only the type is read
    assert predictor.batch_size(64) == 64
