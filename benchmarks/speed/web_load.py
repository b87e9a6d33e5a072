"""Load test of `POST /api/predict` against the real server (`skain serve`, waitress) in its own process.

    python -m benchmarks.speed.web_load [--model /tmp/bench/out/multimodal] [--requests 200] [--concurrency 8]
                                        [--precision fast] [--heatmap] [--out benchmarks/results/web_load_shipped.json]

Sends real HAM10000 images (with their age/sex/site) from --images at the given concurrency, and prints
p50/p90/p99/max latency, throughput, the error count and the server's resident memory (RSS) before and after
the measured run (after a warm-up run of the same size, so allocator warm-up is not counted as growth).
Without a trained cpu-preset bundle it builds an UNTRAINED one with the same architecture
(tf_efficientnet_lite0 @ 224 + metadata branch): latency does not depend on the weights' values.
Exit status 1 when any request failed or RSS grew by more than --max-growth-mb. With --out, the printed figures
are also added to that JSON under "<precision> c<concurrency>[ heatmap]" (so one file collects several runs;
docs/performance.md, "Web latency and load", quotes them).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import (
    DATA_ROOT,
    free_port,
    http_request,
    load_average,
    multipart,
    percentiles_ms,
    proc_memory_mb,
    start_server,
    untrained_cpu_bundle,
    write_json,
)

DEFAULT_MODEL = Path("/tmp/bench/out/multimodal")


def load_payloads(data: Path, n: int, vocab: dict[str, list[str]], heatmap: bool) -> list[tuple[bytes, str]]:
    rows = list(csv.DictReader(open(data / "metadata.csv", newline="")))[:n]
    out = []
    for r in rows:
        fields = {"age": r.get("age", ""),
                  "sex": r["sex"] if r.get("sex") in vocab["sex"] else "",
                  "localization": r["localization"] if r.get("localization") in vocab["localization"] else "",
                  "heatmap": "1" if heatmap else "0"}
        out.append(multipart((data / "images" / f"{r['image_id']}.jpg").read_bytes(), fields))
    return out


def run_load(port: int, payloads: list, n: int, concurrency: int) -> tuple[np.ndarray, list[str], float]:
    def one(i: int):
        body, ctype = payloads[i % len(payloads)]
        t = time.perf_counter()
        status, text = http_request("POST", port, "/api/predict", body, ctype)
        return time.perf_counter() - t, None if status == 200 else f"{status}: {text[:200]!r}"

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    return np.array([r[0] for r in results]), [r[1] for r in results if r[1]], wall


def record_run(path: Path, key: str, figures: dict) -> None:
    """Add one run's figures to a results JSON under `key`, keeping the other runs already there."""
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[key] = figures
    write_json(path, runs, indent=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"bundle folder (default {DEFAULT_MODEL} if it exists)")
    ap.add_argument("--data", default=str(DATA_ROOT), help="folder with metadata.csv and images/")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=4, help="waitress threads in the server")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fast", "channels_last"],
                    help="the server's --precision (fast: OpenVINO / ONNX Runtime)")
    ap.add_argument("--images", type=int, default=50, help="distinct images cycled through")
    ap.add_argument("--max-growth-mb", type=float, default=25.0)
    ap.add_argument("--heatmap", action="store_true", help="ask for the Grad-CAM heatmap too (what the page does)")
    ap.add_argument("--out", default=None, help="JSON to add this run's figures to (kept: other runs' entries)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else DEFAULT_MODEL
    if not (model / "best_model.pt").exists() and not model.is_file():
        print(f"no bundle at {model}: building an untrained cpu-preset bundle (timing only)")
        model = untrained_cpu_bundle(Path(tmp.name))
    port = free_port()
    server = start_server(model, port, args.threads, args.precision)
    try:
        info = json.loads(http_request("GET", port, "/api/model")[1])
        payloads = load_payloads(Path(args.data), args.images, info["vocabularies"], args.heatmap)
        print(f"model {info['backbone']} @ {info['input_size']} px (id {info['model_id']}), server pid "
              f"{server.pid}, waitress threads {args.threads}, {args.requests} requests at concurrency "
              f"{args.concurrency}, {len(payloads)} distinct real images{', with heatmaps' if args.heatmap else ''}")
        idle = proc_memory_mb(server.pid)
        load_before = load_average()
        run_load(port, payloads, args.requests, args.concurrency)  # warm-up: same size as the measured run
        before = proc_memory_mb(server.pid)
        lat, errors, wall = run_load(port, payloads, args.requests, args.concurrency)
        after = proc_memory_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
        tmp.cleanup()
    ms, q = lat * 1000, percentiles_ms(lat, (50, 90, 99))
    print(f"latency ms: p50 {q['p50_ms']:.0f}  p90 {q['p90_ms']:.0f}  "
          f"p99 {q['p99_ms']:.0f}  max {ms.max():.0f}  mean {ms.mean():.0f}")
    print(f"throughput {len(ms) / wall:.2f} req/s ({wall:.1f} s wall); errors {len(errors)}")
    print(f"server RSS MB: idle {idle:.0f}; after warm-up {before:.0f}, after the measured run {after:.0f}, "
          f"growth {after - before:+.1f}")
    for e in errors[:5]:
        print("  error:", e)
    ok = not errors and after - before <= args.max_growth_mb
    print("PASS" if ok else "FAIL")
    if args.out:
        figures = {**{k: round(v, 1) for k, v in q.items()}, "max_ms": round(float(ms.max()), 1),
                   "requests_per_s": round(len(ms) / wall, 2), "requests": args.requests,
                   "concurrency": args.concurrency, "threads": args.threads, "errors": len(errors),
                   "rss_mb": {"idle": round(idle), "before": round(before), "after": round(after)},
                   "load_before": load_before, "model": str(model), "model_id": info["model_id"],
                   "inference": info.get("inference"), "passed": ok}
        record_run(Path(args.out), f"{args.precision} c{args.concurrency}{' heatmap' if args.heatmap else ''}",
                   figures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
