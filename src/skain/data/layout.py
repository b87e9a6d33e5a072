"""Find the metadata CSV and image folders in the layouts users actually have, and match images to rows."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from skain.data import isic
from skain.data.images import FORMATS_TEXT, IMAGE_SUFFIXES
from skain.data.schema import TRAIN_COLUMNS, DataError, clean_metadata, read_csv

log = logging.getLogger(__name__)



@dataclass
class Source:
    csv: Path | None
    image_dirs: list[Path]
    layout: str


def discover(data: str | Path | None = None, csv: str | Path | None = None,
             images: list[str] | None = None, default: str = "dataset_train") -> Source:
    """Resolve --data / --csv / --images into one CSV and a list of image folders.

    Layouts: seed (`image/` + `text/*.csv`, the largest CSV wins), official HAM10000 download
    (`HAM10000_metadata.csv` + `HAM10000_images_part_*`), or a folder with one CSV and images (`isic` when that
    CSV is an ISIC Archive export, as `skain download` writes: `metadata.csv` + `images/`).
    """
    image_dirs = [Path(p) for p in images or []]
    for d in image_dirs:
        if not d.is_dir():
            raise DataError(f"image folder not found: {d}")
    if csv is not None:
        if not image_dirs and data is None:
            image_dirs = [Path(csv).resolve().parent]
        if data is None:
            return Source(Path(csv), image_dirs, "explicit")
    root = Path(data if data is not None else default)
    if not root.is_dir():
        hint = ("" if data is not None else
                " (no --data given, so ./" + default + " was tried; generate a demo set with `skain synth`)")
        raise DataError(f"data folder not found: {root}{hint}")
    found = _layout_of(root)
    return Source(Path(csv) if csv is not None else found.csv, image_dirs or found.image_dirs, found.layout)


def _layout_of(root: Path) -> Source:
    if (root / "image").is_dir() or (root / "text").is_dir():
        return Source(_largest_csv(root / "text"), [root / "image"], "seed")
    official = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("ham10000_images"))
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and _has_images(p))
    meta = root / "HAM10000_metadata.csv"
    if meta.is_file() or official:  # image folders renamed after unzipping (images/, part_2/) are found too
        images = official or ([root] if _has_images(root) else []) + subdirs or [root]
        return Source(meta if meta.is_file() else _largest_csv(root), images, "official")
    csv = _largest_csv(root, required=False)
    return Source(csv, subdirs or [root], "isic" if csv is not None and _is_archive_csv(csv) else "folder")


def _is_archive_csv(path: Path) -> bool:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = [c.strip().strip('"').lower() for c in f.readline().split(",")]
    return isic.ARCHIVE_ID in header and "image_id" not in header


def _largest_csv(folder: Path, required: bool = True) -> Path | None:
    csvs = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not csvs:
        if required:
            raise DataError(f"no CSV file found in {folder}; put the metadata CSV there or pass --csv FILE")
        return None
    largest = max(csvs, key=lambda p: p.stat().st_size)
    if len(csvs) > 1:
        log.info("using the largest CSV %s (of %d in %s)", largest.name, len(csvs), folder)
    return largest


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file())


def index_images(image_dirs: list[Path]) -> dict[str, Path]:
    """Map image stem -> file for every image file (IMAGE_SUFFIXES, any case) directly inside the folders."""
    index: dict[str, Path] = {}
    for folder in image_dirs:
        if not folder.is_dir():
            raise DataError(f"image folder not found: {folder}")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                index.setdefault(path.stem, path)
    return index


def attach_paths(frame: pd.DataFrame, index: dict[str, Path], source: str,
                 skip_missing: bool = False, folders: list[Path] | None = None) -> pd.DataFrame:
    """Add a `path` column; stop (or with skip_missing, warn and drop) when images are missing (the message
    names the `folders` searched)."""
    folders = folders or []
    stems = frame["image_id"].map(lambda s: Path(s).stem if Path(s).suffix.lower() in IMAGE_SUFFIXES else s)
    paths = stems.map(index)
    missing = frame.loc[paths.isna(), "image_id"]
    if len(missing):
        first = ", ".join(missing.iloc[:5])
        msg = (f"{source}: {len(missing)} of {len(frame)} image(s) not found in the image folder(s) "
               f"{', '.join(map(str, folders)) or '(none)'} (first: {first})")
        if not skip_missing:
            raise DataError(msg + "; fix the paths, or pass --skip-missing to train on the rest")
        log.warning("%s; skipping them (--skip-missing)", msg)
    found = paths.notna()
    out = frame[found].assign(path=paths[found].map(str)).reset_index(drop=True)
    if out.empty:
        raise DataError(f"{source}: none of the {len(frame)} images listed in the CSV were found")
    return out


def load_table(src: Source, require: tuple[str, ...] = TRAIN_COLUMNS, skip_missing: bool = False) -> pd.DataFrame:
    """CSV (or, without one, the images alone) -> validated frame with a `path` column."""
    index = index_images(src.image_dirs)
    if src.csv is None:
        if "dx" in require:
            raise DataError(f"no metadata CSV found for {', '.join(map(str, src.image_dirs))}; "
                            "training needs lesion_id, image_id and dx: pass --csv FILE")
        if not index:
            raise DataError(f"no images ({FORMATS_TEXT}) in {', '.join(map(str, src.image_dirs))}")
        frame = pd.DataFrame({"image_id": list(index)})
        frame = clean_metadata(frame, "images", require=("image_id",), warn_absent=False)  # no CSV at all
        return attach_paths(frame, index, "images", folders=src.image_dirs)
    raw = read_csv(src.csv)
    if isic.is_archive_export(raw):
        raw = isic.from_archive(raw, str(src.csv), need_dx="dx" in require)
    frame = clean_metadata(raw, str(src.csv), require)
    return attach_paths(frame, index, str(src.csv), skip_missing, src.image_dirs)
