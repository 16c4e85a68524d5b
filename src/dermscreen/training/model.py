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


class _Features(nn.Module):
    """A backbone's forward_features as a module (an ensemble member that shares nothing)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


class EnsembleClassifier(nn.Module):
    """Trained LesionClassifiers as one model: forward(image) → (logits, embedding, features), like each member.

    The members' feature maps are concatenated (D = the sum of theirs) and their classifiers placed side by
    side, each divided by the number of members, so the logits are exactly the members' average and a class
    activation map is still ``W · features``: a bundle of an ensemble is an ordinary bundle. Members fine-tuned
    from the same pretrained weights with the same ``freeze_stages`` hold identical frozen stems and first
    stages; that part runs once (with 2 frozen stages of EfficientNet-Lite0 at 160 px, two members cost 1.7x
    one on a CPU, not 2x). For export and evaluation only (never trained)."""

    def __init__(self, members: list[LesionClassifier], shared_stages: int = 0):
        super().__init__()
        if len(members) < 2 or any(m.metadata_head is not None for m in members):
            raise ValueError("an ensemble needs at least two image-only members")
        first = members[0].backbone
        if shared_stages > 0 and not all(_same_trunk(first, m.backbone, shared_stages) for m in members[1:]):
            shared_stages = 0  # fine-tuned (or differently initialised) early layers: nothing to share
        if shared_stages > 0:
            self.trunk: nn.Module = nn.Sequential(first.conv_stem, first.bn1, *first.blocks[:shared_stages])
            self.tops = nn.ModuleList(
                nn.Sequential(*m.backbone.blocks[shared_stages:], m.backbone.conv_head, m.backbone.bn2)
                for m in members)
        else:
            self.trunk = nn.Identity()
            self.tops = nn.ModuleList(_Features(m.backbone) for m in members)
        self.shared_stages = shared_stages
        weight = torch.cat([m.classifier.weight.detach() for m in members], dim=1) / len(members)
        bias = torch.stack([m.classifier.bias.detach() for m in members]).mean(dim=0)
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias)
        self.metadata_head = None
        self.eval()

    def forward(self, image: torch.Tensor, metadata: torch.Tensor | None = None):
        x = self.trunk(image)
        features = torch.cat([top(x) for top in self.tops], dim=1)
        embedding = features.mean(dim=(2, 3))
        return self.classifier(embedding), embedding, features


def _same_trunk(a: nn.Module, b: nn.Module, stages: int) -> bool:
    """Whether backbones ``a`` and ``b`` hold the same stem and first ``stages`` block stages (weights and stats)."""
    parts = ("conv_stem", "bn1", "blocks")
    if not all(hasattr(a, p) and hasattr(b, p) for p in parts):
        return False
    pairs = [(a.conv_stem, b.conv_stem), (a.bn1, b.bn1)] + list(zip(a.blocks[:stages], b.blocks[:stages]))
    return all(torch.equal(x, y) for ma, mb in pairs
               for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
