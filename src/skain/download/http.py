"""HTTP for downloads with the standard library only: JSON pages and resumable file transfers, each retried with
exponential backoff on 5xx/429, timeouts, dropped connections and short bodies; other errors stop at once."""
from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import random
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK = 64 * 1024
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class DownloadError(ValueError):
    """A download that cannot go on; the message says what failed and what to do (a ValueError so the CLI
    reports it as a user-facing error)."""


class ShortBody(OSError):
    """The server sent fewer bytes than it announced (a truncated body): retried, resuming where it stopped."""


@dataclass
class Http:
    timeout: float = 30.0      # seconds per connect / read
    retries: int = 5           # extra attempts after the first
    backoff: float = 1.0       # first wait; doubles each retry
    max_backoff: float = 60.0
    user_agent: str = "skain"
    stop: threading.Event = field(default_factory=threading.Event, repr=False)  # set: transfers end promptly

    def get_json(self, url: str) -> Any:
        def once() -> Any:
            with self._open(url) as resp:
                body = _read_all(resp)
            try:
                return json.loads(body)
            except ValueError as exc:
                raise DownloadError(f"GET {url}: the response is not JSON ({body[:80]!r})") from exc
        return self.retry(f"GET {url}", once)

    def fetch(self, url: str, dest: Path, size: int | None, on_bytes: Callable[[int], None]) -> str:
        """Download `url` into `dest` through `dest.part` (resuming a part left by an earlier run), check the size,
        rename; return the file's sha256. `dest` never holds a partial file."""
        part = dest.with_name(dest.name + ".part")
        self.retry(f"{dest.name}", lambda: self._fetch_once(url, part, size, on_bytes))
        digest = sha256_file(part)
        os.replace(part, dest)
        return digest

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            self._check_stop(what)
            try:
                return fn()
            except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts and resets are OSErrors
                if not _transient(exc) or attempt == self.retries:
                    tries = f" (gave up after {attempt + 1} attempts)" if attempt else ""
                    raise DownloadError(f"{what}: {_describe(exc)}{tries}") from exc
                wait = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
                log.info("%s: %s; retry %d of %d in %.1f s", what, _describe(exc), attempt + 1, self.retries, wait)
                self.stop.wait(wait)
        raise AssertionError("unreachable")

    def _check_stop(self, what: str) -> None:
        if self.stop.is_set():
            raise DownloadError(f"{what}: stopped")

    def _open(self, url: str, headers: dict[str, str] | None = None):
        req = urllib.request.Request(url, headers={"User-Agent": self.user_agent, **(headers or {})})
        return urllib.request.urlopen(req, timeout=self.timeout)

    def _fetch_once(self, url: str, part: Path, size: int | None, on_bytes: Callable[[int], None]) -> None:
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            on_bytes(-have)
            part.unlink()
            have = 0
        if size is not None and have == size:
            return
        with self._open(url, {"Range": f"bytes={have}-"} if have else None) as resp:
            if have and _resume_offset(resp) != have:  # Range ignored or answered from elsewhere: start over
                on_bytes(-have)
                have = 0
            length = resp.headers.get("Content-Length")
            expected = have + int(length) if length and length.isdigit() else size
            with open(part, "ab" if have else "wb") as f:
                f.truncate(have)
                while chunk := resp.read1(CHUNK):  # what has arrived: a killed run keeps it
                    f.write(chunk)
                    on_bytes(len(chunk))
                    self._check_stop(part.name)
        _check_size(part, expected, size)


def _read_all(resp) -> bytes:
    body = resp.read()
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and len(body) < int(length):
        raise ShortBody(f"short body: {len(body)} of {length} bytes")
    return body


def _resume_offset(resp) -> int | None:
    if resp.status != 206:
        return None
    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


def _check_size(part: Path, expected: int | None, size: int | None) -> None:
    got = part.stat().st_size
    if expected is not None and got < expected:
        raise ShortBody(f"connection closed after {got} of {expected} bytes")
    if size is not None and got != size:
        part.unlink()
        raise ShortBody(f"got {got} bytes where the Archive lists {size}; fetching it again")


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in RETRY_STATUS
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    return getattr(exc, "errno", None) not in (errno.ENOSPC, errno.EROFS)  # a full disk does not heal by waiting


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect ({exc.reason})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
