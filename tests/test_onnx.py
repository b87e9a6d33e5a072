"""ONNX export: the graph reproduces PyTorch on real images in ONNX Runtime and in OpenVINO, has a dynamic
batch, and refuses a bundle it was not exported from."""
import threading

import numpy as np
import pandas as pd
import pytest

from skain.cli import main
from skain.data.schema import CLASSES
from skain.inference.predictor import GRAPH_RUNTIMES, Predictor, fast_choice, prediction_table
from skain.modelfile.bundle import BundleError, atomic_torch_save
from skain.modelfile.load import read_bundle

P_COLS = [f"p_{c}" for c in CLASSES]
GRAPH_BACKENDS = list(GRAPH_RUNTIMES)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    bundle = out / "best_model.pt"
    bundle.write_bytes((trained / "best_model.pt").read_bytes())
    assert main(["export", "--model", str(out)]) == 0
    return out


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_exported_graph_matches_pytorch_on_real_images(exported, shared_data, tmp_path, backend):
    meta = pd.read_csv(shared_data / "metadata.csv").head(24)
    meta.loc[::3, "sex"] = ""  # some unknown metadata too
    meta.to_csv(tmp_path / "real.csv", index=False)
    frame, _ = prediction_table(csv=tmp_path / "real.csv", images=[shared_data / "images"])
    ref = Predictor.from_bundle(exported).predict_frame(frame, batch_size=10, progress=False)
    onnx = Predictor.from_bundle(exported, backend=backend).predict_frame(frame, batch_size=10, progress=False)
    diff = np.abs(ref[P_COLS].to_numpy() - onnx[P_COLS].to_numpy()).max()
    assert diff <= 1e-4, diff
    assert (ref["pred"] == onnx["pred"]).all()
    one = Predictor.from_bundle(exported, backend=backend).predict_one(frame["path"][0], 50, "female", "back")
    assert one.diagnosis in CLASSES and Predictor.from_bundle(exported, backend=backend).info["inference"][
        "backend"] == backend


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_predict_one_is_safe_to_call_from_several_threads(exported, shared_data, backend):
    """The web server calls predict_one from several threads on one Predictor: each call must get its own
    image's probabilities AND its own OOD score (the feature tap must not collect other threads' passes)."""
    paths = sorted((shared_data / "images").glob("*.jpg"))[:6]
    p = Predictor.from_bundle(exported, backend=backend)
    expected = [p.predict_one(path) for path in paths]
    got: dict[int, list] = {}

    def work(i: int) -> None:
        got[i] = [p.predict_one(paths[i]) for _ in range(3)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ref in enumerate(expected):
        assert len(got.get(i, [])) == 3, f"thread {i} failed"
        for one in got[i]:
            assert one.probabilities == pytest.approx(ref.probabilities, abs=1e-6)
            assert one.ood_score == pytest.approx(ref.ood_score, rel=1e-5)


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_cli_predicts_with_the_graph_backends(exported, synth_root, tmp_path, backend):
    out = tmp_path / "p.csv"
    assert main(["predict", "--data", str(synth_root / "dataset_test"), "--model", str(exported),
                 "--backend", backend, "--output", str(out), "--no-progress"]) == 0
    assert pd.read_csv(out)["pred"].isin(CLASSES).all()


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_onnx_file_from_another_bundle_is_refused(exported, tmp_path, backend):
    bundle = read_bundle(exported)
    bundle["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in bundle["state_dict"].items()}
    atomic_torch_save(bundle, tmp_path / "retrained.pt")
    with pytest.raises(BundleError, match="different bundle"):
        Predictor.from_bundle(tmp_path / "retrained.pt", backend=backend, onnx_path=exported / "best_model.onnx")


def test_missing_onnx_file_says_how_to_make_one(trained):
    with pytest.raises(BundleError, match="skain export"):
        Predictor.from_bundle(trained, backend="onnx")


def test_fast_precision_runs_the_graph_with_the_same_probabilities_and_features(trained, synth_root):
    """precision="fast" on CPU exports in memory and runs OpenVINO (installed with the dev extras); the OOD
    feature tap still sees backbone features."""
    frame, _ = prediction_table(synth_root / "dataset_test")
    frame = frame.head(12)
    ref = Predictor.from_bundle(trained)
    fast = Predictor.from_bundle(trained, precision="fast")
    assert fast.info["inference"]["backend"] == "openvino"
    diff = np.abs(ref.predict_frame(frame, progress=False)[P_COLS].to_numpy()
                  - fast.predict_frame(frame, progress=False)[P_COLS].to_numpy()).max()
    assert diff <= 1e-4, diff
    seen = {}
    for name, p in (("torch", ref), ("onnx", fast)):
        handle = p.model.backbone.register_forward_hook(lambda _m, _i, out, name=name: seen.setdefault(name, out))
        p.predict_one(frame["path"][0], 40, "male", "back")
        handle.remove()
    np.testing.assert_allclose(seen["onnx"].numpy(), seen["torch"].numpy(), atol=1e-4)


def test_fast_precision_falls_back_to_pytorch_when_the_runtime_cannot_start(trained, exported, synth_root,
                                                                          monkeypatch, caplog):
    """The web app serves "fast" by default: a runtime that fails to start (broken install, unsupported CPU)
    must give the reference answers and a warning, not a server that cannot start. Asked for by name, it fails."""
    from skain.inference import runners

    def broken(source):
        raise RuntimeError("compile_model failed")

    monkeypatch.setitem(runners.RUNTIMES, "openvino", broken)
    with caplog.at_level("WARNING", logger="skain.inference.predictor"):
        fast = Predictor.from_bundle(trained, precision="fast")
    assert (fast.backend, fast.precision, fast.info["inference"]["backend"]) == ("torch", "fp32", "torch")
    assert "could not start" in caplog.text and "compile_model failed" in caplog.text
    image = next((synth_root / "dataset_test" / "image").glob("*.jpg")).read_bytes()
    ref = Predictor.from_bundle(trained)
    assert fast.predict_one(image, 50, "male", "back").probabilities == ref.predict_one(
        image, 50, "male", "back").probabilities
    with pytest.raises(RuntimeError, match="compile_model failed"):
        Predictor.from_bundle(exported, backend="openvino")


def test_fast_precision_skips_openvino_under_a_preloaded_tcmalloc(monkeypatch):
    """OpenVINO aborts in compile_model under tcmalloc (skain.runtime_env): an abort no fallback can catch."""
    import torch
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert fast_choice(torch.device("cpu")) == ("onnx", "fp32")
    monkeypatch.setenv("LD_PRELOAD", "")
    assert fast_choice(torch.device("cpu")) == ("openvino", "fp32")


def test_the_graph_backends_see_the_same_pixel_spread_and_turn_flat_frames_away(trained):
    """The flat-frame floor reads the images where they enter the network: the backbone's input in PyTorch,
    OnnxModel.image_in for the exported graph."""
    from skain.trust.probes import probe_set
    probes = probe_set(seed=3)
    ref, fast = Predictor.from_bundle(trained), Predictor.from_bundle(trained, precision="fast")
    assert fast.info["inference"]["backend"] == "openvino" and fast.trust.min_spread is not None
    for image in probes["blank"][:3] + probes["text"][:2]:
        a, b = ref.predict_one(image), fast.predict_one(image)
        assert a.in_distribution is False and b.in_distribution is False
        assert b.ood_score == pytest.approx(a.ood_score, rel=1e-3)
