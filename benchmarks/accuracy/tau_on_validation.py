"""What a tau chosen on a model's own validation split (`skain decide --validation`) changes on a held-out test fold
that chose nothing, against the rule the model's stored predictions were made with. Paired, per copy.

    python -m benchmarks.accuracy.tau_on_validation --run outputs/exp/photo \\
        --entry consistency outputs/exp/pred_ens_cons outputs/exp/ens_cons_vt \\
        [--entry NAME PREDICTIONS OWN_MODEL ...] [--reference photo-augment outputs/exp/pred_ens_orig] [--out FILE]

Each `--entry` names a folder of one model's per-image predictions on the run's test fold and its copies
(`benchmarks.accuracy.reencode_effect --predictions DIR`, made with the rule the model held then) and OWN_MODEL, a
copy of that model after `skain decide --validation`. The same calibrated probabilities are decided both ways, on
the same lesion resamples (`kept_between_models.compare_folders`): balanced accuracy on the originals and on each
copy, decisions kept under each copy. With `--reference`, each entry under its own rule is also paired with the
reference predictions (as written) on the originals. The tau, its cross-fitted estimate and the figures
`skain decide --validation` stored come from OWN_MODEL's bundle.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from benchmarks.accuracy.kept_between_models import compare_folders, test_fold
from benchmarks.common import DATA_ROOT, what, write_json
from skain.modelfile.load import read_bundle, resolve_path


def chosen(model: str) -> dict:
    """The rule `skain decide --validation` stored in `model`: tau, where it was chosen, its cross-fitted estimate
    and the figures stored beside it (which rows, how many, balanced accuracy with the rule and at arg-max)."""
    rule = read_bundle(resolve_path(model)).get("decision") or {}
    if "cross_fitted_balanced_accuracy" not in rule:
        raise SystemExit(f"{model}: holds no rule chosen by `skain decide --validation`")
    v = rule.get("validation") or {}
    return {"tau": rule["tau"], "fit_on": rule.get("fit_on"), "cross_fitted": rule["cross_fitted_balanced_accuracy"],
            "stored_figures": {"split": v.get("split"), "n": v.get("n"), "views": v.get("views"),
                               "balanced_accuracy": v.get("balanced_accuracy"),
                               "balanced_accuracy_argmax": (v.get("argmax") or {}).get("balanced_accuracy"),
                               "measured_on": v.get("measured_on")}}


def entry(frame: pd.DataFrame, name: str, predictions: Path, own: str, reference: tuple[str, Path] | None,
          resamples: int) -> dict:
    out = {"own_rule": chosen(own),
           "same_predictions_two_taus": compare_folders(frame, predictions, predictions,
                                                        ("as predicted", f"{name}, own tau"), (None, own), resamples)}
    if reference:
        ref_name, ref = reference
        both = compare_folders(frame, ref, predictions, (ref_name, f"{name}, own tau"), (None, own), resamples)
        out["against_reference"] = {k: both[k] for k in ("a", "b", "images", "lesions", "original")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the `skain train --holdout` run whose test fold was predicted")
    ap.add_argument("--entry", nargs=3, action="append", required=True, metavar=("NAME", "PREDICTIONS", "OWN_MODEL"))
    ap.add_argument("--reference", nargs=2, metavar=("NAME", "PREDICTIONS"),
                    help="another model's predictions on the same originals, paired with each entry's own tau")
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/out/tau_on_validation.json")
    ns = ap.parse_args()
    frame = test_fold(ns.run, ns.data_root)
    reference = (ns.reference[0], Path(ns.reference[1])) if ns.reference else None
    result = {"what": what(__doc__), "run": ns.run, "reference": ns.reference,
              "entries": {name: entry(frame, name, Path(pred), own, reference, ns.resamples)
                          for name, pred, own in ns.entry}}
    write_json(ns.out, result, indent=1)


if __name__ == "__main__":
    main()
