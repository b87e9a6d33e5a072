"""Heatmap arrays from `skain.inference.explain` -> PNG data URLs the browser can layer over the image."""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png_data_url(rgb_or_rgba: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb_or_rgba).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def colorize(heat: np.ndarray, max_alpha: float = 0.8) -> np.ndarray:
    """[0, 1] heat -> RGBA (turbo colours); cold regions fade to transparent so the lesion shows through."""
    from matplotlib import colormaps
    rgba = colormaps["turbo"](np.clip(heat, 0.0, 1.0))
    rgba[..., 3] = np.clip(heat * 1.4, 0.0, 1.0) * max_alpha
    return (rgba * 255).round().astype(np.uint8)


def heatmap_payload(explanation) -> dict:
    return {"target": explanation.target, "image": png_data_url(explanation.image),
            "overlay": png_data_url(colorize(explanation.heat))}
