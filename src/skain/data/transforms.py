"""Tensor transforms after the shared resize: dermoscopy augmentation for training, a centre crop otherwise.

Dermoscopic images have no canonical orientation, so flips and 90-degree rotations are label-preserving;
colour jitter models differences between dermatoscopes; scale crops model zoom; a random re-save
(downscale, JPEG/WebP, blur/sharpen, border: `degrade.PhotoDegrade`) models how photos reach the web app.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from skain.data.degrade import PhotoDegrade, always_resaved
from skain.data.images import MAX_PIXELS, load_resized


def resolve_preprocess(pretrained_cfg: dict[str, Any], input_size: int | None = None,
                       mean: tuple | None = None, std: tuple | None = None,
                       crop_pct: float | None = None) -> dict[str, Any]:
    """Input size, resize, mean and std from the backbone's pretrained config unless overridden."""
    size = int(input_size or pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    pct = float(crop_pct or pretrained_cfg.get("crop_pct", 0.875) or 0.875)
    pct = min(pct, 0.875)  # keep a margin so train-time scale crops and eval centre crops see the lesion whole
    return {
        "input_size": size,
        "resize": int(round(size / pct)),
        "mean": [float(x) for x in (mean or pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))],
        "std": [float(x) for x in (std or pretrained_cfg.get("std", (0.229, 0.224, 0.225)))],
    }


def image_to_tensor(image, pre: dict[str, Any], max_pixels: int | None = None) -> torch.Tensor:
    """One image (path or bytes) -> the model's input tensor: decode, resize, centre crop, normalise.

    The single-image form of the path every batch takes (ImageLoader + eval_transform); `max_pixels` lowers
    the decoder's pixel limit (the web app's)."""
    return eval_transform(pre)(load_resized(image, pre["resize"], max_pixels or MAX_PIXELS))


def normalise(arr: np.ndarray, pre: dict[str, Any]) -> torch.Tensor:
    """uint8 HxWx3 -> float CxHxW, (x / 255 - mean) / std in one pass (stored channels-last, which is the
    memory format the network runs in)."""
    scale = 1.0 / (255.0 * torch.tensor(pre["std"]))
    shift = -torch.tensor(pre["mean"]) / torch.tensor(pre["std"])
    pixels = torch.from_numpy(np.require(arr, requirements=["W"])).permute(2, 0, 1)
    return torch.addcmul(shift.view(3, 1, 1), pixels, scale.view(3, 1, 1))


