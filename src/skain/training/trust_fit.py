"""Fit the trust layer for a trained bundle: run the model over its own validation (and training) images,
then hand the outputs to the cross-fitting maths of `skain.trust.crossfit`, store the result in the bundle
and write the reports. Never on test data.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from skain.data.dataset import LesionDataset
from skain.data.degrade import ResavedLoader
from skain.data.encoder import FIELDS, MetadataEncoder
from skain.data.images import ImageLoader
from skain.data.layout import discover, load_table
from skain.data.schema import DataError
from skain.data.transforms import eval_transform, image_to_tensor
from skain.engine import SplitNet, predict_logits, resolve_device
from skain.evaluation.bootstrap import Sample, bootstrap
from skain.evaluation.variants import variant_logits
from skain.inference.predictor import Predictor
from skain.modelfile.bundle import BUNDLE_NAME, atomic_torch_save, load_model
from skain.modelfile.load import read_bundle
from skain.training.decide import store_rule_figures
from skain.training.runfolder import CONFIG_NAME, METRICS_NAME, SPLIT_NAME, share_validation
from skain.trust.calibration import plot_reliability
from skain.trust.crossfit import (
    HELD_OUT_METHOD,
    HeldOut,
    Outputs,
    TrustSettings,
    assemble,
    calibrate_and_triage,
    fmt_figure,
    halves,
)
from skain.trust.modelcard import write_card
from skain.trust.ood import BackboneTap, pixel_spread
from skain.trust.probes import probe_set
from skain.trust.triage import malignant_columns

log = logging.getLogger(__name__)


def extract(model: torch.nn.Module, bundle: dict, frame: pd.DataFrame, loader_fn: ImageLoader | ResavedLoader,
            device: torch.device, batch_size: int = 64, progress: bool = False,
            desc: str = "trust features") -> Outputs:
    """One inference pass (the shared eval loop, fp32) collecting logits and backbone features."""
    ds = LesionDataset(frame.reset_index(drop=True), MetadataEncoder.from_state(bundle["encoder"]), loader_fn,
                       eval_transform(bundle["preprocess"]))
    with BackboneTap(model) as tap:
        res = predict_logits(model, DataLoader(ds, batch_size, shuffle=False), device, None, False, desc, progress)
    return Outputs(res["logits"].astype(np.float64), res["label"].astype(int), tap.features(),
                   spreads=tap.spreads())


@torch.no_grad()
def blank_logits(model: torch.nn.Module, bundle: dict, frame: pd.DataFrame, features: np.ndarray,
                 device: torch.device) -> np.ndarray | None:
    """Logits of the same images with age, sex and site all left empty, from the backbone features already
    extracted (only the metadata branch and head run again). None for image-only models and ensembles."""
    if getattr(model, "meta", None) is None or not hasattr(model, "classify"):
        return None
    enc = MetadataEncoder.from_state(bundle["encoder"])
    age, sex, site = (torch.as_tensor(x, device=device) for x in enc.blank(*enc.transform(frame), set(FIELDS)))
    pooled = torch.as_tensor(features, dtype=torch.float32, device=device)
    return cast(SplitNet, model.eval()).classify(pooled, age, sex, site).float().cpu().numpy().astype(np.float64)


def image_spreads(bundle: dict, images: list[bytes]) -> np.ndarray:
    """Pixel spread (ood.pixel_spread) of raw image bytes through the shared decode -> resize -> crop path."""
    return pixel_spread(torch.stack([image_to_tensor(b, bundle["preprocess"]) for b in images])).numpy()


@torch.no_grad()
def image_features(model: torch.nn.Module, bundle: dict, images: list[bytes], device: torch.device) -> np.ndarray:
    """Backbone features of raw image bytes through the shared decode -> resize -> crop path."""
    batch = torch.stack([image_to_tensor(b, bundle["preprocess"]) for b in images]).to(device)
    return cast(SplitNet, model.eval()).backbone(batch).float().cpu().numpy()


# ----------------------------------------------------------------------------- choosing and cross-fitting


# ----------------------------------------------------------------------------- the three pieces


# ----------------------------------------------------------------------------- entry points
def fit_trust(bundle_path: str | Path, frame: pd.DataFrame, train_idx: np.ndarray, val_idx: np.ndarray,
              loader_fn: ImageLoader, device: str | torch.device = "cpu", settings: TrustSettings | None = None,
              out_dir: str | Path | None = None, progress: bool = False, save_to: str | Path | None = None,
              budget_s: float | None = None) -> dict:
    """Fit temperature, triage threshold and OOD scorer for the bundle at `bundle_path`, store them in it
    (or in a copy at `save_to`) with the model card, write reliability.png and model_card.md into
    `out_dir` (default: next to the bundle); return the figures for metrics.json.

    With `budget_s` (what is left of `--max-minutes`) the OOD Gaussians are fit on a class-stratified sample
    of the training images sized to the budget (at least MIN_OOD_TRAIN); validation is always used whole."""
    s = settings or TrustSettings()
    require_images(val_idx, train_idx)
    started = time.perf_counter()
    bundle_path = Path(bundle_path)
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    bundle = read_bundle(bundle_path)
    model = load_model(bundle).to(device)
    log.info("trust: one inference pass over %d validation, then up to %d training images (calibration, "
             "triage threshold, OOD check)%s", len(val_idx), len(train_idx),
             f"; time budget {budget_s / 60:.1f} min" if budget_s is not None else "")
    va = extract(model, bundle, frame.iloc[val_idx], loader_fn, device, s.batch_size, progress,
                 "trust: validation features")
    va.blank_logits = blank_logits(model, bundle, frame.iloc[val_idx], va.require_features(), device)
    rate = len(val_idx) / max(time.perf_counter() - started, 1e-6)
    passes = 2 if s.ood_resaved else 1  # each training image, and its re-saved copy
    train_idx = budget_sample(train_idx, frame["dx"].to_numpy(), rate / passes, _left(budget_s, started), s.seed)
    log.info("trust: validation features in %.0f s (%.1f images/s); training features of %d images: about %.1f min",
             time.perf_counter() - started, rate, len(train_idx), passes * len(train_idx) / rate / 60)
    tr = extract(model, bundle, frame.iloc[train_idx], loader_fn, device, s.batch_size, progress,
                 "trust: training features")
    if s.ood_resaved:
        for out, idx, name in ((va, val_idx, "validation"), (tr, train_idx, "training")):
            copies = extract(model, bundle, frame.iloc[idx], ResavedLoader(loader_fn, s.seed), device,
                             s.batch_size, progress, f"trust: re-saved {name} copies")
            out.resaved, out.resaved_spreads = copies.features, copies.spreads
    probe_images = probe_set(s.seed)
    probes = {k: image_features(model, bundle, v, device) for k, v in probe_images.items()}
    probe_spreads = {k: image_spreads(bundle, v) for k, v in probe_images.items()}
    lesions = lesion_ids(frame, val_idx)
    figures = assemble(bundle, tr, va, halves(frame.iloc[val_idx], s.seed), probes, s, probe_spreads,
                       lambda v, held: held_out_intervals(v, held, list(bundle["classes"]), lesions, s.ece_bins))
    figures["fit_seconds"] = round(time.perf_counter() - started, 1)
    # a decision rule's figures under the new T, with lesion-resampled intervals
    store_rule_figures(bundle, va.logits, va.labels, "validation", groups=lesions)
    atomic_torch_save(bundle, save_to or bundle_path)
    write_reports(Path(out_dir) if out_dir else bundle_path.parent, va, bundle["trust"]["temperature"],
                  bundle["model_card"], s.ece_bins)
    log.info("trust: done in %.1f min", figures["fit_seconds"] / 60)
    return figures


def lesion_ids(frame: pd.DataFrame, idx: np.ndarray) -> np.ndarray | None:
    """The lesion of each of `frame`'s rows `idx` (None without a lesion_id column: intervals resample images)."""
    return frame.iloc[idx]["lesion_id"].astype(str).to_numpy() if "lesion_id" in frame else None


