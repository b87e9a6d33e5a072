"""The pre-resized image cache: hits, misses, invalidation, content keys, the size cap with LRU eviction, the
free-space floor, stale temporary files, `skain cache info|clear`, and predictions identical to uncached ones."""
import logging
import os
import shutil
import time
from collections import namedtuple

import numpy as np
import pytest
from PIL import Image

from skain.cli import main
from skain.data import cache as cache_mod
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
    assert loader(image).shape[0] == 224 and not loader.cache.writable
    assert loader(image).shape[0] == 224 and loader.misses == 2  # keeps decoding, never stops the work


def test_cached_predictions_equal_uncached(trained, synth_root, tmp_path):
    from skain.data.layout import discover, load_table
    from skain.inference.predictor import Predictor
    frame = load_table(discover(synth_root / "dataset_test"), require=("image_id",))
    p = Predictor.from_bundle(trained)
    plain = p.predict_frame(frame, progress=False)
    cached = p.predict_frame(frame, cache_dir=tmp_path / "c", progress=False)
    again = p.predict_frame(frame, cache_dir=tmp_path / "c", progress=False)
    cols = [c for c in plain if c.startswith("p_")]
    np.testing.assert_array_equal(plain[cols].to_numpy(), cached[cols].to_numpy())
    np.testing.assert_array_equal(plain[cols].to_numpy(), again[cols].to_numpy())


# ------------------------------------------------------------------------ content keys, cap, disk, temp files
def lesions(folder, n, size=(120, 90)):
    """n small, distinct JPEGs (each resized entry at 32 px is 32x42x3 = 4 kB)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def entries(folder):
    return sorted(folder.glob("*.npy"))


def test_a_moved_or_re_extracted_dataset_hits_the_same_entries(tmp_path):
    first = lesions(tmp_path / "a", 3)
    for p in first:
        ImageLoader(32, tmp_path / "cache")(p)
    copies = tmp_path / "extracted-again"
    copies.mkdir()
    for p in first:
        shutil.copy(p, copies / p.name)  # new path, new mtime, same bytes
        os.utime(copies / p.name, ns=(5, 5_000_000_000))
    again = ImageLoader(32, tmp_path / "cache")
    arrays = [again(copies / p.name) for p in first]
    assert (again.hits, again.misses) == (3, 0) and len(entries(tmp_path / "cache")) == 3
    np.testing.assert_array_equal(arrays[0], ImageLoader(32)(first[0]))


def test_the_cache_stays_under_its_cap_and_evicts_the_least_recently_used(tmp_path):
    paths = lesions(tmp_path / "img", 6)
    entry = ImageLoader(32, tmp_path / "probe")(paths[0]).nbytes + 128  # + the .npy header
    cap = 5 * entry
    loader = ImageLoader(32, tmp_path / "cache", max_bytes=cap)
    for p in paths[:4]:
        loader(p)
    old = time.time() - 7200
    for e in entries(tmp_path / "cache"):
        os.utime(e, (old, old))
    loader(paths[0])  # a hit refreshes the oldest entry's LRU clock
    loader(paths[4])  # 5 entries: at the cap
    loader(paths[5])  # 6: over it -> back under 90% of the cap, least recently used first
    assert sum(e.stat().st_size for e in entries(tmp_path / "cache")) <= 0.9 * cap
    cached = lambda p: loader.cache.get(loader.cache.key(p, 32)) is not None  # noqa: E731
    assert cached(paths[0]) and cached(paths[4]) and cached(paths[5])
    assert sum(cached(p) for p in paths[1:4]) == 1


def test_a_cap_smaller_than_the_working_set_warns(tmp_path, caplog):
    paths = lesions(tmp_path / "img", 6)
    entry = ImageLoader(32, tmp_path / "probe")(paths[0]).nbytes + 128
    loader = ImageLoader(32, tmp_path / "cache", max_bytes=3 * entry)
    with caplog.at_level(logging.WARNING, logger="skain.data.cache"):
        for p in paths:
            loader(p)
    assert "smaller than the images in use" in caplog.text and "SKAIN_CACHE_MAX_GB" in caplog.text


def test_low_free_space_on_the_cache_disk_skips_caching_with_a_warning(tmp_path, monkeypatch, caplog):
    paths = lesions(tmp_path / "img", 3)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda _: usage(10 * 2**30, 10 * 2**30, 200 * 2**20))
    loader = ImageLoader(32, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="skain.data.cache"):
        arrays = [loader(p) for p in paths]
    assert all(a.shape[0] == 32 for a in arrays) and entries(tmp_path / "cache") == []
    assert caplog.text.count("free on the disk of the image cache") == 1  # warned once, not per image


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    stale, fresh = folder / f"{'a' * 64}.123.tmp", folder / f"{'b' * 64}.456.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"in flight")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    ImageLoader(32, folder)(lesions(tmp_path / "img", 1)[0])
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_bad_cache_limit_is_refused_by_name(tmp_path, monkeypatch, value):
    monkeypatch.setenv("SKAIN_CACHE_MAX_GB", value)
    with pytest.raises(ValueError, match="SKAIN_CACHE_MAX_GB must be a number of GiB"):
        ImageLoader(32, tmp_path / "cache")


def test_cache_info_and_clear(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "cache"
    loader = ImageLoader(32, folder)
    for p in lesions(tmp_path / "img", 3):
        loader(p)
    keep = folder / "notes.txt"
    keep.write_text("not ours")
    monkeypatch.setenv("SKAIN_CACHE_MAX_GB", "2")
    assert main(["cache", "info", "--cache-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "entries     3" in out and "limit 2.00 GiB" in out and "disk free" in out
    assert main(["cache", "clear", "--cache-dir", str(folder)]) == 0
    assert "removed 3 file(s)" in capsys.readouterr().out
    assert entries(folder) == [] and keep.exists()  # only the cache's own files are deleted
    monkeypatch.setenv("SKAIN_CACHE", str(tmp_path / "env"))
    assert main(["cache", "info"]) == 0 and str(tmp_path / "env") in capsys.readouterr().out


def test_off_means_no_cache_not_a_folder_named_off(tmp_path, monkeypatch):
    """"off" turns the cache off wherever a cache folder is taken (as on the command line), instead of creating
    ./off full of resized images."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "lesion.png"
    Image.new("RGB", (80, 60), (120, 80, 60)).save(path)
    loader = ImageLoader(64, "off")
    assert loader.cache is None and loader.cache_dir is None
    assert loader(path).shape[0] == 64 and loader(path).shape[0] == 64
    assert not (tmp_path / "off").exists() and loader.hits == 0
