"""Bytes → 8-bit sRGB array: every upload format, orientation, colour profile and size limit in one place.

Reads JPEG, PNG, WebP, BMP, TIFF (Pillow), HEIC/HEIF (pillow-heif) and single-frame DICOM (pydicom).
The pixel count is read from the header and checked before any pixel is decoded, so a
decompression bomb costs nothing. Every failure is one typed ``ImageError`` subclass whose message
a user can act on; each carries the HTTP status a server should answer with.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import threading
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .errors import CorruptImageError, ImageError, ImageTooLargeError, ImageTooSmallError, UnsupportedImageError
from .preprocess import shrink_to

__all__ = [
    "DecodedImage", "decode_image", "ImageError", "UnsupportedImageError", "CorruptImageError",
    "ImageTooLargeError", "ImageTooSmallError", "DEFAULT_MAX_PIXELS", "SUPPORTED_FORMATS",
]

# 50 megapixels is above any phone or dermatoscope camera (a 48 MP phone sensor is 8064x6048)
# and keeps the decoded RGB array under 150 MB.
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MIN_SIDE = 16
SUPPORTED_FORMATS = ("JPEG", "PNG", "WebP", "BMP", "TIFF", "HEIC/HEIF", "DICOM")
# Pillow's opener names we accept (multi-picture JPEGs from phones open through "JPEG" as MPO).
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "HEIF", "AVIF")
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif")
_SUPPORTED_SENTENCE = "Send a JPEG, PNG, WebP, BMP, TIFF, HEIC or single-frame DICOM image."


@dataclass
class DecodedImage:
    """A decoded upload: ``rgb`` (H, W, 3) uint8 sRGB, plus what was learnt about the file on the way."""

    rgb: np.ndarray
    format: str
    original_size: tuple[int, int]  # (width, height) as stored, before EXIF rotation
    pixel_spacing_mm: float | None = None  # of the upload's pixels
    notes: list[str] = field(default_factory=list)  # e.g. "EXIF orientation applied", "ICC profile converted"
    upload_size: tuple[int, int] | None = None  # (width, height) of the upload, upright; None: that of ``rgb``

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of ``rgb``."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])

    @property
    def scale(self) -> float:
        """Pixels of ``rgb`` per pixel of the upload (1 unless a large upload was analysed reduced)."""
        return 1.0 if self.upload_size is None else self.size[0] / self.upload_size[0]


# ---- format sniffing ---------------------------------------------------------------------------
def _sniff(data: bytes) -> str | None:
    """Name of the container format the first bytes announce, or None when unrecognised."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIF"
    for magic, name in ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"BM", "BMP"),
                        (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"GIF8", "GIF")):
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


_heif_lock = threading.Lock()
_heif_registered = False


def _register_heif() -> None:
    """Teach Pillow to open HEIC/HEIF (once, lazily: pillow-heif is only imported when needed)."""
    global _heif_registered
    with _heif_lock:
        if _heif_registered:
            return
        try:
            import pillow_heif
        except ImportError:  # pragma: no cover - pillow-heif is a core dependency
            raise UnsupportedImageError(
                "This is a HEIC/HEIF image, but the pillow-heif package is not installed: "
                "install it (pip install pillow-heif) or convert the photo to JPEG."
            ) from None
        pillow_heif.register_heif_opener()
        _heif_registered = True


def _check_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    """Raise ImageTooLargeError / ImageTooSmallError from the header's dimensions."""
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"This image is {width}x{height} pixels ({width * height / 1e6:.1f} MP), above the limit of "
            f"{max_pixels / 1e6:.0f} MP: resize it (the model only needs a few hundred pixels across the lesion)."
        )
    if min(width, height) < min_side:
        raise ImageTooSmallError(
            f"This image is only {width}x{height} pixels; at least {min_side} pixels on each side are needed. "
            "Send the original photo rather than a thumbnail."
        )


# ---- colour -------------------------------------------------------------------------------------
_SRGB = ImageCms.createProfile("sRGB")
_icc_cache: dict[tuple[str, str], ImageCms.ImageCmsTransform | None] = {}
_icc_lock = threading.Lock()


