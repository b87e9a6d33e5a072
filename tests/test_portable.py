"""The portable model format: one .safetensors file, no pickle, read back by read_bundle like a .pt bundle."""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from skain.data.layout import Source, load_table
from skain.evaluation import parity as parity_check
from skain.evaluation.parity import ParityError, check_parity
from skain.inference.predictor import Predictor
from skain.modelfile.bundle import BundleError
from skain.modelfile.load import read_bundle, resolve_path
from skain.modelfile.portable import META_KEY, export_portable, read_portable


@pytest.fixture(scope="module")
def bundle(trained) -> dict:
    return read_bundle(trained)


@pytest.fixture(scope="module")
def frame(synth_root):
    return load_table(Source(None, [synth_root / "dataset_test" / "image"], "images"), require=("image_id",))


def header(path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def same(a, b) -> bool:
    """Nested equality: tensors exactly (dtype too), floats with NaN == NaN."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b and type(a) is type(b)


def test_float32_round_trip_keeps_every_part_and_gives_identical_predictions(bundle, frame, tmp_path):
    path = export_portable(bundle, tmp_path / "m.safetensors", "float32")
    back = read_bundle(path)
    assert back.pop("portable") == {"dtype": "float32"}
    assert same(bundle, back)
    ref = Predictor(bundle, device="cpu").predict_frame(frame, progress=False)
    got = Predictor.from_bundle(path, device="cpu").predict_frame(frame, progress=False)
    cols = [c for c in ref if c.startswith("p_") or c in ("pred", "ood", "ood_score", "triage")]
    assert ref[cols].equals(got[cols])


def test_file_holds_tensors_by_dotted_path_and_the_rest_as_json(bundle, tmp_path):
    path = export_portable(bundle, tmp_path / "m.safetensors", "float16")
    head = header(path)
    assert head["state_dict.head.0.weight"]["dtype"] == "F16"
    assert head["state_dict.backbone.conv_stem.weight"]["dtype"] == "F16"             # kernels too
    assert head["state_dict.backbone.bn1.running_var"]["dtype"] == "F32"              # BN vectors stay exact
    assert head["state_dict.head.0.bias"]["dtype"] == "F32"
    assert head["state_dict.backbone.bn1.num_batches_tracked"]["dtype"] == "I64"      # integers unchanged
    assert head["trust.ood.parts.0.whitener"]["dtype"] == "F16"                        # OOD matrices too
    assert head["trust.ood.parts.0.means"]["dtype"] == "F16"
    doc = json.loads(head["__metadata__"][META_KEY])
    assert doc["classes"] == bundle["classes"] and doc["portable"] == {"dtype": "float16"}
    assert doc["state_dict"]["head.0.weight"] == {"__tensor__": "state_dict.head.0.weight"}
    assert b"torch" not in path.read_bytes()[:8 + 16] and not path.read_bytes().startswith(b"PK")  # no zip/pickle


def test_float16_halves_the_weights_and_stays_within_tolerance(bundle, frame, tmp_path):
    small = export_portable(bundle, tmp_path / "h.safetensors", "float16")
    big = export_portable(bundle, tmp_path / "f.safetensors", "float32")
    assert small.stat().st_size < 0.75 * big.stat().st_size
    back = read_bundle(small)
    assert all(v.dtype == bundle["state_dict"][k].dtype for k, v in back["state_dict"].items())  # upcast on load
    diff = max((back["state_dict"][k] - v).abs().max().item() for k, v in bundle["state_dict"].items()
               if v.is_floating_point())
    assert 0 < diff < 1e-2
    parity = check_parity(bundle, back, frame, "float16")
    assert parity.images == len(frame) and parity.top1_agreement >= 0.95 and parity.max_prob_diff < 0.05
    assert parity.ood_agreement == 1.0
    full, half = Predictor(bundle).predict_frame(frame, progress=False), Predictor(back).predict_frame(frame,
                                                                                                  progress=False)
    np.testing.assert_allclose(half["ood_score"], full["ood_score"], rtol=5e-3)  # float16 OOD matrices


def test_numpy_arrays_and_nested_lists_round_trip(bundle, tmp_path):
    extra = {**bundle, "extra": {"arr": np.arange(6, dtype=np.float32).reshape(2, 3), "deep": [[1, {"x": None}]]}}
    back = read_bundle(export_portable(extra, tmp_path / "m.safetensors", "float16"))
    assert isinstance(back["extra"]["arr"], np.ndarray) and back["extra"]["arr"].dtype == np.float32
    np.testing.assert_array_equal(back["extra"]["arr"], extra["extra"]["arr"])
    assert back["extra"]["deep"] == [[1, {"x": None}]]


def test_values_a_portable_file_cannot_hold_are_refused_by_name(bundle, tmp_path):
    with pytest.raises(BundleError, match="metrics.bad: a object cannot"):
        export_portable({**bundle, "metrics": {"bad": object()}}, tmp_path / "m.safetensors")
    with pytest.raises(BundleError, match="key 3 is not a string"):
        export_portable({**bundle, "metrics": {3: 1}}, tmp_path / "m.safetensors")


def test_weights_beyond_float16_range_stay_float32(bundle, tmp_path):
    state = dict(bundle["state_dict"])
    state["head.0.weight"] = state["head.0.weight"].clone().fill_(1e6)
    path = export_portable({**bundle, "state_dict": state}, tmp_path / "m.safetensors", "float16")
    head = header(path)
    assert head["state_dict.head.0.weight"]["dtype"] == "F32" and head["state_dict.head.3.weight"]["dtype"] == "F16"
    assert torch.equal(read_bundle(path)["state_dict"]["head.0.weight"], state["head.0.weight"])


def test_folder_with_only_a_portable_file_resolves_to_it(bundle, tmp_path):
    export_portable(bundle, tmp_path / "best_model.safetensors", "float32")
    assert resolve_path(tmp_path) == tmp_path / "best_model.safetensors"


# ------------------------------------------------------------------------------------------- hostile files
def safetensors_file(path, tensors: dict, metadata: dict | None):
    from safetensors.torch import save
    path.write_bytes(save(tensors, metadata=metadata))
    return path


def rewrite(path, bundle_doc_edit):
    """Re-save a portable file with its JSON document edited (tensors kept)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    return tensors, {**meta, META_KEY: bundle_doc_edit(meta[META_KEY])}


def edit_doc(fn):
    def edit(text):
        doc = json.loads(text)
        fn(doc)
        return json.dumps(doc)
    return edit


HOSTILE = {
    "random bytes": (lambda t, m: None, "not a readable safetensors file"),
    "torch pickle renamed": (lambda t, m: "pickle", "not a readable safetensors file"),
    "header length lies": (lambda t, m: "lies", "not a readable safetensors file"),
    "no skain metadata": (lambda t, m: (t, {"format": "pt"}), "without skAIn's 'skain_bundle' metadata"),
    "metadata not json": (lambda t, m: (t, {**m, META_KEY: "{'state_dict': __import__('os')}"}), "not valid JSON"),
    "metadata nested deeply": (lambda t, m: (t, {**m, META_KEY: "[" * 200_000 + "]" * 200_000}),
                               "(nested too deeply|not valid JSON)"),
    "metadata not an object": (lambda t, m: (t, {**m, META_KEY: "[1, 2]"}), "not a JSON object"),
    "names a missing tensor": (lambda t, m: ({k: v for k, v in t.items() if k != "state_dict.head.0.weight"}, m),
                               "names tensor 'state_dict.head.0.weight', which the file does not hold"),
    "an unnamed tensor": (lambda t, m: ({**t, "payload": torch.zeros(3)}, m), "does not name"),
    "same tensor twice": (lambda t, m: (t, {**m, META_KEY: m[META_KEY].replace(
        '"state_dict.head.0.bias"', '"state_dict.head.0.weight"')}), "names tensor .* twice"),
    "wrong format": (lambda t, m: (t, {**m, META_KEY: edit_doc(lambda d: d.update(format="evil"))(m[META_KEY])}),
                     "not a skAIn bundle"),
    "classes do not fit": (lambda t, m: (t, {**m, META_KEY: edit_doc(lambda d: d["classes"].pop())(m[META_KEY])}),
                           "class names but the weights"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_malformed_or_malicious_files_are_refused_with_the_reason(bundle, trained, tmp_path, case):
    good = export_portable(bundle, tmp_path / "good.safetensors", "float32")
    from safetensors import safe_open
    with safe_open(str(good), "pt") as fh:
        tensors, meta = {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()
    make, words = HOSTILE[case]
    made, bad = make(tensors, meta), tmp_path / "bad.safetensors"
    if made is None:
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif made == "pickle":
        bad.write_bytes((trained / "best_model.pt").read_bytes())
    elif made == "lies":
        raw = good.read_bytes()
        bad.write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    else:
        safetensors_file(bad, *made)
    with pytest.raises(BundleError, match=words):
        read_bundle(bad)


@pytest.mark.parametrize("command", [["serve"], ["predict"]])
def test_cli_refuses_a_bad_file_with_exit_code_2(synth_root, tmp_path, capsys, command):
    from skain.cli import main
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    data = ["--data", str(synth_root / "dataset_test"), "--output", str(tmp_path / "p.csv")]
    extra = data if command[0] == "predict" else []
    assert main([*command, "--model", str(bad), *extra]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- export command
def test_export_command_writes_a_checked_float16_file(trained, synth_root, tmp_path, capsys):
    from skain.cli import main
    out = tmp_path / "model.safetensors"
    assert main(["export", "--model", str(trained), "--format", "safetensors", "--output", str(out),
                 "--check-images", str(synth_root / "dataset_test" / "image"), "--check-n", "30"]) == 0
    said = capsys.readouterr().out
    assert "top-1 agreement" in said and "max probability difference" in said and str(out) in said
    parity = read_bundle(out)["portable"]["parity"]
    assert parity["images"] == 30 and parity["dtype"] == "float16" and parity["top1_agreement"] >= 0.995


def test_export_refuses_to_write_when_parity_misses_the_bar(trained, synth_root, tmp_path, monkeypatch, capsys):
    from skain.cli import main
    monkeypatch.setattr(parity_check, "MAX_PROB_DIFF", 0.0)
    out = tmp_path / "model.safetensors"
    assert main(["export", "--model", str(trained), "--format", "safetensors", "--output", str(out),
                 "--check-images", str(synth_root / "dataset_test" / "image"), "--check-n", "10"]) == 2
    err = capsys.readouterr().err
    assert "not written" in err and "--dtype float32" in err
    assert not out.exists()


def test_parity_error_is_a_user_error():
    assert issubclass(ParityError, ValueError)


def test_export_without_check_and_read_portable_directly(trained, tmp_path):
    from skain.evaluation.parity import export_checked
    path, parity = export_checked(trained, tmp_path / "x.safetensors", "float32")
    assert parity is None and read_portable(path)["portable"] == {"dtype": "float32"}
    with pytest.raises(ValueError, match="is the model being exported"):
        export_checked(path, path, "float16")


@pytest.mark.slow
def test_float16_parity_on_real_images_with_metadata(trained, shared_data):
    """The parity check runs the real-data path (CSV metadata, unseen sites as unknown) end to end."""
    from skain.evaluation.parity import parity_frame
    from skain.modelfile.portable import reload
    bundle = read_bundle(trained)
    frame = parity_frame(shared_data / "images", shared_data / "metadata.csv", n=64)
    parity = check_parity(bundle, reload(bundle, "float16"), frame, "float16")
    assert parity.images == 64 and parity.top1_agreement >= 0.95
