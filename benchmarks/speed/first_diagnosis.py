"""Seconds from starting `skain serve` (as a new user would: no --model, no outputs/) to the first diagnosis
of a real HAM10000 image, through the JSON API the page uses (with the heatmap the page asks for).

    python -m benchmarks.speed.first_diagnosis                  # the default model (the shipped file)
    python -m benchmarks.speed.first_diagnosis --model FILE     # another file as the default (SKAIN_DEFAULT_MODEL)

Prints the time to the start-up log line, to /api/health and to the first and second diagnoses; writes no results
file (docs/demo.md, "The shipped model", quotes two runs). The server runs this checkout's src/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import DATA_ROOT, checkout_env, free_port, http_request, load_average, multipart


def post_image(port: int, image: Path) -> dict:
    """POST /api/predict with the image and heatmap=1, as the page sends it."""
    status, body = http_request("POST", port, "/api/predict", *multipart(image.read_bytes(), {"heatmap": "1"}, image.name))
    if status != 200:
        raise SystemExit(f"{image.name}: HTTP {status} {body[:200]!r}")
    return json.loads(body)


def wait_healthy(port: int, proc: subprocess.Popen, start: float, limit: float = 300) -> float:
    """Seconds from `start` until /api/health answers 200."""
    while time.perf_counter() - start < limit:
        if proc.poll() is not None:
            raise SystemExit(f"skain serve exited with {proc.returncode}")
        try:
            if http_request("GET", port, "/api/health", timeout=2)[0] == 200:
                return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"no answer from /api/health within {limit} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model file to serve as the default (SKAIN_DEFAULT_MODEL)")
    ap.add_argument("--image", type=Path, default=None, help="a real lesion image (default: first in ../shared)")
    args = ap.parse_args()
    image = args.image or sorted((DATA_ROOT / "images").glob("*.jpg"))[0]
    env = checkout_env()
    if args.model:
        env["SKAIN_DEFAULT_MODEL"] = str(Path(args.model).resolve())
    port = free_port()
    with tempfile.TemporaryDirectory() as cwd:
        log = Path(cwd) / "serve.log"
        start = time.perf_counter()
        with log.open("w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "skain", "serve", "--port", str(port)], cwd=cwd, env=env,
                                    stdout=fh, stderr=subprocess.STDOUT)
        try:
            ready = wait_healthy(port, proc, start)
            first = post_image(port, image)
            t_first = time.perf_counter() - start
            t0 = time.perf_counter()
            post_image(port, image)
            t_second = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        said = [line for line in log.read_text().splitlines() if "model:" in line or "web app on" in line]
    print("\n".join(said))
    verdict = "REJECTED as not dermoscopic" if first.get("rejected") else \
        f"{first['diagnosis']} p={first['probability']:.3f}"
    print(f"{image.name}: {verdict}; heatmap {'yes' if 'heatmap' in first else 'no'}")
    print(f"serve start -> /api/health {ready:.1f} s -> first diagnosis {t_first:.1f} s; a second request {t_second:.2f} s"
          f"; load average {load_average():.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