def held_out_intervals(va: Outputs, held: HeldOut, classes: list[str], lesions: np.ndarray | None,
                       ece_bins: int = 15, resamples: int = 2000, seed: int = 0) -> dict | None:
    """95% bootstrap intervals of the held-out (cross-fitted) trust figures: held-out ECE after temperature,
    triage sensitivity and specificity, and the OOD check's false-rejection rate, lesions resampled within
    their diagnosis (`evaluation.bootstrap`). Each row's cross-fitted decision stays as it was: the intervals
    say how much the figures move with the lesions drawn, not with a refit of the thresholds."""
    cols = malignant_columns(classes)
    sample = Sample(va.labels, held.probs, held.probs.argmax(1), flagged=held.flagged,
                    positive=None if cols is None else np.isin(va.labels, cols), rejected=held.rejected)
    block = bootstrap(sample, lesions, resamples, seed)
    keep = {"triage_sensitivity", "triage_specificity", "ood_rejection"} | ({"ece"} if ece_bins == 15 else set())
    block["metrics"] = {k: v for k, v in block["metrics"].items() if k in keep}  # ECE: bootstrap.ece's 15 bins
    return {"split": "validation", "of": "held-out (cross-fitted) trust figures", **block} if block["metrics"] else None


def tta_outputs(bundle: dict, frame: pd.DataFrame, loader_fn: ImageLoader, device: torch.device, views: int,
                s: TrustSettings, progress: bool = False) -> Outputs:
    """Validation predictions averaged over `views` TTA views (log of the mean probabilities, as `skain predict
    --tta` computes them; one view: the identity view), with metadata as entered and, for a multimodal network,
    with every field blank."""
    frame = frame.reset_index(drop=True)
    labels = frame["dx"].map({c: i for i, c in enumerate(bundle["classes"])}).to_numpy()
    predictor = Predictor(bundle, device=device.type)
    variants: dict[str, set[str]] = {"present": set()}
    if getattr(predictor.model, "meta", None) is not None:  # a single multimodal network (as blank_logits)
        variants["all_blank"] = set(FIELDS)
    z = variant_logits(predictor, frame, variants, s.batch_size, progress=progress, cache_dir=loader_fn.cache_dir,
                       views=views, tta=tuple(variants))
    suffix = f"_tta{views}" if views > 1 else ""  # one view: variant_logits' plain keys
    blank = z.get(f"all_blank{suffix}")
    return Outputs(z[f"present{suffix}"].astype(np.float64), labels, None,
                   None if blank is None else blank.astype(np.float64))


