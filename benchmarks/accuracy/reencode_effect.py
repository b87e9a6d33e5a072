"""How much a model's answers move when the same images are saved again in another encoding.

    python -m benchmarks.accuracy.reencode_effect [--model src/skain/models/ham10000.safetensors]
        [--data-root ../shared/ham10000] [--folds 10 --fold 0] [--out benchmarks/results/reencode_effect.json]
    python -m benchmarks.accuracy.reencode_effect --run outputs/RUN [--tta 8] --encodings phone webp screenshot

Takes the validation images of a lesion-grouped split (by default the shipped model's: 10 folds, fold 0, split
seed 42, 1,002 images it never trained on), or with `--run` the held-out TEST fold of a `skain train --holdout`
run folder (images that chose nothing: not the weights, the epoch or the trust layer), writes each one again in
every encoding below into a temporary folder (never beside the dataset), and predicts every copy through skAIn's
own path (`Predictor.predict_frame`: decode, resize, crop, the decision rule and the trust layer). For each
encoding: balanced accuracy of the decided label, the share of decided labels equal to those of the original
JPEGs, the mean change of p(melanoma), and the out-of-distribution rejection rate; under "intervals", each with
its 95% lesion-resampled interval (the copy's changes paired with the original's on the same resamples), the
triage figures, and whether the copy meets the bar of issue 24 (>= 97% of decisions kept, balanced accuracy down
by <= 0.01, <= 1 point more turned away). `--precision fast` predicts through OpenVINO as `skain predict
--precision fast` does. Non-dermoscopic probes (blank
frames, noise, text screenshots, scikit-image's sample photos) are scored too: each must be turned away.

Encodings: `png` (lossless), `jpeg:Q`, `webp:Q` (Pillow, default chroma subsampling), and `@N` after either
for the image resized to a shorter side of N px first (skAIn's resize_shorter), as `benchmarks/gpu/pack.py` does
to fit HAM10000 into one GPU call; or one of the maintainers' copies of `skain.data.degrade.COPIES` (`phone`: half
size, JPEG q70; `webp`: WebP q60; `screenshot`: PNG at 75% with a 20 px grey border), kept in their own format.

Writes --out (default benchmarks/out/reencode_effect.json). In benchmarks/results/:
  reencode_effect.json   the first command: the shipped model on its 1,002 validation images, every encoding
                         (2026-11-27; docs/robustness.md, "Re-encoding"; src/skain/models/README.md)
  reencode_heldout.json  the second command for two `--holdout --fold 0` runs (`plain` = --photo-augment 0,
                         `photo` = --photo-augment 0.5), one view, the two outputs combined by hand, with
                         benchmarks.accuracy.ood_resaved's printout as `ood_fit_ablation_plain_run`
                         (docs/robustness.md, "Held-out test fold, with and without the re-save augmentation")
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from benchmarks.common import DATA_ROOT, SHIPPED_MODEL, ham10000, non_dermoscopic_probes, split_rows, what, write_json
from skain.data.degrade import COPIES, saved_copy
from skain.data.images import open_image, resize_shorter
from skain.data.schema import CLASSES
from skain.data.split import lesion_split
from skain.evaluation.bootstrap import Sample, bootstrap, image_weights, interval, lesion_counts, paired
from skain.evaluation.compare import sample_of
from skain.evaluation.evaluate import align, evaluate
from skain.inference.predictor import Predictor

ENCODINGS = ["png", "jpeg:90", "jpeg:75", "webp:80", "png@256", "jpeg:90@256", "jpeg:75@256", "webp:80@256",
             "webp:55@329"]


def parse(encoding: str) -> tuple[str, int | None, int | None]:
    """'webp:55@329' -> ('webp', 55, 329); a named copy -> (name, None, None)."""
    if encoding in COPIES:
        return encoding, None, None
    name, _, short = encoding.partition("@")
    fmt, _, quality = name.partition(":")
    if fmt not in ("png", "jpeg", "webp") or (fmt != "png") != bool(quality):
        raise ValueError(f"unknown encoding {encoding!r}: png, jpeg:Q or webp:Q, optionally followed by @N")
    return fmt, int(quality) if quality else None, int(short) if short else None


def reencode(args: tuple[str, str, str]) -> None:
    """One image in one encoding, decoded again and stored losslessly (PNG) where skAIn can read it."""
    source, encoding, target = args
    fmt, quality, short = parse(encoding)
    img = open_image(source)
    if fmt in COPIES:  # as the user's file arrives: skAIn decodes the JPEG/WebP/PNG itself
        Path(target).write_bytes(saved_copy(img, fmt))
        return
    if short:
        img = Image.fromarray(resize_shorter(img, short))
    buf = io.BytesIO()
    img.save(buf, fmt.upper(), **({"quality": quality} if quality else {}))
    Image.open(io.BytesIO(buf.getvalue())).convert("RGB").save(target, compress_level=1)


# the bar for each copy: decisions kept, balanced accuracy lost, points more turned away
BAR = {"same_decision_as_original": 0.97, "balanced_accuracy_drop": 0.01, "ood_rise_points": 1.0}


def scores(pred: pd.DataFrame, frame: pd.DataFrame) -> dict:
    labels, probs, _, decided = align(pred, frame[["image_id", "dx"]])
    metrics = evaluate(labels, probs, decided=decided)  # the `pred` column: the bundle's decision rule
    return {"balanced_accuracy_decided": metrics["balanced_accuracy"],
            "balanced_accuracy_argmax": evaluate(labels, probs)["balanced_accuracy"],
            "macro_auc": metrics["macro_auc"], "ood_rate": float(pred["ood"].mean())}


def sample(pred: pd.DataFrame, frame: pd.DataFrame) -> Sample:
    """`pred` in `frame`'s row order as a bootstrap Sample: decided label, triage flags, OOD verdicts."""
    rows = frame[["image_id"]].merge(pred.drop_duplicates("image_id"), on="image_id", how="left")
    missing = rows.loc[rows["p_nv"].isna(), "image_id"]
    if len(missing):
        raise SystemExit(f"{len(missing)} images were not predicted (first: {missing.head().tolist()})")
    return sample_of(rows, frame["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy())


def figures_with_intervals(s: Sample, lesions: np.ndarray, resamples: int) -> dict:
    """Lesion-resampled 95% intervals of the decided label's balanced accuracy and the triage figures."""
    block = bootstrap(s, lesions, resamples)["metrics"]
    keep = ("balanced_accuracy", "triage_sensitivity", "triage_specificity", "ood_rejection")
    return {k: {"value": round(block[k]["value"], 4), "ci": [round(v, 4) for v in block[k]["ci"]]}
            for k in keep if k in block}


def against_original(a: Sample, b: Sample, lesions: np.ndarray, resamples: int) -> dict:
    """A copy's figures paired with the original's on the same lesion resamples: the change in balanced
    accuracy and in the share turned away, and the share of decisions kept, each with its 95% interval."""
    diff = paired(a, b, lesions, resamples)["metrics"]
    same = (a.pred == b.pred).astype(np.float64)
    counts, lesion_of = lesion_counts(a.labels, lesions, resamples)
    w = image_weights(counts, lesion_of)
    kept = {"value": round(float(same.mean()), 4), "ci": [round(v, 4) for v in interval(w @ same / w.sum(1))]}
    change = lambda k, scale=1.0: {"value": round(scale * diff[k]["difference"], 4),  # noqa: E731
                                   "ci": [round(scale * v, 4) for v in diff[k]["ci"]]}
    out = {"same_decision": kept, "balanced_accuracy_change": change("balanced_accuracy"),
           "ood_rise_points": change("ood_rejection", 100.0)}
    if "triage_sensitivity" in diff:
        out["triage_sensitivity_change"] = change("triage_sensitivity")
    out["meets_bar"] = {"same_decision": kept["value"] >= BAR["same_decision_as_original"],
                        "balanced_accuracy": -out["balanced_accuracy_change"]["value"] <= BAR["balanced_accuracy_drop"],
                        "ood": out["ood_rise_points"]["value"] <= BAR["ood_rise_points"]}
    return out


SUFFIX = {"phone": ".jpg", "webp": ".webp", "screenshot": ".png"}


def keep_predictions(folder: str | None, name: str, pred: pd.DataFrame) -> None:
    """With --predictions: one set's per-image predictions as <folder>/<name>.csv (':' and '@' made '_')."""
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        pred.drop(columns=["path"], errors="ignore").to_csv(
            Path(folder) / f"{name.replace(':', '_').replace('@', '_')}.csv", index=False)


def held_out_images(ns, data: Path) -> tuple[pd.DataFrame, dict]:
    """The images to copy: a run folder's test fold, or the validation part of a fresh lesion-grouped split."""
    frame = ham10000(data, full=True)
    if ns.run:
        test = split_rows(frame, ns.run, "test")
        if test.empty:
            raise SystemExit(f"{ns.run}: no test fold in split.csv (train it with --holdout)")
        return test, {"run": str(ns.run), "part": "test fold (chose nothing)"}
    meta = pd.read_csv(data / "HAM10000_metadata.csv")
    _, val = lesion_split(meta, folds=ns.folds, fold=ns.fold, seed=ns.split_seed)
    wanted = set(meta.iloc[val]["image_id"])
    where = {"folds": ns.folds, "fold": ns.fold, "split_seed": ns.split_seed, "part": "validation"}
    return frame[frame["image_id"].isin(wanted)].reset_index(drop=True), where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model to score (default: the --run's, else the shipped file)")
    ap.add_argument("--run", help="a `skain train --holdout` run folder: its model on its held-out test fold")
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=42)
    ap.add_argument("--tta", type=int, default=1, help="TTA views, as `skain predict --tta`")
    ap.add_argument("--encodings", nargs="+", default=ENCODINGS)
    ap.add_argument("--limit", type=int, help="score a seeded random sample of this many images (same sample "
                    "for every --tta, so two runs pair image by image)")
    ap.add_argument("--precision", choices=["fp32", "fast"], default="fp32",
                    help="as `skain predict --precision` (fast: OpenVINO where installed)")
    ap.add_argument("--resamples", type=int, default=2000, help="lesion resamples for the 95%% intervals")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/reencode_effect.json")
    ap.add_argument("--predictions", help="also write each set's per-image predictions here (original.csv, "
                    "<copy>.csv), for benchmarks.accuracy.kept_between_models")
    ns = ap.parse_args()
    for e in ns.encodings:
        parse(e)
    frame, where = held_out_images(ns, Path(ns.data_root))
    if ns.limit and ns.limit < len(frame):
        frame = frame.sample(n=ns.limit, random_state=0).reset_index(drop=True)
        where = {**where, "sample": f"{ns.limit} images, random_state 0"}
    model = ns.model or str(Path(ns.run) / "best_model.pt" if ns.run else SHIPPED_MODEL)
    predictor = Predictor.from_bundle(model, tta=ns.tta, precision=ns.precision)
    rows, paired_rows, started = {}, {}, time.perf_counter()
    lesions = frame["lesion_id"].astype(str).to_numpy()
    original = predictor.predict_frame(frame, progress=False)
    keep_predictions(ns.predictions, "original", original)
    rows["original JPEG"] = scores(original, frame)
    base = sample(original, frame)
    paired_rows["original JPEG"] = figures_with_intervals(base, lesions, ns.resamples)
    print("original JPEG", json.dumps({k: round(v, 4) for k, v in rows["original JPEG"].items()}), flush=True)
    for encoding in ns.encodings:
        with tempfile.TemporaryDirectory(prefix="skain-reencode-") as tmp:
            targets = [str(Path(tmp) / f"{i}{SUFFIX.get(encoding, '.png')}") for i in frame["image_id"]]
            with ProcessPoolExecutor(ns.workers) as pool:
                list(pool.map(reencode, [(p, encoding, t) for p, t in zip(frame["path"], targets)], chunksize=32))
            pred = predictor.predict_frame(frame.assign(path=targets), progress=False)
        keep_predictions(ns.predictions, encoding, pred)
        both = original.merge(pred, on="image_id", suffixes=("", "_new"))
        rows[encoding] = {**scores(pred, frame),
                          "same_decision_as_original": float((both["pred"] == both["pred_new"]).mean()),
                          "mean_abs_change_p_mel": float((both["p_mel"] - both["p_mel_new"]).abs().mean())}
        copy = sample(pred, frame)
        paired_rows[encoding] = {**figures_with_intervals(copy, lesions, ns.resamples),
                                 **against_original(base, copy, lesions, ns.resamples)}
        print(encoding, json.dumps({k: round(v, 4) for k, v in rows[encoding].items() if v is not None}), flush=True)
        print("   ", json.dumps(paired_rows[encoding]), flush=True)
    probes = {kind: float(np.mean([not predictor.predict_one(b).in_distribution for b in images]))
              for kind, images in non_dermoscopic_probes().items()}
    print("probes turned away:", json.dumps(probes), flush=True)
    result = {"what": what(__doc__), "model": model, "images": len(frame),
              "lesions": int(len(np.unique(lesions))), "tta": ns.tta, "precision": ns.precision,
              "split": where, "seconds": round(time.perf_counter() - started, 1), "rows": rows,
              "intervals": {"what": f"95% intervals, lesions resampled {ns.resamples} times within their diagnosis; "
                                    "a copy's changes paired with the original's on the same resamples",
                            "bar": BAR, "rows": paired_rows},
              "probes_turned_away": probes}
    write_json(ns.out, result, indent=1)


if __name__ == "__main__":
    main()
