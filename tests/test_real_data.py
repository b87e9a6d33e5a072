"""A short real-data run: the cpu preset (offline ImageNet Lite0) on a lesion-grouped HAM10000 subset."""
import json

import pandas as pd
import pytest

from skain.data.schema import CLASSES
from skain.training.config import build_config
from skain.training.train import fit


@pytest.mark.slow
def test_cpu_preset_learns_real_lesions_on_a_small_subset(shared_data, tmp_path):
    meta = pd.read_csv(shared_data / "metadata.csv")
    lesions = meta.drop_duplicates("lesion_id").groupby("dx", group_keys=False).apply(
        lambda g: g.sample(min(len(g), 45), random_state=0))["lesion_id"]
    subset = meta[meta["lesion_id"].isin(lesions)]
    subset.to_csv(tmp_path / "subset.csv", index=False)
    cfg = build_config("cpu", flags={
        "data": {"csv": str(tmp_path / "subset.csv"), "images": [str(shared_data / "images")],
                 "cache_dir": str(tmp_path / "cache"), "folds": 4},
        "train": {"output": str(tmp_path / "out"), "frozen_epochs": 1, "epochs": 2, "progress": False,
                  "warmup_epochs": 0.0}})
    summary = fit(cfg)
    val = summary["validation"]
    assert summary["data"]["synthetic"] is False and set(summary["data"]["class_counts"]) == set(CLASSES)
    assert val["macro_auc"] > 0.70, val  # chance is 0.5
    assert val["balanced_accuracy"] > 0.25, val  # chance is 1/7
    split = pd.read_csv(tmp_path / "out" / "split.csv")
    assert split.groupby("lesion_id")["split"].nunique().max() == 1
    assert json.loads((tmp_path / "out" / "vocabularies.json").read_text())["sex"][0] == "unknown"
