"""Lesion mask, smart crop and ABCD descriptors (numpy + Pillow; scipy.ndimage only for the classical fallback).

Two ways to find the lesion, one result type (``Segmentation``):

- ``segment_classical``: no model needed. Lesions are darker and more saturated than the skin around
  them, so we threshold ``0.5 * (255 - blue) + 0.5 * chroma`` (Otsu, with a minimum-error fallback for
  small lesions); on 200 HAM10000 images this channel gave mean Dice 0.81 against 0.74 for plain
  luminance. Dark vignette corners (dermatoscope lens borders) are removed before thresholding, and the
  largest component near the centre is kept, smoothed and hole-filled. Measured: benchmarks/RESULTS.md.
- ``OnnxSegmenter``: the bundle's ``segmenter.onnx`` (trained by ``dermscreen train-segmenter``).

From a mask: ``mask_box`` (bounding box), ``smart_crop_box`` (a square around a small lesion, so a
lesion photographed small in a wide field reaches the classifier at the scale it was trained on), and
``abcd`` (asymmetry, border, colours, diameter), each with a one-line plain explanation. These are
descriptive measurements to support a clinician's reading, not a diagnosis or a validated ABCD score.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from .bundle import SEGMENTER_BATCH_DIM, Bundle, SegmenterSpec, check_new_bundle_folder
from .errors import BundleError, ConfigError
from .explain import palette_png
from .preprocess import fit_within, shrink_within
from .quality import chroma

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive, image pixels
Method = Literal["segmenter", "classical"]

SEGMENTER_MASK_SIDE = 128  # longest side of the segmenter's mask (see OnnxSegmenter.segment)
# Pillow's reducing_gap when shrinking an image (or a region) to the segmenter's working copy. 1.0 (an integer box
# reduction first from frames over twice that size) made wide 600x450 frames' lesion stage ~5 % cheaper still
# (2026-11-23 A/B), but moved their outlines and ABCD values a little, and the segmenter's Dice is measured on
# 200x150 photographs that it does not touch; 2.0 keeps every result as measured.
SEGMENTER_REDUCING_GAP = 2.0
WORK_MAX_SIDE = 256  # segment at most at this size: the mask's detail beyond it does not change a crop or ABCD
# border-connected pixels whose brightest channel is darker than this are the dermatoscope's lens edge, not skin
VIGNETTE_LUMA = 40
MIN_AREA_FRACTION = 0.002  # a "lesion" smaller than this share of the field is noise
MIN_CONTRAST = 12.0  # channel units between lesion and surrounding skin; below it there is no clear lesion

# Smart crop. On 2,003 HAM10000 masks the lesion's longest side is a median 0.74 (5th percentile 0.29)
# of the frame's shorter side: the classifier learned lesions at that scale. A lesion smaller than
# CROP_BELOW of the shorter side is cropped to a square in which it fills CROP_FILL of the side. 0.5 rather
# than 0.3: on validation images zoomed out 3x (benchmarks/bench_smart_crop.py) it catches the big lesions too
# (crop fired on 94 % instead of 64 %; balanced accuracy 0.457 vs 0.422) and left the originals as they were.
# CROP_FILL 1 (the lesion's bounding square, never narrower than the model's input) rather than 0.6: the
# classifier reads a lesion's size in its view, and a looser crop shows a big lesion smaller than the photographs
# it learned from showed it. On those zoomed-out validation images, cropping with the reference masks' boxes:
# 0.621 at 1 vs 0.562 at 0.6 (0.643 on the originals); with the segmenter: 0.560 vs 0.521, 0.538 at 0.9.
CROP_BELOW = 0.5
CROP_FILL = 1.0
MIN_CROP_SIDE = 32

ASYMMETRY_THRESHOLD = 0.15  # share of lesion area without a mirror partner across an axis → asymmetric
IRREGULAR_COMPACTNESS = 1.5  # compactness index above this reads as an irregular border (circle = 1)
COLOUR_MIN_SHARE = 0.05  # a colour counts as present when at least this share of lesion pixels has it
DIAMETER_MM_FLAG = 6.0  # the "D" of the ABCD rule: larger than 6 mm


# ---- results ------------------------------------------------------------------------------------------
class Asymmetry(BaseModel):
    """Mirror asymmetry of the lesion shape about its two principal axes."""

    major_axis: float = Field(description="share of lesion area with no mirror partner across the long axis (0-1)")
    minor_axis: float = Field(description="same across the short axis (0-1)")
    asymmetric_axes: int = Field(description=f"axes with a share above {ASYMMETRY_THRESHOLD} (0, 1 or 2)")
    explanation: str


class Border(BaseModel):
    """Border irregularity as the compactness index perimeter² / (4π area)."""

    compactness: float = Field(description="1 for a circle; larger for notched, ragged or elongated outlines")
    irregular: bool = Field(description=f"compactness above {IRREGULAR_COMPACTNESS}")
    explanation: str


class Colours(BaseModel):
    """Which of the six dermoscopic colours are present inside the lesion (see ``colour_labels``)."""

    present: list[str] = Field(description="colours covering at least 5 % of the lesion, most common first")
    shares: dict[str, float] = Field(description="share of lesion pixels of each of the six colours")
    count: int
    explanation: str


class Diameter(BaseModel):
    """The lesion's largest extent (maximum Feret diameter)."""

    pixels: float = Field(description="in pixels of the uploaded image")
    mm: float | None = Field(None, description="in millimetres, when the image carries its pixel spacing (DICOM)")
    explanation: str


class ABCD(BaseModel):
    """Asymmetry, Border, Colour, Diameter: the classic dermoscopic cues, measured on the lesion mask."""

    asymmetry: Asymmetry
    border: Border
    colours: Colours
    diameter: Diameter
    note: str = ("Measured automatically on the outlined region; a descriptive aid for the clinician, not a "
                 "validated ABCD score and not a diagnosis.")


