"""The single page: upload form, results, about-this-model panel. The browser talks to /api/predict."""
from __future__ import annotations

from flask import Blueprint, current_app, render_template

from skain.web.content import DISCLAIMER
from skain.web.service import EXTENSION, model_summary

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    summary = model_summary(current_app.extensions[EXTENSION])
    return render_template("index.html", model=summary, disclaimer=DISCLAIMER,
                           max_mb=current_app.config["MAX_CONTENT_LENGTH"] / 2**20)
