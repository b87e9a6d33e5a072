"""The Python API: `skain.load()` -> `Model`; `Model.predict(...)` -> `Result`; `Model.predict_many(...)` -> a table.

    import skain
    model = skain.load()                                    # outputs/ if trained there, else the shipped model
    result = model.predict("lesion.jpg", age=55, sex="male", site="back")
    table = model.predict_many("photos/")                   # skain predict's columns

A thin layer over `skain.inference.predictor.Predictor`, the one inference path that `skain predict` and the web
app use: `predict` is `Predictor.predict_one` (what `POST /api/predict` runs), `predict_many` is
`Predictor.predict_frame` (what `skain predict` runs), heatmaps are `skain.inference.explain.GradCam` as on the
page, and the model id is `skain.modelfile.load.model_id` (the web app's). So the same image and fields give the
same numbers through all three doors.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skain.data.images import ImageError
from skain.data.schema import clean_metadata, parse_age, parse_choice
from skain.inference.explain import Explanation, GradCam
from skain.inference.predictor import Predictor, prediction_table
from skain.modelfile.load import ModelChoice, choose_model, model_id

__all__ = ["Model", "Result", "load"]

ImageInput = Any  # str | Path | bytes | PIL.Image.Image | np.ndarray (HxWx3 uint8)


@dataclass(frozen=True)
class Result:
    """One image's answer. `diagnosis` is the class the model's decision rule names (its prior-adjusted rule
    where it has one, else the arg-max); `scores` are the decision rule's scores (their arg-max is the diagnosis;
    not probabilities), None for an arg-max model. `in_distribution` False means the image does not look like a
    dermoscopic image (the web page then shows no diagnosis); None when the model has no such check."""

    diagnosis: str
    probability: float                     # calibrated probability of the diagnosis
    probabilities: dict[str, float]        # calibrated probability per class
    scores: dict[str, float] | None        # the decision rule's scores; None for an arg-max model
    p_malignant: float | None              # P(mel) + P(bcc) + P(akiec), calibrated
    triage: str | None                     # "investigate further" / "routine"; None without a threshold
    in_distribution: bool | None           # False: "this does not look like a dermoscopic image"
    ood_score: float | None                # > 1.0: farther from the training lesions than the threshold
    model_id: str                          # first 12 hex digits of the model file's SHA-256 (as GET /api/health)
    inputs: dict[str, Any] = field(default_factory=dict)  # age, sex, site as the model read them
    heatmap: Explanation | None = None     # Grad-CAM for the diagnosis (predict(..., heatmap=True))


class Model:
    """A loaded model (`skain.load`). `predictor` is the underlying `Predictor`; `info` what the model says
    about itself (backbone, classes, vocabularies, metrics, trust figures, model card)."""

    def __init__(self, predictor: Predictor, model_id: str, source: ModelChoice | None = None):
        self.predictor = predictor
        self.model_id = model_id
        self.source = source
        self._explainer: GradCam | None = None

    def __repr__(self) -> str:
        where = self.source.path.name if self.source else "in memory"
        return f"<skain.Model {self.model_id} ({where}, {self.info['backbone']}, {len(self.classes)} classes)>"

    @property
    def classes(self) -> list[str]:
        return list(self.predictor.classes)

    @property
    def info(self) -> dict:
        return self.predictor.info

    @property
    def vocabularies(self) -> dict[str, list[str]]:
        """The sex and site (localization) values this model knows; anything else is refused."""
        return self.predictor.info["vocabularies"]

    # ------------------------------------------------------------------ one image
    def predict(self, image: ImageInput, age: float | None = None, sex: str | None = None, site: str | None = None,
                heatmap: bool = False) -> Result:
        """One image (a path, bytes, a PIL image or an HxWx3 uint8 array) and optional age (years), sex and
        body site -> Result. Unknown fields may be left out: the model was trained with blanks."""
        data = image_source(image)
        vocab = self.vocabularies
        years = parse_age(age)
        sex, site = parse_choice("sex", sex, vocab["sex"]), parse_choice("site", site, vocab["localization"])
        inputs = {"age": years, "sex": sex, "site": site}
        pred = self.predictor.predict_one(data, years, sex, site)
        probs = np.array([pred.probabilities[c] for c in self.classes])
        decide = self.predictor.decide
        scores = dict(zip(self.classes, map(float, decide.scores(probs[None])[0]))) if decide.adjusted else None
        explanation = self._explain(data, inputs, pred.diagnosis) if heatmap else None
        return Result(pred.diagnosis, pred.probability, dict(pred.probabilities), scores, pred.p_malignant,
                      pred.triage, pred.in_distribution, pred.ood_score, self.model_id, inputs, explanation)

    def _explain(self, image: bytes | str, inputs: dict, target: str) -> Explanation:
        if self._explainer is None:
            p = self.predictor
            torch_side = p if p.backend == "torch" else Predictor(p.bundle, device=p.device.type)  # as the web app
            self._explainer = GradCam(torch_side)
        return self._explainer(image, inputs["age"], inputs["sex"], inputs["site"], target=target)

    # ------------------------------------------------------------------ many images
    def predict_many(self, images: str | Path | Sequence[str | Path] | pd.DataFrame, batch_size: int = 32,
                     num_workers: int = 0, progress: bool = False) -> pd.DataFrame:
        """A folder (any layout `skain predict --data` reads), a list of image paths, or a DataFrame with a
        `path` column and optional image_id, age, sex, localization (or site) -> one row per image with the
        columns of `skain predict`'s CSV (image_id, pred, prob, p_<class>, ..., error)."""
        frame = self._frame(images)
        return self.predictor.predict_frame(frame, batch_size, num_workers, None, progress)

    def _frame(self, images: str | Path | Sequence[str | Path] | pd.DataFrame) -> pd.DataFrame:
        if isinstance(images, (str, Path)):
            path = Path(images)
            if path.is_dir():
                return prediction_table(path)[0]
            images = [path]
        if isinstance(images, pd.DataFrame):
            raw = images.rename(columns={"site": "localization"}) if "site" in images else images
            if "path" not in raw:
                raise ValueError(f"the DataFrame needs a 'path' column with the image files (found "
                                 f"{', '.join(map(str, raw.columns)) or 'no columns'})")
        elif isinstance(images, Sequence) and not isinstance(images, (bytes, bytearray)):
            raw = pd.DataFrame({"path": [str(p) for p in images]})
        else:
            raise TypeError(f"predict_many takes a folder, a list of image paths or a DataFrame, not "
                            f"{type(images).__name__} (one image: Model.predict)")
        if raw.empty:
            raise ValueError("no images to predict")
        paths = [Path(str(p)) for p in raw["path"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image file(s) not found: {', '.join(missing[:3])}"
                                    + (", ..." if len(missing) > 3 else ""))
        raw = raw.assign(image_id=raw["image_id"] if "image_id" in raw else [p.stem for p in paths])
        text = {c: [("" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)) for v in raw[c]]
                for c in ("image_id", "age", "sex", "localization") if c in raw}  # as CSV cells: missing = empty
        frame = clean_metadata(pd.DataFrame(text), "DataFrame", require=("image_id",), warn_absent=False)
        return frame.assign(path=[str(p) for p in paths])


