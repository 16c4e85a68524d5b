"""The Screener: the one inference pipeline behind the CLI, the REST API and the web page.

bytes → decode → quality gate → lesion mask (smart crop, ABCD) → preprocess → ONNX model →
calibrated probabilities → OOD check → risk tier from the bundle's operating points → class activation
maps → ScreeningResult.

Only numpy, Pillow and onnxruntime are used here (never torch). A Screener holds no per-request
state, so one instance may serve many threads at once; onnxruntime sessions are thread-safe.
"""
from __future__ import annotations

import datetime as _dt
import io
import math
import time
from pathlib import Path
from typing import Any, Generator, Literal, NamedTuple, Sequence

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field, PrivateAttr

from . import DISCLAIMER
from .bundle import Bundle, resolve_bundle_path, without_paths
from .calibration import OperatingPoint, softmax
from .errors import BundleError, DermscreenError, ImageError, InputError
from .evaluation.held_out import held_out_for
from .explain import Heatmaps, cam, data_url, malignant_direction
from .imaging import DEFAULT_MAX_PIXELS, DecodedImage, decode_image, limit_side
from .lesion import (
    ABCD,
    Box,
    CROP_BELOW,
    CROP_FILL,
    OnnxSegmenter,
    Segmentation,
    abcd,
    load_segmenter,
    outline_png,
    segment_classical,
    segment_region,
    smart_crop_box,
)
from .metadata import HAM10000_SITES, MetadataSpec, sex_code
from .ood import ColourOOD, MahalanobisOOD, colour_features
from .preprocess import LARGE_IMAGE_REDUCING_GAP, fit_within, model_box, preprocess
from .quality import QualityReport, QualityThresholds, assess


# Longest side an image is analysed at. The models, the quality gate and the smart crop were trained, tuned and
# measured on HAM10000 photographs of 600x450 px and less; a 12 MP phone photo analysed at full size took ~350 ms
# (decoding, colour conversion and every resize at 12 MP) and put the smart crop's rules in a pixel regime
# never measured. 1024 px keeps a lesion that fills a tenth of the frame's side at ~100 px.
ANALYSIS_MAX_SIDE = 1024

Tier = Literal["high", "moderate", "low", "cannot_assess"]
# Colours: the web page's tier palette (static/app.css), so every front end agrees; each carries white text at
# >= 4.5:1 (WCAG AA, normal text), which tests/test_contrast.py checks.
TIERS: dict[str, dict[str, str]] = {
    "high": {"label": "High concern", "colour": "#a4001d",
             "recommendation": "Refer urgently to a dermatologist: the model found features it associates "
                               "with skin cancer."},
    "moderate": {"label": "Moderate concern", "colour": "#8a4b00",
                 "recommendation": "Refer routinely to a dermatologist for examination: skin cancer cannot be "
                                   "ruled out."},
    "low": {"label": "Low concern", "colour": "#1d6b2f",
            "recommendation": "No referral suggested by the model: monitor the lesion, and seek advice if it "
                              "changes in size, shape or colour, bleeds, itches or worries the patient."},
    "cannot_assess": {"label": "Cannot assess", "colour": "#4a5560",
                      "recommendation": "The model cannot assess this image. Take a new, sharp, well-lit "
                                        "dermoscopic image of the lesion, or have the lesion examined in person."},
}


# ---- settings --------------------------------------------------------------------------------------
class ScreenerSettings(BaseModel):
    """How a Screener behaves; every front end builds one of these from its flags or environment."""

    tta: bool = Field(False, description="average the model over horizontal/vertical flips (4x the model time)")
    heatmap: bool = Field(True, description="compute class activation maps unless a call says otherwise")
    heatmap_max_side: int = Field(512, ge=16, description="longest side (px) of rendered heatmap overlays")
    heatmap_alpha: float = Field(0.6, ge=0.0, le=1.0, description="opacity of the hottest overlay pixels")
    quality_gate: bool = Field(True, description="refuse severely blurred, dark, bright, blank or tiny images")
    quality: dict[str, float] = Field({}, description="overrides of QualityThresholds fields (settings > bundle)")
    ood_refusal: bool = Field(True, description="answer 'cannot assess' for images unlike the training data")
    ood_threshold: float | None = Field(None, description="override of the bundle's OOD threshold")
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads (None: all cores)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="largest accepted image, checked before decoding")
    max_side: int | None = Field(ANALYSIS_MAX_SIDE, ge=64, description=(
        "longest side (px) an image is analysed at: a larger upload is reduced first (a JPEG while it is "
        "decoded), but never below 256 px on its shorter side; boxes and diameters are still reported in the "
        "upload's pixels. None: full size"))
    smart_crop: bool = Field(True, description="classify a square crop around a lesion that fills little of the frame")
    smart_crop_below: float = Field(CROP_BELOW, gt=0.0, le=1.0,
                                    description="crop when the lesion's longest side is below this share of the "
                                                "frame's shorter side")
    smart_crop_fill: float = Field(CROP_FILL, gt=0.0, le=1.0,
                                   description="share of the crop's side the lesion's longest side fills")
    smart_crop_refine: bool = Field(True, description="before cropping, segment again around the small lesion found "
                                    "(the first pass sees it at a few pixels) and crop around that outline")
    abcd: bool = Field(True, description="measure asymmetry, border, colours and diameter on the lesion mask")
    segmenter: Literal["auto", "classical"] = Field(
        "auto", description="auto: the bundle's segmenter.onnx when it has one, else the classical fallback")


