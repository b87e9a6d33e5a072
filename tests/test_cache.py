"""The pre-resized image cache: hits, misses, invalidation, and predictions identical to uncached ones."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from skain.data.images import ImageLoader, open_image, resize_shorter


@pytest.fixture()
def image(tmp_path, shared_data):
    src = sorted((shared_data / "images").glob("*.jpg"))[0]
    dst = tmp_path / "img" / src.name
    dst.parent.mkdir()
    shutil.copy(src, dst)
    return dst


def test_second_read_hits_and_returns_exactly_the_resized_image(image, tmp_path):
    loader = ImageLoader(256, tmp_path / "cache")
    first = loader(image)
    second = loader(image)
    assert (loader.misses, loader.hits) == (1, 1)
    assert first.shape[0] == 256 and first.dtype == np.uint8
    direct = resize_shorter(open_image(image), 256)
    np.testing.assert_array_equal(second, direct)  # cached == uncached, bit for bit


def test_edited_file_or_new_resolution_misses(image, tmp_path):
    loader = ImageLoader(256, tmp_path / "cache")
    loader(image)
    Image.new("RGB", (600, 450), (10, 200, 30)).save(image)
    os.utime(image, ns=(1, 1_000_000_000))
    changed = loader(image)
    assert loader.misses == 2 and tuple(changed[0, 0]) == pytest.approx((10, 200, 30), abs=3)
    other = ImageLoader(384, tmp_path / "cache")
    assert other(image).shape[0] == 384 and other.misses == 1


def test_unwritable_cache_falls_back_to_decoding(image, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    loader = ImageLoader(224, blocker / "cache")
    assert loader(image).shape[0] == 224 and loader.cache_dir is None


def test_cached_predictions_equal_uncached(trained, synth_root, tmp_path):
    from skain.data.layout import discover, load_table
    from skain.predict import Predictor
    frame = load_table(discover(synth_root / "dataset_test"), require=("image_id",))
    p = Predictor.from_bundle(trained)
    plain = p.predict_frame(frame, progress=False)
    cached = p.predict_frame(frame, cache_dir=tmp_path / "c", progress=False)
    again = p.predict_frame(frame, cache_dir=tmp_path / "c", progress=False)
    cols = [c for c in plain if c.startswith("p_")]
    np.testing.assert_array_equal(plain[cols].to_numpy(), cached[cols].to_numpy())
    np.testing.assert_array_equal(plain[cols].to_numpy(), again[cols].to_numpy())
