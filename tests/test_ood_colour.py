"""The colour check beside the embedding OOD check: features, fit, refusal in the Screener, refit-ood."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from dermscreen.bundle import Bundle, sha256_bytes
from dermscreen.ood import ColourOOD, colour_features


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _real(ham_dir, n: int, start: int = 0) -> list[np.ndarray]:
    paths = sorted((ham_dir / "images").glob("*.jpg"))[start::97][:n]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_colour_features_are_those_of_the_thumbnail():
    yy, xx = np.mgrid[0:480, 0:640]
    big = np.stack([150 + 80 * np.sin(xx / 90), 110 + 60 * np.cos(yy / 70), 90 + 40 * np.sin((xx + yy) / 120)],
                   axis=-1).astype(np.uint8)  # smooth colours: any size shows the same statistics
    half = np.asarray(Image.fromarray(big).resize((320, 240), Image.BILINEAR))
    np.testing.assert_allclose(colour_features(big), colour_features(half), rtol=0.03, atol=0.3)
    grey = np.full((50, 50, 3), 120, np.uint8)
    f = colour_features(grey)
    assert f[0] == 0 and f[1] == 0 and f[2] == 0 and f[4] == 0  # no chroma, no channel differences, flat


@pytest.mark.data
def test_colour_check_keeps_dermoscopy_and_refuses_green_and_blue_pictures(ham_dir):
    train = np.array([colour_features(x) for x in _real(ham_dir, 80)])
    held_out = _real(ham_dir, 20, start=50)
    check = ColourOOD.fit(train)
    threshold = float(np.quantile(check.score(train), 0.99))
    inside = check.score(np.array([colour_features(x) for x in held_out]))
    assert (inside <= threshold).mean() >= 0.85
    green = [x[..., [1, 0, 2]] for x in held_out[:5]]  # red and green swapped: a green picture
    blue = [x[..., ::-1] for x in held_out[:5]]  # red and blue swapped: a blue-tinted picture
    for images in (green, blue):  # (grey-scale pictures are the quality gate's: test_quality)
        assert (check.score(np.array([colour_features(x) for x in images])) > threshold).all()
    again = ColourOOD.from_arrays(check.to_arrays())
    np.testing.assert_allclose(again.score(train[:3]), check.score(train[:3]))
    assert ColourOOD.from_arrays({}) is None  # bundles from before the check


@pytest.mark.data
def test_refit_ood_cli_adds_the_colour_check_and_the_screener_uses_it(tiny_bundle, ham_dir, tmp_path):
    from typer.testing import CliRunner

    from dermscreen.cli import app
    from dermscreen.manifests import load_labels
    from dermscreen.screening import COLOUR_REFUSAL, Screener

    data = load_labels(ham_dir / "HAM10000_metadata.csv")
    samples = data.samples[::50][:120]  # a small labelled subset with its own split file
    csv_path = tmp_path / "data.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lesion_id", "image_id", "dx"])
        for s in samples:
            w.writerow([s.lesion_id, s.image_id, s.dx])
    split = tmp_path / "split.csv"
    with open(split, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "split"])
        for k, s in enumerate(samples):
            w.writerow([s.image_id, ("train", "train", "val", "test")[k % 4]])
    before = {p.name: sha256_bytes(p.read_bytes()) for p in tiny_bundle.iterdir()}
    out = tmp_path / "refit"
    result = CliRunner().invoke(app, ["refit-ood", "--bundle", str(tiny_bundle), "--data", str(csv_path),
                                      "--images", str(ham_dir / "images"), "--split", str(split), "--out", str(out),
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "colour check" in result.output
    bundle = Bundle.load(out)  # verified
    ood = bundle.manifest.ood
    assert ood.colour_threshold > 0 and ood.colour_validation_kept >= 0.95 and ood.validation_kept >= 0.9
    assert ood.validation_kept_both <= min(ood.validation_kept, ood.colour_validation_kept)
    assert {p.name: sha256_bytes(p.read_bytes()) for p in tiny_bundle.iterdir()} == before  # source untouched
    assert bundle.file("model.onnx") == (tiny_bundle / "model.onnx").read_bytes()
    info = CliRunner().invoke(app, ["info", "--model", str(out)])
    assert info.exit_code == 0 and "colour check" in " ".join(info.output.split())  # the card says it has the check
    # the Screener refuses a green copy of a real image by colour, before running the model
    screener = Screener(out)
    rgb = np.asarray(Image.open(samples[2].image_path).convert("RGB"))
    refused = screener.analyze(_jpeg(np.ascontiguousarray(rgb[..., [1, 0, 2]])), heatmap=False)
    assert refused.status == "cannot_assess" and refused.reasons == [COLOUR_REFUSAL]
    assert refused.ood.colour_score > refused.ood.colour_threshold and refused.ood.in_distribution is False
    assert refused.lesion is None and refused.debug.colour_score == refused.ood.colour_score
    # a wrong split file is a clear error
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    failed = CliRunner().invoke(app, ["refit-ood", "--bundle", str(tiny_bundle), "--data", str(csv_path),
                                      "--images", str(ham_dir / "images"), "--split", str(bad), "--out",
                                      str(tmp_path / "x")])
    assert failed.exit_code == 2 and "not a split file" in failed.output
