"""`skain download` against a stand-in ISIC Archive on 127.0.0.1: the API's cursor paging and JSON shapes, real
HAM10000 images where ../shared has them (synthetic JPEGs otherwise), and faults: 5xx, timeouts, truncated bodies
and a client killed with SIGKILL halfway. Every loop is bounded; nothing leaves the loopback interface."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skain.data.layout import discover, load_table
from skain.download import DownloadError, DownloadRequest, Http, download
from skain.download.files import read_sums

SRC = Path(__file__).resolve().parents[1] / "src"
DIAGNOSES = {  # HAM10000 dx -> the Archive's diagnosis_1..3, as the stand-in serves them
    "nv": ("Benign", "Benign melanocytic proliferations", "Nevus"),
    "mel": ("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive"),
    "bkl": ("Benign", "Benign epidermal proliferations", "Seborrheic keratosis"),
    "bcc": ("Malignant", "Malignant adnexal epithelial proliferations - Follicular", "Basal cell carcinoma"),
    "akiec": ("Indeterminate", "Indeterminate epidermal proliferations", "Solar or actinic keratosis"),
    "df": ("Benign", "Benign soft tissue proliferations - Fibro-histiocytic", "Dermatofibroma"),
    "vasc": ("Benign", "Benign soft tissue proliferations - Vascular", "Hemangioma"),
}
SITES = {"back": "posterior torso", "face": "head/neck", "scalp": "head/neck", "neck": "head/neck", "ear": "head/neck",
         "chest": "anterior torso", "abdomen": "anterior torso", "trunk": "anterior torso",
         "upper extremity": "upper extremity", "hand": "upper extremity", "lower extremity": "lower extremity",
         "foot": "lower extremity", "acral": "palms/soles", "genital": "oral/genital"}


# ------------------------------------------------------------------------------------------ the stand-in server
class Archive:
    """What the stand-in serves (images: isic_id -> bytes, records) and which faults it injects, in order."""

    def __init__(self, files: dict[str, bytes], clinical: dict[str, dict] | None = None, page_size: int = 3):
        self.files, self.page_size = files, page_size
        self.clinical = clinical or {k: {"diagnosis_1": "Benign", "diagnosis_2": "Benign melanocytic proliferations",
                                         "diagnosis_3": "Nevus", "lesion_id": f"IL_{k[-7:]}", "age_approx": 45,
                                         "sex": "female", "anatom_site_general": "posterior torso"} for k in files}
        self.faults: list[list] = []       # [kind, path regex, times left]
        self.hold: set[str] = set()        # send half of these files' bodies, then wait for `release`
        self.release = threading.Event()
        self.log: list[tuple[str, str]] = []   # (path, Range header)
        self.lock = threading.Lock()
        self.base = ""

    def fault(self, kind: str, path: str, times: int = 1) -> None:
        self.faults.append([kind, re.compile(path), times])

    def take_fault(self, path: str) -> str | None:
        with self.lock:
            for f in self.faults:
                if f[2] > 0 and f[1].search(path):
                    f[2] -= 1
                    return f[0]
        return None

    def record(self, isic_id: str) -> dict:
        return {"isic_id": isic_id, "public": True, "copyright_license": "CC-BY-NC",
                "attribution": "ViDIR Group, Department of Dermatology, Medical University of Vienna",
                "files": {"full": {"url": f"{self.base}/files/{isic_id}.jpg", "size": len(self.files[isic_id])},
                          "thumbnail_256": {"url": f"{self.base}/files/{isic_id}_thumb.jpg", "size": 1}},
                "metadata": {"acquisition": {"image_type": "dermoscopic", "pixels_x": 600, "pixels_y": 450},
                             "clinical": self.clinical[isic_id]}}

    def page(self, query: dict[str, list[str]]) -> dict:
        ids = sorted(self.files)
        limit = int(query.get("limit", [self.page_size])[0])
        limit = min(limit, self.page_size)
        cursor = int(query.get("cursor", ["0"])[0])
        nxt = None
        if cursor + limit < len(ids):
            params = {k: v[0] for k, v in query.items()} | {"cursor": cursor + limit}
            nxt = f"{self.base}/api/v2/images/search/?{urlencode(params)}"
        return {"count": len(ids), "next": nxt, "previous": None,
                "results": [self.record(i) for i in ids[cursor:cursor + limit]]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        archive: Archive = self.server.archive
        url = urlparse(self.path)
        with archive.lock:
            archive.log.append((url.path, self.headers.get("Range", "")))
        fault = archive.take_fault(url.path)
        try:
            if fault == "stall":
                time.sleep(1.0)
            if fault in ("500", "503", "404"):
                return self._send(int(fault), b'{"detail": "fault"}', "application/json")
            if url.path == "/api/v2/images/search/":
                return self._json(archive.page(parse_qs(url.query)), truncate=fault == "truncate")
            if m := re.fullmatch(r"/api/v2/collections/(\d+)/", url.path):
                return self._json({"id": int(m.group(1)), "name": "Stand-in collection", "public": True,
                                   "pinned": False, "doi": None})
            if (m := re.fullmatch(r"/files/(ISIC_\d+)\.jpg", url.path)) and m.group(1) in archive.files:
                return self._file(archive.files[m.group(1)], truncate=fault == "truncate",
                                  hold=m.group(1) in archive.hold and not archive.release.is_set())
            self._send(404, b'{"detail": "Not found."}', "application/json")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: dict, truncate: bool = False) -> None:
        body = json.dumps(obj).encode()
        if truncate:
            return self._cut(200, body, "application/json", len(body), {})
        self._send(200, body, "application/json")

    def _file(self, data: bytes, truncate: bool, hold: bool = False) -> None:
        start, status, headers = 0, 200, {"Accept-Ranges": "bytes"}
        if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start, status = int(m.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if truncate:
            return self._cut(status, body, "image/jpeg", len(body), headers)
        self.send_response(status)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if hold:  # half now, the rest once the test says so (by then the client has been killed)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.server.archive.release.wait(timeout=60)
            body = body[len(body) // 2:]
        self.wfile.write(body)

    def _cut(self, status: int, body: bytes, ctype: str, length: int, headers: dict) -> None:
        """Announce the whole body, send half of it, hang up."""
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def serve():
    servers = []

    def start(archive: Archive) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.archive = archive
        archive.base = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return archive.base + "/api/v2"
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def synthetic_jpegs(n: int, size: int = 96) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {}
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
        files[f"ISIC_{9000000 + i:07d}"] = buf.getvalue()
    return files


def fast_http(**kw) -> Http:
    return Http(**{"timeout": 0.4, "retries": 4, "backoff": 0.01, "max_backoff": 0.05} | kw)


def request(base: str, out: Path, **kw) -> DownloadRequest:
    return DownloadRequest(out, None, (1,), base_url=base, workers=3, progress=False, **kw)


def assert_identical(out: Path, files: dict[str, bytes]) -> None:
    got = {p.stem: p.read_bytes() for p in (out / "images").glob("*.jpg")}
    assert got == files


# ------------------------------------------------------------------------------------------ the tests
def test_download_writes_a_folder_that_train_and_predict_take_as_it_is(serve, tmp_path):
    files = synthetic_jpegs(10)
    archive = Archive(files, page_size=3)
    summary = download(request(serve(archive), tmp_path / "d"), fast_http())
    out = tmp_path / "d"
    assert (summary.images, summary.fetched, summary.bytes_fetched) == (10, 10, sum(map(len, files.values())))
    assert_identical(out, files)
    pages = [p for p, _ in archive.log if p.endswith("/images/search/")]
    assert len(pages) == 4  # 10 images, 3 per page, followed through `next`
    assert not list(out.rglob("*.part")) and not list(out.rglob("*.tmp"))
    sums = read_sums(out)
    assert sums == {f"{k}.jpg": hashlib.sha256(v).hexdigest() for k, v in files.items()}
    meta = pd.read_csv(out / "metadata.csv")
    assert list(meta.columns[:3]) == ["isic_id", "attribution", "copyright_license"] and len(meta) == 10
    licence = (out / "LICENSE.txt").read_text()
    assert "CC-BY-NC: 10 image(s)" in licence and "Stand-in collection" in licence
    assert "Medical University of Vienna: 10 image(s) (10 CC-BY-NC)" in (out / "ATTRIBUTION.txt").read_text()
    src = discover(out)
    assert src.layout == "isic"
    frame = load_table(src)
    assert set(frame["dx"]) == {"nv"} and set(frame["localization"]) == {"back"} and frame["age"].eq(45).all()


def test_server_errors_timeouts_and_truncated_bodies_are_retried(serve, tmp_path):
    files = synthetic_jpegs(6)
    archive = Archive(files)
    archive.fault("503", r"/images/search/", 2)
    archive.fault("truncate", r"/images/search/", 1)
    archive.fault("500", r"ISIC_9000001", 2)
    archive.fault("stall", r"ISIC_9000002", 1)
    archive.fault("truncate", r"ISIC_9000003", 2)
    download(request(serve(archive), tmp_path), fast_http())
    assert_identical(tmp_path, files)
    ranges = [r for p, r in archive.log if p.endswith("ISIC_9000003.jpg")]
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"  # resumed, not restarted
    assert all(f[2] == 0 for f in archive.faults)


def test_a_file_that_keeps_failing_is_named_and_the_rest_are_kept(serve, tmp_path):
    files = synthetic_jpegs(5)
    archive = Archive(files)
    archive.fault("503", r"ISIC_9000004", 3)
    with pytest.raises(DownloadError, match=r"1 of 5 image\(s\) failed \(ISIC_9000004: .*HTTP 503.*run the same "
                                            r"command again"):
        download(request(serve(archive), tmp_path), fast_http(retries=2))
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 4
    assert not (tmp_path / "metadata.csv").exists()  # an incomplete folder is never presented as a dataset
    before = len(archive.log)
    download(request(archive.base + "/api/v2", tmp_path), fast_http())
    assert_identical(tmp_path, files)
    assert [p for p, _ in archive.log[before:] if p.startswith("/files/")] == ["/files/ISIC_9000004.jpg"]


def test_client_errors_are_not_retried(serve, tmp_path):
    archive = Archive(synthetic_jpegs(2))
    archive.fault("404", r"ISIC_9000000", 5)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(request(serve(archive), tmp_path), fast_http())
    assert [p for p, _ in archive.log].count("/files/ISIC_9000000.jpg") == 1


def test_a_damaged_file_is_detected_and_fetched_again(serve, tmp_path):
    files = synthetic_jpegs(4)
    archive = Archive(files)
    base = serve(archive)
    download(request(base, tmp_path), fast_http())
    flipped = tmp_path / "images" / "ISIC_9000001.jpg"
    data = bytearray(flipped.read_bytes())
    data[500] ^= 0xFF                      # same size: only the checksum can tell
    flipped.write_bytes(bytes(data))
    short = tmp_path / "images" / "ISIC_9000002.jpg"
    short.write_bytes(short.read_bytes()[:100])
    before = len(archive.log)
    summary = download(request(base, tmp_path), fast_http())
    assert summary.fetched == 2
    assert sorted(p for p, _ in archive.log[before:] if p.startswith("/files/")) == [
        "/files/ISIC_9000001.jpg", "/files/ISIC_9000002.jpg"]
    assert_identical(tmp_path, files)


def test_not_enough_disk_space_stops_before_any_transfer(serve, tmp_path, monkeypatch):
    import shutil as _shutil

    import skain.download.files as dfiles
    archive = Archive(synthetic_jpegs(3))
    monkeypatch.setattr(dfiles.shutil, "disk_usage", lambda p: _shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DownloadError, match=r"not enough disk space .* needs .* and 1000 B are free"):
        download(request(serve(archive), tmp_path), fast_http())
    assert not [p for p, _ in archive.log if p.startswith("/files/")]


def test_the_archive_answer_cannot_name_files_outside_the_folder(serve, tmp_path):
    archive = Archive(synthetic_jpegs(2))
    base = serve(archive)
    original = archive.record
    archive.record = lambda i: original(i) | {"isic_id": "../../etc/evil"}
    with pytest.raises(DownloadError, match="without a valid isic_id"):
        download(request(base, tmp_path / "d"), fast_http())
    assert not (tmp_path / "etc").exists()


def test_limit_and_a_paging_loop(serve, tmp_path):
    files = synthetic_jpegs(7)
    archive = Archive(files, page_size=2)
    base = serve(archive)
    summary = download(request(base, tmp_path / "a", limit=3), fast_http())
    assert summary.images == 3 and len(list((tmp_path / "a" / "images").glob("*.jpg"))) == 3
    original = archive.page
    archive.page = lambda q: original(q) | {"next": f"{archive.base}/api/v2/images/search/?cursor=0"}
    with pytest.raises(DownloadError, match="paging does not end"):
        download(request(base, tmp_path / "b"), fast_http())


def test_cli_download_reads_the_base_url_from_the_environment(serve, tmp_path, monkeypatch, capsys):
    from skain.cli import main
    files = synthetic_jpegs(3)
    monkeypatch.setenv("SKAIN_ISIC_API", serve(Archive(files)))
    rc = main(["download", "--collection", "1", "--output", str(tmp_path), "--no-progress", "--timeout", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 images in" in out and f"skain train --data {tmp_path}" in out
    assert_identical(tmp_path, files)
    assert main(["download", "--output", str(tmp_path / "x")]) == 2   # nothing named: a clear error, exit 2
    assert "say what to download" in capsys.readouterr().err


def test_stopping_ends_transfers_at_the_next_chunk_and_keeps_the_part(serve, tmp_path):
    files = synthetic_jpegs(3, size=160)
    archive = Archive(files)
    archive.hold = {"ISIC_9000001"}
    base = serve(archive)
    http = fast_http(timeout=20)
    errors: list[Exception] = []

    def run() -> None:
        try:
            download(request(base, tmp_path), http)
        except DownloadError as exc:
            errors.append(exc)
    worker = threading.Thread(target=run)
    worker.start()
    part = tmp_path / "images" / "ISIC_9000001.jpg.part"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (part.is_file() and part.stat().st_size > 0):
        time.sleep(0.01)
    http.stop.set()                     # what Ctrl-C does
    archive.release.set()
    worker.join(timeout=30)
    assert not worker.is_alive() and errors and "stopped" in str(errors[0])
    assert part.stat().st_size > 0 and not (tmp_path / "images" / "ISIC_9000001.jpg").exists()
    assert not (tmp_path / "metadata.csv").exists()


@pytest.mark.slow  # two CLI subprocesses (~30 s on a loaded 2-core machine)
def test_killed_download_resumes_to_byte_identical_files(serve, tmp_path):
    files = synthetic_jpegs(12, size=160)        # ~60 KB each
    ids = sorted(files)
    archive = Archive(files, page_size=5)
    archive.hold = {ids[5], ids[6]}              # both workers stop mid-file there; 5 files are complete by then
    base = serve(archive)
    out = tmp_path / "d"
    cmd = [sys.executable, "-m", "skain", "download", "--collection", "1", "--base-url", base, "--output", str(out),
           "--no-progress", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    held = [out / "images" / f"{i}.jpg.part" for i in sorted(archive.hold)]
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if all(p.is_file() and p.stat().st_size > 0 for p in held):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the download ended before it could be killed: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        archive.release.set()
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    partial = {p.name: p.stat().st_size for p in held}
    finished = {p.stem: p.read_bytes() for p in (out / "images").glob("*.jpg")}
    assert sorted(finished) == ids[:5] and all(0 < n < len(files[ids[5]]) for n in partial.values())
    assert all(files[k] == v for k, v in finished.items())     # a final name never holds a partial file
    assert not (out / "metadata.csv").exists()
    before = len(archive.log)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert_identical(out, files)
    log = archive.log[before:]
    assert {p for p, _ in log if p.startswith("/files/")} == {f"/files/{i}.jpg" for i in ids[5:]}  # kept the rest
    assert {p: r for p, r in log if p.endswith(("05.jpg", "06.jpg"))} == {
        f"/files/{i}.jpg": f"bytes={partial[i + '.jpg.part']}-" for i in ids[5:7]}   # parts continued with Range
    assert read_sums(out) == {f"{k}.jpg": hashlib.sha256(v).hexdigest() for k, v in files.items()}


def real_sample(shared_data: Path, per_class: int = 2) -> tuple[dict[str, bytes], dict[str, dict], pd.DataFrame]:
    meta = pd.read_csv(shared_data / "HAM10000_metadata.csv")
    have = {p.stem for p in (shared_data / "images").glob("*.jpg")}
    meta = meta[meta["image_id"].isin(have)].sort_values("image_id").groupby("dx").head(per_class)
    files = {i: (shared_data / "images" / f"{i}.jpg").read_bytes() for i in meta["image_id"]}
    clinical = {}
    for row in meta.itertuples():
        d1, d2, d3 = DIAGNOSES[row.dx]
        clinical[row.image_id] = {"diagnosis_1": d1, "diagnosis_2": d2, "diagnosis_3": d3, "lesion_id": row.lesion_id,
                                  "age_approx": None if pd.isna(row.age) else int(row.age), "sex": row.sex,
                                  "anatom_site_general": SITES.get(row.localization)}
    return files, clinical, meta


def test_real_ham10000_images_round_trip_into_a_training_table(serve, tmp_path, shared_data):
    from skain.inference.predictor import prediction_table
    files, clinical, meta = real_sample(shared_data)
    archive = Archive(files, clinical, page_size=4)
    archive.fault("truncate", r"/files/", 3)
    archive.fault("503", r"/files/", 2)
    download(request(serve(archive), tmp_path), fast_http())
    assert_identical(tmp_path, files)                  # real JPEGs, byte for byte, through the faults
    frame = load_table(discover(tmp_path)).set_index("image_id")
    truth = meta.set_index("image_id")
    assert len(frame) == 14 and frame["dx"].equals(truth.loc[frame.index, "dx"])
    assert frame["lesion_id"].equals(truth.loc[frame.index, "lesion_id"])
    pred, src = prediction_table(str(tmp_path), None, None, False)
    assert src.layout == "isic" and len(pred) == 14 and "dx" in pred
