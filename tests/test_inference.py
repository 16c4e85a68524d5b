"""Batch inference over image files with the tiny bundle (synthetic images, no data needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dermscreen.bundle
from dermscreen import inference
from dermscreen.bundle import Bundle
from dermscreen.calibration import softmax
from dermscreen.errors import BundleError, ImageError, InputError
from dermscreen.inference import load_rgb, predict_files, predict_samples, resolve_model
from dermscreen.manifests import Sample
from dermscreen.ood import MahalanobisOOD
from dermscreen.preprocess import preprocess


def _images(folder: Path, n: int, seed: int = 0, size=(90, 70)) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        arr[10:40, 20:60] = rng.integers(0, 120, 3)  # a dark "lesion" so images differ in structure
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def test_predictions_match_a_direct_run_of_the_model(tmp_path, tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    paths = _images(tmp_path, 11)
    preds = predict_files(bundle, paths, batch_size=4, workers=3)
    batch = np.stack([preprocess(Image.open(p).convert("RGB"), bundle.manifest.preprocessing) for p in paths])
    direct = bundle.run(batch)
    np.testing.assert_allclose(preds.logits, direct["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(preds.probs, softmax(direct["logits"], 1.5), atol=1e-6)
    np.testing.assert_allclose(preds.probs_uncalibrated, softmax(direct["logits"]), atol=1e-6)
    np.testing.assert_allclose(preds.p_malignant, preds.probs[:, bundle.manifest.taxonomy.malignant_mask].sum(1))
    ood = MahalanobisOOD.from_arrays(bundle.arrays).score(direct["embedding"])
    np.testing.assert_allclose(preds.ood_score, ood, rtol=1e-4)
    assert (preds.in_distribution == (preds.ood_score <= bundle.manifest.ood.threshold)).all()
    assert preds.image_ids == [p.stem for p in paths]
    assert len(preds) == 11


def test_batch_size_and_workers_do_not_change_results(tmp_path, tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    paths = _images(tmp_path, 9)
    seen = []
    one = predict_files(bundle, paths, batch_size=1, workers=1)
    many = predict_files(bundle, paths, batch_size=4, workers=4, on_batch=seen.append)
    np.testing.assert_allclose(one.logits, many.logits, atol=1e-5)
    assert seen == [4, 4, 1]


def test_tta_averages_logits_over_four_flips(tmp_path, tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    paths = _images(tmp_path, 3)
    plain = predict_files(bundle, paths)
    tta = predict_files(bundle, paths, tta=True)
    batch = np.stack([preprocess(Image.open(p).convert("RGB"), bundle.manifest.preprocessing) for p in paths])
    views = [batch, batch[..., ::-1], batch[..., ::-1, :], batch[..., ::-1, ::-1]]
    expected = np.mean([bundle.run(np.ascontiguousarray(v))["logits"] for v in views], axis=0)
    np.testing.assert_allclose(tta.logits, expected, atol=1e-5)
    assert not np.allclose(tta.logits, plain.logits)
    np.testing.assert_allclose(tta.ood_score, plain.ood_score)  # OOD uses the identity view only


def test_metadata_is_encoded_and_fed(tmp_path, tiny_bundle_meta):
    bundle = Bundle.load(tiny_bundle_meta)
    path = _images(tmp_path, 1)[0]
    old = Sample("a", path, "nv", age=80, sex="male", site="back")
    young = Sample("b", path, "nv", age=20, sex="female", site="face")
    preds = predict_samples(bundle, [old, young])
    assert not np.allclose(preds.logits[0], preds.logits[1])  # same pixels, different patient
    spec = bundle.manifest.model.metadata
    image = preprocess(Image.open(path).convert("RGB"), bundle.manifest.preprocessing)[None]
    direct = bundle.run(image, spec.encode(80, "male", "back")[None])["logits"]
    np.testing.assert_allclose(preds.logits[0], direct[0], atol=1e-5)
    assert inference.metadata_matrix(Bundle.load(tiny_bundle_meta), [old]).shape == (1, spec.dim)


def test_every_front_end_reads_sex_the_same_way(tmp_path):
    # one table of spellings (metadata.SEX_SPELLINGS) serves the CSV reader, the encoding and the Screener (and the
    # API's validator: test_serve_api)
    from dermscreen.manifests import _parse_sex
    from dermscreen.metadata import MetadataSpec, sex_code
    from dermscreen.screening import Screener

    spec = MetadataSpec()
    for spelling, code in (("M", "male"), (" male ", "male"), ("f", "female"), ("FEMALE", "female"),
                           ("u", "unknown"), ("Unknown", "unknown"), ("x", None), ("", None), (None, None)):
        assert sex_code(spelling) == code, spelling
        assert _parse_sex(spelling) == (code if code in ("male", "female") else None), spelling
        flags = spec.encode(None, spelling, None)[2:5]
        assert list(flags) == [code == "male", code == "female", code not in ("male", "female")], spelling
    check = Screener._metadata_vector
    fake = type("S", (), {"metadata_spec": None})()
    for fine in ("M", "female", "u", "", None):
        check(fake, None, fine, None)
    with pytest.raises(InputError, match="not recognised"):
        check(fake, None, "x", None)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :10] = 255  # white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    image = load_rgb(tmp_path / "rot.jpg")
    assert image.size == (20, 40) and image.mode == "RGB"
    assert np.asarray(image)[:10].mean() > 200  # the band is now on top


def test_unreadable_and_missing_files_name_the_file(tmp_path, tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    paths = _images(tmp_path, 5)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        predict_files(bundle, paths + [broken], batch_size=2)
    with pytest.raises(ImageError, match="gone.png"):
        predict_files(bundle, [tmp_path / "gone.png"])
    with pytest.raises(ImageError, match="No images"):
        predict_files(bundle, [])


def test_resolve_model_order(tmp_path, monkeypatch):
    monkeypatch.delenv(inference.MODEL_ENV, raising=False)
    monkeypatch.setattr(dermscreen.bundle, "DEFAULT_BUNDLE_DIR", tmp_path / "none")
    with pytest.raises(BundleError, match="--model"):
        resolve_model(None)
    assert resolve_model(tmp_path / "given") == tmp_path / "given"
    monkeypatch.setenv(inference.MODEL_ENV, str(tmp_path / "env"))
    assert resolve_model(None) == tmp_path / "env"
    monkeypatch.delenv(inference.MODEL_ENV)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "manifest.json").write_text("{}")
    assert resolve_model(None) == tmp_path / "none"


def test_normalize_is_the_textbook_formula_channels_first():
    # normalize reorders the uint8 pixels before the arithmetic (for speed); the values must be exactly
    # (x / 255 - mean) / std computed the plain way, laid out (3, H, W) and contiguous for onnxruntime
    from dermscreen.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, normalize

    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    spec = Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    plain = (rgb.astype(np.float32) / np.float32(255) - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(
        IMAGENET_STD, np.float32)
    x = normalize(rgb, spec)
    assert x.dtype == np.float32 and x.shape == (3, 37, 53) and x.flags.c_contiguous
    np.testing.assert_allclose(x, plain.transpose(2, 0, 1), rtol=0, atol=1e-6)
