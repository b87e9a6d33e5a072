"""Fit and measure the trust layer (temperature, malignancy triage, OOD rejection) on a finished run.

    python -m benchmarks.accuracy.trust_eval --model /tmp/bench/out/multimodal [--cache-dir /tmp/skcache] \\
        [--out benchmarks/out/trust] [--detect-only]

Uses the run's own split.csv: the OOD Gaussians are fit on its training rows, everything else on its
validation rows; "held-out" figures are cross-fitted over two lesion-grouped halves of validation.
Non-dermoscopic images: real photos shipped with scikit-image (pip install scikit-image), split into a
TUNING set (chooses the OOD scorer: normalised + raw features, or one of them) and a disjoint REPORT set (the
reported detection rate), plus blank frames, noise and text screenshots generated with different seeds for each
set. The report set goes through the real Predictor (decode -> resize -> crop -> model -> trust layer), as uploads
would.
The run folder is not modified: the bundle copy with the trust block, reliability.png, model_card.md and
trust_eval.json go to --out. No trust_eval.json was kept in benchmarks/results/: docs/trust.md, "Measured", quotes
the printed summaries.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import write_json
from skain.data.images import ImageLoader
from skain.engine import resolve_device
from skain.inference.predictor import Predictor
from skain.modelfile.bundle import BUNDLE_NAME, atomic_torch_save, load_model
from skain.modelfile.load import read_bundle
from skain.training.trust_fit import extract, folder_split, image_features, write_reports
from skain.trust.crossfit import Outputs, TrustSettings, assemble, halves, ood_scorer
from skain.trust.ood import threshold_for_false_rejection
from skain.trust.probes import probe_set, to_png

TUNING_PHOTOS = ("astronaut", "camera", "brick", "coins", "moon", "colorwheel", "immunohistochemistry",
                 "checkerboard", "stereo_motorcycle")
REPORT_PHOTOS = ("chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "grass", "gravel", "clock",
                 "cell", "page", "text", "horse", "logo", "microaneurysms")


def as_rgb(arr: np.ndarray) -> np.ndarray:
    """A scikit-image sample as H x W x 3 uint8: grey and boolean images repeated over three channels (slicing
    `[..., :3]` on a grey image would cut it into a strip 3 pixels wide), RGBA without its alpha."""
    arr = arr.astype(np.uint8) * (255 if arr.dtype == bool else 1)
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr[..., :3]


def photo_variants(names: tuple[str, ...], seed: int, crops: int = 4) -> dict[str, list[bytes]]:
    """Each scikit-image sample photo whole plus `crops` random crops (40-80 % of each side)."""
    import skimage.data as sk
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        arr = getattr(sk, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr
        arr = as_rgb(arr)
        h, w = arr.shape[:2]
        views = [arr]
        for _ in range(crops):
            ch, cw = int(h * rng.uniform(0.4, 0.8)), int(w * rng.uniform(0.4, 0.8))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            views.append(arr[y:y + ch, x:x + cw])
        out[f"photo:{name}"] = [to_png(v) for v in views]  # prefixed: skimage's "text" photo vs the text probes
    return out


def cached_outputs(path: Path, run: Path, compute, train_idx, val_idx) -> tuple[Outputs, Outputs]:
    """Logits/labels/features of both splits, reused while the bundle file is unchanged (reruns are cheap)."""
    stamp = f"{(run / BUNDLE_NAME).resolve()}|{(run / BUNDLE_NAME).stat().st_mtime_ns}"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        if str(z["stamp"]) == stamp:
            return tuple(Outputs(z[f"{s}_logits"], z[f"{s}_labels"], z[f"{s}_features"]) for s in ("tr", "va"))
    tr, va = compute(train_idx), compute(val_idx)
    np.savez(path, stamp=stamp, **{f"{s}_{k}": getattr(o, k) for s, o in (("tr", tr), ("va", va))
                                   for k in ("logits", "labels", "features")})
    return tr, va


CANDIDATES = {"max": {"ood_method": "max"},  # larger of the normalised and the raw scorer
              "normalised": {"ood_method": "single", "ood_normalize": True},
              "raw": {"ood_method": "single", "ood_normalize": False}}


def tune(tr, va, tuning: dict[str, np.ndarray], rate: float) -> tuple[dict, dict]:
    """Pick the OOD scorer by mean detection on the TUNING images at the stated false-rejection rate."""
    rows = {}
    for name, choice in CANDIDATES.items():
        scorer = ood_scorer(tr, va, TrustSettings(false_rejection=rate, **choice))
        thr = threshold_for_false_rejection(scorer.score(va.features), rate)
        rows[name] = {k: float((scorer.score(f) > thr).mean()) for k, f in tuning.items()}
    best = max(rows, key=lambda n: np.mean(list(rows[n].values())))
    return CANDIDATES[best], rows


def report_detection(predictor: Predictor, images: dict[str, list[bytes]]) -> dict[str, dict]:
    """Share of each group the shipped Predictor flags as not dermoscopic."""
    out = {}
    for name, blobs in images.items():
        flags = [predictor.predict_one(b).in_distribution is False for b in blobs]
        out[name] = {"n": len(flags), "rejected": int(sum(flags))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/bench/out/multimodal", help="a finished training output folder")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default="benchmarks/out/trust")
    ap.add_argument("--false-rejection", type=float, default=TrustSettings.false_rejection)
    ap.add_argument("--target-sensitivity", type=float, default=TrustSettings.target_sensitivity)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scorer", default="tuned", choices=["tuned", *CANDIDATES],
                    help="OOD scorer to report: the one the TUNING photos choose, or a named one")
    ap.add_argument("--detect-only", action="store_true",
                    help="use the trust block training already stored in the bundle; only measure OOD detection "
                         "on the photo sets (no feature pass over the data, no tuning)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run, out = Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.detect_only:
        return detect_only(run, out, args.device)
    started = time.perf_counter()
    frame, train_idx, val_idx, cfg = folder_split(run)
    bundle, device = read_bundle(run), resolve_device(args.device)
    model = load_model(bundle).to(device)
    loader = ImageLoader(cfg["preprocess"]["resize"], args.cache_dir)
    tr, va = cached_outputs(out / "features.npz", run, lambda idx: extract(model, bundle, frame.iloc[idx], loader,
                                                                          device), train_idx, val_idx)
    settings = TrustSettings(target_sensitivity=args.target_sensitivity, false_rejection=args.false_rejection)

    tuning_imgs = {**photo_variants(TUNING_PHOTOS, seed=1), **probe_set(seed=11)}
    tuning = {k: image_features(model, bundle, v, device) for k, v in tuning_imgs.items()}
    chosen, tuning_rows = tune(tr, va, tuning, settings.false_rejection)
    if args.scorer != "tuned":  # measure a named scorer (e.g. the training default) instead of the tuned one
        chosen = CANDIDATES[args.scorer]
    settings = replace(settings, **chosen)
    probes = {k: image_features(model, bundle, v, device) for k, v in probe_set(seed=settings.seed).items()}
    figures = assemble(bundle, tr, va, halves(frame.iloc[val_idx], settings.seed), probes, settings)
    atomic_torch_save(bundle, out / BUNDLE_NAME)
    write_reports(out, va, bundle["trust"]["temperature"], bundle["model_card"], settings.ece_bins)

    report_imgs = {**photo_variants(REPORT_PHOTOS, seed=2), **probe_set(seed=22)}
    detection = report_detection(Predictor(bundle, device=args.device), report_imgs)
    photos = [d for k, d in detection.items() if k.startswith("photo:")]
    totals = {"photos": sum(d["rejected"] for d in photos) / sum(d["n"] for d in photos),
              "all": sum(d["rejected"] for d in detection.values()) / sum(d["n"] for d in detection.values())}
    result = {"model": str(run), "figures": figures, "tuning": {"chosen": chosen, "rows": tuning_rows,
              "photos": list(TUNING_PHOTOS)}, "report_detection": detection, "report_detection_rate": totals,
              "report_photos": list(REPORT_PHOTOS), "seconds": time.perf_counter() - started}
    write_json(out / "trust_eval.json", result)
    print_summary(result)


def detect_only(run: Path, out: Path, device: str) -> None:
    """Figures from the bundle's own trust block (fit at training time) + photo detection, no refit."""
    started = time.perf_counter()
    bundle = read_bundle(run)
    if "trust" not in bundle:
        raise SystemExit(f"{run}: bundle has no trust block; run without --detect-only (or `skain calibrate`)")
    predictor = Predictor(bundle, device=device)
    tuning = report_detection(predictor, {**photo_variants(TUNING_PHOTOS, seed=1), **probe_set(seed=11)})
    detection = report_detection(predictor, {**photo_variants(REPORT_PHOTOS, seed=2), **probe_set(seed=22)})
    photos = [d for k, d in detection.items() if k.startswith("photo:")]
    totals = {"photos": sum(d["rejected"] for d in photos) / sum(d["n"] for d in photos),
              "all": sum(d["rejected"] for d in detection.values()) / sum(d["n"] for d in detection.values())}
    figures = bundle["trust"]["figures"]
    method = figures["ood"].get("method")
    rows = {f"{method} (not tuned)": {k: d["rejected"] / d["n"] for k, d in tuning.items()}}
    result = {"model": str(run), "figures": figures, "tuning": {"chosen": method,
              "rows": rows, "photos": list(TUNING_PHOTOS)}, "report_detection": detection,
              "report_detection_rate": totals, "report_photos": list(REPORT_PHOTOS),
              "seconds": time.perf_counter() - started}
    write_json(out / "trust_eval.json", result, default=float)
    print_summary(result)


