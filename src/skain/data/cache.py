"""The on-disk cache of pre-resized images: keyed by content, bounded in size, and careful with the disk.

An entry is `<key>.npy`, the uint8 array `images.load_resized` returns; the key hashes the source file's bytes
with the resize parameters, so a moved, copied or re-extracted dataset hits the same entries and an edited file
or a new resolution misses. The folder is kept under a size cap (default 8 GiB, `SKAIN_CACHE_MAX_GB`) by deleting
the least recently used entries (a hit refreshes an entry's mtime at most once an hour); caching pauses with a
warning while the cache's disk has less than 1 GiB free (`SKAIN_CACHE_MIN_FREE_GB`); temporary files left by
killed writers are removed after an hour. Several processes may share one folder: each counts it when it starts
and again every `RECOUNT_EVERY` writes, so the cap holds approximately ("LRU-ish"), never exactly.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MAX_GB = 8.0
DEFAULT_MIN_FREE_GB = 1.0
KEY_VERSION = "v2"          # v2: content keys, draft-mode JPEG decoding
STALE_TMP_S = 3600          # a write takes milliseconds; an hour-old temporary file is a killed writer's
TOUCH_AFTER_S = 3600        # refresh a hit entry's mtime (the LRU clock) at most this often
RECOUNT_EVERY = 256         # writes between re-counts of a shared folder
EVICT_TO = 0.9              # evict down to this share of the cap, so eviction does not run on every write
ENTRY = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?\.npy")   # 40: v1 keys (sha1), 64: v2 keys (sha256)
TEMP = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?\.\d+\.tmp")


def _gib_from_env(name: str, default: float) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return int(default * 2**30)
    try:
        gib = float(raw)
    except ValueError:
        gib = float("nan")
    if not math.isfinite(gib) or gib < 0:
        raise ValueError(f"{name} must be a number of GiB (e.g. 8 or 0.5), got {raw!r}")
    return int(gib * 2**30)


def max_bytes_from_env() -> int:
    return _gib_from_env("SKAIN_CACHE_MAX_GB", DEFAULT_MAX_GB)


def min_free_from_env() -> int:
    return _gib_from_env("SKAIN_CACHE_MIN_FREE_GB", DEFAULT_MIN_FREE_GB)


@dataclass
class CacheStats:
    folder: Path
    entries: int
    bytes: int
    temp_files: int
    max_bytes: int
    free_bytes: int | None

    def describe(self) -> str:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        free = "n/a (folder does not exist)" if self.free_bytes is None else gib(self.free_bytes)
        return (f"image cache {self.folder}\n  entries     {self.entries}\n  size        {gib(self.bytes)} "
                f"(limit {gib(self.max_bytes)}, SKAIN_CACHE_MAX_GB)\n  temp files  {self.temp_files}\n"
                f"  disk free   {free}")


def _files(folder: Path, pattern: re.Pattern) -> list[tuple[Path, int, float]]:
    """(path, size, mtime) of the cache's own files in `folder` (nothing else there is ever touched)."""
    out = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if pattern.fullmatch(e.name):
                    try:
                        st = e.stat()
                    except OSError:
                        continue  # removed by another process meanwhile
                    out.append((Path(e.path), st.st_size, st.st_mtime))
    except FileNotFoundError:
        pass
    return out


def cache_stats(folder: str | Path) -> CacheStats:
    folder = Path(folder)
    entries = _files(folder, ENTRY)
    free = shutil.disk_usage(folder).free if folder.is_dir() else None
    return CacheStats(folder, len(entries), sum(s for _, s, _ in entries), len(_files(folder, TEMP)),
                      max_bytes_from_env(), free)


def clear_cache(folder: str | Path) -> tuple[int, int]:
    """Delete every entry and temporary file (only files named like the cache's own); returns (files, bytes)."""
    files = _files(Path(folder), ENTRY) + _files(Path(folder), TEMP)
    for path, _, _ in files:
        path.unlink(missing_ok=True)
    return len(files), sum(s for _, s, _ in files)


