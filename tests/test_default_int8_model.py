"""The shipped int8 copy of the default model (src/dermscreen/models/default-int8, made by ``dermscreen quantize``):
made from exactly the shipped float model, everything but the classifier shared with it, found by name by every
front end. Its held-out scores are checked beside the float model's in tests/test_default_model.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dermscreen import bundle as bundle_module
from dermscreen.bundle import Bundle, resolve_bundle_path, shipped_models
from dermscreen.cli import app
from dermscreen.errors import BundleError
from dermscreen.quantize import reference_views

DEFAULT = Path(bundle_module.__file__).parent / "models" / "default"
INT8 = DEFAULT.with_name("default-int8")


def test_it_is_the_shipped_float_model_quantized_and_nothing_else():
    float_bundle, int8 = Bundle.load(DEFAULT), Bundle.load(INT8)
    record = int8.manifest.training["quantization"]
    assert record["source_sha256"] == float_bundle.sha256  # made from exactly this float model
    assert record["calibration_images"]["split"] == "train" and record["calibration_images"]["count"] == 300
    assert record["validation"]["top1_agreement"] >= 0.9
    assert int8.manifest.version == float_bundle.manifest.version + "+int8"
    assert int8.manifest.name == float_bundle.manifest.name + "-int8"
    # the segmenter and the OOD statistics are the float model's; only the classifier graph differs, and arrays.npz
    # carries the reference images and logits every load checks
    assert set(int8.manifest.files) == set(float_bundle.manifest.files)
    for name in int8.manifest.files:
        same = int8.file(name) == float_bundle.file(name)
        assert same == (name not in ("model.onnx", "arrays.npz")), name
    assert set(int8.arrays) == set(float_bundle.arrays) | {"check_images", "check_logits"}
    for name, values in float_bundle.arrays.items():
        assert np.array_equal(int8.arrays[name], values), name
    # the reference images are drawn, never a patient's (the package is redistributed, HAM10000 may not be)
    assert np.array_equal(int8.arrays["check_images"], reference_views(160))
    assert int8.arrays["check_logits"].shape == (4, 7)
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
    # what is written as a path stays a path: a mistyped folder is "not found", not quietly a shipped model
    assert resolve_bundle_path("./default-int8") == Path("./default-int8")
    assert resolve_bundle_path(Path("default-int8")) == Path("default-int8")
    result = CliRunner().invoke(app, ["info", "--model", "./default-int8"])
    assert result.exit_code == 2 and "not found" in result.output and "installed with" not in result.output
    (tmp_path / "default-int8").mkdir()  # a folder of that name here is what the user means
    assert resolve_bundle_path("default-int8") == Path("default-int8")
    with pytest.raises(BundleError, match="models installed with dermscreen are named default, default-int8"):
        resolve_bundle_path("default-int9")
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
    assert 'section "The int8 copy"' in result.output and "targets met or missed" not in result.output


def test_a_model_that_answers_differently_here_is_refused_at_load(tmp_path):
    """The int8 kernels differ between CPUs: a bundle whose logits on its reference images are not those recorded
    where it was made must not screen anyone (simulated by moving the recorded logits)."""
    from dermscreen.screening import Screener

    int8 = Bundle.load(INT8)
    session = int8.session(1)  # checked on the way
    int8._reference_checked = False
    assert int8._check_reference_outputs(session) == 0.0  # integer kernels: exactly the logits recorded

    def moved_by(shift: float, name: str) -> Path:
        arrays = dict(int8.arrays)
        arrays["check_logits"] = arrays["check_logits"] + np.float32(shift)
        files = {file: int8.file(file) for file in int8.manifest.files}
        files["arrays.npz"] = Bundle.arrays_bytes(arrays)
        return Bundle.write(tmp_path / name, int8.manifest, files)

    assert Screener(moved_by(0.05, "within")).bundle.sha256  # float noise is not a different model
    with pytest.raises(BundleError, match="differ from those it was validated with") as refused:
        Screener(moved_by(0.2, "moved"))
    assert "--model default" in str(refused.value)
    arrays = {k: v for k, v in int8.arrays.items() if k != "check_logits"}  # damaged: images without their logits
    files = {file: int8.file(file) for file in int8.manifest.files}
    files["arrays.npz"] = Bundle.arrays_bytes(arrays)
    with pytest.raises(BundleError, match="damaged"):
        Bundle.load(Bundle.write(tmp_path / "damaged", int8.manifest, files)).session(1)


def test_the_model_cards_test_table_is_the_held_out_record():
    """The card's float / int8 held-out table quotes src/dermscreen/models/held-out.json for both bundles."""
    from dermscreen.evaluation.held_out import held_out_for

    card = (Path(__file__).resolve().parents[1] / "docs" / "model-card.md").read_text(encoding="utf-8")
    section = card.split("## The int8 copy", 1)[1].split("\n## ", 1)[0]
    held = [held_out_for(Bundle.load(path).sha256) for path in (DEFAULT, INT8)]

    def cell(entry: dict) -> str:
        return f"{entry['value']:.3f} ({entry['ci95'][0]:.3f}–{entry['ci95'][1]:.3f})"

    rows = {"balanced accuracy": "balanced_accuracy", "malignant-vs-benign AUC": "malignant_auc",
            "melanoma AUC": "melanoma_auc", "macro AUC": "macro_auc", "ECE (calibrated)": "ece"}
    for label, key in rows.items():
        assert f"| {label} | {cell(held[0]['metrics'][key])} | {cell(held[1]['metrics'][key])} |" in section, label
    for what in ("sensitivity", "specificity"):
        line = (f"| sensitivity-first point: {what} | {cell(held[0]['operating_points']['sensitivity_first'][what])} | "
                f"{cell(held[1]['operating_points']['sensitivity_first'][what])} |")
        assert line in section, what


def test_the_model_cards_int8_section_quotes_its_manifest():
    """docs/model-card.md's numbers for the int8 copy are the ones its manifest records (no drift after a remake)."""
    card = (Path(__file__).resolve().parents[1] / "docs" / "model-card.md").read_text(encoding="utf-8")
    section = card.split("## The int8 copy", 1)[1].split("\n## ", 1)[0]
    float_m, int8_m = Bundle.load(DEFAULT).manifest, Bundle.load(INT8).manifest
    v = int8_m.training["quantization"]["validation"]
    points = {op.name: op for op in int8_m.operating_points}
    float_points = {op.name: op for op in float_m.operating_points}
    quoted = [f"{100 * v['top1_agreement']:.1f} %", f"{100 * v['referral_agreement']:.1f} %",
              f"up to {v['max_p_malignant_change']:.2f}", f"temperature {int8_m.calibration.temperature:.3f}",
              f"threshold {points['sensitivity_first'].threshold:.3f}", f"one {points['balanced'].threshold:.3f}",
              f"{100 * points['sensitivity_first'].specificity:.1f} % of benign",
              f"float model's {100 * float_points['sensitivity_first'].specificity:.1f} %",
              f"balanced accuracy {v['int8']['balanced_accuracy']:.3f} vs {v['float']['balanced_accuracy']:.3f}",
              f"{100 * int8_m.ood.validation_kept:.1f} %"]
    for text in quoted:
        assert text in section, text
