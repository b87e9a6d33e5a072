"""A model that carries 95% intervals shows them beside its figures on the model card, on the page's "About this
model" and in GET /api/model, with the number of resamples and what was resampled; a model without them (the
shipped file) shows its figures as before, with no interval and no error."""
from __future__ import annotations

import html as html_lib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from skain.modelfile.bundle import BUNDLE_NAME
from skain.modelfile.load import SHIPPED_MODEL, read_bundle
from skain.trust.modelcard import interval_summary, to_markdown
from skain.web import create_app
from skain.web.service import Service

FIGURES = ("balanced_accuracy", "macro_auc", "melanoma_auc", "ece")
TRUST = ("ece", "triage_sensitivity", "triage_specificity", "ood_false_rejection")


def _bundle(path: Path) -> dict:
    return torch.load(path / BUNDLE_NAME, map_location="cpu", weights_only=True)


def _service_view(model: Path) -> tuple[dict, str]:
    client = create_app({"TESTING": True}, service=Service.load(model)).test_client()
    return client.get("/api/model").json, html_lib.unescape(client.get("/").get_data(as_text=True))


def _dd(page: str, ident: str) -> str:
    found = re.search(rf'id="{ident}"[^>]*>(.*?)</dd>', page, re.S)
    assert found, f"the page lost #{ident}"
    return re.sub(r"<[^>]+>", "", found.group(1))


@pytest.fixture(scope="module")
def without_intervals(trained, tmp_path_factory) -> Path:
    """The tiny run as a bundle written before intervals existed: none in its metrics, trust figures or card."""
    out = tmp_path_factory.mktemp("no_intervals") / "run"
    shutil.copytree(trained, out)
    bundle = _bundle(out)
    bundle["metrics"].pop("intervals")
    bundle["trust"]["figures"].pop("intervals")
    for key in ("trust_intervals",):
        bundle["model_card"].pop(key)
    bundle["model_card"]["metrics"].pop("intervals")
    torch.save(bundle, out / BUNDLE_NAME)
    return out


@pytest.fixture(scope="module")
def with_test_fold(trained, tmp_path_factory) -> Path:
    """The tiny run's intervals relabelled as a test fold's (what `skain train --holdout` stores)."""
    out = tmp_path_factory.mktemp("test_fold") / "run"
    shutil.copytree(trained, out)
    bundle = _bundle(out)
    bundle["metrics"]["intervals"]["split"] = "test"
    bundle["model_card"]["metrics"]["intervals"]["split"] = "test"
    torch.save(bundle, out / BUNDLE_NAME)
    return out


# ------------------------------------------------------------------------------------------- the bundle
def test_training_carries_the_scored_intervals_of_metrics_json_into_the_bundle(trained):
    bundle = _bundle(trained)
    stored = json.loads((trained / "metrics.json").read_text())["intervals"]
    assert bundle["metrics"]["intervals"]["split"] == stored["split"] == "validation"
    assert bundle["metrics"]["intervals"]["metrics"]["balanced_accuracy"]["value"] == pytest.approx(
        stored["metrics"]["balanced_accuracy"]["value"])
    card = bundle["model_card"]["metrics"]["intervals"]
    assert card == interval_summary(stored, list(bundle["classes"]))
    assert card["resamples"] == 2000 and card["unit"] == "lesion" and "lesions" in card["resampled"]
    assert set(FIGURES) <= set(card["figures"]) and set(card["recall"]) == set(bundle["classes"])


def test_held_out_trust_intervals_surround_the_held_out_figures_they_belong_to(trained):
    """The held-out ECE, triage sensitivity/specificity and OOD false rejection carry intervals of the same
    cross-fitted rows: each interval's point value is the figure the card shows."""
    bundle = _bundle(trained)
    figures = bundle["trust"]["figures"]
    block = interval_summary(figures["intervals"], list(bundle["classes"]))
    assert block == bundle["model_card"]["trust_intervals"] and block["resamples"] == 2000
    shown = {"ece": figures["calibration"]["held_out"]["ece_after"],
             "triage_sensitivity": figures["triage"]["held_out"]["sensitivity"],
             "triage_specificity": figures["triage"]["held_out"]["specificity"],
             "ood_false_rejection": figures["ood"]["held_out_false_rejection"]}
    for name, value in shown.items():
        got = block["figures"][name]
        assert got["value"] == pytest.approx(value), name
        assert got["ci"][0] - 1e-9 <= value <= got["ci"][1] + 1e-9, name


