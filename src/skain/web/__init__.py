"""The web app: `create_app()` in the flaskr style. The Predictor is loaded once and kept in app.extensions.

Configuration: defaults below < environment variables prefixed SKAIN_ (SKAIN_MODEL, SKAIN_CORS_ORIGIN,
SKAIN_MAX_CONTENT_LENGTH, SKAIN_MAX_PIXELS, ...) < `config` passed in (what `skain serve` and the tests use).
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from typing import IO, Any

from flask import Flask, Request, request

from skain.web import api, errors, pages
from skain.web.service import EXTENSION, Service

DEFAULTS = {
    "MODEL": None,                   # output folder, .pt bundle or .safetensors file; None: outputs/ if a
                                     # model was trained there, else the HAM10000 model shipped with skAIn
    "DEVICE": "auto",
    "PRECISION": "fast",             # the fastest inference path measured to agree with fp32 (OpenVINO on CPU
                                     # where installed; PyTorch fp32 if it cannot start); "fp32": the reference
    "TTA": None,                     # views per image; None: the model's own default (1 = the fast setting)
    "MAX_CONTENT_LENGTH": 10 * 2**20,  # bytes; larger uploads get 413
    "MAX_PIXELS": 12_000_000,        # decoded size limit for uploads (files: 40 Mpx); larger images get 413
    "CORS_ORIGIN": None,             # e.g. "https://example.org" or "*"; None = no CORS headers
}


class InMemoryRequest(Request):
    """Uploads stay in memory (bounded by MAX_CONTENT_LENGTH) instead of werkzeug's temporary files."""

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> IO[bytes]:
        return io.BytesIO()


def create_app(config: Mapping[str, Any] | None = None, service: Service | None = None) -> Flask:
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("SKAIN")
    if config:
        app.config.update(config)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # flask's JSONProvider type lacks sort_keys (the default has it)
    app.extensions[EXTENSION] = service or Service.load(app.config["MODEL"], app.config["DEVICE"],
                                                        app.config["PRECISION"], app.config["TTA"])
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    errors.register(app)
    app.after_request(_security_headers)
    return app


def _security_headers(response):
    """CORS only where configured; uploads and answers are never cached."""
    from flask import current_app
    origin = current_app.config.get("CORS_ORIGIN")
    if origin and request.path.startswith("/api/"):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type"
        response.headers.add("Vary", "Origin")
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response
