"""The OOD whiteners in portable files: symmetric (same scores) and stored as their packed upper triangle."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from skain.modelfile import portable
from skain.modelfile.bundle import FORMAT, FORMAT_VERSION, BundleError
from skain.modelfile.compact import pack_upper, symmetric_state, symmetric_whitener, unpack_upper
from skain.modelfile.portable import META_KEY, export_portable, read_portable
from skain.trust.ood import EnsembleScorer, MahalanobisScorer, MaxScorer, scorer_from_state

D, CLASSES = 48, 4


def draw(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Features with very different scales per column (a badly conditioned covariance) and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    centres = np.random.default_rng(99).normal(size=(CLASSES, D)) * 2
    scale = np.geomspace(0.05, 5.0, D)
    return (centres[labels] + rng.normal(size=(n, D)) + shift) * scale, labels


def old_style_fit(features: np.ndarray, labels: np.ndarray, normalize: bool) -> MahalanobisScorer:
    """MahalanobisScorer.fit as it was before the symmetric form: W = V diag(1/sqrt(lambda)), not symmetric."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True) if normalize else features
    means = np.stack([x[labels == c].mean(0) for c in range(CLASSES)])
    cov = LedoitWolf(assume_centered=True).fit(x - means[labels]).covariance_
    vals, vecs = np.linalg.eigh(cov)
    whitener = vecs / np.sqrt(np.maximum(vals, vals.max() * 1e-6))
    return MahalanobisScorer(means @ whitener, whitener, normalize)


def float64_state(scorer: MahalanobisScorer) -> dict:
    return {**scorer.state_dict(), "means": scorer.means.copy(), "whitener": scorer.whitener.copy()}


def old_max_state() -> dict:
    train, labels = draw(800, 0)
    parts = [old_style_fit(train, labels, normalize) for normalize in (True, False)]
    return MaxScorer(parts, [0.7, 1.3]).state_dict()


def old_ensemble_state() -> dict:
    return EnsembleScorer([scorer_from_state(old_max_state()), scorer_from_state(old_max_state())],
                          [D, D], [1.1, 0.9]).state_dict()


def tiny_bundle(ood: dict) -> dict:
    """The least bundle check_bundle accepts, with an OOD scorer state in its trust block."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "skain_version": "test",
            "model_args": {"backbone": "efficientnet_b0", "num_classes": CLASSES, "image_only": True},
            "preprocess": {}, "encoder": {"sex_vocab": [], "site_vocab": []}, "classes": list("abcd"),
            "metrics": {}, "state_dict": {"head.0.weight": torch.randn(CLASSES, 8)},
            "trust": {"temperature": 1.2, "ood": {**ood, "threshold": 1.05}}}


def probes(width: int) -> np.ndarray:
    """Held-out lesions, shifted ones, blank, a huge and a tiny vector: in- and out-of-distribution."""
    held, _ = draw(200, 7)
    shifted, _ = draw(50, 8, shift=3.0)
    rng = np.random.default_rng(3)
    odd = np.stack([np.zeros(D) + 1e-3, rng.normal(size=D) * 100, rng.normal(size=D) * 1e-3])
    x = np.vstack([held, shifted, odd])
    return np.hstack([x] * (width // D))


def scores(state: dict) -> np.ndarray:
    scorer = scorer_from_state(state)
    width = sum(state["widths"]) if "widths" in state else D
    return scorer.score(probes(width))


def whiteners(state) -> list:
    if isinstance(state, list):
        return [w for v in state for w in whiteners(v)]
    if not isinstance(state, dict):
        return []
    own = [state["whitener"]] if "whitener" in state else []
    return own + [w for v in state.values() for w in whiteners(v)]


def refs(doc) -> list[dict]:
    """Every tensor placeholder in a file's JSON document."""
    if isinstance(doc, list):
        return [r for v in doc for r in refs(v)]
    if not isinstance(doc, dict):
        return []
    return [doc] if "__tensor__" in doc else [r for v in doc.values() for r in refs(v)]


