"""Out of the box: without a trained model every entry point falls back to the shipped HAM10000 model and says
so; `skain demo` serves it; the synthetic demo and `make clean` never touch real work."""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from skain import cli
from skain.demo import MARKER, DemoError, claim, synthetic_demo
from skain.modelfile.bundle import BundleError
from skain.modelfile.load import (
    DEFAULT_MODEL_ENV,
    SHIPPED_MODEL,
    choose_model,
    read_bundle,
)
from skain.web import create_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fresh(tmp_path, monkeypatch, default_model) -> Path:
    """A working folder with no outputs/, the default model pointed at the stand-in (or the real shipped file)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(default_model))
    return tmp_path


@pytest.fixture()
def nothing(tmp_path, monkeypatch) -> Path:
    """Neither a trained model nor the shipped one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(tmp_path / "absent.safetensors"))
    return tmp_path


# ------------------------------------------------------------------------------------------- which model answers
def test_no_trained_model_falls_back_to_the_shipped_model(fresh, default_model, caplog):
    with caplog.at_level(logging.INFO, logger="skain.modelfile.load"):
        choice = choose_model(None)
    assert choice.path == default_model and choice.shipped and choice.kind == "shipped"
    assert "shipped with skAIn" in caplog.text and "CC BY-NC 4.0" in caplog.text


def test_a_model_trained_into_outputs_wins_over_the_shipped_one(fresh, trained):
    shutil.copytree(trained, fresh / "outputs")
    choice = choose_model(None)
    assert choice.path == Path("outputs/best_model.pt") and not choice.shipped
    assert "your own model" in choice.describe()


def test_an_explicit_model_is_the_users_own_and_the_shipped_path_is_recognised(fresh, trained, default_model):
    assert not choose_model(trained).shipped
    assert choose_model(default_model).shipped


def test_without_any_model_the_error_names_every_way_out(nothing, capsys):
    with pytest.raises(BundleError, match=r"no trained model at outputs/.*shipped HAM10000 model is not installed"):
        choose_model(None)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "skain train" in err and "skain demo --synthetic" in err and "--model" in err


def test_shipped_location_is_inside_the_package_and_is_package_data():
    assert SHIPPED_MODEL.parent == ROOT / "src" / "skain" / "models"
    assert (SHIPPED_MODEL.parent / "README.md").is_file()
    assert "CC BY-NC 4.0" in (SHIPPED_MODEL.parent / "README.md").read_text()
    assert '"models/*.safetensors"' in (ROOT / "pyproject.toml").read_text()
    assert '"safetensors>=' in (ROOT / "pyproject.toml").read_text()


# ------------------------------------------------------------------------------------------- web, serve, predict
def test_web_app_without_a_model_setting_serves_the_shipped_model_and_names_it(fresh, default_model):
    client = create_app({"TESTING": True}).test_client()
    info = client.get("/api/model").get_json()
    assert info["model_file"] == {"file": default_model.name, "kind": "shipped", "shipped": True,
                                  "description": "the HAM10000 model shipped with skAIn"}
    html = client.get("/").get_data(as_text=True)
    about = re.search(r'id="about-model-file" data-kind="shipped">(.*?)</dd>', html, re.S)
    assert about and default_model.name in about.group(1) and "CC BY-NC 4.0" in about.group(1)
    assert str(default_model.parent) not in html  # the file name, never the local path


def test_web_app_names_the_users_own_model(fresh, trained):
    info = create_app({"TESTING": True, "MODEL": str(trained)}).test_client().get("/api/model").get_json()
    assert info["model_file"]["kind"] == "user" and info["model_file"]["file"] == "best_model.pt"


def test_serve_start_up_log_says_which_model_answers(fresh, default_model, monkeypatch, caplog):
    import waitress
    monkeypatch.setattr(waitress, "serve", lambda app, **kw: None)
    with caplog.at_level(logging.INFO):
        assert cli.main(["serve", "--port", "5999"]) == 0
    line = next(r.getMessage() for r in caplog.records if "skAIn web app on" in r.getMessage())
    assert default_model.name in line and "shipped with skAIn" in line
    assert "through openvino fp32" in line  # the web app's default: the fast path (OpenVINO with the dev extras)


def test_predict_without_model_uses_the_shipped_model(fresh, synth_root, caplog):
    out = fresh / "preds.csv"
    with caplog.at_level(logging.INFO, logger="skain.modelfile.load"):
        assert cli.main(["predict", "--data", str(synth_root / "dataset_test"), "--output", str(out),
                         "--no-progress"]) == 0
    assert "shipped with skAIn" in caplog.text and len(out.read_text().splitlines()) == 41


