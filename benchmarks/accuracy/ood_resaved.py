"""Does fitting the OOD check on re-saved copies keep them in distribution, and what does it let through?

    python -m benchmarks.accuracy.ood_resaved RUN [--train 1000 --val 700]

For a `skain train` run folder: backbone features of a sample of its training images and validation lesions,
and of one seeded re-saved copy of each (`skain.data.degrade.ResavedLoader`: downscale, JPEG/WebP, blur,
border), plus the non-dermoscopic probes that benchmarks.accuracy.reencode_effect scores too
(benchmarks.common.non_dermoscopic_probes: blank frames, noise, text, scikit-image photos). Prints, as JSON, the
share turned away at the 2% false-rejection threshold for three fits: originals only, originals + copies
(TrustSettings(ood_resaved=True)), and copies as classes of their own. That printed JSON for the plain run is
`ood_fit_ablation_plain_run` in benchmarks/results/reencode_heldout.json, copied in by hand (docs/robustness.md,
"Held-out test fold, with and without the re-save augmentation").
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import non_dermoscopic_probes
from skain.data.degrade import ResavedLoader
from skain.data.images import ImageLoader, default_cache_dir
from skain.modelfile.bundle import load_model
from skain.modelfile.load import read_bundle
from skain.training.trust_fit import extract, folder_split, image_features
from skain.trust.crossfit import Outputs, TrustSettings, ood_scorer
from skain.trust.ood import threshold_for_false_rejection


def shares(tr: Outputs, va: Outputs, copies: np.ndarray, probes: dict, s: TrustSettings) -> dict:
    scorer = ood_scorer(tr, va, s)
    thr = threshold_for_false_rejection(scorer.score(va.ood_features()), s.false_rejection)
    out = {"val": float((scorer.score(va.features) > thr).mean()),
           "val_copies": float((scorer.score(copies) > thr).mean())}
    return out | {k: float((scorer.score(f) > thr).mean()) for k, f in probes.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--val", type=int, default=700)
    ns = ap.parse_args()
    run = Path(ns.run)
    frame, tr_idx, va_idx, cfg = folder_split(run)
    rng = np.random.default_rng(0)
    tr_idx = rng.choice(tr_idx, min(ns.train, len(tr_idx)), replace=False)
    va_idx = rng.choice(va_idx, min(ns.val, len(va_idx)), replace=False)
    bundle, device = read_bundle(run / "best_model.pt"), torch.device("cpu")
    model = load_model(bundle).eval()
    loader = ImageLoader(cfg["preprocess"]["resize"], default_cache_dir())
    tr, va = (extract(model, bundle, frame.iloc[i], loader, device) for i in (tr_idx, va_idx))
    tr_copies, va_copies = (extract(model, bundle, frame.iloc[i], ResavedLoader(loader, 0), device).features
                            for i in (tr_idx, va_idx))
    probes = {k: image_features(model, bundle, v, device) for k, v in non_dermoscopic_probes().items()}
    s = TrustSettings()
    own = Outputs(tr.logits, np.r_[tr.labels, tr.labels + 7], np.r_[tr.features, tr_copies])
    result = {"fit on originals": shares(tr, va, va_copies, probes, s),
              "fit on originals + copies": shares(Outputs(tr.logits, tr.labels, tr.features, resaved=tr_copies),
                                                  Outputs(va.logits, va.labels, va.features, resaved=va_copies),
                                                  va_copies, probes, s),
              "copies as their own classes": shares(own, Outputs(va.logits, va.labels, va.features, resaved=va_copies),
                                                    va_copies, probes, s)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
