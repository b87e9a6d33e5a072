"""CPU time of test-fold scoring (`skain train`'s score_best: skain.assess with 5 metadata variants and 8 TTA
views, batch 64, fp32) with and without the CPU pixel cap on batches (skain.predict.CPU_PIXELS_PER_BATCH).

    python benchmarks/scoring_batch.py --model RUN/fold0 --data-root ../shared/ham10000 [--images 192] [--rounds 2]

Each measurement is its own process (the allocator's state is per process), in alternating order; user and
system CPU seconds and minor page faults of the scoring call only (getrusage). `off` sets the cap so high that
every batch keeps its 64 images (the code before the cap). The model should be a bundle trained above 224 px
(e.g. `--input-size 288`); at 224 px the cap changes nothing.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(model: str, root: Path, images: int, cap: str) -> dict:
    from skain.runtime_env import prepare_process
    prepare_process()
    import pandas as pd

    import skain.predict as predict_module
    from skain.assess import assess
    if cap == "off":
        predict_module.CPU_PIXELS_PER_BATCH = 1 << 40
    meta = pd.read_csv(root / "HAM10000_metadata.csv").head(images)
    folders = [root / "images", root / "images_part_2"]
    meta["path"] = [str(next(p for f in folders if (p := f / f"{i}.jpg").exists())) for i in meta["image_id"]]
    predictor = predict_module.Predictor.from_bundle(model, device="cpu")
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    assess(predictor, meta, batch_size=64, cache_dir=None, views=8)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"cap": cap, "wall_s": round(time.perf_counter() - t0, 1),
            "user_s": round(after.ru_utime - before.ru_utime, 1), "sys_s": round(after.ru_stime - before.ru_stime, 1),
            "minor_faults": after.ru_minflt - before.ru_minflt,
            "batch": predictor.batch_size(64), "input_size": predictor.preprocess["input_size"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-root", type=Path, default=Path("../shared/ham10000"))
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
            out = subprocess.run([sys.executable, __file__, "--model", a.model, "--data-root", str(a.data_root),
                                  "--images", str(a.images), "--one", cap], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    summary = {cap: {k: round(sum(x[k] for x in rows if x["cap"] == cap) / a.rounds, 1)
                     for k in ("wall_s", "user_s", "sys_s", "minor_faults")} for cap in ("off", "on")}
    result = {"what": __doc__.split("\n\n")[0], "model": a.model, "images": a.images, "rounds": rows,
              "mean": summary}
    print(json.dumps(summary))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
