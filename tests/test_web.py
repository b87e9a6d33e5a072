"""The web app through Flask's test client: every route, every error, and the same answers as Predictor."""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skain.inference.explain import GradCam
from skain.inference.predictor import Prediction
from skain.modelfile.bundle import BundleError
from skain.web import create_app
from skain.web.service import Service


@pytest.fixture(scope="module")
def service(trained) -> Service:
    return Service.load(trained)


@pytest.fixture(scope="module")
def app(service):
    return create_app({"TESTING": True}, service=service)


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def image_bytes(synth_root) -> bytes:
    return next((synth_root / "dataset_test" / "image").glob("*.jpg")).read_bytes()


def png_bytes(size=(80, 60), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


def post(client, image: bytes | None = None, name: str = "lesion.jpg", **fields):
    data = dict(fields)
    if image is not None:
        data["image"] = (io.BytesIO(image), name)
    return client.post("/api/predict", data=data, content_type="multipart/form-data")


# ------------------------------------------------------------------------------------------- routes
def test_health_reports_ok_and_the_model_id(client, service):
    r = client.get("/api/health")
    assert r.status_code == 200
    assert r.json == {"status": "ok", "model_id": service.model_id}
    assert len(service.model_id) == 12 and int(service.model_id, 16) >= 0


def test_model_route_describes_backbone_vocabularies_and_validation(client, service):
    info = client.get("/api/model").json
    assert info["backbone"] == "test_efficientnet"
    assert [c["code"] for c in info["classes"]] == service.predictor.classes
    assert all(c["name"] and c["description"] for c in info["classes"])
    assert info["vocabularies"] == service.predictor.info["vocabularies"]
    metrics = service.predictor.info["metrics"]
    assert info["validation"]["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    assert info["validation"]["recall"]["mel"] == pytest.approx(metrics["per_class"]["mel"]["recall"])
    assert info["training"]["synthetic"] is True
    assert "config" not in info["training"] and "/" not in (info["training"]["source"] or "")


def test_index_page_has_form_choices_disclaimer_and_synthetic_warning(client, service):
    html = client.get("/").get_data(as_text=True)
    assert "Not a medical device" in html and "Research and education only" in html
    assert 'id="synthetic-warning"' in html and "SYNTHETIC" in html
    assert 'id="dropzone"' in html and 'type="file"' in html
    for site in service.vocabularies["localization"][1:]:
        assert f'<option value="{site}">' in html
    assert "test_efficientnet" in html and "Validation balanced accuracy" in html
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/app.css").status_code == 200


def test_about_panel_shows_the_model_cards_trust_figures_and_limitations(client, service):
    """The numbers come from the bundle's model card, formatted, not typed into the page."""
    html = client.get("/").get_data(as_text=True)
    card = service.predictor.info["model_card"]
    cal, tri, ood = card["calibration"], card["triage"], card["ood"]
    held_cal, held_tri = cal["held_out"], tri["held_out"]
    assert f"{held_cal['ece_before']:.3f} &rarr; {held_cal['ece_after']:.3f} after temperature scaling (held-out" in html
    assert f"{tri['threshold']:.3f}" in html  # the tiny synthetic model has a triage threshold
    # the held-out triage figures, not the in-sample ones of the split that chose the threshold
    assert f"{100 * held_tri['sensitivity']:.1f}% of malignant" in html
    assert f"{100 * held_tri['specificity']:.1f}% of benign ones routine (held-out lesions" in html
    assert "validation split of the training data" in html
    rejected = ood.get("held_out_false_rejection", ood["val_false_rejection"])
    assert f"{100 * rejected:.1f}%" in html and f"target {100 * ood['target_false_rejection']:.0f}%" in html
    for kind, rate in ood["probe_detection"].items():
        assert f"{100 * rate:.0f}% of {kind} images" in html
    assert 'id="about-limitations"' in html and "light skin" in html and "7 diagnoses" in html


@pytest.mark.parametrize("fields", [
    {},
    {"age": "45", "sex": "female", "localization": "back"},
    {"age": "80", "sex": "MALE ", "localization": "Face"},
    {"age": "", "sex": "", "localization": "unknown"},
])
def test_predict_gives_the_same_probabilities_as_predictor(client, service, image_bytes, fields):
    r = post(client, image_bytes, **fields)
    assert r.status_code == 200, r.json
    age = float(fields["age"]) if fields.get("age") else None
    sex = (fields.get("sex") or "").strip().lower() or None
    site = (fields.get("localization") or "").strip().lower() or None
    ref = service.predictor.predict_one(image_bytes, age, sex, None if site == "unknown" else site)
    body = r.json
    assert body["diagnosis"] == ref.diagnosis
    assert body["probability"] == pytest.approx(ref.probability, abs=1e-6)
    assert body["probabilities"] == pytest.approx(ref.probabilities, abs=1e-6)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert [c["code"] for c in body["ranking"]][0] == ref.diagnosis
    assert body["model_id"] == service.model_id and body["name"] and body["description"]


def test_metadata_changes_the_answer(client, image_bytes):
    """The fields reach the model: two different patients give different probabilities."""
    a = post(client, image_bytes, age="10", sex="female", localization="face").json["probabilities"]
    b = post(client, image_bytes, age="85", sex="male", localization="back").json["probabilities"]
    assert max(abs(a[c] - b[c]) for c in a) > 1e-4


def test_predict_passes_through_extra_prediction_fields(app, service, image_bytes, monkeypatch):
    @dataclass
    class Extended(Prediction):
        future_score: float = 0.0
        future_note: str = ""

    def predict(inputs):
        p = service.predictor.predict_one(inputs.image)
        return Extended(**vars(p), future_score=np.float32(0.25), future_note="routine")

    monkeypatch.setattr(service, "predict", predict)
    body = post(app.test_client(), image_bytes).json
    assert body["future_score"] == pytest.approx(0.25) and body["future_note"] == "routine"
    assert set(vars(service.predictor.predict_one(image_bytes))) <= set(body)


def test_out_of_distribution_image_gets_no_diagnosis_unless_probabilities_are_asked_for(app, service, image_bytes,
                                                                                         monkeypatch):
    def predict(inputs):
        p = service.predictor.predict_one(inputs.image)
        return replace(p, ood_score=3.5, in_distribution=False, triage="routine", p_malignant=0.01)

    monkeypatch.setattr(service, "predict", predict)
    body = post(app.test_client(), image_bytes, heatmap="1").json
    assert body["rejected"] is True and "does not look like a dermoscopic image" in body["message"]
    assert "diagnosis" not in body and "probabilities" not in body and "heatmap" not in body
    assert body["ood_score"] == pytest.approx(3.5)
    anyway = post(app.test_client(), image_bytes, probabilities="1").json
    assert anyway["rejected"] is False and anyway["in_distribution"] is False
    assert anyway["probabilities"] == pytest.approx(service.predictor.predict_one(image_bytes).probabilities)


def test_triage_answer_carries_its_validated_figures(app, service, image_bytes, monkeypatch):
    monkeypatch.setattr(service, "predict", lambda inputs: replace(service.predictor.predict_one(inputs.image),
                                                                   triage="investigate further", p_malignant=0.4))
    trust = {"triage": {"threshold": 0.07, "sensitivity": 0.95, "specificity": 0.6, "target_sensitivity": 0.95,
                        "held_out": {"sensitivity": 0.93, "specificity": 0.45}}}
    real = type(service.predictor).info
    monkeypatch.setattr(type(service.predictor), "info", property(lambda self: {**real.fget(self), "trust": trust}))
    body = post(app.test_client(), image_bytes).json
    assert body["triage"] == "investigate further"
    # the held-out figures, not the in-sample ones of the split that chose the threshold
    assert body["triage_figures"] == {"threshold": 0.07, "sensitivity": 0.93, "specificity": 0.45,
                                      "target_sensitivity": 0.95, "measured": "held-out validation lesions"}
    del trust["triage"]["held_out"]  # older bundles: the in-sample figures, labelled as such
    body = post(app.test_client(), image_bytes).json
    assert body["triage_figures"]["sensitivity"] == 0.95
    assert body["triage_figures"]["measured"] == "validation lesions (in-sample)"


def test_predict_heatmap_returns_png_layers_for_the_top_class(client, service, image_bytes):
    body = post(client, image_bytes, heatmap="1").json
    heat = body["heatmap"]
    assert heat["target"] == body["diagnosis"]
    size = service.predictor.preprocess["input_size"]
    for key in ("image", "overlay"):
        assert heat[key].startswith("data:image/png;base64,")
        import base64
        img = Image.open(io.BytesIO(base64.b64decode(heat[key].split(",", 1)[1])))
        assert img.size == (size, size)
    assert "heatmap" not in post(client, image_bytes).json


def test_gradcam_is_normalised_aligned_and_explains_the_predicted_class(service, image_bytes):
    ex = GradCam(service.predictor)(image_bytes, 50, "male", "back")
    size = service.predictor.preprocess["input_size"]
    assert ex.heat.shape == (size, size) and ex.image.shape == (size, size, 3)
    assert ex.heat.min() >= 0 and ex.heat.max() == pytest.approx(1.0)
    assert ex.target == service.predictor.predict_one(image_bytes, 50, "male", "back").diagnosis
    other = GradCam(service.predictor)(image_bytes, 50, "male", "back", target="vasc")
    assert other.target == "vasc" and not np.allclose(other.heat, ex.heat)
    assert all(p.grad is None for p in service.predictor.model.parameters())

def test_fast_precision_serves_the_fast_path_and_keeps_heatmaps(trained, service, image_bytes):
    """`skain serve --precision fast`: answers from the exported graph, within 1e-4 of fp32; heatmaps (which need
    gradients) come from a PyTorch copy of the same network."""
    fast = Service.load(trained, precision="fast")
    assert fast.predictor.backend != "torch" and fast.explainer is not None
    client = create_app({"TESTING": True}, service=fast).test_client()
    body = post(client, image_bytes, age="50", sex="male", localization="back", heatmap="1", probabilities="1").json
    ref = service.predictor.predict_one(image_bytes, 50, "male", "back").probabilities
    got = body["probabilities"]
    assert max(abs(got[c] - ref[c]) for c in ref) <= 1e-4
    assert body["heatmap"] and client.get("/api/model").json["inference"]["backend"] == fast.predictor.backend



# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("image, name, fields, status, words", [
    (None, "", {}, 400, "no image"),
    (b"", "empty.jpg", {}, 400, "empty"),
    (b"hello, I am text" * 10, "notes.txt", {}, 415, "not an image"),
    (b"hello" * 10, "sneaky.jpg", {}, 415, "not an image"),
    ("ico", "favicon.ico", {}, 415, "unsupported image format"),
    ("truncated", "broken.png", {}, 400, "cannot decode"),
    ("ok", "x.png", {"age": "abc"}, 400, "age must be a number"),
    ("ok", "x.png", {"age": "-3"}, 400, "between 0 and 120"),
    ("ok", "x.png", {"age": "130"}, 400, "between 0 and 120"),
    ("ok", "x.png", {"age": "inf"}, 400, "between 0 and 120"),
    ("ok", "x.png", {"sex": "robot"}, 400, "unknown sex"),
    ("ok", "x.png", {"localization": "elbowpit"}, 400, "unknown localization"),
])
def test_bad_input_gets_a_json_error_with_the_right_status(client, image, name, fields, status, words):
    payload = {"ico": png_bytes(fmt="ICO"), "truncated": png_bytes((300, 300))[:200], "ok": png_bytes()}
    r = post(client, payload.get(image, image) if isinstance(image, str) else image, name, **fields)
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.is_json and words in r.json["error"] and r.json["status"] == status
    assert "Traceback" not in r.get_data(as_text=True)


