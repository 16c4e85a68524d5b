"""Export a trained LesionClassifier to a verified dermscreen bundle (ONNX + arrays + manifest).

The ONNX graph takes ``image`` (N,3,S,S) (+ ``metadata`` (N,M) when fused) and returns ``logits``,
``embedding`` (pooled image features) and ``features`` (last feature map), with a dynamic batch.
Before anything is written, ONNX Runtime is run against torch on a real batch; any output that
differs by more than ``tolerance`` aborts the export with a BundleError.
"""
from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..bundle import ARRAYS_FILE, MODEL_FILE, Bundle, Manifest, ModelCard
from ..errors import BundleError

log = logging.getLogger("dermscreen.training")
OUTPUTS = ["logits", "embedding", "features"]
ONNX_OPSET = 18
TOLERANCE = 1e-4


class _ExportView(nn.Module):
    """The classifier with positional inputs only, as the ONNX exporter wants."""

    def __init__(self, model: nn.Module, with_metadata: bool):
        super().__init__()
        self.model = model
        self.with_metadata = with_metadata

    def forward(self, image, metadata=None):
        return self.model(image, metadata if self.with_metadata else None)


def to_onnx(model: nn.Module, image_size: int, metadata_dim: int = 0, exporter: str = "dynamo") -> bytes:
    """Serialise ``model`` (a LesionClassifier, CPU, eval) to ONNX bytes with a dynamic batch.

    ``exporter`` is ``dynamo`` (torch.export; falls back to TorchScript if it fails) or ``torchscript``
    (the older exporter: several times faster here, but deprecated by torch).
    """
    view = _ExportView(model, metadata_dim > 0).eval()
    example = (torch.zeros(2, 3, image_size, image_size),)
    names = ["image"]
    if metadata_dim:
        example += (torch.zeros(2, metadata_dim),)
        names.append("metadata")
    if exporter == "dynamo":
        try:
            return _export_dynamo(view, example, names)
        except Exception as exc:  # the dynamo exporter fails on some graphs the TorchScript one handles
            log.warning("dynamo ONNX export failed (%s); falling back to the TorchScript exporter", exc)
    elif exporter != "torchscript":
        raise ValueError(f"unknown ONNX exporter {exporter!r}: use dynamo or torchscript")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(view, example, buf, input_names=names, output_names=OUTPUTS,
                          dynamic_axes={n: {0: "N"} for n in names + OUTPUTS}, dynamo=False,
                          opset_version=17)
    return buf.getvalue()


def _export_dynamo(view: nn.Module, example: tuple, names: list[str]) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(view, example, None, input_names=names, output_names=OUTPUTS,
                                    dynamic_shapes=tuple({0: batch} for _ in names), dynamo=True,
                                    opset_version=ONNX_OPSET, verbose=False)
    return program.model_proto.SerializeToString()


