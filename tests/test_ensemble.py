"""Ensembles: one bundle holding several trained runs (here the two folds of a tiny 2-fold training), used by
prediction, the web API, ONNX/OpenVINO, Grad-CAM and the trust layer exactly as one model."""
from __future__ import annotations

import copy
import io
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from skain.cli import main
from skain.data.schema import CLASSES
from skain.inference.explain import GradCam
from skain.inference.predictor import GRAPH_RUNTIMES, Predictor, prediction_table
from skain.model import EnsembleNet
from skain.modelfile.bundle import BundleError, atomic_torch_save, check_bundle
from skain.modelfile.load import read_bundle
from skain.training.ensemble import OOF_NAME, averaged_oof, build_ensemble

P_COLS = [f"p_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def folds(synth_root, tmp_path_factory):
    """Two tiny runs on complementary folds of a 2-fold lesion-grouped split (each with its trust block)."""
    from skain.training.train import fit
    root = tmp_path_factory.mktemp("kfold")
    runs = []
    for k in (0, 1):
        cfg = tiny_config(synth_root / "dataset_train", root / f"fold{k}", epochs=2, seed=3)  # one split seed
        cfg.data.folds, cfg.data.fold, cfg.data.split_seed = 2, k, 3  # split seed 3: one fold never sees 'chest'
        fit(cfg)
        runs.append(root / f"fold{k}")
    return runs


@pytest.fixture(scope="module")
def ensemble(folds, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens")
    assert main(["ensemble", "--runs", *map(str, folds), "--output", str(out), "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def frame(synth_root):
    return prediction_table(synth_root / "dataset_test")[0].head(16)


def _untempered(bundle: dict) -> Predictor:
    """Raw softmax (T = 1), so members and ensemble can be compared before calibration."""
    return Predictor({**bundle, "trust": {**(bundle.get("trust") or {}), "temperature": 1.0}})


def test_ensemble_probabilities_are_the_mean_of_the_members(folds, ensemble, frame):
    members = [read_bundle(r) for r in folds]
    # Each fold fit age statistics and vocabularies on its own training split: one fold never saw 'chest'.
    a, b = (m["encoder"] for m in members)
    assert a["age_mean"] != b["age_mean"] and a["site_vocab"] != b["site_vocab"]
    assert frame["localization"].isin(set(a["site_vocab"]) ^ set(b["site_vocab"])).any()
    expected = np.mean([_untempered(b).predict_frame(frame, progress=False)[P_COLS].to_numpy() for b in members], 0)
    got = _untempered(read_bundle(ensemble)).predict_frame(frame, progress=False)[P_COLS].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    predictor = Predictor.from_bundle(ensemble)
    assert isinstance(predictor.model, EnsembleNet) and predictor.info["members"] == 2


def test_blank_variant_from_one_pass_equals_a_blank_csv_on_the_ensemble(ensemble, frame):
    """The ensemble's backbone + classify split (members with different encoders) gives the same with- and
    without-metadata predictions in one pass as two separate prediction passes."""
    from skain.evaluation.evaluate import trust_variants
    predictor = Predictor.from_bundle(ensemble)
    both = predictor.predict_variants(frame, trust_variants(predictor), batch_size=8, progress=False)
    blank = frame.assign(age=np.nan, sex="unknown", localization="unknown")
    cols = [f"p_{c}" for c in predictor.classes]
    for name, alone in (("present", predictor.predict_frame(frame, batch_size=8, progress=False)),
                        ("all_blank", predictor.predict_frame(blank, batch_size=8, progress=False))):
        np.testing.assert_allclose(both[name][cols].to_numpy(), alone[cols].to_numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(both["present"][cols].to_numpy(), both["all_blank"][cols].to_numpy(), atol=1e-6)


def test_tta_trust_inputs_of_the_ensemble_are_its_tta_predictions(ensemble, frame):
    """`skain calibrate --tta N` on an ensemble fits on exactly what `predict --tta N` outputs (no blank variant:
    like the single-view trust, blank-aware triage is for one multimodal network)."""
    from skain.data.images import ImageLoader
    from skain.training.trust_fit import tta_outputs
    from skain.trust.crossfit import TrustSettings
    bundle = read_bundle(ensemble)
    out = tta_outputs(bundle, frame, ImageLoader(bundle["preprocess"]["resize"]), torch.device("cpu"), 2,
                      TrustSettings())
    assert out.blank_logits is None and len(out.labels) == len(frame)
    probs = Predictor(bundle, tta=2).predict_frame(frame, progress=False)  # not fit for 2 views: T = 1
    np.testing.assert_allclose(np.exp(out.logits), probs[[f"p_{c}" for c in bundle["classes"]]].to_numpy(),
                               atol=1e-6)


def test_bundle_loads_with_weights_only_and_bad_members_are_caught(ensemble):
    bundle = torch.load(ensemble / "best_model.pt", map_location="cpu", weights_only=True)
    check_bundle(bundle, "ensemble")
    assert len(bundle["model_args"]["ensemble"]) == 2 and "ensemble of 2" in bundle["model_args"]["backbone"]
    broken = copy.deepcopy(bundle)
    broken["state_dict"]["members.1.meta.sex.weight"] = broken["state_dict"]["members.1.meta.sex.weight"][:1]
    with pytest.raises(BundleError, match="member 1.*sex_vocab"):
        check_bundle(broken, "ensemble")
    broken = copy.deepcopy(bundle)
    broken["model_args"]["ensemble"] = []
    with pytest.raises(BundleError, match="non-empty list"):
        check_bundle(broken, "ensemble")


@pytest.mark.parametrize("change, words", [
    (lambda b: b["preprocess"].update(input_size=96), "preprocessing.*input_size 64 vs 96.*same field of view"),
    (lambda b: b["preprocess"].update(mean=[0.5, 0.5, 0.5]), "preprocessing.*mean"),
    (lambda b: b["encoder"].update(site_vocab=b["encoder"]["site_vocab"][::-1]), "encoders differ.*site_vocab"),
    (lambda b: b.update(classes=list(reversed(b["classes"]))), "class names"),
])
def test_members_that_do_not_share_preprocessing_or_encoder_are_refused(folds, tmp_path, change, words):
    other = read_bundle(folds[1])
    change(other)
    atomic_torch_save(other, tmp_path / "other.pt")
    with pytest.raises(BundleError, match=words):
        build_ensemble([folds[0], tmp_path / "other.pt"], tmp_path / "ens")
    assert main(["ensemble", "--runs", str(folds[0]), str(tmp_path / "other.pt"), "--output", str(tmp_path / "e")]) == 2


def test_a_single_run_or_the_same_run_twice_is_refused(folds, tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        build_ensemble([folds[0]], tmp_path / "ens")
    with pytest.raises(ValueError, match="twice"):
        build_ensemble([folds[0], folds[0] / "best_model.pt"], tmp_path / "ens")


def test_trust_layer_is_fit_on_out_of_fold_logits(folds, ensemble, tmp_path):
    bundle = read_bundle(ensemble)
    trust = bundle["trust"]
    figures = trust["figures"]
    assert figures["out_of_fold_source"] == "the members' own validation splits"
    assert figures["validation_images"] == 240  # two complementary folds cover every image once
    assert trust["temperature"] != 1.0 and "held_out" in figures["calibration"]
    assert bundle["metrics"]["n"] == 240 and "out-of-fold" in bundle["metrics"]["source"]
    assert (ensemble / "model_card.md").is_file() and (ensemble / "reliability.png").is_file()
    # The same logits from an oof_predictions.csv beside the runs (the `--all-folds` layout) give the same T.
    oof = _oof_csv(folds)
    oof.to_csv(folds[0].parent / OOF_NAME, index=False)
    try:
        again = read_bundle(build_ensemble(folds, tmp_path / "from_csv"))
    finally:
        (folds[0].parent / OOF_NAME).unlink()
    assert again["trust"]["figures"]["out_of_fold_source"].endswith(OOF_NAME)
    assert again["trust"]["temperature"] == pytest.approx(trust["temperature"], rel=1e-4)


def _oof_csv(folds) -> pd.DataFrame:
    """Each fold's member on its own validation images, in the `skain predict` CSV format plus fold/logits."""
    from skain.training.trust_fit import folder_split
    parts = []
    for k, run in enumerate(folds):
        frame, _, val_idx, _ = folder_split(run)
        val = frame.iloc[val_idx]
        p = _untempered(read_bundle(run))
        logits = []
        p.trust.calibrate = lambda x, logits=logits: (logits.append(np.asarray(x)), torch.from_numpy(
            np.asarray(x)).softmax(1).numpy())[1]
        pred = p.predict_frame(val, progress=False)
        parts.append(pred.assign(dx=val["dx"].to_numpy(), fold=k,
                                 **{f"logit_{c}": np.concatenate(logits)[:, j] for j, c in enumerate(CLASSES)}))
    return pd.concat(parts)


def test_ood_score_is_the_mean_of_the_members_scores(folds, ensemble, synth_root):
    image = next((synth_root / "dataset_test" / "image").glob("*.jpg"))
    members = [Predictor.from_bundle(r).predict_one(image, 50, "male", "back").ood_score for r in folds]
    got = Predictor.from_bundle(ensemble).predict_one(image, 50, "male", "back")
    assert got.ood_score == pytest.approx(np.mean(members), rel=1e-4)
    assert got.in_distribution is not None and got.triage is not None
    floors = [read_bundle(r)["trust"]["ood"]["min_pixel_spread"] for r in folds]
    assert read_bundle(ensemble)["trust"]["ood"]["min_pixel_spread"] == min(floors)  # the most permissive floor


def test_predict_cli_runs_on_the_ensemble(ensemble, synth_root, tmp_path):
    out = tmp_path / "pred.csv"
    assert main(["predict", "--data", str(synth_root / "dataset_test"), "--model", str(ensemble),
                 "--output", str(out), "--no-progress", "--tta", "2"]) == 0
    pred = pd.read_csv(out)
    assert len(pred) == 40 and pred["pred"].isin(CLASSES).all() and pred["ood_score"].notna().all()
    assert np.allclose(pred[P_COLS].sum(axis=1), 1.0, atol=1e-5)


def test_web_api_and_heatmap_run_on_the_ensemble(ensemble, synth_root):
    from skain.web import create_app
    from skain.web.service import Service
    service = Service.load(ensemble, device="cpu")
    client = create_app({"TESTING": True}, service=service).test_client()
    assert "ensemble of 2" in client.get("/api/model").json["backbone"]
    image = next((synth_root / "dataset_test" / "image").glob("*.jpg")).read_bytes()
    r = client.post("/api/predict", data={"image": (io.BytesIO(image), "x.jpg"), "age": "50", "heatmap": "1"},
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.json
    ref = service.predictor.predict_one(image, 50.0, None, None)
    assert r.json["probabilities"] == pytest.approx(ref.probabilities, abs=1e-6)
    assert r.json["heatmap"]["target"] == ref.diagnosis


def test_gradcam_combines_every_members_map(ensemble, synth_root):
    predictor = Predictor.from_bundle(ensemble)
    image = next((synth_root / "dataset_test" / "image").glob("*.jpg"))
    seen = []
    for part in predictor.model.backbone.parts:
        part.global_pool.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].shape))
    ex = GradCam(predictor)(image, 50, "male", "back")
    assert len(seen) == 2
    size = predictor.preprocess["input_size"]
    assert ex.heat.shape == (size, size) and ex.heat.min() >= 0 and ex.heat.max() == pytest.approx(1.0)
    assert ex.target == predictor.predict_one(image, 50, "male", "back").diagnosis


@pytest.mark.parametrize("backend", list(GRAPH_RUNTIMES))
def test_exported_ensemble_matches_pytorch(ensemble, frame, tmp_path, backend):
    bundle = tmp_path / "best_model.pt"
    bundle.write_bytes((ensemble / "best_model.pt").read_bytes())
    assert main(["export", "--model", str(tmp_path)]) == 0
    ref = Predictor.from_bundle(tmp_path).predict_frame(frame, progress=False)
    got = Predictor.from_bundle(tmp_path, backend=backend).predict_frame(frame, progress=False)
    assert np.abs(ref[P_COLS].to_numpy() - got[P_COLS].to_numpy()).max() <= 1e-4
    np.testing.assert_allclose(got["ood_score"], ref["ood_score"], rtol=1e-3)


def test_members_with_one_encoder_feed_it_straight_through_in_every_backend(folds, frame, tmp_path):
    """Identical encoders (e.g. runs that differ only in seed): identity maps, no extra graph nodes, and an
    ensemble of two copies of one network predicts exactly as that network, in PyTorch and in OpenVINO."""
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    (copy_dir / "best_model.pt").write_bytes((folds[0] / "best_model.pt").read_bytes())
    path = build_ensemble([folds[0], copy_dir], tmp_path / "ens")
    bundle = read_bundle(path)
    assert bundle["encoder"] == read_bundle(folds[0])["encoder"]
    member = _untempered(read_bundle(folds[0])).predict_frame(frame, progress=False)[P_COLS].to_numpy()
    got = _untempered(bundle).predict_frame(frame, progress=False)[P_COLS].to_numpy()
    np.testing.assert_allclose(got, member, atol=1e-6)
    assert main(["export", "--model", str(path)]) == 0
    graph = Predictor.from_bundle(path, backend="openvino").predict_frame(frame, progress=False)[P_COLS].to_numpy()
    assert np.abs(graph - Predictor.from_bundle(path).predict_frame(frame, progress=False)[P_COLS].to_numpy()).max() <= 1e-4


@pytest.fixture(scope="module")
def wide(synth_root, tmp_path_factory):
    """A run at 80 px (resize 91: the 64 px runs' field of view, 0.88) on fold 0 of the same split, like a Lite2
    run at 260 px beside Lite0 at 224."""
    from skain.training.train import fit
    out = tmp_path_factory.mktemp("wide") / "fold0"
    cfg = tiny_config(synth_root / "dataset_train", out, epochs=2, seed=3)
    cfg.data.folds, cfg.data.fold, cfg.data.split_seed = 2, 0, 3
    cfg.model.input_size = 80
    fit(cfg)
    return out


class _Resized(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, size: int):
        super().__init__()
        self.inner, self.size = inner, size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.inner(F.interpolate(image, size=(self.size, self.size), mode="bilinear", align_corners=False))


def test_members_of_different_input_sizes_take_the_largest_input_resized_inside(folds, wide, frame, tmp_path):
    small, large = read_bundle(folds[0]), read_bundle(wide)
    assert (small["preprocess"]["input_size"], large["preprocess"]["input_size"]) == (64, 80)
    path = build_ensemble([folds[0], wide], tmp_path / "ens")
    bundle = read_bundle(path)
    assert bundle["preprocess"] == large["preprocess"]
    assert [m["input_size"] for m in bundle["model_args"]["ensemble"]] == [64, 80]
    assert any("trained at 64, 80 px" in line for line in bundle["model_card"]["limitations"])
    # Member 0 sees the 80 px input resized to its own 64 px, member 1 the input as it is.
    resized = _untempered({**small, "preprocess": large["preprocess"]})
    resized.model.backbone = _Resized(resized.model.backbone, 64)
    expected = np.mean([p.predict_frame(frame, progress=False)[P_COLS].to_numpy()
                        for p in (resized, _untempered(large))], 0)
    predictor = _untempered(bundle)
    seen = []
    for part in predictor.model.backbone.parts:
        part.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].shape[-1]))
    got = predictor.predict_frame(frame, progress=False)[P_COLS].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert seen[:2] == [64, 80]
    # The exported graph resizes the same way; Grad-CAM still gives one map at the ensemble's input size.
    assert main(["export", "--model", str(path)]) == 0
    ref = Predictor.from_bundle(path).predict_frame(frame, progress=False)[P_COLS].to_numpy()
    for backend in GRAPH_RUNTIMES:
        graph = Predictor.from_bundle(path, backend=backend).predict_frame(frame, progress=False)[P_COLS].to_numpy()
        assert np.abs(graph - ref).max() <= 1e-4, backend
    image = next(iter(frame["path"]))
    assert GradCam(Predictor.from_bundle(path))(image, 50, "male", "back").heat.shape == (80, 80)
    broken = copy.deepcopy(bundle)
    broken["model_args"]["ensemble"][1]["input_size"] = 72
    with pytest.raises(BundleError, match="input sizes"):
        check_bundle(broken, "ensemble")


def test_runs_on_one_split_share_their_averaged_out_of_fold_predictions(folds, tmp_path):
    """The folds of two k-fold runs (e.g. Lite0 and Lite2 `--all-folds`): the trust layer is fit on each image's
    mean probability over the members that did not train on it, from both runs' oof_predictions.csv."""
    oof = _oof_csv(folds)
    other = oof.assign(**{f"logit_{c}": oof[f"logit_{c}"] * 0.5 + (0.3 if c == "nv" else 0.0) for c in CLASSES})
    runs = []
    for name, table in (("run_a", oof), ("run_b", other)):
        for k, fold in enumerate(folds):
            shutil.copytree(fold, tmp_path / name / f"fold{k}")
            runs.append(tmp_path / name / f"fold{k}")
        table.to_csv(tmp_path / name / OOF_NAME, index=False)
    logits = [f"logit_{c}" for c in CLASSES]
    mean = averaged_oof([tmp_path / "run_a" / OOF_NAME, tmp_path / "run_b" / OOF_NAME], list(CLASSES))
    probs = [torch.from_numpy(t[logits].to_numpy(np.float64)).softmax(1).numpy() for t in (oof, other)]
    np.testing.assert_allclose(np.exp(mean[logits].to_numpy()), np.mean(probs, 0), atol=1e-9)
    assert list(mean["image_id"]) == list(oof["image_id"].astype(str))
    bundle = read_bundle(build_ensemble(runs, tmp_path / "ens"))
    assert bundle["trust"]["figures"]["out_of_fold_source"].startswith("the average of")
    assert bundle["trust"]["figures"]["validation_images"] == len(oof)
    assert "did not train on each image, averaged" in bundle["metrics"]["source"]
    # Only fold 0's members: only fold 0's rows (the other fold was scored by networks outside the ensemble).
    one_fold = read_bundle(build_ensemble([runs[0], runs[2]], tmp_path / "fold0"))
    assert one_fold["trust"]["figures"]["validation_images"] == int((oof["fold"] == 0).sum()) < len(oof)
    other.assign(dx=np.where(other["dx"] == "nv", "mel", other["dx"])).to_csv(tmp_path / "run_b" / OOF_NAME,
                                                                            index=False)
    with pytest.raises(ValueError, match="different diagnoses"):
        build_ensemble(runs, tmp_path / "ens_labels")
    other.assign(fold=1 - other["fold"]).to_csv(tmp_path / "run_b" / OOF_NAME, index=False)
    with pytest.raises(ValueError, match="not trained on the same split"):
        build_ensemble(runs, tmp_path / "ens2")


def test_members_sharing_a_validation_split_are_averaged_on_it(folds, wide):
    """Two runs on the same fold and no oof_predictions.csv: every validation image once, with the mean of both
    members' probabilities (what the ensemble of the two predicts for it), not the first member's alone."""
    from skain.training.ensemble import predict_own_validation, read_members
    members = read_members([folds[0], wide])
    got = predict_own_validation(members, None, torch.device("cpu"))
    alone = [predict_own_validation([m], None, torch.device("cpu")).set_index("image_id") for m in members]
    assert len(got) == len(alone[0]) == len(alone[1]) and not got["image_id"].duplicated().any()
    cols = [f"logit_{c}" for c in CLASSES]
    probs = [torch.from_numpy(a.loc[got["image_id"], cols].to_numpy(np.float64)).softmax(1).numpy() for a in alone]
    assert not np.allclose(probs[0], probs[1], atol=1e-3)
    np.testing.assert_allclose(np.exp(got[cols].to_numpy()), np.mean(probs, 0), atol=1e-9)
    assert (got["label"].to_numpy() == alone[0].loc[got["image_id"], "label"].to_numpy()).all()


def test_an_ensemble_of_runs_on_one_split_calibrates_n_views_on_that_split(folds, wide, tmp_path, capsys):
    """Runs validated on the same images (one split, different seeds or backbones): the ensemble's folder gives
    that split to `skain calibrate --tta N --default`; the folds of a k-fold run (no image held out from all of
    them) are refused before anything is written."""
    from skain.training.trust_fit import folder_split
    shared = tmp_path / "shared"
    assert main(["ensemble", "--runs", str(folds[0]), str(wide), "--output", str(shared), "--device", "cpu"]) == 0
    frame, train_idx, val_idx, _ = folder_split(shared)
    built = read_bundle(shared / "best_model.pt")  # held out from both members: its own figures, said so
    assert built["metrics"]["source"].startswith("the ensemble's own predictions on the validation split")
    assert not any("its own accuracy is not measured" in x for x in built["model_card"]["limitations"])
    own, _, own_val, _ = folder_split(folds[0])
    assert set(frame["image_id"].iloc[val_idx]) == set(own["image_id"].iloc[own_val])
    assert not set(frame["image_id"].iloc[val_idx]) & set(frame["image_id"].iloc[train_idx])
    assert main(["calibrate", "--model", str(shared), "--tta", "2", "--default", "--device", "cpu"]) == 0
    bundle = read_bundle(shared / "best_model.pt")
    assert bundle["inference"] == {"tta": 2} and bundle["trust"]["views"]["2"]["validation_images"] == len(val_idx)
    from skain.web import create_app
    from skain.web.service import Service
    from test_model_figures import local_paths
    client = create_app({"TESTING": True}, service=Service.load(shared)).test_client()
    info = client.get("/api/model").json
    assert local_paths(info) == []  # the members are named by their folders, not this machine's paths
    page = client.get("/")
    assert page.status_code == 200  # the About panel renders an ensemble's OOD figures (its members' mean)
    import html
    assert "the mean of its 2 networks' own" in html.unescape(page.get_data(as_text=True))
    kfold = tmp_path / "kfold"
    assert main(["ensemble", "--runs", *map(str, folds), "--output", str(kfold), "--device", "cpu"]) == 0
    assert "the ensemble itself has no held-out images" in read_bundle(kfold / "best_model.pt")["metrics"]["source"]
    before = (kfold / "best_model.pt").read_bytes()
    capsys.readouterr()
    assert main(["calibrate", "--model", str(kfold), "--tta", "2", "--device", "cpu"]) != 0
    assert "validated on different images" in capsys.readouterr().err
    assert (kfold / "best_model.pt").read_bytes() == before
