"""How much smaller does packing the OOD check's whiteners make a portable model file, and do its OOD scores and
verdicts stay the same?

    python -m benchmarks.accuracy.compact_ood [--model src/skain/models/ham10000.safetensors]
        [--compact /tmp/compact.safetensors] [--n 200] [--out benchmarks/out/compact_ood.json]

The model is exported in float16 through skain.modelfile.portable twice: in the layout written before packing
(whiteners full and as fitted; the two packing steps patched out) and in today's (symmetric whiteners, packed upper
triangle). Both files and the original are loaded with skAIn's loader and run through the Predictor on `--n`
seeded real images of the shared HAM10000 sample (with their metadata) and on skAIn's probes (blank frames, noise,
text screenshots): the OOD score and verdict each file gives, compared with the original file's. The model file
given is only read.

In benchmarks/results/: compact_ood.json, this script on the shipped model (portable.py's docstring, docs/predict.md).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd

from benchmarks.common import OUT_DIR, REPO_ROOT, SHIPPED_MODEL, ham10000, what, write_json
from skain.data.layout import Source, load_table
from skain.inference.predictor import Predictor
from skain.modelfile import portable
from skain.modelfile.load import read_bundle
from skain.trust.probes import probe_set


def export_full(bundle: dict, path: Path) -> Path:
    """The layout before packing: whiteners stored D x D as they are, no marker."""
    with mock.patch.object(portable, "symmetric_state", lambda state: state), \
            mock.patch.object(portable, "is_symmetric", lambda matrix: False):
        return portable.export_portable(bundle, path, "float16")


def probe_frame(folder: Path) -> pd.DataFrame:
    for kind, images in probe_set(seed=0).items():
        for i, png in enumerate(images):
            (folder / f"{kind}_{i}.png").write_bytes(png)
    return load_table(Source(None, [folder], "explicit"), require=("image_id",))


def ood(model: Path, frame: pd.DataFrame) -> pd.DataFrame:
    table = Predictor.from_bundle(model, device="cpu").predict_frame(frame, progress=False)
    return table[["image_id", "ood_score", "ood", *[c for c in table if c.startswith("p_")]]]


def compare(ref: pd.DataFrame, got: pd.DataFrame) -> dict:
    a, b = ref["ood_score"].to_numpy(np.float64), got["ood_score"].to_numpy(np.float64)
    probs = [c for c in ref if c.startswith("p_") and c != "p_malignant"]
    return {"images": len(ref), "rejected": int(ref["ood"].astype(bool).sum()),
            "ood_score_max_rel_diff": float(np.max(np.abs(a - b) / np.abs(a))),
            "verdict_agreement": float((ref["ood"].to_numpy() == got["ood"].to_numpy()).mean()),
            "max_prob_diff": float(np.abs(ref[probs].to_numpy() - got[probs].to_numpy()).max())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    parser.add_argument("--compact", type=Path, default=Path(tempfile.gettempdir()) / "compact.safetensors")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "compact_ood.json")
    args = parser.parse_args(argv)
    if args.compact.resolve() == args.model.resolve():
        parser.error("--compact must not be the model file itself")
    bundle = read_bundle(args.model)
    start = time.perf_counter()
    portable.export_portable(bundle, args.compact, "float16")
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="compact-ood-") as tmp:
        full = export_full(bundle, Path(tmp) / "full.safetensors")
        sizes = {"original": args.model.stat().st_size, "float16_full_whiteners": full.stat().st_size,
                 "float16_packed_whiteners": args.compact.stat().st_size}
        (Path(tmp) / "probes").mkdir()
        frames = {"real": ham10000().sample(args.n, random_state=0).reset_index(drop=True),
                  "probes": probe_frame(Path(tmp) / "probes")}
        runs = {name: {f: ood(m, frame) for f, m in (("original", args.model), ("full", full),
                                                      ("compact", args.compact))} for name, frame in frames.items()}
    model = args.model.resolve()
    result = {"what": what(__doc__), "model": str(model.relative_to(REPO_ROOT) if model.is_relative_to(REPO_ROOT) else model),
              "date": time.strftime("%Y-%m-%d"), "sizes_bytes": sizes,
              "export_seconds_packed": round(seconds, 2),
              "compact_vs_original": {name: compare(r["original"], r["compact"]) for name, r in runs.items()},
              "full_vs_original": {name: compare(r["original"], r["full"]) for name, r in runs.items()}}
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
