"""Inference speed and correctness of each precision/backend, measured in ONE run on the same real images.

    python -m benchmarks.speed.infer_speed [--data-root ../shared/ham10000] [--bundle /tmp/bench/out/multimodal]
                                           [--images 512] [--batch 16] [--rounds 2] [--v2s-images 32]
                                           [--out benchmarks/out/infer_speed.json]

Baseline: a plain eager fp32 loop (Predictor precision="fp32", what the seed does). Compared: channels_last,
bf16 autocast, both, and the exported graph in ONNX Runtime and in OpenVINO (both fp32), for
  * the `cpu` preset (tf_efficientnet_lite0 @224): the trained bundle if given (else random init),
  * EfficientNetV2-S @384 (random init; speed only).
Model throughput feeds pre-decoded tensors through `Predictor.probabilities`; end to end runs
`Predictor.predict_frame` (JPEG decode, resize, metadata, model, no image cache); single-image latency runs
`Predictor.predict_one` on JPEG bytes. Correctness of each variant against fp32 on all --images real images:
top-1 agreement and max probability difference. Everything goes through skAIn's own inference path.
Writes --out (default benchmarks/out/infer_speed.json); no results file was kept in benchmarks/results/: the
tables in docs/performance.md, "Inference speed", are its printed output.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.common import DATA_ROOT, ham10000, percentiles_ms, random_bundle, split_rows, write_json
from skain.inference.export import export_onnx
from skain.inference.predictor import GRAPH_RUNTIMES, Predictor, fast_choice
from skain.modelfile.bundle import atomic_torch_save
from skain.modelfile.load import read_bundle

VARIANTS = ("fp32", "channels_last", "bf16", "bf16_channels_last", *GRAPH_RUNTIMES)
log = logging.getLogger("infer_speed")


def predictors(bundle: dict, work: Path, name: str) -> dict[str, Predictor]:
    """One Predictor per variant; ONNX exported from the same bundle into a scratch folder."""
    path = work / f"{name}.pt"
    atomic_torch_save(bundle, path)
    onnx = export_onnx(path, work / f"{name}.onnx")
    out = {v: Predictor(bundle, device="cpu", precision=v) for v in VARIANTS if v not in GRAPH_RUNTIMES}
    for v in GRAPH_RUNTIMES:
        out[v] = Predictor(bundle, device="cpu", backend=v, onnx_path=onnx)
    return out


def model_pass(p: Predictor, images: torch.Tensor, frame: pd.DataFrame, batch: int) -> tuple[float, np.ndarray]:
    """Seconds and probabilities for all images, pre-decoded, in batches."""
    p.probabilities(images[:batch], frame.iloc[:batch])  # warm-up (oneDNN primitive creation, ORT arenas)
    start, probs = time.perf_counter(), []
    for i in range(0, len(images), batch):
        probs.append(p.probabilities(images[i:i + batch], frame.iloc[i:i + batch]))
    return time.perf_counter() - start, np.concatenate(probs)


def throughput(preds: dict[str, Predictor], images, frame, batch: int, rounds: int) -> dict:
    """Best-of-`rounds` images/s per variant, rounds interleaved so background load hits all variants alike."""
    times: dict[str, list[float]] = {v: [] for v in preds}
    probs: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for v, p in preds.items():
            secs, probs[v] = model_pass(p, images, frame, batch)
            times[v].append(secs)
    ref = probs["fp32"]
    out = {}
    for v in preds:
        ips = len(images) / min(times[v])
        out[v] = {"images_per_s": ips, "speedup": ips / (len(images) / min(times["fp32"])),
                  "top1_agreement": float((probs[v].argmax(1) == ref.argmax(1)).mean()),
                  "max_prob_diff": float(np.abs(probs[v] - ref).max()), "seconds": times[v]}
    return out


def end_to_end(preds: dict[str, Predictor], frame: pd.DataFrame, batch: int, rounds: int, variants) -> dict:
    """Variants are "name" (decoding in the main process) or "name+1worker" (one DataLoader worker)."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            name, _, workers = v.partition("+")
            start = time.perf_counter()
            preds[name].predict_frame(frame, batch_size=batch, num_workers=1 if workers else 0, cache_dir=None,
                                      progress=False)
            times[v].append(time.perf_counter() - start)
    base = len(frame) / min(times["fp32"])
    return {v: {"images_per_s": len(frame) / min(t), "speedup": len(frame) / min(t) / base, "seconds": t}
            for v, t in times.items()}


