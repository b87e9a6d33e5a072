"""`skain cv-report`: out-of-fold predictions of one or more k-fold runs (`skain train --all-folds`), pooled and
summarised with 95% bootstrap intervals (`pooled_oof_intervals`: lesions resampled within their diagnosis, the
lesion ids read from the folds' split.csv), ensembles of runs on the same split, and the paired metadata table
(each per-fold pair also gets the paired interval of its difference on the pooled out-of-fold predictions of the
same images, `vs_image_only_pooled`, with DeLong's test for the melanoma and per-class AUCs)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from skain.data.schema import CLASSES
from skain.evaluation.bootstrap import Sample, bootstrap, delong, paired
from skain.fileio import atomic_json, atomic_write
from skain.inference.decision import (
    adjusted_pred,
    log_prior_from_counts,
    nested_estimate,
)
from skain.metrics import classification_metrics
from skain.training.runfolder import (
    SPLIT_NAME,
    TEST_LOGITS,
)

log = logging.getLogger(__name__)
HEADLINE = ("balanced_accuracy", "macro_auc", "accuracy", "macro_f1", "melanoma_recall")
RESAMPLES, SEED = 2000, 0  # bootstrap resamples of the pooled out-of-fold predictions (0: no intervals)


def mean_std(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else 0.0,
            "folds": [float(v) for v in arr]}


def fold_dirs(run: Path) -> list[tuple[int, Path]]:
    """(fold, folder) of every fold<k>/ under a k-fold output that has test-fold logits."""
    found = sorted((int(p.name[4:]), p) for p in Path(run).glob("fold*")
                   if p.name[4:].isdigit() and (p / TEST_LOGITS).is_file())
    if not found:
        raise ValueError(f"{run}: no fold<k>/{TEST_LOGITS} (train with --all-folds --output {run}, or with "
                         f"--holdout --fold k --output {run}/fold<k>)")
    return found


VARIANT_NAME = re.compile(r"(present|age_blank|sex_blank|site_blank|all_blank)(_tta\d+)?")


def is_image_only(folder: Path) -> bool:
    """A fold of an image-only run: it scored one metadata variant, `present` (nothing to blank)."""
    with np.load(folder / TEST_LOGITS) as saved:
        return "all_blank" not in saved.files


def fold_probs(folder: Path, variant: str) -> pd.DataFrame:
    """One fold's test images: image_id, dx and p_<class> = softmax of the stored logits of `variant`
    (uncalibrated: the temperature is not applied; arg-max and per-class ranks within a row do not change).

    An image-only run has nothing to blank: its `present` logits (same views) stand for every metadata variant."""
    name = VARIANT_NAME.fullmatch(variant)
    if not name:
        raise ValueError(f"unknown variant {variant!r}: one of present, age_blank, sex_blank, site_blank, "
                         "all_blank, optionally with _tta<N> (e.g. all_blank_tta8)")
    with np.load(folder / TEST_LOGITS) as saved:
        key = variant if "all_blank" in saved.files else "present" + (name.group(2) or "")
        if key not in saved.files:
            raise ValueError(f"{folder}: no {key!r} logits (has {', '.join(saved.files[2:])})")
        z = saved[key].astype(np.float64)
        table = pd.DataFrame({"image_id": saved["image_id"], "dx": saved["dx"]})
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for j, c in enumerate(CLASSES):
        table[f"p_{c}"] = probs[:, j]
    return table


def oof_lesions(folders: list[Path], image_ids: pd.Series) -> np.ndarray | None:
    """The lesion id of every out-of-fold image, from the folds' split.csv (None where a fold has none or an image
    is missing from them: the intervals then resample images)."""
    splits = [pd.read_csv(f / SPLIT_NAME, dtype=str) for f in folders if (f / SPLIT_NAME).is_file()]
    if len(splits) < len(folders):
        return None
    lesion = pd.concat(splits).drop_duplicates("image_id").set_index("image_id")["lesion_id"]
    found = image_ids.astype(str).map(lesion)
    return None if found.isna().any() else found.to_numpy()


def run_lesions(run: Path, oof: pd.DataFrame) -> np.ndarray | None:
    """oof_lesions for the folds of a k-fold run folder."""
    return oof_lesions([folder for _, folder in fold_dirs(run)], oof["image_id"])


def ensemble_oof(runs: list[Path], variant: str = "present") -> pd.DataFrame:
    """Out-of-fold probabilities averaged over runs trained on the same folds (same test images per fold)."""
    per_run = [dict(fold_dirs(run)) for run in runs]
    folds = sorted(per_run[0])
    for run, dirs in zip(runs[1:], per_run[1:]):
        if sorted(dirs) != folds:
            missing = sorted(set(folds) ^ set(dirs))
            raise ValueError(f"{run}: folds {sorted(dirs)} but {runs[0]} has {folds} (fold{missing[0]} is missing "
                             "in one); every run must have the same folds")
    frames: list[pd.DataFrame] = []
    seen: dict[str, int] = {}  # image_id -> the fold it is a test image of
    for k in folds:
        tables = [fold_probs(dirs[k], variant) for dirs in per_run]
        again = [i for i in tables[0]["image_id"] if i in seen]
        if again:
            raise ValueError(f"{runs[0]}: {again[0]} is a test image of fold{seen[again[0]]} and fold{k}; the "
                             "folds come from different splits (a fold left from an earlier run?)")
        seen.update(dict.fromkeys(tables[0]["image_id"], k))
        first = tables[0]
        for run, t in zip(runs[1:], tables[1:]):  # same split: the same test images in the same order
            if list(t["image_id"]) != list(first["image_id"]):
                raise ValueError(f"{run}/fold{k}: other test images than {runs[0]}/fold{k}; the runs were not "
                                 "trained on the same split (same --folds and --split-seed)")
        cols = [f"p_{c}" for c in CLASSES]
        mean = np.mean([t[cols].to_numpy() for t in tables], axis=0)
        frames.append(first[["image_id", "dx"]].assign(fold=k, **{c: mean[:, j] for j, c in enumerate(cols)}))
    return pd.concat(frames, ignore_index=True)


def _headline(labels: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> dict:
    m = classification_metrics(labels, probs, CLASSES, pred=pred)
    m["melanoma_recall"] = m["per_class"]["mel"]["recall"]
    m["akiec_recall"] = m["per_class"]["akiec"]["recall"]
    return m


def oof_sample(oof: pd.DataFrame, pred: np.ndarray | None = None) -> Sample:
    """Out-of-fold predictions -> a bootstrap Sample (decision: `pred`, else the arg-max)."""
    probs = oof[[f"p_{c}" for c in CLASSES]].to_numpy(dtype=np.float64)
    labels = oof["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    return Sample(labels, probs, probs.argmax(1) if pred is None else pred, mel=CLASSES.index("mel"))


INTERVAL_KEYS = ("balanced_accuracy", "macro_auc", "melanoma_auc") + tuple(f"recall_{i}" for i in range(len(CLASSES)))


def _named(key: str) -> str:
    """bootstrap's recall_<index> -> recall_<class>."""
    return f"recall_{CLASSES[int(key[7:])]}" if key.startswith("recall_") else key


