"""`skain ensemble`: trained runs (typically the k folds of `skain train --all-folds`) -> one bundle whose network
averages the members' probabilities (`model.EnsembleNet`), so prediction, serving, ONNX export, Grad-CAM and the
trust layer use it as they use one model.

Members must agree on the classes and the preprocessing (mean, std, and the field of view: input size / resize);
otherwise they are refused with the difference named. Their input sizes may differ (Lite0 at 224 px with Lite2 at
260 px): the ensemble takes the largest member's input and resizes it for the others inside the network. Their
metadata encoders may differ (each fold fits age statistics and the sex/site vocabularies on its own training
split): the ensemble then takes age in years and the union of the vocabularies, and turns them into each member's
own inputs inside the network (`EnsembleNet`), so every member sees exactly what its own encoder would have given
it. The one exception: a missing age is filled with one median (member 0's; a warning says so when the members'
medians differ).

A little over the ~400 lines we aim for: checking the members, building the network and fitting its trust layer
on out-of-fold predictions are one job, and each step is its own short function.

Trust layer. A k-fold ensemble has no image that none of its members trained on, so its temperature and triage
threshold are fit on out-of-fold logits: every image scored only by the member that did not train on it. They
come from `--oof CSV`, else `<common parent of the runs>/oof_predictions.csv` (what `skain train --all-folds`
writes), else, for the folds of several k-fold runs on one split (a Lite0 and a Lite2 run), the average of the
runs' oof_predictions.csv (each image by every member that did not train on it), else the members' own validation
splits are predicted now (needs each run's data, config.json and split.csv; an image in several of them gets the
members' mean). Except in the averaged cases these are single members' held-out predictions applied to the
averaged one; averaging usually makes probabilities a little less confident, so `skain calibrate` on a held-out
folder is the exact alternative. The "held-out" figures are
cross-fitted between two groups of folds. The OOD check combines the members' own scorers (each fit on its own
training split, threshold on its own validation split): the mean of their scores, each in units of its own
threshold (`trust.ood.EnsembleScorer`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch

from skain.data.encoder import MetadataEncoder
from skain.data.images import ImageLoader
from skain.engine import resolve_device
from skain.fileio import atomic_json
from skain.metrics import classification_metrics
from skain.model import EnsembleNet, SkainNet
from skain.modelfile.bundle import (
    BUNDLE_NAME,
    BundleError,
    atomic_torch_save,
    check_bundle,
    load_model,
    make_bundle,
)
from skain.modelfile.load import read_bundle, resolve_path
from skain.training.runfolder import METRICS_NAME, OOF_NAME, share_validation
from skain.training.trust_fit import extract, folder_split, write_reports
from skain.trust.calibration import apply_temperature
from skain.trust.crossfit import (
    Outputs,
    TrustSettings,
    calibration_part,
    cross_fit,
    triage_part,
)
from skain.trust.modelcard import build_card
from skain.trust.ood import EnsembleScorer, scorer_from_state
from skain.trust.triage import malignant_columns

log = logging.getLogger(__name__)

PREPROCESS_WHAT = "preprocessing (input size, resize, mean, std)"


@dataclass
class Member:
    path: Path      # the bundle file
    bundle: dict


# ----------------------------------------------------------------------------- members
def read_members(runs: list[str | Path]) -> list[Member]:
    """Run folders or bundle files -> their bundles (weights_only), refusing repeats and nested ensembles."""
    if len(runs) < 2:
        raise ValueError(f"an ensemble needs at least two runs (got {len(runs)})")
    paths = [resolve_path(r).resolve() for r in runs]
    repeated = sorted({str(p) for p in paths if paths.count(p) > 1})
    if repeated:
        raise ValueError(f"the same run is given twice: {', '.join(repeated)}")
    members = [Member(p, read_bundle(p)) for p in paths]
    nested = [str(m.path) for m in members if "ensemble" in m.bundle["model_args"]]
    if nested:
        raise BundleError(f"{', '.join(nested)}: already an ensemble; pass the runs it was built from instead")
    return members


def check_compatible(members: list[Member]) -> None:
    """Everything the ensemble shares must agree; the message names the run and the difference."""
    ref = members[0]
    for m in members[1:]:
        if m.bundle["classes"] != ref.bundle["classes"]:
            raise BundleError(f"cannot ensemble {m.path} with {ref.path}: their class names differ: "
                              f"{_difference(ref.bundle['classes'], m.bundle['classes'])}")
        why = preprocess_difference(ref.bundle["preprocess"], m.bundle["preprocess"])
        if why:
            raise BundleError(f"cannot ensemble {m.path} with {ref.path}: their {PREPROCESS_WHAT} differ: {why}")
        for vocab in ("sex_vocab", "site_vocab"):
            if m.bundle["encoder"][vocab][:1] != ref.bundle["encoder"][vocab][:1]:
                raise BundleError(f"cannot ensemble {m.path} with {ref.path}: their metadata encoders differ "
                                  f"({vocab} starts with {m.bundle['encoder'][vocab][:1]} instead of "
                                  f"{ref.bundle['encoder'][vocab][:1]}: index 0 must be the same `unknown`)")


FIELD_OF_VIEW_TOLERANCE = 0.01  # relative; Lite0 224/256 = 0.875, Lite1 240/274 = 0.876, Lite2 260/297 = 0.875


def preprocess_difference(a: dict, b: dict) -> str:
    """Why two members cannot share one preprocessing ("" when they can). Input sizes may differ when the field
    of view (input_size / resize, the centre crop's share of the resized image) is the same: the ensemble then
    takes the largest member's input and resizes it for the others inside the network (EnsembleBackbone)."""
    if a == b:
        return ""
    rest = _difference({k: v for k, v in a.items() if k not in SIZE_KEYS},
                       {k: v for k, v in b.items() if k not in SIZE_KEYS})
    if rest:
        return rest
    if a.get("input_size") == b.get("input_size"):
        return _difference(a, b)
    view = [float(p["input_size"]) / float(p["resize"]) for p in (a, b)]
    if abs(view[0] - view[1]) <= FIELD_OF_VIEW_TOLERANCE * view[0]:
        return ""
    return (f"{_difference(a, b)} (members of different input sizes need the same field of view, input_size / "
            f"resize: {view[0]:.3f} vs {view[1]:.3f})")


SIZE_KEYS = ("input_size", "resize")


def _difference(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return "; ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys)
    return f"{a!r} vs {b!r}"


def shared_encoder(members: list[Member]) -> tuple[dict, dict[str, list]]:
    """The ensemble's encoder state, and how each member sees its inputs (EnsembleNet's maps).

    Identical encoders: that encoder, identity maps. Otherwise (folds fit age statistics and vocabularies on
    different training splits) the vocabulary is the union, `unknown` first, and age enters in years (mean 0,
    std 1); member i gets (1 / std_i, -mean_i / std_i) and an index map into its own vocabulary."""
    states = [m.bundle["encoder"] for m in members]
    if all(s == states[0] for s in states):
        sizes = {v: len(states[0][v]) for v in ("sex_vocab", "site_vocab")}
        return dict(states[0]), {"age_affine": [(1.0, 0.0)] * len(members),
                                 **{_MAPS[v]: [list(range(n))] * len(members) for v, n in sizes.items()}}
    medians = sorted({float(s["age_median"]) for s in states})
    if len(medians) > 1:
        log.warning("the members fill a missing age with different medians (%s); the ensemble uses %.1f",
                    ", ".join(f"{m:.1f}" for m in medians), states[0]["age_median"])
    encoder = {**states[0], "age_mean": 0.0, "age_std": 1.0}
    maps: dict[str, list] = {"age_affine": [(1.0 / float(s["age_std"]), -float(s["age_mean"]) / float(s["age_std"]))
                                            for s in states]}
    for vocab, name in _MAPS.items():
        own = [s[vocab] for s in states]
        encoder[vocab] = own[0][:1] + sorted(set().union(*(v[1:] for v in own)))
        maps[name] = [[v.index(x) if x in v else 0 for x in encoder[vocab]] for v in own]
    return encoder, maps


_MAPS = {"sex_vocab": "sex_map", "site_vocab": "site_map"}


def combine(members: list[Member]) -> tuple[EnsembleNet, dict, dict]:
    """-> (EnsembleNet with the members' weights, its model_args, its encoder state)."""
    check_compatible(members)
    encoder, maps = shared_encoder(members)
    nets = [cast(SkainNet, load_model(m.bundle)) for m in members]  # read_members refuses nested ensembles
    args = [dict(m.bundle["model_args"]) for m in members]
    sizes = [int(m.bundle["preprocess"]["input_size"]) for m in members]
    if len(set(sizes)) > 1:  # each member is fed its own input size (EnsembleBackbone)
        args = [{**a, "input_size": size} for a, size in zip(args, sizes)]
    backbones = sorted({a["backbone"] for a in args})
    model_args = {"ensemble": args, "backbone": f"ensemble of {len(args)}: {', '.join(backbones)}",
                  "num_classes": args[0]["num_classes"], "image_only": all(a.get("image_only") for a in args),
                  "n_sex": len(encoder["sex_vocab"]), "n_site": len(encoder["site_vocab"])}
    own_sizes = [a.get("input_size") for a in args]
    return EnsembleNet(nets, **maps, input_sizes=own_sizes).eval(), model_args, encoder


def shared_preprocess(members: list[Member]) -> dict:
    """The ensemble's preprocessing: the largest member's (the others resize its input inside the network)."""
    return dict(max((m.bundle["preprocess"] for m in members), key=lambda p: int(p["input_size"])))


# ----------------------------------------------------------------------------- out-of-fold logits
def read_oof(path: str | Path, classes: list[str]) -> pd.DataFrame:
    """`skain train --all-folds`'s oof_predictions.csv -> image_id, label, fold, logit_<class> (log p_<class>
    where a file has probabilities only); images that failed to decode are left out."""
    frame = pd.read_csv(path)
    missing = [c for c in ("image_id", "dx", "fold") if c not in frame.columns]
    kind = "logit" if all(f"logit_{c}" in frame.columns for c in classes) else "p"
    missing += [f"{kind}_{c}" for c in classes if f"{kind}_{c}" not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not an out-of-fold predictions CSV: missing column(s) {', '.join(missing)}")
    values = frame[[f"{kind}_{c}" for c in classes]].to_numpy(np.float64)
    ok = np.isfinite(values).all(1) & frame["dx"].isin(classes).to_numpy()
    logits = values if kind == "logit" else np.log(np.clip(values, 1e-12, 1.0))
    out = pd.DataFrame({"image_id": frame["image_id"].astype(str), "label": frame["dx"].map(classes.index),
                        "fold": frame["fold"]})[ok].reset_index(drop=True)
    return out.assign(**{f"logit_{c}": logits[ok, j] for j, c in enumerate(classes)})


def predict_own_validation(members: list[Member], cache_dir: str | Path | None, device: torch.device) -> pd.DataFrame:
    """Each member's logits on its own run's validation split (from config.json and split.csv). An image in
    several members' validation splits (e.g. two runs on one fold) gets the mean of their probabilities, as the
    ensemble of the members that did not train on it predicts it."""
    classes = list(members[0].bundle["classes"])
    parts: list[pd.DataFrame] = []
    for m in members:
        frame, _, val_idx, cfg = folder_split(m.path.parent)
        val = frame.iloc[val_idx]
        loader = ImageLoader(cfg["preprocess"]["resize"], cache_dir)
        out = extract(load_model(m.bundle).to(device), m.bundle, val, loader, device)
        parts.append(pd.DataFrame({"image_id": val["image_id"].to_numpy(), "label": out.labels,
                                   "fold": cfg["data"].get("fold", len(parts))})
                     .assign(**{f"logit_{c}": out.logits[:, j] for j, c in enumerate(classes)}))
    return mean_per_image(pd.concat(parts, ignore_index=True), classes)


def mean_per_image(rows: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Rows of the same image -> one row: the log of their mean softmax (label and fold of the first)."""
    if not rows["image_id"].duplicated().any():
        return rows
    cols = [f"logit_{c}" for c in classes]
    probs = torch.from_numpy(rows[cols].to_numpy(np.float64)).softmax(1).numpy()
    mean = pd.DataFrame(probs, columns=cols).groupby(rows["image_id"].to_numpy(), sort=False).mean()
    first = rows.groupby("image_id", sort=False)[["label", "fold"]].first()
    return first.assign(**{c: np.log(np.clip(mean.loc[first.index, c].to_numpy(), 1e-300, None)) for c in cols}
                        ).rename_axis("image_id").reset_index()


def oof_logits(members: list[Member], oof: str | Path | None, cache_dir: str | Path | None,
               device: torch.device) -> tuple[pd.DataFrame | None, str]:
    """The out-of-fold logits and where they came from (None when there is no way to get them)."""
    classes = list(members[0].bundle["classes"])
    path = Path(oof) if oof else _common_parent([m.path.parent for m in members]) / OOF_NAME
    if path.is_file():
        return only_folds(read_oof(path, classes), member_folds(members), path), str(path)
    if oof:
        raise FileNotFoundError(f"no out-of-fold predictions at {oof}")
    runs: dict[Path, list[Member]] = {}
    for m in members:  # <run>/fold<k>/best_model.pt
        runs.setdefault(m.path.parent.parent, []).append(m)
    per_run = sorted((r / OOF_NAME for r in runs), key=str)
    if len(per_run) > 1 and all(f.is_file() for f in per_run):
        folds = [member_folds(group) for group in runs.values()]
        known = [f for f in folds if f is not None]
        shared = None if len(known) < len(folds) else set.intersection(*known)  # folds every run has a member of
        return (only_folds(averaged_oof(per_run, classes), shared, per_run[0]),
                f"the average of {', '.join(map(str, per_run))}")
    try:
        own = predict_own_validation(members, cache_dir, device)
        return own, SHARED_SPLIT if share_validation([m.path.parent for m in members]) else "the members' own validation splits"
    except (FileNotFoundError, KeyError, ValueError) as exc:
        log.warning("no out-of-fold predictions (%s): the ensemble keeps T = 1 and no triage threshold; fit them "
                    "with `skain calibrate` on a held-out folder", exc)
        return None, f"none ({exc})"


# the source of an ensemble's held-out predictions when its members (one split, other seeds or backbones) were
# all validated on the same images: those are then the ensemble's own predictions on images none trained on
SHARED_SPLIT = "the validation split its members share (held out from every member)"


def member_folds(members: list[Member]) -> set | None:
    """The folds whose held-out images the members did not train on (None when a member does not say)."""
    folds = [m.bundle.get("training", {}).get("fold") for m in members]
    return None if any(f is None for f in folds) else set(folds)


def only_folds(oof: pd.DataFrame, folds: set | None, path: Path) -> pd.DataFrame:
    """Out-of-fold rows of the ensemble's own folds: a fold none of its members held out was scored by a network
    that is not in the ensemble (e.g. one fold's members of two k-fold runs)."""
    if folds is None:
        return oof
    keep = oof["fold"].isin(folds)
    if not keep.any():
        log.warning("%s: no row has one of the members' folds (%s); using all its rows", path,
                    ", ".join(map(str, sorted(folds, key=str))))
        return oof
    return oof[keep].reset_index(drop=True)


def averaged_oof(paths: list[Path], classes: list[str]) -> pd.DataFrame:
    """Several k-fold runs on the same split (e.g. a Lite0 and a Lite2 `--all-folds` run): each image's held-out
    prediction is the mean probability of the runs' members that did not train on it, as log-probabilities,
    which is what the ensemble of all their folds predicts for it minus the members that saw it."""
    frames = [read_oof(p, classes).set_index("image_id") for p in paths]
    ref = frames[0]
    for path, other in zip(paths[1:], frames[1:]):
        if set(other.index) != set(ref.index):
            raise ValueError(f"{path} and {paths[0]} score different images ({len(set(other.index) ^ set(ref.index))} "
                             "in only one of them): runs on different data cannot share out-of-fold predictions")
        other = other.loc[ref.index]
        if not (other["label"].to_numpy() == ref["label"].to_numpy()).all():
            raise ValueError(f"{path} and {paths[0]} give some images different diagnoses")
        if not (other["fold"].to_numpy() == ref["fold"].to_numpy()).all():
            raise ValueError(f"{path} and {paths[0]} put the same images in different folds: they were not "
                             "trained on the same split (same data and --split-seed), so no image is held out "
                             "from both runs' members")
    return mean_per_image(pd.concat([f.loc[ref.index].reset_index() for f in frames], ignore_index=True), classes)


def _common_parent(folders: list[Path]) -> Path:
    return Path(os.path.commonpath([str(f.resolve()) for f in folders]))


# ----------------------------------------------------------------------------- trust
def fold_halves(folds: np.ndarray) -> list[np.ndarray] | None:
    """Two groups of folds (alternate folds), for cross-fitted held-out figures; None with a single fold."""
    names = sorted(pd.unique(folds), key=str)
    if len(names) < 2:
        return None
    return [np.flatnonzero(np.isin(folds, names[i::2])) for i in (0, 1)]


def ensemble_ood(members: list[Member], widths: list[int]) -> dict | None:
    """The members' own OOD scorers, combined (EnsembleScorer); None when a member has none."""
    oods = [(m.bundle.get("trust") or {}).get("ood") or {} for m in members]
    if not all((o.get("means") is not None or o.get("parts")) and o.get("threshold") is not None for o in oods):
        log.warning("not every member has an OOD scorer: the ensemble gives no 'not a dermoscopic image' verdict")
        return None
    scorer = EnsembleScorer([scorer_from_state(o) for o in oods], widths, [float(o["threshold"]) for o in oods])
    floors = [float(o["min_pixel_spread"]) for o in oods if o.get("min_pixel_spread") is not None]
    # the most permissive member's flat-frame floor (ood.spread_floor), where every member has one
    floor = min(floors) if len(floors) == len(oods) else None
    return {**scorer.state_dict(), "threshold": 1.0, "min_pixel_spread": floor,
            "target_false_rejection": float(np.mean([o.get("target_false_rejection", np.nan) for o in oods])),
            "member_val_false_rejection": [o.get("val_false_rejection") for o in oods],
            "member_held_out_false_rejection": [o.get("held_out_false_rejection") for o in oods],
            "probe_detection_members_mean": _mean_dicts([o.get("probe_detection") or {} for o in oods])}


def _scored_by(source: str) -> str:
    if source == SHARED_SPLIT:
        return "the ensemble itself"
    if source.startswith("the average of"):
        return "the members that did not train on each image, averaged"
    return "single members"


def _fit_on(source: str) -> str:
    if source.startswith("none"):
        return "nothing (no out-of-fold predictions: T = 1, no triage threshold)"
    if source == SHARED_SPLIT:
        return f"its own predictions on {SHARED_SPLIT}"
    return f"out-of-fold predictions of {_scored_by(source)}"


def _mean_dicts(dicts: list[dict]) -> dict:
    keys = set.intersection(*(set(d) for d in dicts)) if dicts else set()
    return {k: float(np.mean([d[k] for d in dicts])) for k in sorted(keys)}


def fit_trust_oof(bundle: dict, oof: pd.DataFrame | None, source: str, ood: dict | None,
                  settings: TrustSettings) -> tuple[dict, Outputs | None]:
    """Temperature and triage threshold from out-of-fold logits; the trust block and model card into `bundle`."""
    classes = list(bundle["classes"])
    figures: dict = {"settings": asdict(settings), "out_of_fold_source": source,
                     "ood": {k: v for k, v in (ood or {}).items() if k not in ("means", "whitener", "parts")}}
    t, triage, va = 1.0, {"threshold": None, "reason": "no out-of-fold predictions"}, None
    if oof is not None and len(oof):
        va = Outputs(oof[[f"logit_{c}" for c in classes]].to_numpy(np.float64), oof["label"].to_numpy(int),
                     np.zeros((len(oof), 0)))
        parts = fold_halves(oof["fold"].to_numpy())
        held = cross_fit(va, parts, malignant_columns(classes), None, settings) if parts else None
        t, calib = calibration_part(va, held, settings)
        triage = triage_part(apply_temperature(va.logits, t), va.labels, classes, held, settings)
        figures |= {"validation_images": int(len(oof)), "calibration": calib, "triage": triage,
                    "held_out_method": "out-of-fold (each image scored by the member(s) that did not train on it), "
                                       "cross-fitted over two groups of folds" if parts else "none (one fold)"}
    bundle["trust"] = {"version": 1, "temperature": t, "ood": ood or {}, "triage": triage, "figures": figures}
    bundle["model_card"] = build_card(bundle, figures)
    bundle["model_card"]["limitations"].append(
        f"An ensemble of {len(bundle['model_args']['ensemble'])} networks (averaged probabilities). Its temperature "
        f"and triage threshold were fit on {_fit_on(source)} and its OOD check averages the members' own; "
        + ("its figures are measured on that split, which also chose each member's epoch." if source == SHARED_SPLIT
           else "no image is held out from every member, so its own accuracy is not measured."))
    sizes = sorted({a["input_size"] for a in bundle["model_args"]["ensemble"] if "input_size" in a})
    if sizes:
        bundle["model_card"]["limitations"].append(
            f"Its members were trained at {', '.join(map(str, sizes))} px; all take the "
            f"{bundle['preprocess']['input_size']} px input, resized inside the network for the smaller ones "
            "(bilinear), which moves their probabilities a little against their own preprocessing.")
    return figures, va


# ----------------------------------------------------------------------------- entry point
def build_ensemble(runs: list[str | Path], output: str | Path, oof: str | Path | None = None,
                   cache_dir: str | Path | None = None, device: str = "cpu",
                   settings: TrustSettings | None = None) -> Path:
    """Runs -> `<output>/best_model.pt` (an ensemble bundle), metrics.json, model_card.md, reliability.png."""
    s, out = settings or TrustSettings(), Path(output)
    members = read_members(runs)
    model, model_args, encoder = combine(members)
    oof_frame, source = oof_logits(members, oof, cache_dir, resolve_device(device))
    metrics = _oof_metrics(oof_frame, list(members[0].bundle["classes"]), source)
    bundle = make_bundle(model, model_args, shared_preprocess(members), MetadataEncoder.from_state(encoder),
                         members[0].bundle["classes"], metrics, training=_training(members))
    figures, va = fit_trust_oof(bundle, oof_frame, source, ensemble_ood(members, model.backbone.widths), s)
    check_bundle(bundle, str(out / BUNDLE_NAME))  # what is written passes the checks a reader applies
    atomic_torch_save(bundle, out / BUNDLE_NAME)
    atomic_json({"validation": metrics, "trust": figures, "members": [str(m.path) for m in members]},
                out / METRICS_NAME)
    if va is not None:
        write_reports(out, va, bundle["trust"]["temperature"], bundle["model_card"], s.ece_bins)
    log.info("wrote an ensemble of %d to %s (out-of-fold logits: %s)", len(members), out / BUNDLE_NAME, source)
    return out / BUNDLE_NAME


def _oof_metrics(oof: pd.DataFrame | None, classes: list[str], source: str) -> dict:
    if oof is None or not len(oof):
        return {"note": "no out-of-fold predictions: no figure measured on held-out lesions"}
    probs = torch.from_numpy(oof[[f"logit_{c}" for c in classes]].to_numpy(np.float64)).softmax(1).numpy()
    if source == SHARED_SPLIT:
        return {**classification_metrics(oof["label"].to_numpy(int), probs, classes),
                "source": f"the ensemble's own predictions on {SHARED_SPLIT}; it chose each member's epoch"}
    return {**classification_metrics(oof["label"].to_numpy(int), probs, classes),
            "source": f"out-of-fold predictions of {_scored_by(source)} ({source}); the ensemble itself has no "
                      "held-out images"}


def _training(members: list[Member]) -> dict:
    first = dict(members[0].bundle.get("training", {}))
    per_member = [{"run": m.path.parent.name, "fold": m.bundle.get("training", {}).get("fold"),
                   "balanced_accuracy": m.bundle.get("metrics", {}).get("balanced_accuracy")} for m in members]
    return {**first, "synthetic": any(m.bundle.get("training", {}).get("synthetic") for m in members),
            "train_images": None, "val_images": None, "fold": None,
            "ensemble": {"members": len(members), "runs": per_member}}
