"""The command line: `skain train` end to end, clear errors with exit code 2, and the seed's scripts."""
import subprocess
import sys
from pathlib import Path

import pytest

from skain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_skain_train_from_the_command_line(synth_root, tmp_path):
    code = main(["train", "--data", str(synth_root / "dataset_train"), "--output", str(tmp_path / "out"),
                 "--backbone", "test_efficientnet", "--pretrained", "none", "--input-size", "64", "--epochs", "1",
                 "--frozen-epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--no-progress"])
    assert code == 0 and (tmp_path / "out" / "best_model.pt").is_file()
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 240  # the cache filled once


def test_user_errors_exit_2_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "cpu"]) == 2
    assert "data folder not found: dataset_train" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--csv", str(tmp_path / "none.csv")]) == 2


def test_config_file_is_layered_under_flags(tmp_path):
    from skain.cli import build_parser, config_from_args
    (tmp_path / "c.json").write_text('{"train": {"epochs": 9, "lr": 0.01}, "model": {"input_size": 96}}')
    ns = build_parser().parse_args(["train", "--preset", "cpu", "--config", str(tmp_path / "c.json"), "--lr", "0.5"])
    cfg = config_from_args(ns)
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.input_size) == (9, 0.5, 96)
    assert cfg.model.backbone == "tf_efficientnet_lite0"  # from the preset
    (tmp_path / "bad.json").write_text('{"train": {"epoch": 9}}')
    with pytest.raises(ValueError, match="unknown TrainConfig option.*epoch"):
        config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "bad.json")]))


@pytest.mark.parametrize("script", ["test_gpu_pytorch.py", "train_multimodal_pytorch.py"])
def test_seed_scripts_still_run(script):
    args = [] if script.startswith("test_gpu") else ["--help"]
    res = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert ("device:" in res.stdout and "matmul" in res.stdout) or "--preset" in res.stdout