class ImageCache:
    """get/put of resized arrays by content key, within a size cap and a free-space floor."""

    def __init__(self, folder: str | Path, max_bytes: int | None = None, min_free: int | None = None):
        self.folder = Path(folder)
        self.max_bytes = max_bytes_from_env() if max_bytes is None else int(max_bytes)
        self.min_free = min_free_from_env() if min_free is None else int(min_free)
        self.writable = True
        self._total: int | None = None   # bytes of entries, as last counted plus this process's writes since
        self._writes = 0
        self._started = time.time()
        self._digests: dict[tuple, str] = {}  # (path, size, mtime, inode) -> sha256 of the bytes, per process
        self._warned: set[str] = set()

    # -------------------------------------------------------------------------------------- keys
    def key(self, path: str | Path, short_side: int) -> str | None:
        """sha256 of the file's bytes + the resize parameters; None when the file cannot be read (the decoder
        then names the problem). The digest is remembered per (path, size, mtime, inode) in this process."""
        try:
            st = os.stat(path)
            stamp = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
            digest = self._digests.get(stamp)
            if digest is None:
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                self._digests[stamp] = digest
        except OSError:
            return None
        return hashlib.sha256(f"{digest}|{short_side}|{KEY_VERSION}".encode()).hexdigest()

    # -------------------------------------------------------------------------------------- read / write
    def get(self, key: str) -> np.ndarray | None:
        entry = self.folder / f"{key}.npy"
        try:
            arr = np.load(entry, allow_pickle=False)
        except (OSError, ValueError):
            return None
        self._touch(entry)
        return arr

    def put(self, key: str, arr: np.ndarray) -> None:
        if not self.writable:
            return
        entry, tmp = self.folder / f"{key}.npy", self.folder / f"{key}.{os.getpid()}.tmp"
        try:
            if self._total is None or self._writes % RECOUNT_EVERY == 0:
                self._open()
            if not self._room(arr.nbytes):
                return
            with open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
                size = fh.tell()
            os.replace(tmp, entry)
        except OSError as exc:  # a read-only or full cache never stops the work
            _unlink_quietly(tmp)
            self._stop_writing(f"cannot write to the image cache {self.folder} ({exc}); decoding images each time")
            return
        self._writes += 1
        assert self._total is not None  # counted by _open above whenever it was None
        self._total += size
        if self._total > self.max_bytes:
            self.evict()

    def _open(self) -> None:
        """(Re)count the folder, creating it, and remove temporary files killed writers left behind."""
        self.folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for path, _, mtime in _files(self.folder, TEMP):
            if now - mtime > STALE_TMP_S:
                path.unlink(missing_ok=True)
        self._total = sum(s for _, s, _ in _files(self.folder, ENTRY))

    def _room(self, nbytes: int) -> bool:
        if nbytes > self.max_bytes * EVICT_TO:
            self._warn_once("cap", f"image cache limit {self.max_bytes / 2**30:.2f} GiB is too small to hold one "
                                   "image; raise SKAIN_CACHE_MAX_GB")
            return False
        free = shutil.disk_usage(self.folder).free
        if free - nbytes < self.min_free:
            self._stop_writing(f"only {free / 2**30:.2f} GiB free on the disk of the image cache {self.folder} "
                               f"(keeping {self.min_free / 2**30:.2f} GiB free, SKAIN_CACHE_MIN_FREE_GB): no more "
                               "images are cached in this run; `skain cache clear` or --cache-dir elsewhere")
            return False
        return True

    def evict(self) -> None:
        """Delete the least recently used entries until the folder is under EVICT_TO of the cap."""
        entries = sorted(_files(self.folder, ENTRY), key=lambda e: e[2])
        total, goal, recent = sum(s for _, s, _ in entries), int(self.max_bytes * EVICT_TO), 0
        for path, size, mtime in entries:
            if total <= goal:
                break
            path.unlink(missing_ok=True)
            total -= size
            recent += mtime >= self._started
        self._total = total
        if recent:
            self._warn_once("thrash", f"the image cache limit ({self.max_bytes / 2**30:.2f} GiB) is smaller than "
                                      "the images in use, so entries are evicted before they are reused; raise "
                                      "SKAIN_CACHE_MAX_GB or use --cache-dir off")

    def _touch(self, entry: Path) -> None:
        try:
            if time.time() - entry.stat().st_mtime > TOUCH_AFTER_S:
                os.utime(entry)
        except OSError:
            pass  # a read-only cache still serves hits

    def _stop_writing(self, message: str) -> None:
        self.writable = False
        self._warn_once("write", message)

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s", message)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
