"""`skain decide --validation --model RUN`: tau chosen for one model on its own validation split, through the
inference it runs by default, with a cross-fitted estimate that never scores a half with the tau it chose."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from conftest import tiny_config
from skain.cli import main
from skain.data.schema import CLASSES, DataError
from skain.evaluation.hub_export import held_out_figures
from skain.inference.decision import adjusted_pred, fit_tau, log_prior_from_counts
from skain.inference.predictor import Predictor
from skain.modelfile.bundle import BUNDLE_NAME
from skain.modelfile.load import read_bundle
from skain.training.decide_validation import cross_fitted, require_every_class
from skain.training.runfolder import TEST_PREDICTIONS, VAL_PREDICTIONS
from skain.training.train import fit
from skain.training.trust_fit import fit_views_folder, folder_split
from skain.trust.crossfit import halves
from skain.trust.modelcard import decision_validation
from skain.web import create_app
from skain.web.service import Service

P_COLUMNS = [f"p_{c}" for c in CLASSES]


def _copy(trained: Path, tmp: Path, nv_shift: float = 0.0) -> Path:
    """A copy of the tiny run; with `nv_shift`, a network that under-calls the rare classes, as HAM10000's
    two-thirds of nevi teach one to: its last layer favours nv by that much, and its temperature is 5 (the tiny
    network separates the synthetic drawings perfectly, and at its own temperature of about 0.05 no prior
    adjustment could move a decision). Its validation split then has a rule to find."""
    out = tmp / "run"
    shutil.copytree(trained, out)
    if nv_shift:
        bundle = torch.load(out / BUNDLE_NAME, map_location="cpu", weights_only=True)
        last = [k for k, v in bundle["state_dict"].items() if k.endswith(".bias") and v.shape == (len(CLASSES),)][-1]
        bundle["state_dict"][last][CLASSES.index("nv")] += nv_shift
        bundle["trust"]["temperature"] = 5.0
        torch.save(bundle, out / BUNDLE_NAME)
        for name in (TEST_PREDICTIONS, VAL_PREDICTIONS):  # the run's own per-image logits, shifted the same way
            if (out / name).is_file():
                table = pd.read_csv(out / name)
                table["logit_nv"] += nv_shift
                table.to_csv(out / name, index=False)
    return out


@pytest.fixture(scope="module")
def holdout_run(synth_root, tmp_path_factory) -> Path:
    """A tiny `--holdout` run (a test fold that chose nothing) with a validation split large enough to hold
    every class."""
    out = tmp_path_factory.mktemp("holdout")
    cfg = tiny_config(synth_root / "dataset_train", out, epochs=2, seed=1, test_tta=1)
    fit(replace(cfg, data=replace(cfg.data, holdout=True, folds=4, inner_folds=3)))
    return out


def _under_called(seed=0, n=600):
    """Probabilities of a model that under-calls the rare classes, so the rule has something to fix."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.04, 0.05, 0.11, 0.01, 0.11, 0.66, 0.02])
    labels = rng.choice(7, size=n, p=prior)
    logits = rng.normal(0, 1, (n, 7)) + 2.0 * np.eye(7)[labels] + 1.5 * np.log(prior)
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True), labels, np.log(prior)


def _own_choice(out: Path, views: int) -> tuple[float, float]:
    """tau chosen independently: the Predictor's calibrated probabilities on the run's validation rows (as
    `skain predict` makes them), the prior of its training split's labels; and the balanced accuracy under it."""
    frame, train_idx, val_idx, _ = folder_split(out)
    preds = Predictor.from_bundle(out, device="cpu", tta=views).predict_frame(frame.iloc[val_idx], progress=False)
    probs = preds[P_COLUMNS].to_numpy(np.float64)
    labels = frame.iloc[val_idx]["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    prior = log_prior_from_counts(frame.iloc[train_idx]["dx"].value_counts().to_dict())
    tau = fit_tau(probs, labels, prior)
    return tau, balanced_accuracy_score(labels, adjusted_pred(probs, prior, tau))


def test_cross_fitted_halves_never_score_a_half_with_its_own_tau():
    probs, labels, prior = _under_called()
    parts = [np.arange(0, 600, 2), np.arange(1, 600, 2)]
    a = cross_fitted(probs, labels, prior, parts)
    poisoned = labels.copy()
    poisoned[parts[0]] = 3  # half 0's labels changed: the tau half 0 is scored with must not move
    b = cross_fitted(probs, poisoned, prior, parts)
    assert a["halves"][0]["tau"] == b["halves"][0]["tau"] and a["halves"][1]["tau"] != b["halves"][1]["tau"]
    for i, half in enumerate(a["halves"]):
        inside, other = parts[i], parts[1 - i]
        assert half["tau"] == fit_tau(probs[other], labels[other], prior)
        assert half["adjusted"] == pytest.approx(
            balanced_accuracy_score(labels[inside], adjusted_pred(probs[inside], prior, half["tau"])))
    assert a["adjusted"]["mean"] > a["argmax"]["mean"] + 0.03  # the rule helps a model that under-calls
    assert cross_fitted(probs, labels, prior, None) is None


def test_a_validation_split_without_some_class_is_refused():
    require_every_class(pd.Series(list(CLASSES)), list(CLASSES))
    with pytest.raises(DataError, match="no image of df, vasc"):
        require_every_class(pd.Series(["akiec", "bcc", "bkl", "mel", "nv"]), list(CLASSES))


def test_decide_validation_stores_the_tau_its_validation_split_chooses(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path, nv_shift=5.0)
    tau, balacc = _own_choice(out, views=1)
    assert tau > 0  # the rule names the rare classes the shifted network under-calls
    assert main(["decide", "--validation", "--model", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    bundle = read_bundle(out / BUNDLE_NAME)
    rule = bundle["decision"]
    assert rule["tau"] == tau and f"tau = {tau:.2f}" in printed
    assert f"{len(folder_split(out)[2])} images, in-sample for tau" in printed
    frame, train_idx, val_idx, _ = folder_split(out)
    assert rule["log_prior"] == pytest.approx(list(log_prior_from_counts(frame.iloc[train_idx]["dx"].value_counts().to_dict())))
    stored = rule["validation"]
    assert stored["n"] == len(val_idx) and stored["views"] == 1 and stored["split"] == "validation"
    assert stored["balanced_accuracy"] == pytest.approx(balacc)
    assert "chose the epoch, the temperature and tau" in stored["measured_on"]
    # the halves are the trust fit's lesion-grouped halves of the same rows; each scored with the other's tau
    parts = halves(frame.iloc[val_idx].reset_index(drop=True), 0)
    held = rule["cross_fitted_balanced_accuracy"]
    assert [h["n"] for h in held["halves"]] == [len(p) for p in parts]
    shown = decision_validation(bundle)
    assert shown["tau"] == tau and shown["cross_validated"]["rule"] == held["adjusted"]
    assert "validation lesions" in shown["cross_validated"]["shown"]
    # the model now decides with it wherever it answers
    preds = Predictor.from_bundle(out, device="cpu").predict_frame(frame.iloc[val_idx], progress=False)
    want = np.array(CLASSES)[adjusted_pred(preds[P_COLUMNS].to_numpy(np.float64), np.asarray(rule["log_prior"]), tau)]
    assert (preds["pred"].to_numpy() == want).all()
    assert f"tau = {tau:.2f}" in (out / "model_card.md").read_text()
    listed = [f for f in held_out_figures(bundle) if "cross-fitted on the validation split" in f["held_out"]]
    assert [f["value"] for f in listed] == [round(held["adjusted"]["mean"], 4)]  # the Hugging Face card's figures
    page = create_app({"TESTING": True}, service=Service.load(out)).test_client().get("/").get_data(as_text=True)
    assert "each half of this model&#39;s validation lesions" in page or "each half of this model's validation lesions" in page


def test_decide_validation_runs_the_views_the_model_answers_with(trained, tmp_path):
    out = _copy(trained, tmp_path, nv_shift=5.0)
    fit_views_folder(out, 2, make_default=True)
    tau, balacc = _own_choice(out, views=2)
    assert main(["decide", "--validation", "--model", str(out), "--device", "cpu"]) == 0
    stored = read_bundle(out / BUNDLE_NAME)["decision"]
    assert stored["tau"] == tau and stored["validation"]["views"] == 2 and "2 TTA views" in stored["fit_on"]
    assert stored["validation"]["balanced_accuracy"] == pytest.approx(balacc)


def test_decide_validation_refuses_what_it_cannot_fit_and_changes_nothing(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path)
    before = (out / BUNDLE_NAME).read_bytes()
    assert main(["decide", "--validation"]) != 0
    assert "needs --model" in capsys.readouterr().err
    assert main(["decide", "--validation", "--model", str(out / BUNDLE_NAME)]) != 0
    assert "output folder" in capsys.readouterr().err
    assert main(["decide", "--validation", "--model", str(tmp_path)]) != 0  # a folder, but no run in it
    assert "not a training or ensemble output folder" in capsys.readouterr().err
    assert (out / BUNDLE_NAME).read_bytes() == before
    bundle = read_bundle(out / BUNDLE_NAME)
    bundle["inference"] = {"tta": 4}  # a default of 4 views with no temperature fitted for them
    torch.save(bundle, out / BUNDLE_NAME)
    before = (out / BUNDLE_NAME).read_bytes()
    assert main(["decide", "--validation", "--model", str(out)]) != 0
    assert "skain calibrate --tta 4" in capsys.readouterr().err
    assert (out / BUNDLE_NAME).read_bytes() == before


def test_a_holdout_run_shows_its_test_folds_figures_under_the_tau_its_validation_chose(holdout_run, tmp_path, capsys):
    """tau from the validation split; the figures beside it from the test fold, which chose nothing (not tau)."""
    out = _copy(holdout_run, tmp_path, nv_shift=5.0)
    tau, _ = _own_choice(out, views=1)
    assert main(["decide", "--validation", "--model", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    rule = read_bundle(out / BUNDLE_NAME)["decision"]
    test = pd.read_csv(out / TEST_PREDICTIONS)
    _, _, val_idx, _ = folder_split(out)
    assert f"chosen on {len(val_idx)} validation images" in printed and "Test-fold balanced accuracy" in printed
    assert rule["tau"] == tau and rule["validation"]["split"] == "test" and rule["validation"]["n"] == len(test)
    assert "chose nothing" in rule["validation"]["measured_on"]
    logits = test[[f"logit_{c}" for c in CLASSES]].to_numpy(np.float64)
    probs = torch.from_numpy(logits / 5.0).softmax(1).numpy()
    truth = test["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    want = balanced_accuracy_score(truth, adjusted_pred(probs, np.asarray(rule["log_prior"]), tau))
    assert rule["validation"]["balanced_accuracy"] == pytest.approx(want)
