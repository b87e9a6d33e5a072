"""Do two models keep their decisions equally often when the same images are saved again? Paired, per copy.

    python -m benchmarks.accuracy.kept_between_models --run outputs/exp/photo \\
        --a outputs/exp/pred_photo --b outputs/exp/pred_cons [--names photo consistency] [--out FILE]

With `--rule-a MODEL` / `--rule-b MODEL` a side's predictions are decided by MODEL's stored decision rule
instead of the one that wrote them (the same predictions under two rules: e.g. the tau taken over from the shipped
file against the tau `skain decide --validation` chose).

`--a` and `--b` are folders written by `benchmarks.accuracy.reencode_effect --predictions DIR` for two models on
the same images (a `--run`'s held-out test fold): `original.csv` and one CSV per copy (an `original.csv` alone
compares the originals only). For every copy both
models have, this reports each model's share of decisions equal to its own decision on the original, the
difference B - A, balanced accuracy on the copy and its difference, and the share turned away, each with a 95%
interval from resampling lesions within their diagnosis, the same resamples for both models (so the interval is
of the paired difference). The truth (dx, lesion_id) comes from the shared HAM10000 metadata.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.accuracy.reencode_effect import sample
from benchmarks.common import DATA_ROOT, ham10000, split_rows, what, write_json
from skain.data.schema import CLASSES
from skain.evaluation.bootstrap import Sample, image_weights, interval, lesion_counts, paired
from skain.inference.decision import Decision
from skain.modelfile.load import read_bundle, resolve_path


def redecided(pred: pd.DataFrame, rule: dict | None) -> pd.DataFrame:
    """`pred` with its `pred` column named by `rule` (a bundle's decision rule: tau and log prior) from its own
    calibrated probabilities; triage and OOD verdicts, which do not depend on the rule, unchanged. No rule: as is."""
    if rule is None:
        return pred
    probs = pred[[f"p_{c}" for c in CLASSES]].to_numpy(np.float64)
    return pred.assign(pred=np.asarray(CLASSES)[Decision(rule, CLASSES)(probs)])


def aligned(folder: Path, name: str, frame: pd.DataFrame, rule: dict | None = None) -> Sample:
    """`folder/name.csv` in `frame`'s row order as a Sample (decision, triage, OOD), as reencode_effect reads its
    own predictions; with `rule`, decided by that rule instead of the one that wrote them."""
    return sample(redecided(pd.read_csv(folder / f"{name}.csv", dtype={"image_id": str}), rule), frame)


def rule_of(model: str | None) -> dict | None:
    """The decision rule stored in `model` (bundle or output folder); a model without one decides by arg-max."""
    if model is None:
        return None
    return read_bundle(resolve_path(model)).get("decision") or {"tau": 0.0}


def kept_share(original: Sample, copy: Sample) -> np.ndarray:
    """Per image: 1 where the copy's decision equals the original's."""
    return (original.pred == copy.pred).astype(np.float64)


def with_ci(point: float, draws: np.ndarray) -> dict:
    return {"value": round(float(point), 4), "ci": [round(v, 4) for v in interval(draws)]}


def paired_figures(diff: dict, keys: tuple[str, ...]) -> dict:
    """`bootstrap.paired`'s metrics -> {key: {a, b, difference: {value, ci}}} for the keys it has, rounded."""
    return {k: {"a": round(diff[k]["a"], 4), "b": round(diff[k]["b"], 4),
                "difference": {"value": round(diff[k]["difference"], 4), "ci": [round(v, 4) for v in diff[k]["ci"]]}}
            for k in keys if k in diff}


def compare_copy(orig_a: Sample, copy_a: Sample, orig_b: Sample, copy_b: Sample, lesions: np.ndarray,
                 resamples: int) -> dict:
    """Decisions kept by A and by B and B - A, with the balanced-accuracy and turned-away figures on the copy."""
    ka, kb = kept_share(orig_a, copy_a), kept_share(orig_b, copy_b)
    counts, lesion_of = lesion_counts(orig_a.labels, lesions, resamples)
    w = image_weights(counts, lesion_of)
    da, db = w @ ka / w.sum(1), w @ kb / w.sum(1)
    out = {"kept_a": with_ci(ka.mean(), da), "kept_b": with_ci(kb.mean(), db),
           "kept_difference": with_ci(kb.mean() - ka.mean(), db - da)}
    diff = paired(copy_a, copy_b, lesions, resamples)["metrics"]
    return {**out, **paired_figures(diff, ("balanced_accuracy", "ood_rejection", "triage_sensitivity"))}


def test_fold(run: str | Path, data_root: str | Path) -> pd.DataFrame:
    """The shared HAM10000 rows of `run`'s held-out test fold (dx, lesion_id); refused when it has none."""
    frame = split_rows(ham10000(Path(data_root), full=True), run, "test")
    if frame.empty:
        raise SystemExit(f"{run}: no test fold in split.csv (train it with --holdout)")
    return frame


def compare_folders(frame: pd.DataFrame, a: Path, b: Path, names=("a", "b"), rule_models=(None, None),
                    resamples: int = 2000) -> dict:
    """A against B on `frame`'s images: the originals' paired figures and, for every copy both folders hold,
    compare_copy; each side decided by the rule of its `rule_models` entry where given."""
    copies = sorted({p.stem for p in a.glob("*.csv")} & {p.stem for p in b.glob("*.csv")} - {"original"})
    lesions = frame["lesion_id"].astype(str).to_numpy()
    rules = tuple(rule_of(m) for m in rule_models)
    orig_a, orig_b = aligned(a, "original", frame, rules[0]), aligned(b, "original", frame, rules[1])
    side = lambda name, folder, model, rule: {"name": name, "predictions": str(folder), **(  # noqa: E731
        {"rule_from": str(model), "tau": float(rule.get("tau", 0.0))} if model else {})}
    result = {"what": what(__doc__), "a": side(names[0], a, rule_models[0], rules[0]),
              "b": side(names[1], b, rule_models[1], rules[1]), "images": len(frame),
              "lesions": int(len(np.unique(lesions))), "resamples": resamples, "copies": {}}
    original = paired(orig_a, orig_b, lesions, resamples)["metrics"]
    result["original"] = paired_figures(original, ("balanced_accuracy", "macro_auc", "ood_rejection",
                                                   "triage_sensitivity", "triage_specificity"))
    print("original", result["original"], flush=True)
    for name in copies:
        result["copies"][name] = compare_copy(orig_a, aligned(a, name, frame, rules[0]), orig_b,
                                              aligned(b, name, frame, rules[1]), lesions, resamples)
        print(name, result["copies"][name], flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the `skain train --holdout` run whose test fold both scored")
    ap.add_argument("--a", required=True, help="predictions folder of model A (reencode_effect --predictions)")
    ap.add_argument("--b", required=True, help="predictions folder of model B")
    ap.add_argument("--names", nargs=2, default=["a", "b"], help="what to call A and B in the output")
    ap.add_argument("--rule-a", metavar="MODEL", help="decide A's predictions by MODEL's decision rule (tau and log "
                    "prior) instead of the rule that wrote them: two rules on one model's predictions, paired")
    ap.add_argument("--rule-b", metavar="MODEL", help="the same for B")
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/out/kept_between_models.json")
    ns = ap.parse_args()
    frame = test_fold(ns.run, ns.data_root)
    result = compare_folders(frame, Path(ns.a), Path(ns.b), ns.names, (ns.rule_a, ns.rule_b), ns.resamples)
    write_json(ns.out, result, indent=1)


if __name__ == "__main__":
    main()
