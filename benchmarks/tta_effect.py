"""Effect of test-time augmentation on balanced accuracy, on a real held-out (lesion-grouped) split.

    python benchmarks/tta_effect.py --model /tmp/bench/out/multimodal [--views 1 8] [--precision fast]
                                    [--data-root ../shared/ham10000] [--limit N]

Predicts the `val` rows of the model's own split.csv (lesions never seen in training) once per --views
setting through `Predictor.predict_frame`, and prints balanced accuracy, accuracy, macro AUC and melanoma
sensitivity for each, with the difference to 1 view.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from skain.evaluate import align, evaluate
from skain.predict import Predictor, prediction_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/bench/out/multimodal", help="output folder with best_model.pt + split.csv")
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "ham10000"))
    ap.add_argument("--views", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--precision", default="fast")
    ap.add_argument("--limit", type=int, default=None, help="first N validation images only")
    ap.add_argument("--cache-dir", default=None, help="pre-resized image cache (identical results, less decoding)")
    ap.add_argument("--out", default="benchmarks/out/tta_effect.json")
    args = ap.parse_args()
    root, model = Path(args.data_root), Path(args.model)
    val_ids = pd.read_csv(model / "split.csv").query("split == 'val'")["image_id"]
    frame, _ = prediction_table(csv=root / "metadata.csv", images=[root / "images"])
    frame = frame[frame["image_id"].isin(val_ids)].reset_index(drop=True).head(args.limit)
    results = {}
    for n in args.views:
        start = time.perf_counter()
        pred = Predictor.from_bundle(model, precision=args.precision, tta=n).predict_frame(
            frame, batch_size=16, cache_dir=args.cache_dir, progress=False)
        labels, probs, _ = align(pred, frame[["image_id", "dx"]])
        m = evaluate(labels, probs)
        results[n] = {"balanced_accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"],
                      "macro_auc": m["macro_auc"], "mel_sensitivity": m["melanoma"]["sensitivity"],
                      "n": m["n"], "seconds": time.perf_counter() - start}
        base = results[args.views[0]]["balanced_accuracy"]
        print(f"tta {n}: balanced accuracy {m['balanced_accuracy']:.4f} ({m['balanced_accuracy'] - base:+.4f}), "
              f"accuracy {m['accuracy']:.4f}, macro AUC {m['macro_auc']:.4f}, melanoma sensitivity "
              f"{m['melanoma']['sensitivity']:.4f}, n={m['n']}, {results[n]['seconds']:.0f}s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