def centre_crop(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {w}x{h} is smaller than the {size}px crop")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.ascontiguousarray(arr[top:top + size, left:left + size])  # strided input makes normalise ~30x slower


def eval_transform(pre: dict[str, Any]) -> Callable[[np.ndarray], torch.Tensor]:
    """Resized uint8 HxWx3 -> normalised float CxHxW centre crop."""
    return lambda arr: normalise(centre_crop(arr, pre["input_size"]), pre)


_GRAY = np.array([0.2989, 0.587, 0.114])  # torchvision's luma weights (contrast and saturation)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def colour_affine(brightness: float, contrast: float, saturation: float, hue: float,
                  mean_rgb, order: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Colour jitter as ONE affine map on RGB pixel vectors: x -> M @ x + c (values in [0, 1]; float64).

    Brightness, contrast and saturation are exactly torchvision's formulas (scale; blend with the image's
    mean luma; blend with the pixel's luma). Hue is a rotation of the chroma plane in YIQ space by
    pi * `hue` radians, a linear stand-in for torchvision's HSV hue shift (same direction and, on HAM10000
    images, about the same mean size; correlation of the two colour changes ~0.75).
    `order` is the order of the four ops (0 b, 1 c, 2 s, 3 h); `mean_rgb` is the image's mean colour, carried
    through the chain so contrast sees the mean of the image as it is at that point. Unlike torchvision, values
    are clamped once at the end rather than after each op.
    """
    eye, zero = np.eye(3), np.zeros(3)
    m, c = eye, zero
    for op in order:
        if op == 0:
            mi, ci = brightness * eye, zero
        elif op == 1:
            luma = float(_GRAY @ (m @ np.asarray(mean_rgb, dtype=np.float64) + c))
            mi, ci = contrast * eye, np.full(3, (1 - contrast) * luma)
        elif op == 2:
            mi, ci = saturation * eye + (1 - saturation) * np.outer(np.ones(3), _GRAY), zero
        else:
            a = -math.pi * hue  # sign and size: match torchvision's HSV shift on HAM10000 images (measured)
            rot = np.array([[1.0, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
            mi, ci = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ, zero
        m, c = mi @ m, mi @ c + ci
    return m, c


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi))


def apply_colour(pixels: torch.Tensor, m: np.ndarray, c: np.ndarray, pre: dict[str, Any]) -> torch.Tensor:
    """uint8 or float 0-255 image (3, H, W) -> normalise(clamp(M x + c)) with x in [0, 1], as one 3x3 matrix
    product over the pixels (colour matrix, /255 and normalisation folded together; a 1x1 convolution was 50x
    slower) and one clamp whose per-channel bounds are 0 and 1 in normalised units."""
    mean, std = np.asarray(pre["mean"], dtype=np.float64), np.asarray(pre["std"], dtype=np.float64)
    weight = torch.from_numpy((m / 255.0) / std[:, None]).float()
    bias = torch.from_numpy((np.asarray(c) - mean) / std).float()
    channels, height, width = pixels.shape
    out = torch.addmm(bias[:, None], weight, pixels.float().reshape(channels, -1))
    lo, hi = torch.from_numpy(-mean / std).float(), torch.from_numpy((1.0 - mean) / std).float()
    return out.clamp_(lo[:, None], hi[:, None]).view(channels, height, width)


class DermoscopyAugment:
    """Training augmentation on a resized uint8 HxWx3 array -> normalised float CxHxW.

    Random resized crop (scale 0.35-1, aspect 3/4-4/3; PyTorch's antialiased bilinear uint8 kernel), any of
    the 8 dihedral orientations (dermoscopy has no canonical orientation; applied to the crop as array views
    before resizing to the square output, where it commutes with the resize), colour jitter for dermatoscope
    differences, then normalisation. The four colour-jitter ops, the scaling to [0, 1] and the normalisation are
    fused into one 3x3 matrix product plus a clamp (see `colour_affine`, `apply_colour`); on the pre-resized cache
    this is several times faster per image than the same augmentation as a torchvision Compose
    (benchmarks/speed/pipeline.py). Randomness comes from torch's generator, which DataLoader seeds per worker.
    """

    def __init__(self, pre: dict[str, Any], strength: float = 1.0,
                 scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (0.75, 4 / 3),
                 photo: float = 0.0):
        self.pre, self.size = pre, pre["input_size"]
        self.photo = PhotoDegrade(photo) if photo > 0 else None  # re-saved like a phone would (degrade.py)
        self.jitter = (0.2 * strength, 0.2 * strength, 0.15 * strength, 0.03 * strength)
        self.scale, self.log_ratio = scale, (math.log(ratio[0]), math.log(ratio[1]))

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params: (left, top, right, bottom)."""
        area = height * width
        for _ in range(10):
            target = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(*self.log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()))
                left = int(torch.randint(0, width - w + 1, ()))
                return left, top, left + w, top + h
        side = min(height, width)  # fallback: centre square
        top, left = (height - side) // 2, (width - side) // 2
        return left, top, left + side, top + side

    def draw_colour(self, mean_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Random jitter factors, in random order, as one affine map (M, c); `mean_rgb` in [0, 1]."""
        b, c, s, h = self.jitter
        order = torch.randperm(4).tolist()
        return colour_affine(_uniform(1 - b, 1 + b), _uniform(1 - c, 1 + c), _uniform(1 - s, 1 + s),
                             _uniform(-h, h), mean_rgb, order)

    def draw_geometry(self, height: int, width: int) -> tuple[tuple[int, int, int, int], int, bool]:
        """A random crop box, number of quarter turns and mirror flag (the 8 orientations)."""
        box = self.crop_box(height, width)
        return box, int(torch.randint(0, 4, ())), bool(torch.randint(0, 2, ()))

    def oriented_crop(self, arr: np.ndarray, geometry=None) -> torch.Tensor:
        """A crop in one of the 8 orientations (random unless `geometry` is given) -> uint8 (1, 3, h, w)."""
        (left, top, right, bottom), k, flip = geometry or self.draw_geometry(*arr.shape[:2])
        crop = arr[top:bottom, left:right]
        crop = np.rot90(crop, k) if k else crop
        crop = crop[:, ::-1] if flip else crop  # 4 rotations x optional mirror = all 8
        return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]

    def resized(self, arr: np.ndarray, geometry) -> torch.Tensor:
        """The oriented crop `geometry` of `arr`, resized to the square input -> float 0-255 (3, size, size)."""
        crop = self.oriented_crop(arr, geometry)
        return torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True,
                                               align_corners=False)[0].float()

    def colour_for(self, img: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """A random colour jitter (M, c) for this resized view (identity without jitter)."""
        if not any(self.jitter):
            return np.eye(3), np.zeros(3)
        return self.draw_colour(img.mean((1, 2)).double().numpy() / 255.0)

    def __call__(self, arr: np.ndarray) -> torch.Tensor:
        if self.photo is not None:
            arr = self.photo(arr)
        img = self.resized(arr, self.draw_geometry(*arr.shape[:2]))
        return apply_colour(img, *self.colour_for(img), self.pre)


class PairedAugment(DermoscopyAugment):
    """The training augmentation of an image and of a re-saved copy of it (`degrade.always_resaved`), with the same
    crop, orientation and colour jitter, so the two views differ only by how the image was saved: the pair that
    `--consistency` training asks to agree (`engine.batch_loss`). Returns (view, re-saved view)."""

    def __init__(self, pre: dict[str, Any], strength: float = 1.0, photo: float = 0.0,
                 resave: PhotoDegrade | None = None):
        super().__init__(pre, strength, photo=photo)
        self.resave = resave or always_resaved()

    def __call__(self, arr: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if self.photo is not None:
            arr = self.photo(arr)
        saved = self.resave(arr)  # same shape as arr, so the same crop box fits both
        geometry = self.draw_geometry(*arr.shape[:2])
        img = self.resized(arr, geometry)
        m, c = self.colour_for(img)
        return apply_colour(img, m, c, self.pre), apply_colour(self.resized(saved, geometry), m, c, self.pre)


def train_transform(pre: dict[str, Any], strength: float = 1.0, photo: float = 0.0,
                    paired: bool = False) -> Callable[[np.ndarray], Any]:
    """The training augmentation; `photo` is the share of images first re-saved as a phone would (degrade.py);
    `paired` returns (view, re-saved view) pairs for consistency training (`PairedAugment`)."""
    return PairedAugment(pre, strength, photo=photo) if paired else DermoscopyAugment(pre, strength, photo=photo)


def tta_views(batch: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Up to 8 dihedral views (identity, flips, 90-degree rotations) of a batch of images."""
    views = []
    for k in range(4):
        rot = torch.rot90(batch, k, dims=(-2, -1)) if k else batch
        views.append(rot)
        views.append(torch.flip(rot, dims=(-1,)))
    order = [0, 1, 5, 4, 2, 6, 3, 7]  # identity, h-flip, v-flip, rot180, rot90, rot270, transposes
    return [views[i] for i in order[:max(1, min(n, 8))]]