def latency(preds: dict[str, Predictor], paths: list[str], variants) -> dict:
    """predict_one on JPEG bytes (what the web app pays per upload): p50/p90 in ms."""
    blobs = [Path(p).read_bytes() for p in paths]
    out = {}
    for v in variants:
        preds[v].predict_one(blobs[0], 50, "male", "back")
        seconds = []
        for b in blobs:
            start = time.perf_counter()
            preds[v].predict_one(b, 50, "male", "back")
            seconds.append(time.perf_counter() - start)
        out[v] = percentiles_ms(seconds, (50, 90))
    return out


def gate(res: dict, agreement: float = 0.995, max_diff: float = 0.02) -> str:
    """The fastest variant whose predictions agree with fp32 (top-1 >= 99.5%, max prob diff <= 0.02)."""
    ok = [v for v, r in res.items() if r["top1_agreement"] >= agreement and r["max_prob_diff"] <= max_diff]
    return max(ok, key=lambda v: res[v]["images_per_s"])


def real_images(root: Path, bundle_dir: Path | None, n: int) -> pd.DataFrame:
    """Held-out (validation) rows of the trained bundle's split when there is one, else the first n rows."""
    frame = ham10000(root)
    if bundle_dir and (bundle_dir / "split.csv").is_file():
        frame = split_rows(frame, bundle_dir, "val")
    return frame.head(n).reset_index(drop=True)


def show(title: str, res: dict, keys: tuple[str, ...]) -> None:
    print(f"\n{title}")
    for v, r in res.items():
        print(f"  {v:20s} " + "  ".join(f"{k} {r[k]:.4g}" for k in keys if k in r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--bundle", default="/tmp/bench/out/multimodal", help="trained cpu-preset output folder/bundle")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--v2s-images", type=int, default=32)
    ap.add_argument("--e2e-images", type=int, default=256, help="images for the end-to-end comparison")
    ap.add_argument("--latency-images", type=int, default=60)
    ap.add_argument("--skip-v2s", action="store_true")
    ap.add_argument("--skip-lite0", action="store_true", help="only the EfficientNetV2-S speed comparison")
    ap.add_argument("--out", default="benchmarks/out/infer_speed.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    root = Path(args.data_root)
    trained = Path(args.bundle) if args.bundle and Path(args.bundle).exists() else None
    bundle = read_bundle(trained) if trained else random_bundle("tf_efficientnet_lite0", 224)
    frame = real_images(root, trained if trained and trained.is_dir() else None, args.images)
    result = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_before": os.getloadavg(),
              "fast_choice": "/".join(fast_choice(torch.device("cpu"))), "images": len(frame),
              "cpu_model": "trained " + str(trained) if trained else "random init"}
    print(f"{len(frame)} real images; cpu model: {result['cpu_model']}; torch threads {result['threads']}; "
          f"load average {result['load_before'][0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_lite0:
            preds = predictors(bundle, Path(tmp), "lite0")
            images = torch.stack([preds["fp32"].image_tensor(p) for p in frame["path"]])
            result["lite0_model"] = throughput(preds, images, frame, args.batch, args.rounds)
            show(f"cpu preset (Lite0 @224) model throughput, batch {args.batch}", result["lite0_model"],
                 ("images_per_s", "speedup", "top1_agreement", "max_prob_diff"))
            result["gate"] = gate(result["lite0_model"])
            print(f"fastest variant passing the correctness gate: {result['gate']}; "
                  f"Predictor precision='fast' uses {result['fast_choice']}")
            e2e = ("fp32", "channels_last", "bf16_channels_last", "onnx", "openvino", "openvino+1worker")
            result["lite0_end_to_end"] = end_to_end(preds, frame.head(args.e2e_images), args.batch, args.rounds,
                                                     e2e)
            show("cpu preset end to end (decode + resize + metadata + model)", result["lite0_end_to_end"],
                 ("images_per_s", "speedup"))
            result["lite0_latency"] = latency(preds, frame["path"].tolist()[:args.latency_images],
                                              ("fp32", "channels_last", "onnx", "openvino"))
            show("cpu preset single-image latency (predict_one on JPEG bytes)", result["lite0_latency"],
                 ("p50_ms", "p90_ms"))
        if not args.skip_v2s:
            v2 = predictors(random_bundle("tf_efficientnetv2_s", 384), Path(tmp), "v2s")
            sub = frame.head(args.v2s_images)
            imgs = torch.stack([v2["fp32"].image_tensor(p) for p in sub["path"]])
            result["v2s_model"] = throughput(v2, imgs, sub, args.batch, args.rounds)
            show("EfficientNetV2-S @384 (random init) model throughput", result["v2s_model"],
                 ("images_per_s", "speedup", "top1_agreement", "max_prob_diff"))
    result["load_after"] = os.getloadavg()
    print(f"\nload average before {result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