def _plain(obj):
    """JSON's own form (tuples as lists, NaN as None), so a report equals itself read back from cv_report.json."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def oof_intervals(oof: pd.DataFrame, lesions: np.ndarray | None, rule_pred: np.ndarray | None = None,
                  resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """95% bootstrap intervals of the pooled out-of-fold figures (arg-max decision: balanced accuracy, per-class
    recall; macro and melanoma AUC) and, with `rule_pred` (each image decided by the nested rule of its fold), of
    the rule's balanced accuracy and per-class recall. ECE is left out: these are uncalibrated probabilities."""
    res = bootstrap(oof_sample(oof), lesions, resamples=resamples, seed=seed)
    out = {k: res[k] for k in ("resamples", "seed", "level", "unit")}
    out["metrics"] = {_named(k): res["metrics"][k] for k in INTERVAL_KEYS if k in res["metrics"]}
    if rule_pred is not None:
        rule = bootstrap(oof_sample(oof, rule_pred), lesions, resamples=resamples, seed=seed)["metrics"]
        out["rule"] = {_named(k): rule[k] for k in INTERVAL_KEYS if k.startswith(("balanced", "recall"))}
    return _plain(out)


def pooled_pair(base: pd.DataFrame, other: pd.DataFrame, lesions: np.ndarray | None, resamples: int = RESAMPLES,
                seed: int = SEED) -> dict:
    """`other` minus `base` on the pooled out-of-fold predictions of the same images (arg-max decisions): the paired
    bootstrap interval of each difference (`lesions`: the lesion id of each row of `base`), and DeLong's test for
    the melanoma and per-class AUCs."""
    merged = base.merge(other, on=["image_id", "dx"], suffixes=("_a", "_b"), validate="one_to_one")
    if len(merged) != len(base) or len(merged) != len(other):
        raise ValueError("a pooled pair needs the out-of-fold predictions of the same images")
    cols = [f"p_{c}" for c in CLASSES]
    a = oof_sample(merged.rename(columns={f"{c}_a": c for c in cols}))
    b = oof_sample(merged.rename(columns={f"{c}_b": c for c in cols}))
    groups = None if lesions is None else merged["image_id"].map(dict(zip(base["image_id"], lesions))).to_numpy()
    res = paired(a, b, groups, resamples=resamples, seed=seed)
    per_class = {c: delong(a.labels == i, a.probs[:, i], b.probs[:, i]) for i, c in enumerate(CLASSES)
                 if 2 <= (a.labels == i).sum() <= len(a.labels) - 2}
    return _plain({**{k: res[k] for k in ("resamples", "seed", "level", "unit")}, "images": int(len(merged)),
                   "decision": "argmax",
                   "metrics": {_named(k): res["metrics"][k] for k in INTERVAL_KEYS if k in res["metrics"]},
                   "delong": {"melanoma_auc": per_class.get("mel"), "per_class_auc": per_class}})


def summarize_oof(oof: pd.DataFrame, lesions: np.ndarray | None = None, resamples: int = RESAMPLES,
                  seed: int = SEED) -> dict:
    """Per-fold mean +- std of the headline metrics, by arg-max and (with 2 folds or more) by the decision rule
    whose prior and tau come from the other folds (nested); pooled metrics with their bootstrap intervals
    (`lesions`: each image's lesion id, resampled within its class; none: images; `resamples` 0: no intervals);
    the rule's nested estimate."""
    cols = [f"p_{c}" for c in CLASSES]
    index = {c: i for i, c in enumerate(CLASSES)}
    folds = sorted(oof["fold"].unique())
    rule = (nested_estimate(oof, log_prior_from_counts(oof["dx"].value_counts().to_dict()))
            if len(folds) > 1 else None)
    nested = {r["fold"]: r for r in rule["nested"]} if rule else {}
    per_fold, per_fold_rule = [], []
    rule_pred = np.zeros(len(oof), dtype=int)  # each image decided by its own fold's nested rule
    for k in folds:
        inside = (oof["fold"] == k).to_numpy()
        part = oof[inside]
        y, p = part["dx"].map(index).to_numpy(), part[cols].to_numpy()
        per_fold.append(_headline(y, p))
        if rule:
            r = nested[int(k)]
            rule_pred[inside] = adjusted_pred(p, np.asarray(r["log_prior"]), r["tau"])
            per_fold_rule.append(_headline(y, p, rule_pred[inside]))
    keys = HEADLINE + ("akiec_recall",)
    return {"images": int(len(oof)), "folds": len(per_fold),
            "per_fold_mean_std": {k: mean_std([m[k] for m in per_fold]) for k in keys},
            "per_fold_rule_mean_std": ({k: mean_std([m[k] for m in per_fold_rule])
                                        for k in ("balanced_accuracy", "melanoma_recall", "akiec_recall")}
                                       if rule else None),
            "per_class_recall_mean": {c: float(np.mean([m["per_class"][c]["recall"] for m in per_fold]))
                                      for c in CLASSES},
            "pooled_oof": _headline(oof["dx"].map(index).to_numpy(), oof[cols].to_numpy()),
            **({"pooled_oof_intervals": oof_intervals(oof, lesions, rule_pred if rule else None, resamples, seed)}
               if resamples else {}),
            "decision_rule": rule or {"note": "the decision rule needs 2 folds or more"}}


