"""`skain export --format hf`: a model as a Hugging Face-style folder.

    DIR/model.safetensors   the whole bundle, pickle-free (`skain.modelfile.portable`; parity-checked like
                            `skain export --format safetensors` when given images)
    DIR/config.json         model args, preprocessing, classes, metadata vocabularies, decision rule, skAIn
                            version and model id (what `skain.load` / `GET /api/health` report for this file)
    DIR/README.md           the model card: YAML front matter (licence, library, datasets, tags, the held-out
                            figures the bundle has and how they were held out) + the model card's text

Every `--model` flag and `skain.load` read such a folder, locally or as `hf://org/name[@revision]` once it is
pushed to the Hub (`skain.modelfile.hub`). The writer is here, not in modelfile, because the card's text comes from
`skain.trust.modelcard` and the parity check runs the model.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skain import __version__
from skain.evaluation.parity import PARITY_IMAGES, Parity, export_checked
from skain.fileio import atomic_json, atomic_write
from skain.modelfile.hub import CARD, CONFIG, LIBRARY, SCHEME, WEIGHTS
from skain.modelfile.load import model_id, read_file, resolve_path
from skain.modelfile.portable import SUFFIX
from skain.trust.modelcard import DISCLAIMER, ci_range, interval_note, interval_summary, to_markdown

log = logging.getLogger(__name__)

CODE_LICENCE = "apache-2.0"
DATA_LICENCE = "cc-by-nc-4.0"  # HAM10000 and the ISIC Archive's dermoscopic images: weights trained on them too
TAGS = ["skain", "image-classification", "dermoscopy", "skin-lesion", "medical-imaging", "multimodal", "HAM10000"]
OURS = (WEIGHTS, CONFIG, CARD)


def export_hf(model: str | Path, output: str | Path, dtype: str = "float16", images: str | Path | None = None,
              csv: str | Path | None = None, n: int = PARITY_IMAGES) -> tuple[Path, Parity | None]:
    """Model (anything `--model` takes, already resolved or not) -> `output`/ with the three files; returns the
    folder and the parity result (None without images). A folder holding other files is refused."""
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file; give a folder for --format hf")
    others = sorted(p.name for p in folder.iterdir() if p.name not in OURS) if folder.is_dir() else []
    if others:
        raise ValueError(f"--output {folder} already holds other files ({', '.join(others[:3])}); "
                         "give an empty or new folder")
    source = resolve_path(model)
    weights, bundle = folder / WEIGHTS, read_file(source)
    if weights.resolve() == source.resolve():
        raise ValueError(f"--output {folder} holds the model being exported; choose another folder")
    parity = None
    if source.suffix == SUFFIX and (bundle.get("portable") or {}).get("dtype") == dtype and images is None and csv is None:
        # already a portable file in this dtype: copied byte for byte, so the model keeps its id
        atomic_write(weights, lambda fh: fh.write(source.read_bytes()))
    else:
        weights, parity = export_checked(source, weights, dtype, images, csv, n)
        bundle = read_file(weights)
    mid = model_id(weights)
    atomic_json(hf_config(bundle, mid), folder / CONFIG)
    card = model_card(bundle, mid)
    atomic_write(folder / CARD, lambda fh: fh.write(card.encode("utf-8")))
    log.info("wrote %s (%s, %s, %s), model id %s", folder, WEIGHTS, CONFIG, CARD, mid)
    return folder, parity


def hf_config(bundle: dict, mid: str) -> dict:
    """config.json: what a reader (or a tool listing Hub models) needs without opening the weights."""
    classes = list(bundle["classes"])
    enc = bundle["encoder"]
    return {
        "library_name": LIBRARY, "model_type": "skain", "model_id": mid, "weights": WEIGHTS,
        "skain_version": bundle.get("skain_version"), "exported_with": f"skain {__version__}",
        "format": bundle.get("format"), "format_version": bundle.get("format_version"),
        "dtype": (bundle.get("portable") or {}).get("dtype"),
        "model_args": _plain(bundle["model_args"]), "preprocess": _plain(bundle["preprocess"]),
        "classes": classes, "id2label": {str(i): c for i, c in enumerate(classes)},
        "label2id": {c: i for i, c in enumerate(classes)},
        "inputs": {"image": "RGB dermoscopic image", "age": "years (optional)",
                   "sex": list(enc.get("sex_vocab", [])), "localization": list(enc.get("site_vocab", []))},
        "decision": _decision(bundle.get("decision")), "inference": _plain(bundle.get("inference") or {}),
        "licence": licence(bundle),
    }


def _decision(state: dict | None) -> dict:
    if not state or not float(state.get("tau", 0.0)):
        return {"rule": "argmax"}
    out = {k: _plain(state.get(k)) for k in ("rule", "tau", "fit_on", "nested_balanced_accuracy")}
    if state.get("cross_fitted_balanced_accuracy"):  # a tau chosen on the model's own validation split
        out["cross_fitted_balanced_accuracy"] = _plain(state["cross_fitted_balanced_accuracy"])
    return out


def licence(bundle: dict) -> str:
    """The weights' licence: CC BY-NC 4.0 when trained on real dermoscopic data (HAM10000 / ISIC Archive terms);
    a model trained only on skAIn's synthetic drawings carries the code's Apache-2.0."""
    return CODE_LICENCE if (bundle.get("training") or {}).get("synthetic") else DATA_LICENCE


def datasets(bundle: dict) -> list[str]:
    training = bundle.get("training") or {}
    if training.get("synthetic"):
        return ["synthetic (skain synth)"]
    return ["ISIC Archive"] if training.get("layout") == "isic" else ["HAM10000"]


# ------------------------------------------------------------------------------------------- the card
def held_out_figures(bundle: dict) -> list[dict]:
    """The figures the bundle holds that were measured on images that trained nothing, each named with how it
    was held out (copied from the bundle, never typed), with its 95% interval (`ci`, 'lo-hi', and how it was
    made, `ci_note`) where the bundle has one."""
    m = bundle.get("metrics") or {}
    trust = bundle.get("trust") or {}
    card = bundle.get("model_card") or {}
    rule = bundle.get("decision") or {}
    classes = list(bundle.get("classes") or [])
    how_cv = card.get("held_out_method") or "cross-fitted halves of the validation split"
    val = f"validation split, {m.get('n')} images of lesions held out of training (it chose the epoch)"
    scored = interval_summary(m.get("intervals"), classes)
    beside = scored if scored and scored.get("split") == "validation" else None  # a test fold's are not these
    figures = trust.get("figures") or {}
    held_iv = interval_summary(figures.get("intervals"), classes)
    out: list[dict] = []

    def add(kind: str, name: str, value: Any, where: str, iv: dict | None = None, key: str = "") -> None:
        if isinstance(value, (int, float)) and value == value:  # not NaN
            span = ci_range(iv, key, shown=float(value))
            out.append({"type": kind, "name": name, "value": round(float(value), 4), "held_out": where,
                        **({"ci": span, "ci_note": interval_note(iv)} if span else {})})
    nested, halves = rule.get("nested_balanced_accuracy") or {}, rule.get("cross_fitted_balanced_accuracy") or {}
    if float(rule.get("tau", 0.0)):
        add("balanced_accuracy", "balanced accuracy, decision rule (prior-adjusted)",
            (nested.get("adjusted") or {}).get("mean"),
            "nested k-fold cross-validation: each fold scored with the rule chosen on the other folds")
        add("balanced_accuracy", "balanced accuracy, arg-max", (nested.get("argmax") or {}).get("mean"),
            "the same k-fold cross-validation")
        add("balanced_accuracy", "balanced accuracy, decision rule (prior-adjusted)",
            (halves.get("adjusted") or {}).get("mean"), f"cross-fitted on the validation split: {halves.get('how')}")
        _rule_figures(add, rule.get("validation") or {}, classes)
    add("balanced_accuracy", "balanced accuracy, arg-max", m.get("balanced_accuracy"), val, beside, "balanced_accuracy")
    add("accuracy", "accuracy, arg-max", m.get("accuracy"), val)
    add("roc_auc", "macro AUC (one-vs-rest)", m.get("macro_auc"), val, beside, "macro_auc")
    cal = (figures.get("calibration") or card.get("calibration") or {}).get("held_out") or {}
    add("ece", "expected calibration error after temperature scaling", cal.get("ece_after"), how_cv, held_iv, "ece")
    tri = (figures.get("triage") or card.get("triage") or {}).get("held_out") or {}
    add("recall", "malignant triage sensitivity", tri.get("sensitivity"), how_cv, held_iv, "triage_sensitivity")
    add("specificity", "malignant triage specificity", tri.get("specificity"), how_cv, held_iv, "triage_specificity")
    ood = figures.get("ood") or card.get("ood") or {}
    add("false_rejection_rate", "dermoscopic lesions turned away as not dermoscopic",
        ood.get("held_out_false_rejection"), how_cv, held_iv, "ood_false_rejection")
    return out


def _rule_figures(add: Callable[..., None], stored: dict, classes: list[str]) -> None:
    """The figures of the decision the model makes (its rule over the views it answers with), stored by
    `skain decide` / `skain calibrate --tta N --default`, with the intervals of the rule's decisions."""
    if not stored:
        return
    views = int(stored.get("views") or 1)
    name = "balanced accuracy, decision rule (prior-adjusted)" + (f", {views} TTA views" if views > 1 else "")
    where = f"{stored.get('measured_on')}; {stored.get('n')} images"
    add("balanced_accuracy", name, stored.get("balanced_accuracy"), where,
        interval_summary(stored.get("intervals"), classes), "balanced_accuracy")


