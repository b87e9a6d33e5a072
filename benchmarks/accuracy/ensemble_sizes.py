"""Does an ensemble of members trained at different input sizes lose accuracy by resizing inside the network?

For each test fold k of two k-fold runs on one split (e.g. Lite0 @ 224 and Lite2 @ 260, `skain train --all-folds`),
build `skain ensemble --runs A/fold<k> B/fold<k>` (the smaller member gets the largest member's input resized
inside the network) and score fold k's test images through it (single view, `Predictor`), against the mean of the
two members' softmax of their stored test logits, each member on its own preprocessing (what `skain cv-report`
scores). The bundle's probabilities are calibrated, with a temperature fit on out-of-fold rows that include fold
k's test images, so its AUC is not independent of them; arg-max decisions (balanced accuracy) are untouched by
the temperature.

    python -m benchmarks.accuracy.ensemble_sizes --runs LITE0_RUN LITE2_RUN --data ../shared/ham10000 \\
        --work /tmp/ens_sizes [--folds 0 1 2 3 4] [--floor] [--out benchmarks/out/ensemble_sizes.json]

`--floor` also scores the first run's fold-0 member alone three ways on its test images: its own preprocessing,
the second run's input resized inside (what the ensemble feeds it), and its own path with a 1-pixel larger resize
(the model's sensitivity to any resampling change).

Writes --out when given. Its figures are in benchmarks/results/cpu_cv_lite0_lite2.json, copied in by hand:
`ensemble_bundle_per_fold` and `resize_floor_fold0_lite0_member` (docs/ensembles.md, "What is combined, and how").
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from benchmarks.common import write_json
from skain.inference.predictor import Predictor, prediction_table
from skain.metrics import classification_metrics
from skain.modelfile.load import read_bundle
from skain.training.ensemble import build_ensemble


def test_frame(data: str, runs: list[Path], k: int) -> tuple[pd.DataFrame, list[np.lib.npyio.NpzFile]]:
    """Fold k's test images (in the stored logits' order) and each run's stored test logits."""
    stored = [np.load(r / f"fold{k}" / "test_logits.npz") for r in runs]
    ids = stored[0]["image_id"]
    if not all(len(s["image_id"]) == len(ids) and (s["image_id"] == ids).all() for s in stored):
        raise SystemExit(f"fold {k}: the runs scored different test images (not the same split)")
    frame, _ = prediction_table(data, None, [], False)
    return frame.set_index("image_id").loc[ids].reset_index(), stored


def scores(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    m = classification_metrics(y, probs, classes)
    mel = classes.index("mel")
    return {"balanced_accuracy": m["balanced_accuracy"], "macro_auc": m["macro_auc"],
            "mel_recall": float((probs.argmax(1)[y == mel] == mel).mean())}


def fold_row(data: str, runs: list[Path], k: int, work: Path) -> dict:
    frame, stored = test_frame(data, runs, k)
    path = build_ensemble([r / f"fold{k}" for r in runs], work / f"fold{k}")
    predictor = Predictor.from_bundle(path)
    classes = predictor.classes
    start = time.perf_counter()
    got = predictor.predict_frame(frame, progress=False, num_workers=1)[[f"p_{c}" for c in classes]].to_numpy()
    seconds = time.perf_counter() - start
    own = np.mean([torch.from_numpy(s["present"].astype(np.float64)).softmax(1).numpy() for s in stored], 0)
    y = frame["dx"].map(classes.index).to_numpy()
    return {"fold": k, "images": len(y), "seconds": round(seconds, 1),
            "top1_agreement": float((got.argmax(1) == own.argmax(1)).mean()),
            "bundle": scores(y, got, classes), "members_own_preprocessing": scores(y, own, classes)}


class Resized(torch.nn.Module):
    """A backbone fed a larger input resized to `size` first, as EnsembleBackbone does for smaller members."""

    def __init__(self, inner: torch.nn.Module, size: int):
        super().__init__()
        self.inner, self.size = inner, size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.inner(F.interpolate(image, size=(self.size, self.size), mode="bilinear", align_corners=False))


def floor(data: str, runs: list[Path]) -> dict:
    frame, _ = test_frame(data, runs, 0)
    bundle, other = read_bundle(runs[0] / "fold0"), read_bundle(runs[1] / "fold0")
    bundle["trust"] = {**(bundle.get("trust") or {}), "temperature": 1.0}  # raw softmax: paths compare as equals
    pre = bundle["preprocess"]
    out = {}
    for name, change in (("own", {}), ("resized_inside", {k: other["preprocess"][k] for k in ("input_size", "resize")}),
                         ("resize_plus_1", {"resize": pre["resize"] + 1})):
        p = Predictor({**bundle, "preprocess": {**pre, **change}})
        if name == "resized_inside":
            p.model.backbone = Resized(p.model.backbone, pre["input_size"])
        out[name] = p.predict_frame(frame, progress=False, cache_dir="off")[[f"p_{c}" for c in p.classes]].to_numpy()
    y = frame["dx"].map(p.classes.index).to_numpy()
    return {name: {**scores(y, probs, p.classes),
                   "top1_agreement_with_own": float((probs.argmax(1) == out["own"].argmax(1)).mean()),
                   "mean_abs_probability_change": float(np.abs(probs - out["own"]).mean())}
            for name, probs in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs=2, type=Path, required=True, help="two k-fold runs on the same split")
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", type=Path, required=True, help="where the per-fold ensembles are written")
    ap.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--floor", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rows = [fold_row(a.data, a.runs, k, a.work) for k in a.folds]
    diff = [r["bundle"]["balanced_accuracy"] - r["members_own_preprocessing"]["balanced_accuracy"] for r in rows]
    result = {"folds": rows, "balanced_accuracy_difference_per_fold": [round(d, 4) for d in diff]}
    for r in rows:
        print(f"fold {r['fold']}: bundle BA {r['bundle']['balanced_accuracy']:.4f} vs own preprocessing "
              f"{r['members_own_preprocessing']['balanced_accuracy']:.4f}, top-1 agreement {r['top1_agreement']:.3f}")
    print(f"mean difference {np.mean(diff):+.4f} ({sum(d >= 0 for d in diff)} of {len(diff)} folds not worse)")
    if a.floor:
        result["floor"] = floor(a.data, a.runs)
        print(json.dumps(result["floor"], indent=1))
    if a.out:
        write_json(a.out, result, indent=1)


if __name__ == "__main__":
    main()
