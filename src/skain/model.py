"""The seed's multimodal network: timm image backbone + metadata branch + fusion head."""
from __future__ import annotations

import math
from typing import Any

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
        width = self.backbone.num_features + (0 if image_only else MetadataBranch.out_features)
        self.head = nn.Sequential(
            nn.Linear(width, 512), nn.ReLU(inplace=True), nn.Dropout(drop_rate),
            nn.Linear(512, 128), nn.ReLU(inplace=True), nn.Dropout(drop_rate / 2),
            nn.Linear(128, num_classes),
        )

    def forward(self, image: torch.Tensor, age: torch.Tensor, sex: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image, age, sex, site))

    def features(self, image, age, sex, site) -> torch.Tensor:
        """The fused representation the head sees (also used for out-of-distribution scores)."""
        feats = self.backbone(image)
        if self.meta is not None:
            feats = torch.cat([feats, self.meta(age, sex, site)], dim=1)
        return feats

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

    def train(self, mode: bool = True) -> "SkainNet":
        """Frozen batch-norm layers keep their ImageNet statistics instead of drifting."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in module.parameters(recurse=False)):
                    module.eval()
        return self


def build_model(args: dict[str, Any]) -> SkainNet:
    """Rebuild from the plain dict stored in a bundle (backbone, n_sex, n_site, num_classes, ...)."""
    return SkainNet(**args)