# ---- segmentation ---------------------------------------------------------------------------------------
@dataclass
class Segmentation:
    """A lesion mask at working resolution: ``mask`` (h, w) bool; ``scale`` = mask px per image px.

    The mask covers the whole image, or, when ``frame_size`` is set, a region of it: the ``image_size`` pixels
    whose top-left corner is at ``origin`` in an image of ``frame_size`` (a small lesion segmented again around
    itself). Boxes, area and outlines are always given in the whole image.
    """

    mask: np.ndarray
    image_size: tuple[int, int]  # (width, height) of the segmented image (or region)
    method: Method
    found: bool
    # the image shrunk to the mask's size, when the segmenter made one: ABCD reads the lesion's colours from
    # it instead of shrinking the image a second time
    small: np.ndarray | None = None
    origin: tuple[int, int] = (0, 0)
    frame_size: tuple[int, int] | None = None

    @property
    def scale(self) -> float:
        return self.mask.shape[1] / self.image_size[0]

    @property
    def frame(self) -> tuple[int, int]:
        """(width, height) of the whole image."""
        return self.frame_size or self.image_size

    @property
    def area_fraction(self) -> float:
        """The lesion's share of the whole image."""
        if not self.found:
            return 0.0
        if self.frame_size is None:
            return float(self.mask.mean())
        return float(self.mask.sum() / self.scale**2 / (self.frame_size[0] * self.frame_size[1]))

    def box(self) -> Box | None:
        """Bounding box of the lesion in image pixels, or None when no lesion was found."""
        if not self.found:
            return None
        b = mask_box(self.mask)
        if b is None:
            return None
        (w, h), (x0, y0) = self.frame, self.origin
        s = self.scale
        return (max(0, x0 + math.floor(b[0] / s)), max(0, y0 + math.floor(b[1] / s)),
                min(w, x0 + math.ceil(b[2] / s)), min(h, y0 + math.ceil(b[3] / s)))


def working_copy(rgb: np.ndarray, max_side: int = WORK_MAX_SIDE) -> np.ndarray:
    """(H, W, 3) uint8 → the same image shrunk so its longest side is at most ``max_side``."""
    return shrink_within(rgb, max_side)


