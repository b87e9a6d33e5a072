"""The ISIC Archive's public API (v2): image search with cursor paging (`next` URLs), collections, and the named
datasets `skain download` knows. Shapes as the Archive serves them: a page is {count, next, previous, results};
an image is {isic_id, copyright_license, attribution, files: {full: {url, size}}, metadata: {acquisition, clinical}}.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlencode, urljoin, urlparse

from skain.download.http import DownloadError, Http

log = logging.getLogger(__name__)

DEFAULT_API = "https://api.isic-archive.com/api/v2"
API_ENV = "SKAIN_ISIC_API"
PAGE_SIZE = 100
MAX_PAGES = 20_000            # 2 million images: paging that goes on longer is a server bug, not data
ISIC_ID = re.compile(r"^ISIC_\d{7,}$")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

HAM_CITATION = ("Tschandl P, Rosendahl C, Kittler H. The HAM10000 dataset, a large collection of multi-source "
                "dermatoscopic images of common pigmented skin lesions. Sci Data 5, 180161 (2018). "
                "https://doi.org/10.1038/sdata.2018.161")
ISIC2018_CITATION = ("Codella N, Rotemberg V, Tschandl P, et al. Skin Lesion Analysis Toward Melanoma Detection "
                     "2018: A Challenge Hosted by the International Skin Imaging Collaboration (ISIC). "
                     "arXiv:1902.03368 (2019)")
ARCHIVE_CITATION = "ISIC Archive, International Skin Imaging Collaboration: https://www.isic-archive.com"


@dataclass(frozen=True)
class Dataset:
    name: str
    collections: tuple[int, ...]   # ISIC Archive collection ids
    title: str
    expected: int | None           # image count, to warn when the Archive's collection changed
    licence: str | None            # the dataset's own licence, where it has one
    citations: tuple[str, ...]


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("ham10000", (66,), "HAM10000 (= ISIC 2018 Task 3 training set, Archive collection "
            "'Challenge 2018: Task 3: Training')", 10015, "CC BY-NC 4.0", (HAM_CITATION, ISIC2018_CITATION)),
    Dataset("isic2018-test", (67,), "ISIC 2018 Task 3 test set (Archive collection 'Challenge 2018: Task 3: Test')",
            1512, None, (ISIC2018_CITATION, HAM_CITATION)),
    Dataset("isic2018-val", (73,), "ISIC 2018 Task 3 validation set (Archive collection "
            "'Challenge 2018: Task 3: Validation')", 193, None, (ISIC2018_CITATION, HAM_CITATION)),
)}


@dataclass
class ArchiveImage:
    isic_id: str
    url: str
    size: int | None
    licence: str
    attribution: str
    metadata: dict[str, Any] = field(default_factory=dict)   # acquisition + clinical fields, flat

    @property
    def filename(self) -> str:
        suffix = PurePosixPath(urlparse(self.url).path).suffix.lower()
        return self.isic_id + (suffix if suffix in IMAGE_SUFFIXES else ".jpg")


def search_url(base: str, collections: tuple[int, ...] = (), query: str | None = None,
               page_size: int = PAGE_SIZE) -> str:
    params: dict[str, Any] = {"limit": page_size}
    if collections:
        params["collections"] = ",".join(str(c) for c in collections)
    if query:
        params["query"] = query
    return f"{base.rstrip('/')}/images/search/?{urlencode(params)}"


def collection(http: Http, base: str, cid: int) -> dict[str, Any]:
    """{id, name, doi, ...} of one collection; a clear error when the Archive does not know it."""
    try:
        info = http.get_json(f"{base.rstrip('/')}/collections/{cid}/")
    except DownloadError as exc:
        raise DownloadError(f"ISIC Archive collection {cid} could not be read ({exc}); the public collections "
                            "are listed at https://api.isic-archive.com/collections/") from exc
    if not isinstance(info, dict) or "name" not in info:
        raise DownloadError(f"ISIC Archive collection {cid}: unexpected answer {str(info)[:120]}")
    return info


def list_images(http: Http, url: str, limit: int | None = None,
                on_page: Callable[[int, int | None], None] | None = None) -> list[ArchiveImage]:
    """Follow `next` from page to page; stop at `limit` images. on_page(n_new, total_count) reports progress."""
    images: list[ArchiveImage] = []
    seen: set[str] = set()
    while url and (limit is None or len(images) < limit):
        if url in seen or len(seen) >= MAX_PAGES:
            raise DownloadError(f"the Archive's paging does not end (page {url} again after {len(seen)} pages)")
        seen.add(url)
        page = http.get_json(url)
        results = page.get("results") if isinstance(page, dict) else None
        if not isinstance(results, list):
            raise DownloadError(f"GET {url}: expected a page with 'results', got {str(page)[:120]}")
        new = [parse_image(item) for item in results][: None if limit is None else limit - len(images)]
        images.extend(new)
        if on_page:
            on_page(len(new), page.get("count"))
        url = urljoin(url, page["next"]) if page.get("next") else ""
    return images


def parse_image(item: Any) -> ArchiveImage:
    """One search result -> ArchiveImage; refuses ids that are not ISIC ids (they become file names)."""
    isic_id = item.get("isic_id") if isinstance(item, dict) else None
    if not isinstance(isic_id, str) or not ISIC_ID.match(isic_id):
        raise DownloadError(f"the Archive sent an image without a valid isic_id: {str(item)[:120]}")
    full = (item.get("files") or {}).get("full") or {}
    url = full.get("url")
    if not isinstance(url, str) or urlparse(url).scheme not in ("http", "https"):
        raise DownloadError(f"{isic_id}: no http(s) files.full.url in the Archive's answer")
    size = full.get("size")
    meta = item.get("metadata") or {}
    flat = {**(meta.get("acquisition") or {}), **(meta.get("clinical") or {})}
    return ArchiveImage(isic_id, url, size if isinstance(size, int) and size > 0 else None,
                        str(item.get("copyright_license") or ""), str(item.get("attribution") or ""), flat)
