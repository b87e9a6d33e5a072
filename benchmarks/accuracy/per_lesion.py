"""Does one answer per lesion (the mean of its images' log-probabilities) change balanced accuracy, on the lesions
with several images? And how long do 2,000 lesion-level bootstrap resamples of all 10,015 HAM10000 images take?

    python -m benchmarks.accuracy.per_lesion [--runs outputs/exp/plain outputs/exp/photo] \\
        [--out benchmarks/results/per_lesion.json]

For each run folder's held-out predictions (`test_predictions.csv` of a `skain train --holdout` run: a test fold
that chose nothing), lesion_id is joined from HAM10000_metadata.csv and the lesions with two images or more are
scored twice: per image (each image its own answer, as `skain evaluate` does) and per lesion (skain.inference.lesion,
as `skain predict --per-lesion` does; the runs' `pred` is the arg-max, so the lesion's answer is the arg-max of its
averaged probabilities). Both are scored on the SAME 2,000 resamples of lesions within their class
(skain.evaluation.bootstrap.paired_levels), so the interval of the difference is the paired one. Figures on all of
the fold's lesions (one-image lesions included) are recorded too.

The timing part scores synthetic predictions (random probabilities, the real diagnoses and lesion ids of all 10,015
images) with skain.evaluation.bootstrap.bootstrap (every metric, 2,000 lesion resamples) and paired (two models).
benchmarks/results/per_lesion.json is its output (docs/trust.md, "Per lesion").
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import DATA_ROOT, REPO_ROOT, RESULTS_DIR, load_average, what, write_json
from skain.data.schema import CLASSES
from skain.evaluation.bootstrap import Sample, bootstrap, paired
from skain.evaluation.evaluate import read_predictions
from skain.evaluation.lesions import lesion_level, lesion_predictions

KEYS = ("balanced_accuracy", "macro_auc", "melanoma_auc")


def run_figures(run: Path, metadata: pd.DataFrame, resamples: int, seed: int) -> dict:
    pred = read_predictions(run / "test_predictions.csv").drop(columns=["dx"], errors="ignore")
    truth = metadata[metadata["image_id"].isin(set(pred["image_id"]))][["image_id", "dx", "lesion_id"]]
    level = lesion_level(pred, truth, resamples=resamples, seed=seed)
    if level is None:
        raise SystemExit(f"{run}: no lesion with several images among its predictions")
    vs = level["vs_image_level"]
    lesions = lesion_predictions(pred, truth)
    multi = lesions[lesions["n_images"] > 1]
    per_image = truth.merge(pred[["image_id", "pred"]], on="image_id")
    per_image = per_image[per_image["lesion_id"].isin(set(multi["lesion_id"]))]
    split = per_image.groupby("lesion_id")["pred"].nunique()
    changed = per_image["pred"].to_numpy() != per_image["lesion_id"].map(multi.set_index("lesion_id")["pred"]).to_numpy()
    return {"predictions": str((run / "test_predictions.csv").relative_to(REPO_ROOT)),
            "images": int(len(truth)), "lesions": int(level["lesions"]),
            "multi_image_lesions": int(len(multi)), "multi_image_images": int(multi["n_images"].sum()),
            "multi_image_lesions_whose_images_disagree": int((split > 1).sum()),
            "multi_image_images_whose_answer_the_lesion_changes": int(changed.sum()),
            "multi_image": {k: vs["metrics"][k] for k in KEYS}
            | {f"recall_{c}": vs["metrics"][f"recall_{i}"] for i, c in enumerate(CLASSES)},
            "all_lesions_lesion_level": {k: {"value": level["intervals"]["metrics"][k]["value"],
                                             "ci": level["intervals"]["metrics"][k]["ci"]} for k in KEYS}}


def timing(metadata: pd.DataFrame, resamples: int, seed: int) -> dict:
    """2,000 lesion resamples of all images: every metric of one model, and the paired comparison of two."""
    rng = np.random.default_rng(seed)
    labels = metadata["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    groups = metadata["lesion_id"].astype(str).to_numpy()

    def fake() -> Sample:
        z = rng.normal(size=(len(labels), len(CLASSES)))
        z[np.arange(len(labels)), labels] += 1.5
        probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        return Sample(labels, probs, probs.argmax(1), mel=CLASSES.index("mel"))

    a, b = fake(), fake()
    start = time.perf_counter()
    bootstrap(a, groups, resamples=resamples, seed=seed)
    one = time.perf_counter() - start
    start = time.perf_counter()
    paired(a, b, groups, resamples=resamples, seed=seed)
    two = time.perf_counter() - start
    return {"images": int(len(labels)), "lesions": int(len(np.unique(groups))), "resamples": resamples,
            "metrics": "balanced accuracy, 7 recalls, macro AUC (7 one-vs-rest AUCs), melanoma AUC, ECE",
            "bootstrap_seconds": round(one, 2), "paired_seconds": round(two, 2), "cpus": os.cpu_count(),
            "load_avg_1min": load_average()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", type=Path,
                    default=[REPO_ROOT / "outputs" / "exp" / "plain", REPO_ROOT / "outputs" / "exp" / "photo"],
                    help="run folders with test_predictions.csv (held-out test folds)")
    ap.add_argument("--metadata", type=Path, default=DATA_ROOT / "HAM10000_metadata.csv")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "per_lesion.json")
    args = ap.parse_args()
    metadata = pd.read_csv(args.metadata)
    result = {"what": what(__doc__), "resamples": args.resamples, "seed": args.seed,
              "level": 0.95, "unit": "lesions resampled within their diagnosis",
              "difference": "lesion level minus image level, paired (the same lesion resamples)",
              "runs": {run.name: run_figures(run.resolve(), metadata, args.resamples, args.seed) for run in args.runs},
              "timing": timing(metadata, args.resamples, args.seed)}
    for name, r in result["runs"].items():
        ba = r["multi_image"]["balanced_accuracy"]
        print(f"{name}: {r['multi_image_lesions']} lesions with several images ({r['multi_image_images']} images): "
              f"balanced accuracy per image {ba['a']:.3f} {ba['ci_a']}, per lesion {ba['b']:.3f} {ba['ci_b']}, "
              f"difference {ba['difference']:+.3f} [{ba['ci'][0]:+.3f}, {ba['ci'][1]:+.3f}]")
    t = result["timing"]
    print(f"timing: {t['resamples']} resamples of {t['images']} images ({t['lesions']} lesions): "
          f"{t['bootstrap_seconds']} s one model, {t['paired_seconds']} s paired")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
