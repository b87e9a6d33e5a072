"""Pack HAM10000 for a GPU machine that can only receive ~60 MB: every image resized with skAIn's own
`resize_shorter` (shorter side = the model's resize, 256 px for Lite0 @ 224) and stored as WebP, plus the
metadata CSV and the offline ImageNet backbone weights in timm naming (float16, widened again there).

    python benchmarks/gpu/pack.py --csv ../shared/ham10000/HAM10000_metadata.csv \
        --images ../shared/ham10000/images ../shared/ham10000/images_part_2 --out .gpu

The .gpu/ folder it writes is what benchmarks/gpu/run.sh, cv_parallel.sh and cv_pair.sh read on the GPU machine;
it writes no results file.
"""
from __future__ import annotations

import argparse
import io
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import timm
import torch
from PIL import Image

from skain.data.images import open_image, resize_shorter
from skain.training.weights import load_pretrained


def shrink(args: tuple[str, int, int]) -> tuple[str, bytes]:
    path, short, quality = args
    buf = io.BytesIO()
    Image.fromarray(resize_shorter(open_image(path), short)).save(buf, "WEBP", quality=quality, method=6)
    return Path(path).stem, buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--images", nargs="+", required=True)
    ap.add_argument("--out", default=".gpu")
    ap.add_argument("--short", type=int, default=256)
    ap.add_argument("--quality", type=int, default=80)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ns = ap.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(pd.read_csv(ns.csv)["image_id"])
    files = sorted(p for d in ns.images for p in Path(d).glob("*.jpg") if p.stem in wanted)
    # a stored (uncompressed) zip: ~100 bytes per file of overhead where tar pads every file to 512-byte blocks
    with ProcessPoolExecutor(2) as pool, zipfile.ZipFile(out / "images.zip", "w", zipfile.ZIP_STORED) as archive:
        for stem, data in pool.map(shrink, [(str(p), ns.short, ns.quality) for p in files], chunksize=64):
            archive.writestr(f"{stem}.webp", data)
    (out / "HAM10000_metadata.csv").write_bytes(Path(ns.csv).read_bytes())
    backbone = timm.create_model(ns.backbone, num_classes=0)
    load_pretrained(backbone, ns.backbone, "offline")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in backbone.state_dict().items()},
               out / f"{ns.backbone}_fp16.pt")
    print(f"{len(files)} images -> {out / 'images.zip'} ({(out / 'images.zip').stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
