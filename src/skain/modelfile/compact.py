"""The OOD check's whitening matrices, stored compactly and exactly in portable files.

A Mahalanobis scorer state holds `means` (classes x D, already multiplied by the whitener) and `whitener` W
(D x D) with W W^T = inverse shared covariance; every score is ||x W - means||^2 per class. Any W Q with Q
orthogonal whitens as well, and with `means @ Q` scores the same. Choosing Q from W's polar decomposition makes
W Q = U diag(s) U^T symmetric (W = U diag(s) V^T, Q = V U^T), so a file needs only its upper triangle:
D(D+1)/2 numbers instead of D^2. The SVD of W is used rather than eigh(W W^T), which would square W's condition
number. Scorers fit since this module exists are symmetric already (`skain.trust.ood`); older ones are turned
round here when exported. (This lives in modelfile, not trust, because the portable writer needs it and the
layers let modelfile import nothing above it.)
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

SYMMETRY_RTOL = 1e-6  # max |W - W^T| / max |W| for a whitener to count as symmetric


def symmetric_whitener(means: np.ndarray, whitener: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(means @ Q, W @ Q) with Q orthogonal and W @ Q symmetric (exactly), in float64: the same scores."""
    w = np.asarray(whitener, dtype=np.float64)
    u, s, vt = np.linalg.svd(w)
    sym = (u * s) @ u.T
    sym = (sym + sym.T) / 2
    return np.asarray(means, dtype=np.float64) @ (vt.T @ u.T), sym


def is_symmetric(matrix: torch.Tensor | np.ndarray, rtol: float = SYMMETRY_RTOL) -> bool:
    """Square and floating, with max |A - A^T| <= rtol * max |A|. Whiteners the writer packs are exactly symmetric
    (fit makes them so, `symmetric_state` turns the rest), so the writer's tolerance is only a guard."""
    m = torch.as_tensor(np.asarray(matrix)) if isinstance(matrix, np.ndarray) else matrix
    if m.dim() != 2 or m.shape[0] != m.shape[1] or not m.is_floating_point():
        return False
    m = m.double()
    return bool((m - m.T).abs().max() <= rtol * m.abs().max()) if m.numel() else True


def symmetric_state(state: Any) -> Any:
    """An OOD scorer state (single, max of parts, ensemble; any nesting) with every whitener that is not exactly
    symmetric replaced by its symmetric form and its means turned with it; tensors keep their type and dtype."""
    if isinstance(state, list):
        return [symmetric_state(v) for v in state]
    if not isinstance(state, dict):
        return state
    out = {k: symmetric_state(v) for k, v in state.items()}
    pair = _pair(out)
    if pair is not None and not is_symmetric(pair[1], rtol=0.0):
        means, whitener = symmetric_whitener(_numpy(pair[0]), _numpy(pair[1]))
        out["means"], out["whitener"] = _like(means, pair[0]), _like(whitener, pair[1])
    return out


def pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """Square matrix -> its upper triangle, row by row (row i holds columns i..n-1), as one 1-D tensor."""
    n = matrix.shape[0]
    rows, cols = torch.triu_indices(n, n)
    return matrix[rows, cols].contiguous()


def unpack_upper(packed: torch.Tensor, n: int) -> torch.Tensor:
    """`pack_upper`'s 1-D tensor -> the full symmetric n x n matrix."""
    rows, cols = torch.triu_indices(n, n)
    full = torch.zeros((n, n), dtype=packed.dtype)
    full[rows, cols] = packed
    full[cols, rows] = packed
    return full


def packed_size(n: int) -> int:
    return n * (n + 1) // 2


Array = torch.Tensor | np.ndarray


def _pair(state: dict) -> tuple[Array, Array] | None:
    """(means, whitener) when `state` is a Mahalanobis scorer's: classes x D means and a D x D whitener."""
    means, whitener = state.get("means"), state.get("whitener")
    if not isinstance(means, (torch.Tensor, np.ndarray)) or not isinstance(whitener, (torch.Tensor, np.ndarray)):
        return None
    fits = whitener.ndim == 2 and means.ndim == 2 and whitener.shape[0] == whitener.shape[1] == means.shape[1]
    return (means, whitener) if fits else None


def _numpy(x: Array) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def _like(values: np.ndarray, original: Array) -> Array:
    if isinstance(original, torch.Tensor):
        return torch.from_numpy(values).to(original.dtype)
    return values.astype(original.dtype)
