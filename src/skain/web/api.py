"""The JSON API: POST /api/predict, GET /api/health, GET /api/model. Errors are JSON too (see errors.py)."""
from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify, request

from skain.data.images import ImageError
from skain.inference.explain import ExplainError
from skain.web.render import heatmap_payload
from skain.web.service import (
    EXTENSION,
    InputError,
    Service,
    flag,
    model_summary,
    parse_inputs,
    prediction_payload,
    rejected_payload,
)

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__, url_prefix="/api")


def service() -> Service:
    return current_app.extensions[EXTENSION]


@bp.get("/health")
def health():
    return jsonify(status="ok", model_id=service().model_id)


@bp.get("/model")
def model():
    return jsonify(model_summary(service()))


@bp.post("/predict")
def predict():
    """multipart/form-data: image (required), age, sex, localization, heatmap=1, probabilities=1 (optional).

    An image the out-of-distribution check rejects gets `rejected: true` and a message instead of a diagnosis;
    `probabilities=1` asks for the full prediction anyway.
    """
    svc = service()
    upload = request.files.get("image")
    image = upload.read() if upload is not None else None  # in memory only; never written anywhere
    inputs = parse_inputs(image, request.form, svc.vocabularies)
    inputs.max_pixels = current_app.config["MAX_PIXELS"]
    try:
        pred = svc.predict(inputs)
    except ImageError as exc:
        raise InputError(image_error_message(exc), image_error_status(exc)) from exc
    wants = lambda name: flag(request.form.get(name) or request.args.get(name))  # noqa: E731
    if getattr(pred, "in_distribution", None) is False and not wants("probabilities"):
        return jsonify(rejected_payload(pred, svc.model_id, inputs))
    payload = prediction_payload(pred, svc.model_id, inputs, svc.predictor.info.get("trust"))
    if wants("heatmap"):
        payload["heatmap"] = heatmap(svc, inputs, pred.diagnosis)
    return jsonify(payload)


def heatmap(svc: Service, inputs, target: str) -> dict:
    try:
        return heatmap_payload(svc.explain(inputs, target))
    except ExplainError as exc:
        return {"error": str(exc)}


def image_error_status(exc: ImageError) -> int:
    """Too many pixels 413; not an image or an unsupported format 415; a broken file 400."""
    from PIL import Image, UnidentifiedImageError
    cause = exc.__cause__
    if isinstance(cause, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return 413
    if cause is None or isinstance(cause, UnidentifiedImageError):
        return 415
    return 400


def image_error_message(exc: ImageError) -> str:
    return str(exc).replace("upload: ", "image: ", 1)
