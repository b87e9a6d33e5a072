"""ONNX Runtime behind the same call signature as the PyTorch network, so `engine.predict_logits` (and with it
TTA, batching and error handling) is shared by both backends."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .bundle import BundleError

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
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def run_session(session, inputs: Sequence[torch.Tensor]) -> np.ndarray:
    """Feed (image, age, sex, site) by name -> logits; graphs of image-only models declare only `image`."""
    return run_all(session, inputs)[0]


def run_all(session, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    names = ("image", "age", "sex", "site")
    wanted = {i.name for i in session.get_inputs()}
    feed = {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, inputs) if n in wanted}
    return session.run(None, feed)


class OnnxModel(nn.Module):
    """An exported skAIn network, checked against the bundle it is used with.

    `backbone` is an identity the graph's feature output passes through, so forward hooks on it (the OOD
    scorer's feature tap) see exactly what they see on the PyTorch network.
    """

    def __init__(self, source: str | Path | bytes, bundle: dict):
        super().__init__()
        from .export import FINGERPRINT_KEY, bundle_fingerprint
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise BundleError(f"no ONNX model at {source}; write one with `skain export --model <bundle>`")
        self.session = make_session(source)
        stored = self.session.get_modelmeta().custom_metadata_map.get(FINGERPRINT_KEY)
        if stored != bundle_fingerprint(bundle):
            raise BundleError(f"{source if not isinstance(source, bytes) else 'the ONNX graph'} was exported from "
                              "a different bundle (weights changed since); run `skain export` again")
        self.backbone = nn.Identity()

    def forward(self, image: torch.Tensor, age: torch.Tensor, sex: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        outputs = run_all(self.session, (image.float(), age, sex, site))
        if len(outputs) > 1:
            self.backbone(torch.from_numpy(outputs[1]))
        return torch.from_numpy(outputs[0])