def fit_views(bundle_path: str | Path, frame: pd.DataFrame, val_idx: np.ndarray, loader_fn: ImageLoader,
              views: int, device: str | torch.device = "cpu", settings: TrustSettings | None = None,
              progress: bool = False, save_to: str | Path | None = None, make_default: bool = False) -> dict:
    """Temperature and triage threshold for predictions averaged over `views` TTA views, fit on the validation
    split like the single-view ones (blank-aware threshold, cross-fitted held-out figures), stored in the
    bundle's trust block under `views`; `skain predict --tta views` then applies them. The OOD check needs
    nothing new: it always scores the identity view."""
    s = settings or TrustSettings()
    bundle_path = Path(bundle_path)
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    bundle = read_bundle(bundle_path)
    if not 2 <= int(views) <= 8:
        raise ValueError(f"TTA views must be between 2 and 8 (got {views})")
    require_images(val_idx)
    if not bundle.get("trust"):
        raise ValueError(f"{bundle_path}: fit the single-view trust block first (skain calibrate without --tta)")
    started = time.perf_counter()
    log.info("trust: %d validation images x %d TTA views", len(val_idx), views)
    va = tta_outputs(bundle, frame.iloc[val_idx], loader_fn, device, views, s, progress)
    classes = list(bundle["classes"])
    parts = halves(frame.iloc[val_idx], s.seed)
    held, t, calib, triage = calibrate_and_triage(va, parts, classes, None, s)
    block = {"views": int(views), "temperature": t, "calibration": calib, "triage": triage,
             "validation_images": int(len(va.labels)),
             "held_out_method": HELD_OUT_METHOD if parts else "none (validation too small to split)",
             "fit_seconds": round(time.perf_counter() - started, 1)}
    bundle["trust"].setdefault("views", {})[str(int(views))] = block
    if make_default:  # the model now answers with `views` views unless asked otherwise (predict.default_views)
        bundle["inference"] = {"tta": int(views)}
        # the page's figures are those of the decision it now makes: its rule over `views` views
        store_rule_figures(bundle, va.logits, va.labels, "validation", views=int(views), groups=lesion_ids(frame, val_idx))
    if bundle.get("model_card"):
        bundle["model_card"].setdefault("tta", {})[str(int(views))] = {
            "temperature": t, "threshold": triage.get("threshold"), "held_out": triage.get("held_out"),
            "held_out_all_blank": triage.get("held_out_all_blank"),
            "ece_after": calib.get("held_out", {}).get("ece_after")}
    atomic_torch_save(bundle, save_to or bundle_path)
    if bundle.get("model_card"):
        write_card(Path(save_to or bundle_path).parent, bundle["model_card"])
    log.info("trust, %d views: T=%.2f ECE %.3f -> %.3f; triage threshold %s (held-out sensitivity %s, specificity "
             "%s)", views, t, calib["ece_before"], calib["ece_after"], fmt_figure(triage.get("threshold")),
             fmt_figure(triage.get("held_out", {}).get("sensitivity")), fmt_figure(triage.get("held_out", {}).get("specificity")))
    return block


