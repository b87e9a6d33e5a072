"""The web app's time to a diagnosis, one request at a time, for each inference setting of one model.

    python -m benchmarks.speed.web_latency [--model src/skain/models/ham10000.safetensors] [--requests 40]
        [--settings default fp32:1 fp32:8 fast:1 fast:8] [--out benchmarks/results/web_latency.json]

Builds the Flask app in this process (`create_app`, what `skain serve` runs) once per setting
(`precision:views`: fp32 = PyTorch, fast = OpenVINO / ONNX Runtime; views = TTA views per image; `default`: no
setting, what `skain serve` runs) and posts real HAM10000 JPEGs with their age/sex/site to `POST /api/predict`
through Flask's test client, so the figure is the server's own work per request (decode, resize, network, trust
layer, JSON), without sockets. The settings run interleaved, request by request, so a busy machine slows all of
them alike; p50/p90 in ms. The images are the same for every setting; the first two requests of each are warm-up
and not counted.

Writes --out (default benchmarks/out/web_latency.json); benchmarks/results/web_latency.json is the shipped model
with `--requests 30` (2026-12-05; docs/performance.md, "Web latency and load"). p90 is numpy's linear percentile
(benchmarks.common.percentiles_ms); that file's p90 came from statistics.quantiles, a slightly different estimate.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import DATA_ROOT, SHIPPED_MODEL, load_average, percentiles_ms, write_json

DEFAULT = "default"


def build(model: str, setting: str):
    """`precision:views`, or "default": the app exactly as `skain serve --model MODEL` builds it."""
    from skain.web import create_app
    config = {"TESTING": True, "MODEL": model}
    if setting != DEFAULT:
        precision, views = setting.split(":")
        config.update(PRECISION=precision, TTA=int(views))
    return create_app(config).test_client()


def inference(client) -> dict:
    """What answered: backend, precision, views (GET /api/model)."""
    return client.get("/api/model").get_json()["inference"]


def post(client, image: Path, row: pd.Series) -> float:
    data = {"image": (io.BytesIO(image.read_bytes()), image.name), "age": str(row["age"]), "sex": row["sex"],
            "localization": row["localization"]}
    start = time.perf_counter()
    r = client.post("/api/predict", data=data, content_type="multipart/form-data")
    elapsed = time.perf_counter() - start
    if r.status_code != 200:
        raise SystemExit(f"{image.name}: HTTP {r.status_code} {r.get_data(as_text=True)[:200]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHIPPED_MODEL))
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--settings", nargs="+", default=[DEFAULT, "fp32:1", "fp32:8", "fast:1", "fast:8"])
    ap.add_argument("--out", default="benchmarks/out/web_latency.json")
    ns = ap.parse_args()
    meta = pd.read_csv(DATA_ROOT / "metadata.csv").dropna(subset=["age"]).sample(ns.requests + 2, random_state=0)
    clients = {s: build(ns.model, s) for s in ns.settings}
    times: dict[str, list[float]] = {s: [] for s in ns.settings}
    load_before = load_average()
    for i, (_, row) in enumerate(meta.iterrows()):
        image = DATA_ROOT / "images" / f"{row['image_id']}.jpg"
        for s, client in clients.items():
            t = post(client, image, row)
            if i >= 2:
                times[s].append(t)
    result = {"model": ns.model, "requests": ns.requests, "cores": os.cpu_count(),
              "load_before": load_before, "load_after": load_average(), "settings": {}}
    for s, ts in times.items():
        result["settings"][s] = {**{k: round(v, 1) for k, v in percentiles_ms(ts, (50, 90)).items()},
                                 "mean_ms": round(1000 * statistics.fmean(ts), 1), "inference": inference(clients[s])}
        print(f"{s:8s} p50 {result['settings'][s]['p50_ms']:7.1f} ms   p90 {result['settings'][s]['p90_ms']:7.1f} ms")
    write_json(ns.out, result, indent=1)


if __name__ == "__main__":
    main()
