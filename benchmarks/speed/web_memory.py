"""Peak server memory under worst-case uploads: 8 concurrent POST /api/predict of the largest images allowed.

    python -m benchmarks.speed.web_memory [--megapixels 40 12] [--concurrency 8] [--rounds 2] [--heatmap]

Starts `skain serve` (waitress, 4 threads) on an UNTRAINED cpu-preset bundle (memory does not depend on the
weights' values), then for each size and format (PNG, JPEG) sends `--rounds` waves of `--concurrency`
simultaneous uploads of one image just under SIZE megapixels and under the 10 MB upload limit, and reports the
server's peak resident memory (VmHWM, reset between scenarios through /proc/PID/clear_refs) and the statuses.
Writes no results file (docs/robustness.md, "Bad input, interruption, safe loading", quotes the printed figures).
The server runs the installed skAIn; to compare two code versions on one machine, run it once per version, e.g.
`PYTHONPATH=/tmp/before/src python -m benchmarks.speed.web_memory` for a `git worktree` of the older commit.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import free_port, http_request, multipart, proc_memory_mb, start_server, untrained_cpu_bundle

UPLOAD_LIMIT = 10 * 2**20


def worst_image(megapixels: float, fmt: str) -> bytes:
    """A smooth photo-like image just under `megapixels`, 4:3, that still fits the 10 MB upload limit."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5) - 8
    height = int(megapixels * 1e6 / width) - 8
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    r = np.hypot(x - 0.5, y - 0.5)
    rgb = np.stack([200 - 120 * (r < 0.2) + 40 * x + 0 * y, 150 - 90 * (r < 0.2) + 40 * y + 0 * x,
                    120 - 70 * (r < 0.2) + 0 * x * y], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    data = buf.getvalue()
    assert len(data) < UPLOAD_LIMIT, f"{fmt} {width}x{height} is {len(data) / 2**20:.1f} MB"
    return data


def peak_mb(pid: int) -> tuple[float, float]:
    """(peak, current) resident memory of the process in MB."""
    return proc_memory_mb(pid, "VmHWM"), proc_memory_mb(pid, "VmRSS")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def wave(port: int, body: bytes, ctype: str, n: int) -> list[int]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: http_request("POST", port, "/api/predict", body, ctype)[0], range(n)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megapixels", type=float, nargs="+", default=[40, 12])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--formats", nargs="+", default=["PNG", "JPEG"], choices=["PNG", "JPEG"],
                    help="order matters: the allocator keeps some memory after a scenario, so run one per server "
                         "for a clean baseline")
    ap.add_argument("--heatmap", action="store_true", help="ask for the Grad-CAM heatmap too (what the page does)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = untrained_cpu_bundle(Path(tmp))
        port = free_port()
        server = start_server(model, port, args.threads)
        try:
            small = multipart(worst_image(0.3, "JPEG"), {"heatmap": "1" if args.heatmap else "0"})
            wave(port, *small, args.concurrency)  # warm-up with ordinary images
            idle = peak_mb(server.pid)[1]
            print(f"server pid {server.pid}, {args.threads} waitress threads; RSS after warm-up {idle:.0f} MB")
            for mp in args.megapixels:
                for fmt in args.formats:
                    data = worst_image(mp, fmt)
                    body = multipart(data, {"heatmap": "1" if args.heatmap else "0"})
                    reset_peak(server.pid)
                    base = peak_mb(server.pid)[1]
                    statuses = [s for _ in range(args.rounds) for s in wave(port, *body, args.concurrency)]
                    peak = peak_mb(server.pid)[0]
                    print(f"{fmt:4s} {mp:4.0f} Mpx ({len(data) / 2**20:4.1f} MB): {args.concurrency} concurrent x "
                          f"{args.rounds}: statuses {sorted(set(statuses))}, peak RSS {peak:.0f} MB "
                          f"(+{peak - base:.0f} MB over {base:.0f} MB)")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
