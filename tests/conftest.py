"""Shared fixtures: a small SYNTHETIC dataset, a tiny-model config and one trained tiny bundle per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from skain.data.synthetic import make_synthetic
from skain.training.config import Config, build_config

SHARED = Path(os.environ.get("SKAIN_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "ham10000"))


def tiny_config(data: Path | str, output: Path | str, cache: Path | str | None = None, **train) -> Config:
    """timm's tiny `test_efficientnet` at 64 px, random init: seconds per epoch on 2 cores."""
    t = {"output": str(output), "frozen_epochs": 0, "epochs": 4, "lr": 3e-3, "batch_size": 16,
         "schedule": "constant", "progress": False, "overwrite": True, **train}
    return build_config("cpu", flags={
        "data": {"data": str(data), "cache_dir": str(cache) if cache else "off", "num_workers": 0},
        "model": {"backbone": "test_efficientnet", "pretrained": "none", "input_size": 64},
        "train": t})


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """240 synthetic images in the seed layout (dataset_train) plus 40 in dataset_test."""
    root = tmp_path_factory.mktemp("synth")
    make_synthetic(root / "dataset_train", 240, seed=0, size=(96, 72))
    make_synthetic(root / "dataset_test", 40, seed=1, size=(96, 72), split="test")
    return root


@pytest.fixture(scope="session")
def trained(synth_root, tmp_path_factory) -> Path:
    """An output folder holding a tiny model trained on the synthetic set (shared by read-only tests)."""
    from skain.training.train import fit
    out = tmp_path_factory.mktemp("trained")
    fit(tiny_config(synth_root / "dataset_train", out, epochs=6, seed=1))
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "images").is_dir():
        pytest.skip(f"real HAM10000 sample not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def default_model(trained, tmp_path_factory) -> Path:
    """The model commands fall back to: the shipped HAM10000 file when this checkout has it, else a stand-in
    exported from the tiny trained bundle (without its OOD check, which knows only synthetic drawings and would
    turn every real lesion away). Tests point SKAIN_DEFAULT_MODEL at it."""
    from skain.modelfile.load import SHIPPED_MODEL, read_bundle
    from skain.modelfile.portable import export_portable
    if SHIPPED_MODEL.is_file():
        return SHIPPED_MODEL
    bundle = read_bundle(trained)
    bundle["trust"] = {k: v for k, v in bundle["trust"].items() if k != "ood"}
    return export_portable(bundle, tmp_path_factory.mktemp("stand_in") / "ham10000.safetensors", "float32")
