"""scripts/build_model.sh (`make model`): the recipe of the shipped model, run against a stand-in `skain` that
records each command and writes the files the next step reads, so the wiring is checked in seconds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_model.sh"

FAKE = r"""#!/usr/bin/env bash
echo "$*" >> "$LOG"
out=""; prev=""
for a in "$@"; do [ "$prev" = "--output" ] && out="$a"; prev="$a"; done
case "$1" in
  train) mkdir -p "$out"; printf 'image_id,split\nISIC_1,train\nISIC_2,val\n' > "$out/split.csv" ;;
  export) echo model > "$out" ;;
  ensemble) mkdir -p "$out" ;;
esac
"""


def _run(tmp_path: Path, **env: str) -> tuple[list[list[str]], Path]:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("ISIC_1", "ISIC_2"):
        (images / f"{name}.jpg").write_bytes(b"\xff\xd8jpeg")
    pd.DataFrame({"image_id": ["ISIC_1", "ISIC_2"], "dx": ["nv", "mel"], "lesion_id": ["L1", "L2"]}).to_csv(
        tmp_path / "meta.csv", index=False)
    fake = tmp_path / "skain"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    log = tmp_path / "log"
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "LOG": str(log),
            "CSV": str(tmp_path / "meta.csv"), "IMAGES": str(images), "OUT": str(tmp_path / "out"),
            "SKAIN": str(fake), "TARGET": str(tmp_path / "model.safetensors"), **env}
    subprocess.run(["bash", str(SCRIPT)], env=full, check=True, capture_output=True, text=True, timeout=120)
    return [line.split() for line in log.read_text().splitlines()], tmp_path / "out"


def _value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_two_photo_augmented_networks_become_one_eight_view_model_with_a_taken_over_rule(tmp_path):
    cmds, out = _run(tmp_path, RULE_FROM="shipped.safetensors")
    assert [c[0] for c in cmds] == ["train", "train", "ensemble", "decide", "calibrate", "export", "evaluate"]
    trains = cmds[:2]
    assert [_value(c, "--seed") for c in trains] == ["42", "7"]
    for c in trains:  # one split (held out from both networks), re-saved copies mixed into training
        assert (_value(c, "--folds"), _value(c, "--fold"), _value(c, "--split-seed")) == ("10", "0", "42")
        assert _value(c, "--photo-augment") == "0.5" and "--no-trust" not in c  # members fit their own OOD check
    assert cmds[2][cmds[2].index("--runs") + 1:cmds[2].index("--runs") + 3] == [str(out / "m42"), str(out / "m7")]
    assert _value(cmds[3], "--rule-from") == "shipped.safetensors" and _value(cmds[3], "--model") == str(out / "final")
    assert _value(cmds[4], "--tta") == "8" and "--default" in cmds[4] and "--triage-confidence" not in cmds[4]
    assert _value(cmds[5], "--dtype") == "float16" and _value(cmds[5], "--output") == str(tmp_path / "model.safetensors")
    val = pd.read_csv(out / "final" / "val_metadata.csv")
    assert val["image_id"].tolist() == ["ISIC_2"]
    assert [p.name for p in (out / "final" / "val_images").iterdir()] == ["ISIC_2.jpg"]


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_without_a_rule_to_take_over_the_rule_is_chosen_on_cross_validation_of_the_same_recipe(tmp_path):
    cmds, out = _run(tmp_path, SEEDS="3")
    assert [c[0] for c in cmds] == ["train", "train", "decide", "calibrate", "export", "evaluate"]
    assert "--all-folds" in cmds[0] and _value(cmds[0], "--photo-augment") == "0.5"
    assert _value(cmds[2], "--oof") == str(out / "cv" / "oof_predictions.csv")
    assert (out / "final" / "split.csv").is_file()  # one network: its run folder is the model


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_a_triage_confidence_reaches_the_calibration_of_the_default_inference(tmp_path):
    cmds, _ = _run(tmp_path, RULE_FROM="shipped.safetensors", TRIAGE_CONFIDENCE="0.9")
    calibrate = next(c for c in cmds if c[0] == "calibrate")
    assert _value(calibrate, "--triage-confidence") == "0.9" and _value(calibrate, "--tta") == "8"