def _icc_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A cached transform from an embedded profile to sRGB; None when the profile is sRGB already."""
    key = (hashlib.sha1(icc).hexdigest(), mode)
    with _icc_lock:
        if key in _icc_cache:
            return _icc_cache[key]
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    description = (ImageCms.getProfileDescription(profile) or "").lower()
    transform = None
    if "srgb" not in description:
        transform = ImageCms.buildTransform(profile, _SRGB, mode, "RGB",
                                            renderingIntent=ImageCms.Intent.PERCEPTUAL)
    with _icc_lock:
        _icc_cache[key] = transform
    return transform


def _to_srgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Convert an image carrying a non-sRGB ICC profile to sRGB; a broken profile is ignored with a note."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "CMYK", "L"):
        return img
    try:
        transform = _icc_transform(icc, img.mode)
    except (OSError, ImageCms.PyCMSError, TypeError, ValueError):
        notes.append("embedded colour profile unreadable; colours used as stored")
        return img
    if transform is None:
        return img
    notes.append("embedded colour profile converted to sRGB")
    return ImageCms.applyTransform(img, transform)


def _high_bit_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a 16-bit (or wider) integer or float array to uint8 by its nominal range."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        finite = arr[np.isfinite(arr)]  # an all-NaN image is blank, and the quality gate says so
        top = 1.0 if not finite.size or float(finite.max()) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255).astype(np.uint8)
    peak = int(arr.max()) if arr.size else 0
    # A 16-bit container often holds 10-14 significant bits (DICOM, scientific TIFF): scale by the
    # smallest power of two that holds the data, so a 12-bit image is not left nearly black.
    bits = max(8, int(peak).bit_length())
    return (arr.astype(np.float32) * (255.0 / (2**bits - 1)) + 0.5).astype(np.uint8)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white (what a viewer would show) and return RGB."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode (1, L, P, LA, PA, RGBA, CMYK, I;16, I, F, ...) → (H, W, 3) uint8 RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = _high_bit_to_uint8(np.asarray(img))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        return np.asarray(_flatten_alpha(img))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


# ---- decoders -----------------------------------------------------------------------------------
def _decode_pillow(data: bytes, sniffed: str | None, max_pixels: int, min_side: int,
                   max_side: int | None = None) -> DecodedImage:
    """Decode a Pillow-readable image: header size check, first frame, EXIF orientation, sRGB, 8-bit RGB.

    With ``max_side``, a JPEG larger than that is decoded reduced by libjpeg (1/2, 1/4 or 1/8, never below
    90 % of ``max_side``): a 12 MP phone photo then costs a fraction of the decoding, rotation and colour
    conversion.
    """
    if sniffed == "HEIF":
        _register_heif()
    try:
        Image.init()
        img = Image.open(io.BytesIO(data), formats=[f for f in _PIL_FORMATS if f in Image.OPEN])
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fired (far beyond max_pixels); its message speaks of its limit, not ours
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        size = f" ({int(declared.group(1)) / 1e6:,.0f} megapixels)" if declared else ""
        raise ImageTooLargeError(
            f"This image declares an enormous size{size}, far over the {max_pixels / 1e6:g}-megapixel limit, and "
            "was refused without decoding it: send a normal-sized photo."
        ) from None
    except UnidentifiedImageError:
        if sniffed and sniffed != "GIF":
            raise CorruptImageError(
                f"This file starts like a {sniffed} image but its header is damaged, so it cannot be read: "
                "export or save the image again."
            ) from None
        raise UnsupportedImageError(
            f"This file is not an image we can read{' (it is a GIF)' if sniffed == 'GIF' else ''}. "
            f"{_SUPPORTED_SENTENCE}"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(f"This image file is damaged and cannot be read ({exc}): export it again.") from None
    fmt = img.format or sniffed or "unknown"
    width, height = img.size
    _check_size(width, height, max_pixels, min_side)
    notes: list[str] = []
    try:
        scale = analysis_scale(width, height, max_side)
        if fmt == "JPEG" and scale < 1:
            # libjpeg reduces by powers of two to at least the size asked for; asking for 90 % of the analysis
            # size lets a 4032x3024 photo decode at 1/4 (1008 px, nothing left to shrink) instead of 1/2 (2016 px)
            img.draft("RGB", (math.ceil(width * 0.9 * scale), math.ceil(height * 0.9 * scale)))
        img.load()  # first frame only: multi-page TIFF and animated WebP are read as their first image
        orientation = img.getexif().get(0x0112, 1)  # 0x0112: the EXIF Orientation tag
        if orientation in range(2, 9):  # 2-8 turn or mirror the image; other values are invalid and ignored
            img = ImageOps.exif_transpose(img)
            notes.append("EXIF orientation applied")
        img = _to_srgb(img, notes)
        rgb = _pil_to_rgb(img)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(
            f"This {fmt} image is truncated or damaged and cannot be decoded ({exc}): upload the complete file again."
        ) from None
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # these turn by 90 degrees
    return DecodedImage(np.ascontiguousarray(rgb), fmt, (width, height), None, notes, upright)


# A long, narrow photo is not shrunk so far that its shorter side drops below this: a 3000x150 upload reduced
# to 1024 px on its longer side would become a 51 px strip that the quality gate refuses as a thumbnail.
MIN_KEPT_SIDE = 256


def analysis_scale(width: int, height: int, max_side: int | None) -> float:
    """The scale (at most 1) an image of ``width`` x ``height`` is analysed at: its longer side brought down to
    ``max_side``, unless that would take its shorter side below MIN_KEPT_SIDE (then only down to that)."""
    if not max_side or max(width, height) <= max_side:
        return 1.0
    return min(1.0, max(max_side / max(width, height), MIN_KEPT_SIDE / min(width, height)))


def limit_side(decoded: DecodedImage, max_side: int | None) -> DecodedImage:
    """``decoded`` with its pixels shrunk to the analysis scale (``analysis_scale``: at most ``max_side`` on the
    longer side; any format, a JPEG arrives here already near that size), remembering the upload's size so
    results can be given in its pixels."""
    upload = decoded.upload_size or decoded.size
    scale = analysis_scale(*decoded.size, max_side)
    if scale < 1:
        size = (max(1, round(decoded.size[0] * scale)), max(1, round(decoded.size[1] * scale)))
        decoded.rgb = np.ascontiguousarray(shrink_to(decoded.rgb, size))
    if decoded.size != upload:
        decoded.notes.append(f"analysed at {decoded.size[0]}x{decoded.size[1]} px (the upload is {upload[0]}x{upload[1]})")
    decoded.upload_size = upload
    return decoded


def _dicom_spacing(ds) -> float | None:
    """Pixel spacing in mm (row spacing) from PixelSpacing or ImagerPixelSpacing, if present and sane."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = getattr(ds, tag, None)
        try:
            spacing = float(value[0]) if value is not None else None
        except (TypeError, ValueError, IndexError):
            spacing = None
        if spacing and spacing > 0:
            return spacing
    return None


