"""Which of the docs' key comparisons are distinguishable from noise: the mean paired difference across the 5 test
folds with its 95% t-interval, from the per-fold values the stored results files already hold.

Every k-fold results file here (skain cv-report rows: `rows`, `ensembles[i].rows`) keeps each row's figure on each of
the 5 test folds of one lesion-grouped split of all 10,015 HAM10000 images; rows on that split are paired fold by fold
(the same test images). For a comparison B - A this writes the per-fold differences, their mean, and two 95%
intervals with n - 1 = 4 degrees of freedom (t = 2.776):

- `t`: the paired t-interval, mean +- t * sd / sqrt(n), treating the 5 fold differences as independent draws;
- `t_corrected`: the same with Nadeau and Bengio's (2003) variance correction for resampled training sets,
  mean +- t * sd * sqrt(1/n + n_test/n_train), n_test/n_train = 1/(k-1) = 1/4 for 5 folds. The folds' training
  sets overlap (each pair shares 3 of 5 folds), so their differences are positively correlated and the plain
  interval is too narrow; the corrected one is 1.5 times as wide.

A difference is "distinguishable" when the corrected interval excludes 0, "plain interval only" when only the
plain one does, else "not distinguishable". Where a lesion-resampled bootstrap of one test fold exists (`skain
compare`, per-lesion scoring) it is copied beside the fold intervals; where a results file holds point figures
only (re-encoded copies, the 500-image TTA sample), no interval can be given and the file is named.

Usage: python -m benchmarks.accuracy.fold_intervals [--out benchmarks/results/fold_intervals.json] [--markdown]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks.common import RESULTS_DIR, what, write_json

METRICS = {"balanced_accuracy": "balanced accuracy, arg-max", "balanced_accuracy_rule": "balanced accuracy, rule",
           "macro_auc": "macro AUC", "melanoma_recall": "melanoma recall, arg-max",
           "melanoma_recall_rule": "melanoma recall, rule"}
T_975 = {4: 2.7764451051977987, 3: 3.182446305284263, 2: 4.302652729749464}  # scipy.stats.t.ppf(0.975, df)


def row(file: str, name: str, ensemble: int | None = None) -> tuple[str, dict]:
    """(citation, the row's metrics with per-fold values) from a results file's `rows` or `ensembles[i].rows`."""
    data = json.loads((RESULTS_DIR / f"{file}.json").read_text())
    rows = data["rows"] if ensemble is None else data["ensembles"][ensemble]["rows"]
    where = f"{file}.json " + (f"rows[{name!r}]" if ensemble is None else f"ensembles[{ensemble}].rows[{name!r}]")
    return where, rows[name]


GPU, L0, L0B, L2, L288 = "gpu_cv_pair", "cpu_cv", "cpu_cv_lite0_lite2", "cpu_cv_lite2", "cpu_cv_three"
# (topic, B - A in words, B, A): every B and A on the same 5-fold split (the same test images fold by fold)
COMPARISONS = [
    ("metadata", "image + metadata (fields present) - image only, GPU", (GPU, "multimodal, fields present"),
     (GPU, "image-only")),
    ("metadata", "image + metadata with all three fields blank - image only, GPU", (GPU, "multimodal, all blank"),
     (GPU, "image-only")),
    ("metadata", "fields present - all three blank (what a blank form costs), GPU", (GPU, "multimodal, fields present"),
     (GPU, "multimodal, all blank")),
    ("metadata", "fields present - all three blank, 2 CPU cores", (L0, "present"), (L0, "all_blank")),
    ("metadata", "image + metadata - image only, both with 8 TTA views, GPU",
     (GPU, "multimodal, fields present, 8-view TTA"), (GPU, "image-only, 8-view TTA")),
    ("metadata", "ensemble of the two, all blank - image only, GPU", (GPU, "ensemble mm + image-only, all blank"),
     (GPU, "image-only")),
    ("tta", "8 TTA views - 1 view, image + metadata, GPU", (GPU, "multimodal, fields present, 8-view TTA"),
     (GPU, "multimodal, fields present")),
    ("tta", "8 TTA views - 1 view, image only, GPU", (GPU, "image-only, 8-view TTA"), (GPU, "image-only")),
    ("tta", "8 TTA views - 1 view, Lite0, 2 CPU cores", (L0, "present_tta8"), (L0, "present")),
    ("tta", "8 TTA views - 1 view, Lite0 rerun, 2 CPU cores", (L0B, "present_tta8"), (L0B, "present")),
    ("tta", "8 TTA views - 1 view, Lite2, 2 CPU cores", (L2, "present_tta8"), (L2, "present")),
    ("ensemble", "Lite0 + Lite2 - Lite0 (rerun), 8 views", (L0B, "present_tta8", 0), (L0B, "present_tta8")),
    ("ensemble", "Lite0 + Lite2 - Lite2, 8 views", (L0B, "present_tta8", 0), (L2, "present_tta8")),
    ("ensemble", "Lite0 + Lite2 - Lite0 (rerun), 1 view", (L0B, "present", 0), (L0B, "present")),
    ("ensemble", "Lite0 + Lite2 - Lite2, 1 view", (L0B, "present", 0), (L2, "present")),
    ("ensemble", "two Lite0 (2-core run + GPU run) - the 2-core run, 8 views", (L0, "present_tta8", 0),
     (L0, "present_tta8")),
    ("ensemble", "three members (+ Lite0 @ 288) - Lite0 + Lite2, 8 views", (L288, "present_tta8", 0),
     (L0B, "present_tta8", 0)),
    ("backbone", "Lite2 @ 260 - Lite0 @ 224, 1 view", (L2, "present"), (L0, "present")),
    ("backbone", "Lite2 @ 260 - Lite0 @ 224, 8 views", (L2, "present_tta8"), (L0, "present_tta8")),
    ("backbone", "Lite0 @ 288 - Lite0 @ 224 (rerun), 1 view", (L288, "present"), (L0B, "present")),
    ("backbone", "Lite0 @ 288 - Lite0 @ 224 (rerun), 8 views", (L288, "present_tta8"), (L0B, "present_tta8")),
    ("noise", "Lite0 rerun - Lite0 first run (the same command), 1 view", (L0B, "present"), (L0, "present")),
    ("noise", "Lite0 rerun - Lite0 first run (the same command), 8 views", (L0B, "present_tta8"), (L0, "present_tta8")),
    ("ensemble", "Lite0 + Lite2 - Lite0 first run (the README's rows), 8 views", (L0B, "present_tta8", 0),
     (L0, "present_tta8")),
]
# The README's rows that differ in more than one step, compared on the headline metric of each
ACROSS = [
    ("readme", "8 views + rule - 1 view arg-max, Lite0, 2 CPU cores", (L0, "present_tta8"), "balanced_accuracy_rule",
     (L0, "present"), "balanced_accuracy"),
    ("readme", "Lite0 + Lite2, 8 views + rule - Lite0, 1 view arg-max", (L0B, "present_tta8", 0),
     "balanced_accuracy_rule", (L0, "present"), "balanced_accuracy"),
]


def paired(b: list[float], a: list[float]) -> dict:
    """Mean of the per-fold differences b - a, its plain and corrected 95% t-intervals, and the verdict."""
    diff = [x - y for x, y in zip(b, a, strict=True)]
    n = len(diff)
    mean = sum(diff) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1))
    t = T_975[n - 1]
    half, half_c = t * sd / math.sqrt(n), t * sd * math.sqrt(1 / n + 1 / (n - 1))  # n_test / n_train = 1 / (k - 1)
    plain, corrected = [mean - half, mean + half], [mean - half_c, mean + half_c]
    excludes = lambda ci: ci[0] > 0 or ci[1] < 0  # noqa: E731
    verdict = ("distinguishable" if excludes(corrected) else
               "plain interval only" if excludes(plain) else "not distinguishable")
    return {"folds": [round(d, 4) for d in diff], "n_folds": n, "mean": mean, "sd": sd, "folds_not_worse":
            sum(d >= 0 for d in diff), "t": plain, "t_corrected": corrected, "verdict": verdict}


def fold_comparisons() -> list[dict]:
    out = []
    for topic, name, b_spec, a_spec in COMPARISONS:
        (b_from, b), (a_from, a) = row(*b_spec), row(*a_spec)
        out.append({"topic": topic, "comparison": name, "b": b_from, "a": a_from,
                    "metrics": {m: paired(b[m]["folds"], a[m]["folds"]) for m in METRICS if m in a and m in b}})
    for topic, name, b_spec, b_metric, a_spec, a_metric in ACROSS:
        (b_from, b), (a_from, a) = row(*b_spec), row(*a_spec)
        out.append({"topic": topic, "comparison": name, "b": f"{b_from}[{b_metric!r}]", "a": f"{a_from}[{a_metric!r}]",
                    "metrics": {"balanced_accuracy": paired(b[b_metric]["folds"], a[a_metric]["folds"])}})
    return out


def bootstrap_results() -> dict:
    """The lesion-resampled bootstrap results already stored (one test fold each), restated."""
    keys = ("balanced_accuracy", "macro_auc", "melanoma_auc")
    cmp = json.loads((RESULTS_DIR / "compare_photo_augment.json").read_text())
    lesion = json.loads((RESULTS_DIR / "per_lesion.json").read_text())
    pick = lambda m: {"a": m["a"], "b": m["b"], "difference": m["difference"], "ci": m["ci"]}  # noqa: E731
    return {
        "photo_augment_minus_plain": {
            "from": "compare_photo_augment.json (skain compare: fold-0 test predictions of the two runs)",
            "images": cmp["images"], "lesions": cmp["lesions"], "resamples": cmp["resamples"], "unit": cmp["unit"],
            "metrics": {k: pick(cmp["metrics"][k]) for k in keys}},
        "lesion_minus_image_level": {
            "from": "per_lesion.json (fold-0 test folds, lesions with several images)", "resamples": lesion["resamples"],
            "runs": {run: {k: pick(r["multi_image"][k]) for k in keys} for run, r in lesion["runs"].items()}},
    }


def point_only() -> dict:
    """Comparisons whose results files hold point figures only: no interval can be computed from them."""
    tta = json.loads((RESULTS_DIR / "reencode_tta_sample.json").read_text())["views"]
    held = json.loads((RESULTS_DIR / "reencode_heldout.json").read_text())
    return {
        "reencode_tta_sample.json": {
            "why": "500 test images, 1 vs 8 views: the file keeps figures, not each image's prediction",
            "balanced_accuracy_original": {v: tta[v]["rows"]["original JPEG"]["balanced_accuracy_decided"]
                                           for v in ("1", "8")}},
        "reencode_heldout.json": {
            "why": "re-encoded copies of the fold-0 test images, plain vs re-save augmentation: figures only",
            "balanced_accuracy_phone": {k: held[k]["rows"]["phone"]["balanced_accuracy_decided"]
                                        for k in ("plain", "photo") if k in held}},
    }


def markdown(comparisons: list[dict], metrics: tuple[str, ...] = ("balanced_accuracy", "balanced_accuracy_rule",
                                                                    "macro_auc")) -> str:
    """The table the docs show: B - A, mean [plain 95% t-interval] {corrected}, per metric."""
    head = "| B - A, 5 test folds | " + " | ".join(METRICS[m] for m in metrics) + " |"
    lines = [head, "|---|" + "---|" * len(metrics)]
    for c in comparisons:
        cells = []
        for m in metrics:
            r = c["metrics"].get(m)
            if r is None:
                cells.append("")
                continue
            mark = {"distinguishable": "**", "plain interval only": "", "not distinguishable": ""}[r["verdict"]]
            star = " *" if r["verdict"] == "plain interval only" else ""
            cells.append(f"{mark}{r['mean']:+.3f}{mark} [{r['t'][0]:+.3f}, {r['t'][1]:+.3f}]{star}")
        lines.append(f"| {c['comparison']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS_DIR / "fold_intervals.json"))
    ap.add_argument("--markdown", action="store_true", help="also print the docs' table")
    args = ap.parse_args(argv)
    comparisons = fold_comparisons()
    write_json(Path(args.out), {"what": what(__doc__), "level": 0.95, "method": {
        "t": "paired t-interval across the 5 test folds, df 4",
        "t_corrected": "Nadeau & Bengio (2003) corrected: variance x (1/n + n_test/n_train), n_test/n_train = 1/4",
        "verdict": "distinguishable: the corrected interval excludes 0; plain interval only: only the plain one does"},
        "comparisons": comparisons, "bootstrap": bootstrap_results(), "no_interval": point_only()})
    if args.markdown:
        print(markdown(comparisons))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