# ------------------------------------------------------------------------------------------- card
def test_the_card_shows_intervals_beside_its_figures(trained):
    bundle = _bundle(trained)
    card = bundle["model_card"]
    text, iv, tv = to_markdown(card), card["metrics"]["intervals"], card["trust_intervals"]
    v = card["metrics"]["validation"]

    def ci(block, name, pct=False, shown=None):
        lo, hi = block["figures"][name]["ci"]
        text = f"{100 * lo:.1f}%-{100 * hi:.1f}%" if pct else f"{lo:.3f}-{hi:.3f}"
        value = block["figures"][name]["value"]
        if shown is not None and abs(value - shown) >= 5e-4:  # the predictor's figure, where it differs
            text += f" around {100 * value:.1f}%" if pct else f" around {value:.3f}"
        return f"(95% CI {text})"
    ba, auc = v["balanced_accuracy"], v["macro_auc"]
    assert f"balanced accuracy {ba:.3f} {ci(iv, 'balanced_accuracy', shown=ba)}" in text
    assert f"macro AUC {auc:.3f} {ci(iv, 'macro_auc', shown=auc)}" in text
    assert f"melanoma AUC {iv['figures']['melanoma_auc']['value']:.3f} {ci(iv, 'melanoma_auc')}" in text
    lo, hi = iv["recall"]["mel"]["ci"]
    assert re.search(rf"\| mel \| {card['metrics']['per_class']['mel']['recall']:.3f} \|.*\| {lo:.3f}-{hi:.3f}", text)
    assert f"{card['calibration']['held_out']['ece_after']:.3f} {ci(tv, 'ece')}" in text
    assert f"sensitivity {100 * card['triage']['held_out']['sensitivity']:.1f}% {ci(tv, 'triage_sensitivity', True)}" in text
    assert f"{100 * card['ood']['held_out_false_rejection']:.1f}% held-out {ci(tv, 'ood_false_rejection', True)}" in text
    assert "2000 resamples of lesions" in text


def test_an_interval_whose_figure_differs_from_the_one_beside_it_says_around_which(trained, tmp_path):
    """The training-time figure (its validation pass) and the predictor's rescoring of the same images can
    differ by an image or two; the interval then names the figure it surrounds instead of passing for the other."""
    bundle = _bundle(trained)
    card = bundle["model_card"]
    value = card["metrics"]["intervals"]["figures"]["balanced_accuracy"]["value"]
    card["metrics"]["validation"]["balanced_accuracy"] = value + 0.01
    assert f"around {value:.3f})" in to_markdown(card)
    card["metrics"]["validation"]["balanced_accuracy"] = value
    line = next(x for x in to_markdown(card).splitlines() if x.startswith("- balanced accuracy"))
    assert line.startswith(f"- balanced accuracy {value:.3f} (95% CI") and "around" not in line.split(",")[0]
    shutil.copytree(trained, tmp_path / "run")
    bundle["metrics"]["balanced_accuracy"] = value + 0.01
    torch.save(bundle, tmp_path / "run" / BUNDLE_NAME)
    _, page = _service_view(tmp_path / "run")
    assert f"around {100 * value:.1f}%)" in _dd(page, "about-balacc")


def test_a_test_folds_intervals_get_their_own_section_not_the_validation_figures(with_test_fold):
    card = _bundle(with_test_fold)["model_card"]
    text = to_markdown(card)
    assert "## Test fold with 95% intervals" in text and "2000 resamples of lesions" in text
    head = text.split("## Validation metrics at arg-max")[1].split("\n\n")[0]
    assert "CI" not in head  # the validation figures are not the test fold's


def test_a_card_without_intervals_renders_as_before(without_intervals):
    card = _bundle(without_intervals)["model_card"]
    text = to_markdown(card)
    assert "CI" not in text and "resamples" not in text
    assert f"balanced accuracy {card['metrics']['validation']['balanced_accuracy']:.3f}, accuracy" in text