# ---- the result ------------------------------------------------------------------------------------
class Risk(BaseModel):
    """The risk tier and what to do about it, in plain language."""

    tier: Tier
    label: str
    recommendation: str
    colour: str = Field(description="CSS colour for the tier")


class ClassProbability(BaseModel):
    """Calibrated probability of one diagnosis."""

    code: str
    name: str
    group: str
    probability: float


COLOUR_REFUSAL = ("This image's colours are unlike the dermoscopic skin-lesion photographs the model was trained on "
                  "(for example a grey-scale, strongly tinted or non-skin picture), so the model gives no answer for it.")


class OODFinding(BaseModel):
    """Out-of-distribution check: the score (higher = less like the training images) and its threshold."""

    checked: bool
    score: float | None = None
    threshold: float | None = None
    colour_score: float | None = Field(None, description="colour-statistics distance (ood.ColourOOD), when the "
                                       "bundle has that check")
    colour_threshold: float | None = None
    in_distribution: bool | None = None
    message: str | None = None


class ModelIdentity(BaseModel):
    """Which model answered: enough to reproduce the result."""

    name: str
    version: str
    sha256: str
    backbone: str
    # the shipped model inherits HAM10000's non-commercial licence: every report says so, not only the model card
    licence: str = ""


class ImageFacts(BaseModel):
    """What was learnt about the uploaded file."""

    format: str
    width: int = Field(description="of the upload, upright (a large upload is analysed reduced: see notes)")
    height: int
    pixel_spacing_mm: float | None = None
    notes: list[str] = []


class HeatmapInfo(BaseModel):
    """Where the model looked. The PNG data URLs are filled only when asked (``to_json(include_heatmap=True)``)."""

    target: str = Field("malignant", description="the overlay_png map: evidence for the malignant group")
    top_class: str = Field(description="class code of the top_class_overlay_png map")
    box: tuple[int, int, int, int] = Field(description="(left, top, right, bottom) image region the model saw, "
                                           "in the upload's pixels")
    size: tuple[int, int] = Field(description="(width, height) of the overlays; they cover the whole image")
    malignant_evidence: bool = Field(True, description="false: no area raised P(malignant), so its map is empty")
    top_class_evidence: bool = Field(True, description="false: no area raised the top class, so its map is empty")
    overlay_png: str | None = Field(None, description="data:image/png URL, colour map with alpha, malignant group")
    top_class_overlay_png: str | None = Field(None, description="data:image/png URL, same for the top class")


class LesionInfo(BaseModel):
    """Where the lesion is, whether the model saw a crop around it, and its ABCD descriptors."""

    method: Literal["segmenter", "classical"] = Field(description="segmenter: the bundle's segmentation model; "
                                                      "classical: colour threshold + morphology (no model)")
    found: bool
    box: tuple[int, int, int, int] | None = Field(None, description="(left, top, right, bottom) of the lesion, "
                                                  "in the upload's pixels")
    area_fraction: float = Field(0.0, description="share of the frame covered by the lesion mask")
    crop_box: tuple[int, int, int, int] | None = Field(
        None, description="the square the classifier saw when smart crop applied, in the upload's pixels "
                          "(None: the usual view)")
    abcd: ABCD | None = None
    message: str = Field(description="one plain sentence about the lesion's outline and the crop")
    outline_png: str | None = Field(None, description="data:image/png URL: the mask outline over the whole frame, "
                                                      "at the heatmap overlays' size (filled when images are asked)")


class DebugInfo(BaseModel):
    """Raw numbers behind the answer, for the web page's debug mode and for audits."""

    logits: list[float] = []
    temperature: float
    p_malignant: float | None = None
    ood_score: float | None = None
    ood_threshold: float | None = None
    colour_score: float | None = None
    colour_threshold: float | None = None
    operating_points: list[OperatingPoint] = []
    tta: bool = False
    metadata_used: bool = False


