"""Effect of test-time augmentation on balanced accuracy, on a real held-out (lesion-grouped) split.

    python -m benchmarks.accuracy.tta_effect --model /tmp/bench/out/multimodal [--views 1 8] [--precision fast]
                                             [--data-root ../shared/ham10000] [--limit N]
                                             [--out benchmarks/out/tta_effect.json]

Predicts the `val` rows of the model's own split.csv (lesions never seen in training) once per --views
setting through `Predictor.predict_frame`, and prints balanced accuracy, accuracy, macro AUC and melanoma
sensitivity for each, with the difference to 1 view. Writes --out; none was kept in benchmarks/results/:
docs/predict.md, "Test-time augmentation", quotes the printed figures.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import DATA_ROOT, ham10000, split_rows, write_json
from skain.evaluation.evaluate import align, evaluate
from skain.inference.predictor import Predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/bench/out/multimodal", help="output folder with best_model.pt + split.csv")
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--views", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--precision", default="fast")
    ap.add_argument("--limit", type=int, default=None, help="first N validation images only")
    ap.add_argument("--cache-dir", default=None, help="pre-resized image cache (identical results, less decoding)")
    ap.add_argument("--out", default="benchmarks/out/tta_effect.json")
    args = ap.parse_args()
    model = Path(args.model)
    frame = split_rows(ham10000(args.data_root), model, "val").head(args.limit)
    results = {}
    for n in args.views:
        start = time.perf_counter()
        pred = Predictor.from_bundle(model, precision=args.precision, tta=n).predict_frame(
            frame, batch_size=16, cache_dir=args.cache_dir, progress=False)
        labels, probs = align(pred, frame[["image_id", "dx"]])[:2]
        m = evaluate(labels, probs)
        results[n] = {"balanced_accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"],
                      "macro_auc": m["macro_auc"], "mel_sensitivity": m["melanoma"]["sensitivity"],
                      "n": m["n"], "seconds": time.perf_counter() - start}
        base = results[args.views[0]]["balanced_accuracy"]
        print(f"tta {n}: balanced accuracy {m['balanced_accuracy']:.4f} ({m['balanced_accuracy'] - base:+.4f}), "
              f"accuracy {m['accuracy']:.4f}, macro AUC {m['macro_auc']:.4f}, melanoma sensitivity "
              f"{m['melanoma']['sensitivity']:.4f}, n={m['n']}, {results[n]['seconds']:.0f}s", flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