# ------------------------------------------------------------------------------------------- page and API
def test_api_model_gives_each_figures_interval_and_how_it_was_made(trained):
    info, _ = _service_view(trained)
    bundle = _bundle(trained)
    iv = info["validation"]["intervals"]
    assert iv["split"] == "validation" and iv["resamples"] == 2000 and "lesions" in iv["resampled"]
    ba = iv["figures"]["balanced_accuracy"]
    assert ba["ci"][0] <= ba["value"] <= ba["ci"][1]
    assert set(iv["recall"]) == set(bundle["classes"])
    assert set(TRUST) <= set(info["trust_intervals"]["figures"]) and "test_fold" not in info
    assert info["model_card"]["trust_intervals"] == info["trust_intervals"]


def test_page_shows_intervals_beside_balanced_accuracy_auc_recall_and_trust_figures(trained):
    info, page = _service_view(trained)
    iv, tv = info["validation"]["intervals"], info["trust_intervals"]
    lo, hi = iv["figures"]["balanced_accuracy"]["ci"]
    assert f"(95% CI {100 * lo:.1f}–{100 * hi:.1f}%" in _dd(page, "about-balacc")
    auc = _dd(page, "about-auc")
    lo, hi = iv["figures"]["macro_auc"]["ci"]
    assert f"macro\n        {info['validation']['macro_auc']:.3f} (95% CI {lo:.3f}–{hi:.3f}" in auc and "melanoma" in auc
    recall = re.search(r'<li data-class="mel">(.*?)</li>', page, re.S).group(1)
    lo, hi = iv["recall"]["mel"]["ci"]
    assert f"95% CI {100 * lo:.1f}–{100 * hi:.1f}%" in recall
    lo, hi = tv["figures"]["triage_sensitivity"]["ci"]
    assert f"sensitivity 95% CI {100 * lo:.1f}–{100 * hi:.1f}%" in _dd(page, "about-triage")
    lo, hi = tv["figures"]["ood_false_rejection"]["ci"]
    assert f"95% CI {100 * lo:.1f}–{100 * hi:.1f}%; target" in _dd(page, "about-ood")
    lo, hi = tv["figures"]["ece"]["ci"]
    assert f"(held-out lesions, 95% CI {lo:.3f}–{hi:.3f};" in _dd(page, "about-calibration")
    assert "2000 resamples of lesions" in page


def test_page_and_api_show_a_test_folds_intervals_apart(with_test_fold):
    info, page = _service_view(with_test_fold)
    assert "intervals" not in info["validation"] and info["test_fold"]["split"] == "test"
    assert "CI" not in _dd(page, "about-balacc") and 'id="about-auc"' not in page
    lo, hi = info["test_fold"]["figures"]["balanced_accuracy"]["ci"]
    assert f"(95% CI {100 * lo:.1f}–{100 * hi:.1f}%)" in _dd(page, "about-test-fold")


def test_a_model_without_intervals_shows_its_figures_without_error(without_intervals):
    info, page = _service_view(without_intervals)
    assert "intervals" not in info["validation"] and "trust_intervals" not in info and "test_fold" not in info
    assert "% CI" not in page and 'id="about-auc"' not in page and 'id="about-test-fold"' not in page
    assert _dd(page, "about-balacc").startswith(f"{100 * info['validation']['balanced_accuracy']:.1f}%")


def test_the_shipped_model_shows_intervals_exactly_where_its_file_has_them():
    """The file shipped since 2026-12-05 stores its rule's intervals (the page shows them); the previous one
    (d7d5c74ea1e9) stored none and showed its figures without (a bundle like it: the tests above)."""
    if not SHIPPED_MODEL.is_file():
        pytest.skip("this checkout has no shipped model")
    stored = (read_bundle(SHIPPED_MODEL).get("decision") or {}).get("validation") or {}
    info, page = _service_view(SHIPPED_MODEL)
    assert info["validation"]["balanced_accuracy"] is not None
    if stored.get("intervals"):
        ba = info["validation"]["intervals"]["figures"]["balanced_accuracy"]
        assert ba["ci"][0] <= info["validation"]["balanced_accuracy"] <= ba["ci"][1] and "% CI" in page
    else:
        assert "intervals" not in info["validation"] and "% CI" not in page
