"""A torch Dataset over a validated frame: image through the shared path, encoded metadata, label."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from skain.data.encoder import MetadataEncoder
from skain.data.images import ImageError, ImageLoader
from skain.data.schema import CLASSES

if TYPE_CHECKING:
    from skain.data.degrade import ResavedLoader


class LesionDataset(Dataset):
    """Items are dicts: image, age, sex, site, label (-1 when unknown), index; with a transform that returns pairs
    (`transforms.PairedAugment`) also `resaved`, the same view of a re-saved copy.

    With `on_error="skip"` an unreadable image yields a zero image and `ok=False` so batch prediction can
    report it by name and go on; training uses "raise".
    """

    def __init__(self, frame: pd.DataFrame, encoder: MetadataEncoder, loader: ImageLoader | ResavedLoader,
                 transform: Callable[[np.ndarray], torch.Tensor], on_error: str = "raise",
                 meta_dropout: Callable | None = None):
        self.paths = frame["path"].tolist()
        self.age, self.sex, self.site = encoder.transform(frame)
        labels = frame["dx"].map({c: i for i, c in enumerate(CLASSES)}) if "dx" in frame else None
        self.labels = (labels.fillna(-1).astype(int).to_numpy() if labels is not None
                       else np.full(len(frame), -1, dtype=np.int64))
        self.loader, self.transform, self.on_error = loader, transform, on_error
        self.meta_dropout = meta_dropout  # training only: randomly blank metadata fields (MetadataDropout)
        self._blank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ok, resaved = True, None
        try:
            image = self.transform(self.loader(self.paths[i]))
        except ImageError:
            if self.on_error == "raise":
                raise
            ok, image = False, self._blank_like()
        if isinstance(image, tuple):  # a PairedAugment: the view and its re-saved copy (consistency training)
            image, resaved = image
        age, sex, site = self.age[i], self.sex[i], self.site[i]
        if self.meta_dropout is not None:
            age, sex, site = self.meta_dropout(age, sex, site)
        item = {"image": image, "age": torch.from_numpy(np.array(age, dtype=np.float32)),
                "sex": torch.tensor(sex), "site": torch.tensor(site), "label": torch.tensor(self.labels[i]),
                "index": torch.tensor(i), "ok": torch.tensor(ok)}
        if resaved is not None:
            item["resaved"] = resaved
        return item

    def _blank_like(self) -> torch.Tensor:
        if self._blank is None:
            # on_error="skip" datasets read through an ImageLoader (Predictor.loader); a ResavedLoader has no
            # short_side and is only used with on_error="raise", where no blank image is needed
            size = cast(ImageLoader, self.loader).short_side
            self._blank = self.transform(np.zeros((size, size, 3), dtype=np.uint8))
        return self._blank


def metadata_variants(enc, variants: dict[str, set[str]]) -> dict:
    """name -> a function giving a (CPU) batch's (age, sex, site) inputs with those fields blanked as if left
    empty, for `engine.predict_logits`."""
    return {name: (lambda batch, fields=fields: _blanked(enc, batch, fields)) for name, fields in variants.items()}


def _blanked(enc, batch: dict, fields: set[str]) -> tuple[torch.Tensor, ...]:
    """The batch's (age, sex, site) inputs with `fields` blanked as if left empty."""
    age, sex, site = batch["age"], batch["sex"], batch["site"]
    if not fields:
        return age, sex, site
    return tuple(torch.as_tensor(x) for x in enc.blank(age.numpy(), sex.numpy(), site.numpy(), fields))
