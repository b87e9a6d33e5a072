"""Inference cost of an ensemble bundle against one of its members, measured in one run on the same real images.

    python -m benchmarks.speed.ensemble_speed [--data-root ../shared/ham10000] [--members 5] [--images 64] [--batch 16]

Members are `cpu`-preset networks (tf_efficientnet_lite0 @224, random init: speed does not depend on the
weights), combined with `skain.training.ensemble.build_ensemble` exactly as `skain ensemble` does. Throughput feeds
pre-decoded tensors through `Predictor.probabilities` (PyTorch fp32 and, when installed, the exported graph in
OpenVINO); latency is `Predictor.predict_one` on JPEG bytes. Best of --rounds. Prints a table; writes no results
file (docs/ensembles.md, "Cost", quotes the printed figures).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import tempfile
from pathlib import Path

import pandas as pd
import torch

from benchmarks.common import DATA_ROOT, best_of, random_bundle
from skain.inference.export import export_onnx
from skain.inference.predictor import Predictor
from skain.modelfile.bundle import atomic_torch_save
from skain.modelfile.load import read_bundle
from skain.training.ensemble import build_ensemble

log = logging.getLogger("ensemble_speed")


def throughput(p: Predictor, images: torch.Tensor, frame: pd.DataFrame, batch: int, rounds: int) -> float:
    """Images/s of Predictor.probabilities on pre-decoded tensors, best of `rounds`."""
    def one_pass() -> None:
        for i in range(0, len(images), batch):
            p.probabilities(images[i:i + batch], frame.iloc[i:i + batch])
    return len(images) / best_of(one_pass, rounds)


def latency_ms(p: Predictor, jpegs: list[bytes], rounds: int) -> float:
    """Mean ms per image of Predictor.predict_one on JPEG bytes, best of `rounds`."""
    def one_pass() -> None:
        for b in jpegs:
            p.predict_one(b, 50, "male", "back")
    return best_of(one_pass, rounds) / len(jpegs) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ns = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    paths = sorted((Path(ns.data_root) / "images").glob("*.jpg"))[:ns.images]
    if not paths:
        raise SystemExit(f"no images under {ns.data_root}/images")
    jpegs = [p.read_bytes() for p in paths]
    frame = pd.DataFrame({"age": [50.0] * len(paths), "sex": ["male"] * len(paths), "localization": ["back"] * len(paths)})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = []
        for k in range(ns.members):
            atomic_torch_save(random_bundle(size=224, seed=k), work / f"fold{k}" / "best_model.pt")
            runs.append(work / f"fold{k}")
        build_ensemble(runs, work / "ensemble")
        rows = []
        for name, folder in (("one member", runs[0]), (f"ensemble of {ns.members}", work / "ensemble")):
            bundle = read_bundle(folder)
            ref = Predictor(bundle, device="cpu")
            images = torch.stack([ref.image_tensor(b) for b in jpegs])
            row = {"model": name, "torch fp32 images/s": throughput(ref, images, frame, ns.batch, ns.rounds),
                   "torch fp32 ms/image (predict_one)": latency_ms(ref, jpegs[:8], ns.rounds)}
            if importlib.util.find_spec("openvino") is not None:
                onnx = export_onnx(folder)
                fast = Predictor(bundle, device="cpu", backend="openvino", onnx_path=onnx)
                row["openvino images/s"] = throughput(fast, images, frame, ns.batch, ns.rounds)
                row["openvino ms/image (predict_one)"] = latency_ms(fast, jpegs[:8], ns.rounds)
            rows.append(row)
    table = pd.DataFrame(rows).set_index("model")
    print(f"{len(paths)} real images, batch {ns.batch}, {torch.get_num_threads()} threads, best of {ns.rounds}")
    print(table.round(1).to_string())
    print("ensemble / member throughput:", (table.iloc[1] / table.iloc[0]).round(3).to_dict())


if __name__ == "__main__":
    main()
