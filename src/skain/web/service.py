"""What the web layer holds between requests: the Predictor (loaded once), its model id and summary.

Everything here is plumbing around `skain.inference.predictor.Predictor` and `skain.inference.explain.GradCam`: checking form
fields, calling them, and turning their results into JSON. No preprocessing and no model code.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skain.data.schema import parse_age, parse_choice
from skain.inference.explain import ExplainError, GradCam
from skain.inference.predictor import Prediction, Predictor
from skain.modelfile.load import ModelChoice, choose_model, model_id
from skain.trust.modelcard import decision_validation, interval_summary, public_pretrained, shown_ood
from skain.trust.runtime import NOT_DERMOSCOPIC
from skain.web.content import describe

log = logging.getLogger(__name__)
EXTENSION = "skain"  # key in app.extensions


class InputError(ValueError):
    """A bad request the client can fix; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Inputs:
    image: bytes
    age: float | None
    sex: str
    localization: str
    max_pixels: int | None = None  # the web app's own pixel limit (bounds the memory one request can take)


@dataclass
class Service:
    predictor: Predictor
    model_id: str
    explainer: GradCam | None = None
    source: ModelChoice | None = None  # which model answers: the user's own or the one shipped with skAIn

    @classmethod
    def load(cls, model: str | Path | None = None, device: str = "auto", precision: str = "fp32",
             tta: int | None = None) -> Service:
        """Read the bundle once; the id is the first 12 hex digits of its SHA-256. No `model`: outputs/ if a
        model was trained there, else the shipped HAM10000 model (`skain.modelfile.load.choose_model`).

        With precision "fast" predictions may run in OpenVINO/ONNX Runtime; heatmaps need gradients, so they
        then come from a PyTorch fp32 copy of the same network."""
        source = choose_model(model)
        path = source.path
        predictor = Predictor.from_bundle(source, device=device, precision=precision,
                                          tta=None if tta in (None, "") else int(tta))
        try:
            torch_side = predictor if predictor.backend == "torch" else Predictor(predictor.bundle, device=device)
            explainer = GradCam(torch_side)
        except ExplainError as exc:
            log.warning("heatmaps off: %s", exc)
            explainer = None
        return cls(predictor, file_id(path), explainer, source)

    def predict(self, inputs: Inputs) -> Prediction:
        return self.predictor.predict_one(inputs.image, inputs.age, inputs.sex, inputs.localization,
                                          inputs.max_pixels)

    def explain(self, inputs: Inputs, target: str):
        if self.explainer is None:
            raise ExplainError("this model's backbone does not support heatmaps")
        return self.explainer(inputs.image, inputs.age, inputs.sex, inputs.localization, target=target)

    @property
    def vocabularies(self) -> dict[str, list[str]]:
        return self.predictor.info["vocabularies"]


def file_id(path: Path) -> str:
    """The model id (`skain.modelfile.load.model_id`: the one the Python API and exported folders give)."""
    return model_id(path)


# ------------------------------------------------------------------------------------------- inputs
def parse_inputs(image: bytes | None, form: Mapping[str, str], vocabularies: dict[str, list[str]]) -> Inputs:
    """Check the upload and the optional fields; every problem becomes an InputError with a clear message."""
    if image is None:
        raise InputError("no image: send the file as multipart/form-data field 'image'")
    if not image:
        raise InputError("the uploaded image is empty (0 bytes)")
    try:
        return Inputs(image, parse_age(form.get("age")),
                      parse_choice("sex", form.get("sex"), vocabularies["sex"]),
                      parse_choice("localization", form.get("localization"), vocabularies["localization"]))
    except ValueError as exc:  # the shared field rules (data.schema), answered as a bad request
        raise InputError(str(exc)) from None


def flag(raw: str | None) -> bool:
    return (raw or "").strip().lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------------------------- outputs
def rejected_payload(pred: Any, model_id: str, inputs: Inputs) -> dict:
    """The answer for an out-of-distribution image: no diagnosis (probabilities only when asked for)."""
    return jsonable({"rejected": True, "in_distribution": False, "message": NOT_DERMOSCOPIC,
                     "ood_score": getattr(pred, "ood_score", None), "model_id": model_id,
                     "inputs": {"age": inputs.age, "sex": inputs.sex, "localization": inputs.localization}})


