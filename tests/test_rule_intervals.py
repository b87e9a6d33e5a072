"""A model that decides with its prior-adjusted rule carries 95% intervals of the rule's own decisions (not the
arg-max ones), stored beside the rule's figures by `store_rule_figures`, and shows them where it shows those
figures: the model card, the page's "About this model", GET /api/model and the Hugging Face export card. A rule
stored before these intervals existed still renders, without them.

The models are the tiny trained run with a rule forced strong enough to change its decisions
(test_model_figures._forced_rule)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from skain.evaluation.bootstrap import Sample, bootstrap
from skain.evaluation.hub_export import export_hf
from skain.inference.decision import Decision
from skain.modelfile.bundle import BUNDLE_NAME
from skain.modelfile.load import read_bundle
from skain.training.runfolder import SPLIT_NAME, VAL_PREDICTIONS
from skain.trust.modelcard import interval_summary, to_markdown
from test_model_figures import _forced_rule
from test_modelcard_intervals import _dd
from test_modelcard_intervals import _service_view as _view


@pytest.fixture(scope="module")
def ruled(trained, tmp_path_factory) -> Path:
    return _forced_rule(trained, tmp_path_factory.mktemp("ruled"))


@pytest.fixture(scope="module")
def ruled_without_intervals(trained, tmp_path_factory) -> Path:
    """The forced-rule run as a bundle whose rule figures were stored before their intervals existed."""
    out = _forced_rule(trained, tmp_path_factory.mktemp("ruled_old"))
    bundle = torch.load(out / BUNDLE_NAME, map_location="cpu", weights_only=True)
    bundle["decision"]["validation"].pop("intervals")
    bundle["model_card"]["decision"].pop("intervals", None)
    torch.save(bundle, out / BUNDLE_NAME)
    return out


def _pct_ci(entry: dict) -> str:
    lo, hi = entry["ci"]
    return f"95% CI {100 * lo:.1f}–{100 * hi:.1f}%"


# ------------------------------------------------------------------------------------------- the bundle
def test_stored_rule_intervals_are_those_of_the_rules_decisions_and_surround_its_figures(ruled):
    """The stored intervals are the bootstrap of the rule's decisions on the rows its figures come from (lesions
    from the run's split.csv), their point values are the stored rule figures, and they differ from the arg-max
    intervals of the same images (the forced rule changes decisions)."""
    bundle = read_bundle(ruled / BUNDLE_NAME)
    stored = bundle["decision"]["validation"]
    iv = stored["intervals"]
    assert iv["resamples"] == 2000 and iv["seed"] == 0 and iv["unit"] == "lesion" and iv["split"] == "validation"
    ba = iv["metrics"]["balanced_accuracy"]
    assert ba["value"] == pytest.approx(stored["balanced_accuracy"]) and ba["ci"][0] <= ba["value"] <= ba["ci"][1]
    classes = list(bundle["classes"])
    for i, c in enumerate(classes):
        if stored["recall"][c] is not None:
            assert iv["metrics"][f"recall_{i}"]["value"] == pytest.approx(stored["recall"][c]), c

    table = pd.read_csv(ruled / VAL_PREDICTIONS)  # the rows rule_figures_from_run scored, recomputed by hand
    z = torch.from_numpy(table[[f"logit_{c}" for c in classes]].to_numpy(np.float64)) / stored["temperature"]
    probs = z.softmax(1).numpy()
    labels = table["dx"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    lesions = table["image_id"].map(pd.read_csv(ruled / SPLIT_NAME, dtype=str).set_index("image_id")["lesion_id"])
    mel = classes.index("mel")
    rule = bootstrap(Sample(labels, probs, Decision(bundle["decision"], classes)(probs), mel=mel), lesions.to_numpy())
    argmax = bootstrap(Sample(labels, probs, probs.argmax(1), mel=mel), lesions.to_numpy())
    assert iv["metrics"] == rule["metrics"]
    assert argmax["metrics"]["balanced_accuracy"]["value"] == pytest.approx(stored["argmax"]["balanced_accuracy"])
    assert ba["value"] != pytest.approx(argmax["metrics"]["balanced_accuracy"]["value"])
    assert tuple(ba["ci"]) != tuple(argmax["metrics"]["balanced_accuracy"]["ci"])
    assert ba["value"] != pytest.approx(bundle["metrics"]["intervals"]["metrics"]["balanced_accuracy"]["value"])


def test_n_views_made_the_default_store_intervals_of_the_rule_over_n_views(ruled, tmp_path):
    """`skain calibrate --tta 2 --default` (fit_views, with the validation frame's lesion ids): the rule's
    figures over 2 views come with their own lesion-resampled intervals."""
    from skain.training.trust_fit import fit_views_folder
    out = tmp_path / "run"
    shutil.copytree(ruled, out)
    one_view = read_bundle(out / BUNDLE_NAME)["decision"]["validation"]["intervals"]
    fit_views_folder(out, 2, make_default=True)
    bundle = read_bundle(out / BUNDLE_NAME)
    stored = bundle["decision"]["validation"]
    iv = stored["intervals"]
    assert stored["views"] == 2 and "over 2 TTA views" in iv["of"] and iv["unit"] == "lesion"
    assert iv["metrics"]["balanced_accuracy"]["value"] == pytest.approx(stored["balanced_accuracy"])
    # other probabilities, other figures (ECE at least: the tiny model's AUCs may be 1.0 for both)
    assert any(iv["metrics"][k] != one_view["metrics"][k] for k in iv["metrics"])
    text = to_markdown(bundle["model_card"])
    assert "2 TTA views averaged" in text and "of the rule's decisions on these images" in text


def test_calibrating_a_model_with_a_rule_stores_its_intervals_with_the_lesions_of_the_frame(ruled, tmp_path):
    """`skain calibrate` (fit_trust, the validation frame at hand) refreshes the rule's figures under its new
    temperature, and their intervals with them, lesions resampled."""
    from skain.training.trust_fit import fit_trust_folder
    out = tmp_path / "run"
    shutil.copytree(ruled, out)
    fit_trust_folder(out)
    stored = read_bundle(out / BUNDLE_NAME)["decision"]["validation"]
    iv = stored["intervals"]
    assert iv["unit"] == "lesion" and iv["resamples"] == 2000 and "single view" in iv["of"]
    assert iv["metrics"]["balanced_accuracy"]["value"] == pytest.approx(stored["balanced_accuracy"])


# ------------------------------------------------------------------------------------------- card, page, API
def test_the_card_shows_the_rules_intervals_beside_its_figures(ruled):
    bundle = read_bundle(ruled / BUNDLE_NAME)
    card, stored = bundle["model_card"], bundle["decision"]["validation"]
    text = to_markdown(card)
    section = text.split("## Validation figures of the decision it makes")[1].split("\n## ")[0]
    iv = interval_summary(stored["intervals"], list(bundle["classes"]))
    lo, hi = iv["figures"]["balanced_accuracy"]["ci"]
    a = stored["argmax"]["balanced_accuracy"]
    assert (f"balanced accuracy {stored['balanced_accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}) with the rule, "
            f"{a:.3f} at arg-max") in section
    lo, hi = iv["recall"]["vasc"]["ci"]
    assert re.search(rf"\| vasc \| {stored['recall']['vasc']:.3f} \| [\d.]+ \| {lo:.3f}-{hi:.3f} \|", section)
    auc = iv["figures"]["macro_auc"]
    assert f"macro AUC {auc['value']:.3f} (95% CI {auc['ci'][0]:.3f}-{auc['ci'][1]:.3f})" in section
    assert "2000 resamples of lesions" in section and "single view" in section


def test_page_and_api_show_the_rules_intervals(ruled):
    info, page = _view(ruled)
    bundle = read_bundle(ruled / BUNDLE_NAME)
    stored = bundle["decision"]["validation"]
    val = info["validation"]
    assert val["figures_of"] == "rule"
    iv = val["intervals"]
    assert iv == interval_summary(stored["intervals"], list(bundle["classes"]))
    assert iv["resamples"] == 2000 and "lesions" in iv["resampled"] and "decision rule" in iv["of"]
    assert val["macro_auc"] == pytest.approx(iv["figures"]["macro_auc"]["value"])
    balacc = _dd(page, "about-balacc")
    assert balacc.startswith(f"{100 * stored['balanced_accuracy']:.1f}% ({_pct_ci(iv['figures']['balanced_accuracy'])})")
    assert "with the decision rule" in balacc and "around" not in balacc
    vasc = re.search(r'<li data-class="vasc">(.*?)</li>', page, re.S).group(1)
    assert _pct_ci(iv["recall"]["vasc"]) in vasc
    auc = iv["figures"]["macro_auc"]
    assert f"(95% CI {auc['ci'][0]:.3f}–{auc['ci'][1]:.3f})" in _dd(page, "about-auc")
    note = re.search(r'id="about-validation-measured"[^>]*>(.*?)</p>', page, re.S).group(1)
    assert "2000 resamples of lesions" in note and "the decision rule's decisions over a single view" in note


def test_a_rule_stored_without_intervals_still_renders(ruled_without_intervals):
    info, page = _view(ruled_without_intervals)
    bundle = read_bundle(ruled_without_intervals / BUNDLE_NAME)
    stored = bundle["decision"]["validation"]
    assert info["validation"]["figures_of"] == "rule" and "intervals" not in info["validation"]
    balacc = _dd(page, "about-balacc")
    assert balacc.startswith(f"{100 * stored['balanced_accuracy']:.1f}% with the decision rule") and "CI" not in balacc
    assert 'id="about-auc"' not in page
    section = to_markdown(bundle["model_card"]).split("## Validation figures of the decision it makes")[1].split("\n## ")[0]
    assert f"balanced accuracy {stored['balanced_accuracy']:.3f} with the rule" in section and "CI" not in section


# ------------------------------------------------------------------------------------------- Hugging Face card
def _front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_the_hub_card_shows_the_rules_figure_with_its_interval(ruled, tmp_path):
    folder, _ = export_hf(ruled, tmp_path / "hf", dtype="float32")
    meta, body = _front_matter((folder / "README.md").read_text())
    bundle = read_bundle(ruled / BUNDLE_NAME)
    stored = bundle["decision"]["validation"]
    results = meta["model-index"][0]["results"]
    rule = next(r for r in results if r["metrics"][0]["name"] == "balanced accuracy, decision rule (prior-adjusted)")
    assert rule["metrics"][0]["value"] == pytest.approx(stored["balanced_accuracy"], abs=1e-4)
    assert set(rule["metrics"][0]) == {"type", "value", "name"} and "validation split" in rule["dataset"]["split"]
    lo, hi = stored["intervals"]["metrics"]["balanced_accuracy"]["ci"]
    row = next(x for x in body.splitlines() if x.startswith("| balanced accuracy, decision rule"))
    assert f"| {stored['balanced_accuracy']:.4f} | {lo:.3f}-{hi:.3f} |" in row
    held = bundle["trust"]["figures"]["intervals"]["metrics"]["triage_sensitivity"]["ci"]
    assert f"{held[0]:.3f}-{held[1]:.3f}" in next(x for x in body.splitlines() if x.startswith("| malignant triage sens"))
    assert "95% intervals: percentile bootstrap, 2000 resamples of lesions" in body
    assert f"(95% CI {lo:.3f}-{hi:.3f}) with the rule" in body  # and the card's own section below


def test_the_hub_card_of_a_model_without_intervals_is_valid_and_says_none(ruled_without_intervals, tmp_path):
    shutil.copytree(ruled_without_intervals, tmp_path / "run")
    bundle = torch.load(tmp_path / "run" / BUNDLE_NAME, map_location="cpu", weights_only=True)
    bundle["metrics"].pop("intervals")
    bundle["trust"]["figures"].pop("intervals")
    torch.save(bundle, tmp_path / "run" / BUNDLE_NAME)
    folder, _ = export_hf(tmp_path / "run", tmp_path / "hf", dtype="float32")
    meta, body = _front_matter((folder / "README.md").read_text())
    assert meta["model-index"][0]["results"] and "resamples" not in body.split("## Held-out figures")[1].split("\n## ")[0]
    row = next(x for x in body.splitlines() if x.startswith("| balanced accuracy, decision rule"))
    assert "| n/a |" in row