def model_card(bundle: dict, mid: str) -> str:
    """README.md: YAML front matter, then how to load it, then the model card's own text."""
    figures = held_out_figures(bundle)
    name = f"skain-{bundle['model_args']['backbone']}-{mid}"
    front = {
        "license": licence(bundle), "library_name": LIBRARY, "pipeline_tag": "image-classification",
        "datasets": datasets(bundle), "tags": TAGS,
        "metrics": list(dict.fromkeys(f["type"] for f in figures)),
        "model-index": [{"name": name, "results": [
            {"task": {"type": "image-classification", "name": "skin-lesion classification (7 HAM10000 diagnoses)"},
             "dataset": {"name": datasets(bundle)[0], "type": datasets(bundle)[0].lower().replace(" ", "-"),
                         "split": f["held_out"]},
             "metrics": [{"type": f["type"], "value": f["value"], "name": f["name"]}]} for f in figures]}],
    }
    lines = ["---", *_yaml(front), "---", "", f"# {name}", "", f"> {DISCLAIMER}", "",
             f"A skAIn model (model id `{mid}`): a dermoscopic image plus optional age, sex and body site -> one of "
             f"{len(bundle['classes'])} diagnoses ({', '.join(bundle['classes'])}), with calibrated probabilities, "
             "malignancy triage and a not-dermoscopic check where the model has them.", "",
             "## Use", "", "```python", "import skain", "", f'model = skain.load("{SCHEME}ORG/NAME")   # or this folder',
             'result = model.predict("lesion.jpg", age=55, sex="male", site="back")', "```", "",
             f"or `skain predict --model {SCHEME}ORG/NAME --data photos/`. Weights licence: "
             f"{licence(bundle).upper()}" + (" (they derive from HAM10000 / ISIC Archive images; research and education "
                                             "only, not for commercial use)." if licence(bundle) == DATA_LICENCE else "."),
             "", "## Held-out figures", "", "| figure | value | 95% interval | how it was held out |", "|---|---|---|---|"]
    lines += [f"| {f['name']} | {f['value']:.4f} | {f.get('ci') or 'n/a'} | {f['held_out']} |" for f in figures] or [
        "| (none recorded) | | | |"]
    notes = list(dict.fromkeys(f["ci_note"] for f in figures if f.get("ci_note")))
    lines += ["", *notes] if notes else []
    lines.append("")
    card = bundle.get("model_card")
    if card:
        body = to_markdown(_public_card(card))
        lines += [body.split("\n", 1)[1].replace(f"> {DISCLAIMER}\n", "", 1).lstrip("\n")]  # title and disclaimer once
    return "\n".join(lines).rstrip() + "\n"