def header(path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def export_unpacked(bundle: dict, path, dtype: str, monkeypatch) -> None:
    """A file in the layout written before packing: whiteners full, as they are, with no marker."""
    with monkeypatch.context() as patch:
        patch.setattr(portable, "symmetric_state", lambda state: state)
        patch.setattr(portable, "is_symmetric", lambda matrix: False)
        export_portable(bundle, path, dtype)


# ------------------------------------------------------------------------------------------- the symmetric form
@pytest.mark.parametrize("normalize", [True, False])
def test_fit_whitener_is_symmetric_and_scores_as_the_old_asymmetric_one(normalize):
    train, labels = draw(800, 0)
    new, old = MahalanobisScorer.fit(train, labels, normalize), old_style_fit(train, labels, normalize)
    assert np.array_equal(new.whitener, new.whitener.T)
    np.testing.assert_allclose(new.whitener @ new.whitener.T, old.whitener @ old.whitener.T, rtol=1e-8,
                               atol=1e-10 * np.abs(old.whitener @ old.whitener.T).max())
    np.testing.assert_allclose(new.score(probes(D)), old.score(probes(D)), rtol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_symmetric_conversion_of_an_old_state_keeps_every_score(normalize):
    train, labels = draw(800, 0)
    old = float64_state(old_style_fit(train, labels, normalize))
    assert not np.allclose(old["whitener"], old["whitener"].T)
    new = symmetric_state(old)
    assert new["whitener"].dtype == np.float64 and np.array_equal(new["whitener"], new["whitener"].T)
    np.testing.assert_allclose(scores(new), scores(old), rtol=1e-6)
    fitted = MahalanobisScorer.fit(train, labels, normalize)  # the same symmetric matrix fit makes
    np.testing.assert_allclose(new["whitener"], fitted.whitener, atol=1e-8 * np.abs(fitted.whitener).max())


def test_conversion_handles_any_whitener_not_only_eigenvector_columns():
    train, labels = draw(800, 0)
    fitted = MahalanobisScorer.fit(train, labels, normalize=False)
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(D, D)))  # a random rotation of a valid whitener
    means, sym = symmetric_whitener(fitted.means @ q, fitted.whitener @ q)
    np.testing.assert_allclose(sym, fitted.whitener, atol=1e-9 * np.abs(fitted.whitener).max())
    np.testing.assert_allclose(means, fitted.means, atol=1e-9 * np.abs(fitted.means).max())


def test_conversion_reaches_every_part_of_an_ensemble_and_leaves_symmetric_ones_alone():
    old = old_ensemble_state()
    new = symmetric_state(old)
    assert len(whiteners(new)) == 4 and all(torch.equal(w, w.T) for w in whiteners(new))
    assert all(w.dtype == torch.float32 for w in whiteners(new))
    np.testing.assert_allclose(scores(new), scores(old), rtol=1e-5)  # float32 states
    again = symmetric_state(new)
    assert all(a is b for a, b in zip(whiteners(again), whiteners(new)))  # nothing to do: not recomputed


# ------------------------------------------------------------------------------------------- packed files
def test_pack_and_unpack_are_inverse():
    m = torch.randn(6, 6, dtype=torch.float64)
    m = m + m.T
    packed = pack_upper(m)
    assert packed.shape == (21,) and packed[:6].tolist() == m[0].tolist()  # row 0 first, all its columns
    assert torch.equal(unpack_upper(packed, 6), m)


