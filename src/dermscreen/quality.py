"""Image quality gate: blur, exposure, blank and grey-scale frames and resolution, measured in milliseconds with numpy.

Each check gives a measure, a warning threshold and a refusal threshold. Warnings are reported
beside the result; a refusal makes the Screener answer "cannot assess" with the reason. The
default thresholds were set from measurements on the HAM10000 images and on synthetically
degraded copies of them (benchmarks/bench_quality_gate.py; docs/quality-gate.md): the gate passes
more than 99 % of real dermoscopic images and refuses the severely degraded ones.

All measures are taken on a working copy whose shorter side is at most ``WORK_SIDE`` pixels — about
the scale the model sees — and on the central part of the frame, because dermoscopes leave a dark
circular vignette in the corners that says nothing about the lesion.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from .preprocess import LARGE_IMAGE_REDUCING_GAP

WORK_SIDE = 256
CENTRE_FRACTION = 0.6  # side of the central box used for exposure/blur measures, as a share of each side


class QualityThresholds(BaseModel):
    """Warning and refusal thresholds of the quality gate (defaults: docs/quality-gate.md)."""

    sharpness_warn: float = Field(0.042, description="warn below this Laplacian-to-contrast ratio (blur)")
    sharpness_refuse: float = Field(0.025, description="refuse below this Laplacian-to-contrast ratio")
    highlights_dark_warn: float = Field(100.0, description="warn when the frame's 95th-percentile luma (0-255) is below")
    highlights_dark_refuse: float = Field(60.0, description="refuse when the frame's 95th-percentile luma is below")
    brightness_bright_warn: float = Field(235.0, description="warn when the centre's median luma is above")
    brightness_bright_refuse: float = Field(250.0, description="refuse when the centre's median luma is above")
    clipped_warn: float = Field(0.1, description="warn when this share of centre pixels is saturated")
    clipped_refuse: float = Field(0.4, description="refuse when this share of centre pixels is saturated")
    contrast_refuse: float = Field(2.0, description="refuse a near-uniform frame: centre luma std below this")
    # the least colourful of 3,200 HAM10000 images (both copies) has a mean chroma of 5.3; grey-scale files have ~0
    chroma_refuse: float = Field(3.0, description="refuse a grey-scale image: mean chroma (max - min channel, "
                                 "0-255) below this; dermoscopy is judged on colour")
    min_side_warn: int = Field(128, description="warn when the shorter side (pixels) is below")
    min_side_refuse: int = Field(64, description="refuse when the shorter side (pixels) is below")


class QualityReport(BaseModel):
    """The gate's verdict: passed (not refused), warnings, the refusal reason, and the raw measures."""

    passed: bool
    warnings: list[str] = []
    refused_reason: str | None = None
    measures: dict[str, float] = {}


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _working_rgb(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → the same image downscaled so its shorter side is at most WORK_SIDE."""
    h, w = rgb.shape[:2]
    scale = WORK_SIDE / min(h, w)
    if scale >= 1.0:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing_gap: a big photo is first box-reduced by an integer factor (cheap), then resampled; it only acts
    # from a 6x reduction (shorter side >= 1536 px), so the images the thresholds were set on are unchanged
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR, reducing_gap=LARGE_IMAGE_REDUCING_GAP))


def chroma(rgb: np.ndarray) -> np.ndarray:
    """Per pixel max - min over the colour (last) axis of an (..., 3) array, in its dtype. Pairwise: numpy's
    reductions over a length-3 axis are ~20x slower."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)


def _centre(a: np.ndarray) -> np.ndarray:
    """The central CENTRE_FRACTION box of a 2-D (or 3-D) array."""
    h, w = a.shape[:2]
    dh, dw = int(h * (1 - CENTRE_FRACTION) / 2), int(w * (1 - CENTRE_FRACTION) / 2)
    return a[dh:h - dh, dw:w - dw]


def _laplacian_rms(gray: np.ndarray) -> float:
    """Root-mean-square of the 4-neighbour Laplacian of a float image (0 when too small)."""
    if min(gray.shape) < 3:
        return 0.0
    lap = 4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
    return float(np.sqrt(np.mean(lap * lap)))


def _pool2(gray: np.ndarray) -> np.ndarray:
    """2x2 average pooling (odd last row/column dropped)."""
    g = gray[: gray.shape[0] // 2 * 2, : gray.shape[1] // 2 * 2]
    return (g[0::2, 0::2] + g[1::2, 0::2] + g[0::2, 1::2] + g[1::2, 1::2]) * 0.25  # 5x faster than mean(axis)


def _quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile (nearest rank) of an array, by partial sort; 0 for an empty array."""
    flat = values.reshape(-1)
    if not flat.size:
        return 0.0
    k = min(flat.size - 1, int(round(q * (flat.size - 1))))
    if flat.dtype == np.float32 and flat.flags.c_contiguous and not np.signbit(flat).any():
        # IEEE floats without a sign bit (not even -0.0) order exactly as their bits read as integers; numpy partitions
        # int32 ~1.7x faster than float32 (no NaN handling): the same value, 0.1 ms less per measure
        return float(np.partition(flat.view(np.int32), k)[k:k + 1].view(np.float32)[0])
    return float(np.partition(flat, k)[k])


def measure(rgb: np.ndarray) -> dict[str, float]:
    """Quality measures of an (H, W, 3) uint8 image: sharpness, brightness, highlights, clipped, contrast, chroma,
    min_side."""
    work = _working_rgb(rgb)
    luma = work.astype(np.float32) @ _LUMA
    centre_rgb, gray = _centre(work), _centre(luma)
    contrast = float(gray.std()) if gray.size else 0.0
    # Under-exposure is judged on the frame's highlights, not its centre: a large dark lesion filling
    # the centre is the image that matters most, while a dark photo has no bright skin anywhere.
    highlights = _quantile(luma, 0.95)
    # Sharpness is the Laplacian energy relative to the contrast, so a faint but sharp lesion is not
    # called blurred. It is taken at half the working scale: at full scale the 8-bit rounding noise of
    # a smooth, defocused image looks like fine detail (docs/quality-gate.md).
    sharpness = _laplacian_rms(_pool2(gray)) / max(contrast, 1.0) / 4.0
    # "Clipped" means blown out to white on every channel; a single saturated channel is normal
    # for pink skin under dermoscope light.
    darkest_channel = np.minimum(np.minimum(centre_rgb[..., 0], centre_rgb[..., 1]), centre_rgb[..., 2])
    clipped = float(np.mean(darkest_channel >= 245)) if centre_rgb.size else 0.0
    mean_chroma = float(np.mean(chroma(work))) if work.size else 0.0
    return {
        "sharpness": round(sharpness, 5),
        "brightness": round(_quantile(gray, 0.5), 2),
        "highlights": round(highlights, 2),
        "clipped": round(clipped, 4),
        "contrast": round(contrast, 2),
        "chroma": round(mean_chroma, 2),
        "min_side": float(min(rgb.shape[:2])),
    }


def assess(rgb: np.ndarray, thresholds: QualityThresholds | None = None) -> QualityReport:
    """Run the quality gate on an (H, W, 3) uint8 image; returns a QualityReport."""
    t = thresholds or QualityThresholds()
    m = measure(rgb)
    refusals: list[str] = []
    warnings: list[str] = []

    def check(bad: bool, severe: bool, warn_text: str, refuse_text: str) -> None:
        if severe:
            refusals.append(refuse_text)
        elif bad:
            warnings.append(warn_text)

    side = int(m["min_side"])
    check(side < t.min_side_warn, side < t.min_side_refuse,
          f"Low resolution ({side} px on the shorter side): details of the lesion may be lost.",
          f"The image is too small ({side} px on the shorter side; at least {t.min_side_refuse} needed). "
          "Send the original photo, not a thumbnail.")
    blank = m["contrast"] < t.contrast_refuse
    check(False, blank, "", "The image is almost uniform (blank or covered lens): take the photo again.")
    check(False, not blank and m["chroma"] < t.chroma_refuse, "",
          "The image has no colour (grey-scale): dermoscopic assessment needs a colour photograph of the lesion.")
    if not blank:
        check(m["sharpness"] < t.sharpness_warn, m["sharpness"] < t.sharpness_refuse,
              "The image looks slightly blurred: results may be less reliable.",
              "The image is too blurred to assess: hold the dermatoscope still and refocus.")
        check(m["highlights"] < t.highlights_dark_warn, m["highlights"] < t.highlights_dark_refuse,
              "The image is dark: results may be less reliable.",
              "The image is too dark to assess: increase the lighting or exposure and retake it.")
    check(m["brightness"] > t.brightness_bright_warn or m["clipped"] > t.clipped_warn,
          m["brightness"] > t.brightness_bright_refuse or m["clipped"] > t.clipped_refuse,
          "Parts of the image are over-exposed: results may be less reliable.",
          "The image is too bright (over-exposed) to assess: reduce the lighting or exposure and retake it.")
    return QualityReport(passed=not refusals, warnings=warnings,
                         refused_reason=" ".join(refusals) or None, measures=m)