def load(model: str | Path | None = None, device: str = "auto", precision: str = "fp32", tta: int | None = None,
         backend: str = "torch") -> Model:
    """A model, chosen as every `--model` flag chooses: None -> outputs/ if a model was trained there, else the
    HAM10000 model shipped with skAIn; or a run folder, a .pt / .safetensors file, a Hugging Face-style folder
    (`skain export --format hf`) or `hf://org/name[@revision]` (downloaded into the Hugging Face cache)."""
    choice = choose_model(model)
    predictor = Predictor.from_bundle(choice, device=device, precision=precision, tta=tta, backend=backend)
    return Model(predictor, model_id(choice.path), choice)


# ------------------------------------------------------------------------------------------- inputs
def image_source(image: ImageInput) -> bytes | str:
    """A path (must exist), bytes, a PIL image or an HxWx3 (or HxW) uint8 array -> what Predictor decodes.
    Images in memory are handed over as PNG (lossless), so they decode to exactly their own pixels."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"image not found: {path}")
        if not path.is_file():
            raise ImageError(f"{path}: not a file (predict_many takes a folder)")
        return str(path)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    from PIL import Image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"an image array must be HxWx3 (RGB) or HxW uint8, got shape {image.shape} "
                             f"dtype {image.dtype}")
        image = Image.fromarray(np.ascontiguousarray(image))
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"an image is a file path, bytes, a PIL image or a numpy array, not {type(image).__name__}")
