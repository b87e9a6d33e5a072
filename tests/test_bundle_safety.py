"""Safe loading: a bundle is read with torch.load(weights_only=True) only, and a bundle from another format
version, or whose classes / vocabularies / arguments do not fit its weights, is refused with a clear message
before anything is built or served."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from skain.cli import main
from skain.inference.predictor import Predictor
from skain.modelfile.bundle import FORMAT_VERSION, BundleError, check_bundle, load_model
from skain.modelfile.load import read_bundle

SRC = Path(__file__).resolve().parents[1] / "src" / "skain"


@pytest.fixture(scope="module")
def bundle(trained) -> dict:
    return torch.load(trained / "best_model.pt", map_location="cpu", weights_only=True)


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


class Payload:
    """Unpickling this runs code: it would create the file named in `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_that_runs_code_is_refused_and_never_executed(bundle, tmp_path):
    marker = tmp_path / "pwned"
    evil = save({**bundle, "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(BundleError, match=r"not a loadable skAIn bundle \(refused by torch.load\(weights_only=True\)"):
        read_bundle(evil)
    assert not marker.exists()


def test_a_bundle_holding_arbitrary_objects_is_refused(bundle, tmp_path):
    from collections import OrderedDict
    from fractions import Fraction
    odd = save({**bundle, "metrics": {"score": Fraction(1, 3)}, "extra": OrderedDict(a=1)}, tmp_path / "odd.pt")
    with pytest.raises(BundleError, match="weights_only"):
        read_bundle(odd)


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in SRC.rglob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if re.search(r"torch\.load\(", line) and not line.lstrip().startswith(("#", '"', "Loading")):
                calls.append((path.name, line.strip()))
    assert calls, "expected torch.load calls in the package"
    unsafe = [c for c in calls if "weights_only=True" not in c[1]]
    assert not unsafe, unsafe
    assert not any("allow_pickle=True" in p.read_text(encoding="utf-8") for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("content, message", [
    (b"", "not a loadable skAIn bundle"),
    (b"this is not a model\n", "not a loadable skAIn bundle"),
    ("truncated", "not a loadable skAIn bundle"),
])
def test_broken_files_are_refused(trained, tmp_path, content, message):
    path = tmp_path / "broken.pt"
    path.write_bytes((trained / "best_model.pt").read_bytes()[:5000] if content == "truncated" else content)
    with pytest.raises(BundleError, match=message):
        read_bundle(path)


def mutate(bundle: dict, change) -> dict:
    b = copy.deepcopy(bundle)
    change(b)
    return b


CASES = {
    "not a dict": (lambda b: None, "not a skAIn bundle"),
    "other format": (lambda b: b.update(format="something-else"), "not a skAIn bundle"),
    "newer format": (lambda b: b.update(format_version=FORMAT_VERSION + 1, skain_version="9.9"),
                     rf"bundle format {FORMAT_VERSION + 1} written by skAIn 9.9; this skAIn .* reads format "
                     rf"{FORMAT_VERSION}\. Retrain, or use the matching skAIn version"),
    "no version": (lambda b: b.pop("format_version"), "bundle format None"),
    "class missing": (lambda b: b["classes"].pop(), "6 class names but the weights have 7 outputs"),
    "num_classes": (lambda b: b["model_args"].update(num_classes=5), "class names but the weights have 7"),
    "sex vocabulary": (lambda b: b["encoder"]["sex_vocab"].append("other"), "sex_vocab vocabulary does not match"),
    "site vocabulary": (lambda b: b["encoder"]["site_vocab"].pop(), "site_vocab vocabulary does not match"),
    "no weights": (lambda b: b.pop("state_dict"), "missing"),
    "no encoder": (lambda b: b.pop("encoder"), "missing"),
    "weights not tensors": (lambda b: b.update(state_dict={"head.0.weight": [1, 2]}), "not tensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inconsistent_bundles_are_refused_with_the_reason(bundle, tmp_path, case):
    change, message = CASES[case]
    bad = None if case == "not a dict" else mutate(bundle, change)
    with pytest.raises(BundleError, match=message):
        check_bundle(bad, "bad.pt")
    path = save(bad if bad is not None else [1, 2, 3], tmp_path / "bad.pt")
    with pytest.raises(BundleError, match=message):
        read_bundle(path)
    with pytest.raises(BundleError):
        Predictor.from_bundle(path)


def test_weights_that_do_not_fit_the_described_model_are_refused(bundle):
    shape = mutate(bundle, lambda b: b["state_dict"].update(
        {k: torch.zeros(3, 3) for k in list(b["state_dict"])[:1]}))
    with pytest.raises(BundleError, match="bundle weights do not fit the model they describe"):
        load_model(shape)
    missing = mutate(bundle, lambda b: b["state_dict"].pop(next(k for k in b["state_dict"] if "conv" in k)))
    with pytest.raises(BundleError, match="do not fit"):
        load_model(missing)


def test_cli_and_web_refuse_a_bad_bundle_at_start(bundle, synth_root, tmp_path, capsys):
    from skain.web import create_app
    path = save(mutate(bundle, lambda b: b.update(format_version=FORMAT_VERSION + 1)), tmp_path / "old.pt")
    with pytest.raises(BundleError, match="Retrain"):
        create_app({"TESTING": True, "MODEL": str(path)})
    assert main(["predict", "--data", str(synth_root / "dataset_test"), "--model", str(path), "--output",
                 str(tmp_path / "p.csv"), "--no-progress"]) == 2
    assert "Retrain" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    assert main(["serve", "--model", str(path)]) == 2
    assert "Retrain, or use the matching skAIn version" in capsys.readouterr().err


def test_the_real_bundle_passes_every_check(trained, bundle):
    check_bundle(bundle, "best_model.pt")
    assert read_bundle(trained)["format_version"] == FORMAT_VERSION
    assert not load_model(bundle).training