def check_onnx(onnx_bytes: bytes, model: nn.Module, images: np.ndarray, metadata: np.ndarray | None = None,
               tolerance: float = TOLERANCE) -> dict[str, float]:
    """Run ONNX Runtime and torch on the same batch; returns max abs diff per output, raises BundleError if > tolerance."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # the same optimisation level Bundle.session uses: check what will actually be served
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    feeds = {"image": images.astype(np.float32)}
    meta_t = None
    if metadata is not None:
        feeds["metadata"] = metadata.astype(np.float32)
        meta_t = torch.from_numpy(feeds["metadata"])
    got = session.run(OUTPUTS, feeds)
    with torch.no_grad():
        want = [t.numpy() for t in model.eval()(torch.from_numpy(feeds["image"]), meta_t)]
    diffs = {}
    for name, a, b in zip(OUTPUTS, got, want):
        if a.shape != b.shape:
            raise BundleError(f"ONNX export is wrong: output {name} has shape {a.shape}, torch gives {b.shape}.")
        diffs[name] = float(np.max(np.abs(a - b)))
    bad = {k: v for k, v in diffs.items() if not v <= tolerance}
    if bad:
        raise BundleError(f"ONNX export does not reproduce the torch model: max abs differences {bad} exceed "
                          f"{tolerance:g}. The bundle was not written; report this with the backbone name.")
    return diffs


def export_bundle(model: nn.Module, folder: str | Path, manifest: Manifest, ood_arrays: dict[str, np.ndarray],
                  check_images: np.ndarray, check_metadata: np.ndarray | None = None,
                  exporter: str = "dynamo") -> Path:
    """Export ``model`` with ``manifest`` (its files filled in here) to bundle ``folder``; returns the folder.

    ``check_images`` (N,3,S,S), N >= 2, is the batch on which ONNX Runtime must match torch.
    """
    model = model.cpu().eval()
    spec = manifest.model
    meta_dim = spec.metadata.dim if spec.metadata is not None else 0
    onnx_bytes = to_onnx(model, manifest.preprocessing.image_size, meta_dim, exporter)
    diffs = check_onnx(onnx_bytes, model, check_images, check_metadata)
    log.info("ONNX Runtime vs torch max abs diff: %s", ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    classifier = model.classifier
    arrays = {
        "classifier_weight": classifier.weight.detach().numpy().astype(np.float32),
        "classifier_bias": classifier.bias.detach().numpy().astype(np.float32),
        **ood_arrays,
    }
    manifest = manifest.model_copy(update={"training": {**manifest.training, "onnx_max_abs_diff": diffs}})
    folder = Bundle.write(folder, manifest, {MODEL_FILE: onnx_bytes, ARRAYS_FILE: Bundle.arrays_bytes(arrays)})
    Bundle.load(folder)  # re-read and verify the hashes of what was just written
    return folder


HAM_FORMATS = ("ham10000", "isic")  # manifest formats that hold HAM10000's images (and its licence)
HAM_CITATION = ("Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of multi-source "
                "dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018).")


def build_card(data_summary: dict, data_format: str, image_size: int,
               source_resolution: str | None = None, extra_training: str | None = None,
               extra_formats: Sequence[str] = ()) -> ModelCard:
    """The model card for a model trained on the data described by ``data_summary`` (+ ``extra_training``, a
    sentence on training-only images from other manifests, whose formats are ``extra_formats``: only those
    manifests that gave training images)."""
    # HAM10000's licence and citation only when a manifest format says the data is HAM10000 (its metadata CSV,
    # or the ISIC 2018 one-hot ground truth of the same images). A plain image,dx CSV may hold anyone's images,
    # even with the HAM10000 codes: its licence is its owner's to state. The extra_train manifests count too: a
    # model trained on anyone's images plus HAM10000's (configs/default*.yaml add HAM10000 as extra_train)
    # inherits HAM10000's non-commercial licence all the same.
    formats = [data_format, *extra_formats]
    is_ham = any(f in HAM_FORMATS for f in formats)
    other = [f for f in formats if f not in HAM_FORMATS]  # data whose licence dermscreen cannot know
    counts = ", ".join(f"{k} {v}" for k, v in data_summary.get("class_counts", {}).items())
    # the groups are lesions only when the labels gave lesion ids (else patients, else each image alone)
    groups = data_summary.get("grouped_by") or "lesions"
    of = (" (no lesion or patient ids: each image was split on its own)" if groups == "images" else
          f" of {data_summary.get('groups', '?')} {groups}")
    training_data = (f"{data_summary.get('images', '?')} images{of} "
                     f"({data_format} manifest {Path(str(data_summary.get('source') or '?')).name}); "
                     f"class counts: {counts}." + (f" {extra_training}" if extra_training else ""))
    limitations = [
        "Dermoscopic images only: photographs taken without a dermatoscope are outside what it learned.",
        "Skin types V-VI are under-represented in the training data; performance on darker skin is unknown "
        "and likely worse.",
        f"Trained on images resized to {image_size}x{image_size} px"
        + (f" (from {source_resolution} sources)" if source_resolution else "")
        + "; very different resolutions or crops may degrade it.",
        "Only the diagnoses of its taxonomy can be predicted; other lesions (e.g. squamous cell carcinoma, "
        "when absent from the taxonomy) will be forced into one of them. Check the out-of-distribution flag.",
        "Validated only on a held-out split of its own training source; expect lower performance elsewhere.",
        "A screening aid, not a diagnosis: any worrying lesion needs a clinician's examination.",
    ]
    if is_ham and not other:
        licence = ("CC BY-NC-SA 4.0: non-commercial use only, share alike (inherited from the HAM10000 "
                   "training data).")
    elif is_ham:
        licence = ("CC BY-NC-SA 4.0: non-commercial use only, share alike (inherited from the HAM10000 images "
                   "among its training data); the licence of its other training data (which its owner must state; "
                   "not known to dermscreen) applies as well. Fill it in (card.licence) before any use or "
                   "redistribution.")
    else:
        licence = ("Inherits the licence of the training data, which its owner must state: not known to "
                   "dermscreen. Fill it in (card.licence) before any use or redistribution.")
    if is_ham and data_format not in HAM_FORMATS:
        training_data += " HAM10000 images (extra_train) were among its training images."
    citation = HAM_CITATION if is_ham else ""
    return ModelCard(training_data=training_data, limitations=limitations, licence=licence, citation=citation)
