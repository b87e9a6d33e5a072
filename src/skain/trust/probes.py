"""Non-dermoscopic probe images that need no download: blank frames, noise and screenshots of text.

They check the OOD rejection at training time and in tests. Real photos (scikit-image's samples) are
used only by benchmarks/accuracy/trust_eval.py, since scikit-image is a development dependency.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = ("invoice total amount due patient record dermatology clinic appointment monday report "
         "results normal follow up reference number page settings login password download").split()


def to_png(arr: np.ndarray) -> bytes:
    """uint8 HxW(x3) -> PNG bytes, so probes reach the model through the same decode path as uploads."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def blank_images(rng: np.random.Generator, n: int, size: int = 320) -> list[np.ndarray]:
    fixed = [(0, 0, 0), (255, 255, 255), (128, 128, 128)]
    colours = fixed + [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(max(0, n - 3))]
    return [np.full((size, size, 3), c, dtype=np.uint8) for c in colours[:n]]


def noise_images(rng: np.random.Generator, n: int, size: int = 320) -> list[np.ndarray]:
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:    # uniform colour noise
            arr = rng.integers(0, 256, (size, size, 3))
        elif kind == 1:  # grey gaussian noise
            arr = np.repeat(np.clip(rng.normal(128, 50, (size, size, 1)), 0, 255), 3, axis=2)
        else:            # blocky (low-resolution) colour noise
            small = rng.integers(0, 256, (size // 16, size // 16, 3)).astype(np.uint8)
            arr = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.NEAREST))
        out.append(np.asarray(arr, dtype=np.uint8))
    return out


def text_images(rng: np.random.Generator, n: int, size: tuple[int, int] = (640, 400)) -> list[np.ndarray]:
    """Screenshot-like renderings: dark text on a light background (or the reverse), several sizes."""
    out = []
    for i in range(n):
        dark = i % 4 == 3
        bg, fg = ((30, 30, 30), (230, 230, 230)) if dark else ((255, 255, 255), (20, 20, 20))
        img = Image.new("RGB", size, bg)
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=int(rng.integers(14, 30)))
        y = int(rng.integers(5, 25))
        while y < size[1] - 20:
            line = " ".join(rng.choice(WORDS, int(rng.integers(3, 9))))
            draw.text((int(rng.integers(5, 40)), y), line, fill=fg, font=font)
            y += int(rng.integers(22, 40))
        out.append(np.asarray(img))
    return out


def probe_set(seed: int = 0, per_kind: int = 8) -> dict[str, list[bytes]]:
    """{"blank": [...], "noise": [...], "text": [...]} as PNG bytes."""
    rng = np.random.default_rng(seed)
    kinds = {"blank": blank_images(rng, per_kind), "noise": noise_images(rng, per_kind),
             "text": text_images(rng, per_kind)}
    return {k: [to_png(a) for a in v] for k, v in kinds.items()}
