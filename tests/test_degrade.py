"""The re-save augmentation (downscale, JPEG/WebP, blur/sharpen, border) and the named copies the benchmark and
the OOD fit use: right sizes, real re-encoding artefacts, repeatable under a seed, off when asked."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from skain.data.degrade import COPIES, PhotoDegrade, saved_copy
from skain.data.transforms import DermoscopyAugment, resolve_preprocess

PRE = resolve_preprocess({}, 64)


@pytest.fixture
def arr():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:80, :107]
    smooth = (120 + 60 * np.sin(xx / 9.0) * np.cos(yy / 7.0))[..., None] * np.array([1.0, 0.8, 0.7])
    return np.clip(smooth + rng.normal(0, 12, (80, 107, 3)), 0, 255).astype(np.uint8)


def test_every_degraded_image_keeps_the_shape_and_most_change(arr):
    torch.manual_seed(0)
    aug = PhotoDegrade(p=1.0)
    outs = [aug(arr) for _ in range(40)]
    assert all(o.shape == arr.shape and o.dtype == np.uint8 for o in outs)
    changed = [np.abs(o.astype(int) - arr).mean() > 1.0 for o in outs]
    assert sum(changed) >= 30  # a step can draw nothing, but most draws alter the pixels
    assert max(np.abs(o.astype(int) - arr).mean() for o in outs) < 60  # degraded, not destroyed


def test_off_means_the_same_array_object(arr):
    aug = PhotoDegrade(p=0.0)
    assert all(aug(arr) is arr for _ in range(10))


def test_the_same_seed_gives_the_same_degradations(arr):
    aug = PhotoDegrade(p=1.0)
    torch.manual_seed(7)
    first = [aug(arr) for _ in range(8)]
    torch.manual_seed(7)
    second = [aug(arr) for _ in range(8)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("step, attrs", [
    ("encode", dict(p_border=0, p_scale=0, p_filter=0, p_encode=1, p_webp=0)),
    ("scale", dict(p_border=0, p_scale=1, p_filter=0, p_encode=0, min_scale=0.3)),
    ("border", dict(p_border=1, p_scale=0, p_filter=0, p_encode=0)),
    ("filter", dict(p_border=0, p_scale=0, p_filter=1, p_encode=0)),
])
def test_each_step_alone_changes_the_image(arr, step, attrs):
    torch.manual_seed(3)
    aug = PhotoDegrade(p=1.0, **attrs)
    diffs = [np.abs(aug(arr).astype(int) - arr).mean() for _ in range(10)]
    assert min(diffs) > 0.2, f"{step}: {diffs}"


def test_jpeg_step_leaves_jpeg_blocking():
    """Steps in the pixels across the 8x8 block edges are the JPEG fingerprint; a blur or resize leaves none."""
    yy, xx = np.mgrid[:96, :128]
    smooth = np.stack([100 + xx * 0.9 + yy * 0.3, 80 + yy * 0.8, 120 + np.sin(xx / 11.0) * 30], -1)
    arr = np.clip(smooth, 0, 255).astype(np.uint8)
    torch.manual_seed(0)
    aug = PhotoDegrade(p=1.0, p_border=0, p_scale=0, p_filter=0, p_encode=1, p_webp=0, quality=(40, 40))

    def edge_ratio(a: np.ndarray) -> float:
        step = np.abs(np.diff(a.astype(float), axis=1)).mean((0, 2))  # column j -> j+1
        return step[7::8].mean() / np.delete(step, np.s_[7::8]).mean()
    assert edge_ratio(aug(arr)) > 1.3 * edge_ratio(arr)


def test_border_frames_the_image_with_one_grey_level(arr):
    torch.manual_seed(5)
    for _ in range(10):
        img = PhotoDegrade.border(Image.fromarray(arr))
        frame = np.asarray(img)
        assert img.size != (arr.shape[1], arr.shape[0])
        edge = np.concatenate([frame[0], frame[-1]]) if frame.shape[0] > arr.shape[0] else \
            np.concatenate([frame[:, 0], frame[:, -1]])
        assert len(np.unique(edge)) == 1


@pytest.mark.parametrize("copy", list(COPIES))
def test_named_copies_have_the_maintainers_size_and_format(copy):
    img = Image.new("RGB", (600, 450), (150, 100, 90))
    data = saved_copy(img, copy)
    scale, fmt, _, border = COPIES[copy]
    with Image.open(io.BytesIO(data)) as out:
        assert out.format == fmt
        assert out.size == (round(600 * scale) + 2 * border, round(450 * scale) + 2 * border)


def test_unknown_copy_is_refused():
    with pytest.raises(ValueError, match="unknown copy"):
        saved_copy(Image.new("RGB", (8, 8)), "fax")


def test_the_training_augmentation_degrades_only_when_asked(arr):
    torch.manual_seed(0)
    plain = DermoscopyAugment(PRE)
    assert plain.photo is None
    torch.manual_seed(0)
    photo = DermoscopyAugment(PRE, photo=1.0)
    out = photo(arr)
    assert out.shape == (3, 64, 64) and torch.isfinite(out).all()
    seen = []
    photo.photo = lambda a: seen.append(a.shape) or a
    photo(arr)
    assert seen == [arr.shape]  # the re-save happens on the resized array, before the crop