MIN_OOD_TRAIN = 1000  # training images the OOD Gaussians need at least, whatever the budget


MIN_VALIDATION = 10  # below this a temperature or triage threshold is noise, not a fit


def require_images(val_idx: np.ndarray, train_idx: np.ndarray | None = None) -> None:
    """Refuse, before any inference, a split with too few validation (or no training) images to fit on."""
    if len(val_idx) < MIN_VALIDATION:
        raise DataError(f"trust fitting needs at least {MIN_VALIDATION} labelled validation images; the run's "
                        f"split has {len(val_idx)} (split.csv 'val' rows that are in the data)")
    if train_idx is not None and len(train_idx) == 0:
        raise DataError("trust fitting needs the run's training images for the OOD check; the split has none")


def _left(budget_s: float | None, started: float) -> float | None:
    return None if budget_s is None else budget_s - (time.perf_counter() - started)


def budget_sample(train_idx: np.ndarray, dx: np.ndarray, rate: float, left_s: float | None,
                  seed: int = 0) -> np.ndarray:
    """All of `train_idx`, or (when `left_s` seconds at `rate` images/s cannot cover it) a class-stratified
    sample that can, never fewer than MIN_OOD_TRAIN images and at least 20 of each class where there are."""
    n = len(train_idx)
    if left_s is None or left_s * rate >= n:
        return train_idx
    want = min(n, max(MIN_OOD_TRAIN, int(left_s * rate * 0.9)))
    if want >= n:
        return train_idx
    rng = np.random.default_rng(seed)
    classes = dx[train_idx]
    keep = []
    for c in np.unique(classes):
        idx = train_idx[classes == c]
        k = min(len(idx), max(20, round(want * len(idx) / n)))
        keep.append(rng.choice(idx, k, replace=False))
    log.warning("trust: %d of %d training images fit the time budget; the OOD Gaussians use that class-stratified "
                "sample (validation is used whole)", sum(map(len, keep)), n)
    return np.sort(np.concatenate(keep))


