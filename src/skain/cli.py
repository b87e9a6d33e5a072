"""Command-line parsing only: `skain train | synth | demo | check-gpu | ...`. No ML logic here.

Longer than the ~400 lines we aim for because it holds the flags and help texts of every command; each run_*
function only parses, calls one library function and prints. Each command imports what it needs when it runs,
so `skain --help` and light commands (download, cache) start without loading torch-heavy modules.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from skain.data.images import ImageError, cache_dir_from_flag
from skain.data.schema import DataError
from skain.data.split import LeakageError
from skain.modelfile.bundle import BundleError
from skain.training.weights import WeightsError

USER_ERRORS = (DataError, ImageError, BundleError, WeightsError, LeakageError, ValueError, FileNotFoundError)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def add_data_args(p: argparse.ArgumentParser, default_hint: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", help=f"folder with image/ + text/ (seed layout) or an official HAM10000 download "
                                  f"(default: {default_hint})")
    g.add_argument("--csv", help="metadata CSV (lesion_id,image_id,dx,age,sex,localization)")
    g.add_argument("--images", nargs="+", metavar="DIR",
                   help="image folder(s): JPEG, PNG, WebP, BMP, TIFF, GIF; HEIC/HEIF with the heic extra")
    g.add_argument("--skip-missing", action="store_true", default=None,
                   help="go on (with a warning) when images named in the CSV are missing")
    g.add_argument("--cache-dir", help="pre-resized image cache (default ~/.cache/skain/images; 'off' disables)")
    g.add_argument("--workers", type=int, dest="num_workers", help="DataLoader workers (default: by device)")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def _pick(ns: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {n: getattr(ns, n) for n in names if getattr(ns, n, None) is not None}


# --------------------------------------------------------------------------------------------- train
def add_train_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p, "./dataset_train")
    p.add_argument("--preset", choices=["cpu", "gpu"], default=None,
                   help="gpu: seed's EfficientNetV2-S@384 (default on CUDA); cpu: EfficientNet-Lite0@224 offline "
                        "weights, minutes on 2 cores (default without CUDA)")
    p.add_argument("--config", help="JSON/YAML file with data/model/train sections (flags override it)")
    p.add_argument("--output", help="output folder (default outputs)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from <output>/last.pt; refused unless settings, data and split are the same run's")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace a run in --output (its files are removed once the new run's data and model load)")
    p.add_argument("--folds", type=int, help="lesion-grouped folds (default 5)")
    p.add_argument("--fold", type=int, help="which fold is held out (default 0)")
    p.add_argument("--holdout", action="store_true", default=None,
                   help="the fold is a test set that chooses nothing; validation comes from the other folds")
    p.add_argument("--inner-folds", type=int, help="with --holdout: validation = 1/N of the rest (default 8)")
    p.add_argument("--all-folds", action="store_true", default=None,
                   help="train every fold with --holdout into <output>/fold<k>/, then write out-of-fold "
                        "predictions and a cross-validated report (cv_report.json)")
    p.add_argument("--with-image-only", action="store_true", default=None,
                   help="with --all-folds: also train the image-only model on the same folds (<output>/image_only/) "
                        "and add the paired with/without-metadata table to cv_report.json (twice the training)")
    p.add_argument("--split-seed", type=int, help="seed of the lesion-grouped split (default 42; --seed does not "
                                                  "move the split)")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", help="any timm model name (e.g. tf_efficientnetv2_s, tf_efficientnet_lite0)")
    m.add_argument("--pretrained", choices=["hub", "offline", "none"], help="where ImageNet weights come from")
    m.add_argument("--pretrained-file", help="a local state-dict file for the backbone (offline machines)")
    m.add_argument("--image-only", action="store_true", default=None, help="ablation: ignore age/sex/site")
    m.add_argument("--input-size", type=int)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, help="max fine-tuning epochs (phase 2)")
    t.add_argument("--frozen-epochs", type=int, help="epochs with the backbone frozen (phase 1)")
    t.add_argument("--lr", type=float, help="phase-2 learning rate")
    t.add_argument("--lr-frozen", type=float, help="phase-1 learning rate")
    t.add_argument("--unfreeze-fraction", type=float, help="last fraction of the backbone trained in phase 2")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--patience", type=int, help="early-stopping patience on validation balanced accuracy")
    t.add_argument("--balance", choices=["none", "sqrt", "inverse", "sampler"], help="class-imbalance handling")
    t.add_argument("--meta-dropout", type=float,
                   help="training: blank all metadata fields (else each field) at this rate, so empty fields are "
                        "a learnt value (presets: 0.2; 0 disables)")
    t.add_argument("--photo-augment", type=float,
                   help="training: share of images first re-saved as a phone would (downscale, JPEG/WebP, "
                        "blur/sharpen, border; default 0.5; 0 disables)")
    t.add_argument("--consistency", type=float,
                   help="training: pair every image with a re-saved copy (same crop and colours; always re-encoded) "
                        "and add this weight times the Jensen-Shannon divergence of their predictions to the loss, "
                        "so answers stay when a phone re-saves the photo (about 1.8x the training time; "
                        "default 0 = off)")
    t.add_argument("--max-minutes", type=float, help="stop after this much training time")
    t.add_argument("--seed", type=int)
    t.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto: bf16 on CUDA (fp16 on GPUs without bf16) and on CPUs with AMX, "
                        "else fp32 (off)")
    t.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training step (opt-in: 60 s to compile and no gain on 2 CPU cores "
                   "here; untested on GPU)")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    t.add_argument("--test-tta", type=int, help="with --holdout: also score the test fold averaged over this many "
                                                "TTA views, 1-8 (default 8; 1 = off)")
    t.add_argument("--no-trust", dest="fit_trust", action="store_false", default=None,
                   help="skip fitting calibration / OOD check / triage after training (fit later: skain calibrate)")


def config_from_args(ns: argparse.Namespace):
    from skain.engine import resolve_device
    from skain.training.config import build_config
    preset = ns.preset or ("gpu" if resolve_device().type == "cuda" else "cpu")
    model = _pick(ns, ["backbone", "pretrained", "image_only", "input_size"])
    if ns.pretrained_file:
        model["pretrained"] = ns.pretrained_file
    flags = {
        "data": _pick(ns, ["data", "csv", "images", "skip_missing", "cache_dir", "num_workers", "folds", "fold",
                           "holdout", "inner_folds", "all_folds", "with_image_only", "split_seed"]),
        "model": model,
        "train": _pick(ns, ["epochs", "frozen_epochs", "lr", "lr_frozen", "unfreeze_fraction", "batch_size",
                            "patience", "balance", "meta_dropout", "photo_augment", "consistency", "max_minutes", "seed", "amp",
                            "compile", "progress", "fit_trust", "test_tta", "output", "resume", "overwrite"]),
    }
    return build_config(preset, ns.config, flags)


def run_train(ns: argparse.Namespace) -> int:
    from skain.training.crossval import fit_all_folds
    from skain.training.train import fit
    cfg = config_from_args(ns)
    if cfg.data.with_image_only and not cfg.data.all_folds:
        raise ValueError("--with-image-only needs --all-folds (it compares the two models fold by fold)")
    logging.getLogger(__name__).info("preset %s, output %s", cfg.preset, cfg.train.output)
    fit_all_folds(cfg) if cfg.data.all_folds else fit(cfg)
    return 0


# --------------------------------------------------------------------------------------------- synth / demo
def add_synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="dataset_train", help="folder to write (seed layout)")
    p.add_argument("-n", "--images", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)


def run_synth(ns: argparse.Namespace) -> int:
    from skain.data.synthetic import SYNTHETIC_NOTE, make_synthetic
    root = make_synthetic(ns.output, ns.images, ns.seed)
    print(f"wrote {ns.images} images to {root}/image and {root}/text/metadata.csv\n{SYNTHETIC_NOTE}")
    return 0


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--synthetic", action="store_true",
                   help="instead: draw SYNTHETIC images, train a small model on them for a few minutes and serve "
                        "that (everything inside --output)")
    p.add_argument("--output", default="outputs/demo-synthetic",
                   help="--synthetic: the demo's own folder; one holding anything else is refused "
                        "(default outputs/demo-synthetic)")
    p.add_argument("--epochs", type=int, default=3, help="--synthetic: training epochs")
    p.add_argument("--no-serve", action="store_true", help="do not start the web app (say which model it would serve)")
    p.add_argument("--port", type=int, default=5000)


def run_demo(ns: argparse.Namespace) -> int:
    """The shipped HAM10000 model in the web app at once; or SYNTHETIC data -> short training -> web app."""
    from skain.demo import shipped_demo_model, synthetic_demo
    if ns.synthetic:
        from skain.data.synthetic import SYNTHETIC_NOTE
        print(SYNTHETIC_NOTE)
        model = synthetic_demo(ns.output, ns.epochs)
    else:
        model = shipped_demo_model()
    if ns.no_serve:
        print(f"demo model: {model}")
        return 0
    return run_serve(argparse.Namespace(model=str(model), host="127.0.0.1", port=ns.port, **_serve_defaults()))


def _serve_defaults() -> dict:
    return {"max_mb": None, "cors": None, "threads": None, "precision": "fast", "tta": None}


def run_check_gpu(ns: argparse.Namespace) -> int:
    from skain.gpu import report
    print("\n".join(report()))
    return 0


COMMANDS.update({
    "train": (add_train_args, run_train, "train the multimodal classifier"),
    "synth": (add_synth_args, run_synth, "write a SYNTHETIC demo dataset in the seed layout"),
    "demo": (add_demo_args, run_demo, "serve the HAM10000 model shipped with skAIn (--synthetic: train a "
                                      "demo model on synthetic images first)"),
    "check-gpu": (lambda p: None, run_check_gpu, "show device, CUDA, mixed precision and a timed matmul"),
})


# --------------------------------------------------------------------------------------------- predict / evaluate / export
PARTIAL_FAILURE = 3  # exit code: predictions written, but some images could not be read


MODEL_HELP = ("output folder, .pt bundle, .safetensors file, Hugging Face-style folder (skain export --format hf) or "
              "hf://ORG/NAME[@REVISION] (default: outputs/ if a model was trained there, else the HAM10000 model "
              "shipped with skAIn)")
TTA_HELP = ("test-time augmentation views, 1-8 (flips, 90-degree turns); default: the model's own (skain calibrate "
            "--tta N --default), else 1; 1 is the fast setting")
PRECISION_HELP = ("fp32 (reference); fast: the fastest variant measured to agree with fp32 (OpenVINO, else ONNX "
                  "Runtime, on CPU; channels_last on GPU); bf16 variants are faster but less exact")


def add_predict_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p, "./dataset_test")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--output", default="outputs/test_predictions.csv", help="predictions CSV to write")
    p.add_argument("--format", choices=["skain", "isic2018"], default="skain",
                   help="skain: image_id,pred,prob,p_<class>,error; isic2018: image,MEL,NV,BCC,AKIEC,BKL,DF,VASC")
    p.add_argument("--report", help="evaluation report folder when the CSV has dx (default: <output dir>/report)")
    p.add_argument("--per-lesion", action="store_true",
                   help="the CSV has lesion_id: write one row per lesion to --output (the mean of its images' "
                        "log-probabilities, through the same decision rule and trust layer; a lesion is turned away "
                        "only if all its images are), and the per-image rows to <output>_images.csv")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tta", type=int, help=TTA_HELP)
    p.add_argument("--precision", choices=["fp32", "fast", "channels_last", "bf16", "bf16_channels_last"],
                   default="fp32", help=PRECISION_HELP)
    p.add_argument("--backend", choices=["torch", "onnx", "openvino"], default="torch",
                   help="onnx / openvino: run <bundle>.onnx (from `skain export`) in ONNX Runtime / OpenVINO")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)


def run_predict(ns: argparse.Namespace) -> int:
    from skain.evaluation.folders import per_lesion, predict_folder, report_model, workers
    from skain.evaluation.report import write_predictions
    from skain.inference.lesion import has_lesions
    from skain.inference.predictor import Predictor, prediction_table
    from skain.modelfile.load import choose_model
    frame, src = prediction_table(ns.data, ns.csv, ns.images, bool(ns.skip_missing))
    if ns.per_lesion and not has_lesions(frame):
        raise ValueError("--per-lesion needs a CSV with a lesion_id column (which images show the same lesion)")
    if ns.per_lesion and ns.format != "skain":
        raise ValueError("--per-lesion writes skAIn's format (the ISIC 2018 format has one row per image)")
    choice = choose_model(ns.model)
    model = choice.path
    predictor = Predictor.from_bundle(choice, device=ns.device, precision=ns.precision, tta=ns.tta,
                                      backend=ns.backend)
    preds = predict_folder(predictor, frame, ns.batch_size, workers(ns.num_workers, predictor.device),
                           cache_dir_from_flag(ns.cache_dir, None), ns.progress)
    pred = preds["present"]
    out = Path(ns.output)
    if ns.per_lesion:  # one row per lesion in --output, the images' rows beside it
        lesions = write_predictions(per_lesion(predictor, pred, frame), out)
        out = out.with_name(f"{out.stem}_images{out.suffix or '.csv'}")
        print(f"wrote one row for each of {frame['lesion_id'].nunique()} lesion(s) to {lesions}")
    out = write_predictions(pred, out, ns.format)
    failed = pred[pred["error"] != ""]
    print(f"wrote {len(pred) - len(failed)} prediction(s) for {len(pred)} image(s) ({src.layout} layout) to {out}")
    for image_id, error in zip(failed["image_id"], failed["error"]):
        print(f"failed: {image_id}: {error}", file=sys.stderr)
    if "dx" in frame and len(failed) < len(pred):
        folder = Path(ns.report or Path(ns.output).parent / "report")
        print("\n".join(report_model(predictor, model, frame, src, preds, folder)))
    if len(failed):
        print(f"{len(failed)} image(s) could not be read; see the error column", file=sys.stderr)
        return PARTIAL_FAILURE
    return 0


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p, "./dataset_test")
    p.add_argument("--model", help="trained output folder or .pt bundle: predict the labelled --data/--csv images "
                                   "(with and without age/sex/site) and report accuracy and the trust figures")
    p.add_argument("--predictions", help="or score an existing predictions CSV (skAIn or ISIC 2018 format) "
                                         "against --csv ground truth (image_id,dx or ISIC 2018 one-hot)")
    p.add_argument("--report", help="report folder (default: <predictions dir>/report, or report/ with --model)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tta", type=int, help=TTA_HELP + " (calibration and triage apply above 1 only when fit for "
                   "that many: skain calibrate --tta N)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)


def run_evaluate(ns: argparse.Namespace) -> int:
    from skain.evaluation.evaluate import read_predictions, read_truth, trust_metrics
    from skain.evaluation.folders import report
    if ns.model:
        return _evaluate_model(ns)
    if not ns.predictions or not ns.csv:
        raise ValueError("skain evaluate needs --model with labelled --data/--csv images, or --predictions "
                         "and --csv (ground truth)")
    pred, truth = read_predictions(ns.predictions), read_truth(ns.csv)
    folder = Path(ns.report or Path(ns.predictions).parent / "report")
    as_given = trust_metrics(pred, truth, None)  # no temperature, OOD or triage unless the CSV has them
    print("\n".join(report(pred, truth, folder, {"predictions": ns.predictions, "ground_truth": ns.csv},
                           {"measured_on": f"predictions {ns.predictions}", "runs": {"as given": as_given}})))
    return 0


def _evaluate_model(ns: argparse.Namespace) -> int:
    from skain.evaluation.folders import predict_folder, report_model, workers
    from skain.evaluation.report import write_predictions
    from skain.inference.predictor import Predictor, prediction_table
    frame, src = prediction_table(ns.data, ns.csv, ns.images, bool(ns.skip_missing))
    if "dx" not in frame:
        raise ValueError(f"{src.csv or src.image_dirs[0]}: no dx column; skain evaluate --model needs labelled images")
    predictor = Predictor.from_bundle(ns.model, device=ns.device, tta=ns.tta)
    preds = predict_folder(predictor, frame, ns.batch_size, workers(ns.num_workers, predictor.device),
                           cache_dir_from_flag(ns.cache_dir, None), ns.progress)
    folder = Path(ns.report or "report")
    write_predictions(preds["present"], folder / "predictions.csv")
    print("\n".join(report_model(predictor, ns.model, frame, src, preds, folder)))
    return 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="trained output folder, .pt bundle, .safetensors file, Hugging Face-style folder "
                                   "or hf://ORG/NAME (default outputs; --format hf: as --model everywhere, so the "
                                   "shipped model when nothing was trained in outputs/)")
    p.add_argument("--format", choices=["onnx", "safetensors", "hf"], default="onnx",
                   help="onnx: the network as an ONNX graph; safetensors: the whole bundle as one portable file "
                        "(no pickle) that every --model accepts; hf: a Hugging Face-style folder (model.safetensors, "
                        "config.json, README.md model card) for --output DIR")
    p.add_argument("--output", help="file to write (default: beside the bundle, <bundle>.onnx / .safetensors); "
                                    "--format hf: the folder to write (required)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    s = p.add_argument_group("safetensors")
    s.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="storage of the network's weights (the OOD check stays float32; default float16)")
    s.add_argument("--check-images", metavar="DIR", help="real images to prove parity on: a reduced-precision "
                   "file is written only if it agrees with float32 (top-1 >= 99.5%%, max prob. diff <= 0.02)")
    s.add_argument("--check-csv", metavar="FILE", help="metadata CSV for the parity images (age, sex, site)")
    s.add_argument("--check-n", type=int, default=500, help="how many images the parity check uses (default 500)")


def run_export(ns: argparse.Namespace) -> int:
    if ns.format == "hf":
        from skain.evaluation.hub_export import export_hf
        from skain.modelfile.load import choose_model
        if not ns.output:
            raise ValueError("--format hf needs --output DIR (the folder to write)")
        folder, parity = export_hf(choose_model(ns.model).path, ns.output, ns.dtype, ns.check_images, ns.check_csv,
                                   ns.check_n)
        print((f"parity: {parity.line()}\n" if parity else "") + f"wrote {folder}/ (model.safetensors, config.json, "
              f"README.md); use it with `--model {folder}`, or push it to the Hub and use --model hf://ORG/NAME")
        return 0
    ns.model = ns.model or "outputs"
    if ns.format == "safetensors":
        from skain.evaluation.parity import export_checked
        path, parity = export_checked(ns.model, ns.output, ns.dtype, ns.check_images, ns.check_csv, ns.check_n)
        print((f"parity: {parity.line()}\n" if parity else "") + f"wrote {path}; use it with `--model {path}`")
        return 0
    from skain.inference.export import export_onnx
    path = export_onnx(ns.model, ns.output, ns.opset)
    print(f"wrote {path}; use it with `skain predict --backend onnx --model {ns.model}`")
    return 0


COMMANDS.update({
    "predict": (add_predict_args, run_predict, "predict a folder/CSV of images; evaluate when it has dx"),
    "evaluate": (add_evaluate_args, run_evaluate, "score a predictions CSV against ground truth; write a report"),
    "export": (add_export_args, run_export, "write the bundle's network as ONNX (image + metadata inputs)"),
})


# --------------------------------------------------------------------------------------------- serve
def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 = all; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--max-mb", type=float, help="largest accepted upload in MB (default 10)")
    p.add_argument("--cors", metavar="ORIGIN", help="allow browser calls to /api from ORIGIN ('*' = any); off by default")
    p.add_argument("--threads", type=int, help="waitress worker threads (default 4)")
    p.add_argument("--precision", choices=["fp32", "fast", "channels_last"], default="fast",
                   help=PRECISION_HELP + "; default here: fast (the web app's time to a diagnosis; fp32 for "
                   "probabilities bit-identical to `skain predict`)")
    p.add_argument("--tta", type=int, help=TTA_HELP)


def run_serve(ns: argparse.Namespace) -> int:
    try:
        from skain.web import create_app
        from skain.web.server import serve
    except ImportError as exc:
        raise ValueError(f"the web app needs Flask and waitress ({exc}): pip install 'skain[web]'") from exc
    config = {"CORS_ORIGIN": ns.cors, "PRECISION": ns.precision, "TTA": ns.tta}
    if ns.model is not None:  # else SKAIN_MODEL, else outputs/ if trained there, else the shipped model
        config["MODEL"] = ns.model
    if ns.max_mb is not None:
        if ns.max_mb <= 0:
            raise ValueError("--max-mb must be positive")
        config["MAX_CONTENT_LENGTH"] = int(ns.max_mb * 2**20)
    serve(create_app(config), ns.host, ns.port, ns.threads or 4)
    return 0


COMMANDS["serve"] = (add_serve_args, run_serve, "serve the web app and JSON API (waitress)")


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a finished training output folder (config.json, split.csv)")
    p.add_argument("--cache-dir", default=None, help="pre-resized image cache (as used in training)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tta", type=int, default=1, help="also fit temperature and triage threshold for predictions "
                   "averaged over this many TTA views (2-8), so `skain predict --tta N` keeps them")
    p.add_argument("--default", action="store_true", help="with --tta N: make N views the model's default inference "
                   "(predict, evaluate, serve and the web app run it unless told --tta 1)")
    p.add_argument("--triage-confidence", type=float, default=None, metavar="C",
                   help="choose the triage threshold with margin: flag enough malignant validation lesions that the "
                   "sensitivity's one-sided Clopper-Pearson lower bound at confidence C (0.5-0.99, e.g. 0.9) still "
                   "reaches 95%%; costs specificity (default: reach 95%% on validation itself)")


def run_calibrate(ns: argparse.Namespace) -> int:
    """Fit temperature, triage threshold and OOD check for a run trained before they existed (or, with --tta N,
    the temperature and triage threshold for N-view test-time augmentation)."""
    from skain.training.trust_fit import fit_trust_folder, fit_views_folder
    from skain.trust.crossfit import TrustSettings
    from skain.trust.triage import check_confidence
    if ns.default and ns.tta < 2:
        raise ValueError("--default needs --tta N with N >= 2 (one view is already the fallback)")
    if ns.triage_confidence is not None:
        check_confidence(ns.triage_confidence)  # out of range: refused before any work
    settings = TrustSettings(triage_confidence=ns.triage_confidence)
    if ns.tta > 1:
        block = fit_views_folder(ns.model, ns.tta, cache_dir_from_flag(ns.cache_dir, None), ns.device,
                                 settings, make_default=ns.default)
        c, t = block["calibration"], block["triage"]
        held = t.get("held_out") or {}
        print(f"{ns.tta} TTA views: T={c['temperature']:.3f}  ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}; "
              f"triage threshold {t.get('threshold')} (held-out sensitivity {held.get('sensitivity')}, specificity "
              f"{held.get('specificity')}); stored in {ns.model} for `skain predict --tta {ns.tta}`"
              + (f"; {ns.tta} views are now its default" if ns.default else ""))
        return 0
    figures = fit_trust_folder(ns.model, cache_dir_from_flag(ns.cache_dir, None), ns.device, settings)
    c = figures["calibration"]
    print(f"T={c['temperature']:.3f}  ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}; bundle, "
          f"model_card.md and reliability.png updated in {ns.model}")
    return 0


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="predictions CSV of model A (skain predict's, or ISIC 2018 format)")
    p.add_argument("b", help="predictions CSV of model B, on the same images")
    p.add_argument("--truth", required=True, help="ground truth: image_id,dx (lesion_id too: lesions are resampled)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="also write the whole comparison as JSON here")


def run_compare(ns: argparse.Namespace) -> int:
    import json

    from skain.evaluation.compare import compare, table
    from skain.fileio import atomic_write
    result = compare(ns.a, ns.b, ns.truth, ns.resamples, ns.seed)
    print(table(result))
    if ns.output:
        atomic_write(ns.output, lambda fh: fh.write(json.dumps(result, indent=1).encode() + b"\n"))
    return 0


COMMANDS["compare"] = (add_compare_args, run_compare,
                       "paired comparison of two models' predictions: differences with bootstrap intervals, DeLong")
COMMANDS["calibrate"] = (add_calibrate_args, run_calibrate,
                         "fit calibration, OOD check, triage threshold and model card for an existing run")


# --------------------------------------------------------------------------------------------- download
def add_download_args(p: argparse.ArgumentParser) -> None:
    from skain.download import DATASETS
    from skain.download.archive import API_ENV, DEFAULT_API
    p.add_argument("dataset", nargs="?", choices=list(DATASETS),
                   help="ham10000: the 10,015 HAM10000 images; isic2018-test / isic2018-val: the ISIC 2018 Task 3 "
                        "test / validation images (diagnoses where the Archive publishes them)")
    p.add_argument("--collection", type=int, nargs="+", metavar="ID", default=(),
                   help="ISIC Archive collection id(s) (instead of, or to override, a dataset)")
    p.add_argument("--search", metavar="QUERY",
                   help="ISIC Archive search query, e.g. 'diagnosis_3:\"Melanoma Invasive\"'")
    p.add_argument("--output", help="folder to write (default data/<dataset>, data/isic-<ids> or data/isic-search)")
    p.add_argument("--limit", type=int, help="at most N images (e.g. a small sample first)")
    p.add_argument("--base-url", help=f"ISIC Archive API base URL (default ${API_ENV}, else {DEFAULT_API})")
    p.add_argument("--workers", type=int, default=8, help="parallel transfers (default 8)")
    p.add_argument("--retries", type=int, default=5, help="retries per request, with exponential backoff (default 5)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per connect/read (default 30)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)


def run_download(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from skain.download import (
        DownloadRequest,
        Http,
        default_base_url,
        default_output,
        download,
    )
    from skain.download.files import human
    collections = tuple(ns.collection)
    req = DownloadRequest(Path(ns.output) if ns.output else default_output(ns.dataset, collections, ns.search),
                          ns.dataset, collections, ns.search, ns.limit, ns.base_url or default_base_url(),
                          ns.workers, ns.progress)
    try:
        s = download(req, Http(timeout=ns.timeout, retries=ns.retries))
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"{s.images} images in {s.folder}/ ({s.fetched} fetched, {human(s.bytes_fetched)} in {s.seconds:.0f} s); "
          f"licence and attribution: {s.folder}/LICENSE.txt, ATTRIBUTION.txt")
    print(f"use it: skain train --data {s.folder}   or   skain predict --data {s.folder}")
    return 0


COMMANDS["download"] = (add_download_args, run_download,
                        "download HAM10000, the ISIC 2018 test set or any ISIC Archive collection/search")


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["info", "clear"], help="info: entries, size, limit, free disk; clear: delete "
                   "the cached images (only the cache's own files)")
    p.add_argument("--cache-dir", help="cache folder (default ~/.cache/skain/images, or $SKAIN_CACHE/images)")


def run_cache(ns: argparse.Namespace) -> int:
    from skain.data.cache import cache_stats, clear_cache
    from skain.data.images import default_cache_dir
    folder = ns.cache_dir or default_cache_dir()
    if ns.action == "info":
        print(cache_stats(folder).describe())
        return 0
    files, size = clear_cache(folder)
    print(f"removed {files} file(s), {size / 2**30:.2f} GiB, from {folder}")
    return 0


COMMANDS["cache"] = (add_cache_args, run_cache, "show or clear the pre-resized image cache")


# --------------------------------------------------------------------------------------------- decide
def add_decide_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--oof", help="out-of-fold predictions of `skain train --all-folds` "
                                      "(<output>/oof_predictions.csv)")
    source.add_argument("--rule-from", metavar="MODEL", help="take over MODEL's rule unchanged (tau and log prior; "
                        "for a model without out-of-fold predictions of its own); needs --model")
    source.add_argument("--validation", action="store_true", help="choose tau for --model (a training or ensemble "
                        "output folder) on its own validation split, through the inference it runs by default; "
                        "reports a cross-fitted estimate (halves of the split) beside the in-sample figures")
    p.add_argument("--model", help="bundle or output folder to store the rule in (else only report it)")
    p.add_argument("--device", default="auto", help="with --validation: where to run the model")
    p.add_argument("--cache-dir", default=None, help="with --validation: pre-resized image cache (as in training)")


def run_decide(ns: argparse.Namespace) -> int:
    from skain.training.decide import fit_from_oof, take_rule
    if ns.validation:
        return decide_on_validation(ns)
    if ns.rule_from:
        if not ns.model:
            raise ValueError("--rule-from needs --model (the model to store the rule in)")
        rule = take_rule(ns.rule_from, ns.model)
        print(f"tau = {float(rule['tau']):.2f} stored in {ns.model} ({rule['fit_on']})")
        return 0
    r = fit_from_oof(ns.oof, ns.model)
    a, b = r["balanced_accuracy_argmax"], r["balanced_accuracy_adjusted"]
    print(f"tau = {r['tau']:.2f} (chosen on all folds). Nested cross-validation, each fold scored with a tau chosen "
          f"on the others: balanced accuracy {a['mean']:.4f} +- {a['std']:.4f} (argmax) -> {b['mean']:.4f} +- "
          f"{b['std']:.4f} (adjusted)" + (f"; stored in {ns.model}" if ns.model else ""))
    return 0


def decide_on_validation(ns: argparse.Namespace) -> int:
    from skain.training.decide_validation import fit_on_validation
    if not ns.model:
        raise ValueError("--validation needs --model (the output folder whose validation split chooses tau)")
    rule = fit_on_validation(ns.model, cache_dir_from_flag(ns.cache_dir, None), ns.device)
    v, held = rule["validation"], rule.get("cross_fitted_balanced_accuracy")
    taus = ", ".join(f"{h['tau']:.2f}" for h in held["halves"]) if held else ""
    where = ("test-fold", "chose nothing") if v["split"] == "test" else ("validation", "in-sample for tau")
    print(f"tau = {rule['tau']:.2f}, chosen on {rule['fit_on']}; stored in {ns.model}. "
          f"{where[0].capitalize()} balanced accuracy {v['balanced_accuracy']:.4f} with the rule, "
          f"{v['argmax']['balanced_accuracy']:.4f} at arg-max ({v['n']} images, {where[1]})"
          + (f"; cross-fitted halves of the validation split: {held['adjusted']['mean']:.4f} with the rule, "
             f"{held['argmax']['mean']:.4f} at arg-max (taus {taus})" if held else ""))
    return 0


COMMANDS["decide"] = (add_decide_args, run_decide,
                      "fit the balanced-accuracy decision rule (prior adjustment) on out-of-fold predictions, or "
                      "on a model's own validation split")


def add_cv_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="k-fold output folders (fold<k>/ with test_logits.npz); "
                   "several runs trained on the same split are scored as one ensemble (probabilities averaged)")
    p.add_argument("--output", required=True, help="folder for oof_<variant>.csv and cv_<variant>.json")
    p.add_argument("--variant", default="present", help="present, all_blank, age_blank, sex_blank, site_blank; "
                   "add _tta8 for the 8-view scores (default present)")
    p.add_argument("--image-only", metavar="RUN", help="an image-only k-fold run on the same split: write the "
                   "metadata table instead (every variant of RUN beside the image-only model, paired per fold)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of lesions (from the folds' "
                   "split.csv) for the 95%% intervals of the pooled out-of-fold figures and pairs (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")


def run_cv_report(ns: argparse.Namespace) -> int:
    from skain.training.cvreport import cross_run_report, metadata_markdown, write_metadata_table
    if ns.image_only:
        if len(ns.runs) != 1:
            raise ValueError("--image-only compares one multimodal run with the image-only run; give one RUN")
        print(metadata_markdown(write_metadata_table(ns.runs[0], ns.image_only, ns.output, ns.resamples, ns.seed)),
              end="")
        return 0
    r = cross_run_report(ns.runs, ns.output, ns.variant, ns.resamples, ns.seed)
    h, d = r["per_fold_mean_std"], r["decision_rule"]
    print(f"{r['folds']} folds, {r['images']} test images, {ns.variant}: balanced accuracy "
          f"{h['balanced_accuracy']['mean']:.4f} +- {h['balanced_accuracy']['std']:.4f} (argmax), "
          f"{d['balanced_accuracy_adjusted']['mean']:.4f} +- {d['balanced_accuracy_adjusted']['std']:.4f} with the "
          f"decision rule (nested); macro AUC {h['macro_auc']['mean']:.4f}; melanoma recall "
          f"{h['melanoma_recall']['mean']:.4f} -> {ns.output}")
    ci = (r.get("pooled_oof_intervals") or {}).get("metrics", {}).get("balanced_accuracy")
    if ci:
        print(f"pooled out-of-fold balanced accuracy {ci['value']:.4f}, 95% CI [{ci['ci'][0]:.3f}, {ci['ci'][1]:.3f}] "
              f"({r['pooled_oof_intervals']['resamples']} resamples of {r['pooled_oof_intervals']['unit']}s)")
    return 0


COMMANDS["cv-report"] = (add_cv_report_args, run_cv_report,
                         "cross-validated report of k-fold runs, or of their ensemble, from the test-fold logits")


def add_ensemble_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", required=True, metavar="DIR",
                   help="trained output folders (or .pt bundles), e.g. outputs/fold0 ... outputs/fold4")
    p.add_argument("--output", required=True, help="folder for the ensemble bundle (best_model.pt) and reports")
    p.add_argument("--oof", help="out-of-fold predictions CSV to fit the trust layer on (default: "
                                 "oof_predictions.csv beside the runs, else the runs' own validation splits)")
    p.add_argument("--cache-dir", default=None, help="pre-resized image cache (when validation is predicted)")
    p.add_argument("--device", default="auto")


def run_ensemble(ns: argparse.Namespace) -> int:
    from skain.training.ensemble import build_ensemble
    path = build_ensemble(ns.runs, ns.output, ns.oof, cache_dir_from_flag(ns.cache_dir, None), ns.device)
    print(f"wrote an ensemble of {len(ns.runs)} runs to {path}; use it with `skain predict --model {ns.output}`")
    return 0


COMMANDS["ensemble"] = (add_ensemble_args, run_ensemble,
                        "combine trained runs (e.g. k folds) into one bundle that averages their probabilities")


def build_parser() -> argparse.ArgumentParser:
    from skain import __version__
    parser = argparse.ArgumentParser(prog="skain", description="Skin-lesion classification on HAM10000 "
                                     "(image + age, sex, body site). Research and education only.")
    parser.add_argument("--version", action="version", version=f"skain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging(ns.verbose)
    try:
        return COMMANDS[ns.command][1](ns)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a training run continues with --resume", file=sys.stderr)
        return 130
