"""Would re-saving every input the same way first (a canonical copy) keep a re-saved lesion's decision?

    python -m benchmarks.accuracy.canonical_input [--model src/skain/models/ham10000.safetensors] [--limit 200]
        [--tta 1] [--run RUN] [--out benchmarks/out/canonical_input.json]

An experiment, not a feature: skAIn does not canonicalise its inputs. For a seeded sample of the shipped model's
validation images (10 folds, fold 0, split seed 42), or with `--run` a `--holdout` run's test fold, each image and
its `phone` and `webp` copies (`skain.data.degrade.COPIES`, the maintainers' re-saves) are predicted one by one
through `Predictor.predict_one` (decode, preprocess, the decision rule, the trust layer), first as they are, then
after each canonical re-save below: the image shrunk to a shorter side of S px (skAIn's resize_shorter) and saved
as JPEG quality Q. If the canonical copy of an original and the canonical copy of its phone re-save are nearly the
same pixels, their decisions agree more often; the cost is what the canonical re-save does to the originals'
balanced accuracy. The network was not trained or calibrated on canonical copies.

Writes --out: per mode, the balanced accuracy of the originals and of each copy, the share of decisions each copy
keeps, and the share turned away as not dermoscopic. In benchmarks/results/: canonical_input.json (2026-12-05,
the shipped file, 200 validation images, one view; docs/robustness.md).
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from benchmarks.common import DATA_ROOT, SHIPPED_MODEL, ham10000, shipped_validation, split_rows, what, write_json
from skain.data.degrade import encode, saved_copy
from skain.data.images import open_image, resize_shorter
from skain.inference.predictor import Predictor
from skain.trust.probes import to_png

MODES = {"none": None, "c256q75": (256, 75), "c256q90": (256, 90), "c224q60": (224, 60)}
COPIES = ("phone", "webp")


def canonical(img: Image.Image, mode: tuple[int, int] | None) -> Image.Image:
    """The image shrunk to a shorter side of S px and saved as JPEG quality Q (None: unchanged)."""
    if mode is None:
        return img
    side, quality = mode
    jpeg = encode(Image.fromarray(resize_shorter(img, side)), "JPEG", quality)
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def images(ns) -> pd.DataFrame:
    frame = ham10000(Path(ns.data_root), full=True)
    frame = split_rows(frame, ns.run, "test") if ns.run else shipped_validation(frame, ns.data_root)
    return frame.sample(n=min(ns.limit, len(frame)), random_state=0).reset_index(drop=True)


def summary(labels: list[str], got: dict[tuple[str, str], list[tuple[str, bool]]]) -> dict:
    """got[(version, mode)]: per image, (decided label, turned away) -> the figures of each mode."""
    out = {}
    for mode in MODES:
        orig = got[("original", mode)]
        row = {"balanced_accuracy_original": balanced_accuracy_score(labels, [d for d, _ in orig]),
               "turned_away_original": np.mean([away for _, away in orig])}
        for copy in COPIES:
            c = got[(copy, mode)]
            row[f"same_decision_{copy}"] = np.mean([a == b for (a, _), (b, _) in zip(orig, c)])
            row[f"balanced_accuracy_{copy}"] = balanced_accuracy_score(labels, [d for d, _ in c])
            row[f"turned_away_{copy}"] = np.mean([away for _, away in c])
        out[mode] = {k: round(float(v), 4) for k, v in row.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHIPPED_MODEL))
    ap.add_argument("--run", help="a `skain train --holdout` run folder: a sample of its test fold instead")
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--tta", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/out/canonical_input.json")
    ns = ap.parse_args()
    frame = images(ns)
    predictor = Predictor.from_bundle(ns.model, tta=ns.tta)
    got: dict[tuple[str, str], list[tuple[str, bool]]] = {(v, m): [] for v in ("original", *COPIES) for m in MODES}
    started = time.perf_counter()
    for _, row in frame.iterrows():
        img = open_image(row["path"])
        versions = {"original": img, **{c: Image.open(io.BytesIO(saved_copy(img, c))).convert("RGB") for c in COPIES}}
        age = None if pd.isna(row.get("age")) else float(row["age"])
        for version, x in versions.items():
            for mode, spec in MODES.items():
                p = predictor.predict_one(to_png(np.asarray(canonical(x, spec))), age=age, sex=row.get("sex"),
                                          site=row.get("localization"))
                got[(version, mode)].append((p.diagnosis, p.in_distribution is False))
    result = {"what": what(__doc__), "model": ns.model, "images": len(frame), "tta": ns.tta,
              "part": "test fold" if ns.run else "validation (10 folds, fold 0, split seed 42)",
              "seconds": round(time.perf_counter() - started, 1), "modes": summary(frame["dx"].tolist(), got)}
    write_json(ns.out, result, indent=1)
    for mode, row in result["modes"].items():
        print(mode, row)


if __name__ == "__main__":
    main()
