"""Every odd image users send goes through `open_image`: it decodes to upright 8-bit RGB or fails with an
ImageError naming the file and the reason. Training, batch prediction and the web app all share this path."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skain.data.images import MAX_PIXELS, ImageError, ImageLoader, open_image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, depth: int, colour: int, row: bytes, rows: int | None = None) -> bytes:
    """A valid PNG built by hand, so headers can claim any size or bit depth."""
    body = b"".join(b"\0" + row for _ in range(height if rows is None else rows))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(body)) + png_chunk(b"IEND", b""))


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF header is rewritten to claim width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 60, 40)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def marked(size=(40, 30)) -> Image.Image:
    """Red top-left corner on blue, so orientation can be checked."""
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))
    return img


# ------------------------------------------------------------------------------------------- decoded sensibly
def test_png_with_alpha_is_composited_on_black():
    img = open_image(encode(Image.new("RGBA", (20, 10), (200, 100, 50, 128))))
    assert img.mode == "RGB" and img.size == (20, 10)
    np.testing.assert_allclose(np.asarray(img)[0, 0], [100, 50, 25], atol=1)


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("1", "PNG")])
def test_grayscale_palette_and_bilevel_images_become_rgb(mode, fmt):
    img = open_image(encode(Image.new(mode, (20, 10)), fmt))
    assert img.mode == "RGB" and img.size == (20, 10)


def test_cmyk_jpeg_becomes_rgb_with_the_right_colour():
    img = open_image(encode(Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG"))  # pure red in CMYK
    assert img.mode == "RGB"
    r, g, b = np.asarray(img)[5, 5].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_16_bit_grayscale_png_keeps_its_brightness():
    """The same picture at 8 and at 16 bits decodes to the same pixels (not stretched to its own maximum)."""
    eight = np.tile(np.arange(0, 200, 10, dtype=np.uint8), (10, 1))
    sixteen = eight.astype(np.uint16) * 257
    got = np.asarray(open_image(encode(Image.fromarray(sixteen))))
    assert got.shape == (10, 20, 3)
    np.testing.assert_array_equal(got[..., 0], eight)


def test_16_bit_colour_png_decodes():
    row = b"\xff\xff\x00\x00\x80\x00" * 4  # (65535, 0, 32768) per pixel
    img = open_image(raw_png(4, 3, 16, 2, row))
    assert img.mode == "RGB" and img.size == (4, 3)
    np.testing.assert_array_equal(np.asarray(img)[0, 0], [255, 0, 128])


@pytest.mark.parametrize("orientation, transpose", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
    (2, Image.Transpose.FLIP_LEFT_RIGHT)])
def test_exif_orientation_is_applied(orientation, transpose):
    exif = Image.Exif()
    exif[0x0112] = orientation
    plain = encode(marked(), "JPEG", quality=95)
    tagged = encode(marked(), "JPEG", quality=95, exif=exif)
    got = np.asarray(open_image(tagged))
    expected = np.asarray(open_image(plain).transpose(transpose))  # the same stored pixels, turned by hand
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_exif_rotated_photo_shows_its_marked_corner_where_the_camera_meant():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display = rotate 90 degrees clockwise
    img = np.asarray(open_image(encode(marked(), "JPEG", quality=95, exif=exif)))
    assert img.shape[:2] == (40, 30)  # portrait now
    assert img[2, -3, 0] > 200 and img[2, 2, 0] < 60  # red corner moved from top-left to top-right


def test_unicode_and_spaces_in_paths(tmp_path):
    folder = tmp_path / "dätä sét" / "日本 images"
    folder.mkdir(parents=True)
    path = folder / "lésion 1 ü.jpg"
    marked().save(path)
    arr = ImageLoader(32, tmp_path / "cäche dir")(path)
    again = ImageLoader(32, tmp_path / "cäche dir")(path)
    assert arr.shape == (32, 43, 3) and np.array_equal(arr, again)


# ------------------------------------------------------------------------------------------- refused by name
def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name, data, reason", [
    ("zero.jpg", b"", "empty file (0 bytes)"),
    ("notes.jpg", b"these are my notes, not a photo\n" * 20, "not an image"),
    ("truncated.jpg", None, "cannot decode image"),
    ("truncated.png", None, "cannot decode image"),
    ("favicon.ico", None, "unsupported image format ICO"),
    ("paint.pcx", None, "unsupported image format PCX"),
])
def test_bad_files_are_refused_with_their_name_and_reason(tmp_path, name, data, reason):
    if data is None:
        big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
        fmt = {"jpg": "JPEG", "png": "PNG", "ico": "ICO", "pcx": "PCX"}[name.rsplit(".", 1)[1]]
        data = encode(big, fmt)
        if name.startswith("truncated"):
            data = data[:len(data) // 3]
    path = write(tmp_path, name, data)
    with pytest.raises(ImageError) as err:
        open_image(path)
    assert str(err.value).startswith(str(path)) and reason in str(err.value)
    with pytest.raises(ImageError, match=reason.split(" (")[0]):  # the same from bytes (web uploads)
        open_image(data, name="upload")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ImageError, match=r"nothere\.jpg: file not found"):
        open_image(tmp_path / "nothere.jpg")


@pytest.mark.parametrize("make", [
    lambda: raw_png(100_000, 100_000, 8, 0, b"\0", rows=1),   # 10 Gpx: refused when opened
    lambda: raw_png(7_000, 7_000, 1, 0, b"\0" * 875),         # 49 Mpx, just over the limit: a real, tiny file
    lambda: jpeg_with_size(65_000, 65_000),
    lambda: jpeg_with_size(8_000, 6_000),                      # 48 Mpx
])
def test_decompression_bombs_are_refused_before_decoding(make):
    data = make()
    assert len(data) < 200_000
    with pytest.raises(ImageError, match=f"too large \\(over {MAX_PIXELS:,} pixels\\)") as err:
        open_image(data, name="bomb")
    assert isinstance(err.value.__cause__, (Image.DecompressionBombError, Image.DecompressionBombWarning))


def test_an_image_just_under_the_limit_is_accepted():
    side = int(MAX_PIXELS ** 0.5) - 1
    img = open_image(raw_png(side, side, 1, 0, b"\xff" * ((side + 7) // 8)))
    assert img.size == (side, side)


def test_the_limit_holds_even_if_someone_relaxes_pillows_global(monkeypatch):
    """Another library raising Image.MAX_IMAGE_PIXELS must not switch our bomb check off."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageError, match="too large"):
        open_image(raw_png(7_000, 7_000, 1, 0, b"\0" * 875), name="bomb")
