"""CPU time of test-fold scoring (`skain train`'s score_best: skain.evaluation.variants with 5 metadata variants and 8 TTA
views, batch 64, fp32) with and without the CPU pixel cap on batches (skain.inference.predictor.CPU_PIXELS_PER_BATCH).

    python -m benchmarks.speed.scoring_batch --model RUN/fold0 [--data-root ../shared/ham10000] [--images 192]
        [--rounds 2] [--out benchmarks/results/scoring_batch.json]

Each measurement is its own process (the allocator's state is per process), in alternating order; user and
system CPU seconds and minor page faults of the scoring call only (getrusage). `off` sets the cap so high that
every batch keeps its 64 images (the code before the cap). The model should be a bundle trained above 224 px
(e.g. `--input-size 288`); at 224 px the cap changes nothing.

benchmarks/results/scoring_batch.json is its --out for fold 0 of the 288 px k-fold run (docs/training.md, "288 px
and a third member"); the file's `in_training` block (the test-fold scoring inside `skain train` and
/usr/bin/time -v of that run, before and after the cap) was measured with skain commands and added by hand.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import DATA_ROOT, REPO_ROOT, cpu_seconds, ham10000, what, write_json


def measure(model: str, root: Path, images: int, cap: str) -> dict:
    from skain.runtime_env import prepare_process
    prepare_process()

    import skain.inference.predictor as predict_module
    from skain.evaluation.variants import assess
    if cap == "off":
        predict_module.CPU_PIXELS_PER_BATCH = 1 << 40
    meta = ham10000(root, full=True).head(images)
    predictor = predict_module.Predictor.from_bundle(model, device="cpu")
    before, t0 = cpu_seconds(), time.perf_counter()
    assess(predictor, meta, batch_size=64, cache_dir=None, views=8)
    user, sys_, faults = (a - b for a, b in zip(cpu_seconds(), before))
    return {"cap": cap, "wall_s": round(time.perf_counter() - t0, 1), "user_s": round(user, 1), "sys_s": round(sys_, 1),
            "minor_faults": faults, "batch": predictor.batch_size(64), "input_size": predictor.preprocess["input_size"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-root", type=Path, default=DATA_ROOT)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.model, a.data_root, a.images, a.one)))
        return
    rows = []
    for r in range(a.rounds):
        for cap in (("off", "on") if r % 2 == 0 else ("on", "off")):
            out = subprocess.run([sys.executable, "-m", "benchmarks.speed.scoring_batch", "--model",
                                  str(Path(a.model).resolve()), "--data-root", str(a.data_root.resolve()),
                                  "--images", str(a.images), "--one", cap],
                                 capture_output=True, text=True, check=True, cwd=REPO_ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    summary = {cap: {k: round(sum(x[k] for x in rows if x["cap"] == cap) / a.rounds, 1)
                     for k in ("wall_s", "user_s", "sys_s", "minor_faults")} for cap in ("off", "on")}
    result = {"what": what(__doc__), "model": a.model, "images": a.images, "rounds": rows,
              "mean": summary}
    print(json.dumps(summary))
    if a.out:
        write_json(a.out, result)


if __name__ == "__main__":
    main()