@pytest.mark.parametrize("make", [old_max_state, old_ensemble_state], ids=["max", "ensemble"])
def test_float32_round_trip_packs_every_whitener_and_keeps_the_scores(make, tmp_path):
    bundle = tiny_bundle(make())
    path = export_portable(bundle, tmp_path / "m.safetensors", "float32")
    head = header(path)
    packed = [k for k in head if k.endswith(".whitener")]
    assert len(packed) == len(whiteners(bundle["trust"]["ood"]))
    assert all(head[k]["shape"] == [D * (D + 1) // 2] and head[k]["dtype"] == "F32" for k in packed)
    doc = json.loads(head["__metadata__"][META_KEY])
    marked = [r for r in refs(doc) if "packed" in r]
    assert sorted(r["__tensor__"] for r in marked) == sorted(packed)
    assert all(r["packed"] == "upper" and r["n"] == D for r in marked)
    back = read_portable(path)
    assert all(w.shape == (D, D) and torch.equal(w, w.T) for w in whiteners(back["trust"]["ood"]))
    # same scores as the asymmetric float32 state written: the file stores the same scorer, turned round
    np.testing.assert_allclose(scores(back["trust"]["ood"]), scores(bundle["trust"]["ood"]), rtol=1e-5)
    assert torch.equal(bundle["state_dict"]["head.0.weight"], back["state_dict"]["head.0.weight"])


def test_a_symmetric_state_round_trips_bit_for_bit_in_float32(tmp_path):
    train, labels = draw(800, 0)
    state = MaxScorer.fit(train, labels, draw(200, 1)[0], 0.05).state_dict()
    back = read_portable(export_portable(tiny_bundle(state), tmp_path / "m.safetensors", "float32"))["trust"]["ood"]
    assert all(torch.equal(a, b) for a, b in zip(whiteners(back), whiteners(state)))
    assert np.array_equal(scores(back), scores(state))


@pytest.mark.parametrize("make", [old_max_state, old_ensemble_state], ids=["max", "ensemble"])
def test_float16_packs_the_triangle_in_half_precision_within_tolerance(make, tmp_path):
    bundle = tiny_bundle(make())
    path = export_portable(bundle, tmp_path / "h.safetensors", "float16")
    head = header(path)
    assert all(head[k]["dtype"] == "F16" and len(head[k]["shape"]) == 1 for k in head if k.endswith(".whitener"))
    back = read_portable(path)
    assert all(w.dtype == torch.float32 for w in whiteners(back["trust"]["ood"]))  # upcast on load
    np.testing.assert_allclose(scores(back["trust"]["ood"]), scores(bundle["trust"]["ood"]), rtol=5e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_file_written_before_packing_still_loads_unchanged(dtype, tmp_path, monkeypatch):
    bundle = tiny_bundle(old_ensemble_state())
    path = tmp_path / "old.safetensors"
    export_unpacked(bundle, path, dtype, monkeypatch)
    head = header(path)
    assert "packed" not in head["__metadata__"][META_KEY]
    assert all(head[k]["shape"] == [D, D] for k in head if k.endswith(".whitener"))
    back = read_portable(path)["trust"]["ood"]
    written = whiteners(bundle["trust"]["ood"])
    assert all(torch.equal(a, b.to(getattr(torch, dtype)).float()) for a, b in zip(whiteners(back), written))
    np.testing.assert_allclose(scores(back), scores(bundle["trust"]["ood"]), rtol=1e-6 if dtype == "float32" else 5e-3)


@pytest.mark.parametrize("dtype, width", [("float32", 4), ("float16", 2)])
def test_packing_saves_the_lower_triangle_of_every_whitener(dtype, width, tmp_path, monkeypatch):
    bundle = tiny_bundle(old_ensemble_state())
    full = tmp_path / "full.safetensors"
    export_unpacked(bundle, full, dtype, monkeypatch)
    packed = export_portable(bundle, tmp_path / "packed.safetensors", dtype)
    expected = 4 * width * D * (D - 1) // 2  # four whiteners, each losing its D(D-1)/2 entries below the diagonal
    saved = full.stat().st_size - packed.stat().st_size
    assert expected - 1024 <= saved <= expected  # the markers lengthen the JSON header a little


@pytest.mark.parametrize("marker, words", [({"packed": "lower", "n": D}, "unknown packing"),
                                           ({"packed": "upper", "n": D + 1}, "upper triangle"),
                                           ({"packed": "upper", "n": "48"}, "unknown packing")])
def test_a_malformed_packing_marker_is_refused_with_the_reason(marker, words, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save
    path = export_portable(tiny_bundle(old_max_state()), tmp_path / "m.safetensors", "float32")
    with safe_open(str(path), "pt") as fh:
        tensors, meta = {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()
    doc = json.loads(meta[META_KEY])
    doc["trust"]["ood"]["parts"][1]["whitener"].update(marker)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(save(tensors, metadata={**meta, META_KEY: json.dumps(doc)}))
    with pytest.raises(BundleError, match=words):
        read_portable(bad)
