"""`skain download`: HAM10000, the ISIC 2018 Task 3 sets or any ISIC Archive collection/search, into a folder that
`skain train --data` / `skain predict --data` take as it is (metadata.csv + images/, the `isic` layout).

Resumable: finished images are kept (size and checksum verified), a part left by a killed run is continued with
an HTTP Range request, and metadata.csv, SHA256SUMS, LICENSE.txt and ATTRIBUTION.txt are written only once
every image is there, so a folder with metadata.csv is a complete download.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from skain.download.archive import (
    API_ENV,
    DATASETS,
    DEFAULT_API,
    ArchiveImage,
    collection,
    list_images,
    search_url,
)
from skain.download.files import (
    attribution_text,
    check_disk,
    human,
    licence_text,
    metadata_csv,
    part_bytes,
    plan,
    read_sums,
    write_sums,
    write_text,
)
from skain.download.http import DownloadError, Http

__all__ = ["DATASETS", "DownloadError", "DownloadRequest", "Http", "Summary", "default_base_url", "default_output",
           "download"]

log = logging.getLogger(__name__)


@dataclass
class DownloadRequest:
    output: Path
    dataset: str | None = None            # a name in DATASETS, or None for --collection / --search
    collections: tuple[int, ...] = ()
    search: str | None = None
    limit: int | None = None
    base_url: str = DEFAULT_API
    workers: int = 8
    progress: bool = True


@dataclass
class Summary:
    folder: Path
    images: int
    fetched: int
    bytes_fetched: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def default_base_url() -> str:
    return os.environ.get(API_ENV) or DEFAULT_API


def default_output(dataset: str | None, collections: tuple[int, ...] = (), search: str | None = None) -> Path:
    if dataset:
        return Path("data") / dataset
    return Path("data") / ("isic-" + "-".join(str(c) for c in collections) if collections else "isic-search")


def download(req: DownloadRequest, http: Http | None = None) -> Summary:
    """List, plan, check the disk, fetch what is missing, then write metadata and licence files."""
    http = http or Http()
    _validate(req)
    start = time.monotonic()
    title, collections, source = _describe_request(req, http)
    image_dir = req.output / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images = _list(http, search_url(req.base_url, collections, req.search), req)
    if not images:
        raise DownloadError(f"the ISIC Archive returned no images for {source}")
    _check_expected(req, len(images))
    done, todo = plan(images, image_dir, read_sums(req.output))
    need = sum(img.size or 0 for img in todo) - part_bytes(todo, image_dir)
    check_disk(req.output, max(need, 0))
    log.info("%d image(s) listed: %d already here, %d to fetch (%s)", len(images), len(done), len(todo), human(need))
    fetched = _fetch_all(http, todo, image_dir, req, done)
    _write_side_files(req, title, source, images, done)
    return Summary(req.output, len(images), len(todo), fetched, time.monotonic() - start)


def _validate(req: DownloadRequest) -> None:
    if req.limit is not None and req.limit < 1:
        raise DownloadError(f"--limit must be at least 1, got {req.limit}")
    if req.workers < 1:
        raise DownloadError(f"--workers must be at least 1, got {req.workers}")
    if not req.base_url.startswith(("http://", "https://")):
        raise DownloadError(f"the Archive's base URL must start with http:// or https://, got {req.base_url!r}")


def _describe_request(req: DownloadRequest, http: Http) -> tuple[str, tuple[int, ...], str]:
    """(title, collection ids, where from) for the licence file; checks the collections exist."""
    if req.dataset:
        if req.dataset not in DATASETS:
            raise DownloadError(f"unknown dataset {req.dataset!r}; known: {', '.join(DATASETS)}")
        ds = DATASETS[req.dataset]
        collections = req.collections or ds.collections
        return ds.title, collections, f"ISIC Archive collection(s) {_ids(collections)}"
    if not req.collections and not req.search:
        raise DownloadError(f"say what to download: a dataset ({', '.join(DATASETS)}), --collection ID or --search")
    names = [collection(http, req.base_url, c)["name"] for c in req.collections]
    parts = [f"collection(s) {_ids(req.collections)} ({'; '.join(names)})"] if names else []
    parts += [f"search {req.search!r}"] if req.search else []
    return "ISIC Archive: " + ", ".join(parts), req.collections, "the ISIC Archive, " + " and ".join(parts)


def _ids(ids: tuple[int, ...]) -> str:
    return ", ".join(str(i) for i in ids)


def _list(http: Http, url: str, req: DownloadRequest) -> list[ArchiveImage]:
    with tqdm(desc="listing", unit=" images", disable=not req.progress, leave=False) as bar:
        def on_page(n: int, count: int | None) -> None:
            if count is not None and bar.total is None:
                bar.total = min(count, req.limit) if req.limit else count
            bar.update(n)
        return list_images(http, url, req.limit, on_page)


def _check_expected(req: DownloadRequest, n: int) -> None:
    ds = DATASETS.get(req.dataset or "")
    if ds and ds.expected and not req.limit and not req.search and not req.collections and n != ds.expected:
        log.warning("%s: the Archive listed %d images where %d were expected; its collection may have changed",
                    ds.name, n, ds.expected)


def _fetch_all(http: Http, todo: list[ArchiveImage], image_dir: Path, req: DownloadRequest,
               done: dict[str, str]) -> int:
    """Fetch in parallel into done (name -> sha256); returns bytes transferred. Failures are collected, not fatal
    one by one: the error at the end names them and says that rerunning resumes."""
    if not todo:
        return 0
    initial = part_bytes(todo, image_dir)
    with tqdm(total=sum(img.size or 0 for img in todo) or None, initial=initial, unit="B", unit_scale=True,
              unit_divisor=1024, desc=f"{len(todo)} image(s)", disable=not req.progress, smoothing=0.1) as bar:
        counter = _Counter(bar.update)
        failed = _run_pool(http, todo, image_dir, req.workers, done, counter)
    if failed:
        first = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:3])
        raise DownloadError(f"{len(failed)} of {len(todo)} image(s) failed ({first}). The others are saved: run the "
                            "same command again to fetch the rest")
    return counter.total


def _run_pool(http: Http, todo: list[ArchiveImage], image_dir: Path, workers: int, done: dict[str, str],
              on_bytes: Callable[[int], None]) -> dict[str, str]:
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    failed: dict[str, str] = {}
    try:
        jobs = {pool.submit(http.fetch, img.url, image_dir / img.filename, img.size, on_bytes): img for img in todo}
        for job in as_completed(jobs):
            img = jobs[job]
            try:
                done[img.filename] = job.result()
            except DownloadError as exc:
                failed[img.isic_id] = str(exc)
                log.warning("%s: %s", img.isic_id, exc)
    except BaseException:  # Ctrl-C: drop the queue; running transfers stop at their next chunk, parts kept
        http.stop.set()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return failed


class _Counter:
    """Bytes transferred, from all threads, passed on to the progress bar."""

    def __init__(self, update: Callable[[int], object]):
        self.total, self._update, self._lock = 0, update, threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.total += n
            self._update(n)


def _write_side_files(req: DownloadRequest, title: str, source: str, images: list[ArchiveImage],
                      done: dict[str, str]) -> None:
    ds = DATASETS.get(req.dataset or "")
    citations = ds.citations if ds else ()
    write_sums(req.output, done)
    write_text(req.output / "ATTRIBUTION.txt", attribution_text(images))
    write_text(req.output / "LICENSE.txt", licence_text(title, source, images, ds.licence if ds else None,
                                                         citations))
    write_text(req.output / "metadata.csv", metadata_csv(images))  # last: its presence means "complete"
