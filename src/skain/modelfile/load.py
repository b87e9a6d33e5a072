"""Which model file a command loads, and reading it in either format (`.pt` bundle or `.safetensors`).

`--model` accepts an output folder (its best_model.pt, else its best_model.safetensors), a Hugging Face-style
folder (its model.safetensors, `skain.modelfile.hub`), `hf://org/name[@revision]` (downloaded into the Hugging
Face cache) or a file; commands without `--model` use a model trained into `outputs/`, else the one shipped with
skAIn (`choose_model`). `model_id` is the id the web app, the Python API and an exported folder give a model file.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from skain.modelfile import hub
from skain.modelfile.bundle import BUNDLE_NAME, BundleError, check_bundle, check_torch
from skain.modelfile.portable import SUFFIX, read_portable

log = logging.getLogger(__name__)


MODEL_KINDS = "an output folder, a .pt bundle, a .safetensors file, a Hugging Face-style folder or hf://ORG/NAME"


def resolve_path(model: str | Path) -> Path:
    """--model accepts an output folder (its best_model.pt, else best_model.safetensors), a Hugging Face-style
    folder (its model.safetensors), hf://org/name[@revision] (downloaded, or from the cache) or a bundle file."""
    if hub.is_hub_uri(model):
        model = hub.download(str(model))
    path = Path(model)
    if path.is_dir():
        portable = path / Path(BUNDLE_NAME).with_suffix(".safetensors")
        if (path / BUNDLE_NAME).is_file() or portable.is_file():
            path = portable if portable.is_file() and not (path / BUNDLE_NAME).is_file() else path / BUNDLE_NAME
        else:
            path = hub.folder_weights(path) or path / BUNDLE_NAME
    if not path.is_file():
        raise BundleError(f"no trained model at {model}: train one with `skain train` (or `skain demo --synthetic`), "
                          f"or pass --model with {MODEL_KINDS}")
    return path


def model_id(path: str | Path) -> str:
    """A model file's id: the first 12 hex digits of its SHA-256 (the web app's, the API's and config.json's)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def read_bundle(model: str | Path) -> dict:
    """A .pt bundle (torch.load, weights_only) or a portable .safetensors file (skain.modelfile.portable), checked."""
    return read_file(resolve_path(model))


def read_file(path: Path) -> dict:
    """A model file already resolved by `resolve_path` (or `choose_model`), read in its own format."""
    check_torch()
    if path.suffix == SUFFIX:
        return read_portable(path)
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(f"{path}: not a loadable skAIn bundle (refused by torch.load(weights_only=True): "
                          f"{(str(exc).splitlines() or [type(exc).__name__])[0][:200]})") from exc
    check_bundle(bundle, str(path))
    return bundle


# ------------------------------------------------------------------------------------------- the shipped model
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "ham10000.safetensors"
DEFAULT_MODEL_ENV = "SKAIN_DEFAULT_MODEL"  # points the fallback elsewhere (tests, private deployments)
USER_OUTPUT = "outputs"


@dataclass(frozen=True)
class ModelChoice:
    """Which model answers, and why: a user's own (given or found at outputs/) or the one shipped with skAIn."""

    path: Path
    shipped: bool

    @property
    def kind(self) -> str:
        return "shipped" if self.shipped else "user"

    def describe(self) -> str:
        if self.shipped:
            return (f"{self.path.name}: the HAM10000 model shipped with skAIn (weights derive from HAM10000, "
                    "CC BY-NC 4.0; research and education only)")
        return f"{self.path}: your own model"

    def summary(self) -> dict:
        """For the API and the web page: the file name (never the local path) and where it came from."""
        return {"file": self.path.name, "kind": self.kind, "shipped": self.shipped,
                "description": "the HAM10000 model shipped with skAIn" if self.shipped else "your own model"}


def shipped_model() -> Path:
    return Path(os.environ.get(DEFAULT_MODEL_ENV) or SHIPPED_MODEL)


def choose_model(model: str | Path | None = None, output: str | Path = USER_OUTPUT) -> ModelChoice:
    """`--model` if given; else a model trained into `output` (default outputs/); else the shipped model."""
    if model is not None:
        path = resolve_path(model)
    else:
        try:
            path = resolve_path(output)
        except BundleError:  # nothing trained there: the shipped model
            path = shipped_model()
            if not path.is_file():
                raise BundleError(f"no trained model at {output}/ and the shipped HAM10000 model is not installed "
                                  f"({path}): train one with `skain train`, try `skain demo --synthetic`, or "
                                  f"pass --model with {MODEL_KINDS}") from None
    choice = ModelChoice(path, _same_file(path, shipped_model()))
    log.info("model: %s", choice.describe())
    return choice


def _same_file(a: Path, b: Path) -> bool:
    try:
        return b.is_file() and os.path.samefile(a, b)
    except OSError:
        return False
