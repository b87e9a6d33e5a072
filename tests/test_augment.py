"""The training augmentation: fused colour jitter against torchvision's formulas, geometry, determinism."""
import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from skain.data.transforms import (
    DermoscopyAugment,
    apply_colour,
    colour_affine,
    eval_transform,
    normalise,
    resolve_preprocess,
)

PRE = resolve_preprocess({}, 32)  # input 32, resize 37


def apply(m: np.ndarray, c: np.ndarray, img: torch.Tensor) -> torch.Tensor:
    """Apply x -> M x + c to a float CxHxW image."""
    m, c = torch.from_numpy(m).float(), torch.from_numpy(c).float()
    return torch.einsum("ij,jhw->ihw", m, img) + c[:, None, None]


@pytest.fixture
def img():
    torch.manual_seed(0)
    return 0.3 + 0.4 * torch.rand(3, 24, 24)  # mid-range, so no factor below pushes a value out of [0, 1]


@pytest.mark.parametrize("order", [[0, 1, 2], [1, 0, 2], [2, 1, 0], [2, 0, 1]])
def test_colour_affine_equals_torchvision_brightness_contrast_saturation(img, order):
    b, c, s = 1.1, 0.85, 1.15
    ops = {0: lambda x: F.adjust_brightness(x, b), 1: lambda x: F.adjust_contrast(x, c),
           2: lambda x: F.adjust_saturation(x, s)}
    expected = img
    for op in order:
        expected = ops[op](expected)
    m, off = colour_affine(b, c, s, 0.0, img.mean((1, 2)), order + [3])
    torch.testing.assert_close(apply(m, off, img), expected, atol=1e-5, rtol=0)


def test_identity_factors_are_the_identity(img):
    m, off = colour_affine(1.0, 1.0, 1.0, 0.0, img.mean((1, 2)), [3, 2, 1, 0])
    np.testing.assert_allclose(m, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(off, np.zeros(3), atol=1e-12)


@pytest.mark.parametrize("hue", [-0.03, 0.03])
def test_hue_rotation_tracks_torchvision_hue_shift(img, hue):
    m, off = colour_affine(1.0, 1.0, 1.0, hue, img.mean((1, 2)), [0, 1, 2, 3])
    ours, ref = apply(m, off, img), F.adjust_hue(img, hue)
    change_ours, change_ref = (ours - img).flatten(), (ref - img).flatten()
    assert torch.corrcoef(torch.stack([change_ours, change_ref]))[0, 1] > 0.6  # same direction of shift
    assert 0.5 < change_ours.abs().mean() / change_ref.abs().mean() < 2.0  # and about the same size
    gray = torch.tensor([0.299, 0.587, 0.114])
    torch.testing.assert_close(torch.einsum("c,chw->hw", gray, ours), torch.einsum("c,chw->hw", gray, img),
                               atol=1e-5, rtol=0)  # a chroma rotation keeps luma


def test_apply_colour_is_clamp_of_the_affine_map_then_normalise():
    arr = np.random.default_rng(4).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    m = np.array([[1.2, 0.1, -0.05], [0.0, 0.8, 0.1], [0.05, -0.1, 1.1]])
    c = np.array([0.05, -0.1, 0.02])
    pixels = torch.from_numpy(arr).permute(2, 0, 1)
    out = apply_colour(pixels, m, c, PRE)
    x = arr.reshape(-1, 3).astype(np.float64) / 255.0
    clamped = np.clip(x @ m.T + c, 0, 1)
    assert (clamped == 0).any() and (clamped == 1).any()  # the case clamps at both ends
    expected = (clamped - np.array(PRE["mean"])) / np.array(PRE["std"])
    np.testing.assert_allclose(out.permute(1, 2, 0).reshape(-1, 3).numpy(), expected, atol=1e-5)
    identity = apply_colour(pixels, np.eye(3), np.zeros(3), PRE)
    torch.testing.assert_close(identity, normalise(arr, PRE), atol=1e-5, rtol=0)


def test_normalise_equals_torchvision_to_dtype_and_normalize():
    arr = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ref = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(PRE["mean"], PRE["std"])])(
        torch.from_numpy(arr).permute(2, 0, 1))
    torch.testing.assert_close(normalise(arr, PRE), ref, atol=2e-6, rtol=0)


def test_eval_transform_is_the_centre_crop():
    arr = np.random.default_rng(6).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    ref = v2.CenterCrop(32)(torch.from_numpy(arr).permute(2, 0, 1))
    torch.testing.assert_close(eval_transform(PRE)(arr), normalise(ref.permute(1, 2, 0).numpy(), PRE))


def test_output_shape_dtype_and_normalisation():
    arr = np.random.default_rng(0).integers(0, 256, (37, 49, 3), dtype=np.uint8)
    out = DermoscopyAugment(PRE)(arr)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    lo = (0 - torch.tensor(PRE["mean"])) / torch.tensor(PRE["std"])
    hi = (1 - torch.tensor(PRE["mean"])) / torch.tensor(PRE["std"])
    assert (out >= lo[:, None, None] - 1e-5).all() and (out <= hi[:, None, None] + 1e-5).all()


def test_seeded_draws_repeat_and_differ():
    arr = np.random.default_rng(1).integers(0, 256, (37, 49, 3), dtype=np.uint8)
    aug = DermoscopyAugment(PRE)
    torch.manual_seed(3)
    a = aug(arr)
    torch.manual_seed(3)
    torch.testing.assert_close(aug(arr), a, atol=0, rtol=0)
    assert not torch.equal(aug(arr), a)


def test_geometry_covers_all_eight_orientations_without_changing_content():
    """With the crop fixed to the whole (square) image and no jitter, every output is one of the 8 dihedral
    views of the plain eval tensor, and all 8 occur."""
    pre = resolve_preprocess({}, 16)
    pre["resize"] = 16
    arr = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    base = eval_transform(pre)(arr)
    views = [torch.rot90(v, k, (1, 2)) for v in (base, base.flip(2)) for k in range(4)]
    aug = DermoscopyAugment(pre, strength=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.manual_seed(0)
    seen = set()
    for _ in range(120):
        out = aug(arr)
        match = [i for i, v in enumerate(views) if torch.allclose(out, v, atol=1e-5)]
        assert match, "output is not a dihedral view of the input"
        seen.add(match[0])
    assert seen == set(range(8))


def test_crops_respect_scale_and_aspect_bounds():
    aug = DermoscopyAugment(PRE)
    torch.manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = aug.crop_box(256, 341)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 341 and 0 <= top < bottom <= 256
        assert 0.34 <= w * h / (256 * 341) <= 1.0 and 0.74 <= w / h <= 1.34
