"""Every error under /api is JSON with a message and the right status; nothing ever shows a stack trace."""
from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from skain.web.service import InputError

log = logging.getLogger(__name__)


def register(app: Flask) -> None:
    app.register_error_handler(InputError, lambda exc: _json(str(exc), exc.status))
    app.register_error_handler(RequestEntityTooLarge, _too_large)
    app.register_error_handler(HTTPException, _http)
    app.register_error_handler(Exception, _unexpected)


def _json(message: str, status: int):
    return jsonify(error=message, status=status), status


def _too_large(exc: RequestEntityTooLarge):
    from flask import current_app
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    return _json(f"upload too large: the limit is {limit / 2**20:g} MB", 413)


def _http(exc: HTTPException):
    if not request.path.startswith("/api/"):
        return exc
    return _json(exc.description or exc.name, exc.code or 500)


def _unexpected(exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return _json("internal error; the server log has the details", 500)
