"""Safe loading beyond weights_only: a torch with the CVE-2025-32434 loader is refused before anything is
unpickled, a bundle may name only a plain timm architecture (never a hub, folder or file source), and
`--precision fast` replaces a stale ONNX export instead of refusing to start."""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from skain.cli import main
from skain.inference.predictor import Predictor
from skain.modelfile.bundle import (
    BundleError,
    atomic_torch_save,
    check_backbone,
    check_torch,
    load_model,
)
from skain.modelfile.load import read_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(trained) -> dict:
    return torch.load(trained / "best_model.pt", map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------- torch version
@pytest.mark.parametrize("version", ["2.2.0", "2.5.1+cu124", "1.13.1"])
def test_a_torch_with_the_unsafe_loader_is_refused_with_the_cve(version):
    with pytest.raises(BundleError, match=r"CVE-2025-32434.*pip install 'torch>=2.6'"):
        check_torch(version)


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0+cpu", "2.14.1+cu130", "3.0.0"])
def test_safe_torch_versions_pass(version):
    check_torch(version)


def test_bundles_are_not_unpickled_on_an_old_torch(trained, monkeypatch, synth_root, tmp_path, capsys):
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on an unsafe torch"))
    with pytest.raises(BundleError, match="CVE-2025-32434"):
        read_bundle(trained)
    assert main(["predict", "--data", str(synth_root / "dataset_test"), "--model", str(trained), "--output",
                 str(tmp_path / "p.csv"), "--no-progress"]) == 2
    assert "torch 2.5.1 is too old to load model files safely" in capsys.readouterr().err


def test_the_package_requires_a_safe_torch():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    spec = re.search(r'"torch(>=[^"]+)"', text)
    assert spec and spec.group(1) == ">=2.6", spec


# ------------------------------------------------------------------------------------------- backbone names
BAD_NAMES = ["hf-hub:timm/resnet18.a1_in1k", "local-dir:/tmp/weights", "/etc/passwd", "../model", "timm/resnet18",
             "C:\\models\\net", "no_such_architecture", "resnet18 ", "", None, 5, "resnet18.a1;rm"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_only_plain_timm_architecture_names_are_accepted(name):
    with pytest.raises(BundleError, match="backbone"):
        check_backbone(name, "x.pt")


@pytest.mark.parametrize("name", ["test_efficientnet", "tf_efficientnet_lite0", "resnet18.a1_in1k"])
def test_plain_names_and_pretrained_tags_pass(name):
    assert check_backbone(name) == name


@pytest.mark.parametrize("name", ["hf-hub:timm/test_efficientnet.r160_in1k", "local-dir:/tmp"])
def test_a_bundle_naming_a_hub_or_folder_is_refused_before_timm_sees_it(bundle, tmp_path, monkeypatch, name):
    import timm
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm.create_model was called"))
    bad = copy.deepcopy(bundle)
    bad["model_args"]["backbone"] = name
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(BundleError, match="not a plain timm architecture name"):
        read_bundle(path)
    with pytest.raises(BundleError, match="not a plain timm architecture name"):
        load_model(bad)  # also for bundles handed over as dicts
    with pytest.raises(BundleError):
        Predictor(bad)


# ------------------------------------------------------------------------------------------- stale ONNX file
@pytest.fixture()
def retrained_beside_old_export(trained, tmp_path) -> Path:
    """An output folder whose best_model.onnx was exported from an earlier bundle."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "best_model.pt").write_bytes((trained / "best_model.pt").read_bytes())
    assert main(["export", "--model", str(out)]) == 0
    bundle = read_bundle(out)
    bundle["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in bundle["state_dict"].items()}
    atomic_torch_save(bundle, out / "best_model.pt")
    return out


def fingerprints_match(folder: Path) -> bool:
    from skain.modelfile.onnx import bundle_fingerprint, read_fingerprint
    return read_fingerprint(folder / "best_model.onnx") == bundle_fingerprint(read_bundle(folder))


def test_fast_precision_replaces_a_stale_onnx_file_with_a_warning(retrained_beside_old_export, synth_root, caplog):
    from skain.inference.predictor import prediction_table
    out = retrained_beside_old_export
    assert not fingerprints_match(out)
    with caplog.at_level(logging.WARNING, logger="skain.inference.export"):
        fast = Predictor.from_bundle(out, precision="fast")
    assert "exported from a different bundle" in caplog.text and "exporting this bundle again" in caplog.text
    assert fast.backend in ("openvino", "onnx") and fingerprints_match(out)
    frame, _ = prediction_table(synth_root / "dataset_test")
    cols = [c for c in fast.predict_frame(frame.head(8), progress=False) if c.startswith("p_")]
    ref = Predictor.from_bundle(out).predict_frame(frame.head(8), progress=False)[cols].to_numpy()
    assert np.abs(fast.predict_frame(frame.head(8), progress=False)[cols].to_numpy() - ref).max() <= 1e-4


def test_a_stale_file_that_cannot_be_replaced_is_exported_in_memory(retrained_beside_old_export, monkeypatch):
    import skain.inference.export as export
    out = retrained_beside_old_export
    before = (out / "best_model.onnx").read_bytes()

    def read_only(*_a, **_k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(export, "atomic_write", read_only)
    fast = Predictor.from_bundle(out, precision="fast")
    assert fast.backend in ("openvino", "onnx") and (out / "best_model.onnx").read_bytes() == before


def test_a_named_graph_backend_still_refuses_a_stale_file(retrained_beside_old_export):
    """Asking for --backend onnx means "run that file": a mismatch stays an error there."""
    with pytest.raises(BundleError, match="different bundle"):
        Predictor.from_bundle(retrained_beside_old_export, backend="onnx")


def test_cli_fast_prediction_runs_beside_a_stale_export(retrained_beside_old_export, synth_root, tmp_path):
    assert main(["predict", "--data", str(synth_root / "dataset_test"), "--model", str(retrained_beside_old_export),
                 "--precision", "fast", "--output", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    assert fingerprints_match(retrained_beside_old_export)
