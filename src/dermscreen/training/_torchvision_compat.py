"""Make ``import torchvision`` (and so ``import timm``) work when torchvision's compiled ops cannot load.

A torchvision wheel built for another torch/CUDA (e.g. ``0.28.0+cu130`` next to ``torch 2.13.0+cpu``)
cannot load its C++ extension, so the ``torchvision::nms``/``qnms`` operators are never defined; its
``_meta_registrations`` module then fails at import with "operator torchvision::nms does not exist",
taking timm down with it. dermscreen needs none of torchvision's compiled ops (no detection), only
its pure-Python parts, so declaring the missing operator *schemas* (without kernels) is enough for
the import to finish. Calling ``torchvision.ops.nms`` afterwards still fails, loudly, as it should.

``ensure_torchvision()`` is a no-op wherever torchvision imports normally.
"""
from __future__ import annotations

import sys

# The operators whose fake (meta) kernels torchvision registers by name at import time.
# Declared with the same signatures torchvision's C++ extension would give them.
_MISSING_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# Kept alive for the life of the process: dropping a torch.library.Library un-registers its schemas.
_LIBRARY = None
SHIM_APPLIED = False


def _purge_partial_import() -> None:
    # A failed import leaves half-initialised torchvision modules behind; the retry needs a clean slate.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> None:
    """Import torchvision, declaring missing operator schemas first if its compiled ops failed to load."""
    global _LIBRARY, SHIM_APPLIED
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "__version__"):
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    import torch

    _purge_partial_import()
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        for name, schema in _MISSING_SCHEMAS.items():
            if not _has_schema(name):
                _LIBRARY.define(schema)
    SHIM_APPLIED = True
    import torchvision  # noqa: F401,F811  (raises again, unchanged, if something else is missing)


def _has_schema(name: str) -> bool:
    """True if ``torchvision::<name>`` is already declared (by a partly loaded extension)."""
    import torch

    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False
