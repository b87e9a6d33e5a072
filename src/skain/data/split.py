"""Lesion-grouped, class-stratified train/validation split: no lesion ever appears on both sides."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from skain.data.schema import DataError


class LeakageError(RuntimeError):
    """A lesion appears in more than one split."""


def lesion_split(frame: pd.DataFrame, folds: int = 5, fold: int = 0, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Return (train_idx, val_idx) for fold `fold` of a StratifiedGroupKFold on lesion_id."""
    if folds < 2:
        raise DataError(f"--folds must be at least 2 (got {folds})")
    if not 0 <= fold < folds:
        raise DataError(f"--fold must be in 0..{folds - 1} (got {fold})")
    n_lesions = frame["lesion_id"].nunique()
    if n_lesions < folds:
        raise DataError(f"only {n_lesions} distinct lesion(s): need at least {folds} for {folds}-fold splitting")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(np.zeros(len(frame)), frame["dx"].to_numpy(), frame["lesion_id"].to_numpy()))
    train_idx, val_idx = splits[fold]
    check_no_overlap(frame.iloc[train_idx], frame.iloc[val_idx])
    return np.sort(train_idx), np.sort(val_idx)


def holdout_split(frame: pd.DataFrame, folds: int = 5, fold: int = 0, seed: int = 42,
                  inner_folds: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train_idx, val_idx, test_idx): fold `fold` of the lesion-grouped split is a test set that chooses
    nothing; validation (early stopping, calibration, thresholds) is one inner lesion-grouped fold of the
    rest. With 5 outer and 8 inner folds: 70% train, 10% validation, 20% test."""
    rest, test_idx = lesion_split(frame, folds, fold, seed)
    inner_train, inner_val = lesion_split(frame.iloc[rest].reset_index(drop=True), inner_folds, 0, seed + 1)
    train_idx, val_idx = rest[inner_train], rest[inner_val]
    check_no_overlap(frame.iloc[train_idx], frame.iloc[val_idx], frame.iloc[test_idx])
    return np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)


def check_no_overlap(*parts: pd.DataFrame) -> None:
    """Fail loudly when any lesion_id or image_id is shared between parts."""
    for col in ("lesion_id", "image_id"):
        seen: dict[str, int] = {}
        for i, part in enumerate(parts):
            for value in part[col].unique():
                if value in seen and seen[value] != i:
                    raise LeakageError(f"{col} {value!r} appears in split {seen[value]} and split {i}: "
                                       "the validation score would be inflated")
                seen[value] = i


def split_table(frame: pd.DataFrame, train_idx: np.ndarray, val_idx: np.ndarray,
                test_idx: np.ndarray | None = None) -> pd.DataFrame:
    """The split as saved to the output folder: image_id, lesion_id, dx, split (train/val/test)."""
    split = np.array(["train"] * len(frame), dtype=object)
    split[val_idx] = "val"
    if test_idx is not None:
        split[test_idx] = "test"
    return frame[["image_id", "lesion_id", "dx"]].assign(split=split)
