"""Reduced- vs full-precision parity: the check that guards `skain export --format safetensors --dtype float16`.

It runs both models through the normal Predictor path on real images, so it sits above inference.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from skain.data.layout import Source, load_table
from skain.inference.predictor import Predictor
from skain.modelfile.load import read_bundle, resolve_path
from skain.modelfile.portable import SUFFIX, export_portable, reload

log = logging.getLogger(__name__)

# the bar for reduced-precision storage, on real images through the normal Predictor path
MIN_AGREEMENT, MAX_PROB_DIFF, PARITY_IMAGES = 0.995, 0.02, 500


class ParityError(ValueError):
    """The reduced-precision model disagrees with the full one by more than the bar allows."""


@dataclass
class Parity:
    """Reduced- vs full-precision predictions on the same images through the normal Predictor path."""

    images: int
    top1_agreement: float
    max_prob_diff: float
    ood_agreement: float | None
    dtype: str

    @property
    def passed(self) -> bool:
        return self.top1_agreement >= MIN_AGREEMENT and self.max_prob_diff <= MAX_PROB_DIFF

    def line(self) -> str:
        ood = f", OOD verdict agreement {self.ood_agreement:.2%}" if self.ood_agreement is not None else ""
        return (f"{self.dtype} vs float32 on {self.images} image(s): top-1 agreement {self.top1_agreement:.2%} "
                f"(bar >= {MIN_AGREEMENT:.1%}), max probability difference {self.max_prob_diff:.4f} "
                f"(bar <= {MAX_PROB_DIFF}){ood}")


def parity_frame(images: str | Path | None, csv: str | Path | None, n: int = PARITY_IMAGES, seed: int = 0):
    """Up to `n` readable images (a seeded sample) from a folder, with metadata when a CSV is given."""
    if images is not None:
        folder = Path(images)
    elif csv is not None:
        folder = Path(csv).resolve().parent
    else:
        raise ValueError("the parity check needs images: pass --check-images DIR (and --check-csv FILE for metadata)")
    frame = load_table(Source(Path(csv) if csv else None, [folder], "explicit"), require=("image_id",),
                       skip_missing=True)
    return frame.sample(n, random_state=seed) if len(frame) > n else frame


def check_parity(full: dict, reduced: dict, frame, dtype: str, batch_size: int = 32) -> Parity:
    runs = [Predictor(b, device="cpu").predict_frame(frame, batch_size, progress=False) for b in (full, reduced)]
    ok = (runs[0]["error"] == "").to_numpy() & (runs[1]["error"] == "").to_numpy()
    if not ok.any():
        raise ParityError("the parity check found no readable image")
    cols = [c for c in runs[0] if c.startswith("p_") and c != "p_malignant"]
    a, b = (r.loc[ok, cols].to_numpy(dtype=np.float64) for r in runs)
    ood = None
    if runs[0]["ood"].notna().all():
        ood = float((runs[0].loc[ok, "ood"].to_numpy() == runs[1].loc[ok, "ood"].to_numpy()).mean())
    return Parity(int(ok.sum()), float((a.argmax(1) == b.argmax(1)).mean()), float(np.abs(a - b).max()), ood, dtype)


def export_checked(model: str | Path, output: str | Path | None = None, dtype: str = "float16",
                   images: str | Path | None = None, csv: str | Path | None = None,
                   n: int = PARITY_IMAGES) -> tuple[Path, Parity | None]:
    """`skain export --format safetensors`: bundle -> .safetensors; with images, a reduced-precision file is
    written only when it matches the full-precision model within the bar (else ParityError, nothing written)."""
    source = resolve_path(model)
    out = Path(output) if output else source.with_suffix(SUFFIX)
    if out.resolve() == source.resolve():
        raise ValueError(f"--output {out} is the model being exported; choose another file")
    full = read_bundle(source)
    parity = None
    if images is not None or csv is not None:
        parity = check_parity(full, reload(full, dtype), parity_frame(images, csv, n), dtype)
        log.info("parity: %s", parity.line())
        if not parity.passed:
            raise ParityError(f"not written: {parity.line()}; export with --dtype float32 instead")
        if parity.images < PARITY_IMAGES:
            log.warning("parity checked on %d image(s); the bar asks for at least %d", parity.images, PARITY_IMAGES)
    extra = {"parity": asdict(parity)} if parity else {}
    return export_portable(full, out, dtype, extra), parity