class ScreeningResult(BaseModel):
    """One image's screening answer. A screening aid, not a diagnosis."""

    status: Literal["ok", "cannot_assess"]
    risk: Risk
    malignancy_score: float | None = Field(None, description="100 x calibrated P(malignant), 0-100")
    p_malignant: float | None = None
    probabilities: list[ClassProbability] = Field([], description="every class, in taxonomy order")
    top_diagnoses: list[ClassProbability] = Field([], description="the three most probable classes")
    quality: QualityReport
    ood: OODFinding
    reasons: list[str] = Field([], description="why the image cannot be assessed (empty when status is ok)")
    image: ImageFacts
    model: ModelIdentity
    heatmap: HeatmapInfo | None = None
    lesion: LesionInfo | None = Field(None, description="lesion outline, smart crop and ABCD (when switched on)")
    preview_jpeg: str | None = Field(None, description=(
        "data:image/jpeg URL of the analysed image (upright, sRGB) at the overlays' size (heatmap.size), for "
        "clients that cannot display the upload's own format (TIFF, HEIC, DICOM); filled only when asked"))
    timings_ms: dict[str, float] = {}
    analysed_at: str
    disclaimer: str = DISCLAIMER
    debug: DebugInfo
    _heatmaps: Heatmaps | None = PrivateAttr(None)
    _rgb: np.ndarray | None = PrivateAttr(None)
    _segmentation: Segmentation | None = PrivateAttr(None)
    _display_size: tuple[int, int] | None = PrivateAttr(None)

    @property
    def heatmaps(self) -> Heatmaps | None:
        """The raw and rendered class activation maps (None when not computed)."""
        return self._heatmaps

    @property
    def image_rgb(self) -> np.ndarray | None:
        """The decoded (H, W, 3) uint8 image that was analysed (in memory only; never serialised)."""
        return self._rgb

    @property
    def segmentation(self) -> Segmentation | None:
        """The lesion mask the result was measured on (None when not computed)."""
        return self._segmentation

    def outline_png(self) -> bytes | None:
        """The lesion outline as a transparent PNG over the whole frame, at the heatmaps' display size."""
        seg = self._segmentation
        if seg is None or not seg.found or self._display_size is None:
            return None
        return outline_png(seg, self._display_size)

    def preview_jpeg_bytes(self, quality: int = 85) -> bytes | None:
        """The analysed image as JPEG bytes at the overlays' display size, encoded in memory (None: no image)."""
        rgb = self._rgb
        if rgb is None:
            return None
        img = Image.fromarray(rgb)
        size = self._display_size or img.size
        if img.size != size:
            img = img.resize(size, Image.BILINEAR, reducing_gap=LARGE_IMAGE_REDUCING_GAP)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    def to_json(self, include_heatmap: bool = False, include_outline: bool | None = None,
                include_preview: bool = False) -> dict[str, Any]:
        """JSON-ready dict; with ``include_heatmap`` the overlays are embedded as PNG data URLs, with
        ``include_outline`` (default: as ``include_heatmap``) the lesion outline too, and with ``include_preview``
        the analysed image as a JPEG data URL."""
        out = self.model_dump(mode="json")
        if include_heatmap and self._heatmaps is not None and out.get("heatmap"):
            out["heatmap"]["overlay_png"] = data_url(self._heatmaps.overlay_png("malignant"))
            out["heatmap"]["top_class_overlay_png"] = data_url(self._heatmaps.overlay_png("top_class"))
        include_outline = include_heatmap if include_outline is None else include_outline
        if include_outline and out.get("lesion"):
            png = self.outline_png()
            out["lesion"]["outline_png"] = data_url(png) if png else None
        if include_preview:
            jpeg = self.preview_jpeg_bytes()
            out["preview_jpeg"] = data_url(jpeg, "image/jpeg") if jpeg else None
        return out


# ---- the pipeline ----------------------------------------------------------------------------------
def resolve_bundle(bundle: Bundle | str | Path | None) -> Bundle:
    """A Bundle from an instance, a path, $DERMSCREEN_MODEL, or the shipped default; BundleError if none."""
    return bundle if isinstance(bundle, Bundle) else Bundle.load(resolve_bundle_path(bundle))


class ModelCall(NamedTuple):
    """What one image's pipeline asks of the model: its input rows (1, or 4 with flips) and their metadata."""

    images: np.ndarray  # (rows, 3, S, S) float32
    metadata: np.ndarray | None  # (rows, dim) float32, None for a model without metadata


def _flips(x: np.ndarray) -> np.ndarray:
    """(3, S, S) → (4, 3, S, S): identity, horizontal, vertical, both flips."""
    return np.stack([x, x[:, :, ::-1], x[:, ::-1, :], x[:, ::-1, ::-1]])


def _unflip_mean(features: np.ndarray) -> np.ndarray:
    """(4, D, h, w) feature maps of _flips inputs → (D, h, w) mean in the original orientation."""
    return (features[0] + features[1][:, :, ::-1] + features[2][:, ::-1, :] + features[3][:, ::-1, ::-1]) / 4


