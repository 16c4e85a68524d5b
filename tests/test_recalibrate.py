"""``dermscreen calibrate``: a bundle's temperature and operating points fitted again on a user's images.

The shipped model refitted on its own validation split must give back exactly what training stored (same
pipeline); a tiny random bundle on real images checks the new bundle, its record and every refusal.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dermscreen.bundle import Bundle
from dermscreen.errors import ConfigError
from dermscreen.recalibrate import recalibrate
from dermscreen.screening import Screener

DEFAULT = Path(__file__).resolve().parents[1] / "src" / "dermscreen" / "models" / "default"


@pytest.fixture(scope="module")
def real_labels(ham224_dir, tmp_path_factory) -> Path:
    """A plain CSV of 60 real HAM10000 images: 25 melanomas, 5 bcc, 30 naevi (absolute paths)."""
    rows = list(csv.DictReader(open(ham224_dir / "HAM10000_metadata.csv", newline="")))
    take = {"mel": 25, "bcc": 5, "nv": 30}
    chosen = []
    for row in rows:
        if take.get(row["dx"], 0) > 0:
            take[row["dx"]] -= 1
            chosen.append([str(ham224_dir / "images" / f"{row['image_id']}.jpg"), row["dx"], row["lesion_id"]])
    path = tmp_path_factory.mktemp("recal") / "clinic.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["image", "dx", "lesion_id"], *chosen])
    return path


def _only(labels: Path, dx: str, path: Path) -> Path:
    """A copy of a plain labels CSV with the rows of one diagnosis only."""
    lines = labels.read_text().splitlines()
    path.write_text("\n".join([lines[0], *[line for line in lines[1:] if line.split(",")[1] == dx]]) + "\n")
    return path


def test_refitting_the_shipped_model_on_its_validation_split_gives_back_its_own_numbers(ham224_dir, tmp_path):
    shipped = Bundle.load(DEFAULT).manifest
    result = recalibrate(None, ham224_dir / "HAM10000_metadata.csv", tmp_path / "again", split="val")
    m = Bundle.load(result.out).manifest  # written and verified
    assert m.calibration.temperature == pytest.approx(shipped.calibration.temperature, abs=1e-6)
    assert m.calibration.ece_after == pytest.approx(shipped.calibration.ece_after, abs=1e-6)
    for new, old in zip(m.operating_points, shipped.operating_points, strict=True):
        assert new.name == old.name
        assert (new.threshold, new.sensitivity, new.specificity) == pytest.approx(
            (old.threshold, old.sensitivity, old.specificity), abs=1e-6)
    assert any("already calibrated this model" in w for w in result.warnings)
    record = m.training["recalibrations"][-1]
    assert record["images"] == 855 and record["labels"]["split"]["remade"] is True
    assert m.calibration.split == "recalibrated on 855 images of HAM10000_metadata.csv, val split"
    # evaluating the new bundle on the images it was refit on is flagged; on its test split it is not
    from dermscreen.evaluation.evaluate import _load, recalibration_warning

    labels = ham224_dir / "HAM10000_metadata.csv"
    for split, flagged in (("val", True), ("test", False), (None, True)):
        bundle, data, info = _load(result.out, labels, None, None, split)
        assert (recalibration_warning(bundle, data, info) is not None) is flagged, split
    assert recalibration_warning(Bundle.load(DEFAULT), *_load(DEFAULT, labels, None, None, "val")[1:]) is None
    # everything but the calibration, the points and the record is the shipped bundle's
    assert Bundle.load(result.out).file("model.onnx") == Bundle.load(DEFAULT).file("model.onnx")
    assert m.ood == shipped.ood and m.taxonomy == shipped.taxonomy


def test_new_bundle_records_the_fit_and_the_screener_uses_its_thresholds(tiny_bundle, real_labels, tmp_path):
    old = Bundle.load(tiny_bundle).manifest
    result = recalibrate(tiny_bundle, real_labels, tmp_path / "clinic", target_sensitivity=0.9)
    m = Bundle.load(result.out).manifest
    record = m.training["recalibrations"][-1]
    assert (record["images"], record["malignant"]) == (60, 30)
    assert record["temperature"] == {"before": old.calibration.temperature, "after": m.calibration.temperature}
    assert m.calibration.temperature != old.calibration.temperature
    assert m.calibration.split == "recalibrated on 60 images of clinic.csv"
    first = m.operating_point("sensitivity_first")
    assert first.sensitivity >= 0.9 and "clinic.csv (recalibration)" in first.description
    # the achieved numbers in the record are the points' own, measured on these images
    assert record["operating_points"]["after"]["sensitivity_first"]["sensitivity"] == pytest.approx(first.sensitivity)
    assert any("Only 60 images" in w for w in result.warnings)
    screener = Screener(result.out)
    assert sorted(o.threshold for o in screener.tier_points) == sorted(o.threshold for o in m.operating_points)
    assert json.loads((Path(tiny_bundle) / "manifest.json").read_text())["calibration"] == \
        old.calibration.model_dump()  # the source bundle is untouched


def test_calibrating_on_a_split_files_test_part_says_so_and_records_no_folder(tiny_bundle, real_labels, tmp_path):
    import csv as _csv

    ids = [Path(row["image"]).stem for row in _csv.DictReader(open(real_labels, newline=""))]
    split = tmp_path / "split.csv"
    split.write_text("image_id,split\n" + "".join(f"{i},test\n" for i in ids))
    result = recalibrate(tiny_bundle, real_labels, tmp_path / "refit", split_file=split, split="test")
    # a split file of one's own: its "test" images are no longer held-out for the new bundle (the model's own test
    # split, remade, is "spent": test_calibrating_on_the_models_own_test_split_spends_it)
    assert any("no longer held-out for the new bundle" in w for w in result.warnings), result.warnings
    record = Bundle.load(result.out).manifest.training["recalibrations"][-1]
    assert record["labels"]["split"]["file"] == "split.csv"  # the file's name, not the folder it was in


def test_calibrating_on_the_models_own_test_split_spends_it(ham224_dir, tmp_path):
    result = recalibrate(None, ham224_dir / "HAM10000_metadata.csv", tmp_path / "spent", split="test")
    assert any("spends the model's test split" in w for w in result.warnings), result.warnings
    record = Bundle.load(result.out).manifest.training["recalibrations"][-1]
    assert record["labels"]["split"]["remade"] and "/" not in record["labels"]["split"]["file"]


def test_refusals_are_sentences_and_leave_nothing_behind(tiny_bundle, real_labels, ham224_dir, tmp_path):
    few = tmp_path / "few.csv"
    few.write_text("\n".join(real_labels.read_text().splitlines()[:21]) + "\n")  # 20 melanomas, no benign
    cases = [
        (dict(model=tiny_bundle, labels=few, out=tmp_path / "a"), "too few images to calibrate on"),
        (dict(model=tiny_bundle, labels=real_labels, out=tiny_bundle), "never modified in place"),
        (dict(model=tiny_bundle, labels=real_labels, out=tmp_path / "b", target_sensitivity=1.0), "target sensitivity"),
        (dict(model=None, labels=ham224_dir / "HAM10000_metadata.csv", out=tmp_path / "c", split="train"),
         "trained on"),
        (dict(model=None, labels=ham224_dir / "HAM10000_metadata.csv", out=tmp_path / "d"), "trained on"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ConfigError, match=words):
            recalibrate(**kwargs)
    with pytest.raises(ConfigError, match="too few malignant"):
        recalibrate(tiny_bundle, _only(real_labels, "nv", tmp_path / "benign.csv"), tmp_path / "e")
    with pytest.raises(ConfigError, match="outside the bundle"):
        recalibrate(tiny_bundle, real_labels, Path(tiny_bundle) / "inside")
    assert not (Path(tiny_bundle) / "inside").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        recalibrate(tiny_bundle, real_labels, full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benign.csv", "few.csv", "full"]
    assert (full / "keep.txt").read_text() == "mine"


def test_cli_prints_before_and_after_and_exits_2_on_a_refusal(tiny_bundle, real_labels, tmp_path):
    from dermscreen.cli import app

    res = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_bundle), "--labels", str(real_labels),
                                   "--out", str(tmp_path / "new")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "Recalibrated on 60 images (30 malignant)" in text and "sensitivity_first" in text
    assert "not a diagnosis" in text and (tmp_path / "new" / "manifest.json").is_file()
    res = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_bundle), "--labels", str(real_labels),
                                   "--out", str(tmp_path / "new")])
    assert res.exit_code == 2 and "not empty" in res.output and "Traceback" not in res.output
    assert np.isfinite(Bundle.load(tmp_path / "new").manifest.calibration.temperature)
    # info says the bundle was refit, on what, and that its metrics are still the original validation's
    res = CliRunner().invoke(app, ["info", "--model", str(tmp_path / "new")])
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "recalibrated" in text and "on 60 images (30 malignant) of clinic.csv" in text
    assert "recalibrated" not in " ".join(CliRunner().invoke(app, ["info", "--model", str(tiny_bundle)]).output.split())
    card = Screener(tmp_path / "new").model_card()
    assert card["calibration"]["split"] == "recalibrated on 60 images of clinic.csv"
    assert "Operating points (recalibrated on 60 images of clinic.csv; measured on those images)" in text