def _decode_dicom(data: bytes, max_pixels: int, min_side: int) -> DecodedImage:
    """Decode a single-frame DICOM image (e.g. a dermoscopy photograph, Supplement 221) to RGB."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:  # pragma: no cover - pydicom is a core dependency
        raise UnsupportedImageError("This is a DICOM file, but pydicom is not installed: pip install pydicom.") from None
    import pydicom.config

    # pydicom warns and logs about invalid values it reads, quoting them: an uploaded file's contents must not
    # reach a server's log (dermscreen checks the few elements it uses itself)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=False)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        raise CorruptImageError(f"This DICOM file is damaged and cannot be read ({exc}).") from None
    if "PixelData" not in ds:
        raise UnsupportedImageError("This DICOM file holds no image (no pixel data): send a DICOM image object.")
    rows, cols = int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0))
    _check_size(cols, rows, max_pixels, min_side)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnsupportedImageError(
            f"This DICOM file holds {frames} frames; dermscreen reads single-frame images. "
            "Export the one dermoscopy frame to analyse."
        )
    try:
        arr = ds.pixel_array  # pydicom converts YBR colour spaces to RGB by default
    except Exception as exc:  # pydicom raises many types for missing codecs / bad data
        raise CorruptImageError(
            f"The pixels of this DICOM file cannot be decoded ({type(exc).__name__}: {exc}). "
            "It may use a compression this installation cannot read: export it uncompressed or as JPEG."
        ) from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "RGB")).upper()
    arr = _high_bit_to_uint8(np.asarray(arr))
    if arr.ndim == 2:
        if photometric == "MONOCHROME1":  # MONOCHROME1 stores white as 0
            arr = 255 - arr
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise UnsupportedImageError(f"This DICOM image has an unexpected pixel layout {arr.shape}; send an RGB image.")
    return DecodedImage(np.ascontiguousarray(arr[:, :, :3]), "DICOM", (cols, rows), _dicom_spacing(ds), [])


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, filename: str | None = None,
                 min_side: int = DEFAULT_MIN_SIDE, max_side: int | None = None) -> DecodedImage:
    """Decode uploaded image bytes to a DecodedImage (8-bit sRGB, upright); raises an ImageError subclass.

    ``max_side``: an image longer than this is reduced to it (``DecodedImage.upload_size`` keeps its size).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("decode_image takes the file's bytes")
    data = bytes(data)
    label = f"{filename}: " if filename else ""
    if not data:
        raise CorruptImageError(f"{label}The file is empty: choose the image file again.")
    sniffed = _sniff(data)
    try:
        if sniffed == "DICOM":
            return limit_side(_decode_dicom(data, max_pixels, min_side), max_side)
        return limit_side(_decode_pillow(data, sniffed, max_pixels, min_side, max_side), max_side)
    except ImageError as exc:
        if label:
            raise type(exc)(label + str(exc)) from None
        raise


def read_image_file(path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> np.ndarray:
    """Decode an image file exactly as an upload is decoded → (H, W, 3) uint8 sRGB; ImageError naming the file.

    Training, evaluation and screening all read pixels through here, so a model is trained and
    measured on images oriented and colour-managed the way it will see them in use.
    """
    from pathlib import Path

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"Image file not found: {path}.") from None
    except OSError as exc:
        raise ImageError(f"Cannot read {path} ({exc.strerror}).") from None
    try:
        return decode_image(data, max_pixels=max_pixels, filename=str(path), min_side=min_side).rgb
    except ImageError as exc:
        raise type(exc)(f"{exc} Replace the file or remove it from the labels.") from None