class Screener:
    """Analyse images with one bundle; thread-safe. ``bundle``: Bundle, path, or None for the default."""

    def __init__(self, bundle: Bundle | str | Path | None = None, settings: ScreenerSettings | None = None):
        self.settings = settings or ScreenerSettings()
        self.bundle = resolve_bundle(bundle)
        m = self.bundle.manifest
        if len(m.operating_points) < 2:
            raise BundleError(f"{self.bundle.source}: the bundle needs two operating points (sensitivity_first, "
                              "balanced) to give risk tiers; re-export it after calibration.")
        # highest threshold → "high", the other → "moderate" (normally balanced and sensitivity_first)
        self.tier_points = sorted(m.operating_points, key=lambda o: o.threshold, reverse=True)[:2]
        arrays = self.bundle.arrays
        if "classifier_weight" not in arrays:
            raise BundleError(f"{self.bundle.source}: arrays.npz lacks classifier_weight; heatmaps need it.")
        self.classifier_weight = arrays["classifier_weight"].astype(np.float32)
        self.ood = MahalanobisOOD.from_arrays(arrays) if m.ood and "ood_mean" in arrays else None
        self.ood_threshold = self.settings.ood_threshold if self.settings.ood_threshold is not None else \
            (m.ood.threshold if m.ood else None)
        self.colour_ood = ColourOOD.from_arrays(arrays) if m.ood and m.ood.colour_threshold is not None else None
        self.colour_threshold = m.ood.colour_threshold if self.colour_ood is not None else None
        self.quality_thresholds = QualityThresholds(**{**m.quality, **self.settings.quality})
        self.metadata_spec: MetadataSpec | None = m.model.metadata
        backbone = m.model.backbone if m.model.members == 1 else f"{m.model.members} x {m.model.backbone} (ensemble)"
        self.identity = ModelIdentity(name=m.name, version=m.version, sha256=self.bundle.sha256, backbone=backbone,
                                      licence=m.card.licence)
        self.bundle.session(self.settings.threads)  # build it now: first requests stay fast and race-free
        self.segmenter: OnnxSegmenter | None = None
        if self.settings.segmenter == "auto" and (self.settings.smart_crop or self.settings.abcd):
            self.segmenter = load_segmenter(self.bundle, self.settings.threads)

    # ---- public API ----------------------------------------------------------------------------
    def analyze(self, data: bytes, *, age: float | None = None, sex: str | None = None, site: str | None = None,
                heatmap: bool | None = True, tta: bool | None = None, filename: str | None = None) -> ScreeningResult:
        """Screen one image file's bytes → ScreeningResult; raises ImageError (bad file) or InputError."""
        t0 = time.perf_counter()
        decoded = decode_image(data, max_pixels=self.settings.max_pixels, filename=filename,
                               max_side=self.settings.max_side)
        decode_ms = (time.perf_counter() - t0) * 1000
        return self._analyze_decoded(decoded, {"decode": decode_ms}, age, sex, site, heatmap, tta, t0)

    def analyze_many(self, files: Sequence[tuple[bytes, str | None]], *, age: float | None = None,
                     sex: str | None = None, site: str | None = None, heatmap: bool | None = True,
                     tta: bool | None = None) -> list[ScreeningResult | DermscreenError]:
        """Screen several files' (bytes, filename) with the same options → per file, in order, its ScreeningResult
        or the DermscreenError (ImageError, InputError) that stopped it: returned, not raised, so one bad file
        spoils no other. Any other exception (a fault, not a file's) is raised.

        The answers are ``analyze``'s, but the model runs once on every image that reaches it: on one core it
        costs ~25 % less per image in batches of 4 than one at a time (batch folders). The results were equal bit
        for bit on the machine where this was measured; onnxruntime does not promise that for every CPU and batch
        size, so expect differences at float rounding. Each result's model time is its share of that run, and its
        total the time spent on it: decoding, its own steps and that share.
        """
        results: list = [None] * len(files)
        waiting: list[tuple[int, DecodedImage, dict[str, float]]] = []
        for i, (data, filename) in enumerate(files):
            t0 = time.perf_counter()
            try:
                decoded = decode_image(data, max_pixels=self.settings.max_pixels, filename=filename,
                                       max_side=self.settings.max_side)
            except ImageError as exc:
                results[i] = exc
                continue
            waiting.append((i, decoded, {"decode": (time.perf_counter() - t0) * 1000}))
        answers, spent = self._run_pipelines([self._pipeline(decoded, timings, age, sex, site, heatmap, tta)
                                              for _, decoded, timings in waiting])
        for (i, decoded, timings), answer, ms in zip(waiting, answers, spent):
            results[i] = answer if isinstance(answer, DermscreenError) else \
                self._finish(answer, decoded, timings, time.perf_counter(), timings["decode"] + ms)
        return results

    def analyze_image(self, rgb: np.ndarray, *, age: float | None = None, sex: str | None = None,
                      site: str | None = None, heatmap: bool | None = True, tta: bool | None = None) -> ScreeningResult:
        """Screen an already decoded (H, W, 3) uint8 RGB array → ScreeningResult."""
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise InputError(f"Expected an (H, W, 3) RGB array, got shape {rgb.shape}.")
        decoded = limit_side(DecodedImage(rgb, "array", (rgb.shape[1], rgb.shape[0])), self.settings.max_side)
        return self._analyze_decoded(decoded, {}, age, sex, site, heatmap, tta, time.perf_counter())

    def warm_up(self) -> dict[str, float]:
        """Run the lesion and model stages once on a synthetic lesion (nothing real, nothing kept) → ms per stage.

        The first analysis in a process otherwise pays for onnxruntime's first-run allocations (and, with the
        classical segmentation, scipy.ndimage's import): measured 480-700 ms for a server's first request against
        ~65 ms after, when the segmenter path still imported scipy. The quality gate and OOD check are skipped, so
        they cannot refuse the synthetic image before the lesion stage.
        """
        if self.segmenter is None and (self.settings.smart_crop or self.settings.abcd):
            import scipy.ndimage  # noqa: F401 (the import is the point: segment_classical imports it lazily)

        yy, xx = np.mgrid[0:150, 0:200]
        rgb = np.empty((150, 200, 3), np.uint8)
        rgb[:] = (200, 150, 130)
        rgb[(xx - 100) ** 2 + (yy - 75) ** 2 < 30**2] = (95, 55, 35)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        seg, lesion = self._lesion(DecodedImage(rgb, "array", (200, 150)))
        timings["lesion"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        self._run_model(rgb, self._metadata_vector(None, None, None), False)
        timings["model"] = (time.perf_counter() - t) * 1000
        if lesion.abcd is not None:
            outline_png(seg, (200, 150))
        return timings

    def model_card(self) -> dict[str, Any]:
        """The bundle's card as a dict: identity, classes, operating points, OOD, metrics, licence, use."""
        m = self.bundle.manifest
        return {
            **self.identity.model_dump(), "created": m.created, "classes": m.taxonomy.model_dump()["classes"],
            "image_size": m.preprocessing.image_size, "resize": m.preprocessing.resize,
            "temperature": m.calibration.temperature, "calibration": m.calibration.model_dump(),
            "operating_points": [o.model_dump() for o in m.operating_points], "risk_tiers": self._tier_rules(),
            "ood": m.ood.model_dump() if m.ood else None, "metrics": m.metrics,
            # measured after the bundle was sealed, recorded beside it for exactly this sha256 (None: not known)
            "held_out": held_out_for(self.bundle.sha256),
            "uses_metadata": self.metadata_spec is not None, "training": without_paths(m.training),
            "segmenter": m.segmenter.model_dump() if m.segmenter and self.bundle.has_segmenter else None,
            "lesion_segmentation": "segmenter" if self.segmenter is not None else "classical",
            **m.card.model_dump(), "disclaimer": DISCLAIMER,
        }

    # ---- stages --------------------------------------------------------------------------------
    def _metadata_vector(self, age, sex, site) -> np.ndarray | None:
        """Validate age/sex/site (InputError on nonsense) and encode them if the model takes metadata."""
        if age is not None:
            try:
                age = float(age)
            except (TypeError, ValueError):
                raise InputError(f"Age must be a number of years, not {age!r}.") from None
            if not 0 <= age <= 120:
                raise InputError(f"Age {age:g} is out of range: give the patient's age in years (0-120).")
        if sex is not None and str(sex).strip() and sex_code(str(sex)) is None:
            raise InputError(f"Sex {sex!r} is not recognised: use male, female or unknown.")
        sites = self.metadata_spec.sites if self.metadata_spec else HAM10000_SITES
        # "unknown" is a site as HAM10000 itself records it (and as --sex accepts it): encoded as missing
        if site is not None and str(site).strip() and str(site).strip().lower() not in (*sites, "unknown"):
            raise InputError(f"Unknown site {site!r}; use one of: {', '.join(sites)}, or unknown.")
        if self.metadata_spec is None:
            return None
        return self.metadata_spec.encode(age, sex, site)[None, :]

    def _lesion(self, decoded: DecodedImage) -> tuple[Segmentation, LesionInfo]:
        """Segment the lesion and measure it → (mask, LesionInfo with the smart-crop box and ABCD)."""
        rgb = decoded.rgb
        if self.segmenter is None:
            seg = segment_classical(rgb)
            box = seg.box()
            crop = self._crop(box, decoded.size)
        else:
            image = Image.fromarray(rgb)  # converted once: both looks resample from it
            # the first look's box decides on a closer look; its mask is only finished if no closer look replaces it
            first = self.segmenter.look(rgb, image)
            box = first.box()
            crop = self._crop(box, decoded.size)
            seg = None
            if crop is not None and self.settings.smart_crop_refine:
                refined = self._refine(rgb, crop, image)
                refined_box = refined.box()
                refined_crop = self._crop(refined_box, decoded.size)
                if refined_crop is not None:  # the outline, its box, crop and ABCD now come from the closer look
                    seg, box, crop = refined, refined_box, refined_crop
            if seg is None:
                seg = first.finish()
        found_by = "the segmentation model" if seg.method == "segmenter" else "colour thresholding"
        if not seg.found:
            message = "No distinct lesion outline was found, so the model saw the usual view and no ABCD was measured."
        elif crop is not None:
            message = (f"Lesion outlined by {found_by}; it fills only {100 * seg.area_fraction:.0f} % of the frame, "
                       "so the model saw a square crop around it.")
        else:
            message = f"Lesion outlined by {found_by}; the model saw the usual view of the image."
        measured = abcd(seg, rgb, decoded.pixel_spacing_mm, decoded.scale) if self.settings.abcd else None
        return seg, LesionInfo(method=seg.method, found=seg.found, box=box, area_fraction=round(seg.area_fraction, 4),
                               crop_box=crop, abcd=measured, message=message)

    def _crop(self, box: Box | None, size: tuple[int, int]) -> Box | None:
        """The smart-crop square for a lesion box, or None (no lesion, big enough already, or smart crop off)."""
        if not self.settings.smart_crop:
            return None
        return smart_crop_box(box, size, self.settings.smart_crop_below, self.settings.smart_crop_fill,
                              self.bundle.manifest.preprocessing.image_size)

    def _refine(self, rgb: np.ndarray, crop: Box, image: Image.Image | None = None) -> Segmentation:
        """The lesion segmented again in a square region twice the crop's side around it.

        A lesion small in a wide frame is a few pixels wide in the segmenter's input, so its first outline is
        coarse; seen again at the crop's scale it is outlined (and measured for ABCD) as in an ordinary
        dermoscopic image.
        """
        h, w = rgb.shape[:2]
        side = min(w, h, 2 * (crop[2] - crop[0]))
        cx, cy = (crop[0] + crop[2]) // 2, (crop[1] + crop[3]) // 2
        x0, y0 = min(max(0, cx - side // 2), w - side), min(max(0, cy - side // 2), h - side)
        return segment_region(self.segmenter, rgb, (x0, y0, x0 + side, y0 + side), image)

    def _model_input(self, rgb: np.ndarray, meta: np.ndarray | None, tta: bool) -> ModelCall:
        """The model's input rows for one view: the preprocessed image (and its flips with TTA), and metadata."""
        x = preprocess(rgb, self.bundle.manifest.preprocessing)
        batch = _flips(x) if tta else x[None]
        return ModelCall(batch, None if meta is None else np.repeat(meta, len(batch), axis=0))

    @staticmethod
    def _model_output(out: dict[str, np.ndarray], tta: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image's rows of the model's outputs → (logits (C,), embedding (D,), features (D, h, w))."""
        if tta:  # average logits (not probabilities) so the bundle's temperature keeps its meaning; the OOD check
            # scores the unflipped view's embedding, as its threshold was chosen on (an average of four views
            # lies nearer the training mean and would let out-of-distribution images through)
            return out["logits"].mean(0), out["embedding"][0], _unflip_mean(out["features"])
        return out["logits"][0], out["embedding"][0], out["features"][0]

    def _run_model(self, rgb: np.ndarray, meta: np.ndarray | None, tta: bool) -> tuple[np.ndarray, ...]:
        """Preprocess and run the ONNX model → (logits (C,), embedding (D,), features (D, h, w), preprocess ms)."""
        t0 = time.perf_counter()
        call = self._model_input(rgb, meta, tta)
        t1 = time.perf_counter()
        out = self.bundle.run(call.images, call.metadata, threads=self.settings.threads)
        return (*self._model_output(out, tta), (t1 - t0) * 1000)

    def _colour(self, rgb: np.ndarray) -> float | None:
        """The colour-statistics OOD distance, or None when the bundle has no such check or refusal is off."""
        if self.colour_ood is None or not self.settings.ood_refusal:
            return None
        return float(self.colour_ood.score(colour_features(rgb)[None])[0])

    def _ood(self, embedding: np.ndarray, colour: float | None) -> OODFinding:
        """Both checks of an image that passed the colour check (``colour``: its distance, None if not run):
        the embedding scored against the bundle's in-distribution statistics, and the colour distance beside it."""
        colours = {"colour_score": colour, "colour_threshold": self.colour_threshold} if colour is not None else {}
        if self.ood is None or self.ood_threshold is None or not self.settings.ood_refusal:
            return OODFinding(checked=bool(colours), in_distribution=True if colours else None, **colours)
        score = float(self.ood.score(embedding[None])[0])
        inside = score <= self.ood_threshold
        return OODFinding(checked=True, score=score, threshold=self.ood_threshold, in_distribution=inside, **colours,
                          message=None if inside else "This image does not look like the dermoscopic skin-lesion "
                          "images the model was trained on, so the model gives no answer for it.")

    def _tier_rules(self) -> list[dict[str, Any]]:
        """How each tier is reached (the rule ``_tier`` applies), for clients and the model card."""
        high, moderate = self.tier_points
        rules = {"high": f"P(malignant) >= {high.threshold:.4g} (operating point {high.name})",
                 "moderate": f"{moderate.threshold:.4g} <= P(malignant) < {high.threshold:.4g} (operating point "
                             f"{moderate.name})",
                 "low": f"P(malignant) < {moderate.threshold:.4g}",
                 "cannot_assess": "refused by the quality gate or the out-of-distribution checks: no probabilities"}
        return [{"tier": tier, "label": TIERS[tier]["label"], "rule": rule,
                 "recommendation": TIERS[tier]["recommendation"]} for tier, rule in rules.items()]

    def _tier(self, p_malignant: float) -> Tier:
        """Risk tier of an assessable image from the bundle's operating points."""
        high, moderate = self.tier_points
        if p_malignant >= high.threshold:
            return "high"
        return "moderate" if p_malignant >= moderate.threshold else "low"

    def _heatmaps(self, features: np.ndarray, probs: np.ndarray, top: int, size, box) -> Heatmaps:
        """CAMs for the top class and the malignant group over the model's view of the image."""
        taxonomy = self.bundle.manifest.taxonomy
        w = self.classifier_weight
        direction = malignant_direction(probs, taxonomy.malignant_mask, w, self.bundle.manifest.calibration.temperature)
        return Heatmaps(top_class=taxonomy.codes[top], raw_top_class=cam(features, w[top]),
                        raw_malignant=cam(features, direction), box=box, image_size=size,
                        max_side=self.settings.heatmap_max_side, max_alpha=self.settings.heatmap_alpha)

    def _analyze_decoded(self, decoded: DecodedImage, timings: dict[str, float], age, sex, site,
                         heatmap: bool | None, tta: bool | None, t_start: float) -> ScreeningResult:
        """The pipeline after decoding; ``timings`` already holds the decode time."""
        result = self._run_pipelines([self._pipeline(decoded, timings, age, sex, site, heatmap, tta)])[0][0]
        if isinstance(result, DermscreenError):
            raise result
        return self._finish(result, decoded, timings, t_start)

    def _run_pipelines(self, pipelines: list[Generator]) -> tuple[list[ScreeningResult | DermscreenError], list[float]]:
        """Run each image's ``_pipeline`` up to its model call, the model once on all their rows, then each to its end.

        → (per pipeline its ScreeningResult, or the DermscreenError that stopped it (an invalid age, say); the ms
        spent on it: its own steps plus its share, by rows, of the joint model run, which is also its model time).
        Any other exception is raised.
        """
        results: list = [None] * len(pipelines)
        spent = [0.0] * len(pipelines)
        calls: dict[int, ModelCall] = {}

        def step(i: int, value=None) -> None:
            t = time.perf_counter()
            try:
                calls[i] = pipelines[i].send(value)
            except StopIteration as done:  # answered (or refused before the model)
                results[i] = done.value
            except DermscreenError as exc:
                results[i] = exc
            spent[i] += (time.perf_counter() - t) * 1000

        for i in range(len(pipelines)):
            step(i)
        if not calls:
            return results, spent
        asked = list(calls.items())
        calls.clear()
        t = time.perf_counter()
        images = asked[0][1].images if len(asked) == 1 else np.concatenate([c.images for _, c in asked])
        # a model that takes metadata gets it for every image (encoded unknown when not given), else none does
        meta = None if asked[0][1].metadata is None else np.concatenate([c.metadata for _, c in asked])
        out = self.bundle.run(images, meta, threads=self.settings.threads)
        ms_per_row = (time.perf_counter() - t) * 1000 / len(images)
        start = 0
        for i, call in asked:
            rows = slice(start, start + len(call.images))
            start = rows.stop
            share = ms_per_row * len(call.images)
            spent[i] += share
            step(i, ({k: v[rows] for k, v in out.items()}, share))
        return results, spent

    def _pipeline(self, decoded: DecodedImage, timings: dict[str, float], age, sex, site,
                  heatmap: bool | None, tta: bool | None) -> Generator[ModelCall, tuple, ScreeningResult]:
        """Quality gate, model, OOD, tier and heatmaps for a decoded image; fills ``timings``.

        A generator, so that several images can share one model run (``_run_pipelines``): it yields its
        ModelCall, is sent back (its rows of the model's outputs, its model ms), and returns the result.
        """
        tta = self.settings.tta if tta is None else bool(tta)
        want_heatmap = self.settings.heatmap if heatmap is None else bool(heatmap)
        meta = self._metadata_vector(age, sex, site)
        t = time.perf_counter()
        quality = assess(decoded.rgb, self.quality_thresholds) if self.settings.quality_gate else \
            QualityReport(passed=True)
        timings["quality"] = (time.perf_counter() - t) * 1000
        m = self.bundle.manifest
        debug = DebugInfo(temperature=m.calibration.temperature, ood_threshold=self.ood_threshold,
                          colour_threshold=self.colour_threshold, operating_points=m.operating_points, tta=tta,
                          metadata_used=meta is not None)
        width, height = decoded.upload_size or decoded.size  # reported in the upload's pixels, as are boxes
        image = ImageFacts(format=decoded.format, width=width, height=height,
                           pixel_spacing_mm=decoded.pixel_spacing_mm, notes=decoded.notes)
        if not quality.passed:
            return self._cannot_assess([quality.refused_reason], quality, OODFinding(checked=False), image, debug)
        colour = self._colour(decoded.rgb)
        debug.colour_score = colour
        if colour is not None and colour > self.colour_threshold:  # refused before the model: nothing to show
            finding = OODFinding(checked=True, colour_score=colour, colour_threshold=self.colour_threshold,
                                 in_distribution=False, message=COLOUR_REFUSAL)
            return self._cannot_assess([COLOUR_REFUSAL], quality, finding, image, debug)
        seg, lesion, view = None, None, decoded.rgb
        if self.settings.smart_crop or self.settings.abcd:
            t = time.perf_counter()
            seg, lesion = self._lesion(decoded)
            if lesion.crop_box is not None:
                left, top, right, bottom = lesion.crop_box
                view = decoded.rgb[top:bottom, left:right]
            timings["lesion"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        call = self._model_input(view, meta, tta)
        timings["preprocess"] = (time.perf_counter() - t) * 1000
        out, timings["model"] = yield call
        logits, embedding, features = self._model_output(out, tta)
        t = time.perf_counter()
        probs = softmax(logits[None], m.calibration.temperature)[0]
        p_mal = float(m.taxonomy.p_malignant(probs))
        ood = self._ood(embedding, colour)
        debug.logits, debug.p_malignant, debug.ood_score = [float(v) for v in logits], p_mal, ood.score
        timings["postprocess"] = (time.perf_counter() - t) * 1000
        if ood.in_distribution is False:  # not a skin lesion: an outline and ABCD of it would mislead
            return self._cannot_assess([ood.message], quality, ood, image, debug)
        result = self._assessed(probs, p_mal, quality, ood, image, debug)
        result._segmentation = seg
        # reported in the upload's pixels; ``lesion`` itself keeps the analysed image's (the heatmap box below)
        result.lesion = lesion if lesion is None or decoded.scale == 1.0 else lesion.model_copy(update={
            "box": _to_upload(lesion.box, decoded), "crop_box": _to_upload(lesion.crop_box, decoded)})
        if want_heatmap:
            t = time.perf_counter()
            box = model_box(decoded.size, m.preprocessing) if lesion is None or lesion.crop_box is None else \
                _shift(model_box(_box_size(lesion.crop_box), m.preprocessing), lesion.crop_box)
            maps = self._heatmaps(features, probs, int(np.argmax(probs)), decoded.size, box)
            maps.heat("malignant"), maps.heat("top_class")  # upsample now, so the cost is timed here
            result._heatmaps = maps
            result.heatmap = HeatmapInfo(top_class=maps.top_class, box=_to_upload(box, decoded), size=maps.display_size,
                                         malignant_evidence=maps.has_evidence("malignant"),
                                         top_class_evidence=maps.has_evidence("top_class"))
            timings["heatmap"] = (time.perf_counter() - t) * 1000
        return result

    def _assessed(self, probs, p_mal, quality, ood, image, debug) -> ScreeningResult:
        """The result for an image the model may answer for."""
        classes = self.bundle.manifest.taxonomy.classes
        listed = [ClassProbability(code=c.code, name=c.name, group=c.group, probability=float(p))
                  for c, p in zip(classes, probs)]
        tier = self._tier(p_mal)
        return ScreeningResult(
            status="ok", risk=Risk(tier=tier, **TIERS[tier]), malignancy_score=round(100 * p_mal, 1),
            p_malignant=p_mal, probabilities=listed,
            top_diagnoses=sorted(listed, key=lambda c: c.probability, reverse=True)[:3],
            quality=quality, ood=ood, image=image, model=self.identity, analysed_at=_now(), debug=debug)

    def _cannot_assess(self, reasons, quality, ood, image, debug) -> ScreeningResult:
        """The result for an image refused by the quality gate or the OOD check."""
        return ScreeningResult(status="cannot_assess", risk=Risk(tier="cannot_assess", **TIERS["cannot_assess"]),
                               quality=quality, ood=ood, reasons=[r for r in reasons if r], image=image,
                               model=self.identity, analysed_at=_now(), debug=debug)

    def _finish(self, result: ScreeningResult, decoded: DecodedImage, timings: dict[str, float], t_start: float,
                earlier_ms: float = 0.0) -> ScreeningResult:
        """Attach the image, rounded per-stage timings and the total: ``earlier_ms`` plus the time since ``t_start``."""
        result._rgb = decoded.rgb
        # the overlays' size (explain.Heatmaps.display_size), so the outline, the heatmaps and the preview stack
        # exactly; set for refused images too, whose preview is all a client can show of them
        result._display_size = fit_within(*decoded.size, self.settings.heatmap_max_side)
        timings["total"] = earlier_ms + (time.perf_counter() - t_start) * 1000
        result.timings_ms = {k: round(v, 2) for k, v in timings.items()}
        return result


def _to_upload(box: tuple[int, int, int, int] | None, decoded: DecodedImage) -> tuple[int, int, int, int] | None:
    """A (left, top, right, bottom) box of the analysed image in the upload's pixels (unchanged at full size)."""
    if box is None or decoded.scale == 1.0:
        return box
    s, (w, h) = decoded.scale, decoded.upload_size
    return (max(0, math.floor(box[0] / s)), max(0, math.floor(box[1] / s)),
            min(w, math.ceil(box[2] / s)), min(h, math.ceil(box[3] / s)))


def _box_size(box: tuple[int, int, int, int]) -> tuple[int, int]:
    """(width, height) of a (left, top, right, bottom) box."""
    return box[2] - box[0], box[3] - box[1]


def _shift(box: tuple[int, int, int, int], origin: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A box given inside ``origin``'s region → the same box in the whole frame's coordinates."""
    return box[0] + origin[0], box[1] + origin[1], box[2] + origin[0], box[3] + origin[1]


def _now() -> str:
    """Current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
