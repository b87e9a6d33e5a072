"""Two-process DDP (torchrun, gloo on CPU) against a single-process run on the same synthetic data."""
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from skain.data.dataset import LesionDataset
from skain.data.encoder import MetadataEncoder
from skain.data.images import ImageLoader
from skain.data.layout import discover, load_table
from skain.data.transforms import eval_transform
from skain.engine import predict_logits
from skain.metrics import classification_metrics
from skain.modelfile.bundle import load_model
from skain.modelfile.load import read_bundle
from skain.training.distributed import DistInfo, EpochSampler, ShardSampler


def train_args(data, out, cache):
    return ["train", "--data", str(data), "--output", str(out), "--backbone", "test_efficientnet", "--pretrained",
            "none", "--input-size", "64", "--epochs", "2", "--frozen-epochs", "1", "--lr", "3e-3", "--batch-size",
            "16", "--cache-dir", str(cache), "--workers", "0", "--amp", "off", "--no-progress"]


def test_samplers_cover_every_image_once_across_ranks():
    shards = [list(ShardSampler(11, DistInfo(r, 3))) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
    train = [list(EpochSampler(11, DistInfo(r, 2), seed=1)) for r in range(2)]
    assert len(train[0]) == len(train[1]) == 6 and set(train[0]) | set(train[1]) == set(range(11))
    s = EpochSampler(11, DistInfo(), seed=1)
    first = list(s)
    s.set_epoch(1)
    assert first != list(s) and sorted(first) == list(range(11))


@pytest.mark.slow
def test_two_process_gloo_run_writes_the_same_artifacts_and_honest_metrics(synth_root, tmp_path):
    data = synth_root / "dataset_train"
    single = subprocess.run([sys.executable, "-m", "skain", *train_args(data, tmp_path / "one", tmp_path / "c")],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "skain", *train_args(data, tmp_path / "two", tmp_path / "c")],
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, (ddp.stdout + ddp.stderr)[-3000:]
    files = lambda d: sorted(p.name for p in d.iterdir() if not p.name.startswith("."))
    assert files(tmp_path / "two") == files(tmp_path / "one")
    for name in ("split.csv", "vocabularies.json", "age_stats.json", "label_map.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    history = pd.read_csv(tmp_path / "two" / "train_history.csv")
    assert list(history["epoch"]) == [1, 2, 3]
    assert (ddp.stdout + ddp.stderr).count("best epoch") == 1  # logs from rank 0 only

    # the metrics gathered from two ranks equal a single-process evaluation of the same weights
    bundle = read_bundle(tmp_path / "two")
    split = pd.read_csv(tmp_path / "two" / "split.csv")
    frame = load_table(discover(data))
    val = frame[frame["image_id"].isin(split.loc[split["split"] == "val", "image_id"])].reset_index(drop=True)
    ds = LesionDataset(val, MetadataEncoder.from_state(bundle["encoder"]),
                       ImageLoader(bundle["preprocess"]["resize"]), eval_transform(bundle["preprocess"]))
    res = predict_logits(load_model(bundle), DataLoader(ds, 64), torch.device("cpu"), None, progress=False)
    again = classification_metrics(res["label"], torch.from_numpy(res["logits"]).softmax(1).numpy(), bundle["classes"])
    stored = bundle["metrics"]
    assert again["n"] == stored["n"] == len(val)
    assert again["confusion_matrix"] == stored["confusion_matrix"]
    assert again["balanced_accuracy"] == stored["balanced_accuracy"]
    assert again["macro_auc"] == pytest.approx(stored["macro_auc"], abs=1e-6)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["validation"]["n"] == len(val)
