"""Serve the app with waitress (a production WSGI server; no debug reloader, no stack traces)."""
from __future__ import annotations

import logging

from flask import Flask

log = logging.getLogger(__name__)


def serve(app: Flask, host: str = "127.0.0.1", port: int = 5000, threads: int = 4) -> None:
    from waitress import serve as waitress_serve
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    svc = app.extensions["skain"]
    model = f"{svc.source.describe()}, id {svc.model_id}" if svc.source else svc.model_id
    run = svc.predictor.info["inference"]
    views = f"{run['tta']} view{'s' if run['tta'] > 1 else ''}"
    log.info("skAIn web app on http://%s:%d (model %s; %s through %s %s; research and education only; Ctrl+C "
             "stops it)", shown, port, model, views, run["backend"], run["precision"])
    waitress_serve(app, host=host, port=port, threads=threads, ident="skain")
