"""End-to-end training on synthetic data: outputs, learning, bundle round trip, resume and refusals."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config
from skain.data.layout import discover, load_table
from skain.data.schema import DataError
from skain.inference.predictor import Predictor
from skain.modelfile.load import read_bundle
from skain.training.train import fit


def test_training_writes_the_seed_outputs_and_a_self_describing_bundle(trained):
    for name in ("best_model.pt", "last.pt", "label_map.json", "vocabularies.json", "age_stats.json",
                 "train_history.csv", "metrics.json", "config.json", "split.csv"):
        assert (trained / name).is_file(), name
    bundle = torch.load(trained / "best_model.pt", weights_only=True)
    assert bundle["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert bundle["preprocess"]["input_size"] == 64 and len(bundle["preprocess"]["mean"]) == 3
    assert bundle["encoder"]["sex_vocab"][0] == "unknown"
    assert json.loads((trained / "label_map.json").read_text())["mel"] == 4
    history = pd.read_csv(trained / "train_history.csv")
    for col in ("train_loss", "val_loss", "accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "recall_mel"):
        assert col in history.columns
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["data"]["synthetic"] is True and "SYNTHETIC" in metrics["note"]
    assert len(metrics["validation"]["confusion_matrix"]) == 7
    assert set(metrics["validation"]["per_class"]["mel"]) >= {"precision", "recall", "f1", "auc"}


def test_synthetic_run_learns_well_above_chance(trained):
    metrics = json.loads((trained / "metrics.json").read_text())["validation"]
    assert metrics["balanced_accuracy"] > 0.40, metrics["balanced_accuracy"]  # chance is 1/7 = 0.14
    assert metrics["macro_auc"] > 0.75


def test_metrics_carry_lesion_resampled_intervals_of_the_scored_images(trained):
    """metrics.json: 95% intervals of the scored split (validation here), lesions resampled, around the figures of
    the same predictions (val_predictions.csv), recorded with their seed and number of resamples."""
    from sklearn.metrics import balanced_accuracy_score
    block = json.loads((trained / "metrics.json").read_text())["intervals"]
    assert block["unit"] == "lesion" and block["resamples"] == 2000 and block["seed"] == 0
    pred = pd.read_csv(trained / "val_predictions.csv")
    ba = block["metrics"]["balanced_accuracy"]
    assert ba["value"] == pytest.approx(balanced_accuracy_score(pred["dx"], pred["pred"]))
    for name in ("balanced_accuracy", "macro_auc", "melanoma_auc"):
        m = block["metrics"][name]
        assert m["ci"][0] <= m["value"] <= m["ci"][1], name


def test_split_file_has_no_lesion_on_both_sides(trained):
    split = pd.read_csv(trained / "split.csv")
    sides = split.groupby("lesion_id")["split"].nunique()
    assert (sides == 1).all() and set(split["split"]) == {"train", "val"}


def test_bundle_round_trip_reproduces_validation_predictions_exactly(trained, synth_root):
    bundle = read_bundle(trained)
    split = pd.read_csv(trained / "split.csv")
    frame = load_table(discover(synth_root / "dataset_train"))
    val = frame[frame["image_id"].isin(split.loc[split["split"] == "val", "image_id"])]
    first = Predictor(bundle).predict_frame(val, progress=False)
    again = Predictor.from_bundle(trained / "best_model.pt").predict_frame(val, progress=False)
    cols = [c for c in first if c.startswith("p_")]
    np.testing.assert_array_equal(first[cols].to_numpy(), again[cols].to_numpy())
    acc = (again["pred"].to_numpy() == val["dx"].to_numpy()).mean()
    assert abs(acc - bundle["metrics"]["accuracy"]) < 1e-9  # the bundle's metrics are what it predicts


def test_refuses_to_train_into_an_existing_run_without_overwrite(trained, synth_root):
    cfg = tiny_config(synth_root / "dataset_train", trained, overwrite=False)
    with pytest.raises(DataError, match="already holds a training run"):
        fit(cfg)


def test_resume_after_interruption_matches_an_uninterrupted_run(synth_root, tmp_path):
    full = fit(tiny_config(synth_root / "dataset_train", tmp_path / "full", epochs=3, seed=3))
    fit(tiny_config(synth_root / "dataset_train", tmp_path / "part", epochs=1, seed=3))
    resumed = fit(tiny_config(synth_root / "dataset_train", tmp_path / "part", epochs=3, seed=3, resume=True,
                              overwrite=False))
    assert resumed["epochs_trained"] == 3
    a = pd.read_csv(tmp_path / "full" / "train_history.csv")
    b = pd.read_csv(tmp_path / "part" / "train_history.csv")
    np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=0, atol=1e-6)
    assert full["validation"]["balanced_accuracy"] == resumed["validation"]["balanced_accuracy"]


def test_image_only_ablation_trains(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "dataset_train", tmp_path / "img", epochs=1)
    cfg.model.image_only = True
    fit(cfg)
    bundle = read_bundle(tmp_path / "img")
    assert bundle["model_args"]["image_only"] and not any(k.startswith("meta.") for k in bundle["state_dict"])
