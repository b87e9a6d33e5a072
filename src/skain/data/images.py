"""Image decoding and the resize step shared by training, batch prediction and the web app.

Every image, from disk or from an upload, goes through `load_resized` (`open_image` -> `resize_shorter`) ->
(optional cache, `cache.py`) -> the tensor transforms in `transforms.py`. Nothing else decodes or resizes images.

`load_resized` asks the JPEG decoder for a reduced image (Pillow's draft mode: DCT scaling by 1/2, 1/4 or 1/8)
whenever the image is at least twice the target size, so a 12-megapixel photo is never held at full size; the
reduced image is still at least the target size, and the same resize follows. HAM10000's 600x450 images are
below twice any preset's size, so they decode in full as before.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from skain.data.cache import ImageCache

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000  # ~6300x6300; larger images are refused as possible decompression bombs
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# What Pillow decodes and people have: camera JPEG (MPO is a multi-picture JPEG), PNG, WebP, BMP, TIFF (PH2 and
# slide scanners), GIF (first frame), HEIC/HEIF and AVIF from phones (HEIF needs the `heic` extra: pillow-heif).
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF", "HEIF", "AVIF", "JPEG2000", "PPM")
# Files a folder scan picks up (any case); the format itself is checked on decoding, not trusted from the name.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif",
                  ".heic", ".heif", ".avif", ".jp2", ".ppm")
FORMATS_TEXT = "JPEG, PNG, WebP, BMP, TIFF or GIF (HEIC/HEIF with pip install 'skain[heic]')"


class ImageError(ValueError):
    """An image that cannot be decoded; the message names the file and the reason."""


def open_image(source: str | Path | bytes, name: str | None = None, max_pixels: int = MAX_PIXELS,
               draft_to: int | None = None) -> Image.Image:
    """Decode an image (any of SUPPORTED_FORMATS) from a path or bytes into an upright 8-bit RGB image.

    Images over `max_pixels` are refused before decoding (the web app sets a lower limit than files have);
    with `draft_to`, a JPEG is decoded at the smallest DCT scale whose shorter side is still >= draft_to."""
    label = name or (str(source) if not isinstance(source, bytes) else "upload")
    if isinstance(source, bytes) and not source:
        raise ImageError(f"{label}: empty file (0 bytes)")
    limit = min(int(max_pixels), MAX_PIXELS)
    register_plugins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
            with fp, Image.open(fp) as img:
                if img.format not in SUPPORTED_FORMATS:
                    raise ImageError(f"{label}: unsupported image format {img.format}; use {FORMATS_TEXT}")
                if img.width * img.height > limit:  # also when another library relaxed Pillow's global
                    raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels")
                if draft_to and img.format in ("JPEG", "MPO"):
                    img.draft(None, (draft_to, draft_to))
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label}: image too large (over {limit:,} pixels)") from exc
    except UnidentifiedImageError as exc:
        if not isinstance(source, bytes) and _size_note(source):
            raise ImageError(f"{label}: empty file (0 bytes)") from exc
        raise ImageError(f"{label}: not an image (or an unsupported format); use {FORMATS_TEXT}") from exc
    except FileNotFoundError as exc:
        raise ImageError(f"{label}: file not found") from exc
    except OSError as exc:
        size = "" if isinstance(source, bytes) else _size_note(source)
        raise ImageError(f"{label}: cannot decode image{size} ({exc})") from exc


@functools.cache
def register_plugins() -> bool:
    """Let Pillow open HEIC/HEIF (and AVIF) when the optional pillow-heif package is installed; once per
    process, on the first decode rather than at import. True when HEIF is readable."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def load_resized(source: str | Path | bytes, short_side: int, max_pixels: int = MAX_PIXELS,
                 name: str | None = None) -> np.ndarray:
    """The one decode + resize every path shares: -> uint8 HxWx3 with shorter side `short_side`."""
    return resize_shorter(open_image(source, name, max_pixels, draft_to=short_side), short_side)


def _size_note(path: str | Path) -> str:
    try:
        return " (0 bytes)" if os.path.getsize(path) == 0 else ""
    except OSError:
        return ""


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, 16-bit, palette, CMYK and alpha images -> 8-bit RGB (alpha composited on black).

    16-bit grayscale keeps its brightness (65535 -> 255), as Pillow does for 16-bit colour PNGs, rather
    than being stretched to its own maximum: the same scene saved at 8 or 16 bits gives the same pixels.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_shorter(img: Image.Image, size: int) -> np.ndarray:
    """Resize so the shorter side is `size` (bicubic, antialiased) -> uint8 HxWx3 array."""
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        img = img.resize(new, Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


def default_cache_dir() -> Path:
    base = os.environ.get("SKAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "skain")
    return Path(base) / "images"


def cache_dir_from_flag(flag: str | Path | None, unset: Path | None) -> Path | None:
    """`--cache-dir` (or a config's cache_dir) -> the folder to cache in, or None for no cache.

    Everywhere in the library `cache_dir=None` means no cache; only what an unset flag means differs by command
    (`unset`): training caches in `default_cache_dir()` by default, prediction does not cache unless asked."""
    if flag is None or str(flag) == "":
        return unset
    return None if str(flag) == "off" else Path(flag)


class ImageLoader:
    """path -> resized uint8 array, optionally through the on-disk cache of pre-resized images (`cache.py`).

    Cache entries are keyed by the file's content and the target size, so an edited file or a new resolution
    misses and a moved or re-extracted dataset hits. The cache holds exactly what `load_resized` returns, so
    cached and uncached predictions are identical.
    """

    def __init__(self, short_side: int, cache_dir: str | Path | None = None, max_bytes: int | None = None):
        """cache_dir: a folder, or None for no cache (a flag's "off" goes through cache_dir_from_flag first)."""
        self.short_side = short_side
        folder = cache_dir_from_flag(cache_dir, None)  # "off" from a caller that skipped the flag step: still off
        self.cache = None if folder is None else ImageCache(folder, max_bytes)
        self.hits = 0
        self.misses = 0

    @property
    def cache_dir(self) -> Path | None:
        return self.cache.folder if self.cache is not None else None

    def __call__(self, path: str | Path) -> np.ndarray:
        cache = self.cache
        key = cache.key(path, self.short_side) if cache is not None else None
        if cache is not None and key is not None:
            arr = cache.get(key)
            if arr is not None:
                self.hits += 1
                return arr
        arr = load_resized(path, self.short_side)
        if cache is not None and key is not None:
            self.misses += 1
            cache.put(key, arr)
        return arr
