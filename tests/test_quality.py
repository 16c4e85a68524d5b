"""The quality gate: real dermoscopic images pass, severe capture failures are refused with a reason."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dermscreen.quality import QualityThresholds, assess, measure


def _texture(w: int = 200, h: int = 150, seed: int = 0) -> np.ndarray:
    """A skin-like synthetic image: smooth colour field, fine texture and a dark blob (the 'lesion')."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([190 + 0 * xx, 140 + 0 * xx, 120 + 0 * xx], -1).astype(np.float32)
    base += rng.normal(0, 12, (h, w, 1))
    blob = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 4) ** 2
    base[blob] *= 0.45
    return np.clip(base, 0, 255).astype(np.uint8)


def test_measures_are_in_expected_ranges():
    m = measure(_texture())
    assert set(m) == {"sharpness", "brightness", "highlights", "clipped", "contrast", "chroma", "min_side"}
    assert 0 < m["sharpness"] and 0 <= m["clipped"] <= 1 and 0 <= m["brightness"] <= m["highlights"] <= 255
    assert m["min_side"] == 150


def test_sharpness_falls_with_blur():
    img = Image.fromarray(_texture())
    values = [measure(np.asarray(img.filter(ImageFilter.GaussianBlur(r))))["sharpness"] for r in (0, 1, 2, 4)]
    assert values == sorted(values, reverse=True) and values[-1] < values[0] / 3


def test_clean_synthetic_image_passes_without_warning():
    report = assess(_texture())
    assert report.passed and report.warnings == [] and report.refused_reason is None


@pytest.mark.parametrize("degrade,word", [
    (lambda a: np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(6))), "blurred"),
    (lambda a: (a * 0.05).astype(np.uint8), "dark"),
    (lambda a: np.clip(a.astype(int) * 5, 0, 255).astype(np.uint8), "bright"),
    (lambda a: np.full_like(a, 128), "uniform"),
    (lambda a: np.asarray(Image.fromarray(a).resize((40, 30))), "too small"),
    (lambda a: np.repeat(a.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2), "grey-scale"),
])
def test_severe_degradations_are_refused_with_reason(degrade, word):
    report = assess(degrade(_texture()))
    assert not report.passed
    assert word in report.refused_reason


def test_mild_problems_only_warn():
    small = np.asarray(Image.fromarray(_texture()).resize((133, 100)))
    report = assess(small)
    assert report.passed and any("Low resolution" in w for w in report.warnings)


def test_large_dark_lesion_is_not_called_underexposed():
    img = _texture()
    img[20:130, 30:170] = (img[20:130, 30:170] * 0.1).astype(np.uint8)  # the lesion fills the centre
    report = assess(img)
    assert report.measures["brightness"] < 30 and report.passed and report.warnings == []


def test_thresholds_can_be_overridden():
    strict = QualityThresholds(min_side_refuse=400, min_side_warn=500)
    assert not assess(_texture(), strict).passed


@pytest.mark.data
def test_real_images_pass(ham_dir, ham224_dir):
    """A spread sample of both copies of HAM10000; the full measurement is benchmarks/bench_quality_gate.py."""
    paths = sorted((ham_dir / "images").glob("*.jpg"))[::100] + sorted((ham224_dir / "images").glob("*.jpg"))[::100]
    reports = [assess(np.asarray(Image.open(p).convert("RGB"))) for p in paths]
    passed = sum(r.passed for r in reports)
    assert passed / len(reports) >= 0.99, [r.refused_reason for r in reports if not r.passed]


@pytest.mark.data
def test_real_image_in_grey_scale_is_refused(ham_dir):
    rgb = np.asarray(Image.open(ham_dir / "images" / "ISIC_0024306.jpg").convert("RGB"))
    assert assess(rgb).passed
    grey = np.asarray(Image.fromarray(rgb).convert("L").convert("RGB"))
    report = assess(grey)
    assert not report.passed and "grey-scale" in report.refused_reason


def test_real_image_blurred_is_refused(ham_dir):
    img = Image.open(sorted((ham_dir / "images").glob("*.jpg"))[0]).convert("RGB")
    assert assess(np.asarray(img)).passed
    assert not assess(np.asarray(img.filter(ImageFilter.GaussianBlur(5)))).passed


def test_quantile_is_the_nearest_rank_value_whatever_the_array():
    """_quantile's integer-view shortcut for non-negative float32 gives exactly what a plain partition gives."""
    from dermscreen.quality import _quantile

    rng = np.random.default_rng(3)
    arrays = [rng.random((150, 200), dtype=np.float32) * 255,  # the shortcut
              (rng.random((90, 120), dtype=np.float32) * 255)[10:80, 20:100],  # a centre box (reshape copies it)
              np.zeros((4, 4), np.float32), rng.normal(size=1000).astype(np.float32),  # zeros; negatives: fallback
              np.array([0.5, -0.0, 0.25, 0.0, 1.0], np.float32),  # -0.0 has the sign bit: fallback
              rng.integers(0, 255, 500).astype(np.uint8), rng.random(77)]  # other dtypes: fallback
    for values in arrays:
        flat = np.sort(values.reshape(-1))
        for q in (0.0, 0.05, 0.5, 0.95, 1.0):
            assert _quantile(values, q) == float(flat[min(flat.size - 1, int(round(q * (flat.size - 1))))])
    assert _quantile(np.zeros((0, 3), np.float32), 0.5) == 0.0
