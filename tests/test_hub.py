"""Hugging Face-style model folders end to end: `skain export --format hf` writes model.safetensors, config.json and
a model card; `skain.load`, `skain predict --model` and the web app (`skain serve --model`) load the folder; and
`hf://org/name[@revision]` downloads it through huggingface_hub from a stand-in Hub on 127.0.0.1 (a real HTTP
server answering the requests huggingface_hub makes, not a mock), then serves it from the cache offline."""
from __future__ import annotations

import hashlib
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import skain
from skain import cli
from skain.evaluation.hub_export import held_out_figures
from skain.modelfile.bundle import BundleError
from skain.modelfile.load import DEFAULT_MODEL_ENV, choose_model, model_id, read_bundle
from skain.web import create_app

REPO = "skain-test/tiny"


# ------------------------------------------------------------------------------------------- a stand-in Hub
class StandInHub:
    """The Hub's file endpoints for model repositories: HEAD/GET /{repo}/resolve/{revision}/{file} with the
    headers huggingface_hub reads (X-Repo-Commit, ETag, Content-Length; X-Error-Code on 404), and
    GET /api/models/{repo}/revision/{revision} (sha + siblings). Every request is logged in `requests`."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def push(self, repo: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> str:
        """A commit holding the folder's files, pointed at by `refs`; returns its sha."""
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        sha = hashlib.sha1(b"".join(k.encode() + v for k, v in files.items())).hexdigest()
        r = self.repos.setdefault(repo, {"refs": {}, "commits": {}})
        r["commits"][sha] = files
        r["refs"].update({ref: sha for ref in refs})
        return sha

    def answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append(f"{h.command} {h.path}")
        path = h.path.split("?")[0]
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not (api or resolve):
            return self.error(h, 404, "RepoNotFound")
        repo, rev = (api or resolve).group(1), (api or resolve).group(2)  # type: ignore[union-attr]
        if repo not in self.repos:
            return self.error(h, 404, "RepoNotFound")
        r = self.repos[repo]
        sha = r["refs"].get(rev, rev if rev in r["commits"] else None)
        if sha is None:
            return self.error(h, 404, "RevisionNotFound")
        files = r["commits"][sha]
        if api:
            data = json.dumps({"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]}).encode()
            return self.send(h, 200, data, {"Content-Type": "application/json"}, body)
        name = resolve.group(3)  # type: ignore[union-attr]
        if name not in files:
            return self.error(h, 404, "EntryNotFound")
        data = files[name]
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": sha,
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        start = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if start and body:
            data = data[int(start.group(1)):]
            return self.send(h, 206, data, headers, body)
        return self.send(h, 200, data, headers, body)

    def error(self, h: BaseHTTPRequestHandler, status: int, code: str) -> None:
        self.send(h, status, json.dumps({"error": code}).encode(), {"X-Error-Code": code,
                                                                     "Content-Type": "application/json"}, True)

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict, body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    server = StandInHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.close()


# ------------------------------------------------------------------------------------------- exported folders
@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """The tiny trained model as a Hugging Face-style folder, written by the command line."""
    out = tmp_path_factory.mktemp("hf") / "tiny"
    assert cli.main(["export", "--format", "hf", "--model", str(trained), "--output", str(out)]) == 0
    return out


def front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_export_hf_writes_weights_config_and_a_card(exported, trained):
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    bundle = read_bundle(trained)
    assert config["library_name"] == "skain" and config["model_id"] == model_id(exported / "model.safetensors")
    assert config["classes"] == list(bundle["classes"]) and config["preprocess"] == bundle["preprocess"]
    assert config["model_args"]["backbone"] == "test_efficientnet" and config["skain_version"] == skain.__version__
    assert config["id2label"]["0"] == bundle["classes"][0]
    meta, body = front_matter((exported / "README.md").read_text())
    assert meta["library_name"] == "skain" and meta["license"] == "apache-2.0"  # synthetic data: the code's licence
    assert meta["datasets"] == ["synthetic (skain synth)"] and "dermoscopy" in meta["tags"]
    figures = held_out_figures(bundle)
    results = meta["model-index"][0]["results"]
    assert len(results) == len(figures) >= 5 and set(meta["metrics"]) == {f["type"] for f in figures}
    ba = next(r for r in results if r["metrics"][0]["type"] == "balanced_accuracy")
    assert ba["metrics"][0]["value"] == pytest.approx(bundle["metrics"]["balanced_accuracy"], abs=1e-4)
    assert "held out of training" in ba["dataset"]["split"]
    assert "# Model card" not in body and "## Intended use" in body and "SYNTHETIC" in body
    assert "## Held-out figures" in body and 'skain.load("hf://' in body


def test_export_hf_of_the_default_model_carries_the_data_licence(default_model, tmp_path, monkeypatch):
    """No --model: the default model, as everywhere (the shipped HAM10000 file when nothing was trained here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(default_model))
    bundle = read_bundle(default_model)
    assert cli.main(["export", "--format", "hf", "--output", "card", "--dtype", bundle["portable"]["dtype"]]) == 0
    config = json.loads((tmp_path / "card" / "config.json").read_text())
    assert config["model_id"] == model_id(default_model)  # a portable file in the same dtype is copied: same id
    card = (tmp_path / "card" / "README.md").read_text()
    meta, body = front_matter(card)
    synthetic = bool(bundle["training"].get("synthetic"))
    assert meta["license"] == ("apache-2.0" if synthetic else "cc-by-nc-4.0")
    if not synthetic:
        assert meta["datasets"] == ["HAM10000"] and "CC-BY-NC-4.0" in body
    if float((bundle.get("decision") or {}).get("tau", 0)):
        rule = meta["model-index"][0]["results"][0]
        assert "decision rule (prior-adjusted)" in rule["metrics"][0]["name"]  # ", 8 TTA views" where it has them
        nested = bundle["decision"].get("nested_balanced_accuracy")
        if nested:  # a rule chosen on this recipe's folds: its nested cross-validated estimate comes first
            assert rule["metrics"][0]["value"] == pytest.approx(nested["adjusted"]["mean"], abs=1e-4)
            assert "nested" in rule["dataset"]["split"]
        else:  # a rule taken over from another model: the figures of its own decisions on its validation split
            assert rule["metrics"][0]["value"] == pytest.approx(bundle["decision"]["validation"]["balanced_accuracy"],
                                                                abs=1e-4)
            assert "validation" in rule["dataset"]["split"]
    text = (tmp_path / "card" / "config.json").read_text()
    assert not re.search(r'"/(tmp|home|root|Users)/', card + text)  # no paths of the machine that built it


def test_export_hf_refuses_a_folder_with_other_files_and_needs_output(trained, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert cli.main(["export", "--format", "hf", "--model", str(trained), "--output", str(tmp_path / "busy")]) == 2
    assert "already holds other files (notes.txt)" in capsys.readouterr().err
    assert cli.main(["export", "--format", "hf", "--model", str(trained)]) == 2
    assert "--format hf needs --output DIR" in capsys.readouterr().err


def test_an_exported_folder_loads_in_the_api_predict_and_serve(exported, synth_root, tmp_path):
    image = next((synth_root / "dataset_test" / "image").glob("*.jpg"))
    model = skain.load(exported)
    config = json.loads((exported / "config.json").read_text())
    assert model.model_id == config["model_id"] and model.source.path == exported / "model.safetensors"
    result = model.predict(image, age=50, sex="female", site="back")

    out = tmp_path / "pred.csv"
    assert cli.main(["predict", "--model", str(exported), "--data", str(image.parent), "--output", str(out),
                     "--no-progress"]) in (0, 3)
    row = pd.read_csv(out).set_index("image_id").loc[image.stem]
    plain = model.predict(image)  # the folder has no CSV: no metadata, as in the CLI
    assert row["pred"] == plain.diagnosis
    assert np.allclose([row[f"p_{c}"] for c in model.classes], [plain.probabilities[c] for c in model.classes],
                       atol=1e-5)

    app = create_app({"TESTING": True, "MODEL": str(exported)})  # what `skain serve --model DIR` builds
    client = app.test_client()
    assert client.get("/api/health").json["model_id"] == config["model_id"]
    r = client.post("/api/predict", data={"image": (io.BytesIO(image.read_bytes()), image.name), "age": "50",
                                          "sex": "female", "localization": "back", "probabilities": "1"},
                    content_type="multipart/form-data").json
    assert r["diagnosis"] == result.diagnosis
    assert r["probabilities"] == pytest.approx(result.probabilities, abs=1e-6)


# ------------------------------------------------------------------------------------------- hf:// from a Hub
def test_hf_uri_downloads_a_revision_and_serves_it_from_the_cache_offline(hub, exported, trained, tmp_path,
                                                                          monkeypatch, synth_root):
    second = tmp_path / "second"
    assert cli.main(["export", "--format", "hf", "--model", str(trained), "--output", str(second),
                     "--dtype", "float32"]) == 0
    hub.push(REPO, exported, refs=("main",))
    v1 = hub.push(REPO, second, refs=("v1",))
    main_id = json.loads((exported / "config.json").read_text())["model_id"]
    v1_id = json.loads((second / "config.json").read_text())["model_id"]
    assert main_id != v1_id

    latest = skain.load(f"hf://{REPO}")
    tagged = skain.load(f"hf://{REPO}@v1")
    assert latest.model_id == main_id and tagged.model_id == v1_id
    assert str(tmp_path / "hf_home" / "hub") in str(tagged.source.path)  # the normal Hugging Face cache
    assert any(f"/{REPO}/resolve/v1/model.safetensors" in r for r in hub.requests)
    assert skain.load(f"hf://{REPO}@{v1}").model_id == v1_id  # a commit sha is a revision too
    image = next((synth_root / "dataset_test" / "image").glob("*.jpg"))
    expected = tagged.predict(image, age=40)

    seen = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = skain.load(f"hf://{REPO}@v1")
    assert len(hub.requests) == seen  # nothing asked of the server
    assert offline.model_id == v1_id and offline.predict(image, age=40).probabilities == expected.probabilities
    out = tmp_path / "offline.csv"
    assert cli.main(["predict", "--model", f"hf://{REPO}@v1", "--data", str(image.parent), "--output", str(out),
                     "--no-progress"]) in (0, 3)
    assert len(pd.read_csv(out)) == len(list(image.parent.glob("*.jpg")))

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(BundleError, match=r"HF_HUB_OFFLINE is set and skain-test/tiny@v1 is not in the Hugging Face "
                                          r"cache .*empty_cache.*unset HF_HUB_OFFLINE"):
        skain.load(f"hf://{REPO}@v1")
    assert len(hub.requests) == seen

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    hub.close()  # the Hub unreachable: the cached copy still answers, and an uncached one fails clearly
    assert choose_model(f"hf://{REPO}@v1").path == offline.source.path
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(BundleError, match="the Hub could not be reached and skain-test/tiny@v1 is not in the"):
        skain.load(f"hf://{REPO}@v1")


def test_hf_uri_errors_name_the_problem(hub, exported, tmp_path):
    hub.push(REPO, exported)
    with pytest.raises(BundleError, match="no Hub repository skain-test/missing"):
        skain.load("hf://skain-test/missing")
    with pytest.raises(BundleError, match="has no revision 'v9'"):
        skain.load(f"hf://{REPO}@v9")
    for bad in ("hf://just-a-name", "hf://org/name@", "hf://../x/y"):
        with pytest.raises(BundleError, match="not a Hugging Face model address"):
            skain.load(bad)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((exported / "config.json").read_text())
    hub.push("skain-test/no-weights", no_weights)
    with pytest.raises(BundleError, match="has no model.safetensors: not a skAIn model folder"):
        skain.load("hf://skain-test/no-weights")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (other / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    hub.push("skain-test/bert", other)
    with pytest.raises(BundleError, match="does not describe a skAIn model"):
        skain.load("hf://skain-test/bert")
