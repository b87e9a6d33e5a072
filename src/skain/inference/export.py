"""`skain export`: the bundle's network as an ONNX graph (image + metadata inputs, dynamic batch).

The graph is written beside the bundle (`best_model.pt` -> `best_model.onnx`) and carries a fingerprint of the
bundle's weights, so a Predictor never pairs an ONNX file with a different (retrained) bundle. Preprocessing
and the metadata encoder stay in the bundle: the ONNX file replaces only the network.
"""
from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import cast

import numpy as np
import torch

from skain.data.encoder import MetadataEncoder
from skain.fileio import atomic_write
from skain.inference.runners import OrtSession, feed_for
from skain.modelfile.bundle import load_model
from skain.modelfile.load import read_bundle, resolve_path
from skain.modelfile.onnx import (
    FINGERPRINT_KEY,
    INPUTS,
    OPSET,
    OUTPUTS,
    bundle_fingerprint,
    read_fingerprint,
)

log = logging.getLogger(__name__)



def example_inputs(bundle: dict, batch: int = 2) -> tuple[torch.Tensor, ...]:
    size = bundle["preprocess"]["input_size"]
    gen = torch.Generator().manual_seed(0)
    n_sex, n_site = len(bundle["encoder"]["sex_vocab"]), len(bundle["encoder"]["site_vocab"])
    age_width = MetadataEncoder.from_state(bundle["encoder"]).age_width
    return (torch.randn(batch, 3, size, size, generator=gen), torch.randn(batch, age_width, generator=gen),
            torch.randint(0, n_sex, (batch,), generator=gen), torch.randint(0, n_site, (batch,), generator=gen))


def export_onnx(model: str | Path, output: str | Path | None = None, opset: int = OPSET,
                check: bool = True) -> Path:
    """Bundle (folder or .pt) -> ONNX file; returns its path. With `check`, ONNX Runtime must reproduce
    PyTorch's probabilities within 1e-4 on random inputs before the file is written."""
    bundle_path = resolve_path(model)
    bundle = read_bundle(bundle_path)
    out = Path(output) if output else bundle_path.with_suffix(".onnx")
    graph = export_bytes(bundle, opset)
    if check:
        _check_parity(graph, bundle)
    atomic_write(out, lambda fh: fh.write(graph))
    log.info("wrote %s (%.1f MB, opset %d)", out, len(graph) / 1e6, opset)
    return out


def replace_if_stale(bundle: dict, path: str | Path) -> Path | bytes:
    """`path` if it was exported from `bundle`; else re-export over it (with a warning), or, where the folder
    cannot be written, return the fresh graph's bytes to run from memory. For `--precision fast`, which asks
    for the fastest path, not for a particular file: a leftover export from an earlier run is not an error."""
    path = Path(path)
    try:
        if read_fingerprint(path) == bundle_fingerprint(bundle):
            return path
    except Exception as exc:  # noqa: BLE001 - an unreadable file is as stale as an old one
        log.debug("cannot read %s: %s", path, exc)
    log.warning("%s was exported from a different bundle (an earlier run?); exporting this bundle again", path)
    graph = export_bytes(bundle)
    _check_parity(graph, bundle)
    try:
        atomic_write(path, lambda fh: fh.write(graph))
    except OSError as exc:
        log.warning("cannot replace %s (%s); using the fresh export from memory", path, exc)
        return graph
    return path


class _WithFeatures(torch.nn.Module):
    """The network plus its backbone's pooled features as a second output (what the OOD scorer reads),
    taken with a forward hook so nothing of SkainNet.forward is written twice."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, age: torch.Tensor, sex: torch.Tensor,
                site: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        backbone = cast(torch.nn.Module, self.net.backbone)  # SkainNet / EnsembleNet: an nn.Module
        handle = backbone.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            logits = self.net(image, age, sex, site)
        finally:
            handle.remove()
        return logits, seen[0]


def export_bytes(bundle: dict, opset: int = OPSET) -> bytes:
    """Bundle -> serialized ONNX graph (outputs: logits, features). TorchScript-based exporter: the
    torch.export one needs onnxscript, which is not a dependency."""
    import onnx
    net = _WithFeatures(load_model(bundle)).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the ignore: torch annotates f as a path, but the TorchScript exporter (dynamo=False) writes to a BytesIO too
        torch.onnx.export(net, example_inputs(bundle), buf, input_names=list(INPUTS),  # type: ignore[arg-type]
                          output_names=list(OUTPUTS), opset_version=opset, dynamo=False,
                          dynamic_axes={k: {0: "batch"} for k in (*INPUTS, *OUTPUTS)})
    proto = onnx.load_from_string(buf.getvalue())
    meta = {FINGERPRINT_KEY: bundle_fingerprint(bundle), "skain_classes": json.dumps(bundle["classes"]),
            "skain_backbone": bundle["model_args"]["backbone"]}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def _check_parity(graph: bytes, bundle: dict, atol: float = 1e-4) -> None:
    inputs = example_inputs(bundle, batch=3)
    with torch.no_grad():
        ref = load_model(bundle)(*inputs).softmax(1).numpy()
    session = OrtSession(graph)
    got = torch.from_numpy(session.run(feed_for(session.inputs, inputs))[0]).softmax(1).numpy()
    diff = float(np.abs(ref - got).max())
    if diff > atol:
        raise RuntimeError(f"ONNX export does not reproduce PyTorch: max probability difference {diff:.2e} > {atol}")
    log.info("ONNX Runtime matches PyTorch (max probability difference %.1e)", diff)
