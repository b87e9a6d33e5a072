"""The seed's multimodal network: timm image backbone + metadata branch + fusion head."""
from __future__ import annotations

import math
from typing import Any, cast

import timm
import torch
from torch import nn


class MetadataBranch(nn.Module):
    """age -> MLP 32 -> 64; sex -> embedding 8; site -> embedding 16; concat -> Dense 128.

    `age_inputs` = 2 adds a "missing" flag beside the normalised age (see MetadataEncoder)."""

    out_features = 128

    def __init__(self, n_sex: int, n_site: int, drop_rate: float = 0.1, age_inputs: int = 1):
        super().__init__()
        self.age = nn.Sequential(nn.Linear(age_inputs, 32), nn.ReLU(inplace=True), nn.Linear(32, 64), nn.ReLU(inplace=True))
        self.sex = nn.Embedding(n_sex, 8)
        self.site = nn.Embedding(n_site, 16)
        self.fuse = nn.Sequential(nn.Linear(64 + 8 + 16, 128), nn.ReLU(inplace=True), nn.Dropout(drop_rate))

    def forward(self, age: torch.Tensor, sex: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.age(age), self.sex(sex), self.site(site)], dim=1))


class SkainNet(nn.Module):
    """Backbone pooled features (+ metadata features) -> 512 -> 128 -> classes."""

    def __init__(self, backbone: str, n_sex: int = 1, n_site: int = 1, num_classes: int = 7,
                 image_only: bool = False, drop_rate: float = 0.3, age_inputs: int = 1, **_: Any):
        super().__init__()
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
        self.image_only = image_only
        self.meta = None if image_only else MetadataBranch(n_sex, n_site, age_inputs=age_inputs)
        # timm models carry their pooled width as `num_features`, an attribute nn.Module's typing does not know
        width = cast(int, self.backbone.num_features) + (0 if image_only else MetadataBranch.out_features)
        self.head = nn.Sequential(
            nn.Linear(width, 512), nn.ReLU(inplace=True), nn.Dropout(drop_rate),
            nn.Linear(512, 128), nn.ReLU(inplace=True), nn.Dropout(drop_rate / 2),
            nn.Linear(128, num_classes),
        )

    def forward(self, image: torch.Tensor, age: torch.Tensor, sex: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return self.classify(self.backbone(image), age, sex, site)

    def fuse(self, pooled: torch.Tensor, age, sex, site) -> torch.Tensor:
        """Pooled backbone features (+ the metadata branch's): the head's input."""
        return pooled if self.meta is None else torch.cat([pooled, self.meta(age, sex, site)], dim=1)

    def classify(self, pooled: torch.Tensor, age, sex, site) -> torch.Tensor:
        """Logits from already-pooled backbone features: other metadata for the same images costs only the
        metadata branch and the head (the with/without-metadata scores and the blank-field triage use this)."""
        return self.head(self.fuse(pooled, age, sex, site))

    def set_backbone_trainable(self, fraction: float) -> int:
        """Train only the last `fraction` of backbone parameters (by count); returns how many tensors train."""
        params = list(self.backbone.parameters())
        total = sum(p.numel() for p in params)
        budget, seen, n_trainable = math.ceil(total * max(0.0, min(1.0, fraction))), 0, 0
        for p in reversed(params):
            p.requires_grad = seen < budget
            seen += p.numel()
            n_trainable += int(p.requires_grad)
        return n_trainable

    def train(self, mode: bool = True) -> SkainNet:
        """Frozen batch-norm layers keep their ImageNet statistics instead of drifting."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in module.parameters(recurse=False)):
                    module.eval()
        return self


def build_model(args: dict[str, Any]) -> SkainNet | EnsembleNet:
    """Rebuild from the plain dict stored in a bundle (backbone, n_sex, n_site, num_classes, ...); an ensemble's
    dict lists its members' dicts under "ensemble"."""
    if "ensemble" in args:
        n = len(args["ensemble"])
        return EnsembleNet([SkainNet(**member) for member in args["ensemble"]], None,
                           [[0] * int(args["n_sex"])] * n, [[0] * int(args["n_site"])] * n,
                           [member.get("input_size") for member in args["ensemble"]])
    return SkainNet(**args)


class EnsembleBackbone(nn.Module):
    """The members' backbones side by side: image -> their pooled features, concatenated.

    It is the ensemble's `backbone`, so whatever reads a model's backbone (the OOD feature tap, the ONNX export's
    feature output, `model.backbone(images)`) sees all members' features at once; `widths` says which columns
    belong to which member.

    Members trained at different input sizes (e.g. Lite0 at 224 px and Lite2 at 260 px, with the same field of
    view) take the ensemble's input, the largest member's, resized to their own `sizes[i]` here (bilinear, no
    antialiasing: a plain ONNX Resize that every graph runtime runs; at these ratios the result is closer to the
    member's own preprocessing than a 1-pixel change of its resize, measured in the README)."""

    def __init__(self, parts: list[nn.Module], sizes: list[int | None] | None = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.widths = [int(cast(int, p.num_features)) for p in parts]  # timm's pooled width, see SkainNet
        self.num_features = sum(self.widths)
        sizes = list(sizes) if sizes else [None] * len(parts)
        largest = max((int(s) for s in sizes if s is not None), default=None)
        self.sizes = [None if s is None or int(s) == largest else int(s) for s in sizes]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(self._sized(image, size)) for part, size in zip(self.parts, self.sizes)], dim=1)

    @staticmethod
    def _sized(image: torch.Tensor, size: int | None) -> torch.Tensor:
        if size is None:
            return image
        return nn.functional.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)


