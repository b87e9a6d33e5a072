"""The model bundle: everything a prediction needs, as plain tensors and dicts, written atomically.

Loading uses `torch.load(..., weights_only=True)` only, checks the format version, and checks that the
stored classes and vocabularies fit the stored weights before building anything.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data.encoder import MetadataEncoder
from .model import SkainNet, build_model

FORMAT = "skain-bundle"
FORMAT_VERSION = 1
BUNDLE_NAME = "best_model.pt"


class BundleError(ValueError):
    """A bundle that cannot be used; the message says why."""


def atomic_write(path: str | Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_json(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2, allow_nan=True) + "\n").encode("utf-8")))


def make_bundle(model: SkainNet, model_args: dict, preprocess: dict, encoder: MetadataEncoder,
                classes: list[str], metrics: dict | None = None, **extra: Any) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "skain_version": __version__,
        "model_args": dict(model_args), "preprocess": dict(preprocess), "encoder": encoder.state_dict(),
        "classes": list(classes), "metrics": metrics or {},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        **extra,
    }


def resolve_path(model: str | Path) -> Path:
    """--model accepts an output folder (its best_model.pt) or a bundle file."""
    path = Path(model)
    if path.is_dir():
        portable = path / Path(BUNDLE_NAME).with_suffix(".safetensors")
        path = portable if portable.is_file() and not (path / BUNDLE_NAME).is_file() else path / BUNDLE_NAME
    if not path.is_file():
        raise BundleError(f"no trained model at {model}: train one with `skain train` (or `skain demo --synthetic`), "
                          "or pass --model with an output folder, a .pt bundle or a .safetensors file")
    return path


def read_bundle(model: str | Path) -> dict:
    """A .pt bundle (torch.load, weights_only) or a portable .safetensors file (skain.portable), checked."""
    path = resolve_path(model)
    if path.suffix == ".safetensors":
        from .portable import read_portable
        return read_portable(path)
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(f"{path}: not a loadable skAIn bundle (refused by torch.load(weights_only=True): "
                          f"{(str(exc).splitlines() or [type(exc).__name__])[0][:200]})") from exc
    check_bundle(bundle, str(path))
    return bundle


def check_bundle(bundle: Any, origin: str) -> None:
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise BundleError(f"{origin}: not a skAIn bundle")
    if bundle.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{origin}: bundle format {bundle.get('format_version')} written by skAIn "
                          f"{bundle.get('skain_version')}; this skAIn ({__version__}) reads format "
                          f"{FORMAT_VERSION}. Retrain, or use the matching skAIn version")
    _check_parts(bundle, origin)
    state, args, enc = bundle["state_dict"], bundle["model_args"], bundle["encoder"]
    head = [k for k in state if k.startswith("head.") and k.endswith(".weight")]
    n_out = state[sorted(head, key=lambda k: int(k.split(".")[1]))[-1]].shape[0] if head else -1
    if n_out != len(bundle["classes"]) or args.get("num_classes") != n_out:
        raise BundleError(f"{origin}: {len(bundle['classes'])} class names but the weights have {n_out} outputs")
    if not args.get("image_only"):
        for key, vocab in (("meta.sex.weight", "sex_vocab"), ("meta.site.weight", "site_vocab")):
            if key not in state or state[key].shape[0] != len(enc[vocab]):
                raise BundleError(f"{origin}: the {vocab} vocabulary does not match the weights ({key})")


PARTS = {"state_dict": dict, "model_args": dict, "encoder": dict, "classes": list, "preprocess": dict}


def _check_parts(bundle: dict, origin: str) -> None:
    """Every part a prediction needs is there and has the right type, so later checks cannot crash."""
    missing = [k for k, kind in PARTS.items() if not isinstance(bundle.get(k), kind)]
    if missing:
        raise BundleError(f"{origin}: bundle is missing or has malformed part(s) {', '.join(missing)}; "
                          "it was not written by `skain train`")
    if not all(isinstance(v, torch.Tensor) for v in bundle["state_dict"].values()):
        raise BundleError(f"{origin}: bundle state_dict holds values that are not tensors")
    if not all(isinstance(bundle["encoder"].get(v), list) for v in ("sex_vocab", "site_vocab")):
        raise BundleError(f"{origin}: bundle encoder is missing its sex/site vocabularies")


def load_model(bundle: dict) -> SkainNet:
    model = build_model(bundle["model_args"])
    try:
        model.load_state_dict(bundle["state_dict"])
    except RuntimeError as exc:
        raise BundleError(f"bundle weights do not fit the model they describe: {str(exc)[:300]}") from exc
    return model.eval()
