"""The HAM10000 metadata schema: reading, cleaning and validating the CSV before any work is done."""
from __future__ import annotations

import codecs
import csv
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}
MALIGNANT: tuple[str, ...] = ("akiec", "bcc", "mel")
META_COLUMNS: tuple[str, ...] = ("age", "sex", "localization")
TRAIN_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")
UNKNOWN = "unknown"
MAX_AGE = 120.0
BLANK = ("", "none", "null", "nan", "na", UNKNOWN)  # how one field left empty looks, typed by a person


# ------------------------------------------------------------------------------------------- one person's fields
def parse_age(raw: object) -> float | None:
    """One age as a person gives it (form text or a number) -> years, or None when left out (blank, NaN).
    Anything else that is not a number of years from 0 to MAX_AGE is a ValueError saying so."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in BLANK):
        return None
    try:
        age = float(raw)  # type: ignore[arg-type]  # anything float() takes; the rest is refused below
    except (TypeError, ValueError):
        raise ValueError(f"age must be a number of years, got {str(raw)[:40]!r}") from None
    if isinstance(raw, float) and np.isnan(raw):
        return None
    if not np.isfinite(age) or not 0 <= age <= MAX_AGE:
        raise ValueError(f"age must be between 0 and {MAX_AGE:g} years, got {str(raw)[:40]!r}")
    return age


def parse_choice(name: str, raw: object, vocabulary: list[str]) -> str:
    """One sex or body site as a person gives it -> 'unknown' when left empty, else one of the model's vocabulary
    (any case); anything else is a ValueError naming the choices."""
    value = "" if raw is None else str(raw).strip().lower()
    if value in BLANK:
        return UNKNOWN
    if value not in vocabulary:
        raise ValueError(f"unknown {name} {str(raw)[:40]!r}; this model knows: {', '.join(vocabulary)} "
                         "(leave it empty when not known)")
    return value


class DataError(ValueError):
    """Input data that cannot be used as it is; the message says what to fix."""


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a metadata CSV: UTF-8 (with or without BOM), UTF-16 (Excel "Unicode text") or latin-1, with
    comma, semicolon (European Excel) or tab separators. Rows with more fields than the header stop here."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    text = _decode(path.read_bytes(), path)
    if not text.strip():
        raise DataError(f"{path}: the CSV is empty (no header row)")
    sep = _separator(text)
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, sep=sep)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: the CSV is empty (no header row)") from exc
    except pd.errors.ParserError as exc:
        raise DataError(_ragged_message(path, text, sep) or f"{path}: not a readable CSV "
                        f"({str(exc).strip().splitlines()[0]})") from exc
    if not isinstance(frame.index, pd.RangeIndex):  # pandas turns surplus leading fields into an index
        raise DataError(_ragged_message(path, text, sep) or f"{path}: rows do not match the header")
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if frame.empty:
        raise DataError(f"{path}: the CSV has a header but no rows")
    return frame


def _decode(raw: bytes, path: Path) -> str:
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    if b"\0" in raw:
        raise DataError(f"{path}: not a text CSV (it contains binary data; an Excel .xlsx file?). "
                        "Save it as CSV (comma-separated, UTF-8)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.info("%s is not UTF-8; reading it as latin-1", path)
        return raw.decode("latin-1")


def _separator(text: str) -> str:
    header = text.lstrip().splitlines()[0]
    counts = {sep: header.count(sep) for sep in (",", ";", "\t")}
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] else ","


def _ragged_message(path: Path, text: str, sep: str) -> str | None:
    rows = csv.reader(io.StringIO(text), delimiter=sep)
    header = next(rows, [])
    for n, row in enumerate(rows, start=2):
        if len(row) > len(header):
            return (f"{path}: row {n} has {len(row)} fields but the header has {len(header)}; "
                    "quote fields that contain the separator, or remove the extra fields")
    return None


def clean_metadata(frame: pd.DataFrame, source: str, require: tuple[str, ...] = TRAIN_COLUMNS,
                   warn_absent: bool = True) -> pd.DataFrame:
    """Check required columns and normalise image_id, dx, age, sex and localization.

    An absent age/sex/localization column is a warning that names it (every row is then unknown), never silent.
    Never keeps `dx_type`: it records how the label was confirmed and so leaks it.
    """
    missing = [c for c in require if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing required column(s) {', '.join(missing)}; "
                        f"found {', '.join(frame.columns)}. Expected at least {', '.join(require)}")
    absent = [c for c in META_COLUMNS if c not in frame.columns]
    if absent and warn_absent:
        log.warning("%s: no %s column(s): unknown for every row (found %s)", source, ", ".join(absent),
                    ", ".join(frame.columns))
    out = pd.DataFrame({"image_id": frame["image_id"].astype(str).str.strip()})
    out.index = frame.index
    _check_image_ids(out["image_id"], source)
    out["lesion_id"] = (frame["lesion_id"].astype(str).str.strip() if "lesion_id" in frame.columns
                        else out["image_id"])
    out.loc[out["lesion_id"] == "", "lesion_id"] = out["image_id"]
    if "dx" in frame.columns and ("dx" in require or frame["dx"].astype(str).str.strip().ne("").any()):
        out["dx"] = _clean_dx(frame["dx"], source)  # an all-empty dx column in a prediction CSV means unlabelled
    out["age"] = _clean_age(frame.get("age"), source, len(out))
    for col in ("sex", "localization"):
        out[col] = _clean_category(frame.get(col), len(out), out.index)
    return out.reset_index(drop=True)


def _row(i: int) -> int:
    return int(i) + 2  # 1-based, after the header line


def _check_image_ids(ids: pd.Series, source: str) -> None:
    empty = ids[ids == ""]
    if len(empty):
        raise DataError(f"{source}: empty image_id on row(s) {', '.join(str(_row(i)) for i in empty.index[:5])}")
    bad = ids[ids.str.contains(r"[/\\]|^\.\.?$", regex=True)]
    if len(bad):
        raise DataError(f"{source}: image_id must be a file name, not a path: row {_row(bad.index[0])} "
                        f"has {bad.iloc[0]!r}")
    stems = ids.str.replace(r"\.(jpe?g|png)$", "", case=False, regex=True)  # ISIC_1 and ISIC_1.jpg: one file
    dup = stems[stems.duplicated(keep=False)]
    if len(dup):
        first = dup.iloc[0]
        rows = ", ".join(str(_row(i)) for i in dup[dup == first].index)
        raise DataError(f"{source}: duplicate image_id {first!r} on rows {rows} "
                        f"({dup.nunique()} duplicated id(s) in all); each image must appear once")


def _clean_dx(dx: pd.Series, source: str) -> pd.Series:
    dx = dx.astype(str).str.strip().str.lower()
    bad = dx[~dx.isin(CLASSES)]
    if len(bad):
        values = ", ".join(repr(v) for v in bad.unique()[:5])
        raise DataError(f"{source}: unknown dx label(s) {values} (first on row {_row(bad.index[0])}, "
                        f"{len(bad)} row(s)); allowed: {', '.join(CLASSES)}")
    return dx


def _clean_age(age: pd.Series | None, source: str, n: int) -> pd.Series:
    if age is None:
        return pd.Series(np.full(n, np.nan))
    text = age.astype(str).str.strip()
    values = pd.to_numeric(text.where(~text.str.lower().isin(["", "nan", "na", "none", UNKNOWN])),
                           errors="coerce")
    bad = text[values.isna() & ~text.str.lower().isin(["", "nan", "na", "none", UNKNOWN])]
    if len(bad):
        raise DataError(f"{source}: age must be a number of years: row {_row(bad.index[0])} has "
                        f"{bad.iloc[0]!r} ({len(bad)} row(s)); leave it empty when unknown")
    out_of_range = values[(values < 0) | (values > MAX_AGE)]
    if len(out_of_range):
        raise DataError(f"{source}: age must be between 0 and {MAX_AGE:g}: row "
                        f"{_row(out_of_range.index[0])} has {out_of_range.iloc[0]:g} "
                        f"({len(out_of_range)} row(s))")
    return values.astype(float)


def _clean_category(col: pd.Series | None, n: int, index: pd.Index) -> pd.Series:
    if col is None:
        return pd.Series([UNKNOWN] * n, index=index)
    col = col.astype(str).str.strip().str.lower()
    return col.where(~col.isin(["", "nan", "na", "none", "null"]), UNKNOWN)
