"""`skain demo`: serve the HAM10000 model shipped with skAIn at once, or (`--synthetic`) first train a small
model on SYNTHETIC images.

The demo never overwrites or deletes real work: the synthetic run lives in a folder of its own
(outputs/demo-synthetic/ by default) that carries a mark file, and a folder that holds anything without
that mark is refused. `make clean` deletes only that folder.
"""
from __future__ import annotations

from pathlib import Path

from skain.data.synthetic import make_synthetic
from skain.modelfile.bundle import BundleError
from skain.modelfile.load import shipped_model
from skain.training.config import build_config
from skain.training.train import fit

MARKER = ".skain-demo"
SYNTHETIC_OUTPUT = Path("outputs") / "demo-synthetic"


class DemoError(ValueError):
    """The demo was pointed at a folder it did not create."""


def shipped_demo_model() -> Path:
    """The model `skain demo` serves; a clear error when this installation does not have it."""
    path = shipped_model()
    if not path.is_file():
        raise BundleError(f"the HAM10000 model that ships with skAIn is not in this installation (expected at "
                          f"{path}); `skain demo --synthetic` trains a demo model on synthetic images instead, "
                          "and `skain train --data DIR` trains one on real data")
    return path


def claim(folder: Path) -> Path:
    """Make `folder` the demo's own (create it and mark it), or refuse when it holds work the demo did not make."""
    if folder.exists():
        if not folder.is_dir() or (any(folder.iterdir()) and not (folder / MARKER).is_file()):
            raise DemoError(f"{folder} holds files that `skain demo` did not create (no {MARKER} mark in it), so the "
                            "synthetic demo will not write there: pass --output with a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("made by `skain demo --synthetic`: SYNTHETIC data and a demo model; "
                                 "`make clean` deletes this folder\n")
    return folder


def synthetic_demo(folder: str | Path = SYNTHETIC_OUTPUT, epochs: int = 3, images: int = 600) -> Path:
    """Synthetic data (drawn once) -> a short cpu-preset training -> the model folder, all inside `folder`."""
    root = claim(Path(folder))
    data = root / "dataset_train"
    if not data.exists():
        make_synthetic(data, images, seed=0)
        make_synthetic(root / "dataset_test", max(images // 5, 20), seed=1, split="test")
    model = root / "model"
    fit(build_config("cpu", flags={"data": {"data": str(data)},
                                   "train": {"epochs": epochs, "output": str(model), "overwrite": True}}))
    return model
