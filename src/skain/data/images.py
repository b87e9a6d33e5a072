"""Image decoding and the resize step shared by training, batch prediction and the web app.

Every image, from disk or from an upload, goes through `open_image` -> `resize_shorter` -> (optional cache) ->
the tensor transforms in `transforms.py`. Nothing else decodes or resizes images.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000  # ~6300x6300; larger images are refused as possible decompression bombs
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
SUPPORTED_FORMATS = ("JPEG", "PNG", "MPO")


class ImageError(ValueError):
    """An image that cannot be decoded; the message names the file and the reason."""


def open_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode a JPEG/PNG from a path or bytes into an upright 8-bit RGB image."""
    label = name or (str(source) if not isinstance(source, bytes) else "upload")
    if isinstance(source, bytes) and not source:
        raise ImageError(f"{label}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
            with fp, Image.open(fp) as img:
                if img.format not in SUPPORTED_FORMATS:
                    raise ImageError(f"{label}: unsupported image format {img.format}; use JPEG or PNG")
                if img.width * img.height > MAX_PIXELS:  # also when another library relaxed Pillow's global
                    raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels")
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label}: image too large (over {MAX_PIXELS:,} pixels)") from exc
    except UnidentifiedImageError as exc:
        if not isinstance(source, bytes) and _size_note(source):
            raise ImageError(f"{label}: empty file (0 bytes)") from exc
        raise ImageError(f"{label}: not an image (or an unsupported format); use JPEG or PNG") from exc
    except FileNotFoundError as exc:
        raise ImageError(f"{label}: file not found") from exc
    except OSError as exc:
        size = "" if isinstance(source, bytes) else _size_note(source)
        raise ImageError(f"{label}: cannot decode image{size} ({exc})") from exc


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
        img = img.resize(new, Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


def default_cache_dir() -> Path:
    base = os.environ.get("SKAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "skain")
    return Path(base) / "images"


class ImageLoader:
    """path -> resized uint8 array, optionally through an on-disk cache of pre-resized images.

    Cache entries are keyed by the source's absolute path, size, mtime and the target size, so an edited
    or replaced file, or a new resolution, misses and is re-read. The cache holds exactly what
    `resize_shorter` returns, so cached and uncached predictions are identical.
    """

    def __init__(self, short_side: int, cache_dir: str | Path | None = None):
        self.short_side = short_side
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.hits = 0
        self.misses = 0

    def __call__(self, path: str | Path) -> np.ndarray:
        if self.cache_dir is None:
            return resize_shorter(open_image(path), self.short_side)
        entry = self.cache_dir / f"{self.key(path)}.npy"
        try:
            arr = np.load(entry, allow_pickle=False)
            self.hits += 1
            return arr
        except (OSError, ValueError):
            pass
        arr = resize_shorter(open_image(path), self.short_side)
        self.misses += 1
        self._store(entry, arr)
        return arr

    def key(self, path: str | Path) -> str:
        st = os.stat(path)
        raw = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{self.short_side}|v1"
        return hashlib.sha1(raw.encode()).hexdigest()

    def _store(self, entry: Path, arr: np.ndarray) -> None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
            os.replace(tmp, entry)
        except OSError as exc:  # a read-only or full cache never stops the work
            log.warning("image cache disabled (%s): %s", self.cache_dir, exc)
            self.cache_dir = None
