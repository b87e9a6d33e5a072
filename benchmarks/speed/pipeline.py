"""Input pipeline and training throughput, measured as ratios within one run.

    python -m benchmarks.speed.pipeline [--data-root ../shared/ham10000] [--images 400] [--presets cpu gpu]
                                        [--out benchmarks/out/pipeline.json]

1. Input pipeline images/s on real HAM10000 JPEGs, one process: naive (decode the 600x450 JPEG and run the
   augmentation as a notebook writes it, a torchvision Compose on PIL images, every epoch) vs skAIn's
   (pre-resized uint8 cache + `DermoscopyAugment`, the same augmentation with the colour jitter fused into one
   matrix product). Target >= 3x.
2. Training images/s per preset on this device: the real data pipeline in the loop vs synthetic tensors already
   in memory (the model's own limit). Target: the pipeline reaches >= 90% of the model's limit.
3. The cost of the re-save augmentation (`--photo-augment`, data/degrade.py: downscale, JPEG/WebP, blur, border)
   at the configured share: input pipeline images/s and training images/s with it against without it.
4. The cost of `--consistency` training (each image beside a re-saved copy, both through the network): input
   pipeline and training images/s (unique images) against the plain pipeline.

Writes --out (default benchmarks/out/pipeline.json). benchmarks/results/photo_augment_cost.json is that file from
`--presets cpu` (400 images, 2026-12-05; docs/robustness.md, "Cost of the augmentation"); the input-pipeline
table in docs/performance.md ("Input pipeline") comes from `--steps 10` runs whose files were not kept.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

from benchmarks.common import DATA_ROOT, best_of, ham10000, write_json
from skain.data.dataset import LesionDataset
from skain.data.encoder import MetadataEncoder
from skain.data.images import ImageLoader, open_image
from skain.data.transforms import resolve_preprocess, train_transform
from skain.engine import amp_dtype, resolve_device, train_one_epoch
from skain.model import SkainNet
from skain.training.config import TrainConfig, build_config
from skain.training.loaders import workers


def notebook_transform(pre: dict, size: int | None = None):
    """The same augmentation written the way a notebook does: a torchvision Compose over a PIL image
    (random resized crop, flips, 90-degree rotations, ColorJitter with HSV hue, ToTensor, Normalize)."""
    from torchvision import transforms as T
    rot90 = T.RandomChoice([T.Lambda(lambda im, k=k: im.rotate(90 * k, expand=True)) for k in range(4)])
    return T.Compose([
        T.RandomResizedCrop(size or pre["input_size"], scale=(0.35, 1.0), ratio=(0.75, 1.333)),
        T.RandomHorizontalFlip(), T.RandomVerticalFlip(), rot90,
        T.ColorJitter(0.2, 0.2, 0.15, 0.03), T.ToTensor(), T.Normalize(pre["mean"], pre["std"]),
    ])


def time_pipeline(paths: list[str], fn, repeat: int = 2) -> float:
    """Best of `repeat` passes, images/s."""
    def one_pass() -> None:
        for p in paths:
            fn(p)
    return len(paths) / best_of(one_pass, repeat)


def pipeline_ratio(paths: list[str], pre: dict, cache_dir: Path) -> dict:
    """images/s of: the notebook (decode the 600x450 JPEG + augment, every epoch), the same notebook Compose on
    skAIn's pre-resized cache, and skAIn's own (cache + fused augmentation), all measured here in one run."""
    from PIL import Image
    notebook, ours = notebook_transform(pre), train_transform(pre)
    photo = train_transform(pre, photo=TrainConfig().photo_augment)
    paired = train_transform(pre, paired=True)
    loader = ImageLoader(pre["resize"], cache_dir)
    for p in paths:  # fill the cache once (what `skain train` does before epoch 1)
        loader(p)
    naive = time_pipeline(paths, lambda p: notebook(open_image(p)))
    cache_only = time_pipeline(paths, lambda p: notebook(Image.fromarray(loader(p))))
    skain = time_pipeline(paths, lambda p: ours(loader(p)))
    with_photo = time_pipeline(paths, lambda p: photo(loader(p)))
    pairs = time_pipeline(paths, lambda p: paired(loader(p)))
    return {"naive_img_s": naive, "cache_notebook_aug_img_s": cache_only, "skain_img_s": skain,
            "ratio": skain / naive, "skain_photo_augment_img_s": with_photo,
            "photo_augment_cost_ratio": skain / with_photo, "skain_consistency_pairs_img_s": pairs,
            "consistency_pairs_cost_ratio": skain / pairs}


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int, age_width: int = 1):
        self.n, self.size, self.age_width = n, size, age_width
        self.image = torch.randn(3, size, size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image, "age": torch.zeros(self.age_width), "sex": torch.tensor(0),
                "site": torch.tensor(0), "label": torch.tensor(i % 7), "index": torch.tensor(i),
                "ok": torch.tensor(True)}


def train_speed(preset: str, frame: pd.DataFrame, steps: int, cache_dir: Path, compiled: bool = False,
                consistency: float = 10.0) -> dict:
    cfg = build_config(preset, flags={"model": {"pretrained": "none"}})
    device = resolve_device()
    dtype = amp_dtype(device, "auto")
    enc = MetadataEncoder.fit(frame)
    model = SkainNet(cfg.model.backbone, n_sex=len(enc.sex_vocab), n_site=len(enc.site_vocab),
                     age_inputs=enc.age_width).to(
        device, memory_format=torch.channels_last)
    model.set_backbone_trainable(cfg.train.unfreeze_fraction)
    pre = resolve_preprocess(model.backbone.pretrained_cfg, cfg.model.input_size)
    bs = cfg.train.batch_size
    n = bs * steps
    real = LesionDataset(frame.iloc[:n].reset_index(drop=True), enc, ImageLoader(pre["resize"], cache_dir),
                         train_transform(pre))
    photo = LesionDataset(frame.iloc[:n].reset_index(drop=True), enc, ImageLoader(pre["resize"], cache_dir),
                          train_transform(pre, photo=cfg.train.photo_augment))
    pairs = LesionDataset(frame.iloc[:n].reset_index(drop=True), enc, ImageLoader(pre["resize"], cache_dir),
                          train_transform(pre, paired=True))
    for i in range(len(real)):  # warm the cache, as training does before its first epoch
        real.loader(real.paths[i])
    n_workers = workers(cfg, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-5)
    loss = torch.nn.CrossEntropyLoss()
    out = {}
    synthetic = Synthetic(n, pre["input_size"], enc.age_width)
    for name, ds in (("synthetic", synthetic), ("pipeline", real), ("pipeline_photo", photo),
                     ("pipeline_consistency", pairs)):
        dl = DataLoader(ds, bs, shuffle=False, num_workers=n_workers, pin_memory=device.type == "cuda")
        weight = consistency if name == "pipeline_consistency" else 0.0
        train_one_epoch(model, [next(iter(dl))], opt, loss, device, dtype, channels_last=True, progress=False,
                        consistency=weight)
        out[name] = train_one_epoch(model, dl, opt, loss, device, dtype, channels_last=True, progress=False,
                                    consistency=weight)["images_per_s"]  # unique images: a pair counts once
    out["pipeline_share"] = out["pipeline"] / out["synthetic"]
    out["photo_augment_share"] = out["pipeline_photo"] / out["pipeline"]
    out["consistency_share"] = out["pipeline_consistency"] / out["pipeline"]
    if compiled:  # opt-in torch.compile of the training step, on the same synthetic tensors
        net = torch.compile(model)
        dl = DataLoader(Synthetic(n, pre["input_size"], enc.age_width), bs, shuffle=False, num_workers=n_workers)
        start = time.perf_counter()
        train_one_epoch(net, [next(iter(dl))], opt, loss, device, dtype, channels_last=True, progress=False)
        out["compile_seconds"] = time.perf_counter() - start
        out["synthetic_compiled"] = train_one_epoch(net, dl, opt, loss, device, dtype, channels_last=True,
                                                    progress=False)["images_per_s"]
        out["compile_speedup"] = out["synthetic_compiled"] / out["synthetic"]
    out.update({"preset": preset, "device": str(device), "amp": str(dtype), "batch": bs,
                "input": pre["input_size"], "workers": n_workers})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--steps", type=int, default=6, help="training steps per measurement")
    ap.add_argument("--presets", nargs="+", default=["cpu", "gpu"])
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--compile", nargs="*", default=[], metavar="PRESET",
                    help="also time torch.compile'd training for these presets (compiling takes minutes)")
    ap.add_argument("--out", default="benchmarks/out/pipeline.json")
    args = ap.parse_args()
    result: dict = {"images": args.images, "load_before": os.getloadavg(), "input_pipeline": {}, "training": {}}
    frame = ham10000(args.data_root)
    frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    paths = frame["path"].tolist()[: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            cfg = build_config(preset)
            pre = resolve_preprocess({}, cfg.model.input_size)
            r = result["input_pipeline"][preset] = pipeline_ratio(paths, pre, Path(tmp) / preset)
            print(f"input pipeline {preset} ({pre['input_size']} px, one process): naive {r['naive_img_s']:.0f} img/s, "
                  f"cache + notebook augmentation {r['cache_notebook_aug_img_s']:.0f} img/s, "
                  f"skAIn {r['skain_img_s']:.0f} img/s -> {r['ratio']:.1f}x; with the re-save augmentation "
                  f"{r['skain_photo_augment_img_s']:.0f} img/s; consistency pairs "
                  f"{r['skain_consistency_pairs_img_s']:.0f} img/s")
        for preset in [] if args.skip_training else args.presets:
            s = result["training"][preset] = train_speed(preset, frame, args.steps, Path(tmp) / preset,
                                                         preset in args.compile)
            print(f"training {preset} ({s['input']} px, batch {s['batch']}, {s['device']}, {s['amp']}, "
                  f"{s['workers']} workers): synthetic tensors {s['synthetic']:.1f} img/s, with the data pipeline "
                  f"{s['pipeline']:.1f} img/s -> {100 * s['pipeline_share']:.0f}% of the model's limit; with the "
                  f"re-save augmentation {s['pipeline_photo']:.1f} img/s ({100 * s['photo_augment_share']:.0f}%); "
                  f"--consistency pairs {s['pipeline_consistency']:.1f} img/s ({100 * s['consistency_share']:.0f}%)")
            if "compile_speedup" in s:
                print(f"  torch.compile: {s['compile_seconds']:.0f} s to compile, then {s['synthetic_compiled']:.1f} img/s "
                      f"on synthetic tensors = {s['compile_speedup']:.2f}x eager")
    result["load_after"] = os.getloadavg()
    print(f"load average before {result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
