"""Metadata encoding fit on the training split only: age normalisation and category vocabularies.

A field the user left empty is "missing", and the network is told so: age gets a second input (1 = missing)
instead of silently becoming the training median, and sex/site use the vocabulary's first entry, `unknown`,
which training also feeds with randomly blanked fields (`MetadataDropout`), so it stands for "not given"
rather than for HAM10000's own `unknown` rows (nearly all nevi). Age 0 is a placeholder in HAM10000
(39 rows, 30 of them nevi) and is treated as missing.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from skain.data.schema import UNKNOWN

log = logging.getLogger(__name__)


@dataclass
class MetadataEncoder:
    age_median: float = 50.0
    age_mean: float = 50.0
    age_std: float = 1.0
    sex_vocab: list[str] = field(default_factory=lambda: [UNKNOWN])
    site_vocab: list[str] = field(default_factory=lambda: [UNKNOWN])
    missing_flag: bool = False       # age -> (normalised age, 1 if missing); False in bundles before 0.2
    zero_age_missing: bool = False   # age 0 counts as missing (a HAM10000 placeholder)

    @classmethod
    def fit(cls, train: pd.DataFrame) -> MetadataEncoder:
        """Statistics (over the ages actually given) and vocabularies from the training rows; `unknown` is
        always index 0."""
        ages = pd.to_numeric(train["age"], errors="coerce")
        given = ages[ages > 0].dropna()
        median = float(given.median()) if len(given) else 50.0
        std = float(given.std(ddof=0)) if len(given) > 1 else 1.0
        return cls(age_median=median, age_mean=float(given.mean()) if len(given) else median,
                   age_std=std if std > 1e-6 else 1.0, sex_vocab=_vocab(train["sex"]),
                   site_vocab=_vocab(train["localization"]), missing_flag=True, zero_age_missing=True)

    @property
    def age_width(self) -> int:
        """Columns of the age input: (age,) or (age, missing)."""
        return 2 if self.missing_flag else 1

    def age_missing(self, frame: pd.DataFrame) -> np.ndarray:
        age = pd.to_numeric(frame["age"], errors="coerce")
        missing = age.isna()
        if self.zero_age_missing:
            missing |= age <= 0
        return missing.to_numpy()

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (age float32 of shape (n, age_width), sex index int64, site index int64); unseen values map to
        `unknown`. A missing age is the training median (older bundles) or the mean plus a missing flag."""
        missing = self.age_missing(frame)
        age = pd.to_numeric(frame["age"], errors="coerce").to_numpy(np.float64)
        age = np.where(missing, self.age_mean if self.missing_flag else self.age_median, age)
        age = ((age - self.age_mean) / self.age_std).astype(np.float32)[:, None]
        if self.missing_flag:
            age = np.concatenate([age, missing.astype(np.float32)[:, None]], axis=1)
        return (age, _lookup(self.sex_vocab, frame["sex"], "sex"),
                _lookup(self.site_vocab, frame["localization"], "localization"))

    def blank(self, age: np.ndarray, sex: np.ndarray, site: np.ndarray, fields: set[str]) -> tuple:
        """Encoded metadata with the named fields ('age', 'sex', 'site') set to missing, as if left empty."""
        unknown = set(fields) - set(FIELDS)
        if unknown:  # e.g. the CSV's column name "localization": blanking nothing silently would be worse
            raise ValueError(f"cannot blank {', '.join(sorted(unknown))}: the metadata inputs are {', '.join(FIELDS)}")
        age, sex, site = (np.array(age, dtype=np.float32), np.array(sex, dtype=np.int64),
                          np.array(site, dtype=np.int64))
        if "age" in fields:
            age[..., 0] = 0.0 if self.missing_flag else (self.age_median - self.age_mean) / self.age_std
            if self.missing_flag:
                age[..., 1] = 1.0
        if "sex" in fields:
            sex[...] = 0
        if "site" in fields:
            site[...] = 0
        return age, sex, site

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> MetadataEncoder:
        return cls(**state)

    def vocabularies(self) -> dict[str, list[str]]:
        return {"sex": list(self.sex_vocab), "localization": list(self.site_vocab)}

    def age_stats(self) -> dict[str, float]:
        return {"median": self.age_median, "mean": self.age_mean, "std": self.age_std}


def _vocab(col: pd.Series) -> list[str]:
    values = sorted(set(col.astype(str)) - {UNKNOWN})
    return [UNKNOWN] + values


def _lookup(vocab: list[str], col: pd.Series, name: str) -> np.ndarray:
    """Values -> vocabulary indices; a value never seen in training becomes `unknown` (0), with a warning
    naming it so a typo or another dataset's spelling does not pass unnoticed."""
    index = {v: i for i, v in enumerate(vocab)}
    codes = np.array([index.get(str(v), -1) for v in col], dtype=np.int64)
    if (codes < 0).any():
        unseen = pd.Series(np.asarray(col, dtype=str)[codes < 0]).value_counts()
        shown = ", ".join(f"{v!r} ({n} row(s))" for v, n in unseen.head(5).items())
        log.warning("%s value(s) not seen in training, used as %r: %s; known: %s", name, UNKNOWN, shown,
                    ", ".join(vocab))
    return np.maximum(codes, 0)


FIELDS = ("age", "sex", "site")


class MetadataDropout:
    """Training-time blanking, so that "not given" is a value the network has learnt, not a bias.

    With probability `rate` every field is blanked at once (what a user who skips the form sends);
    otherwise each field is blanked independently with probability `rate`. Randomness comes from torch's
    generator, which DataLoader seeds per worker and the training loop per epoch.
    """

    def __init__(self, encoder: MetadataEncoder, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"metadata dropout rate must be in [0, 1) (got {rate})")
        self.encoder, self.rate = encoder, rate

    def __call__(self, age: np.ndarray, sex: np.ndarray, site: np.ndarray) -> tuple:
        import torch
        if self.rate <= 0:
            return age, sex, site
        draws = torch.rand(4).tolist()
        fields = set(FIELDS) if draws[0] < self.rate else {f for f, d in zip(FIELDS, draws[1:]) if d < self.rate}
        return self.encoder.blank(age, sex, site, fields) if fields else (age, sex, site)
