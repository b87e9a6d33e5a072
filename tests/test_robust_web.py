"""Bounded memory per web request: uploads have their own pixel limit (12 Mpx by default, configurable; files
keep 40 Mpx), and large JPEGs are decoded in draft mode (DCT-scaled to >= the model's resize size) by the one
decoder every path shares, so web and CLI still see the same pixels."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import skain.data.images as images
from skain.data.images import (
    MAX_PIXELS,
    ImageError,
    load_resized,
    open_image,
    resize_shorter,
)
from skain.web import DEFAULTS, create_app
from skain.web.service import Service

WEB_LIMIT = DEFAULTS["MAX_PIXELS"]


@pytest.fixture(scope="module")
def service(trained) -> Service:
    return Service.load(trained)


def post(app, image: bytes, name: str = "x.png"):
    return app.test_client().post("/api/predict", data={"image": (io.BytesIO(image), name)},
                                  content_type="multipart/form-data")


def bilevel_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (width, height), 1).save(buf, format="PNG")  # compresses to a few kB
    return buf.getvalue()


def photo_jpeg(width: int, height: int, quality: int = 90) -> bytes:
    """A smooth, lesion-like photo (gradients and a dark blob), as a camera would give."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.hypot((x - width / 2) / width, (y - height / 2) / height)
    img = np.stack([200 - 120 * (r < 0.2) + 20 * np.sin(x / 37), 160 - 100 * (r < 0.2) + 15 * np.cos(y / 23),
                    140 - 90 * (r < 0.2) + 0 * x], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_the_web_limit_is_lower_than_the_file_limit():
    assert WEB_LIMIT == 12_000_000 < MAX_PIXELS


def test_an_upload_over_the_web_pixel_limit_gets_413_though_a_file_would_decode(service):
    app = create_app({"TESTING": True}, service=service)
    big = bilevel_png(4000, 3100)  # 12.4 Mpx: fine as a file, too big for the web
    assert open_image(big).size == (4000, 3100)
    r = post(app, big)
    assert r.status_code == 413 and r.json["error"] == "image: image too large (over 12,000,000 pixels)"
    assert post(app, bilevel_png(3000, 3000)).status_code == 200  # 9 Mpx: under it


def test_the_web_pixel_limit_is_configurable(service, monkeypatch):
    roomy = create_app({"TESTING": True, "MAX_PIXELS": 20_000_000}, service=service)
    assert post(roomy, bilevel_png(4000, 3100)).status_code == 200
    monkeypatch.setenv("SKAIN_MAX_PIXELS", "1000")
    tight = create_app({"TESTING": True}, service=service)
    assert tight.config["MAX_PIXELS"] == 1000 and post(tight, bilevel_png(40, 30)).status_code == 413


def test_large_jpegs_are_decoded_in_draft_mode(monkeypatch):
    seen = []
    real = images.resize_shorter
    monkeypatch.setattr(images, "resize_shorter", lambda img, size: seen.append(img.size) or real(img, size))
    arr = load_resized(photo_jpeg(4000, 3000), 256)
    assert arr.shape[:2] == (256, 341)
    assert seen == [(500, 375)]  # 1/8 scale: shorter side 375 >= 256, never the 12 Mpx bitmap


def test_draft_decoding_stays_close_to_a_full_decode():
    data = photo_jpeg(2400, 1800)
    full = resize_shorter(open_image(data), 256).astype(int)
    draft = load_resized(data, 256).astype(int)
    assert full.shape == draft.shape and np.abs(full - draft).mean() < 2.0


def test_images_under_twice_the_size_decode_exactly_as_before():
    """HAM10000's 600x450 at every preset (resize 256 / 439): no draft, so old caches and models see the same pixels."""
    data = photo_jpeg(600, 450)
    for size in (256, 439):
        np.testing.assert_array_equal(load_resized(data, size), resize_shorter(open_image(data), size))


def test_pngs_and_jpegs_share_the_limit_and_the_message(service):
    app = create_app({"TESTING": True, "MAX_PIXELS": 1_000_000}, service=service)
    for data, name in ((bilevel_png(1200, 1000), "x.png"), (photo_jpeg(1200, 1000), "x.jpg")):
        r = post(app, data, name)
        assert r.status_code == 413 and "over 1,000,000 pixels" in r.json["error"]
    with pytest.raises(ImageError, match="over 1,000,000 pixels"):
        open_image(photo_jpeg(1200, 1000), max_pixels=1_000_000)
