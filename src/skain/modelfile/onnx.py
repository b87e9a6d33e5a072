"""The ONNX contract between `skain export` and the runners that load its graphs: input and output names,
the opset, and the fingerprint that ties a graph to the exact bundle it was exported from (so a Predictor
never pairs an ONNX file with a different, retrained bundle).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

INPUTS = ("image", "age", "sex", "site")
OUTPUTS = ("logits", "features")
OPSET = 17
FINGERPRINT_KEY = "skain_bundle_fingerprint"


def bundle_fingerprint(bundle: dict) -> str:
    """sha256 over the model description and every weight tensor, independent of file layout."""
    h = hashlib.sha256(json.dumps([bundle["model_args"], bundle["preprocess"], bundle["classes"]],
                                  sort_keys=True).encode())
    for name in sorted(bundle["state_dict"]):
        tensor = bundle["state_dict"][name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_fingerprint(source: str | Path | bytes) -> str | None:
    import onnx
    proto = (onnx.load_from_string(source) if isinstance(source, bytes)
             else onnx.load(str(source), load_external_data=False))
    return next((p.value for p in proto.metadata_props if p.key == FINGERPRINT_KEY), None)