def print_summary(r: dict) -> None:
    f = r["figures"]
    c, t, o = f["calibration"], f["triage"], f["ood"]
    hc, ht = c.get("held_out", {}), t.get("held_out", {})
    print(f"\nmodel {r['model']}: {f['train_images']} train / {f['validation_images']} validation images")
    print(f"calibration  T={c['temperature']:.3f}  ECE(15) {c['ece_before']:.4f} -> {c['ece_after']:.4f}  "
          f"NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}  (validation, in-sample)")
    print(f"             held-out ECE {hc.get('ece_before', float('nan')):.4f} -> {hc.get('ece_after', float('nan')):.4f}"
          f"  NLL {hc.get('nll_before', float('nan')):.4f} -> {hc.get('nll_after', float('nan')):.4f}")
    if t.get("threshold") is not None:
        mel = t["melanoma_sensitivity_at_specificity"]
        print(f"triage       threshold {t['threshold']:.4f}: sens {t['sensitivity']:.3f} spec {t['specificity']:.3f} "
              f"(validation); held-out sens {ht.get('sensitivity', float('nan')):.3f} "
              f"spec {ht.get('specificity', float('nan')):.3f}")
        print(f"             melanoma sens at 80%/90% spec: {mel['0.80']:.3f} / {mel['0.90']:.3f}; at triage "
              f"threshold {t['melanoma_sensitivity_at_threshold']:.3f}")
    print(f"OOD          target false rejection {o['target_false_rejection']:.3f}: validation {o['val_false_rejection']:.3f}, "
          f"held-out {o.get('held_out_false_rejection', float('nan')):.3f}  (scorer: {r['tuning']['chosen']})")
    print("             tuning detection: " + "; ".join(f"{k}: " + ", ".join(f"{g} {v:.2f}" for g, v in row.items())
                                                         for k, row in r["tuning"]["rows"].items()))
    print("             REPORT detection: "
          + ", ".join(f"{k} {d['rejected']}/{d['n']}" for k, d in r["report_detection"].items()))
    print(f"             REPORT detection rate: photos {r['report_detection_rate']['photos']:.3f}, "
          f"all non-dermoscopic {r['report_detection_rate']['all']:.3f}   ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
