"""Issue 12's cross-validated benchmark measured on 2 CPU cores: one `skain train --all-folds` run of the `cpu`
preset on all of HAM10000, its accuracy on test folds that chose nothing, and the wall and CPU minutes it took.

    /usr/bin/time -v skain train --preset cpu --data ../shared/ham10000 --all-folds --max-minutes 12 \\
        --output /tmp/cpucv/run 2> /tmp/cpucv/time.txt
    python -m benchmarks.accuracy.cv_cpu_report --run /tmp/cpucv/run --time-log /tmp/cpucv/time.txt \\
        [--ensemble-with /tmp/gpu/mm ...] [--against OTHER_RUN] --out benchmarks/results/cpu_cv.json

Rows are `skain cv-report` figures (skain.training.cvreport.variant_row: mean +- std over the test folds, by arg-max and by
the nested prior-adjusted decision rule) for metadata present / all blank, single view and 8 TTA views.
`--ensemble-with` adds the same variants for the average of this run and other k-fold runs on the same split
(e.g. the GPU runs of benchmarks/gpu/cv_pair.sh), each ensemble paired per test fold against each of its members;
give it more than once for several ensembles. `--against` adds
this run minus another k-fold run on the same split (or the result JSON written for it), per test fold
(skain.training.cvreport.paired_diff, as `skain cv-report --image-only` pairs its rows). Several --time-log files (an
interrupted run resumed) are summed.

Its --out files in benchmarks/results/ (docs/training.md, "Honest numbers"; README, "Results"); fields this script
does not write were added to them afterwards, by hand:
  cpu_cv.json             the cpu preset's 5 folds on 2 CPU cores, --ensemble-with the GPU multimodal run
  cpu_cv_lite2.json       Lite2 @ 260 on 2 CPU cores, --against cpu_cv.json
  cpu_cv_lite0_lite2.json the 224 px rerun, --ensemble-with the Lite2 run, --against cpu_cv.json; plus `note`,
                          `ensemble_paired`, and `ensemble_bundle_per_fold` and `resize_floor_fold0_lite0_member`
                          (measured with benchmarks.accuracy.ensemble_sizes)
  cpu_cv_three.json       Lite0 @ 288 with two ensembles, --against the 224 px rerun; plus `note` and
                          `three_minus_lite0_lite2_per_fold`
  gpu_cv_lite2_288.json   the two GPU runs of benchmarks/gpu/cv_pair.sh (--run a --ensemble-with b --against
                          benchmarks/results/cpu_cv_lite2.json); plus `command`, `training_b` and `note`
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.common import fold_differences, kfold_training, what, write_json
from skain.training.cvreport import variant_row

VARIANTS = ("present", "all_blank", "present_tta8", "all_blank_tta8")
TIME_FIELDS = {"user_s": r"User time \(seconds\): ([\d.]+)", "sys_s": r"System time \(seconds\): ([\d.]+)",
               "wall": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)"}


def gnu_time(path: Path) -> dict:
    """User, system and wall seconds from `/usr/bin/time -v` output."""
    text = path.read_text(errors="replace")
    found = {k: re.search(p, text) for k, p in TIME_FIELDS.items()}
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise SystemExit(f"{path}: no {', '.join(missing)} (not /usr/bin/time -v output?)")
    wall = 0.0
    for part in found["wall"].group(1).split(":"):
        wall = wall * 60 + float(part)
    return {"user_s": float(found["user_s"].group(1)), "sys_s": float(found["sys_s"].group(1)), "wall_s": wall}


def rows(runs: list[Path]) -> dict:
    return {v: variant_row(runs, v) for v in VARIANTS}


def minus(a: dict, b: dict) -> dict:
    """Rows a - b per test fold (same split): balanced accuracy and melanoma recall by arg-max and by the rule,
    with the folds not worse, and macro AUC."""
    return fold_differences(a, b, VARIANTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="the k-fold output (fold<k>/ folders)")
    ap.add_argument("--time-log", nargs="+", type=Path, default=[], help="/usr/bin/time -v output(s) of the run")
    ap.add_argument("--ensemble-with", nargs="+", type=Path, action="append", default=[],
                    help="other k-fold runs on the same split, averaged with this one (repeat for more ensembles)")
    ap.add_argument("--against", type=Path, help="another k-fold run on the same split (its folder, or the JSON this "
                    "script wrote for it): per-fold differences")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    result: dict = {"what": what(__doc__), "run": str(a.run), "training": kfold_training(a.run),
                    "rows": rows([a.run])}
    if a.time_log:
        times = [gnu_time(p) for p in a.time_log]
        total = {k: round(sum(t[k] for t in times), 1) for k in ("wall_s", "user_s", "sys_s")}
        result["process_time"] = {**total, "wall_minutes": round(total["wall_s"] / 60, 1),
                                  "cpu_minutes": round((total["user_s"] + total["sys_s"]) / 60, 1),
                                  "kernel_share": round(total["sys_s"] / (total["user_s"] + total["sys_s"]), 3),
                                  "logs": [str(p) for p in a.time_log]}
    member_rows = {str(a.run): result["rows"]}
    result["ensembles"] = []
    for group in a.ensemble_with:
        ensemble = rows([a.run, *group])
        member_rows.update({str(g): rows([g]) for g in group if str(g) not in member_rows})
        result["ensembles"].append({
            "runs": [str(a.run), *map(str, group)], "rows": ensemble,
            "ensemble_minus_member_per_fold": {m: minus(ensemble, member_rows[m])
                                               for m in [str(a.run), *map(str, group)]}})
    if a.against:
        other = json.loads(a.against.read_text())["rows"] if a.against.is_file() else rows([a.against])
        result["against"] = {"run": str(a.against), "rows": other,
                             "this_minus_other_per_fold": minus(result["rows"], other)}
    write_json(a.out, result)
    tables = [("this run", result["rows"])] + [(" + ".join(e["runs"]), e["rows"]) for e in result["ensembles"]]
    if a.against:
        tables.append((f"against {a.against}", result["against"]["rows"]))
    for title, table in tables:
        print(f"== {title}")
        for v, r in table.items():
            print(f"{v:16s} BA {r['balanced_accuracy']['mean']:.3f} +- {r['balanced_accuracy']['std']:.3f}  "
                  f"rule {r['balanced_accuracy_rule']['mean']:.3f} +- {r['balanced_accuracy_rule']['std']:.3f}  "
                  f"AUC {r['macro_auc']['mean']:.3f}  mel {r['melanoma_recall']['mean']:.3f} / "
                  f"{r['melanoma_recall_rule']['mean']:.3f}")
    diffs = [(f"ensemble {i} - {m}", d) for i, e in enumerate(result["ensembles"])
             for m, d in e["ensemble_minus_member_per_fold"].items()]
    if a.against:
        diffs.append(("this - other", result["against"]["this_minus_other_per_fold"]))
    for title, diff in diffs:
        print(f"== {title}")
        for v, d in diff.items():
            arg, rule, k = d["balanced_accuracy_argmax"], d["balanced_accuracy_rule"], len(d["macro_auc"])
            print(f"{v:16s} BA {arg['mean']:+.3f} ({arg['folds_not_worse']}/{k} folds not worse)  "
                  f"rule {rule['mean']:+.3f} ({rule['folds_not_worse']}/{k})  AUC {sum(d['macro_auc']) / k:+.3f}")
    print(json.dumps({k: result[k] for k in ("training", "process_time") if k in result}))


if __name__ == "__main__":
    main()
