"""The photos benchmarks/accuracy/trust_eval.py shows the OOD check are whole images, grey ones included."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")
from benchmarks.accuracy.trust_eval import as_rgb, photo_variants  # noqa: E402


def test_grey_boolean_and_rgba_samples_become_whole_rgb_images():
    grey = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7)
    rgb = as_rgb(grey)
    assert rgb.shape == (5, 7, 3) and all(np.array_equal(rgb[..., c], grey) for c in range(3))
    assert as_rgb(np.eye(4, dtype=bool)).max() == 255
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    assert as_rgb(rgba).shape == (3, 4, 3)


def test_a_grey_sample_photo_is_shown_whole_not_as_a_three_pixel_strip():
    views = photo_variants(("clock",), seed=0, crops=1)["photo:clock"]
    whole = Image.open(io.BytesIO(views[0]))
    assert whole.size == (400, 300) and whole.mode == "RGB"
