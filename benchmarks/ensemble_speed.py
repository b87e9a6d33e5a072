"""Inference cost of an ensemble bundle against one of its members, measured in one run on the same real images.

    python benchmarks/ensemble_speed.py [--data-root ../shared/ham10000] [--members 5] [--images 64] [--batch 16]

Members are `cpu`-preset networks (tf_efficientnet_lite0 @224, random init: speed does not depend on the
weights), combined with `skain.ensemble.build_ensemble` exactly as `skain ensemble` does. Throughput feeds
pre-decoded tensors through `Predictor.probabilities` (PyTorch fp32 and, when installed, the exported graph in
OpenVINO); latency is `Predictor.predict_one` on JPEG bytes. Best of --rounds.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from skain.bundle import atomic_torch_save, make_bundle, read_bundle
from skain.data.encoder import MetadataEncoder
from skain.data.schema import CLASSES
from skain.data.transforms import resolve_preprocess
from skain.ensemble import build_ensemble
from skain.export import export_onnx
from skain.model import SkainNet
from skain.predict import Predictor

log = logging.getLogger("ensemble_speed")


def member_bundle(seed: int, backbone: str = "tf_efficientnet_lite0", size: int = 224) -> dict:
    enc = MetadataEncoder(sex_vocab=["unknown", "female", "male"], site_vocab=["unknown", "back", "face"])
    args = {"backbone": backbone, "n_sex": 3, "n_site": 3, "num_classes": len(CLASSES)}
    torch.manual_seed(seed)
    model = SkainNet(**args).eval()
    return make_bundle(model, args, resolve_preprocess(model.backbone.pretrained_cfg, size), enc, list(CLASSES))


def throughput(p: Predictor, images: torch.Tensor, frame: pd.DataFrame, batch: int, rounds: int) -> float:
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            p.probabilities(images[i:i + batch], frame.iloc[i:i + batch])
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def latency_ms(p: Predictor, jpegs: list[bytes], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for b in jpegs:
            p.predict_one(b, 50, "male", "back")
        best = min(best, (time.perf_counter() - start) / len(jpegs) * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "ham10000"))
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
            atomic_torch_save(member_bundle(k), work / f"fold{k}" / "best_model.pt")
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
