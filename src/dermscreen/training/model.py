"""The classifier: timm backbone → feature map → global average pool → linear classifier (+ metadata).

Metadata fusion is late and additive: ``logits = W · embedding + b + mlp(metadata)``. The image
part stays one linear layer over the pooled feature map, so a class activation map is exactly
``W · features`` and needs no torch at inference (the bundle stores W and b).
"""
from __future__ import annotations

import torch
from torch import nn

from .backbones import BackboneInfo, create_backbone
from .config import TrainConfig


class LesionClassifier(nn.Module):
    """forward(image, metadata) → (logits (N,C), embedding (N,D), features (N,D,h,w))."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, metadata_dim: int = 0,
                 metadata_hidden: int = 32, drop_rate: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(num_features, num_classes)
        self.metadata_dim = metadata_dim
        self.metadata_head = None
        if metadata_dim:
            self.metadata_head = nn.Sequential(
                nn.Linear(metadata_dim, metadata_hidden), nn.ReLU(), nn.Dropout(drop_rate),
                nn.Linear(metadata_hidden, num_classes),
            )

    def forward(self, image: torch.Tensor, metadata: torch.Tensor | None = None):
        """Image batch (N,3,S,S) [+ metadata (N,M)] → (logits, embedding, features)."""
        features = self.backbone.forward_features(image)
        embedding = features.mean(dim=(2, 3))
        logits = self.classifier(self.dropout(embedding))
        if self.metadata_head is not None:
            if metadata is None:
                raise ValueError("this model fuses metadata: pass a (N, metadata_dim) tensor")
            logits = logits + self.metadata_head(metadata)
        return logits, embedding, features

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the new (non-backbone) layers."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]


def build_model(config: TrainConfig, num_classes: int, metadata_dim: int = 0,
                weights: str | None = None) -> tuple[LesionClassifier, BackboneInfo]:
    """A LesionClassifier for ``config`` (``weights`` overrides config.weights); returns (model, info)."""
    backbone, info = create_backbone(config.backbone, config.weights if weights is None else weights)
    model = LesionClassifier(backbone, info.num_features, num_classes, metadata_dim,
                             config.metadata_hidden, config.drop_rate)
    freeze_stages(model, config.freeze_stages)
    return model, info


def freeze_stages(model: LesionClassifier, stages: int) -> None:
    """Stop gradients through the stem and the first ``stages`` block stages of the backbone."""
    if stages <= 0:
        return
    bb = model.backbone
    modules = [m for m in (getattr(bb, "conv_stem", None), getattr(bb, "bn1", None)) if m is not None]
    blocks = getattr(bb, "blocks", None)
    if blocks is None:
        raise ValueError(f"freeze_stages is only supported for backbones with .blocks stages, not {type(bb).__name__}")
    modules += list(blocks[:stages])
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def set_frozen_bn_eval(model: LesionClassifier) -> None:
    """Keep BatchNorm layers whose weights are frozen in eval mode (their statistics stay pretrained)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()
