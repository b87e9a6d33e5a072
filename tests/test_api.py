"""The Python API (`skain.load` -> Model -> Result): a notebook-style script gets the same numbers as `skain predict`
and `POST /api/predict`; every kind of image input; clear errors; `import skain` stays light; the README's
example runs as written."""
from __future__ import annotations

import dataclasses
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import skain
from skain import cli
from skain.data.images import ImageError
from skain.inference.explain import GradCam
from skain.modelfile.bundle import BundleError
from skain.modelfile.load import DEFAULT_MODEL_ENV, model_id
from skain.web import create_app

ROOT = Path(__file__).resolve().parents[1]
P_COLUMNS = re.compile(r"^[ps]_|^prob$|^p_malignant$|^ood_score$")


@pytest.fixture()
def fresh(tmp_path, monkeypatch, default_model):
    """No outputs/ here and no SKAIN_MODEL: the default model is the shipped one (or conftest's stand-in)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(default_model))
    monkeypatch.delenv("SKAIN_MODEL", raising=False)
    return tmp_path


@pytest.fixture()
def photos(tmp_path, synth_root, request) -> Path:
    """A folder of a few images: real HAM10000 lesions when the sample is here, else synthetic drawings."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shared = Path(__file__).resolve().parents[1] / ".." / "shared" / "ham10000" / "images"
    source = sorted(shared.glob("*.jpg"))[:4] if shared.is_dir() else []
    source = source or sorted((synth_root / "dataset_test" / "image").glob("*.jpg"))[:4]
    for p in source:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def tiny(trained):
    return skain.load(trained)


# ------------------------------------------------------------------------------------------- the one path
def test_notebook_script_gets_the_numbers_of_skain_predict_and_the_web_api(fresh, photos, default_model):
    image = sorted(photos.glob("*.jpg"))[0]
    namespace: dict = {}
    exec(f"""
import skain
model = skain.load()
one = model.predict({str(image)!r}, age=55, sex="male", site="back")
blank = model.predict({str(image)!r})
table = model.predict_many({str(photos)!r})
""", namespace)
    model, one, blank, table = (namespace[k] for k in ("model", "one", "blank", "table"))
    assert isinstance(one, skain.Result) and isinstance(model, skain.Model)
    assert model.model_id == model_id(default_model) and model.source.shipped

    # skain predict on the same folder: the same columns and numbers
    assert cli.main(["predict", "--data", str(photos), "--output", "cli.csv", "--no-progress"]) == 0
    csv = pd.read_csv(fresh / "cli.csv", keep_default_na=False, na_values=[""])
    assert list(table.columns) == list(csv.columns)
    assert table["image_id"].tolist() == csv["image_id"].tolist() and table["pred"].tolist() == csv["pred"].tolist()
    for col in [c for c in csv if P_COLUMNS.match(c)]:
        assert np.allclose(table[col].astype(float), csv[col].astype(float), atol=1e-6, equal_nan=True), col
    row = csv.set_index("image_id").loc[image.stem]  # one image alone vs in a batch: ~1e-7 (CPU blocking)
    assert blank.diagnosis == row["pred"]
    assert np.allclose([blank.probabilities[c] for c in model.classes], [row[f"p_{c}"] for c in model.classes],
                       atol=1e-5)
    if blank.scores is not None:
        assert np.allclose([blank.scores[c] for c in model.classes], [row[f"s_{c}"] for c in model.classes], atol=1e-5)
        assert max(blank.scores, key=blank.scores.__getitem__) == blank.diagnosis

    # POST /api/predict with the same image and fields
    client = create_app({"TESTING": True}).test_client()
    r = client.post("/api/predict", data={"image": (io.BytesIO(image.read_bytes()), image.name), "age": "55",
                                          "sex": "male", "localization": "back", "probabilities": "1"},
                    content_type="multipart/form-data").json
    assert r["model_id"] == one.model_id
    assert r["diagnosis"] == one.diagnosis and r["probability"] == pytest.approx(one.probability, abs=1e-7)
    assert r["probabilities"] == pytest.approx(one.probabilities, abs=1e-7)
    for key in ("p_malignant", "ood_score"):
        assert (r[key] is None) == (getattr(one, key) is None)
        if r[key] is not None:
            assert r[key] == pytest.approx(getattr(one, key), abs=1e-6)
    assert r["triage"] == one.triage and r["in_distribution"] == one.in_distribution
    assert one.inputs == {"age": 55.0, "sex": "male", "site": "back"}


