"""Outputs other users can read: atomic writes take the user's umask (0644 by default) instead of mkstemp's
0600, an existing file keeps its mode, PNG reports are written atomically too, and the training lock is 0644."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skain.fileio import atomic_json, atomic_write
from skain.modelfile.bundle import atomic_torch_save


@pytest.fixture()
def umask():
    """Set the process umask for one test, then restore it."""
    saved = os.umask(0o022)

    def use(mask: int) -> None:
        os.umask(mask)
    yield use
    os.umask(saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_outputs_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write(tmp_path / "a.csv", lambda fh: fh.write(b"x\n"))
    atomic_json({"a": 1}, tmp_path / "metrics.json")
    atomic_torch_save({"w": 1}, tmp_path / "best_model.pt")
    assert {mode(tmp_path / n) for n in ("a.csv", "metrics.json", "best_model.pt")} == {expected}


def test_rewriting_a_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "best_model.pt"
    atomic_write(path, lambda fh: fh.write(b"1"))
    os.chmod(path, 0o600)  # the owner chose to keep it private
    atomic_write(path, lambda fh: fh.write(b"2"))
    assert mode(path) == 0o600 and path.read_bytes() == b"2"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, umask):
    path = tmp_path / "metrics.json"
    atomic_json({"v": 1}, path)

    def broken(fh):
        fh.write(b'{"v": ')
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text().strip().startswith("{") and '"v": 1' in path.read_text() and not leftovers(tmp_path)


def report_inputs():
    from skain.evaluation.evaluate import evaluate
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(7), 4)
    probs = rng.dirichlet(np.ones(7), len(labels))
    return evaluate(labels, probs), labels, probs


def test_report_files_are_readable_by_others(tmp_path, umask):
    from skain.evaluation.report import write_report
    metrics, labels, probs = report_inputs()
    folder = write_report(metrics, labels, probs, tmp_path / "report")
    names = ("metrics.json", "confusion_matrix.png", "roc_curves.png", "report.md")
    assert {n: mode(folder / n) for n in names} == {n: 0o644 for n in names}
    assert (folder / "roc_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_reports_are_written_atomically(tmp_path, monkeypatch, umask):
    """A figure that fails half-way through saving must leave the previous PNG whole and no partial file."""
    from matplotlib.figure import Figure

    from skain.evaluation.report import write_report
    from skain.trust.calibration import plot_reliability
    metrics, labels, probs = report_inputs()
    folder = write_report(metrics, labels, probs, tmp_path / "report")
    plot_reliability(np.log(probs), labels, 1.0, folder / "reliability.png")
    before = {n: (folder / n).read_bytes() for n in ("confusion_matrix.png", "roc_curves.png", "reliability.png")}

    def crash(self, fname, *args, **kwargs):
        if hasattr(fname, "write"):
            fname.write(b"\x89PNG half")
        else:
            Path(fname).write_bytes(b"\x89PNG half")
        raise RuntimeError("killed while saving")
    monkeypatch.setattr(Figure, "savefig", crash)
    with pytest.raises(RuntimeError, match="killed"):
        write_report(metrics, labels, probs, folder)
    with pytest.raises(RuntimeError, match="killed"):
        plot_reliability(np.log(probs), labels, 1.0, folder / "reliability.png")
    assert {n: (folder / n).read_bytes() for n in before} == before
    assert not leftovers(folder)


def test_the_training_lock_is_created_0644(tmp_path, umask):
    from skain.training.runfolder import RunLock
    with RunLock(tmp_path) as lock:
        assert mode(lock.path) == 0o644 and lock.path.read_text() == str(os.getpid())
    assert not lock.path.exists()


def test_runs_share_a_validation_split_only_when_their_split_csvs_name_the_same_validation_images(tmp_path):
    """One check for `skain ensemble`'s wording and `skain calibrate` on an ensemble folder: split.csv decides."""
    from skain.training.runfolder import share_validation, validation_ids

    def run(name: str, val: list[str]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        ids = ["a", "b", "c", "d"]
        pd.DataFrame({"image_id": ids, "split": ["val" if i in val else "train" for i in ids]}).to_csv(
            folder / "split.csv", index=False)
        return folder

    seed42, seed7, fold1 = run("seed42", ["a", "b"]), run("seed7", ["b", "a"]), run("fold1", ["c", "d"])
    assert validation_ids(seed42) == frozenset({"a", "b"})
    assert share_validation([seed42, seed7]) and share_validation([seed42])
    assert not share_validation([seed42, seed7, fold1])
