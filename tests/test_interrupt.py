"""Interruption and resume, and the output-folder guards.

Training is killed (SIGINT, SIGKILL) in the middle of an epoch: the last complete checkpoint is intact and
loads with weights_only=True, `--resume` continues from it (a stale lock from the killed run does not block it),
and with a fixed seed the resumed run's history, metrics and weights equal an uninterrupted run's.
An unwritable output folder, a full disk, an existing run and a concurrently running one are refused before
any work.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import tiny_config
from skain.cli import main
from skain.data.schema import DataError
from skain.data.synthetic import make_synthetic
from skain.training.runfolder import LAST_NAME, RunLock, check_output
from skain.training.train import fit

TIMING = ("elapsed_s", "train_images_per_s")  # wall-clock columns; everything else must match exactly
Run = namedtuple("Run", "out history metrics")


# ------------------------------------------------------------------------------------------- guards (fast)
def forbid_work(monkeypatch):
    """Fail loudly if training gets as far as reading data."""
    import skain.training.train
    monkeypatch.setattr(skain.training.train, "prepare_data", lambda cfg: pytest.fail("work started"))


def test_unwritable_output_folder_is_refused_before_work(tmp_path, monkeypatch):
    forbid_work(monkeypatch)
    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".write-test"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(DataError, match=r"output folder .*out is not writable \(Read-only file system\); choose "
                                        r"another with --output"):
        fit(tiny_config(tmp_path, tmp_path / "out"))


def test_output_path_under_a_file_is_refused(tmp_path, monkeypatch):
    forbid_work(monkeypatch)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="is not writable"):
        fit(tiny_config(tmp_path, tmp_path / "afile" / "out"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_refused(tmp_path, monkeypatch):
    forbid_work(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DataError, match="not writable"):
            check_output(locked / "out", resume=False, overwrite=False)
    finally:
        locked.chmod(0o700)


def test_full_disk_is_refused_before_work(tmp_path, monkeypatch, capsys):
    forbid_work(monkeypatch)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=20 * 2**20))
    with pytest.raises(DataError, match=r"only 20 MiB free on the disk of .*out; need at least 300 MiB"):
        fit(tiny_config(tmp_path, tmp_path / "out"))
    assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "out2"), "--no-progress"]) == 2
    assert "MiB free" in capsys.readouterr().err


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LAST_NAME).write_bytes(b"x")
    assert main(["train", "--data", str(tmp_path), "--output", str(out), "--no-progress"]) == 2
    assert "already holds a training run (last.pt); pass --resume" in capsys.readouterr().err
    check_output(out, resume=False, overwrite=True)
    check_output(out, resume=True, overwrite=False)


def test_a_running_training_holds_the_folder(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".skain-train.lock").write_text(str(sleeper.pid))
        with pytest.raises(DataError, match=f"another training \\(pid {sleeper.pid}\\) is writing into"):
            with RunLock(tmp_path):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with RunLock(tmp_path) as lock:  # the same file, now stale: taken over
        assert lock.path.read_text() == str(os.getpid())
    assert not lock.path.exists()


@pytest.mark.parametrize("content", ["", "not a pid", "999999999"])
def test_stale_or_garbled_lock_files_do_not_block(tmp_path, content):
    (tmp_path / ".skain-train.lock").write_text(content)
    with RunLock(tmp_path):
        pass


# ------------------------------------------------------------------------------------------- kill and resume (slow)
@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupt")
    return make_synthetic(root / "data", 64, seed=4, size=(96, 72))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# `skain train` with every image load slowed by 50 ms: on an idle machine the tiny model would finish a
# whole run before a signal could land mid-epoch. The delay touches no random state, so results are unchanged.
# SIGINT gets Python's usual handler even when the test runner was started in the background (where the
# shell marks SIGINT ignored and children inherit that), as it is for a user pressing Ctrl-C in a terminal.
SLOW_MAIN = ("import signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from skain.data import dataset as d; get = d.LesionDataset.__getitem__; "
             "d.LesionDataset.__getitem__ = lambda self, i: (time.sleep(0.05), get(self, i))[1]; "
             "from skain.cli import main; sys.exit(main(sys.argv[1:]))")


def command(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """`skain train` (slowed, see SLOW_MAIN) with the tiny model, fixed seed, 2 epochs of ~6 small steps."""
    return [sys.executable, "-c", SLOW_MAIN, "train", "--data", str(data), "--output", str(out),
            "--backbone", "test_efficientnet", "--pretrained", "none", "--input-size", "64", "--epochs", "2",
            "--frozen-epochs", "0", "--batch-size", "8", "--seed", "11", "--cache-dir", str(cache),
            "--workers", "0", "--no-progress", *extra]


def finished(out: Path) -> Run:
    return Run(out, pd.read_csv(out / "train_history.csv"), json.loads((out / "metrics.json").read_text()))


def run_to_end(cmd: list[str]) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)  # minutes on a busy 2-core box
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res


@pytest.fixture(scope="module")
def uninterrupted(small_data, cache, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("full") / "out"
    run_to_end(command(small_data, out, cache))
    return finished(out)


def kill_mid_epoch_2(cmd: list[str], out: Path, sig: int) -> subprocess.Popen:
    """Start training, wait for epoch 1's checkpoint, then signal the process early in epoch 2."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 1800
    while not (out / LAST_NAME).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "epoch 1 never finished"
        time.sleep(0.02)
    epoch_seconds = float(pd.read_csv(out / "train_history.csv")["elapsed_s"].iloc[0])
    time.sleep(max(0.3, 0.15 * epoch_seconds))
    assert proc.poll() is None, "training ended before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def assert_same_run(a: Run, b: Run) -> None:
    cols = [c for c in a.history.columns if c not in TIMING]
    assert len(a.history) == len(b.history) == 2
    pd.testing.assert_frame_equal(a.history[cols], b.history[cols], check_exact=True)
    assert a.metrics["validation"] == b.metrics["validation"]
    assert a.metrics["best_epoch"] == b.metrics["best_epoch"] and b.metrics["epochs_trained"] == 2
    wa = torch.load(a.out / "best_model.pt", weights_only=True)["state_dict"]
    wb = torch.load(b.out / "best_model.pt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def assert_intact_epoch_1_checkpoint(out: Path) -> None:
    ck = torch.load(out / LAST_NAME, map_location="cpu", weights_only=True)
    assert ck["next_epoch"] == 2, "the signal did not land in epoch 2"
    assert len(ck["history"]) == 1 and not ck["done"]
    assert len(pd.read_csv(out / "train_history.csv")) == 1
    torch.load(out / "best_model.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_sigint_mid_epoch_then_resume_equals_an_uninterrupted_run(small_data, cache, uninterrupted, tmp_path):
    out = tmp_path / "out"
    proc = kill_mid_epoch_2(command(small_data, out, cache), out, signal.SIGINT)
    err = proc.stderr.read()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; a training run continues with --resume" in err
    assert_intact_epoch_1_checkpoint(out)
    assert not (out / ".skain-train.lock").exists()  # released on the way out
    assert not list(out.glob(".*.tmp"))  # no half-written files left behind
    res = run_to_end(command(small_data, out, cache, "--resume"))
    assert "resuming from" in res.stdout and "at epoch 2" in res.stdout
    assert_same_run(uninterrupted, finished(out))


@pytest.mark.slow
def test_sigkill_mid_epoch_leaves_a_stale_lock_that_does_not_block_resume(small_data, cache, uninterrupted,
                                                                          tmp_path):
    out = tmp_path / "out"
    victim = subprocess.Popen(command(small_data, out, cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:  # while it runs, a second training into the same folder is refused, even with --overwrite
        lock = out / ".skain-train.lock"
        deadline = time.monotonic() + 1200
        while not lock.exists():
            assert victim.poll() is None and time.monotonic() < deadline, victim.stderr.read()
            time.sleep(0.02)
        second = subprocess.run(command(small_data, out, cache, "--overwrite"), capture_output=True, text=True,
                                timeout=1200)
        assert second.returncode == 2 and f"another training (pid {victim.pid})" in second.stderr
    finally:
        victim.kill()
        victim.wait()
    shutil.rmtree(out)
    proc = kill_mid_epoch_2(command(small_data, out, cache), out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert (out / ".skain-train.lock").read_text() == str(proc.pid)  # stale: its process is gone
    assert_intact_epoch_1_checkpoint(out)
    res = run_to_end(command(small_data, out, cache, "--resume"))
    assert "resuming from" in res.stdout and not (out / ".skain-train.lock").exists()
    assert_same_run(uninterrupted, finished(out))