def test_result_is_a_frozen_typed_record(tiny, synth_root):
    image = next((synth_root / "dataset_test" / "image").glob("*.jpg"))
    result = tiny.predict(image, age="40", sex="FEMALE", site=" Back ")
    assert dataclasses.is_dataclass(result) and result.inputs == {"age": 40.0, "sex": "female", "site": "back"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.diagnosis = "mel"  # type: ignore[misc]
    assert set(result.probabilities) == set(tiny.classes) and sum(result.probabilities.values()) == pytest.approx(1, abs=1e-5)
    assert result.probability == result.probabilities[result.diagnosis] and result.heatmap is None
    assert result.model_id == tiny.model_id and len(result.model_id) == 12


def test_every_kind_of_image_input_gives_the_same_numbers(tiny, synth_root, tmp_path):
    png = tmp_path / "lesion.png"
    Image.open(next((synth_root / "dataset_test" / "image").glob("*.jpg"))).save(png)
    pil = Image.open(png)
    pil.load()
    kinds = [png, str(png), png.read_bytes(), bytearray(png.read_bytes()), pil, np.asarray(pil)]
    results = [tiny.predict(x, age=60, sex="male", site="back") for x in kinds]
    for r in results[1:]:
        assert r.probabilities == results[0].probabilities and r.ood_score == results[0].ood_score


def test_predict_many_takes_a_list_and_a_dataframe_with_metadata(tiny, synth_root):
    images = sorted((synth_root / "dataset_test" / "image").glob("*.jpg"))[:3]
    frame = pd.DataFrame({"path": images, "age": [30, None, 70], "sex": ["male", "", "female"],
                          "site": ["back", "face", None]})
    table = tiny.predict_many(frame)
    assert table["image_id"].tolist() == [p.stem for p in images] and (table["error"] == "").all()
    for (_, row), p, age, sex, site in zip(table.iterrows(), images, *(frame[c] for c in ("age", "sex", "site"))):
        one = tiny.predict(p, age=age, sex=sex, site=site)
        assert row["pred"] == one.diagnosis
        assert np.allclose([row[f"p_{c}"] for c in tiny.classes], [one.probabilities[c] for c in tiny.classes],
                           atol=1e-5)
    listed = tiny.predict_many([str(p) for p in images])
    assert list(listed.columns) == list(table.columns) and listed["image_id"].tolist() == table["image_id"].tolist()


def test_heatmap_is_the_web_apps_grad_cam_for_the_diagnosis(tiny, synth_root):
    image = next((synth_root / "dataset_test" / "image").glob("*.jpg"))
    result = tiny.predict(image, age=50, heatmap=True)
    size = tiny.predictor.preprocess["input_size"]
    assert result.heatmap is not None and result.heatmap.target == result.diagnosis
    assert result.heatmap.heat.shape == (size, size) and 0 <= result.heatmap.heat.min() <= result.heatmap.heat.max() <= 1
    direct = GradCam(skain.load(tiny.source.path).predictor)(str(image), 50.0, "unknown", "unknown",
                                                            target=result.diagnosis)
    assert np.allclose(direct.heat, result.heatmap.heat, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors(tiny, tmp_path, synth_root):
    image = next((synth_root / "dataset_test" / "image").glob("*.jpg"))
    with pytest.raises(FileNotFoundError, match="image not found: .*nowhere.jpg"):
        tiny.predict(tmp_path / "nowhere.jpg")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    with pytest.raises(ImageError, match="notes.txt: not an image .*use JPEG, PNG"):
        tiny.predict(notes)
    with pytest.raises(ImageError, match="empty file"):
        tiny.predict(b"")
    with pytest.raises(TypeError, match="a file path, bytes, a PIL image or a numpy array, not int"):
        tiny.predict(42)
    with pytest.raises(ValueError, match=r"HxWx3 \(RGB\) or HxW uint8, got shape \(8, 8, 4\)"):
        tiny.predict(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="dtype float64"):
        tiny.predict(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="unknown sex 'robot'; this model knows: .*female"):
        tiny.predict(image, sex="robot")
    with pytest.raises(ValueError, match="unknown site 'moon'"):
        tiny.predict(image, site="moon")
    for age in ("old", -1, 500):
        with pytest.raises(ValueError, match="age must be"):
            tiny.predict(image, age=age)
    with pytest.raises(FileNotFoundError, match="1 image file.s. not found: .*gone.jpg"):
        tiny.predict_many([image, tmp_path / "gone.jpg"])
    with pytest.raises(ValueError, match="needs a 'path' column"):
        tiny.predict_many(pd.DataFrame({"file": [str(image)]}))
    with pytest.raises(TypeError, match="a folder, a list of image paths or a DataFrame"):
        tiny.predict_many(b"bytes")
    with pytest.raises(BundleError, match="no trained model at .*nothing-here"):
        skain.load(tmp_path / "nothing-here")


# ------------------------------------------------------------------------------------------- the package
def test_import_skain_stays_light_and_lists_its_public_names():
    code = ("import sys, skain; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'skain.api' not in sys.modules; print(sorted(skain.__all__)); "
            "skain.load; assert 'torch' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['Model', 'Result', '__version__', 'load']"
    assert all(hasattr(skain, name) for name in skain.__all__)
    assert {"load", "Model", "Result"} <= set(dir(skain))
    with pytest.raises(AttributeError, match="no attribute 'predictor'"):
        skain.predictor  # noqa: B018


def python_blocks(markdown: str, heading: str) -> list[str]:
    section = markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_example_runs(fresh, photos):
    block = python_blocks((ROOT / "README.md").read_text(), "Python API")[0]
    image = sorted(photos.glob("*.jpg"))[0]
    assert '"lesion.jpg"' in block and '"photos/"' in block and "skain.load()" in block
    namespace: dict = {}
    exec(block.replace('"lesion.jpg"', repr(str(image))).replace('"photos/"', repr(str(photos))), namespace)
    assert namespace["result"].diagnosis in namespace["model"].classes
    assert len(namespace["table"]) == len(list(photos.glob("*.jpg")))


def test_api_reference_example_runs(fresh, photos):
    """docs/api.md's Python API example, with its file names pointed at real images."""
    block = python_blocks((ROOT / "docs" / "api.md").read_text(), "Python API")[0]
    image = sorted(photos.glob("*.jpg"))[0]
    code = block.replace('"lesion.jpg"', repr(str(image))).replace('"photos/"', repr(str(photos)))
    namespace: dict = {}
    exec(code, namespace)
    assert isinstance(namespace["result"], skain.Result)