def _public_card(card: dict) -> dict:
    """The card without paths of the machine that built the model: the data source and pre-training files by name."""
    data = dict(card.get("data") or {})
    data["source"] = Path(str(data["source"])).name if data.get("source") else None
    model = dict(card.get("model") or {})
    pre = model.get("pretrained")
    if isinstance(pre, str) and ("/" in pre or "\\" in pre):
        head, _, path = pre.rpartition(" ")
        model["pretrained"] = " ".join(x for x in (head, Path(path).name) if x)
    return {**card, "data": data, "model": model}


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _yaml(obj: Any, indent: int = 0) -> list[str]:
    """A small YAML writer for the front matter (dicts, lists, scalars; strings as JSON, which YAML reads)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                lines += [f"{pad}{k}:", *_yaml(v, indent + 2)]
            else:
                lines.append(f"{pad}{k}: {_scalar(v)}")
    else:
        for item in obj:
            sub = _yaml(item, indent + 2) if isinstance(item, (dict, list)) and item else [f"{pad}  {_scalar(item)}"]
            lines += [f"{pad}- {sub[0].lstrip()}", *sub[1:]]
    return lines


def _scalar(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (dict, list)):
        return "{}" if isinstance(v, dict) else "[]"
    text = str(v)
    plain = re.fullmatch(r"[A-Za-z][\w.-]*", text) and text.lower() not in ("true", "false", "yes", "no", "on",
                                                                         "off", "null", "y", "n")
    return text if plain else json.dumps(text)
