"""The metadata table of issue 11 and the cross-validated accuracy of issue 12 from one paired k-fold run:
a multimodal and an image-only model trained on the same lesion-grouped folds (benchmarks/gpu/cv_pair.sh).

    python benchmarks/cv_pair_report.py --mm /tmp/gpu/mm --img /tmp/gpu/img \
        --out benchmarks/results/gpu_cv_pair.json --cpu-images-per-s 76

Every figure is on test folds that chose nothing (epoch chosen on an inner validation split). "rule" is the
balanced-accuracy decision rule (prior adjustment, `skain decide`) scored by nested cross-validation: its tau
is chosen on the other folds' predictions. Paired differences are per fold (same test images), mean +- std.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, recall_score

from skain.crossval import ensemble_oof, summarize_oof
from skain.data.schema import CLASSES
from skain.decision import adjusted_pred, log_prior_from_counts

MEL = CLASSES.index("mel")


def per_fold(oof: pd.DataFrame, nested: list[dict], log_prior: np.ndarray) -> pd.DataFrame:
    """Balanced accuracy and melanoma recall per fold, arg-max and under the nested rule."""
    taus = {r["fold"]: r["tau"] for r in nested}
    rows = []
    for k, part in oof.groupby("fold", sort=True):
        y = part["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
        p = part[[f"p_{c}" for c in CLASSES]].to_numpy()
        for rule, pred in (("argmax", p.argmax(1)), ("rule", adjusted_pred(p, log_prior, taus[k]))):
            rows.append({"fold": int(k), "rule": rule, "balanced_accuracy": balanced_accuracy_score(y, pred),
                         "melanoma_recall": recall_score(y == MEL, pred == MEL)})
    return pd.DataFrame(rows)


def row(runs: list[Path], variant: str) -> tuple[dict, pd.DataFrame]:
    oof = ensemble_oof(runs, variant)
    s = summarize_oof(oof)
    d = s["decision_rule"]
    folds = per_fold(oof, d["nested"], np.asarray(d["log_prior"]))
    by = {r: folds[folds["rule"] == r] for r in ("argmax", "rule")}
    summary = {
        "balanced_accuracy": s["per_fold_mean_std"]["balanced_accuracy"],
        "balanced_accuracy_rule": d["balanced_accuracy_adjusted"],
        "macro_auc": s["per_fold_mean_std"]["macro_auc"],
        "melanoma_recall": s["per_fold_mean_std"]["melanoma_recall"],
        "melanoma_recall_rule": float(by["rule"]["melanoma_recall"].mean()),
        "akiec_recall": s["per_fold_mean_std"]["akiec_recall"],
        "per_class_recall_mean": s["per_class_recall_mean"],
        "tau_per_fold": [r["tau"] for r in d["nested"]],
    }
    return summary, folds


def paired(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """a - b per fold and rule (same test images)."""
    out = {}
    for rule in ("argmax", "rule"):
        x = a[a["rule"] == rule].set_index("fold")
        y = b[b["rule"] == rule].set_index("fold")
        for metric in ("balanced_accuracy", "melanoma_recall"):
            diff = (x[metric] - y[metric]).to_numpy()
            out[f"{metric}_{rule}"] = {"mean": float(diff.mean()), "std": float(diff.std(ddof=1)),
                                       "folds": [round(float(v), 4) for v in diff], "folds_not_worse":
                                       int((diff >= 0).sum())}
    return out


def training(run: Path) -> dict:
    metrics = [json.loads((p / "metrics.json").read_text()) for p in sorted(run.glob("fold*"))]
    hist = [pd.read_csv(p / "train_history.csv") for p in sorted(run.glob("fold*"))]
    images = [len(h) * m["data"]["train_images"] for h, m in zip(hist, metrics)]
    return {"epochs": [m["epochs_trained"] for m in metrics], "best_epoch": [m["best_epoch"] for m in metrics],
            "train_minutes": [round(m["train_minutes"], 2) for m in metrics],
            "train_images_per_s_median": [round(float(h["train_images_per_s"].median()), 1) for h in hist],
            "train_images_seen": images}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mm", required=True, help="k-fold output of the multimodal model")
    ap.add_argument("--img", required=True, help="k-fold output of the image-only model, same split")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-images-per-s", type=float, default=76.0,
                    help="the cpu recipe's measured training speed on 2 cores, for the CPU-minutes estimate")
    ns = ap.parse_args()
    mm, img = Path(ns.mm), Path(ns.img)
    table, folds = {}, {}
    plan = [("image-only", [img], ""), ("multimodal, fields present", [mm], "present"),
            ("multimodal, age blank", [mm], "age_blank"), ("multimodal, sex blank", [mm], "sex_blank"),
            ("multimodal, site blank", [mm], "site_blank"), ("multimodal, all blank", [mm], "all_blank"),
            ("ensemble mm + image-only, fields present", [mm, img], "present"),
            ("ensemble mm + image-only, all blank", [mm, img], "all_blank")]
    for views in ("", "_tta8"):
        for name, runs, variant in plan:
            key = name + (", 8-view TTA" if views else "")
            if views and variant in ("age_blank", "sex_blank", "site_blank"):
                continue
            table[key], folds[key] = row(runs, (variant or "present") + views)
    for key in table:
        base = "image-only" + (", 8-view TTA" if "TTA" in key else "")
        if key != base:
            table[key]["vs_image_only_paired"] = paired(folds[key], folds[base])
    train = {"multimodal": training(mm), "image-only": training(img)}
    seen = sum(train["multimodal"]["train_images_seen"])
    result = {"what": __doc__.split("\n\n")[0], "rows": table, "training": train,
              "cpu_minutes_estimate_per_model": {
                  "images_per_s_on_2_cores": ns.cpu_images_per_s,
                  "multimodal_5_folds": round(seen / ns.cpu_images_per_s / 60, 1),
                  "note": "training images the GPU run processed / the cpu recipe's measured 2-core speed "
                          "(validation and scoring not counted); an estimate, not a run on 2 cores"}}
    Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| | balanced accuracy (argmax) | with the decision rule | macro AUC | melanoma recall (argmax / rule) |")
    print("|---|---|---|---|---|")
    for key, r in table.items():
        print(f"| {key} | {r['balanced_accuracy']['mean']:.3f} ± {r['balanced_accuracy']['std']:.3f} | "
              f"{r['balanced_accuracy_rule']['mean']:.3f} ± {r['balanced_accuracy_rule']['std']:.3f} | "
              f"{r['macro_auc']['mean']:.3f} | {r['melanoma_recall']['mean']:.3f} / {r['melanoma_recall_rule']:.3f} |")
    print()
    for key, r in table.items():
        if "vs_image_only_paired" in r:
            p = r["vs_image_only_paired"]
            print(f"{key} - image-only, per fold: BA {p['balanced_accuracy_argmax']['mean']:+.4f} ± "
                  f"{p['balanced_accuracy_argmax']['std']:.4f} ({p['balanced_accuracy_argmax']['folds_not_worse']}/5 "
                  f"not worse), rule {p['balanced_accuracy_rule']['mean']:+.4f} ± {p['balanced_accuracy_rule']['std']:.4f}; "
                  f"mel recall {p['melanoma_recall_argmax']['mean']:+.4f} ({p['melanoma_recall_argmax']['folds_not_worse']}/5),"
                  f" rule {p['melanoma_recall_rule']['mean']:+.4f} ({p['melanoma_recall_rule']['folds_not_worse']}/5)")
    print(json.dumps(result["cpu_minutes_estimate_per_model"]), json.dumps(train))


if __name__ == "__main__":
    main()
