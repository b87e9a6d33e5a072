"""Every image format people have is read the same way on every path: a folder scan for training and batch
prediction, the decoder behind the web upload, and the cache. Lossless encodings of one picture give the same
pixels as its PNG; EXIF orientation is applied whatever the container."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skain.cli import main
from skain.data.images import ImageLoader, load_resized, open_image, register_plugins
from skain.data.layout import Source, load_table
from skain.data.transforms import image_to_tensor, resolve_preprocess

PRE = resolve_preprocess({}, 48)  # input 48, resize 55

# format -> Pillow save options that keep every pixel (GIF: a picture with few enough colours)
LOSSLESS = {
    "PNG": {}, "BMP": {}, "TIFF": {}, "TIFF-LZW": {"compression": "tiff_lzw"}, "WEBP": {"lossless": True},
    "GIF": {}, "PPM": {},
}
SUFFIX = {"PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "TIFF-LZW": ".tiff", "WEBP": ".webp", "GIF": ".gif",
          "PPM": ".ppm", "JPEG": ".jpg", "HEIF": ".heic"}


def picture(colours: int | None = None) -> Image.Image:
    """A 90x70 lesion-like picture (a dark blob on skin tone) with some texture."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:70, :90]
    blob = ((yy - 35) ** 2 / 400 + (xx - 45) ** 2 / 700) < 1
    arr = np.where(blob[..., None], [90, 50, 40], [220, 170, 150]) + rng.integers(-20, 20, (70, 90, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.quantize(colours).convert("RGB") if colours else img


def save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt.split("-")[0], **LOSSLESS.get(fmt, {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", list(LOSSLESS))
def test_lossless_formats_decode_to_the_same_pixels_on_every_path(tmp_path, fmt):
    img = picture(colours=64 if fmt == "GIF" else None)
    reference = np.asarray(img)
    data = save(img, fmt)
    path = tmp_path / f"lesion{SUFFIX[fmt]}"
    path.write_bytes(data)
    np.testing.assert_array_equal(np.asarray(open_image(path)), reference)   # batch prediction / training
    np.testing.assert_array_equal(np.asarray(open_image(data)), reference)   # a web upload
    expected = load_resized(save(img, "PNG"), PRE["resize"])
    np.testing.assert_array_equal(load_resized(path, PRE["resize"]), expected)
    cached = ImageLoader(PRE["resize"], tmp_path / "cache")
    for _ in range(2):  # miss, then hit
        np.testing.assert_array_equal(cached(path), expected)
    assert cached.hits == 1 and cached.misses == 1
    torch.testing.assert_close(image_to_tensor(data, PRE), image_to_tensor(save(img, "PNG"), PRE), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG", "TIFF"])
def test_exif_orientation_is_applied_in_every_container(fmt):
    img = picture()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored pixels are on their side
    stored = img.transpose(Image.Transpose.ROTATE_90)
    buf = io.BytesIO()
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    stored.save(buf, fmt, exif=exif.tobytes(), **options)
    upright = open_image(buf.getvalue())
    assert upright.size == img.size  # 90 x 70 again, not 70 x 90
    expected = np.asarray(img)
    if fmt in ("JPEG", "WEBP"):  # lossy: the stored pixels, turned by hand
        with Image.open(io.BytesIO(buf.getvalue())) as raw:
            expected = np.asarray(raw.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(np.asarray(upright), expected)


def test_heic_from_phones_with_the_optional_extra():
    if not register_plugins():
        pytest.skip("pillow-heif is not installed (pip install 'skain[heic]')")
    img = picture()
    buf = io.BytesIO()
    img.save(buf, "HEIF", quality=90)
    decoded = open_image(buf.getvalue(), name="phone.heic")
    assert decoded.size == img.size and decoded.mode == "RGB"
    assert np.abs(np.asarray(decoded, dtype=int) - np.asarray(img, dtype=int)).mean() < 8


def test_a_folder_of_mixed_formats_is_found_and_predicted(trained, synth_root, tmp_path):
    """PH2 ships BMP, phones send HEIC/WebP: `skain predict --data` finds every readable format and predicts the
    lossless copies exactly as their JPEG originals decoded to PNG."""
    test = synth_root / "dataset_test"
    meta = pd.read_csv(test / "text" / "metadata.csv").head(6)
    mixed, plain = tmp_path / "mixed" / "image", tmp_path / "plain" / "image"
    for folder in (mixed, plain):
        folder.mkdir(parents=True)
        (folder.parent / "text").mkdir()
        meta.to_csv(folder.parent / "text" / "metadata.csv", index=False)
    formats = ["BMP", "TIFF", "WEBP", "PNG", "TIFF-LZW", "PPM"]
    for image_id, fmt in zip(meta["image_id"], formats):
        img = open_image(test / "image" / f"{image_id}.jpg")
        (mixed / f"{image_id}{SUFFIX[fmt]}").write_bytes(save(img, fmt))
        (plain / f"{image_id}.png").write_bytes(save(img, "PNG"))
    table = load_table(Source(mixed.parent / "text" / "metadata.csv", [mixed], "seed"),
                       require=("image_id",))
    assert sorted(p.rsplit(".", 1)[1] for p in table["path"]) == sorted(["bmp", "tif", "webp", "png", "tiff", "ppm"])
    out = {}
    for name, root in (("mixed", mixed.parent), ("plain", plain.parent)):
        csv = tmp_path / f"{name}.csv"
        assert main(["predict", "--data", str(root), "--model", str(trained), "--output", str(csv),
                     "--no-progress"]) == 0
        out[name] = pd.read_csv(csv).set_index("image_id").sort_index()
    cols = [c for c in out["plain"].columns if c.startswith("p_")]
    assert len(out["mixed"]) == 6 and cols
    np.testing.assert_array_equal(out["mixed"][cols].to_numpy(), out["plain"][cols].to_numpy())


def test_a_folder_with_only_unreadable_files_says_which_formats_work(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    shutil.copy(folder / "notes.txt", folder / "scan.pdf")
    from skain.data.schema import DataError
    with pytest.raises(DataError, match="WebP, BMP, TIFF"):
        load_table(Source(None, [folder], "images"), require=("image_id",))
