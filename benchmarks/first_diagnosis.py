"""Seconds from starting `skain serve` (as a new user would: no --model, no outputs/) to the first diagnosis
of a real HAM10000 image, through the JSON API the page uses (with the heatmap the page asks for).

    python benchmarks/first_diagnosis.py                     # the default model (the shipped file)
    python benchmarks/first_diagnosis.py --model FILE        # another file as the default (SKAIN_DEFAULT_MODEL)

Prints the time to the start-up log line, to /api/health and to the first and second diagnoses.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SKAIN_SHARED_DATA", ROOT / ".." / "shared" / "ham10000"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_image(url: str, image: Path) -> dict:
    boundary = uuid.uuid4().hex
    body = b"".join([f"--{boundary}\r\nContent-Disposition: form-data; name=\"heatmap\"\r\n\r\n1\r\n".encode(),
                     f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{image.name}\"\r\n"
                     "Content-Type: image/jpeg\r\n\r\n".encode(), image.read_bytes(), f"\r\n--{boundary}--\r\n".encode()])
    req = urllib.request.Request(url + "/api/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return json.loads(urllib.request.urlopen(req, timeout=120).read())


def wait_healthy(url: str, proc: subprocess.Popen, start: float, limit: float = 300) -> float:
    while time.perf_counter() - start < limit:
        if proc.poll() is not None:
            raise SystemExit(f"skain serve exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/api/health", timeout=2).read()
            return time.perf_counter() - start
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"no answer from /api/health within {limit} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model file to serve as the default (SKAIN_DEFAULT_MODEL)")
    ap.add_argument("--image", type=Path, default=None, help="a real lesion image (default: first in ../shared)")
    args = ap.parse_args()
    image = args.image or sorted((SHARED / "images").glob("*.jpg"))[0]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if args.model:
        env["SKAIN_DEFAULT_MODEL"] = str(Path(args.model).resolve())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as cwd:
        log = Path(cwd) / "serve.log"
        start = time.perf_counter()
        with log.open("w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "skain", "serve", "--port", str(port)], cwd=cwd, env=env,
                                    stdout=fh, stderr=subprocess.STDOUT)
        try:
            ready = wait_healthy(url, proc, start)
            first = post_image(url, image)
            t_first = time.perf_counter() - start
            t0 = time.perf_counter()
            post_image(url, image)
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
          f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
