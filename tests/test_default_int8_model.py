"""The shipped int8 copy of the default model (src/dermscreen/models/default-int8, made by ``dermscreen quantize``):
made from exactly the shipped float model, everything but the classifier shared with it, found by name by every
front end. Its held-out scores are checked beside the float model's in tests/test_default_model.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dermscreen import bundle as bundle_module
from dermscreen.bundle import Bundle, resolve_bundle_path, shipped_models
from dermscreen.cli import app
from dermscreen.errors import BundleError

DEFAULT = Path(bundle_module.__file__).parent / "models" / "default"
INT8 = DEFAULT.with_name("default-int8")


def test_it_is_the_shipped_float_model_quantized_and_nothing_else():
    float_bundle, int8 = Bundle.load(DEFAULT), Bundle.load(INT8)
    record = int8.manifest.training["quantization"]
    assert record["source_sha256"] == float_bundle.sha256  # made from exactly this float model
    assert record["calibration_images"]["split"] == "train" and record["calibration_images"]["count"] == 300
    assert record["validation"]["top1_agreement"] >= 0.9
    assert int8.manifest.version == float_bundle.manifest.version + "+int8"
    # the segmenter and the OOD statistics are the float model's; only the classifier graph differs
    assert set(int8.manifest.files) == set(float_bundle.manifest.files)
    for name in int8.manifest.files:
        same = int8.file(name) == float_bundle.file(name)
        assert same == (name != "model.onnx"), name
    training = {k: v for k, v in int8.manifest.training.items() if k != "quantization"}
    assert training == float_bundle.manifest.training  # the card's training record is the float model's
    assert int8.manifest.card.licence == float_bundle.manifest.card.licence
    assert sorted(p.name for p in INT8.iterdir()) == sorted(["manifest.json", *int8.manifest.files])


def test_front_ends_find_shipped_models_by_name(monkeypatch, tmp_path):
    monkeypatch.delenv("DERMSCREEN_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert shipped_models() == ["default", "default-int8"]
    assert resolve_bundle_path("default-int8") == INT8
    monkeypatch.setenv("DERMSCREEN_MODEL", "default-int8")
    assert resolve_bundle_path(None) == INT8
    monkeypatch.delenv("DERMSCREEN_MODEL")
    (tmp_path / "default-int8").mkdir()  # a folder of that name here is what the user means
    assert resolve_bundle_path("default-int8") == Path("default-int8")
    with pytest.raises(BundleError, match="models installed with dermscreen are named default, default-int8"):
        Bundle.load(resolve_bundle_path("default-int9"))
    with pytest.raises(BundleError) as missing:  # a path is a path: no list of names
        Bundle.load(resolve_bundle_path("models/default-int9"))
    assert "installed with dermscreen" not in str(missing.value)


def test_predict_with_the_int8_model_by_name(ham224_dir, monkeypatch):
    monkeypatch.delenv("DERMSCREEN_MODEL", raising=False)
    image = sorted((ham224_dir / "images").glob("*.jpg"))[0]
    result = CliRunner().invoke(app, ["predict", str(image), "--model", "default-int8", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["model"]["version"].endswith("+int8") and answer["model"]["sha256"] == Bundle.load(INT8).sha256


def test_info_shows_its_held_out_results_and_where_it_is_described(monkeypatch):
    monkeypatch.delenv("DERMSCREEN_MODEL", raising=False)
    result = CliRunner().invoke(app, ["info", "--model", "default-int8"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "0.1.0+int8" in result.output and "held-out test results (855 images" in result.output
    assert "docs/model-card.md" in result.output and "8-bit integer arithmetic" in result.output
