"""ISIC Archive metadata exports (`metadata.csv` from the Archive website, `isic-cli` or `skain download`) read
as skAIn's schema: diagnoses onto the 7 HAM10000 classes, Archive body sites onto HAM10000 localizations, images
grouped by lesion (else patient, else the image itself). The tables below are the documented mapping (README,
"Get the data"); anything they do not name is counted and reported, never guessed.
"""
from __future__ import annotations

import logging
from collections import Counter

import pandas as pd

from skain.data.schema import CLASSES, UNKNOWN, DataError

log = logging.getLogger(__name__)

ARCHIVE_ID = "isic_id"
DIAGNOSIS_LEVELS: tuple[str, ...] = tuple(f"diagnosis_{i}" for i in range(1, 6))

# The Archive's hierarchical diagnosis (diagnosis_1..5, or one colon-separated `diagnosis`): the deepest level
# that is named here decides. "Nevus" covers every nevus subtype below it; a whole category (level 2) is named
# only where all of it belongs to one HAM10000 class.
HIERARCHY_TO_DX: dict[str, str] = {
    "malignant melanocytic proliferations (melanoma)": "mel",    # in situ, invasive, NOS, metastasis
    "nevus": "nv",
    "basal cell carcinoma": "bcc",
    "solar or actinic keratosis": "akiec",
    "squamous cell carcinoma in situ": "akiec",                  # Bowen's disease: HAM10000's intraepithelial carcinoma
    "seborrheic keratosis": "bkl",
    "solar lentigo": "bkl",
    "lichen planus like keratosis": "bkl",
    "pigmented benign keratosis": "bkl",
    "dermatofibroma": "df",
    "benign soft tissue proliferations - vascular": "vasc",      # angiomas, angiokeratomas, pyogenic granulomas...
    "hemorrhagic lesions": "vasc",                               # HAM10000's vasc includes haemorrhage
}

# The Archive's older flat `diagnosis` values (isic-metadata's legacy DiagnosisEnum).
LEGACY_TO_DX: dict[str, str] = {
    "melanoma": "mel",
    "melanoma metastasis": "mel",
    "nevus": "nv",
    "basal cell carcinoma": "bcc",
    "actinic keratosis": "akiec",
    "pigmented benign keratosis": "bkl",
    "seborrheic keratosis": "bkl",
    "solar lentigo": "bkl",
    "lichenoid keratosis": "bkl",
    "dermatofibroma": "df",
    "vascular lesion": "vasc",
    "angioma": "vasc",
    "angiokeratoma": "vasc",
    "pyogenic granuloma": "vasc",
}

# Archive `anatom_site_general` -> HAM10000 `localization`. The Archive's sites are coarser: the torso is split
# front/side/back (HAM10000: chest, abdomen, back, trunk) and the head and neck are one site (HAM10000: face,
# scalp, ear, neck). head/neck -> face: 68% of HAM10000's head-and-neck images are on the face.
SITE_TO_LOCALIZATION: dict[str, str] = {
    "anterior torso": "trunk",
    "lateral torso": "trunk",
    "posterior torso": "back",
    "head/neck": "face",
    "upper extremity": "upper extremity",
    "lower extremity": "lower extremity",
    "palms/soles": "acral",
    "oral/genital": "genital",
}
HAM_LOCALIZATIONS: frozenset[str] = frozenset({
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity", "neck",
    "scalp", "trunk", "upper extremity", UNKNOWN})

MISSING = frozenset({"", "nan", "na", "none", "null", UNKNOWN})


def is_archive_export(frame: pd.DataFrame) -> bool:
    """An Archive export names images by `isic_id` (skAIn's own CSVs by `image_id`)."""
    return ARCHIVE_ID in frame.columns and "image_id" not in frame.columns


def from_archive(frame: pd.DataFrame, source: str, need_dx: bool = True) -> pd.DataFrame:
    """Archive export -> lesion_id,image_id[,dx],age,sex,localization (strings, for schema.clean_metadata).

    Images whose diagnosis is none of the 7 classes are dropped with a count by diagnosis. An export without
    any diagnosis column gives no `dx` (unlabelled: fine for prediction, an error for training).
    """
    cols = {c: _text(frame[c]) for c in frame.columns}
    out = pd.DataFrame({"image_id": cols[ARCHIVE_ID]}, index=frame.index)
    out["lesion_id"] = _group_ids(cols, source)
    out["age"] = _column(cols, source, "age_approx", "age", what="age").str.replace("+", "", regex=False)
    out["sex"] = _column(cols, source, "sex", what="sex")
    out["localization"] = _localization(cols, source)
    dx = _diagnoses(cols, source, need_dx)
    if dx is None:
        return out.reset_index(drop=True)
    out["dx"] = dx
    return _drop_unmapped(out, cols, source).reset_index(drop=True)


def _text(col: pd.Series) -> pd.Series:
    return col.astype(str).str.strip()


