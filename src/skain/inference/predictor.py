"""The one inference path: `Predictor.from_bundle(...)`, used by `skain predict` and the web app alike.

It rebuilds the model, the metadata encoder and the preprocessing from the bundle alone, and runs every
image through the same decode -> resize -> centre-crop path that validation used during training.
Single images (`predict_one`) and batches (`predict_frame`) share the metadata cleaning
(`clean_metadata`), the tensor transform and `engine.predict_logits`, so the same input gives the same
probabilities bit for bit whichever entry point, as long as the batch holds the same images: CPU kernels
pick different blockings for different batch sizes, which moves logits by ~1e-7 (see tests/test_predict.py).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from skain.data.dataset import LesionDataset, metadata_variants
from skain.data.encoder import MetadataEncoder
from skain.data.images import ImageLoader
from skain.data.layout import Source, discover, load_table
from skain.data.schema import clean_metadata
from skain.data.transforms import eval_transform, image_to_tensor, tta_views
from skain.engine import predict_logits, resolve_device
from skain.inference.decision import Decision
from skain.inference.export import export_bytes, replace_if_stale
from skain.inference.runners import OnnxModel
from skain.modelfile.bundle import load_model
from skain.modelfile.load import ModelChoice, read_file, resolve_path
from skain.trust.runtime import TrustLayer

log = logging.getLogger(__name__)

# precision -> (autocast dtype, channels_last).
PRECISIONS: dict[str, tuple[torch.dtype | None, bool]] = {
    "fp32": (None, False),
    "channels_last": (None, True),
    "bf16": (torch.bfloat16, False),
    "bf16_channels_last": (torch.bfloat16, True),
}
GRAPH_RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}  # backends that run the exported ONNX graph
BACKENDS = ("torch", *GRAPH_RUNTIMES)


def fast_choice(device: torch.device) -> tuple[str, str]:
    """(backend, precision) that `precision="fast"` means: the fastest variant that still agrees with fp32
    (benchmarks/speed/infer_speed.py, 512 real held-out images: top-1 agreement >= 99.5%, max probability difference
    <= 0.02). On CPU that is the exported graph in OpenVINO (fp32), else in ONNX Runtime; bf16 autocast was
    faster than fp32 eager but moved probabilities by up to 0.18, so it is only used when asked for by name.
    Under a preloaded tcmalloc (SKAIN_ALLOCATOR=tcmalloc) OpenVINO aborts in compile_model, a crash no fallback
    can catch (skain.runtime_env), so there only ONNX Runtime is tried."""
    if device.type == "cpu":
        tcmalloc = "tcmalloc" in os.environ.get("LD_PRELOAD", "")
        for backend in ("onnx",) if tcmalloc else ("openvino", "onnx"):
            if importlib.util.find_spec(GRAPH_RUNTIMES[backend]) is not None:
                return backend, "fp32"
    return "torch", "channels_last"


@dataclass
class Prediction:
    diagnosis: str
    probability: float
    probabilities: dict[str, float]
    p_malignant: float | None = None       # P(mel) + P(bcc) + P(akiec), calibrated
    triage: str | None = None              # "investigate further" / "routine"; None without a threshold
    ood_score: float | None = None         # > 1.0: farther from the training lesions than the threshold
    in_distribution: bool | None = None    # False: "this does not look like a dermoscopic image"


# On CPU, at most this many input pixels a batch (64 images at 224 px). 64 images at 288 px made buffers above
# glibc's 1 GiB mmap threshold (skain.runtime_env), mapped and unmapped on every call: the test-fold scoring of
# a 288 px `skain train` took 426 s instead of 202 s, and 192 images scored with 1.5-8.2 M minor page faults
# instead of 0.6 M (benchmarks/speed/scoring_batch.py). Results do not depend on the batch size.
CPU_PIXELS_PER_BATCH = 64 * 224 * 224


class Predictor:
    """Bundle -> probabilities. `precision="fp32"` is the reference; "fast" picks the fastest variant that
    stays within the measured agreement bounds (see `fast_choice`); `backend="onnx"` runs the exported
    network in ONNX Runtime (from `onnx_path`, or exported in memory when none is given)."""

    def __init__(self, bundle: dict, device: str = "auto", precision: str = "fp32", tta: int | None = None,
                 backend: str = "torch", onnx_path: str | Path | None = None):
        self.bundle = bundle
        self.classes: list[str] = list(bundle["classes"])
        self.encoder = MetadataEncoder.from_state(bundle["encoder"])
        self.decide = Decision(bundle.get("decision"), self.classes)  # arg-max, or the bundle's prior adjustment
        self.preprocess: dict = dict(bundle["preprocess"])
        self.transform = eval_transform(self.preprocess)
        self.device = resolve_device(device)
        self.tta = _check_tta(default_views(bundle) if tta is None else tta)  # None: the model's own default
        # temperature, OOD scorer, triage threshold (all optional); under TTA only the OOD check applies
        self.trust = TrustLayer.from_bundle(bundle).for_views(self.tta)
        chosen = precision == "fast" and backend == "torch"  # the user asked for speed, not for a file or runtime
        if chosen:
            backend, precision = fast_choice(self.device)
        self.backend = _check_choice("backend", backend, BACKENDS)
        self.precision = "fp32" if precision == "fast" else precision
        self.dtype, self.channels_last = PRECISIONS[_check_choice("precision", self.precision, PRECISIONS)]
        self.model = self._network(onnx_path, fallback=chosen)

    def _network(self, onnx_path: str | Path | None, fallback: bool) -> torch.nn.Module:
        """The network this Predictor runs. With `fallback` (precision "fast" chose the runtime), a graph runtime
        that cannot start (broken install, unsupported CPU) gives PyTorch fp32 and a warning, not an error."""
        if self.backend != "torch":
            try:
                model = self._onnx_model(onnx_path, replace_stale=fallback)
                self.dtype, self.channels_last, self.precision = None, False, "fp32"
                return model
            except Exception as exc:  # noqa: BLE001 - any runtime failure: "fast" still has an answer to give
                if not fallback:
                    raise
                log.warning("the fast path (%s) could not start (%s: %s); answering in PyTorch fp32 instead",
                            self.backend, type(exc).__name__, exc)
                self.backend, self.precision, self.dtype, self.channels_last = "torch", "fp32", None, False
        model = load_model(self.bundle).to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    @classmethod
    def from_bundle(cls, model: str | Path | ModelChoice, **kwargs: Any) -> Predictor:
        """`model` is an output folder or a bundle file (resolved here), or the file `choose_model` already
        resolved; an ONNX backend finds `<bundle>.onnx` beside it."""
        path = model.path if isinstance(model, ModelChoice) else resolve_path(model)
        beside = path.with_suffix(".onnx")
        if kwargs.get("onnx_path") is None and (kwargs.get("backend") in GRAPH_RUNTIMES or
                                                 (kwargs.get("precision") == "fast" and beside.is_file())):
            kwargs["onnx_path"] = beside
        return cls(read_file(path), **kwargs)

    def _onnx_model(self, path: str | Path | None, replace_stale: bool = False) -> torch.nn.Module:
        """The exported graph from `path`, or (no file) exported in memory from the bundle now. With
        `replace_stale` (precision "fast"), a file exported from another bundle is re-exported over, not fatal."""
        runtime = GRAPH_RUNTIMES[self.backend]
        if self.device.type != "cpu":
            log.info("the %s backend runs on the CPU", self.backend)
        if path is None:
            log.info("exporting the network to ONNX in memory (`skain export` saves it beside the bundle)")
            return OnnxModel(export_bytes(self.bundle), self.bundle, runtime)
        source = replace_if_stale(self.bundle, path) if replace_stale else path  # stale: re-exported, or bytes
        return OnnxModel(source, self.bundle, runtime)

    @property
    def info(self) -> dict:
        """What the bundle says about itself (for `GET /api/model` and reports)."""
        training = self.bundle.get("training", {})
        return {"backbone": self.bundle["model_args"]["backbone"], "classes": self.classes,
                "members": len(self.bundle["model_args"].get("ensemble", [])) or 1,
                "image_only": bool(self.bundle["model_args"].get("image_only")),
                "input_size": self.preprocess["input_size"], "vocabularies": self.encoder.vocabularies(),
                "metrics": self.bundle.get("metrics", {}), "training": training,
                "decision": self.decide.summary(),
                "skain_version": self.bundle.get("skain_version"),
                "model_card": self.bundle.get("model_card"), "trust": self.trust.summary(),
                "inference": {"backend": self.backend, "precision": self.precision, "tta": self.tta,
                              "device": self.device.type}}

    def batch_size(self, requested: int) -> int:
        """`requested`, capped on CPU to CPU_PIXELS_PER_BATCH input pixels a batch (see there)."""
        if self.device.type != "cpu":
            return requested
        return max(1, min(int(requested), CPU_PIXELS_PER_BATCH // int(self.preprocess["input_size"]) ** 2))

    def loader(self, cache_dir: str | Path | None = None) -> ImageLoader:
        """The shared decode + resize step at this model's resolution (optionally cached)."""
        return ImageLoader(self.preprocess["resize"], cache_dir)

    # ------------------------------------------------------------------ single images (web app)
    def image_tensor(self, image: bytes | str | Path, max_pixels: int | None = None) -> torch.Tensor:
        """Decode and preprocess one image exactly as batch prediction does (`max_pixels`: a lower limit)."""
        return image_to_tensor(image, self.preprocess, max_pixels)

    def predict_one(self, image: bytes | str | Path, age: float | None = None, sex: str | None = None,
                    site: str | None = None, max_pixels: int | None = None) -> Prediction:
        frame = metadata_frame(age, sex, site)
        res = self._run([self._batch(self.image_tensor(image, max_pixels)[None], frame)], progress=False)
        trust = self.trust.annotate(res["probs"], res["features"], res.get("spreads"))
        return self._prediction(res["probs"][0], trust.iloc[0])

    def _prediction(self, probs: np.ndarray, trust: pd.Series | None = None) -> Prediction:
        i = int(self.decide(probs)[0])
        pred = Prediction(self.classes[i], float(probs[i]), {c: float(p) for c, p in zip(self.classes, probs)})
        if trust is not None:
            pred.p_malignant = None if np.isnan(trust["p_malignant"]) else float(trust["p_malignant"])
            pred.triage = trust["triage"]
            pred.ood_score = None if np.isnan(trust["ood_score"]) else float(trust["ood_score"])
            pred.in_distribution = None if trust["ood"] is None else not bool(trust["ood"])
        return pred

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, frame: pd.DataFrame) -> np.ndarray:
        """Preprocessed images + raw metadata columns (age, sex, localization) -> calibrated probabilities."""
        return self._run([self._batch(images, frame)], progress=False)["probs"]

    def _batch(self, images: torch.Tensor, frame: pd.DataFrame) -> dict[str, torch.Tensor]:
        age, sex, site = self.encoder.transform(_with_meta_columns(frame))
        return {"image": images, "age": torch.from_numpy(age), "sex": torch.from_numpy(sex),
                "site": torch.from_numpy(site), "label": torch.full((len(frame),), -1),
                "index": torch.arange(len(frame)), "ok": torch.ones(len(frame), dtype=torch.bool)}

    def _run(self, batches, progress: bool, variants: dict[str, set[str]] | None = None) -> dict[str, np.ndarray]:
        """Logits, calibrated probabilities (`probs`, or `probs/<variant>` per metadata variant) and the OOD
        features. Several variants share one backbone pass where the network splits into backbone + head;
        the exported graph (ONNX backends) runs one pass per variant."""
        groups = [None] if not variants else (
            [variants] if callable(getattr(self.model, "classify", None)) else [{n: f} for n, f in variants.items()])
        res: dict[str, np.ndarray] = {}
        for group in groups:
            with self.trust.tap(self.model, self.tta) as tap:  # backbone features for the OOD score, same pass
                part = predict_logits(self.model, batches, self.device, self.dtype, self.channels_last, "predict",
                                      progress, self._views(), metadata_variants(self.encoder, group) if group else None)
            part["features"], part["spreads"] = tap.features(), tap.spreads()
            res = {**part, **res}  # index, ok, features and spreads from the first pass
        for key in [k for k in res if k.startswith("logits")]:  # temperature scaling (T = 1 for older bundles)
            res["probs" + key[len("logits"):]] = self.trust.calibrate(res[key])
        return res

    def _views(self):
        return (lambda x: tta_views(x, self.tta)) if self.tta > 1 else None

    # ------------------------------------------------------------------ batches (CLI)
    def predict_frame(self, frame: pd.DataFrame, batch_size: int = 32, num_workers: int = 0,
                      cache_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
        """A validated frame with `path` -> one row per image: image_id, pred, prob, p_<class>..., error.

        An unreadable image gets an empty prediction and its decoding error; the rest are still predicted.
        """
        return self.predict_variants(frame, {"present": set()}, batch_size, num_workers, cache_dir,
                                     progress)["present"]

    def predict_variants(self, frame: pd.DataFrame, variants: dict[str, set[str]], batch_size: int = 32,
                         num_workers: int = 0, cache_dir: str | Path | None = None,
                         progress: bool = True) -> dict[str, pd.DataFrame]:
        """`predict_frame`'s table for each metadata variant (name -> the fields blanked as if left empty, e.g.
        {"present": set(), "all_blank": {"age", "sex", "site"}}). The images are decoded and the backbone runs
        once for all of them; the exported graph (ONNX backends) takes one pass per variant."""
        frame = _with_meta_columns(frame)
        image_loader = self.loader(cache_dir)
        dataset = LesionDataset(frame, self.encoder, image_loader, self.transform, on_error="skip")
        loader = DataLoader(dataset, self.batch_size(batch_size), shuffle=False, num_workers=num_workers)
        res = self._run(loader, progress, variants)
        order = np.argsort(res["index"])
        ok = res["ok"][order].astype(bool)
        features = res["features"][order] if res["features"] is not None else None
        spreads = res["spreads"][order] if res.get("spreads") is not None else None
        errors = [_error_for(p, image_loader) if not k else "" for p, k in zip(frame["path"], ok)]
        return {name: self._table(frame, res[f"probs/{name}"][order], ok, features, errors, spreads)
                for name in variants}

    def _table(self, frame: pd.DataFrame, probs: np.ndarray, ok: np.ndarray, features: np.ndarray | None,
               errors: list[str], spreads: np.ndarray | None = None) -> pd.DataFrame:
        out = pd.DataFrame({"image_id": frame["image_id"].to_numpy()})
        chosen = self.decide(probs)
        out["pred"] = np.where(ok, np.array(self.classes)[chosen], "")
        out["prob"] = np.where(ok, probs[np.arange(len(probs)), chosen], np.nan)
        for j, c in enumerate(self.classes):
            out[f"p_{c}"] = np.where(ok, probs[:, j], np.nan)
        if self.decide.adjusted:  # scores whose arg-max is the decision (the ISIC format writes these)
            scores = self.decide.scores(probs)
            for j, c in enumerate(self.classes):
                out[f"s_{c}"] = np.where(ok, scores[:, j], np.nan)
        # ood, ood_score, p_malignant, triage
        for name, column in self.trust.columns(probs, features, ok, spreads).items():
            out[name] = column.to_numpy()
        out["error"] = errors
        return out


def metadata_frame(age: float | str | None, sex: str | None, site: str | None) -> pd.DataFrame:
    """One row of raw metadata cleaned exactly like a CSV row (case, blanks, age range)."""
    raw = pd.DataFrame({"image_id": ["upload"], "age": [age], "sex": [sex], "localization": [site]}, dtype=object)
    raw = raw.fillna("")
    return clean_metadata(raw.astype(str), "metadata", require=("image_id",))


def prediction_table(data: str | Path | None = None, csv: str | Path | None = None,
                     images: list[str] | None = None, skip_missing: bool = False,
                     default: str = "dataset_test") -> tuple[pd.DataFrame, Source]:
    """Any supported layout -> a validated frame with `path`; only image_id is required, metadata and dx
    are used when present. A seed-layout folder with `image/` but no CSV in `text/` predicts the images alone."""
    root = Path(data if data is not None else default)
    if csv is None and not images and _seed_without_csv(root):
        src = Source(None, [root / "image"], "seed")
    else:
        src = discover(data, csv, images, default=default)
    return load_table(src, require=("image_id",), skip_missing=skip_missing), src


def _seed_without_csv(root: Path) -> bool:
    text = root / "text"
    return (root / "image").is_dir() and not (text.is_dir() and any(text.glob("*.csv")))


def _check_choice(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}"
                         + (", fast" if name == "precision" else ""))
    return value


def default_views(bundle: dict) -> int:
    """The TTA view count a model runs by default: its `inference.tta` (set by `skain calibrate --tta N
    --default`, only once a trust block is fitted for N views), else one view."""
    return int((bundle.get("inference") or {}).get("tta", 1))


def _check_tta(tta: int) -> int:
    if not 1 <= int(tta) <= 8:
        raise ValueError(f"tta must be between 1 and 8 views (got {tta})")
    return int(tta)


def _with_meta_columns(frame: pd.DataFrame) -> pd.DataFrame:
    extra = {c: "unknown" if c != "age" else np.nan for c in ("age", "sex", "localization") if c not in frame}
    return frame.assign(**extra) if extra else frame


def _error_for(path: str, loader: ImageLoader) -> str:
    try:
        loader(path)
        return "unknown error"
    except Exception as exc:  # report the decoding error by name
        return str(exc)
