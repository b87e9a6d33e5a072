"""--resume continues only the same run; --overwrite clears the old run's files; the split has its own seed.

A base run (1 epoch, tiny model, 64 synthetic images) is copied for each test. A resume with another seed,
fold or edited data is refused before anything is loaded or written, naming what differs; the same run resumes
even from a copied dataset (new paths and modification times, same content).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from skain.cli import build_parser, config_from_args
from skain.data.schema import DataError
from skain.data.synthetic import make_synthetic
from skain.training import runfolder as runid
from skain.training.loaders import prepare_data
from skain.training.runfolder import LAST_NAME, check_output
from skain.training.train import fit

RUN_FILES = ("last.pt", "best_model.pt", "config.json", "split.csv", "train_history.csv", "metrics.json")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("resume") / "data", 64, seed=5, size=(64, 48))


@pytest.fixture(scope="module")
def base(data, tmp_path_factory) -> Path:
    """A finished 1-epoch run with seed 3 (split seed 42, fold 0)."""
    out = tmp_path_factory.mktemp("base") / "out"
    fit(tiny_config(data, out, epochs=1, seed=3, batch_size=32))
    return out


@pytest.fixture
def run(base, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


def resume(data: Path, out: Path, **train):
    return fit(tiny_config(data, out, **{"epochs": 2, "seed": 3, "batch_size": 32, "resume": True,
                                        "overwrite": False, **train}))


def snapshot(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in RUN_FILES}


def copy_data(data: Path, dest: Path) -> Path:
    """A plain copy: new paths and new modification times, same bytes."""
    shutil.copytree(data, dest, copy_function=shutil.copy)
    return dest


# ------------------------------------------------------------------------------------------- refused resumes
def test_resume_with_another_seed_is_refused_naming_the_seed_and_touching_nothing(data, run):
    before = snapshot(run)
    with pytest.raises(DataError, match=r"cannot resume .*last\.pt: this is not the run it saved \(seed 3 -> 7\)"):
        resume(data, run, seed=7)
    assert snapshot(run) == before  # config.json, split.csv and last.pt are the first run's


def test_resume_with_another_fold_is_refused_naming_fold_and_moved_images(data, run):
    cfg = tiny_config(data, run, epochs=2, seed=3, batch_size=32, resume=True, overwrite=False)
    cfg.data.fold = 1
    with pytest.raises(DataError, match=r"fold 0 -> 1; split differs: \d+ image\(s\) moved \(\S+ (train|val) -> "):
        fit(cfg)


def test_resume_with_another_split_seed_is_refused(data, run):
    cfg = tiny_config(data, run, epochs=2, seed=3, batch_size=32, resume=True, overwrite=False)
    cfg.data.split_seed = 5
    with pytest.raises(DataError, match=r"split_seed 42 -> 5; split differs: \d+ image\(s\) moved"):
        fit(cfg)


def test_resume_with_changed_data_is_refused_naming_each_change(data, run, tmp_path):
    edited = copy_data(data, tmp_path / "edited")
    csv = next((edited / "text").glob("*.csv"))
    table = pd.read_csv(csv, dtype=str)
    first, second = table["image_id"].iloc[0], table["image_id"].iloc[1]
    table.loc[0, "dx"] = "mel" if table.loc[0, "dx"] != "mel" else "nv"
    table.loc[1, "age"] = "33" if table.loc[1, "age"] != "33" else "34"
    dropped = sorted(table["image_id"].iloc[-3:])
    table.iloc[:-3].to_csv(csv, index=False)
    third = table["image_id"].iloc[2]
    Image.new("RGB", (64, 48), (10, 200, 30)).save(edited / "image" / f"{third}.jpg")
    with pytest.raises(DataError) as err:
        resume(edited, run)
    msg = str(err.value)
    assert f"data: 3 row(s) removed ({', '.join(dropped)})" in msg
    assert f"data: 1 label(s) changed ({first})" in msg
    assert f"data: 1 row(s) with changed lesion id or metadata ({second})" in msg
    assert f"data: 1 image file(s) with different content ({third})" in msg


def test_resume_of_a_checkpoint_without_fingerprints_is_refused(data, run):
    ck = torch.load(run / LAST_NAME, weights_only=True)
    del ck[runid.KEY]
    torch.save(ck, run / LAST_NAME)
    with pytest.raises(DataError, match="carries no run fingerprints .* --overwrite"):
        resume(data, run)


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(DataError, match="pass one"):
        check_output(tmp_path, resume=True, overwrite=True)


# ------------------------------------------------------------------------------------------- the same run
def test_the_same_run_resumes_from_a_copied_dataset(data, run, tmp_path):
    moved = copy_data(data, tmp_path / "moved")
    result = resume(moved, run, max_minutes=60.0, patience=9)  # stopping rules may change on resume
    assert result["epochs_trained"] == 2
    history = pd.read_csv(run / "train_history.csv")
    assert history["epoch"].tolist() == [1, 2]
    ck = torch.load(run / LAST_NAME, weights_only=True)
    assert ck[runid.KEY]["config"]["values"]["train.seed"] == 3 and ck["next_epoch"] == 3


def test_fingerprints_equal_for_the_same_run_and_differ_in_words(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "a", seed=3)
    prep = prepare_data(cfg)
    parts = {"train": prep.train_idx, "val": prep.val_idx}
    a = runid.fingerprints(cfg, prep.frame, parts)
    shuffled = prep.frame.sample(frac=1.0, random_state=0)  # row order alone is not a change of data
    assert runid.compare(a, runid.fingerprints(cfg, prep.frame, parts)) == []
    assert runid.data_fingerprint(shuffled)["digest"] == a["data"]["digest"]
    other = tiny_config(data, tmp_path / "b", tmp_path / "cache", seed=4, progress=True, epochs=9)
    other.data.num_workers = 2  # where and how fast: not part of the run
    other.model.drop_rate = 0.1
    swapped = {"train": prep.val_idx, "val": prep.train_idx}
    diffs = runid.compare(a, runid.fingerprints(other, prep.frame, swapped))
    assert diffs[:2] == ["drop_rate 0.3 -> 0.1", "seed 3 -> 4"]
    assert diffs[2].startswith(f"split differs: {len(prep.frame)} image(s) moved")


# ------------------------------------------------------------------------------------------- --overwrite
def test_overwrite_removes_the_old_runs_files_only(data, run, monkeypatch):
    """A new run interrupted before its first checkpoint leaves no stale last.pt to resume by mistake."""
    (run / "notes.txt").write_text("mine")
    (run / ".last.pt.abc123.tmp").write_bytes(b"half")
    (run / "report").mkdir()
    (run / "report" / "report.md").write_text("old")
    (run / "report" / "mine.txt").write_text("mine")
    (run / "fold_1").mkdir()
    (run / "fold_1" / LAST_NAME).write_bytes(b"old")
    (run / "fold2").mkdir()
    (run / "fold2" / "metrics.json").write_text("{}")
    (run / "folder").mkdir()
    (run / "folder" / LAST_NAME).write_bytes(b"not a fold folder: kept")

    import skain.training.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(skain.training.train, "run_phase", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(data, run, epochs=1, seed=8, batch_size=32))
    for name in ("last.pt", "best_model.pt", "metrics.json", "train_history.csv", ".last.pt.abc123.tmp"):
        assert not (run / name).exists(), name
    assert not (run / "fold_1").exists() and not (run / "fold2").exists()
    assert not (run / "report" / "report.md").exists() and (run / "report" / "mine.txt").read_text() == "mine"
    assert (run / "notes.txt").read_text() == "mine" and (run / "folder" / LAST_NAME).exists()
    assert '"seed": 8' in (run / "config.json").read_text()  # the new run's files


def test_overwrite_with_broken_data_keeps_the_old_run(run, tmp_path):
    before = snapshot(run)
    with pytest.raises(DataError, match="data folder not found"):
        fit(tiny_config(tmp_path / "missing", run, epochs=1))
    assert snapshot(run) == before


def test_clear_run_leaves_directories_and_symlink_targets_alone(tmp_path):
    target = tmp_path / "elsewhere.pt"
    target.write_bytes(b"keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "best_model.pt").symlink_to(target)
    (out / "metrics.json").mkdir()
    removed = runid.clear_run(out)
    assert removed == [out / "best_model.pt"]
    assert target.read_bytes() == b"keep" and (out / "metrics.json").is_dir() and out.is_dir()


# ------------------------------------------------------------------------------------------- split seed
def test_split_seed_keeps_the_split_when_only_the_training_seed_changes(data, tmp_path):
    a = prepare_data(tiny_config(data, tmp_path, seed=1))
    b = prepare_data(tiny_config(data, tmp_path, seed=2))
    np.testing.assert_array_equal(a.val_idx, b.val_idx)
    c_cfg = tiny_config(data, tmp_path, seed=1)
    c_cfg.data.split_seed = 7
    assert not np.array_equal(a.val_idx, prepare_data(c_cfg).val_idx)


def test_split_seed_flag_reaches_the_config():
    ns = build_parser().parse_args(["train", "--split-seed", "9", "--seed", "3", "--preset", "cpu"])
    cfg = config_from_args(ns)
    assert cfg.data.split_seed == 9 and cfg.train.seed == 3
