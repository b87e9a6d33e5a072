"""The exported ONNX graph, run by ONNX Runtime or OpenVINO, behind the same call signature as the PyTorch
network, so `engine.predict_logits` (and with it TTA, batching and error handling) is shared by all backends."""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from skain.modelfile.bundle import BundleError
from skain.modelfile.onnx import INPUTS, bundle_fingerprint, read_fingerprint

log = logging.getLogger(__name__)


def make_session(model: str | Path | bytes, threads: int | None = None):
    """A CPU session using as many intra-op threads as PyTorch (the CPU budget the user set)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BundleError("the ONNX backend needs onnxruntime: pip install 'skain[onnx]'") from exc
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads would otherwise spin after each run and starve the PyTorch pre/post-processing that
    # shares these cores (single-image latency 60 -> see benchmarks/speed/infer_speed.py).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def feed_for(input_names: Sequence[str], inputs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """(image, age, sex, site) -> the graph's inputs by name; graphs of image-only models declare only `image`."""
    return {n: t.detach().cpu().contiguous().numpy() for n, t in zip(INPUTS, inputs) if n in input_names}


class OrtSession:
    """The ONNX graph in ONNX Runtime (see `make_session`)."""

    def __init__(self, source: str | Path | bytes, threads: int | None = None):
        self.session = make_session(source, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feed)


class OpenVinoSession:
    """The ONNX graph compiled by OpenVINO for the CPU in fp32 (OpenVINO would otherwise pick bf16 on CPUs that
    have it, which moves probabilities; see benchmarks/speed/infer_speed.py). One infer request per thread, because
    the web server calls from several."""

    def __init__(self, source: str | Path | bytes, threads: int | None = None):
        try:
            import openvino as ov
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise BundleError("the OpenVINO backend needs openvino: pip install 'skain[openvino]'") from exc
        core = ov.Core()
        model = (core.read_model(source, ov.Tensor(np.empty(0, np.uint8))) if isinstance(source, bytes)
                 else core.read_model(str(source)))
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            # Pinned OpenVINO threads fight PyTorch's for the same cores: single-image latency 52 -> 25 ms
            # without pinning on 2 cores (benchmarks/speed/infer_speed.py).
            "ENABLE_CPU_PINNING": False})
        self.inputs = [i.get_any_name() for i in self.compiled.inputs]
        self._local = threading.local()

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer(feed)
        return [np.array(result[out]) for out in self.compiled.outputs]  # copies: the request reuses its buffers


RUNTIMES: dict[str, type[OrtSession] | type[OpenVinoSession]] = {"onnxruntime": OrtSession, "openvino": OpenVinoSession}


class OnnxModel(nn.Module):
    """An exported skAIn network, checked against the bundle it is used with, run by ONNX Runtime or OpenVINO.

    `backbone` is an identity the graph's feature output passes through, so forward hooks on it (the OOD
    scorer's feature tap) see exactly what they see on the PyTorch network.
    """

    def __init__(self, source: str | Path | bytes, bundle: dict, runtime: str = "onnxruntime"):
        super().__init__()
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise BundleError(f"no ONNX model at {source}; write one with `skain export --model <bundle>`")
        if read_fingerprint(source) != bundle_fingerprint(bundle):
            raise BundleError(f"{source if not isinstance(source, bytes) else 'the ONNX graph'} was exported from "
                              "a different bundle (weights changed since); run `skain export` again")
        self.session = RUNTIMES[runtime](source)
        self.image_in = nn.Identity()  # where the images enter, for the OOD tap's flat-frame check
        self.backbone = nn.Identity()

    def forward(self, image: torch.Tensor, age: torch.Tensor, sex: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        image = self.image_in(image)
        outputs = self.session.run(feed_for(self.session.inputs, (image.float(), age, sex, site)))
        if len(outputs) > 1:
            self.backbone(torch.from_numpy(outputs[1]))
        return torch.from_numpy(outputs[0])
