"""Class activation maps: exact for a linear head, correct gradient for the malignant group, rendering."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dermscreen.calibration import softmax
from dermscreen.explain import (Heatmaps, cam, data_url, malignant_direction, normalise, overlay_rgba, palette_png,
                                png_bytes)


def test_cam_averages_to_the_logit():
    rng = np.random.default_rng(0)
    features, weight, bias = rng.normal(size=(16, 5, 7)), rng.normal(size=(4, 16)), rng.normal(size=4)
    logits = weight @ features.mean(axis=(1, 2)) + bias
    for c in range(4):
        assert np.isclose(cam(features, weight[c]).mean() + bias[c], logits[c], atol=1e-5)


def test_malignant_direction_is_the_gradient_of_log_p_malignant():
    rng = np.random.default_rng(1)
    weight, emb = rng.normal(size=(5, 8)), rng.normal(size=8)
    mask, temperature = np.array([True, False, True, False, False]), 1.7

    def log_p_mal(e):
        return np.log(softmax((weight @ e)[None], temperature)[0][mask].sum())

    probs = softmax((weight @ emb)[None], temperature)[0]
    direction = malignant_direction(probs, mask, weight, temperature)
    eps = 1e-5
    numeric = np.array([(log_p_mal(emb + eps * np.eye(8)[i]) - log_p_mal(emb - eps * np.eye(8)[i])) / (2 * eps)
                        for i in range(8)])
    assert np.allclose(direction, numeric, atol=1e-4)


def test_normalise_and_overlay():
    heat = normalise(np.array([[-1.0, 0.0], [1.0, 3.0]]))
    assert heat.min() == 0 and heat.max() == 1 and heat[0, 0] == 0
    assert normalise(np.full((2, 2), -1.0)).max() == 0
    rgba = overlay_rgba(heat, max_alpha=0.5)
    assert rgba.shape == (2, 2, 4) and rgba[0, 0, 3] == 0 and rgba[1, 1, 3] == round(0.5 * 255)


def test_heatmaps_cover_only_the_model_box():
    raw = np.ones((4, 4), np.float32)
    raw[0, 0] = 5
    maps = Heatmaps("mel", raw, raw, box=(50, 0, 200, 150), image_size=(300, 150), max_side=600)
    heat = maps.heat("malignant")
    assert heat.shape == (150, 300)
    assert heat[:, :50].max() == 0 and heat[:, 200:].max() == 0 and heat[:, 50:200].min() > 0
    png = maps.overlay_png("top_class")
    img = Image.open(io.BytesIO(png)).convert("RGBA")
    assert img.size == (300, 150)
    assert np.array_equal(np.asarray(img), maps.overlay("top_class"))  # the palette PNG is the RGBA overlay
    assert data_url(png).startswith("data:image/png;base64,")
    blended = maps.blended(np.zeros((150, 300, 3), np.uint8))
    assert blended[:, :50].max() == 0 and blended[:, 50:200].max() > 0


def test_display_size_is_capped():
    maps = Heatmaps("nv", np.ones((2, 2)), np.ones((2, 2)), box=(0, 0, 4000, 3000), image_size=(4000, 3000),
                    max_side=400)
    assert maps.display_size == (400, 300) and maps.heat().shape == (300, 400)
    assert png_bytes(maps.overlay())[:8] == b"\x89PNG\r\n\x1a\n"


def test_palette_png_is_read_back_exactly_by_pillow():
    # our own PNG writer (zlib releases the interpreter lock; Pillow's encoder does not): indices, colours and
    # opacities must come back unchanged, for odd sizes too
    rng = np.random.default_rng(1)
    palette = np.array([(0, 0, 0), (0, 229, 255), (250, 10, 60)], np.uint8)
    alpha = np.array([0, 255, 128], np.uint8)
    for h, w in ((1, 1), (37, 53), (384, 512)):
        index = rng.integers(0, 3, (h, w), dtype=np.uint8)
        img = Image.open(io.BytesIO(palette_png(index, palette, alpha)))
        img.load()
        assert img.mode == "P" and img.size == (w, h)
        assert np.array_equal(np.asarray(img), index)
        assert np.array_equal(np.asarray(img.getpalette()[:9], np.uint8).reshape(3, 3), palette)
        rgba = np.asarray(img.convert("RGBA"))
        assert np.array_equal(rgba[..., 3], alpha[index]) and np.array_equal(rgba[..., :3], palette[index])


def test_one_bit_palette_png_is_read_back_exactly_by_pillow():
    # the lesion outline is written with one bit per pixel: rows of any width, padding bits ignored
    rng = np.random.default_rng(2)
    palette = np.array([(0, 0, 0), (0, 229, 255)], np.uint8)
    alpha = np.array([0, 255], np.uint8)
    for h, w in ((1, 1), (3, 7), (37, 53), (150, 200), (450, 601)):
        index = (rng.random((h, w)) < 0.3).astype(np.uint8)
        img = Image.open(io.BytesIO(palette_png(index, palette, alpha, bit_depth=1)))
        img.load()
        assert img.size == (w, h)
        rgba = np.asarray(img.convert("RGBA"))
        assert np.array_equal(rgba[..., 3], alpha[index]) and np.array_equal(rgba[..., :3], palette[index])
    with pytest.raises(ValueError):
        palette_png(np.full((2, 2), 2, np.uint8), palette, alpha, bit_depth=1)


def test_a_map_with_no_positive_evidence_is_said_to_be_empty(tiny_bundle):
    # a map where no cell raises P(malignant) draws nothing: the report must say so, not show the bare image under
    # "Evidence for a malignant lesion" as if it were a map
    from dermscreen.report import to_html
    from dermscreen.screening import Screener, ScreenerSettings

    against = -np.ones((5, 5), np.float32)
    maps = Heatmaps("nv", np.ones((5, 5), np.float32), against, box=(0, 0, 200, 150), image_size=(200, 150))
    assert not maps.has_evidence("malignant") and maps.has_evidence("top_class")
    assert not maps.overlay("malignant")[..., 3].any()
    rgb = np.full((150, 200, 3), 180, np.uint8)
    result = Screener(tiny_bundle, ScreenerSettings(ood_refusal=False, quality_gate=False)).analyze_image(rgb)
    assert result.to_json()["heatmap"]["malignant_evidence"] == result.heatmaps.has_evidence("malignant")
    result._heatmaps = maps  # the analysis, with the empty map
    html = to_html(result, rgb)
    assert "Evidence for a malignant lesion (heatmap): no area of the image raised it, so the map is empty" in html
    assert "Evidence for nv (heatmap)</figcaption>" in html