def _present(col: pd.Series) -> pd.Series:
    return ~col.str.lower().isin(MISSING)


def _column(cols: dict[str, pd.Series], source: str, *names: str, what: str) -> pd.Series:
    for name in names:
        if name in cols:
            return cols[name]
    log.warning("%s: no %s column: %s is unknown for every image", source, " or ".join(names), what)
    n = len(next(iter(cols.values())))
    return pd.Series([""] * n, index=next(iter(cols.values())).index)


def _group_ids(cols: dict[str, pd.Series], source: str) -> pd.Series:
    """lesion_id, else patient_id, else the image: the split must keep a lesion (or patient) on one side."""
    ids = cols[ARCHIVE_ID]
    for name in ("patient_id", "lesion_id"):  # lesion_id last: it wins wherever it is filled in
        if name in cols:
            ids = cols[name].where(_present(cols[name]), ids)
    if "lesion_id" not in cols:
        fallback = "patient_id" if "patient_id" in cols else "isic_id (each image its own lesion)"
        log.warning("%s: no lesion_id column: images are grouped by %s for the split", source, fallback)
    else:
        n_missing = int((~_present(cols["lesion_id"])).sum())
        if n_missing:
            log.info("%s: %d image(s) without lesion_id are grouped by patient_id, else by themselves",
                     source, n_missing)
    return ids


def _localization(cols: dict[str, pd.Series], source: str) -> pd.Series:
    if "localization" in cols:
        site = cols["localization"].str.lower()
    else:
        site = _column(cols, source, "anatom_site_general", what="body site").str.lower()
    mapped = site.map(lambda s: s if s in HAM_LOCALIZATIONS else SITE_TO_LOCALIZATION.get(s))
    unknown = site[mapped.isna() & ~site.isin(MISSING)]
    if len(unknown):
        counts = ", ".join(f"{v!r} ({n})" for v, n in Counter(unknown).most_common(5))
        log.warning("%s: body site(s) with no HAM10000 equivalent become 'unknown': %s", source, counts)
    return mapped.fillna(UNKNOWN)


def _diagnoses(cols: dict[str, pd.Series], source: str, need_dx: bool) -> pd.Series | None:
    """One dx per row (None where unmapped), or None when the export has no diagnosis at all."""
    if "dx" in cols:
        return cols["dx"].str.lower().where(lambda s: s.isin(CLASSES))
    levels = [c for c in DIAGNOSIS_LEVELS if c in cols]
    if levels:
        table = pd.DataFrame({c: cols[c] for c in levels})
        dx = table.apply(lambda row: _from_levels(list(row)), axis=1)
    elif "diagnosis" in cols:
        dx = cols["diagnosis"].map(_from_flat)
    else:
        dx = None
    labelled = dx is not None and bool(_any_diagnosis(cols).any())
    if labelled:
        return dx
    if need_dx:
        raise DataError(f"{source}: an ISIC Archive export without diagnoses (no diagnosis_1..5, diagnosis or dx "
                        "values; benign_malignant alone does not name a class): training needs them")
    log.info("%s: no diagnoses in this export: images are unlabelled", source)
    return None


def _from_levels(levels: list[str]) -> str | None:
    for name in reversed(levels):
        dx = HIERARCHY_TO_DX.get(name.strip().lower())
        if dx:
            return dx
    return None


def _from_flat(value: str) -> str | None:
    if ":" in value:
        return _from_levels(value.split(":"))
    key = value.strip().lower()
    return LEGACY_TO_DX.get(key) or HIERARCHY_TO_DX.get(key)


def _any_diagnosis(cols: dict[str, pd.Series]) -> pd.Series:
    names = [c for c in ("dx", *DIAGNOSIS_LEVELS, "diagnosis") if c in cols]
    return pd.concat([_present(cols[c]) for c in names], axis=1).any(axis=1)


def _describe(cols: dict[str, pd.Series], i) -> str:
    for name in ("diagnosis", *reversed(DIAGNOSIS_LEVELS), "dx", "benign_malignant"):
        if name in cols and cols[name][i].lower() not in MISSING:
            return cols[name][i]
    return "no diagnosis"


def _drop_unmapped(out: pd.DataFrame, cols: dict[str, pd.Series], source: str) -> pd.DataFrame:
    bad = out.index[out["dx"].isna()]
    if len(bad):
        counts = Counter(_describe(cols, i) for i in bad)
        listed = ", ".join(f"{name} ({n})" for name, n in counts.most_common(8))
        more = f" and {len(counts) - 8} more" if len(counts) > 8 else ""
        log.warning("%s: %d of %d image(s) have a diagnosis outside the 7 classes (%s) and are skipped: %s%s",
                    source, len(bad), len(out), ", ".join(CLASSES), listed, more)
    kept = out.drop(index=bad)
    if kept.empty:
        raise DataError(f"{source}: none of the {len(out)} images has a diagnosis that maps onto the 7 classes "
                        f"({', '.join(CLASSES)})")
    return kept