def cross_run_report(runs: list[str | Path], output: str | Path, variant: str = "present",
                     resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """`skain cv-report`: the cross-validated report of one k-fold run or of the ensemble of several (their
    probabilities averaged per test image), for one scored variant (present, all_blank, age_blank, ...; a
    `_tta8` suffix for the 8-view scores). Writes <output>/oof_<variant>.csv and cv_<variant>.json, with
    bootstrap intervals of the pooled figures (`resamples` lesion resamples, lesion ids from the first run's
    split.csv files)."""
    paths = [Path(r) for r in runs]
    oof = ensemble_oof(paths, variant)
    report = {"what": f"k-fold cross-validation, lesion-grouped, test folds that chose nothing; variant {variant}; "
                      + ("one run" if len(paths) == 1 else f"ensemble of {len(paths)} runs (probabilities averaged)")
                      + "; probabilities are the softmax of the stored logits (no temperature)",
              "runs": [str(r) for r in paths], "variant": variant,
              **summarize_oof(oof, run_lesions(paths[0], oof), resamples, seed)}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"oof_{variant}.csv", lambda fh: fh.write(oof.to_csv(index=False).encode()))
    atomic_json(report, out / f"cv_{variant}.json")
    return report


def variant_row(runs: list[Path], variant: str, oof: pd.DataFrame | None = None) -> dict:
    """One row of the metadata table: mean +- std over folds (with per-fold values), by arg-max and by the nested
    decision rule (`oof`: the rows' ensemble_oof when already made)."""
    s = summarize_oof(ensemble_oof(runs, variant) if oof is None else oof, resamples=0)
    if s["per_fold_rule_mean_std"] is None:
        raise ValueError(f"{runs[0]}: the metadata table needs test folds of 2 folds or more (found {s['folds']})")
    h, r = s["per_fold_mean_std"], s["per_fold_rule_mean_std"]
    return {"balanced_accuracy": h["balanced_accuracy"], "balanced_accuracy_rule": r["balanced_accuracy"],
            "macro_auc": h["macro_auc"], "melanoma_recall": h["melanoma_recall"],
            "melanoma_recall_rule": r["melanoma_recall"], "akiec_recall": h["akiec_recall"],
            "per_class_recall_mean": s["per_class_recall_mean"],
            "tau_per_fold": [x["tau"] for x in s["decision_rule"]["nested"]]}


def paired_diff(a: dict, b: dict) -> dict:
    """a - b per fold (same test images), for balanced accuracy and melanoma recall, arg-max and rule."""
    out = {}
    for metric in ("balanced_accuracy", "melanoma_recall"):
        for rule, suffix in (("argmax", ""), ("rule", "_rule")):
            diff = np.asarray(a[metric + suffix]["folds"]) - np.asarray(b[metric + suffix]["folds"])
            out[f"{metric}_{rule}"] = {"mean": float(diff.mean()), "std": float(diff.std(ddof=1)),
                                       "folds": [round(float(v), 4) for v in diff],
                                       "folds_not_worse": int((diff >= 0).sum())}
    return out


def _tta_views(run: Path) -> int | None:
    """N when every test fold of the run was also scored with N TTA views (`present_ttaN` logits), else None."""
    views = set()
    for _, folder in fold_dirs(run):
        with np.load(folder / TEST_LOGITS) as saved:
            views.add(next((int(m.group(1)) for m in (re.fullmatch(r"present_tta(\d+)", f) for f in saved.files)
                            if m), None))
    return views.pop() if len(views) == 1 else None


METADATA_PLAN = (("image-only", "img", ""), ("multimodal, fields present", "mm", "present"),
                 ("multimodal, age blank", "mm", "age_blank"), ("multimodal, sex blank", "mm", "sex_blank"),
                 ("multimodal, site blank", "mm", "site_blank"), ("multimodal, all blank", "mm", "all_blank"),
                 ("ensemble mm + image-only, fields present", "both", "present"),
                 ("ensemble mm + image-only, all blank", "both", "all_blank"))