def test_decompression_bomb_is_refused_with_413(client):
    bomb = png_bytes((7000, 7000), mode="1")  # 49 Mpx that compress to a few kB
    assert len(bomb) < 200_000
    r = post(client, bomb, "bomb.png")
    assert r.status_code == 413 and "too large" in r.json["error"]


def test_upload_over_the_limit_gets_413(service, image_bytes):
    small = create_app({"TESTING": True, "MAX_CONTENT_LENGTH": 2048}, service=service).test_client()
    r = post(small, image_bytes + b"\0" * 4096)
    assert r.status_code == 413 and r.json["error"].startswith("upload too large")
    assert post(small, png_bytes((8, 8))).status_code == 200


def test_default_upload_limit_is_10_mb(app):
    assert app.config["MAX_CONTENT_LENGTH"] == 10 * 2**20


def test_uploads_stay_in_memory(client, image_bytes, monkeypatch):
    """werkzeug spools uploads over 500 kB to temporary files; ours must not touch the disk at all."""
    def refuse(*a, **k):
        raise AssertionError("an upload was written to a temporary file")
    for name in ("TemporaryFile", "SpooledTemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    big = png_bytes((900, 900))
    big += b"\0" * max(0, 700_000 - len(big))  # trailing bytes after IEND are ignored by decoders
    r = post(client, big, "big.png")
    assert r.status_code == 200, r.json


@pytest.mark.parametrize("method, path, status", [
    ("get", "/api/predict", 405), ("get", "/api/nothing", 404), ("delete", "/api/model", 405)])
def test_api_http_errors_are_json(client, method, path, status):
    r = getattr(client, method)(path)
    assert r.status_code == status and r.is_json and r.json["error"]


def test_unexpected_failure_is_a_json_500_without_trace(app, service, image_bytes, monkeypatch):
    def boom(inputs):
        raise RuntimeError("secret internals")
    monkeypatch.setattr(service, "predict", boom)
    r = post(app.test_client(), image_bytes)
    assert r.status_code == 500 and "secret" not in r.get_data(as_text=True) and r.json["error"]


# ------------------------------------------------------------------------------------------- CORS, start-up
def test_cors_is_off_by_default(client):
    assert "Access-Control-Allow-Origin" not in client.get("/api/health", headers={"Origin": "https://x.org"}).headers


def test_cors_origin_is_configurable(service):
    c = create_app({"TESTING": True, "CORS_ORIGIN": "https://x.org"}, service=service).test_client()
    r = c.options("/api/predict", headers={"Origin": "https://x.org", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://x.org"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]


def test_missing_bundle_says_how_to_get_one(tmp_path):
    with pytest.raises(BundleError, match="skain train"):
        create_app({"MODEL": str(tmp_path / "none")})


def test_serve_command_exits_non_zero_without_a_model(tmp_path, capsys):
    from skain.cli import main
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "no trained model" in capsys.readouterr().err


def test_serve_command_accepts_demo_namespace_and_flags(trained, monkeypatch):
    """`skain demo` calls serve with a Namespace; flags reach the app and waitress."""
    from skain import cli
    from skain.web import server
    seen = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port, threads: seen.update(
        app=app, host=host, port=port, threads=threads))
    ns = argparse.Namespace(model=str(trained), host="127.0.0.1", port=5123, **cli._serve_defaults())
    assert cli.COMMANDS["serve"][1](ns) == 0
    assert (seen["host"], seen["port"], seen["threads"]) == ("127.0.0.1", 5123, 4)
    assert seen["app"].config["MAX_CONTENT_LENGTH"] == 10 * 2**20 and seen["app"].config["CORS_ORIGIN"] is None
    args = cli.build_parser().parse_args(["serve", "--model", str(trained), "--max-mb", "2", "--cors", "*",
                                          "--threads", "2"])
    assert cli.COMMANDS["serve"][1](args) == 0
    assert seen["app"].config["MAX_CONTENT_LENGTH"] == 2 * 2**20 and seen["app"].config["CORS_ORIGIN"] == "*"
    assert seen["threads"] == 2


def test_the_web_app_answers_from_the_fast_path_unless_told_fp32(trained):
    """Issue 24's time to a diagnosis: `skain serve`, `skain demo`, `python app.py` and create_app run "fast"
    (OpenVINO here, installed with the dev extras); fp32, bit-identical to `skain predict`, when told."""
    from skain import cli
    assert cli.build_parser().parse_args(["serve"]).precision == "fast" == cli._serve_defaults()["precision"]
    backend = {p: create_app({"TESTING": True, "MODEL": str(trained), **({"PRECISION": p} if p else {})})
               .extensions["skain"].predictor.backend for p in (None, "fp32")}
    assert backend == {None: "openvino", "fp32": "torch"}


def test_app_py_runs_the_serve_command(tmp_path):
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "app.py"), "--model", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2 and "no trained model" in res.stderr and "skain train" in res.stderr


def test_model_json_is_strict_json(client):
    """NaN metrics (absent classes) become null so browsers' JSON.parse accepts the answer."""
    json.loads(client.get("/api/model").get_data(as_text=True), parse_constant=lambda c: pytest.fail(c))


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF"])
def test_uploads_in_other_formats_get_the_same_answer_as_their_png(client, image_bytes, fmt):
    img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    answers = {}
    for name in ("PNG", fmt):
        buf = io.BytesIO()
        img.save(buf, name, **({"lossless": True} if name == "WEBP" else {}))
        r = post(client, buf.getvalue(), f"lesion.{name.lower()}", probabilities="1")
        assert r.status_code == 200, r.json
        answers[name] = r.json["probabilities"]
    assert answers[fmt] == answers["PNG"]


def test_the_web_app_runs_the_views_it_is_told_else_the_models_default(trained, monkeypatch):
    assert Service.load(trained).predictor.tta == 1  # the tiny model has no default: one view
    assert create_app({"TESTING": True, "MODEL": str(trained), "TTA": 4}).extensions["skain"].predictor.tta == 4
    monkeypatch.setenv("SKAIN_TTA", "2")
    assert create_app({"TESTING": True, "MODEL": str(trained)}).extensions["skain"].predictor.tta == 2
