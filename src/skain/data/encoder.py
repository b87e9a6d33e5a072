"""Metadata encoding fit on the training split only: age normalisation and category vocabularies."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .schema import UNKNOWN

log = logging.getLogger(__name__)


@dataclass
class MetadataEncoder:
    age_median: float = 50.0
    age_mean: float = 50.0
    age_std: float = 1.0
    sex_vocab: list[str] = field(default_factory=lambda: [UNKNOWN])
    site_vocab: list[str] = field(default_factory=lambda: [UNKNOWN])

    @classmethod
    def fit(cls, train: pd.DataFrame) -> "MetadataEncoder":
        """Statistics and vocabularies from the training rows; `unknown` is always index 0."""
        ages = pd.to_numeric(train["age"], errors="coerce").dropna()
        median = float(ages.median()) if len(ages) else 50.0
        filled = pd.to_numeric(train["age"], errors="coerce").fillna(median)
        std = float(filled.std(ddof=0)) if len(filled) > 1 else 1.0
        return cls(age_median=median, age_mean=float(filled.mean()), age_std=std if std > 1e-6 else 1.0,
                   sex_vocab=_vocab(train["sex"]), site_vocab=_vocab(train["localization"]))

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (normalised age float32, sex index int64, site index int64); unseen values map to `unknown`."""
        age = pd.to_numeric(frame["age"], errors="coerce").fillna(self.age_median).to_numpy(np.float64)
        age = ((age - self.age_mean) / self.age_std).astype(np.float32)
        return (age, _lookup(self.sex_vocab, frame["sex"], "sex"),
                _lookup(self.site_vocab, frame["localization"], "localization"))

    def encode_one(self, age: float | None, sex: str | None, site: str | None) -> tuple[float, int, int]:
        frame = pd.DataFrame({"age": [age], "sex": [(sex or UNKNOWN).strip().lower()],
                              "localization": [(site or UNKNOWN).strip().lower()]})
        a, s, l = self.transform(frame)
        return float(a[0]), int(s[0]), int(l[0])

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "MetadataEncoder":
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