def lesion_channel(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 → (h, w) uint8 'lesion-ness' = ((255 - blue) + chroma) / 2: darker in blue, more chromatic."""
    # chroma in uint8: no float copies
    return ((255 - rgb[..., 2].astype(np.uint16) + chroma(rgb)) >> 1).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the level maximising between-class variance."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    w = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * w - mu) ** 2 / np.maximum(w * (1.0 - w), 1e-12)
    return int(np.argmax(between))


def minimum_error_threshold(values: np.ndarray) -> int:
    """Kittler-Illingworth minimum-error threshold of uint8 values (two Gaussians of unequal size and spread).

    Otsu assumes classes of similar size; a lesion covering a few per cent of a wide frame is better
    separated by this criterion (on zoomed-out HAM10000 images: no lesion found in 7 % of images vs 23 %).
    """
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    g = np.arange(256, dtype=np.float64)
    w1 = np.cumsum(p)
    w2 = 1.0 - w1
    m1, s1 = np.cumsum(p * g), np.cumsum(p * g * g)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu1, mu2 = m1 / w1, (m1[-1] - m1) / w2
        var1, var2 = s1 / w1 - mu1**2, (s1[-1] - s1) / w2 - mu2**2
        ok = (w1 > 1e-3) & (w2 > 1e-3) & (var1 > 1e-3) & (var2 > 1e-3)
        cost = w1 * np.log(var1) + w2 * np.log(var2) - 2.0 * (w1 * np.log(w1) + w2 * np.log(w2))
    if not ok.any():
        return otsu_threshold(values)
    return int(np.flatnonzero(ok)[np.argmin(cost[ok])])


def _vignette(value: np.ndarray) -> np.ndarray:
    """Regions whose brightest channel is very dark and that touch the frame border: a dermatoscope's lens edge."""
    labels, n = label_components(value < VIGNETTE_LUMA)
    if n == 0:
        return np.zeros(value.shape, dtype=bool)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, edge[edge > 0])


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a 2-D bool mask → (int32 labels, 0 outside, 1..n in raster order of each
    component's first pixel; n): exactly what ``scipy.ndimage.label`` gives with its default cross.

    Here, not scipy's, because importing scipy.ndimage took ~0.2 s in every process that screens (each batch
    worker, the server's start) and this is all the segmenter path needed of it. It works on runs (a row's
    stretch of True pixels): runs that overlap in adjacent rows are joined by union-find in numpy, with
    pointer jumping, so the loop turns a few times however long the component. ~0.13 ms on a 128 x 96 mask
    against scipy's ~0.08 ms: cheaper than the import for any batch under ~2,000 images per process.
    """
    m = np.ascontiguousarray(mask, dtype=bool)
    h, w = m.shape
    starts = m.copy()
    starts[:, 1:] &= ~m[:, :-1]
    run = np.cumsum(starts.ravel(), dtype=np.int32).reshape(h, w)  # each pixel's run number (1-based)
    n_runs = int(run[-1, -1]) if run.size else 0
    if n_runs == 0:
        return np.zeros((h, w), np.int32), 0
    run *= m
    # two overlapping runs of adjacent rows share one stretch of columns: its first column names the pair once
    both = m[:-1] & m[1:]
    first = both.copy()
    first[:, 1:] &= ~both[:, :-1]
    a, b = run[:-1][first], run[1:][first]
    parent = np.arange(n_runs + 1, dtype=np.int32)  # parent[r] <= r; a component's root is its first run
    while a.size:
        lower = np.minimum(parent[a], parent[b])
        np.minimum.at(parent, parent[a], lower)
        np.minimum.at(parent, parent[b], lower)
        while True:  # pointer jumping: every run straight to its root
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
        joined = parent[a] == parent[b]
        a, b = a[~joined], b[~joined]
    roots = np.unique(parent[1:])  # ascending run numbers: raster order of each component's first pixel
    number = np.zeros(n_runs + 1, np.int32)
    number[1:] = np.searchsorted(roots, parent[1:]) + 1
    return number[run], len(roots)


@functools.lru_cache(maxsize=8)
def _centre_distance(shape: tuple[int, int]) -> np.ndarray:
    """(h, w) squared distance from the centre, 1 at the middle of each edge (cached: masks come in few sizes)."""
    h, w = shape
    yy = ((np.arange(h) + 0.5 - h / 2) / (h / 2)) ** 2
    xx = ((np.arange(w) + 0.5 - w / 2) / (w / 2)) ** 2
    out = yy[:, None] + xx[None, :]
    out.flags.writeable = False  # shared by every caller
    return out


def _box_morph(mask: np.ndarray, size: int, dilate: bool) -> np.ndarray:
    """Erosion or dilation of a bool mask by a size x size square (outside the frame counts as background).

    Separable shifted AND/OR of slices: an order of magnitude faster than scipy's binary morphology here.
    """
    r = size // 2
    combine = np.logical_or if dilate else np.logical_and
    out = mask
    for axis in (0, 1):
        n = out.shape[axis]
        padded = np.pad(out, [(r, r) if a == axis else (0, 0) for a in (0, 1)])
        windows = [(slice(k, k + n), slice(None)) if axis == 0 else (slice(None), slice(k, k + n))
                   for k in range(2 * r + 1)]
        acc = padded[windows[0]].copy()
        for window in windows[1:]:
            combine(acc, padded[window], out=acc)
        out = acc
    return out


def clean_mask(candidate: np.ndarray, smooth: int = 5, confidence: np.ndarray | None = None) -> np.ndarray:
    """Open, keep the largest component near the centre, close and fill holes: bool (h, w) → bool (h, w).

    ``smooth`` is the side of the square opening/closing element (0 or 1: none). With ``confidence`` (h, w),
    e.g. a segmenter's logits, the kept component is the one with the most area times mean confidence instead.
    """
    return fill_holes(_kept_component(candidate, smooth, confidence))


def _kept_component(candidate: np.ndarray, smooth: int = 5, confidence: np.ndarray | None = None) -> np.ndarray:
    """``clean_mask`` before its holes are filled (which leaves the mask's bounding box as it is)."""
    smooth = smooth if smooth > 1 else 0
    m = _box_morph(_box_morph(candidate, smooth, False), smooth, True) if smooth else candidate
    labels, n = label_components(m)
    if n == 0:
        return m
    if n == 1 and not smooth:  # one component (the segmenter's usual answer): nothing to choose
        return m
    # bincount instead of ndi.sum/ndi.mean: several times faster with the many small components of a noisy mask
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    if confidence is not None:
        # a segmenter knows how sure it is: in a wide photo the lesion need not be central, and on zoomed-out
        # validation images this choice left a wrong box (IoU < 0.5) in 10.5 % of images instead of 12.75 %
        sure = np.bincount(labels.ravel(), confidence.ravel(), minlength=n + 1)[1:] / np.maximum(area, 1)
        score = area * np.maximum(sure, 0.01)
    else:
        centre = np.bincount(labels.ravel(), _centre_distance(m.shape).ravel(), minlength=n + 1)[1:]
        centre = centre / np.maximum(area, 1)
        # prefer big and central: a hair tuft or vignette remnant at the edge loses to the lesion in the middle
        score = area / (1.0 + 2.0 * centre)
    m = labels == 1 + int(np.argmax(score))
    if smooth:  # closing with the frame padded, so a lesion cut by the frame edge is not eroded there
        pad = smooth
        m = _box_morph(_box_morph(np.pad(m, pad, mode="edge"), smooth, True), smooth, False)[pad:-pad, pad:-pad]
    return m


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the background regions that do not reach the frame border (faster than ndi.binary_fill_holes)."""
    labels, n = label_components(~mask)
    if n == 0:
        return mask
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    if n == 1 and border.any():  # one background region and it reaches the border: no holes (the usual case)
        return mask
    edge = np.unique(border)
    outside = np.zeros(n + 1, dtype=bool)
    outside[edge] = True
    outside[0] = False
    return ~outside[labels]


def segment_classical(rgb: np.ndarray, max_side: int = WORK_MAX_SIDE) -> Segmentation:
    """(H, W, 3) uint8 RGB → Segmentation by thresholding the lesion channel + morphology (no model).

    Otsu first; when it finds no lesion, or one spanning the whole frame (small lesions in wide fields
    make Otsu split the skin instead), the minimum-error threshold is tried and kept if it finds one.
    """
    import scipy.ndimage as ndi

    small = working_copy(rgb, max_side)
    size = (rgb.shape[1], rgb.shape[0])
    channel = ndi.uniform_filter(lesion_channel(small), 5)  # 5 px box blur: hairs and JPEG blocks matter less
    brightest = np.maximum(np.maximum(small[..., 0], small[..., 1]), small[..., 2])
    valid = ~_vignette(brightest)  # the lens edge is dark in every channel; a dark lesion rarely is in red
    if valid.sum() < 0.2 * valid.size:  # mostly dark frame: the vignette rule would eat the image
        valid[:] = True
    mask = clean_mask((channel > otsu_threshold(channel[valid])) & valid)
    found = _is_lesion(mask, channel, valid)
    if not found or _spans_frame(mask):
        other = clean_mask((channel > minimum_error_threshold(channel[valid])) & valid)
        if _is_lesion(other, channel, valid) and not _spans_frame(other):
            mask, found = other, True
    return Segmentation(mask if found else np.zeros_like(mask), size, "classical", found, small)


def _spans_frame(mask: np.ndarray) -> bool:
    """True when the mask's box covers 95 % of the frame's width or height."""
    box = mask_box(mask)
    if box is None:
        return False
    h, w = mask.shape
    return box[2] - box[0] >= 0.95 * w or box[3] - box[1] >= 0.95 * h


def _is_lesion(mask: np.ndarray, channel: np.ndarray, valid: np.ndarray) -> bool:
    """A mask is a lesion when it is not a speck, not the whole field, and stands out from the skin."""
    area = mask.sum()
    field = valid.sum()
    if area < MIN_AREA_FRACTION * mask.size or field == 0:
        return False
    outside = valid & ~mask
    if outside.sum() < 0.02 * field:  # the lesion fills the frame: nothing to compare with, keep it
        return True
    return float(channel[mask].mean()) - float(channel[outside].mean()) >= MIN_CONTRAST


class OnnxSegmenter:
    """A bundle's segmentation network run with onnxruntime; thread-safe like the classifier session."""

    def __init__(self, onnx_bytes: bytes, spec: SegmenterSpec, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as Bundle.session: see there
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # This class feeds one image at a time. Fixing the batch axis at 1 lets onnxruntime fold the exported
        # graph's shape arithmetic (the decoder's resize sizes: 517 nodes → 77) into constants, which took
        # ~1 ms of a ~3.3 ms run (measured 2026-11-22, same outputs to 1e-6). A graph without this axis name
        # simply ignores the override.
        opts.add_free_dimension_override_by_name(SEGMENTER_BATCH_DIM, 1)
        self.spec = spec
        self.session = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        std = np.asarray(spec.std, np.float32)
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)[:, None, None]
        self._offset = (-np.asarray(spec.mean, np.float32) / std).astype(np.float32)[:, None, None]
        t = min(max(spec.threshold, 1e-6), 1 - 1e-6)
        self._logit_threshold = float(math.log(t / (1.0 - t)))  # p > t  <=>  logit > log(t / (1 - t))

    def logits(self, rgb: np.ndarray | Image.Image) -> np.ndarray:
        """(H, W, 3) uint8 (or the same as a PIL RGB image) → (S, S) float32 lesion logits of the frame squashed
        to S x S."""
        s = self.spec.image_size
        image = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
        small = image.resize((s, s), Image.BILINEAR, reducing_gap=2.0)
        # channels first while uint8 (a strided float copy is ~10x slower), then (x / 255 - mean) / std as one
        # multiply-add per channel
        x = np.ascontiguousarray(np.asarray(small).transpose(2, 0, 1)).astype(np.float32)
        x *= self._scale
        x += self._offset
        return self.session.run([self.spec.output], {self.spec.input: x[None]})[0][0, 0]

    def probabilities(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → (S, S) float32 lesion probability of the frame squashed to S x S."""
        return 1.0 / (1.0 + np.exp(-np.clip(self.logits(rgb), -60.0, 60.0)))  # clipped: no overflow warnings

    def segment(self, rgb: np.ndarray, image: Image.Image | None = None) -> Segmentation:
        """(H, W, 3) uint8 RGB → Segmentation at working resolution (largest central component, holes filled).

        ``image``: the same pixels as a PIL image, when the caller has one (saves converting the frame again).
        """
        return self.look(rgb, image).finish()

    def look(self, rgb: np.ndarray, image: Image.Image | None = None, region: Box | None = None) -> Look:
        """The network's view of the image, or of its ``region``; ``Look.finish`` makes it a Segmentation.

        Split from ``segment`` so a caller that only needs the lesion's box (to decide whether to look again
        closer) does not pay for the finished mask it may discard.
        """
        # The network's map is already smooth and coarse (its input is ~100 px): a mask finer than
        # SEGMENTER_MASK_SIDE adds no detail, only cost to the cleaning and the ABCD measurements, and
        # opening/closing is not needed; the largest central component with its holes filled is.
        # The image is shrunk once, to the mask's size; the network's input and ABCD's colours come from that.
        h, w = rgb.shape[:2]
        left, top, right, bottom = (0, 0, w, h) if region is None else region
        full = (left, top, right, bottom) == (0, 0, w, h)
        size = (right - left, bottom - top)
        work = fit_within(*size, SEGMENTER_MASK_SIDE)
        if work == size:  # small enough already: the pixels themselves
            small = rgb if full else np.ascontiguousarray(rgb[top:bottom, left:right])
            network_view: np.ndarray | Image.Image = small
        else:
            image = image if image is not None else Image.fromarray(rgb)
            # crop() then resize, not resize(box=): the same pixels as resizing a copy of the region, so a region
            # is segmented exactly as the same pixels uploaded alone would be (box= reads past the region's edges)
            part = image if full else image.crop((left, top, right, bottom))
            network_view = part.resize(work, Image.BILINEAR, reducing_gap=SEGMENTER_REDUCING_GAP)
            small = np.asarray(network_view)
        return Look(self, small, self.logits(network_view), size, (left, top), None if region is None else (w, h))

    def _kept_mask(self, small: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The logits upsampled to the working copy's size, thresholded → the kept component, holes not yet filled."""
        # Thresholding the upsampled logits, not probabilities, skips a sigmoid per pixel; the outline moves by
        # a fraction of a pixel (interpolating either is a choice; Dice is measured on this one).
        up = np.asarray(Image.fromarray(logits).resize((small.shape[1], small.shape[0]), Image.BILINEAR))
        return _kept_component(up > self._logit_threshold, smooth=0, confidence=up)


class Look:
    """One segmenter pass over an image or a region of it, its mask made only when asked for.

    ``box()`` is the box the finished Segmentation would report (holes, filled by ``finish()``, lie inside the
    kept component's bounding box, so they cannot move it); deciding on a closer look from it skips the hole
    filling and Segmentation of a first look that the closer one replaces.
    """

    def __init__(self, segmenter: OnnxSegmenter, small: np.ndarray, logits: np.ndarray, size: tuple[int, int],
                 origin: tuple[int, int] = (0, 0), frame_size: tuple[int, int] | None = None):
        self.segmenter, self.small, self.logits = segmenter, small, logits
        self.size, self.origin, self.frame_size = size, origin, frame_size
        self._kept: np.ndarray | None = None
        self._seg: Segmentation | None = None

    def _segmentation(self, mask: np.ndarray, found: bool) -> Segmentation:
        return Segmentation(mask if found else np.zeros_like(mask), self.size, "segmenter", found, self.small,
                            self.origin, self.frame_size)

    def box(self) -> Box | None:
        """The lesion's box in the whole image, as ``finish().box()`` gives it, or None when none was found."""
        if self._seg is not None:
            return self._seg.box()
        if self._kept is None:
            self._kept = self.segmenter._kept_mask(self.small, self.logits)
        kept = self._kept
        if kept.sum() < MIN_AREA_FRACTION * kept.size:  # filling its holes may still make it big enough
            return self.finish().box()
        return self._segmentation(kept, True).box()

    def finish(self) -> Segmentation:
        """The Segmentation ``OnnxSegmenter.segment`` gives: the kept component with its holes filled."""
        if self._seg is None:
            if self._kept is None:
                self._kept = self.segmenter._kept_mask(self.small, self.logits)
            mask = fill_holes(self._kept)
            self._seg = self._segmentation(mask, bool(mask.sum() >= MIN_AREA_FRACTION * mask.size))
        return self._seg


def segment_region(segmenter: "OnnxSegmenter", rgb: np.ndarray, region: Box,
                   image: Image.Image | None = None) -> Segmentation:
    """Segment only ``region`` (left, top, right, bottom) of an (H, W, 3) image → a Segmentation that knows
    where the region lies, so its box, area and outline are in the whole image's terms. ``image``: the same
    pixels as a PIL image, when the caller has one (the region is resampled from it without copying the array)."""
    return segmenter.look(rgb, image, region).finish()


def load_segmenter(bundle: Bundle, threads: int | None = None) -> OnnxSegmenter | None:
    """The bundle's verified segmenter.onnx as an OnnxSegmenter, or None when the bundle has none."""
    if not bundle.has_segmenter:
        return None
    spec = bundle.manifest.segmenter or SegmenterSpec()
    try:
        return OnnxSegmenter(bundle.file(spec.file), spec, threads)
    except Exception as exc:  # onnxruntime raises several types for a graph it cannot load
        raise BundleError(f"{bundle.source}: {spec.file} could not be loaded by onnxruntime ({exc}); "
                          "re-export it with dermscreen train-segmenter.") from None


def add_segmenter(bundle_dir: str | Path, out: str | Path, onnx_bytes: bytes, spec: SegmenterSpec) -> Path:
    """Write a copy of bundle ``bundle_dir`` plus the segmenter (hashed, ``manifest.segmenter`` = spec) into ``out``.

    The source bundle is verified first and never modified; the result is re-read and verified.
    """
    out = check_new_bundle_folder(out, bundle_dir)  # a bad --out fails with a sentence, before anything is read
    source = Bundle.load(bundle_dir)  # verified: never extend a bundle whose files do not match its hashes
    try:
        OnnxSegmenter(onnx_bytes, spec).probabilities(np.zeros((spec.image_size, spec.image_size, 3), np.uint8))
    except Exception as exc:  # onnxruntime raises several types; all mean "this graph does not fit the spec"
        raise BundleError(f"The segmenter does not run as its spec says ({exc}); nothing was written.") from None
    files = {name: source.file(name) for name in source.manifest.files}
    files[spec.file] = onnx_bytes
    Bundle.write(out, source.manifest.model_copy(update={"segmenter": spec}), files)
    Bundle.load(out)
    return out


def add_segmenter_from_run(bundle_dir: str | Path, run_dir: str | Path, out: str | Path) -> Path:
    """``add_segmenter`` with the segmenter.onnx and segmenter.json (spec) of a train-segmenter run folder."""
    import json

    run_dir = Path(run_dir)
    onnx_path, spec_path = run_dir / "segmenter.onnx", run_dir / "segmenter.json"
    if not onnx_path.is_file() or not spec_path.is_file():
        raise ConfigError(f"{run_dir} is not a train-segmenter run: it needs segmenter.onnx and segmenter.json.")
    try:
        spec = SegmenterSpec.model_validate(json.loads(spec_path.read_text(encoding="utf-8"))["spec"])
    except (ValueError, KeyError, TypeError) as exc:  # bad JSON, no "spec", or a spec pydantic refuses
        detail = "not valid JSON" if isinstance(exc, json.JSONDecodeError) else "its spec is missing or malformed"
        raise ConfigError(f"{spec_path} is not a valid train-segmenter spec ({detail}); "
                          "re-run train-segmenter or restore the file.") from None
    return add_segmenter(bundle_dir, out, onnx_path.read_bytes(), spec)


# ---- boxes and crops ---------------------------------------------------------------------------------------
def mask_box(mask: np.ndarray) -> Box | None:
    """(h, w) bool → (left, top, right, bottom) of its True pixels (exclusive right/bottom), None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def smart_crop_box(box: Box | None, size: tuple[int, int], crop_below: float = CROP_BELOW,
                   fill: float = CROP_FILL, min_side: int = MIN_CROP_SIDE) -> Box | None:
    """A square (left, top, right, bottom) around a small lesion ``box`` in a (width, height) frame, else None.

    None when there is no box or the lesion's longest side is at least ``crop_below`` of the frame's
    shorter side (it is already at a scale the classifier knows). The square is centred on the lesion,
    ``longest side / fill`` wide but at least ``min_side`` (the Screener passes the model's input size, so a
    crop is never enlarged: a tiny lesion keeps some skin around it instead of being blown up into blur), and
    shifted (never shrunk below the lesion) to stay inside the frame.
    """
    if box is None:
        return None
    w, h = size
    left, top, right, bottom = box
    longest = max(right - left, bottom - top)
    if longest >= crop_below * min(w, h):
        return None
    side = int(min(min(w, h), max(min_side, math.ceil(longest / fill))))
    cx, cy = (left + right) / 2, (top + bottom) / 2
    x0 = int(min(max(0, round(cx - side / 2)), w - side))
    y0 = int(min(max(0, round(cy - side / 2)), h - side))
    return x0, y0, x0 + side, y0 + side


# ---- segmentation quality (the one Dice/IoU and CI behind train-segmenter, bench_lesion and the card) ----
def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two bool masks of one size (1, 1 when both are empty)."""
    inter = float((pred & truth).sum())
    total = float(pred.sum() + truth.sum())
    return (2 * inter / total if total else 1.0), (inter / (total - inter) if total - inter else 1.0)


def bootstrap_ci(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap CI of the mean of ``values``."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# ---- ABCD ----------------------------------------------------------------------------------------------
MAX_POINTS = 4000  # shares and moments from an even sample of this many lesion pixels are within ~1 %


def lesion_points(mask: np.ndarray, limit: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the mask's pixels, evenly thinned to at most ``limit`` (bounds ABCD's cost on big lesions)."""
    ys, xs = np.nonzero(mask)
    step = max(1, -(-len(ys) // limit))
    return ys[::step], xs[::step]


def principal_axes(mask: np.ndarray, points: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid (2,) as (y, x), eigenvalues (2,) descending, and axes (2, 2) rows = unit (y, x) vectors.

    An axis's sign is arbitrary (as with np.linalg.eigh): a mirror line does not depend on it."""
    ys, xs = points if points is not None else np.nonzero(mask)
    n = len(ys)
    if n < 2:
        return (np.array([ys.mean(), xs.mean()]) if n else np.zeros(2)), np.ones(2), np.eye(2)
    # the covariance from the two coordinate vectors, then the 2x2 eigenproblem in closed form: the same
    # numbers as np.cov and np.linalg.eigh without their overhead, which was most of this function's time
    y, x = ys.astype(np.float64), xs.astype(np.float64)
    centre = np.array([y.mean(), x.mean()])
    y -= centre[0]
    x -= centre[1]
    a, b, c = float(y @ y) / (n - 1), float(y @ x) / (n - 1), float(x @ x) / (n - 1)  # [[a, b], [b, c]]
    mid, radius = (a + c) / 2.0, math.hypot((a - c) / 2.0, b)
    big, small = mid + radius, mid - radius
    if b != 0.0:
        v = np.array([b, big - a])  # (cov - big I) v = 0 for this v
        v /= np.linalg.norm(v)
    else:  # already diagonal
        v = np.array([1.0, 0.0]) if a >= c else np.array([0.0, 1.0])
    return centre, np.array([big, small]), np.array([v, [-v[1], v[0]]])


def mirror_mismatch(mask: np.ndarray, centre: np.ndarray, axis: np.ndarray,
                    points: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Share of lesion pixels whose mirror image across the line through ``centre`` along ``axis`` is not lesion."""
    ys, xs = points if points is not None else np.nonzero(mask)
    if not len(ys):
        return 0.0
    dy, dx = ys - centre[0], xs - centre[1]
    twice_along = 2.0 * (dy * axis[0] + dx * axis[1])  # 2 x the offset's projection on the axis
    # reflect the offset across the axis direction: 2 (d . a) a - d, back in pixel coordinates
    my = np.rint(centre[0] + twice_along * axis[0] - dy).astype(np.intp)
    mx = np.rint(centre[1] + twice_along * axis[1] - dx).astype(np.intp)
    h, w = mask.shape
    inside = (my >= 0) & (my < h) & (mx >= 0) & (mx < w)
    return float(1.0 - np.count_nonzero(mask[my[inside], mx[inside]]) / len(ys))


def perimeter(mask: np.ndarray) -> float:
    """Boundary length of a bool mask in pixels: 4-neighbour edge count x π/4.

    Counting pixel edges over-measures a curve by 4/π on average over directions, so the correction
    makes a digital circle's perimeter come out near 2πr (a compactness near 1).
    """
    if mask.size == 0:
        return 0.0
    # lesion/background changes between neighbours, plus lesion pixels on the frame's edge (the outside counts as
    # background): the same count as differencing a padded int copy, without the copies (~5x faster)
    edges = (np.count_nonzero(mask[1:] != mask[:-1]) + np.count_nonzero(mask[0]) + np.count_nonzero(mask[-1])
             + np.count_nonzero(mask[:, 1:] != mask[:, :-1]) + np.count_nonzero(mask[:, 0])
             + np.count_nonzero(mask[:, -1]))
    return float(edges) * math.pi / 4.0


def feret_diameter(mask: np.ndarray, directions: int = 36) -> float:
    """Largest extent of the mask in pixels: the widest of ``directions`` projections (within 0.25 %)."""
    if not mask.any():
        return 0.0
    # boundary pixels suffice for the extreme projections, and there are far fewer of them
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    edge = mask & ~inner
    ys, xs = np.nonzero(edge if edge.any() else mask)
    angles = np.linspace(0.0, math.pi, directions, endpoint=False)
    proj = np.outer(np.cos(angles), xs) + np.outer(np.sin(angles), ys)
    # +1: pixel centres to pixel edges (a single pixel is 1 px wide)
    return float((proj.max(axis=1) - proj.min(axis=1)).max()) + 1.0


COLOUR_NAMES = ("white", "red", "light brown", "dark brown", "blue-grey", "black")
REFERENCE_SKIN = (200.0, 150.0, 130.0)
COLOUR_RULES = """First the image is white-balanced on the skin: each channel is scaled so that the median colour of
the skin around the lesion becomes REFERENCE_SKIN (200, 150, 130) (gains limited to 0.5-2). Dermatoscopes
and cameras give HAM10000 images strong pink-to-magenta casts; without this step most brown nevi read as
red (their raw median hue is about 5 degrees, 11 after balancing). Then, in this order of precedence, on
each lesion pixel's HSV value (V = max(R,G,B)/255, S = chroma / max, H = hue in degrees):
  black       V < 0.25
  white       V >= 0.80 and S < 0.20
  blue-grey   0.25 <= V < 0.80, and blue at least as strong as red minus 5 levels (B >= R - 5): grey or bluish
  red         S >= 0.30, V >= 0.35, H < 5 or H >= 300 (red, pink and purple-red: balanced HAM10000 vascular
              lesions have a median hue of -12 degrees, brown lesions 11 to 15)
  dark brown  S >= 0.25, 5 <= H < 50, V < 0.50
  light brown S >= 0.25, 5 <= H < 50, 0.50 <= V < 0.95
Pixels matching no rule (e.g. pale skin-coloured) count for none. A colour is present when it covers at
least 5 % of the lesion. The hue limits come from the median colours of 40 HAM10000 lesions per diagnosis;
the rules are not validated against expert colour annotations."""


def colour_labels(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB → (...) int8 index into COLOUR_NAMES, -1 for none (rules in COLOUR_RULES)."""
    f = rgb.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    # pairwise maximum/minimum: numpy's reduction over a length-3 last axis is ~20x slower
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    v = mx / 255.0
    chroma = mx - mn
    s = np.where(mx > 0, chroma / np.maximum(mx, 1.0), 0.0)
    safe = np.maximum(chroma, 1e-6)
    sector = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = sector * 60.0
    hue = np.where(chroma > 0, hue, 0.0)
    brownish = (s >= 0.25) & (hue >= 5) & (hue < 50)
    out = np.full(r.shape, -1, dtype=np.int8)
    # assign from the lowest precedence up, so higher-precedence rules overwrite
    out[brownish & (v >= 0.50) & (v < 0.95)] = COLOUR_NAMES.index("light brown")
    out[brownish & (v < 0.50)] = COLOUR_NAMES.index("dark brown")
    out[(s >= 0.30) & (v >= 0.35) & ((hue < 5) | (hue >= 300))] = COLOUR_NAMES.index("red")
    out[(v >= 0.25) & (v < 0.80) & (b >= r - 5)] = COLOUR_NAMES.index("blue-grey")
    out[(v >= 0.80) & (s < 0.20)] = COLOUR_NAMES.index("white")
    out[v < 0.25] = COLOUR_NAMES.index("black")
    return out


def skin_gains(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(3,) per-channel gains that bring the median skin colour around the lesion to REFERENCE_SKIN.

    Ones when too little skin is visible to judge (the lesion fills the frame)."""
    outside = rgb[::3, ::3][~mask[::3, ::3]]  # every 9th pixel: the median skin colour needs no more
    brightest = np.maximum(np.maximum(outside[:, 0], outside[:, 1]), outside[:, 2])
    outside = outside[brightest >= VIGNETTE_LUMA]  # not the lens edge
    if len(outside) < 0.02 * mask.size / 9:
        return np.ones(3, np.float32)
    skin = np.maximum(np.median(outside, axis=0), 1.0)
    return np.clip(np.asarray(REFERENCE_SKIN) / skin, 0.5, 2.0).astype(np.float32)


def colour_shares(rgb: np.ndarray, mask: np.ndarray, points: tuple[np.ndarray, np.ndarray] | None = None,
                  balance: bool = True) -> dict[str, float]:
    """Share of the mask's pixels (or of ``points`` in it) of each dermoscopic colour → {name: share}.

    With ``balance`` the pixels are first white-balanced on the surrounding skin (see COLOUR_RULES).
    """
    pixels = rgb[points] if points is not None else rgb[mask]
    if balance:
        pixels = np.clip(pixels * skin_gains(rgb, mask) + 0.5, 0, 255).astype(np.uint8)
    labels = colour_labels(pixels)
    n = max(len(labels), 1)
    counts = np.bincount(labels[labels >= 0].astype(np.int64), minlength=len(COLOUR_NAMES))
    return {name: round(float(c) / n, 4) for name, c in zip(COLOUR_NAMES, counts)}


def abcd(seg: Segmentation, rgb: np.ndarray, pixel_spacing_mm: float | None = None, scale: float = 1.0) -> ABCD | None:
    """ABCD descriptors of a found lesion: Segmentation + the (H, W, 3) image it came from → ABCD (None if none).

    ``scale``: pixels of ``rgb`` per pixel of the upload (below 1 when a large upload was analysed reduced); the
    diameter is given in the upload's pixels, and ``pixel_spacing_mm`` is the upload's spacing.
    """
    if not seg.found or not seg.mask.any():
        return None
    mask = seg.mask
    if seg.frame_size is not None:  # a region's mask: its colours come from that region
        x0, y0 = seg.origin
        rgb = rgb[y0:y0 + seg.image_size[1], x0:x0 + seg.image_size[0]]
    small = seg.small if seg.small is not None and seg.small.shape[:2] == mask.shape else \
        rgb if rgb.shape[:2] == mask.shape else working_copy(rgb, max(mask.shape))
    if small.shape[:2] != mask.shape:  # rounding differed: sample the image at the mask's size exactly
        small = np.asarray(Image.fromarray(rgb).resize((mask.shape[1], mask.shape[0]), Image.BILINEAR))
    points = lesion_points(mask)
    centre, _, axes = principal_axes(mask, points)
    return ABCD(asymmetry=_asymmetry(mirror_mismatch(mask, centre, axes[0], points),
                                     mirror_mismatch(mask, centre, axes[1], points)),
                border=_border(perimeter(mask) ** 2 / (4.0 * math.pi * mask.sum())),
                colours=_colours(colour_shares(small, mask, points)),
                diameter=_diameter(feret_diameter(mask) / seg.scale / scale, pixel_spacing_mm))


def _asymmetry(major: float, minor: float) -> Asymmetry:
    n = int(major > ASYMMETRY_THRESHOLD) + int(minor > ASYMMETRY_THRESHOLD)
    words = {0: "symmetric about both axes", 1: "asymmetric about one axis", 2: "asymmetric about both axes"}[n]
    return Asymmetry(major_axis=round(major, 3), minor_axis=round(minor, 3), asymmetric_axes=n,
                     explanation=f"Shape {words}: folding it along its long and short axes leaves "
                                 f"{100 * major:.0f} % and {100 * minor:.0f} % of its area without a match.")


def _border(ci: float) -> Border:
    irregular = ci > IRREGULAR_COMPACTNESS
    return Border(compactness=round(ci, 3), irregular=irregular,
                  explanation=f"Compactness {ci:.2f} (1 = smooth circle): the outline is "
                              f"{'irregular, notched or elongated' if irregular else 'fairly regular'}.")


def _colours(shares: dict[str, float]) -> Colours:
    present = sorted((c for c, s in shares.items() if s >= COLOUR_MIN_SHARE), key=lambda c: -shares[c])
    listed = ", ".join(present) if present else "none of the six clearly"
    return Colours(present=present, shares=shares, count=len(present),
                   explanation=f"{len(present)} of the six dermoscopic colours present ({listed}); more colours "
                               "suggest a more varied lesion.")


def _diameter(pixels: float, spacing: float | None) -> Diameter:
    if spacing:
        mm = pixels * spacing
        side = "more" if mm > DIAMETER_MM_FLAG else "not more"
        return Diameter(pixels=round(pixels, 1), mm=round(mm, 2),
                        explanation=f"Largest extent {mm:.1f} mm ({pixels:.0f} px): {side} than 6 mm.")
    return Diameter(pixels=round(pixels, 1),
                    explanation=f"Largest extent {pixels:.0f} px; the image carries no scale, so no size in mm.")


# ---- outline -------------------------------------------------------------------------------------------
OUTLINE_COLOUR = (0, 229, 255)  # cyan: stands out on skin and on the heatmap's warm colours


def outline_mask(seg: Segmentation, size: tuple[int, int], width: int = 2) -> np.ndarray:
    """(height, width) bool: the lesion's outline, ``width`` px thick, over a frame of ``size`` = (width, height)."""
    if seg.frame_size is None:
        placed, ox, oy = _resized_mask(seg.mask, size), 0, 0
    else:  # a region's mask: scaled to the region's place in the frame
        sx, sy = size[0] / seg.frame_size[0], size[1] / seg.frame_size[1]
        ox, oy = round(seg.origin[0] * sx), round(seg.origin[1] * sy)
        x1 = min(size[0], max(ox + 1, round((seg.origin[0] + seg.image_size[0]) * sx)))
        y1 = min(size[1], max(oy + 1, round((seg.origin[1] + seg.image_size[1]) * sy)))
        placed = _resized_mask(seg.mask, (x1 - ox, y1 - oy))
    outline = np.zeros((size[1], size[0]), bool)
    rows, cols = np.flatnonzero(placed.any(axis=1)), np.flatnonzero(placed.any(axis=0))
    if len(rows) == 0:
        return outline
    # Erode only the lesion's bounding box plus a 1 px margin: a small lesion in a wide frame covers a few % of
    # its pixels. The margin is background (or the frame's edge, which erosion treats as lesion either way), so
    # every pixel inside sees the same neighbours as in the whole frame and the outline is the same (tested).
    y0, y1 = max(0, oy + rows[0] - 1), min(size[1], oy + rows[-1] + 2)
    x0, x1 = max(0, ox + cols[0] - 1), min(size[0], ox + cols[-1] + 2)
    window = np.zeros((y1 - y0, x1 - x0), bool)
    py0, px0 = max(y0, oy), max(x0, ox)  # where the placed mask overlaps the window, in frame pixels
    py1, px1 = min(y1, oy + placed.shape[0]), min(x1, ox + placed.shape[1])
    window[py0 - y0:py1 - y0, px0 - x0:px1 - x0] = placed[py0 - oy:py1 - oy, px0 - ox:px1 - ox]
    inner = window.copy()
    for _ in range(width):  # erode by one pixel per step with 4-neighbour shifts; the frame edge stays lesion
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    outline[y0:y1, x0:x1] = window & ~inner
    return outline


def _resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask resized (nearest) to ``size`` = (width, height)."""
    if mask.shape == (size[1], size[0]):
        return mask
    return np.asarray(Image.fromarray(mask.view(np.uint8)).resize(size, Image.NEAREST)) > 0


def outline_png(seg: Segmentation, size: tuple[int, int], width: int = 2) -> bytes:
    """The lesion outline as a transparent palette PNG of ``size`` = (width, height): one cyan line."""
    return palette_png(outline_mask(seg, size, width).view(np.uint8), np.array([(0, 0, 0), OUTLINE_COLOUR], np.uint8),
                       np.array([0, 255], np.uint8), bit_depth=1)


def draw_outline(rgb: np.ndarray, seg: Segmentation, width: int = 2) -> np.ndarray:
    """A copy of an (H, W, 3) uint8 image with the lesion outline drawn on it in OUTLINE_COLOUR."""
    out = rgb.copy()
    out[outline_mask(seg, (rgb.shape[1], rgb.shape[0]), width)] = OUTLINE_COLOUR
    return out
