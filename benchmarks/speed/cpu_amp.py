"""bf16 autocast against fp32 on this CPU: the `cpu` preset's training step and batch inference, one process.

    python -m benchmarks.speed.cpu_amp [--backbones tf_efficientnet_lite0:224] [--rounds 2] [--steps 4]
                                       [--out benchmarks/out/cpu_amp.json]

The training step is the preset's (95% of the backbone trainable, AdamW, batch 32, channels-last, metadata
branch) on tensors in memory, so the data pipeline does not blur the comparison; inference is the eval-mode
forward pass on 32 images. fp32 and bf16 alternate within each round, so a shared machine's load falls on both.
Prints the CPU features that decide `--amp auto` (skain.engine.cpu_bf16_pays) beside the measured ratio.

benchmarks/results/cpu_amp.json is this script's --out with `--backbones tf_efficientnet_lite0:224
tf_efficientnet_lite2:260` (2026-11-27); its `end_to_end` block (`skain train --amp auto` against `--amp bf16`,
and /usr/bin/time -v of a training run) was measured with skain commands and added by hand.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn

from benchmarks.common import what, write_json
from skain.engine import autocast, cpu_bf16_pays, cpu_features, cpu_supports_bf16
from skain.model import SkainNet


def network(backbone: str, train: bool) -> SkainNet:
    net = SkainNet(backbone, n_sex=4, n_site=16).to(memory_format=torch.channels_last)
    net.set_backbone_trainable(0.95)
    return net.train(train)


def batch(size: int, n: int = 32) -> tuple:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(n, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    return image, torch.rand(n, 1, generator=g), torch.randint(0, 4, (n,), generator=g), \
        torch.randint(0, 16, (n,), generator=g), torch.randint(0, 7, (n,), generator=g)


def train_speed(backbone: str, size: int, dtype: torch.dtype | None, steps: int) -> float:
    net, (image, age, sex, site, y) = network(backbone, True), batch(size)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    loss_fn, cpu = nn.CrossEntropyLoss(), torch.device("cpu")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(cpu, dtype):
            loss = loss_fn(net(image, age, sex, site).float(), y)
        loss.backward()
        opt.step()
    return timed(step, steps, len(y))


@torch.inference_mode()
def infer_speed(backbone: str, size: int, dtype: torch.dtype | None, steps: int) -> float:
    net, (image, age, sex, site, _) = network(backbone, False), batch(size)

    def step() -> None:
        with autocast(torch.device("cpu"), dtype):
            net(image, age, sex, site)
    return timed(step, steps, len(image))


def timed(step, steps: int, n: int) -> float:
    for _ in range(2):  # warm-up: oneDNN picks and caches its kernels
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return n * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0:224"], help="NAME:INPUT_SIZE")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/out/cpu_amp.json")
    ns = ap.parse_args()
    features = {k: v for k, v in cpu_features().items() if k in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_f")}
    result = {"what": what(__doc__), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu_features": features, "mkldnn_bf16_supported": cpu_supports_bf16(),
              "auto_picks_bf16": cpu_bf16_pays(), "rows": {}}
    print(json.dumps({k: result[k] for k in ("threads", "cpu_features", "auto_picks_bf16")}), flush=True)
    for spec in ns.backbones:
        backbone, size = spec.split(":")
        rows = {f"{kind} {name}": [] for kind in ("train", "infer") for name in ("fp32", "bf16")}
        for _ in range(ns.rounds):
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                rows[f"train {name}"].append(round(train_speed(backbone, int(size), dtype, ns.steps), 1))
                rows[f"infer {name}"].append(round(infer_speed(backbone, int(size), dtype, ns.steps), 1))
        ratio = {kind: round(sum(rows[f"{kind} bf16"]) / sum(rows[f"{kind} fp32"]), 2) for kind in ("train", "infer")}
        result["rows"][spec] = {"images_per_s": rows, "bf16_over_fp32": ratio}
        print(spec, json.dumps(result["rows"][spec]), flush=True)
    write_json(ns.out, result, indent=1)


if __name__ == "__main__":
    main()