def test_app_py_falls_back_too(fresh):
    """`python app.py` is `skain serve`: with the shipped model absent it says how to get a model."""
    env = {**os.environ, DEFAULT_MODEL_ENV: str(fresh / "absent.safetensors"), "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, str(ROOT / "app.py")], capture_output=True, text=True, timeout=120,
                         cwd=fresh, env=env)
    assert res.returncode == 2 and "shipped HAM10000 model is not installed" in res.stderr


# ------------------------------------------------------------------------------------------- skain demo
def test_demo_serves_the_shipped_model_without_training(fresh, default_model, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "run_serve", lambda ns: seen.update(vars(ns)) or 0)
    monkeypatch.setattr("skain.demo.fit", lambda cfg: pytest.fail("the demo must not train"))
    assert cli.main(["demo", "--port", "5123"]) == 0
    assert Path(seen["model"]) == default_model and seen["port"] == 5123 and seen["host"] == "127.0.0.1"
    assert not (fresh / "outputs").exists()


def test_demo_without_the_shipped_model_points_to_the_synthetic_demo(nothing, capsys):
    assert cli.main(["demo", "--no-serve"]) == 2
    assert "skain demo --synthetic" in capsys.readouterr().err


def test_synthetic_demo_writes_only_inside_its_own_marked_folder(fresh, monkeypatch):
    configs = []
    monkeypatch.setattr("skain.demo.fit", configs.append)
    model = synthetic_demo(fresh / "outputs" / "demo-synthetic", epochs=1, images=40)
    root = fresh / "outputs" / "demo-synthetic"
    assert model == root / "model" and (root / MARKER).is_file()
    cfg = configs[0]
    assert Path(cfg.data.data) == root / "dataset_train" and Path(cfg.train.output) == model
    assert sorted(p.name for p in (fresh / "outputs").iterdir()) == ["demo-synthetic"]
    assert not (fresh / "dataset_train").exists()
    synthetic_demo(root, epochs=1, images=40)  # its own folder: a second run is fine
    assert len(configs) == 2


def test_synthetic_demo_refuses_a_folder_with_real_work(fresh, trained, capsys):
    real = fresh / "outputs"
    shutil.copytree(trained, real)
    before = (real / "best_model.pt").read_bytes()
    assert cli.main(["demo", "--synthetic", "--output", str(real), "--no-serve"]) == 2
    assert "did not create" in capsys.readouterr().err
    assert (real / "best_model.pt").read_bytes() == before and not (real / MARKER).exists()
    with pytest.raises(DemoError):
        claim(real / "best_model.pt")  # a file is not a folder the demo may use either


def test_synthetic_demo_default_folder_is_not_outputs():
    ns = cli.build_parser().parse_args(["demo", "--synthetic"])
    assert ns.synthetic and Path(ns.output) == Path("outputs/demo-synthetic")


# ------------------------------------------------------------------------------------------- Makefile, README
def make_n(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_make_demo_serves_without_training_and_make_clean_keeps_real_work():
    demo = make_n("demo")
    assert re.search(r"skain demo\s*$", demo, re.M) and "--synthetic" not in demo
    clean = make_n("clean")
    assert "dataset_train" not in clean and not re.search(r"rm -rf.*\boutputs(\s|$)", clean)
    assert "outputs/demo-synthetic" in clean
    assert "skain demo --synthetic" in make_n("demo-synthetic")


def test_readme_quick_start_is_exactly_two_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


# ------------------------------------------------------------------------------------------- the real file
@pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason=f"the shipped model is not in this checkout yet "
                    f"({SHIPPED_MODEL}); tests use a stand-in through {DEFAULT_MODEL_ENV}")
def test_shipped_model_is_a_small_checked_ham10000_bundle():
    assert SHIPPED_MODEL.stat().st_size <= 25 * 2**20
    bundle = read_bundle(SHIPPED_MODEL)
    assert bundle["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert not bundle.get("training", {}).get("synthetic")
    assert bundle.get("trust", {}).get("ood"), "the shipped model must carry its not-dermoscopic check"
    parity = bundle.get("portable", {}).get("parity")
    if bundle["portable"]["dtype"] != "float32":
        assert parity and parity["images"] >= 500 and parity["top1_agreement"] >= 0.995
        assert parity["max_prob_diff"] <= 0.02
