"""The flat-frame floor of the OOD check (skain.trust.ood.spread_floor) on a finished run: where real lesions,
their re-saved copies and non-dermoscopic probes fall against it, and a copy of the run's model with the floor
added, for `benchmarks.accuracy.reencode_effect --model` to score end to end.

    python -m benchmarks.accuracy.flat_floor RUN [--model-out benchmarks/out/flat_floor/model.pt]
        [--out benchmarks/out/flat_floor.json]

The floor is fit on the run's TRAINING images only (half the 0.1% quantile of their pixel spread, as `skain
train` fits it now); the test fold (chose nothing), its phone / WebP / screenshot copies (skain.data.degrade) and
the probes are only measured. Pixel spread needs no network: it is read on the model's input tensor.

In benchmarks/results/: flat_floor.json, this script on the plain `--holdout --fold 0` run of reencode_heldout.json
(docs/robustness.md, "Flat frames").
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import DATA_ROOT, OUT_DIR, ham10000, non_dermoscopic_probes, split_rows, what, write_json
from skain.data.degrade import COPIES, saved_copy
from skain.modelfile.bundle import atomic_torch_save
from skain.modelfile.load import read_bundle
from skain.training.trust_fit import image_spreads
from skain.trust.ood import spread_floor


def spreads(sources: list, bundle: dict) -> np.ndarray:
    """skAIn's own pixel spread (training.trust_fit.image_spreads), 64 images at a time."""
    return np.concatenate([image_spreads(bundle, sources[i:i + 64]) for i in range(0, len(sources), 64)])


def copy_bytes(path: str, copy: str) -> bytes:
    with Image.open(path) as img:
        return saved_copy(img.convert("RGB"), copy)


def summary(values: np.ndarray, floor: float) -> dict:
    return {"n": int(len(values)), "min": float(values.min()), "q001": float(np.quantile(values, 0.001)),
            "median": float(np.median(values)), "below_floor": float((values < floor).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a `skain train --holdout` run folder (split.csv with train and test rows)")
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--model-out", default=str(OUT_DIR / "flat_floor" / "model.pt"))
    ap.add_argument("--out", default=str(OUT_DIR / "flat_floor.json"))
    ns = ap.parse_args()
    run, started = Path(ns.run), time.perf_counter()
    bundle = read_bundle(run)
    frame = ham10000(ns.data_root, full=True)
    part = {k: split_rows(frame, run, k)["path"].astype(str).tolist() for k in ("train", "test")}
    train = spreads(part["train"], bundle)
    floor = spread_floor(train)
    rows = {"train (fits the floor)": summary(train, floor), "test original": summary(spreads(part["test"], bundle), floor)}
    for copy in COPIES:
        rows[f"test {copy} copy"] = summary(spreads([copy_bytes(p, copy) for p in part["test"]], bundle), floor)
    probes = {k: spreads(v, bundle) for k, v in non_dermoscopic_probes().items()}
    rows.update({f"probe {k}": summary(v, floor) for k, v in probes.items()})
    for name, r in rows.items():
        print(f"{name:24s} n={r['n']:5d} min {r['min']:.4f} q0.1% {r['q001']:.4f} median {r['median']:.4f} "
              f"below floor {100 * r['below_floor']:.1f}%")
    bundle["trust"]["ood"]["min_pixel_spread"] = floor
    Path(ns.model_out).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(bundle, ns.model_out)
    print(f"floor {floor:.4f}; model with the floor: {ns.model_out}")
    write_json(ns.out, {"what": what(__doc__), "run": str(run), "floor": floor, "rows": rows,
                        "seconds": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
