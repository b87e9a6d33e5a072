"""The model bundle: everything a prediction needs, as plain tensors and dicts, written atomically.

Loading uses `torch.load(..., weights_only=True)` only, and only on a torch where that is safe (>= 2.6:
CVE-2025-32434), checks the format version, that the backbone is a plain timm architecture name, and that the
stored classes and vocabularies fit the stored weights before building anything.

Files are written through a temporary file and a rename, with the permissions an ordinary `open()` would give
(the user's umask, 0644 by default; an existing file keeps its mode), not `mkstemp`'s owner-only 0600.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from skain import __version__
from skain.data.encoder import MetadataEncoder
from skain.fileio import atomic_write
from skain.model import build_model

FORMAT = "skain-bundle"
FORMAT_VERSION = 1
BUNDLE_NAME = "best_model.pt"
SAFE_TORCH = (2, 6)  # torch.load(weights_only=True) allowed code execution before 2.6 (CVE-2025-32434)
_TAG = re.compile(r"[A-Za-z0-9_]+")


class BundleError(ValueError):
    """A bundle that cannot be used; the message says why."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def make_bundle(model: torch.nn.Module, model_args: dict, preprocess: dict, encoder: MetadataEncoder,
                classes: list[str], metrics: dict | None = None, **extra: Any) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "skain_version": __version__,
        "model_args": dict(model_args), "preprocess": dict(preprocess), "encoder": encoder.state_dict(),
        "classes": list(classes), "metrics": metrics or {},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        **extra,
    }


def check_torch(version: str | None = None) -> None:
    """Refuse to unpickle anything on a torch whose weights_only loader is unsafe (CVE-2025-32434)."""
    version = version or torch.__version__
    found = tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:2])
    if found < SAFE_TORCH:
        raise BundleError(f"torch {version} is too old to load model files safely: before torch 2.6, "
                          "torch.load(weights_only=True) can run code hidden in a crafted file (CVE-2025-32434). "
                          "Upgrade with: pip install 'torch>=2.6'")


def check_backbone(name: Any, origin: str = "bundle") -> str:
    """A bundle may name only a plain timm architecture (optionally with a pretrained tag, `resnet50.a1_in1k`):
    `hf-hub:...`, `local-dir:...` or paths would make loading a model fetch from the network or read a folder."""
    import timm
    from timm.models import split_model_name_tag
    if not isinstance(name, str) or not name or any(c in name for c in ":/\\"):
        raise BundleError(f"{origin}: backbone {str(name)[:80]!r} is not a plain timm architecture name; "
                          "bundles may not name hub, local-folder or file sources")
    arch, tag = split_model_name_tag(name)
    if arch not in timm.list_models() or (tag and not _TAG.fullmatch(tag)):
        raise BundleError(f"{origin}: backbone {name[:80]!r} is not an architecture this timm "
                          f"({timm.__version__}) knows; upgrade timm or retrain")
    return name


def check_bundle(bundle: Any, origin: str) -> None:
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise BundleError(f"{origin}: not a skAIn bundle")
    if bundle.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{origin}: bundle format {bundle.get('format_version')} written by skAIn "
                          f"{bundle.get('skain_version')}; this skAIn ({__version__}) reads format "
                          f"{FORMAT_VERSION}. Retrain, or use the matching skAIn version")
    _check_parts(bundle, origin)
    args = bundle["model_args"]
    for name in backbone_names(args):
        check_backbone(name, origin)
    if "ensemble" not in args:
        _check_weights(bundle, args, "", origin)
        return
    members = args["ensemble"]
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) and "ensemble" not in m
                                                               for m in members):
        raise BundleError(f"{origin}: model_args['ensemble'] must be a non-empty list of member model_args")
    for i, member in enumerate(members):
        sizes = {"sex_vocab": member.get("n_sex"), "site_vocab": member.get("n_site")}
        _check_weights(bundle, member, f"members.{i}.", f"{origin} (ensemble member {i})", sizes)
    _check_maps(bundle, len(members), origin)
    _check_input_sizes(bundle, origin)


def _check_input_sizes(bundle: dict, origin: str) -> None:
    """Members of different input sizes: each names its own, and the largest is the ensemble's input."""
    own = [m.get("input_size") for m in bundle["model_args"]["ensemble"]]
    if all(s is None for s in own):
        return
    size = bundle["preprocess"].get("input_size")
    if not all(isinstance(s, int) and s > 0 for s in own) or max(own) != size:
        raise BundleError(f"{origin}: the ensemble members' input sizes {own} do not fit its input size {size}")


def backbone_names(args: dict) -> list:
    """The timm architecture name(s) a bundle asks for: one, or each ensemble member's."""
    members = args.get("ensemble")
    if isinstance(members, list):
        return [m.get("backbone") if isinstance(m, dict) else None for m in members]
    return [args.get("backbone")]


def _check_maps(bundle: dict, n: int, origin: str) -> None:
    """An ensemble's per-member index maps cover its vocabularies and point inside each member's own."""
    state, enc, members = bundle["state_dict"], bundle["encoder"], bundle["model_args"]["ensemble"]
    for name, vocab, size in (("sex_map", "sex_vocab", "n_sex"), ("site_map", "site_vocab", "n_site")):
        index = state.get(name)
        if index is None or tuple(index.shape) != (n, len(enc[vocab])) or index.is_floating_point():
            raise BundleError(f"{origin}: the ensemble's {name} does not match its {vocab} and {n} members")
        if any(int(index[i].max()) >= int(m.get(size, 0)) or int(index[i].min()) < 0 for i, m in enumerate(members)):
            raise BundleError(f"{origin}: the ensemble's {name} points outside a member's {vocab}")


def _check_weights(bundle: dict, args: dict, prefix: str, origin: str, sizes: dict | None = None) -> None:
    """Classes and vocabularies fit the weights of one network (an ensemble member's under `prefix`, whose
    vocabulary sizes are its own, `sizes`, not the ensemble's)."""
    state, enc = bundle["state_dict"], bundle["encoder"]
    sizes = sizes or {v: len(enc[v]) for v in ("sex_vocab", "site_vocab")}
    head = [k[len(prefix):] for k in state if k.startswith(prefix + "head.") and k.endswith(".weight")]
    last = sorted(head, key=lambda k: int(k.split(".")[1]))[-1] if head else None
    n_out = state[prefix + last].shape[0] if last else -1
    if n_out != len(bundle["classes"]) or args.get("num_classes") != n_out:
        raise BundleError(f"{origin}: {len(bundle['classes'])} class names but the weights have {n_out} outputs")
    if not args.get("image_only"):
        for key, vocab in (("meta.sex.weight", "sex_vocab"), ("meta.site.weight", "site_vocab")):
            if prefix + key not in state or state[prefix + key].shape[0] != sizes[vocab]:
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


def load_model(bundle: dict) -> torch.nn.Module:
    """The bundle's network (a SkainNet, or an EnsembleNet of them), in eval mode."""
    for name in backbone_names(bundle["model_args"]):
        check_backbone(name)
    model = build_model(bundle["model_args"])
    try:
        model.load_state_dict(bundle["state_dict"])
    except RuntimeError as exc:
        raise BundleError(f"bundle weights do not fit the model they describe: {str(exc)[:300]}") from exc
    return model.eval()
