"""``dermscreen quantize``: an int8 copy of the shipped model, refitted on its own validation split.

One quantization of the real shipped model (through the CLI, on 30 calibration images to keep it quick) is
checked for what a user relies on: int8 operators in the graph, the same answers as the float model on most
validation images, temperature and referral threshold fitted again (the sensitivity-first point keeps its
target), the OOD threshold re-chosen to keep the float model's share, and a record of all of it in the manifest.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dermscreen.bundle import Bundle
from dermscreen.cli import app
from dermscreen.errors import ConfigError
from dermscreen.quantize import quantize_bundle
from dermscreen.screening import Screener

DEFAULT = Path(__file__).resolve().parents[1] / "src" / "dermscreen" / "models" / "default"


@pytest.fixture(scope="module")
def int8(ham224_dir, tmp_path_factory) -> tuple[Path, str]:
    """(the int8 bundle's folder, what the command printed)."""
    out = tmp_path_factory.mktemp("quantize") / "int8"
    result = CliRunner().invoke(app, ["quantize", "--labels", str(ham224_dir / "HAM10000_metadata.csv"),
                                      "--out", str(out), "--calibration-images", "30"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_the_int8_bundle_runs_integer_operators_and_is_smaller(int8):
    onnx = pytest.importorskip("onnx")
    graph = onnx.load_from_string(Bundle.load(int8[0]).file("model.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 80  # every convolution's weights (89 in the ensemble) and the classifier's
    assert len(Bundle.load(int8[0]).file("model.onnx")) < 0.4 * (DEFAULT / "model.onnx").stat().st_size


def test_it_answers_like_the_float_model_and_is_refitted_on_validation(int8):
    shipped, new = Bundle.load(DEFAULT), Bundle.load(int8[0])
    m, record = new.manifest, new.manifest.training["quantization"]
    assert record["source_sha256"] == shipped.sha256 and m.version == shipped.manifest.version + "+int8"
    assert m.name == shipped.manifest.name + "-int8" and m.created == record["date"]
    assert record["target_sensitivity"] == 0.95 and record["reference_images"] == 4
    # a working copy moves some images' P(malignant) a little (0.28 at most for the shipped one), a broken one a lot
    assert 0 < record["validation"]["max_p_malignant_change"] < 0.6
    v = record["validation"]
    assert v["images"] == 855
    assert v["top1_agreement"] >= 0.9 and v["referral_agreement"] >= 0.85
    assert abs(v["int8"]["malignant_auc"] - v["float"]["malignant_auc"]) < 0.02
    assert record["calibration_images"] == {"count": 30, "split": "train", "seed": 0,
                                            "labels": "HAM10000_metadata.csv"}
    # the temperature and points were fitted again on the int8 logits, for the same 95 % target
    assert m.calibration.temperature != shipped.manifest.calibration.temperature
    assert m.metrics["malignant_auc"] == pytest.approx(v["int8"]["malignant_auc"])
    first = m.operating_points[0]
    assert first.name == "sensitivity_first" and first.sensitivity >= 0.95
    assert first.threshold != shipped.manifest.operating_points[0].threshold
    # the OOD threshold keeps (about) the float model's share of validation images
    assert m.ood.threshold != shipped.manifest.ood.threshold
    assert m.ood.validation_kept == pytest.approx(shipped.manifest.ood.validation_kept, abs=0.02)
    assert m.ood.colour_threshold == shipped.manifest.ood.colour_threshold
    # every share the manifest states is of the same validation images
    assert m.ood.validation_kept_both <= min(m.ood.validation_kept, m.ood.colour_validation_kept)
    assert m.ood.validation_kept_both >= m.ood.validation_kept + m.ood.colour_validation_kept - 1
    assert round(m.ood.colour_validation_kept * 855) == pytest.approx(m.ood.colour_validation_kept * 855, abs=1e-6)
    assert any("8-bit integer" in line for line in m.card.limitations)
    assert "int8 vs float on 855 validation images" in int8[1] and "Top diagnosis agreed on" in int8[1]


def test_the_screener_screens_a_real_image_with_it(int8, ham224_dir):
    image = sorted((ham224_dir / "images").glob("*.jpg"))[0].read_bytes()
    result = Screener(int8[0]).analyze(image, heatmap=True)
    float_result = Screener(DEFAULT).analyze(image, heatmap=True)
    assert result.status == float_result.status == "ok"
    assert result.model.version.endswith("+int8") and result.model.sha256 != float_result.model.sha256
    assert abs(result.malignancy_score - float_result.malignancy_score) <= 25
    assert result.heatmaps is not None and np.isfinite(result.heatmaps.raw_top_class).all()


def test_refusals_say_what_to_give_instead(int8, ham224_dir, ham_dir, tiny_bundle, tmp_path):
    labels = ham224_dir / "HAM10000_metadata.csv"
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_bundle(int8[0], labels, tmp_path / "again")
    with pytest.raises(ConfigError, match="not the labels file this model was trained on"):
        quantize_bundle(None, ham_dir / "HAM10000_metadata.csv", tmp_path / "other")
    with pytest.raises(ConfigError, match="records no training labels"):
        quantize_bundle(tiny_bundle, labels, tmp_path / "tiny")
    with pytest.raises(ConfigError, match="at least 10"):
        quantize_bundle(None, labels, tmp_path / "few", calibration_images=5)
    with pytest.raises(ConfigError, match="target sensitivity"):
        quantize_bundle(None, labels, tmp_path / "sens", target_sensitivity=1.0)
    shipped = Bundle.load(DEFAULT)
    recalibrated = Bundle.write(tmp_path / "recalibrated", shipped.manifest.model_copy(update={"training": {
        **shipped.manifest.training, "recalibrations": [{"images": 300}]}}),
        {name: shipped.file(name) for name in shipped.manifest.files})
    with pytest.raises(ConfigError, match="was recalibrated"):  # its clinic's calibration would be lost
        quantize_bundle(recalibrated, labels, tmp_path / "recal-int8")
    taken = tmp_path / "taken"
    shutil.copytree(DEFAULT, taken)
    result = CliRunner().invoke(app, ["quantize", "--labels", str(labels), "--out", str(taken)])
    assert result.exit_code == 2 and "error:" in result.output
    assert not list(tmp_path.glob("again")) and not (tmp_path / "other").exists()


def test_without_the_onnx_package_it_says_what_to_install(monkeypatch, tmp_path, ham224_dir):
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # as on a core install
    with pytest.raises(ConfigError, match=r'pip install "dermscreen\[train\]"'):
        quantize_bundle(None, ham224_dir / "HAM10000_metadata.csv", tmp_path / "int8")
    assert not (tmp_path / "int8").exists()
