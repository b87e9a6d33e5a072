"""Command-line parsing only: `skain train | synth | demo | check-gpu | ...`. No ML logic here."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Sequence

from .bundle import BundleError
from .data.images import ImageError
from .data.schema import DataError
from .data.split import LeakageError
from .runtime_env import prepare_process
from .weights import WeightsError

USER_ERRORS = (DataError, ImageError, BundleError, WeightsError, LeakageError, ValueError, FileNotFoundError)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def add_data_args(p: argparse.ArgumentParser, default_hint: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", help=f"folder with image/ + text/ (seed layout) or an official HAM10000 download "
                                  f"(default: {default_hint})")
    g.add_argument("--csv", help="metadata CSV (lesion_id,image_id,dx,age,sex,localization)")
    g.add_argument("--images", nargs="+", metavar="DIR", help="image folder(s) (.jpg/.jpeg/.png)")
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
    p.add_argument("--resume", action="store_true", default=None, help="continue from <output>/last.pt")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a run in --output")
    p.add_argument("--folds", type=int)
    p.add_argument("--fold", type=int)
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
    t.add_argument("--max-minutes", type=float, help="stop after this much training time")
    t.add_argument("--seed", type=int)
    t.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"])
    t.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training step (opt-in: 60 s to compile and no gain on 2 CPU cores "
                   "here; untested on GPU)")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def config_from_args(ns: argparse.Namespace):
    from .config import build_config
    from .engine import resolve_device
    preset = ns.preset or ("gpu" if resolve_device().type == "cuda" else "cpu")
    model = _pick(ns, ["backbone", "pretrained", "image_only", "input_size"])
    if ns.pretrained_file:
        model["pretrained"] = ns.pretrained_file
    flags = {
        "data": _pick(ns, ["data", "csv", "images", "skip_missing", "cache_dir", "num_workers", "folds", "fold"]),
        "model": model,
        "train": _pick(ns, ["epochs", "frozen_epochs", "lr", "lr_frozen", "unfreeze_fraction", "batch_size",
                            "patience", "balance", "max_minutes", "seed", "amp", "compile", "progress", "output",
                            "resume", "overwrite"]),
    }
    return build_config(preset, ns.config, flags)


def run_train(ns: argparse.Namespace) -> int:
    from .train import fit
    cfg = config_from_args(ns)
    logging.getLogger(__name__).info("preset %s, output %s", cfg.preset, cfg.train.output)
    fit(cfg)
    return 0


# --------------------------------------------------------------------------------------------- synth / demo
def add_synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="dataset_train", help="folder to write (seed layout)")
    p.add_argument("-n", "--images", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)


def run_synth(ns: argparse.Namespace) -> int:
    from .data.synthetic import SYNTHETIC_NOTE, make_synthetic
    root = make_synthetic(ns.output, ns.images, ns.seed)
    print(f"wrote {ns.images} images to {root}/image and {root}/text/metadata.csv\n{SYNTHETIC_NOTE}")
    return 0


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="outputs")
    p.add_argument("--data", default="dataset_train")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--no-serve", action="store_true", help="train only; do not start the web app")
    p.add_argument("--port", type=int, default=5000)


def run_demo(ns: argparse.Namespace) -> int:
    """Synthetic data (unless present) -> a short cpu-preset training -> the web app."""
    from pathlib import Path

    from .config import build_config
    from .data.synthetic import SYNTHETIC_NOTE, make_synthetic
    from .train import fit
    if not Path(ns.data).exists():
        make_synthetic(ns.data, 600, seed=0)
        make_synthetic(Path(ns.data).parent / "dataset_test", 120, seed=1, split="test")
    print(SYNTHETIC_NOTE)
    cfg = build_config("cpu", flags={"data": {"data": ns.data},
                                     "train": {"epochs": ns.epochs, "output": ns.output, "overwrite": True}})
    fit(cfg)
    serve = COMMANDS.get("serve")
    if ns.no_serve or serve is None:
        print(f"trained demo model in {ns.output}/")
        return 0
    return serve[1](argparse.Namespace(model=ns.output, host="127.0.0.1", port=ns.port, **_serve_defaults()))


def _serve_defaults() -> dict:
    return {"max_mb": None, "cors": None, "threads": None, "precision": "fp32"}


def run_check_gpu(ns: argparse.Namespace) -> int:
    from .gpu import report
    print("\n".join(report()))
    return 0


COMMANDS.update({
    "train": (add_train_args, run_train, "train the multimodal classifier"),
    "synth": (add_synth_args, run_synth, "write a SYNTHETIC demo dataset in the seed layout"),
    "demo": (add_demo_args, run_demo, "synthetic data -> short CPU training -> web app"),
    "check-gpu": (lambda p: None, run_check_gpu, "show device, CUDA, mixed precision and a timed matmul"),
})


# --------------------------------------------------------------------------------------------- predict / evaluate / export
PARTIAL_FAILURE = 3  # exit code: predictions written, but some images could not be read


PRECISION_HELP = ("fp32 (reference); fast: the fastest variant measured to agree with fp32 (OpenVINO, else ONNX "
                  "Runtime, on CPU; channels_last on GPU); bf16 variants are faster but less exact")


def add_predict_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p, "./dataset_test")
    p.add_argument("--model", default="outputs", help="trained output folder or .pt bundle (default outputs)")
    p.add_argument("--output", default="outputs/test_predictions.csv", help="predictions CSV to write")
    p.add_argument("--format", choices=["skain", "isic2018"], default="skain",
                   help="skain: image_id,pred,prob,p_<class>,error; isic2018: image,MEL,NV,BCC,AKIEC,BKL,DF,VASC")
    p.add_argument("--report", help="evaluation report folder when the CSV has dx (default: <output dir>/report)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tta", type=int, default=1, help="test-time augmentation views, 1-8 (flips, 90-degree turns)")
    p.add_argument("--precision", choices=["fp32", "fast", "channels_last", "bf16", "bf16_channels_last"],
                   default="fp32", help=PRECISION_HELP)
    p.add_argument("--backend", choices=["torch", "onnx", "openvino"], default="torch",
                   help="onnx / openvino: run <bundle>.onnx (from `skain export`) in ONNX Runtime / OpenVINO")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)


def run_predict(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .predict import Predictor, default_workers, prediction_table
    from .report import write_predictions
    frame, src = prediction_table(ns.data, ns.csv, ns.images, bool(ns.skip_missing))
    predictor = Predictor.from_bundle(ns.model, device=ns.device, precision=ns.precision, tta=ns.tta,
                                      backend=ns.backend)
    workers = ns.num_workers if ns.num_workers is not None else default_workers(predictor.device)
    cache = None if ns.cache_dir in (None, "off") else ns.cache_dir
    pred = predictor.predict_frame(frame, ns.batch_size, workers, cache, ns.progress)
    out = write_predictions(pred, ns.output, ns.format)
    failed = pred[pred["error"] != ""]
    print(f"wrote {len(pred) - len(failed)} prediction(s) for {len(pred)} image(s) ({src.layout} layout) to {out}")
    for image_id, error in zip(failed["image_id"], failed["error"]):
        print(f"failed: {image_id}: {error}", file=sys.stderr)
    if "dx" in frame and len(failed) < len(pred):
        _report(pred, frame[["image_id", "dx"]], Path(ns.report or Path(ns.output).parent / "report"),
                {"model": str(ns.model), "data": str(src.csv or src.image_dirs[0]), **_inference_context(predictor)})
    if len(failed):
        print(f"{len(failed)} image(s) could not be read; see the error column", file=sys.stderr)
        return PARTIAL_FAILURE
    return 0


def _inference_context(predictor) -> dict:
    info = predictor.info
    return {"backbone": info["backbone"], **info["inference"]}


def _report(pred, truth, folder, context: dict) -> None:
    from .evaluate import align, evaluate, headline
    from .report import write_report
    labels, probs, info = align(pred, truth)
    metrics = evaluate(labels, probs)
    write_report(metrics, labels, probs, folder, {**context, **info})
    print(headline(metrics))
    print(f"report: {folder}/report.md")


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", required=True, help="predictions CSV (skAIn or ISIC 2018 format)")
    p.add_argument("--csv", required=True, help="ground truth: CSV with image_id,dx (or ISIC 2018 one-hot)")
    p.add_argument("--report", help="report folder (default: <predictions dir>/report)")


def run_evaluate(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluate import read_predictions, read_truth
    pred = read_predictions(ns.predictions)
    folder = Path(ns.report or Path(ns.predictions).parent / "report")
    _report(pred, read_truth(ns.csv), folder, {"predictions": ns.predictions, "ground_truth": ns.csv})
    return 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="outputs", help="trained output folder or .pt bundle (default outputs)")
    p.add_argument("--output", help="ONNX file to write (default: beside the bundle, <bundle>.onnx)")
    p.add_argument("--opset", type=int, default=17)


def run_export(ns: argparse.Namespace) -> int:
    from .export import export_onnx
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
    p.add_argument("--model", default="outputs", help="output folder or .pt bundle (default outputs)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 = all; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--max-mb", type=float, help="largest accepted upload in MB (default 10)")
    p.add_argument("--cors", metavar="ORIGIN", help="allow browser calls to /api from ORIGIN ('*' = any); off by default")
    p.add_argument("--threads", type=int, help="waitress worker threads (default 4)")
    p.add_argument("--precision", choices=["fp32", "fast", "channels_last"], default="fp32", help=PRECISION_HELP)


def run_serve(ns: argparse.Namespace) -> int:
    try:
        from .web import create_app
        from .web.server import serve
    except ImportError as exc:
        raise ValueError(f"the web app needs Flask and waitress ({exc}): pip install 'skain[web]'") from exc
    config = {"MODEL": ns.model, "CORS_ORIGIN": ns.cors, "PRECISION": ns.precision}
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


def run_calibrate(ns: argparse.Namespace) -> int:
    """Fit temperature, triage threshold and OOD check for a run trained before they existed."""
    from .trust import fit_trust_folder
    figures = fit_trust_folder(ns.model, ns.cache_dir, ns.device)
    c = figures["calibration"]
    print(f"T={c['temperature']:.3f}  ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}; bundle, "
          f"model_card.md and reliability.png updated in {ns.model}")
    return 0


COMMANDS["calibrate"] = (add_calibrate_args, run_calibrate,
                         "fit calibration, OOD check, triage threshold and model card for an existing run")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
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
        if argv is None:  # the real command line: no-op after runtime_env.run_cli, else tunes malloc in-process
            prepare_process(reexec=False)
        return COMMANDS[ns.command][1](ns)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a training run continues with --resume", file=sys.stderr)
        return 130