class EnsembleNet(nn.Module):
    """N SkainNets behind one forward(image, age, sex, site) -> logits, where the "logits" are the log of the
    members' mean softmax: softmax(output) is the averaged probability, so everything that takes logits
    (temperature, TTA, ONNX, Grad-CAM) works unchanged.

    Each member's backbone moves into `self.backbone` (an EnsembleBackbone) and is replaced in the member by an
    identity, so a member's own forward runs its metadata branch and head on features computed once. State
    dict keys: `backbone.parts.<i>.<key>` for member i's backbone, `members.<i>.<key>` for the rest.

    Members trained on different folds fit their metadata encoders on different training splits, so each
    gets its own view of the ensemble's metadata inputs: `age_affine[i] = (scale, shift)` turns the ensemble's
    age into member i's normalised age, and `sex_map[i]` / `site_map[i]` turn an index into the ensemble's
    (union) vocabulary into member i's index (0, `unknown`, for a value it never saw, as its own encoder does).
    All are identities when the members agree. `input_sizes[i]`: member i's own input size where the members'
    differ (see EnsembleBackbone)."""

    age_affine: torch.Tensor  # buffers, registered in __init__
    sex_map: torch.Tensor
    site_map: torch.Tensor

    def __init__(self, members: list[SkainNet], age_affine: list[tuple[float, float]] | None = None,
                 sex_map: list[list[int]] | None = None, site_map: list[list[int]] | None = None,
                 input_sizes: list[int | None] | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        n = len(members)
        affine = age_affine if age_affine is not None else [(1.0, 0.0)] * n
        self.register_buffer("age_affine", torch.tensor(affine, dtype=torch.float32).reshape(n, 2))
        for name, given in (("sex_map", sex_map), ("site_map", site_map)):
            self.register_buffer(name, torch.tensor(given if given is not None else [[0]] * n, dtype=torch.int64))
        backbones = []
        for member in members:
            backbones.append(member.backbone)
            member.backbone = nn.Identity()
        self.backbone = EnsembleBackbone(backbones, input_sizes)
        self.members = nn.ModuleList(members)

    def forward(self, image: torch.Tensor, age: torch.Tensor, sex: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return self.classify(self.backbone(image), age, sex, site)

    def classify(self, pooled: torch.Tensor, age: torch.Tensor, sex: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        """The members' metadata branches and heads on the concatenated backbone features, averaged as above."""
        pooled = pooled.split(self.backbone.widths, dim=1)
        same = self._same_encoders()  # once per batch (it compares buffers), not once per member
        logp = torch.stack([m(f, *self._meta(i, age, sex, site, same)).float().log_softmax(1)
                            for i, (m, f) in enumerate(zip(self.members, pooled))])
        top = logp.max(dim=0).values  # log-mean-exp written out: OpenVINO mis-shapes ONNX's ReduceLogSumExp
        return top + (logp - top).exp().mean(dim=0).log()

    def _meta(self, i: int, age: torch.Tensor, sex: torch.Tensor, site: torch.Tensor,
              same: bool) -> tuple[torch.Tensor, ...]:
        """The ensemble's metadata inputs as member i's encoder would have given them (`same`: every encoder map
        is the identity)."""
        if self.members[i].image_only:
            return age, sex, site  # unused: the exported graph of image-only members keeps only `image`
        if same:
            return age, sex, site
        years = age[:, :1] * self.age_affine[i, 0] + self.age_affine[i, 1]
        if age.shape[1] > 1:  # (age, missing flag): a missing age stays 0 for every member, whatever its mean
            flag = age[:, 1:]
            years = torch.cat([years * (1 - flag), flag], dim=1)
        return years, self.sex_map[i][sex], self.site_map[i][site]

    def _same_encoders(self) -> bool:
        """All maps are identities: then the inputs go straight in. (OpenVINO 2025 gets the batch size of
        `age * 1 + 0` wrong when several branches read it; the exported graph then has no such nodes.)"""
        dev = self.age_affine.device
        return bool((self.age_affine == torch.tensor([1.0, 0.0], device=dev)).all()
                    and (self.sex_map == torch.arange(self.sex_map.shape[1], device=dev)).all()
                    and (self.site_map == torch.arange(self.site_map.shape[1], device=dev)).all())