def triage_figures(trust: dict | None) -> dict | None:
    """The sensitivity/specificity to expect from the triage threshold, shown beside the triage result: the
    held-out (cross-fitted) figures where the bundle has them, else the in-sample ones, labelled as such."""
    t = (trust or {}).get("triage") or {}
    if t.get("threshold") is None:
        return None
    held = t.get("held_out") or {}
    source = held if held.get("sensitivity") is not None else t
    return {"threshold": t["threshold"], "sensitivity": source.get("sensitivity"),
            "specificity": source.get("specificity"), "target_sensitivity": t.get("target_sensitivity"),
            "measured": "held-out validation lesions" if source is held else "validation lesions (in-sample)"}


def prediction_payload(pred: Any, model_id: str, inputs: Inputs, trust: dict | None = None) -> dict:
    """The Prediction's own fields (all of them, so fields added later pass through) plus names for people."""
    fields = asdict(pred) if is_dataclass(pred) and not isinstance(pred, type) else dict(vars(pred))
    ranked = sorted(fields["probabilities"].items(), key=lambda kv: -kv[1])
    return jsonable({
        **fields,
        "rejected": False,
        "triage_figures": triage_figures(trust) if fields.get("triage") else None,
        **{k: v for k, v in describe(fields["diagnosis"]).items() if k != "code"},
        "ranking": [{**describe(c), "probability": p} for c, p in ranked],
        "model_id": model_id,
        "inputs": {"age": inputs.age, "sex": inputs.sex, "localization": inputs.localization},
    })


def model_summary(service: Service) -> dict:
    """GET /api/model: what the bundle says about itself, without local file paths or the full config."""
    info = service.predictor.info
    training = dict(info.get("training", {}))
    source = training.pop("source", None)
    training.pop("config", None)
    metrics = info.get("metrics", {})
    return jsonable({
        "model_id": service.model_id, "model_file": service.source.summary() if service.source else None,
        "backbone": info["backbone"], "image_only": info["image_only"],
        "input_size": info["input_size"], "classes": [describe(c) for c in info["classes"]],
        "vocabularies": info["vocabularies"], "skain_version": info.get("skain_version"),
        "heatmaps": service.explainer is not None, "inference": info["inference"],
        "training": {**training, "source": Path(source).name if source else None,
                     "pretrained": public_pretrained(training.get("pretrained"))},
        # the figures of the decision the model makes (its prior-adjusted rule where it has one, arg-max beside),
        # with their 95% intervals where the bundle has them for the validation split
        "validation": decision_validation({**service.predictor.bundle, "metrics": metrics}),
        **shown_intervals(service.predictor.bundle),
        # validated calibration/triage/OOD figures and the model card for the "about this model" panel;
        # the card's data source is reduced to a file name like training.source above
        "trust": info.get("trust"), "model_card": _public_card(info.get("model_card")),
    })


def shown_intervals(bundle: dict) -> dict:
    """The 95% intervals GET /api/model gives beyond `validation`'s: `test_fold` (a run trained with --holdout
    scored its test fold, figures and intervals) and `trust_intervals` (the held-out calibration, triage and OOD
    figures'). Absent, not null, for a model without them (the shipped file)."""
    classes = list(bundle.get("classes") or [])
    scored = interval_summary((bundle.get("metrics") or {}).get("intervals"), classes)
    trust = interval_summary(((bundle.get("trust") or {}).get("figures") or {}).get("intervals"), classes)
    return {**({"test_fold": scored} if scored and scored.get("split") == "test" else {}),
            **({"trust_intervals": trust} if trust else {})}


def _public_card(card: dict | None) -> dict | None:
    if not card:
        return None
    data = dict(card.get("data", {}))
    data["source"] = Path(data["source"]).name if data.get("source") else None
    model = {**card.get("model", {}), "pretrained": public_pretrained(card.get("model", {}).get("pretrained"))}
    return {**card, "data": data, "model": model, "ood": shown_ood(card.get("ood"))}


def jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays, dataclasses and paths -> JSON types; NaN and infinities -> null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(asdict(obj))
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj
