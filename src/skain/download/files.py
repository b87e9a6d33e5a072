"""What a download leaves on disk: images/, metadata.csv (the Archive's export format, which skAIn reads as the
`isic` layout), SHA256SUMS, LICENSE.txt and ATTRIBUTION.txt. Every file is written whole (temporary + rename)."""
from __future__ import annotations

import csv
import io
import logging
import shutil
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from skain.download.archive import ARCHIVE_CITATION, ArchiveImage
from skain.download.http import DownloadError, sha256_file
from skain.fileio import atomic_write

log = logging.getLogger(__name__)

SUMS = "SHA256SUMS"
DISK_MARGIN = 64 * 2**20
LICENCE_URLS = {
    "CC-0": "https://creativecommons.org/publicdomain/zero/1.0/",
    "CC-BY": "https://creativecommons.org/licenses/by/4.0/",
    "CC-BY-NC": "https://creativecommons.org/licenses/by-nc/4.0/",
}


def write_text(path: Path, text: str) -> None:
    """A text file written whole (the bundle writer's temporary file + fsync + rename)."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def read_sums(folder: Path) -> dict[str, str]:
    """file name -> sha256 from an earlier complete download (empty when there is none)."""
    path = folder / SUMS
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) == 64 and name:
            sums[Path(name).name] = digest
    return sums


def write_sums(folder: Path, sums: dict[str, str]) -> None:
    write_text(folder / SUMS, "".join(f"{sums[n]}  images/{n}\n" for n in sorted(sums)))


def plan(images: list[ArchiveImage], image_dir: Path, known: dict[str, str]) -> tuple[dict[str, str], list]:
    """Split into (done: name -> sha256, todo). A file counts as done only if its size is the Archive's and, where
    an earlier run recorded its checksum, the checksum matches; anything else is fetched again."""
    done: dict[str, str] = {}
    todo: list[ArchiveImage] = []
    for img in images:
        path = image_dir / img.filename
        if path.is_file() and (img.size is None or path.stat().st_size == img.size):
            digest = sha256_file(path)
            if known.get(img.filename, digest) == digest:
                done[img.filename] = digest
                continue
            log.warning("%s: checksum differs from %s; fetching it again", path, SUMS)
        elif path.is_file():
            log.warning("%s: %d bytes where the Archive lists %s; fetching it again", path, path.stat().st_size,
                        img.size)
        todo.append(img)
    return done, todo


def part_bytes(images: list[ArchiveImage], image_dir: Path) -> int:
    parts = (image_dir / (img.filename + ".part") for img in images)
    return sum(p.stat().st_size for p in parts if p.is_file())


def check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need + DISK_MARGIN > free:
        raise DownloadError(f"not enough disk space in {folder}: the download needs {human(need)} "
                            f"(+ {human(DISK_MARGIN)} margin) and {human(free)} are free")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def metadata_csv(images: list[ArchiveImage]) -> str:
    """The Archive's own export format: isic_id, attribution, copyright_license, then every metadata field."""
    fields = sorted({k for img in images for k in img.metadata})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["isic_id", "attribution", "copyright_license", *fields])
    for img in images:
        writer.writerow([img.isic_id, img.attribution, img.licence,
                         *("" if img.metadata.get(k) is None else img.metadata[k] for k in fields)])
    return out.getvalue()


def attribution_text(images: list[ArchiveImage]) -> str:
    """Per-contributor attribution (most images first), with the licences each contributor's images carry."""
    by_source: dict[str, Counter] = {}
    for img in images:
        by_source.setdefault(img.attribution or "Anonymous", Counter())[img.licence or "unknown"] += 1
    order = sorted(by_source, key=lambda a: (a == "Anonymous", -sum(by_source[a].values()), a))
    lines = ["Images from the ISIC Archive (https://www.isic-archive.com), by contributor.",
             "Each image's own licence and attribution are in metadata.csv (copyright_license, attribution).", ""]
    for source in order:
        lic = ", ".join(f"{n} {name}" for name, n in by_source[source].most_common())
        lines.append(f"{source}: {sum(by_source[source].values())} image(s) ({lic})")
    return "\n".join(lines) + "\n"


def licence_text(title: str, source: str, images: list[ArchiveImage], dataset_licence: str | None,
                 citations: tuple[str, ...]) -> str:
    counts = Counter(img.licence or "unknown" for img in images)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [f"{title}", f"Downloaded {when} by `skain download` from {source}: {len(images)} image(s).", ""]
    if dataset_licence:
        lines += [f"Dataset licence: {dataset_licence} (non-commercial use; give credit). "
                  f"{LICENCE_URLS['CC-BY-NC']}", ""]
    lines.append("Licences of the images (per image in metadata.csv, column copyright_license):")
    lines += [f"  {name}: {n} image(s)  {LICENCE_URLS.get(name, '')}".rstrip() for name, n in counts.most_common()]
    lines += ["", "Attribution: see ATTRIBUTION.txt. Cite when you use these data:"]
    lines += [f"  - {c}" for c in (*citations, ARCHIVE_CITATION)]
    lines += ["", "Research and education only; not for diagnosing anyone."]
    return "\n".join(lines) + "\n"
