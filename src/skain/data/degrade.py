"""How images are saved again on their way to skAIn, as named copies and as a training augmentation.

A lesion photo reaches a web app after a phone or a messaging app has shrunk it and saved it again as JPEG or
WebP, or as a screenshot with a border. `COPIES` names the copies the maintainers measured on the ISIC 2018 test
set (the re-encoding benchmark, the OOD fit and the tests use the same recipes); `PhotoDegrade` draws random
members of that family for training, on the pre-resized uint8 array the augmentation starts from:

    border or letterbox -> downscale (to 40-100% of the side) -> mild blur or sharpen -> JPEG/WebP (q 40-95)
    -> back to the array's own size

Every step uses Pillow, as the real copies do, and draws its randomness from torch's generator (which the
DataLoader seeds per worker), so a run is repeatable.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

# name -> (scale of the side, format, quality, border px at that scale). What the maintainers' copies did:
# a messaging app (half size, JPEG q70), a WebP q60 re-save at full size, a PNG screenshot at 75% with a grey
# 20 px border.
COPIES: dict[str, tuple[float, str, int | None, int]] = {
    "phone": (0.5, "JPEG", 70, 0),
    "webp": (1.0, "WEBP", 60, 0),
    "screenshot": (0.75, "PNG", None, 20),
}
BORDER_GREY = (128, 128, 128)


def encode(img: Image.Image, fmt: str, quality: int | None = None) -> bytes:
    """`img` saved as `fmt` (JPEG, WEBP or PNG) -> the file's bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": int(quality)} if quality is not None else {}))
    return buf.getvalue()


def saved_copy(img: Image.Image, copy: str) -> bytes:
    """One of the named `COPIES` of an RGB image, as the bytes of the file a user would upload."""
    if copy not in COPIES:
        raise ValueError(f"unknown copy {copy!r}; choose one of {', '.join(COPIES)}")
    scale, fmt, quality, border = COPIES[copy]
    if scale != 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
    if border:
        framed = Image.new("RGB", (img.width + 2 * border, img.height + 2 * border), BORDER_GREY)
        framed.paste(img, (border, border))
        img = framed
    return encode(img, fmt, quality)


def _u(lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi))


def _chance(p: float) -> bool:
    return p > 0 and float(torch.rand(())) < p


@dataclass
class PhotoDegrade:
    """A random re-save of a uint8 HxWx3 array; returns an array of the same shape.

    With probability `p` the image is degraded at all; each step then has its own chance. Defaults keep the
    cost small (benchmarks/speed/pipeline.py measures it): WebP, the slowest encoder, is a quarter of the re-encodes.
    """

    p: float = 0.5
    min_scale: float = 0.4
    quality: tuple[int, int] = (40, 95)
    p_border: float = 0.15
    p_scale: float = 0.6
    p_filter: float = 0.25
    p_encode: float = 0.8
    p_webp: float = 0.25

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        if not _chance(self.p):
            return arr
        height, width = arr.shape[:2]
        img = Image.fromarray(arr)
        if _chance(self.p_border):
            img = self.border(img)
        if _chance(self.p_scale):
            scale = _u(self.min_scale, 1.0)
            img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))),
                             Image.Resampling.BILINEAR if _chance(0.5) else Image.Resampling.BICUBIC)
        if _chance(self.p_filter):
            img = img.filter(ImageFilter.GaussianBlur(_u(0.3, 1.0)) if _chance(0.5)
                             else ImageFilter.UnsharpMask(radius=_u(0.5, 1.5), percent=int(_u(30, 120)), threshold=2))
        if _chance(self.p_encode):
            fmt = "WEBP" if _chance(self.p_webp) else "JPEG"
            quality = int(torch.randint(self.quality[0], self.quality[1] + 1, ()))
            with Image.open(io.BytesIO(encode(img, fmt, quality))) as decoded:
                img = decoded.convert("RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BICUBIC)
        return np.array(img, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants

    @staticmethod
    def border(img: Image.Image) -> Image.Image:
        """A plain frame (all sides) or letterbox (two opposite sides), 2-10% of the shorter side wide."""
        width = max(1, round(min(img.size) * _u(0.02, 0.10)))
        level = int(torch.randint(0, 256, ()))
        sides = int(torch.randint(0, 3, ()))  # 0 all, 1 top/bottom, 2 left/right
        dx = width if sides in (0, 2) else 0
        dy = width if sides in (0, 1) else 0
        framed = Image.new("RGB", (img.width + 2 * dx, img.height + 2 * dy), (level, level, level))
        framed.paste(img, (dx, dy))
        return framed


def always_resaved() -> PhotoDegrade:
    """A `PhotoDegrade` that re-encodes every image (and more often shrinks or frames it): the re-saved copies the
    OOD fit treats as in distribution and `--consistency` training pairs with each original."""
    return PhotoDegrade(p=1.0, p_encode=1.0, p_scale=0.7, p_border=0.2)


class ResavedLoader:
    """Wraps an image loader (path -> resized uint8 array): returns a randomly re-saved copy of the image instead,
    always the same copy for the same file name and seed, whatever order or process asks (the OOD fit's
    in-distribution examples of what a phone makes of a lesion photo)."""

    def __init__(self, loader, seed: int = 0, degrade: PhotoDegrade | None = None):
        self.loader, self.seed = loader, int(seed)
        self.degrade = degrade or always_resaved()

    @property
    def cache_dir(self):
        return getattr(self.loader, "cache_dir", None)

    def __call__(self, path) -> np.ndarray:
        arr = self.loader(path)
        name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((zlib.crc32(name.encode()) + 7919 * self.seed) % 2 ** 63)
            return self.degrade(arr)