def write_reports(out_dir: Path, va: Outputs, temperature: float, card: dict, n_bins: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_reliability(va.logits, va.labels, temperature, out_dir / "reliability.png", n_bins,
                     "validation lesions, top-class confidence")
    write_card(out_dir, card)


def folder_split(out: str | Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, dict]:
    """Rebuild (frame, train_idx, val_idx, config) of a finished training run from its output folder."""
    import json

    out = Path(out)
    if not (out / CONFIG_NAME).is_file() and (out / METRICS_NAME).is_file():
        members = json.loads((out / METRICS_NAME).read_text()).get("members")
        if members:
            return shared_member_split(out, [Path(m).parent for m in members])
    cfg = json.loads((out / CONFIG_NAME).read_text())
    d = cfg["data"]
    frame = load_table(discover(d.get("data"), d.get("csv"), d.get("images") or []), skip_missing=d.get("skip_missing", False))
    split = pd.read_csv(out / SPLIT_NAME, dtype=str).set_index("image_id")["split"]
    where = frame["image_id"].map(split)
    if where.isna().any():
        raise ValueError(f"{int(where.isna().sum())} images of the data are not in {out / 'split.csv'}: "
                         "the data changed since training")
    train_idx, val_idx = np.flatnonzero(where == "train"), np.flatnonzero(where == "val")
    return frame, train_idx, val_idx, cfg


def shared_member_split(out: Path, runs: list[Path]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, dict]:
    """An ensemble folder (`skain ensemble`) whose members were all validated on the same images (runs on one
    split with different seeds or backbones): that split, which no member trained on. Members validated on
    different images (the folds of a k-fold run) leave no image held out from all of them: refused."""
    if not share_validation(runs):
        raise DataError(f"{out}: its members were validated on different images, so no image is held out from all "
                        "of them; fit on a held-out folder instead (skain calibrate needs one shared split)")
    return folder_split(runs[0])


def fit_trust_folder(out: str | Path, cache_dir: str | Path | None = None, device: str = "cpu",
                     settings: TrustSettings | None = None, report_dir: str | Path | None = None,
                     progress: bool = False) -> dict:
    """fit_trust for an existing output folder. With `report_dir` the folder is left untouched: the bundle
    copy with trust, reliability.png and model_card.md go to `report_dir`."""
    out = Path(out)
    frame, train_idx, val_idx, cfg = folder_split(out)
    loader = ImageLoader(cfg["preprocess"]["resize"], cache_dir)
    save_to = Path(report_dir) / BUNDLE_NAME if report_dir else None
    return fit_trust(out / BUNDLE_NAME, frame, train_idx, val_idx, loader, device, settings,
                     report_dir or out, progress, save_to)


def fit_views_folder(out: str | Path, views: int, cache_dir: str | Path | None = None, device: str = "cpu",
                     settings: TrustSettings | None = None, progress: bool = False, make_default: bool = False) -> dict:
    """fit_views for an existing output folder (its validation split)."""
    out = Path(out)
    frame, _, val_idx, cfg = folder_split(out)
    return fit_views(out / BUNDLE_NAME, frame, val_idx, ImageLoader(cfg["preprocess"]["resize"], cache_dir), views,
                     device, settings, progress, make_default=make_default)


def after_training(bundle_path: str | Path, frame: pd.DataFrame, train_idx: np.ndarray, val_idx: np.ndarray,
                   loader_fn: ImageLoader, device: torch.device, progress: bool = False,
                   budget_s: float | None = None) -> dict:
    """fit_trust as the last step of `skain train`, within what is left of `--max-minutes` (`budget_s`): a
    failure here is logged and reported in metrics.json instead of losing the finished training run (the
    bundle then simply has no trust block)."""
    try:
        return fit_trust(bundle_path, frame, train_idx, val_idx, loader_fn, device, progress=progress,
                         budget_s=budget_s)
    except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:
        log.error("could not fit calibration/OOD/triage (%s); the model predicts without them", exc)
        return {"error": str(exc)}
