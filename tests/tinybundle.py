"""A tiny but real bundle for unit tests: an ONNX graph built with onnx.helper, no torch needed.

image (N,3,S,S) -> Conv(stride 4)+Relu -> Conv(stride 8)+Relu = features (N,F,S/32,S/32)
-> GlobalAveragePool = embedding (N,F) -> Gemm = logits (N,C)  [+ MatMul(metadata) when asked]
Weights are seeded random numbers: predictions are meaningless but deterministic, and every
output has the shape and name the bundle contract promises.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dermscreen.bundle import ARRAYS_FILE, MODEL_FILE, Bundle, Calibration, Manifest, ModelSpec, OODSpec
from dermscreen.calibration import OperatingPoint
from dermscreen.metadata import MetadataSpec
from dermscreen.ood import MahalanobisOOD
from dermscreen.preprocess import Preprocessing
from dermscreen.taxonomy import HAM10000, Taxonomy

FEATURES = 16


def _onnx_model(num_classes: int, meta_dim: int | None, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, 3, 4, 4)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (FEATURES, 8, 8, 8)).astype(np.float32)
    wc = rng.normal(0, 0.5, (num_classes, FEATURES)).astype(np.float32)
    bc = rng.normal(0, 0.1, (num_classes,)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(wc, "wc"), numpy_helper.from_array(bc, "bc")]
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], strides=[4, 4]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[8, 8]),
        helper.make_node("Relu", ["c2"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["embedding"], axis=1),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])]
    if meta_dim:
        wm = rng.normal(0, 0.5, (meta_dim, num_classes)).astype(np.float32)
        inits.append(numpy_helper.from_array(wm, "wm"))
        inputs.append(helper.make_tensor_value_info("metadata", TensorProto.FLOAT, ["N", meta_dim]))
        nodes += [helper.make_node("Gemm", ["embedding", "wc", "bc"], ["img_logits"], transB=1),
                  helper.make_node("MatMul", ["metadata", "wm"], ["meta_logits"]),
                  helper.make_node("Add", ["img_logits", "meta_logits"], ["logits"])]
    else:
        nodes.append(helper.make_node("Gemm", ["embedding", "wc", "bc"], ["logits"], transB=1))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes]),
               helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", FEATURES]),
               helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", FEATURES, "h", "w"])]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(), wc, bc


def make_tiny_bundle(folder: str | Path, taxonomy: Taxonomy = HAM10000, image_size: int = 64,
                     metadata: bool = False, seed: int = 0) -> Path:
    """Write a verified tiny bundle into ``folder`` and return the folder."""
    meta = MetadataSpec() if metadata else None
    onnx_bytes, wc, bc = _onnx_model(taxonomy.num_classes, meta.dim if meta else None, seed)
    rng = np.random.default_rng(seed + 1)
    train_emb = np.abs(rng.normal(0, 1, (200, FEATURES))).astype(np.float32)
    train_lab = rng.integers(0, taxonomy.num_classes, 200)
    ood = MahalanobisOOD.fit(train_emb, train_lab, n_components=8)
    threshold = float(np.quantile(ood.score(train_emb), 0.95))
    arrays = {"classifier_weight": wc, "classifier_bias": bc, **ood.to_arrays()}
    manifest = Manifest(
        name="tiny-test-model",
        taxonomy=taxonomy,
        preprocessing=Preprocessing(image_size=image_size),
        model=ModelSpec(backbone="tiny-conv", embedding_dim=FEATURES,
                        inputs=["image", "metadata"] if meta else ["image"], metadata=meta),
        calibration=Calibration(temperature=1.5),
        operating_points=[
            OperatingPoint(name="sensitivity_first", threshold=0.2, sensitivity=0.95, specificity=0.5),
            OperatingPoint(name="balanced", threshold=0.5, sensitivity=0.8, specificity=0.8),
        ],
        ood=OODSpec(threshold=threshold, validation_kept=0.95),
    )
    return Bundle.write(folder, manifest, {MODEL_FILE: onnx_bytes, ARRAYS_FILE: Bundle.arrays_bytes(arrays)})