def metadata_table(mm: Path, img: Path, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, dict]:
    """The multimodal model with fields present / each blank / all blank, the image-only model trained on the same
    folds, and their ensemble; single view and, when both runs scored them, TTA views; each row paired per fold
    against the image-only row of the same views (`vs_image_only_paired`) and, with `resamples`, on the pooled
    out-of-fold predictions (`vs_image_only_pooled`: paired bootstrap interval, DeLong for the AUCs)."""
    mm, img = Path(mm), Path(img)
    if is_image_only(fold_dirs(mm)[0][1]):
        raise ValueError(f"{mm}: an image-only run; give the multimodal run first and the image-only one after "
                         "--image-only")
    if not is_image_only(fold_dirs(img)[0][1]):
        raise ValueError(f"{img}: not an image-only run (it scored blanked metadata); train it with --image-only")
    tta = _tta_views(mm)
    tta = tta if tta is not None and tta == _tta_views(img) else None
    runs = {"mm": [mm], "img": [img], "both": [mm, img]}
    table, oofs = {}, {}
    for views in ("",) + ((f"_tta{tta}",) if tta else ()):
        for name, which, variant in METADATA_PLAN:
            if views and variant in ("age_blank", "sex_blank", "site_blank"):
                continue
            key = name + (f", {tta}-view TTA" if views else "")
            oofs[key] = ensemble_oof(runs[which], (variant or "present") + views)
            table[key] = variant_row(runs[which], (variant or "present") + views, oofs[key])
    lesions = run_lesions(mm, oofs["image-only"]) if resamples else None
    for key in table:
        base = "image-only" + (f", {tta}-view TTA" if "TTA" in key else "")
        if key != base:
            table[key]["vs_image_only_paired"] = paired_diff(table[key], table[base])
            if resamples:
                base_lesions = None if lesions is None else \
                    oofs[base]["image_id"].map(dict(zip(oofs["image-only"]["image_id"], lesions))).to_numpy()
                table[key]["vs_image_only_pooled"] = pooled_pair(oofs[base], oofs[key], base_lesions, resamples, seed)
    return table


def metadata_markdown(table: dict[str, dict]) -> str:
    lines = ["| test folds | balanced accuracy (argmax) | with the decision rule (nested) | macro AUC | "
             "melanoma recall (argmax / rule) | vs image only, paired (argmax; folds not worse) | "
             "vs image only, pooled out-of-fold: balanced accuracy [95% CI]; melanoma AUC, DeLong p |",
             "|---|---|---|---|---|---|---|"]
    for key, r in table.items():
        p = r.get("vs_image_only_paired")
        vs = (f"{p['balanced_accuracy_argmax']['mean']:+.3f} ({p['balanced_accuracy_argmax']['folds_not_worse']}/"
              f"{len(p['balanced_accuracy_argmax']['folds'])}); mel {p['melanoma_recall_argmax']['mean']:+.3f} "
              f"({p['melanoma_recall_argmax']['folds_not_worse']}/{len(p['melanoma_recall_argmax']['folds'])})"
              if p else "")
        lines.append(f"| {key} | {r['balanced_accuracy']['mean']:.3f} +- {r['balanced_accuracy']['std']:.3f} | "
                     f"{r['balanced_accuracy_rule']['mean']:.3f} +- {r['balanced_accuracy_rule']['std']:.3f} | "
                     f"{r['macro_auc']['mean']:.3f} | {r['melanoma_recall']['mean']:.3f} / "
                     f"{r['melanoma_recall_rule']['mean']:.3f} | {vs} | {pooled_text(r.get('vs_image_only_pooled'))} |")
    return "\n".join(lines) + "\n"


def pooled_text(pooled: dict | None) -> str:
    """A metadata-table cell: the pooled balanced-accuracy difference with its paired interval, and melanoma AUC's."""
    if not pooled:
        return ""
    ba, mel = pooled["metrics"]["balanced_accuracy"], pooled["metrics"].get("melanoma_auc")
    text = f"{ba['difference']:+.3f} [{ba['ci'][0]:+.3f}, {ba['ci'][1]:+.3f}]"
    test = pooled["delong"].get("melanoma_auc")
    if mel and test:
        text += f"; mel AUC {mel['difference']:+.3f}, p = {test['p_value']:.3g}"
    return text


def write_metadata_table(mm: str | Path, img: str | Path, output: str | Path, resamples: int = RESAMPLES,
                         seed: int = SEED) -> dict[str, dict]:
    """`skain cv-report MM --image-only IMG`: <output>/metadata_table.json and .md."""
    table = metadata_table(Path(mm), Path(img), resamples, seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_json({"what": "test folds that chose nothing; rule = prior-adjusted decision, tau chosen on the other "
                         "folds; paired = this row minus the image-only row of the same views, per fold; pooled = "
                         "the same difference on the pooled out-of-fold predictions (arg-max), with its paired "
                         "bootstrap interval (lesions resampled within their diagnosis) and DeLong's test for AUCs",
                 "multimodal": str(mm), "image_only": str(img), "rows": table}, out / "metadata_table.json")
    atomic_write(out / "metadata_table.md", lambda fh: fh.write(metadata_markdown(table).encode("utf-8")))
    return table
