"""Training that fails cleanly and balances honestly: `--balance sampler` draws every class equally often, and
under torchrun a failure in a rank-0-only step (image check, run files) stops every rank with the same message
instead of leaving the others to hang or crash in DDP set-up."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import skain
from conftest import tiny_config
from skain.data.images import ImageLoader
from skain.training.distributed import DistInfo, on_main_rank
from skain.training.loaders import balanced_sample_weights, build_loaders, prepare_data
from test_distributed import train_args


# ------------------------------------------------------------------------------------------- sampler
def drawn_class_shares(loader, epochs: int) -> np.ndarray:
    labels = loader.dataset.labels
    drawn = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        drawn.append(labels[np.fromiter(iter(loader.sampler), dtype=int)])
    counts = np.bincount(np.concatenate(drawn), minlength=7).astype(float)
    present = np.bincount(labels, minlength=7) > 0
    return counts[present] / counts.sum()


def test_the_balanced_sampler_draws_every_class_equally_often(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "dataset_train", tmp_path, balance="sampler")
    prep = prepare_data(cfg)
    pre = {"input_size": 64, "resize": 73, "mean": [0.5] * 3, "std": [0.5] * 3}
    train_dl, _ = build_loaders(cfg, prep, pre, ImageLoader(73), torch.device("cpu"))
    counts = np.bincount(train_dl.dataset.labels, minlength=7)
    assert counts.max() >= 5 * counts[counts > 0].min()  # the training split is imbalanced
    shares = drawn_class_shares(train_dl, epochs=40)
    assert np.abs(shares - 1 / len(shares)).max() < 0.03, shares


def test_balanced_weights_are_inverse_class_frequency():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    w = balanced_sample_weights(labels)
    per_class = np.array([w[labels == c].sum() for c in range(3)])
    np.testing.assert_allclose(per_class, per_class[0])


# ------------------------------------------------------------------------------------------- rank-0 failures
def test_on_main_rank_runs_once_and_reraises_in_one_process():
    calls = []
    on_main_rank(DistInfo(), lambda: calls.append(1))
    assert calls == [1]
    with pytest.raises(ValueError, match="boom"):
        on_main_rank(DistInfo(), lambda: (_ for _ in ()).throw(ValueError("boom")))


@pytest.mark.slow
def test_a_bad_image_stops_both_ranks_with_the_same_error(synth_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_root / "dataset_train", data)
    broken = sorted((data / "image").glob("*.jpg"))[5]
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    started = time.perf_counter()
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "skain", *train_args(data, tmp_path / "out", tmp_path / "cache")],
                         capture_output=True, text=True, timeout=600)
    log = ddp.stdout + ddp.stderr
    assert ddp.returncode != 0, log[-3000:]
    message = f"error: 1 unreadable image(s); fix or remove them from the CSV:\n  {broken}"
    assert log.count(message) == 2, log[-3000:]  # rank 0 and rank 1, word for word
    # no rank crashed elsewhere (torchrun itself prints a traceback of its launcher, not of skAIn's code)
    # (a frame of skAIn's own code names its package folder; the clone folder may itself be called skain/)
    packages = {str(Path(skain.__file__).parent) + os.sep, str(Path(skain.__file__).resolve().parent) + os.sep}
    assert not any(f'File "{p}' in log for p in packages) and "RuntimeError" not in log, log[-3000:]
    assert time.perf_counter() - started < 300
    assert not (tmp_path / "out" / "best_model.pt").exists() and not (tmp_path / "out" / ".skain-train.lock").exists()
