"""Does the web app's default inference ("fast") give the answers of the fp32 reference, image by image?

    python -m benchmarks.accuracy.fast_parity [--model src/skain/models/ham10000.safetensors] [--limit 500]
        [--out benchmarks/out/fast_parity.json]

`skain serve` answers with precision "fast" (the exported graph in OpenVINO on CPU where installed), `skain
predict` with PyTorch fp32. A seeded sample of the shipped model's validation images (10 folds, fold 0, split seed
42, the images that chose its epochs and thresholds), each with its age, sex and site, goes through
`Predictor.predict_one` on the file's bytes, the web app's own call, once per precision, both at the model's own
default views. Reported: the share of images with the same decision (the decision rule's class), the same triage
and the same "not dermoscopic" verdict; the largest probability, p(malignant) and relative OOD-score differences;
and each precision's p50 per image (interleaved, image by image, so a busy machine slows both alike).

Writes --out; benchmarks/results/fast_parity.json is the shipped file, 500 images (2026-12-06; docs/performance.md,
"Web latency and load").
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import (
    DATA_ROOT,
    SHIPPED_MODEL,
    ham10000,
    load_average,
    percentiles_ms,
    shipped_validation,
    what,
    write_json,
)
from skain.inference.predictor import Prediction, Predictor

PRECISIONS = ("fp32", "fast")


def validation_sample(root: Path, limit: int) -> pd.DataFrame:
    """A seeded sample of the shipped model's validation images (10 folds, fold 0, split seed 42)."""
    frame = shipped_validation(ham10000(root, full=True), root)
    return frame.sample(n=min(limit, len(frame)), random_state=0).reset_index(drop=True)


def agreement(ref: list[Prediction], fast: list[Prediction]) -> dict:
    """How far the fast answers are from the reference: shares that agree, largest differences."""
    def share(field: str) -> float:
        return float(np.mean([getattr(a, field) == getattr(b, field) for a, b in zip(ref, fast)]))
    p_diff = max(max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.probabilities) for a, b in zip(ref, fast))
    malignant = [abs(a.p_malignant - b.p_malignant) for a, b in zip(ref, fast) if a.p_malignant is not None]
    ood = [abs(a.ood_score - b.ood_score) / a.ood_score for a, b in zip(ref, fast) if a.ood_score]
    return {"same_decision": share("diagnosis"), "same_triage": share("triage"),
            "same_in_distribution": share("in_distribution"), "max_probability_difference": float(p_diff),
            "max_p_malignant_difference": float(max(malignant, default=0.0)),
            "max_relative_ood_score_difference": float(max(ood, default=0.0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHIPPED_MODEL))
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--out", default="benchmarks/out/fast_parity.json")
    ns = ap.parse_args()
    frame = validation_sample(Path(ns.data_root), ns.limit)
    predictors = {p: Predictor.from_bundle(ns.model, precision=p) for p in PRECISIONS}
    answers: dict[str, list[Prediction]] = {p: [] for p in PRECISIONS}
    seconds: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    load_before = load_average()
    for _, row in frame.iterrows():
        image = Path(row["path"]).read_bytes()
        age = None if pd.isna(row["age"]) else float(row["age"])
        for name, predictor in predictors.items():
            start = time.perf_counter()
            answers[name].append(predictor.predict_one(image, age, row["sex"], row["localization"]))
            seconds[name].append(time.perf_counter() - start)
    result = {"what": what(__doc__), "model": ns.model, "images": len(frame),
              "inference": {p: predictors[p].info["inference"] for p in PRECISIONS},
              "load_before": load_before, "load_after": load_average(),
              "agreement": {k: round(v, 6) for k, v in agreement(answers["fp32"], answers["fast"]).items()},
              "p50_ms": {p: round(percentiles_ms(seconds[p], (50,))["p50_ms"], 1) for p in PRECISIONS}}
    write_json(ns.out, result, indent=1)
    print(result["inference"]["fast"], result["agreement"], result["p50_ms"])


if __name__ == "__main__":
    main()
