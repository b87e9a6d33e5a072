"""The one inference path: `Predictor.from_bundle(...)`, used by `skain predict` and the web app alike.

It rebuilds the model, the metadata encoder and the preprocessing from the bundle alone, and runs every
image through the same decode -> resize -> centre-crop path that validation used during training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .bundle import load_model, read_bundle
from .data.dataset import LesionDataset
from .data.encoder import MetadataEncoder
from .data.images import ImageLoader, open_image, resize_shorter
from .data.transforms import eval_transform, tta_views
from .engine import amp_dtype, autocast, predict_logits, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    diagnosis: str
    probability: float
    probabilities: dict[str, float]


class Predictor:
    """Bundle -> probabilities. `precision="fp32"` is the reference; "fast" adds bf16 autocast and
    channels_last where the device supports them."""

    def __init__(self, bundle: dict, device: str = "auto", precision: str = "fp32", tta: int = 1):
        self.bundle = bundle
        self.classes: list[str] = list(bundle["classes"])
        self.encoder = MetadataEncoder.from_state(bundle["encoder"])
        self.preprocess: dict = dict(bundle["preprocess"])
        self.transform = eval_transform(self.preprocess)
        self.device = resolve_device(device)
        self.dtype = amp_dtype(self.device, "auto") if precision == "fast" else None
        self.channels_last = precision == "fast"
        self.tta = max(1, min(int(tta), 8))
        model = load_model(bundle).to(self.device)
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model

    @classmethod
    def from_bundle(cls, model: str | Path, **kwargs: Any) -> "Predictor":
        return cls(read_bundle(model), **kwargs)

    @property
    def info(self) -> dict:
        """What the bundle says about itself (for `GET /api/model` and reports)."""
        training = self.bundle.get("training", {})
        return {"backbone": self.bundle["model_args"]["backbone"], "classes": self.classes,
                "image_only": bool(self.bundle["model_args"].get("image_only")),
                "input_size": self.preprocess["input_size"], "vocabularies": self.encoder.vocabularies(),
                "metrics": self.bundle.get("metrics", {}), "training": training,
                "skain_version": self.bundle.get("skain_version")}

    # ------------------------------------------------------------------ single images (web app)
    def image_tensor(self, image: bytes | str | Path) -> torch.Tensor:
        """Decode and preprocess one image exactly as batch prediction does."""
        return self.transform(resize_shorter(open_image(image), self.preprocess["resize"]))

    def predict_one(self, image: bytes | str | Path, age: float | None = None, sex: str | None = None,
                    site: str | None = None) -> Prediction:
        frame = pd.DataFrame({"age": [age], "sex": [sex or "unknown"], "localization": [site or "unknown"]})
        probs = self.probabilities(self.image_tensor(image)[None], frame)[0]
        return self._prediction(probs)

    def _prediction(self, probs: np.ndarray) -> Prediction:
        i = int(probs.argmax())
        return Prediction(self.classes[i], float(probs[i]), {c: float(p) for c, p in zip(self.classes, probs)})

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, frame: pd.DataFrame) -> np.ndarray:
        """Preprocessed images + raw metadata columns (age, sex, localization) -> probabilities."""
        age, sex, site = self.encoder.transform(_with_meta_columns(frame))
        batch = {"image": images, "age": torch.from_numpy(age)[:, None], "sex": torch.from_numpy(sex),
                 "site": torch.from_numpy(site), "label": torch.full((len(frame),), -1),
                 "index": torch.arange(len(frame)), "ok": torch.ones(len(frame), dtype=torch.bool)}
        res = predict_logits(self.model, [batch], self.device, self.dtype, self.channels_last, progress=False,
                             views=self._views())
        return torch.from_numpy(res["logits"]).softmax(1).numpy()

    def _views(self):
        return (lambda x: tta_views(x, self.tta)) if self.tta > 1 else None

    # ------------------------------------------------------------------ batches (CLI)
    def predict_frame(self, frame: pd.DataFrame, batch_size: int = 32, num_workers: int = 0,
                      cache_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
        """A validated frame with `path` -> one row per image: image_id, pred, prob, p_<class>..., error."""
        frame = _with_meta_columns(frame)
        dataset = LesionDataset(frame, self.encoder, ImageLoader(self.preprocess["resize"], cache_dir),
                                self.transform, on_error="skip")
        loader = DataLoader(dataset, batch_size, shuffle=False, num_workers=num_workers)
        res = predict_logits(self.model, loader, self.device, self.dtype, self.channels_last, "predict",
                             progress, self._views())
        probs = torch.from_numpy(res["logits"]).softmax(1).numpy()
        order = np.argsort(res["index"])
        probs, ok = probs[order], res["ok"][order].astype(bool)
        out = pd.DataFrame({"image_id": frame["image_id"].to_numpy()})
        out["pred"] = np.where(ok, np.array(self.classes)[probs.argmax(1)], "")
        out["prob"] = np.where(ok, probs.max(1), np.nan)
        for j, c in enumerate(self.classes):
            out[f"p_{c}"] = np.where(ok, probs[:, j], np.nan)
        out["error"] = [_error_for(p, dataset.loader) if not k else "" for p, k in zip(frame["path"], ok)]
        return out


def _with_meta_columns(frame: pd.DataFrame) -> pd.DataFrame:
    extra = {c: "unknown" if c != "age" else np.nan for c in ("age", "sex", "localization") if c not in frame}
    return frame.assign(**extra) if extra else frame


def _error_for(path: str, loader: ImageLoader) -> str:
    try:
        loader(path)
        return "unknown error"
    except Exception as exc:  # report the decoding error by name
        return str(exc)
