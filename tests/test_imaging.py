"""Decoding uploads: every supported format, orientation, colour profiles, bit depths, and typed failures."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dermscreen.imaging import (CorruptImageError, ImageTooLargeError, ImageTooSmallError, UnsupportedImageError,
                                decode_image)


def _pattern(w: int = 48, h: int = 32) -> np.ndarray:
    """A deterministic RGB image with distinct quadrants, so orientation mistakes are visible."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[: h // 2, : w // 2] = (220, 30, 30)
    rgb[: h // 2, w // 2:] = (30, 200, 40)
    rgb[h // 2:, : w // 2] = (20, 40, 210)
    rgb[h // 2:, w // 2:] = (240, 240, 240)
    return rgb


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,kw,mean_error", [("PNG", {}, 0), ("BMP", {}, 0), ("TIFF", {}, 0),
                                               ("WEBP", {"lossless": True}, 0), ("JPEG", {"quality": 95}, 4)])
def test_common_formats_round_trip(fmt, kw, mean_error):
    rgb = _pattern()
    decoded = decode_image(_save(Image.fromarray(rgb), fmt, **kw))
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.shape == rgb.shape
    assert decoded.original_size == (48, 32) and decoded.format == fmt
    assert np.abs(decoded.rgb.astype(int) - rgb).mean() <= mean_error  # lossless formats: exact


def test_heic(tmp_path):
    # decoded in a fresh interpreter where nothing registered Pillow's HEIF plugin but dermscreen itself: phones
    # send HEIC, and a test process that registered it (here or in another test) would hide a product that does not
    import json
    import subprocess
    import sys

    pillow_heif = pytest.importorskip("pillow_heif")
    rgb = _pattern(64, 48)
    buf = io.BytesIO()
    try:
        pillow_heif.from_pillow(Image.fromarray(rgb)).save(buf, quality=95)
    except (KeyError, OSError, ValueError) as exc:  # wheel without an HEVC encoder
        pytest.skip(f"no HEIF encoder: {exc}")
    (tmp_path / "photo.heic").write_bytes(buf.getvalue())
    (tmp_path / "rgb.npy").write_bytes(rgb.tobytes())
    script = (
        "import json, sys, numpy as np; from PIL import Image; Image.init();"
        "assert 'HEIF' not in Image.OPEN, 'registered before dermscreen was asked';"
        "from dermscreen.imaging import decode_image;"
        "d = decode_image(open(sys.argv[1], 'rb').read());"
        "want = np.frombuffer(open(sys.argv[2], 'rb').read(), np.uint8).reshape(d.rgb.shape);"
        "print(json.dumps({'format': d.format, 'shape': list(d.rgb.shape),"
        " 'error': float(np.abs(d.rgb.astype(int) - want).mean())}))")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "photo.heic"), str(tmp_path / "rgb.npy")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    decoded = json.loads(out.stdout)
    assert decoded["format"].upper() in ("HEIF", "HEIC")
    assert decoded["shape"] == [48, 64, 3]
    assert decoded["error"] < 12


def _dicom(pixels: np.ndarray, photometric: str = "RGB", bits: int = 8, frames: int = 1,
           rows: int | None = None, cols: int | None = None, spacing=(0.05, 0.05)) -> bytes:
    """A minimal valid DICOM file (explicit VR little endian) holding ``pixels``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("upload.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "XC"
    ds.Rows = rows or pixels.shape[-3 if pixels.ndim == 3 and photometric == "RGB" else -2]
    ds.Columns = cols or pixels.shape[-2 if photometric == "RGB" else -1]
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits if bits == 8 else 12, \
        (bits if bits == 8 else 12) - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if spacing:
        ds.PixelSpacing = list(spacing)
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_invalid_values_in_a_dicom_file_reach_no_warning_or_log(caplog):
    # the server's log must not quote what an uploaded file holds (here a malformed transfer syntax UID)
    pytest.importorskip("pydicom")
    import logging
    import warnings

    def element(tag: int, vr: bytes, value: bytes) -> bytes:  # explicit VR little endian, short form
        return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value

    meta = element(0x00020010, b"UI", b"jane-doe")  # Transfer Syntax UID: not a valid UI value
    data = b"\0" * 128 + b"DICM" + element(0x00020000, b"UL", struct.pack("<I", len(meta))) + meta
    caplog.clear()
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises((CorruptImageError, UnsupportedImageError)):  # it holds no image
            decode_image(data)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [line for line in said if "jane" in line], said


def test_dicom_rgb_with_pixel_spacing():
    pytest.importorskip("pydicom")
    rgb = _pattern()
    decoded = decode_image(_dicom(rgb))
    assert decoded.format == "DICOM"
    assert np.array_equal(decoded.rgb, rgb)
    assert decoded.pixel_spacing_mm == pytest.approx(0.05)


def test_dicom_12_bit_monochrome_is_scaled_to_8_bit():
    pytest.importorskip("pydicom")
    gray = np.tile(np.linspace(0, 4095, 40).astype(np.uint16), (30, 1))
    decoded = decode_image(_dicom(gray, photometric="MONOCHROME2", bits=16, spacing=None))
    assert decoded.rgb.shape == (30, 40, 3) and decoded.pixel_spacing_mm is None
    assert decoded.rgb[0, 0, 0] == 0 and decoded.rgb[0, -1, 0] == 255  # 12 bits fill the 8-bit range


def test_dicom_multi_frame_is_refused():
    pytest.importorskip("pydicom")
    frames = np.stack([_pattern(), _pattern()])
    with pytest.raises(UnsupportedImageError, match="2 frames"):
        decode_image(_dicom(frames, frames=2, rows=32, cols=48))


def test_dicom_bomb_is_refused_before_pixels():
    pytest.importorskip("pydicom")
    with pytest.raises(ImageTooLargeError):
        decode_image(_dicom(_pattern(), rows=60000, cols=60000))


def test_exif_orientation_is_applied():
    rgb = _pattern(48, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90° clockwise for display
    decoded = decode_image(_save(Image.fromarray(rgb), "JPEG", quality=95, exif=exif))
    assert decoded.rgb.shape == (48, 32, 3)
    assert decoded.original_size == (48, 32)
    assert "EXIF orientation applied" in decoded.notes
    # after a clockwise turn, the stored bottom-left (blue) quadrant is at the top-left
    top_left = decoded.rgb[:10, :10].reshape(-1, 3).mean(axis=0)
    assert top_left[2] > 150 and top_left[0] < 80


def _icc_swapped_red_green() -> bytes:
    """A valid ICC v2 RGB matrix/TRC profile whose red and green primaries are sRGB's green and red."""
    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(x, y, z):
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    desc_text = b"swapped primaries\0"
    tags = {
        b"desc": b"desc" + b"\0" * 4 + struct.pack(">I", len(desc_text)) + desc_text + b"\0" * 12 + b"\0" * 67,
        b"wtpt": xyz(0.9642, 1.0, 0.8249),
        b"rXYZ": xyz(0.3851, 0.7169, 0.0971), b"gXYZ": xyz(0.4361, 0.2225, 0.0139),
        b"bXYZ": xyz(0.1431, 0.0606, 0.7141),
        b"rTRC": b"curv" + b"\0" * 4 + struct.pack(">IH", 1, 563) + b"\0\0",  # gamma 2.2 in u8Fixed8
    }
    tags[b"gTRC"] = tags[b"bTRC"] = tags[b"rTRC"]
    table, body, offset = b"", b"", 128 + 4 + 12 * len(tags)
    for sig, data in tags.items():
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + b"\0" * 12 + b"acsp"
              + b"\0" * 24 + b"\0" * 4 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def test_icc_profile_is_converted_to_srgb():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 230  # pure red in the file's own colour space = green in sRGB for this profile
    data = _save(Image.fromarray(rgb), "PNG", icc_profile=_icc_swapped_red_green())
    decoded = decode_image(data)
    r, g, b = decoded.rgb.reshape(-1, 3).mean(axis=0)
    assert g > 150 and r < 80, (r, g, b)
    assert "embedded colour profile converted to sRGB" in decoded.notes


def test_srgb_profile_is_left_alone():
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb = _pattern()
    decoded = decode_image(_save(Image.fromarray(rgb), "PNG", icc_profile=srgb))
    assert np.array_equal(decoded.rgb, rgb) and decoded.notes == []


def test_grayscale_palette_alpha_and_16_bit_become_rgb():
    gray = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (20, 1))
    assert np.array_equal(decode_image(_save(Image.fromarray(gray), "PNG")).rgb[..., 1], gray)
    palette = Image.fromarray(_pattern()).convert("P", palette=Image.ADAPTIVE, colors=4)
    assert decode_image(_save(palette, "PNG")).rgb.shape == (32, 48, 3)
    rgba = np.dstack([_pattern(), np.full((32, 48), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # a fully transparent pixel shows as white
    out = decode_image(_save(Image.fromarray(rgba), "PNG")).rgb
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[-1, 0]) == (20, 40, 210)
    deep = np.tile(np.array([0, 32768, 65535], np.uint16), (20, 10))
    out16 = decode_image(_save(Image.fromarray(deep), "PNG")).rgb
    assert out16.dtype == np.uint8 and out16[0, 0, 0] == 0 and out16[0, 1, 0] == 128 and out16[0, 2, 0] == 255


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring a huge size, with a few bytes of (bogus) data: a bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\0" * 100)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat)))


def test_pixel_limit_refuses_before_decoding():
    with pytest.raises(ImageTooLargeError, match="refused|MP") as info:
        decode_image(_png_header_only(100_000, 100_000))
    assert info.value.http_status == 413
    # Pillow's own guard fired here; the sentence gives the size and our limit, not Pillow's wording
    assert "10,000 megapixels" in str(info.value) and "50-megapixel limit" in str(info.value)
    assert "DOS" not in str(info.value) and "178956970" not in str(info.value)
    with pytest.raises(ImageTooLargeError, match="80.0 MP"):  # under Pillow's own limit: our check
        decode_image(_png_header_only(10_000, 8_000))
    with pytest.raises(ImageTooLargeError):
        decode_image(_save(Image.fromarray(_pattern()), "PNG"), max_pixels=1000)


@pytest.mark.parametrize("data,error,status", [
    (b"", CorruptImageError, 422),
    (b"hello, this is a text file\n" * 20, UnsupportedImageError, 415),
    (b"%PDF-1.7\n" + b"x" * 300, UnsupportedImageError, 415),
    (b"\x89PNG\r\n\x1a\n" + b"garbage" * 40, CorruptImageError, 422),
])
def test_unreadable_bytes_raise_typed_errors(data, error, status):
    with pytest.raises(error) as info:
        decode_image(data)
    assert info.value.http_status == status
    assert str(info.value).endswith(".")


def test_gif_is_unsupported_and_says_what_to_send():
    with pytest.raises(UnsupportedImageError, match="JPEG, PNG"):
        decode_image(_save(Image.fromarray(_pattern()), "GIF"))


def test_truncated_jpeg_is_corrupt():
    data = _save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), np.uint8)), "JPEG")
    with pytest.raises(CorruptImageError, match="truncated or damaged"):
        decode_image(data[: len(data) // 2], filename="lesion.jpg")


def test_tiny_image_is_too_small():
    with pytest.raises(ImageTooSmallError):
        decode_image(_save(Image.fromarray(_pattern(8, 8)), "PNG"))


@pytest.mark.data
def test_real_ham10000_jpeg(ham_dir):
    path = next(iter(sorted((ham_dir / "images").glob("*.jpg"))))
    decoded = decode_image(path.read_bytes(), filename=path.name)
    assert decoded.size == (200, 150) and decoded.format == "JPEG"


def test_a_large_jpeg_is_decoded_reduced_and_remembers_the_upload_size():
    # a 12 MP phone photo: libjpeg decodes it at 1/4 (1008 px), close to a full decode shrunk to that size
    big = np.asarray(Image.fromarray(_pattern(64, 48)).resize((4032, 3024), Image.BILINEAR))
    data = _save(Image.fromarray(big), "JPEG", quality=92)
    reduced = decode_image(data, max_side=1024)
    assert reduced.size == (1008, 756) and reduced.upload_size == (4032, 3024)
    assert reduced.scale == pytest.approx(0.25)
    assert any("analysed at 1008x756 px (the upload is 4032x3024)" in n for n in reduced.notes)
    full = decode_image(data)
    assert full.size == (4032, 3024) and full.upload_size == (4032, 3024) and full.scale == 1.0
    shrunk = np.asarray(Image.fromarray(full.rgb).resize((1008, 756), Image.BILINEAR))
    assert np.abs(reduced.rgb.astype(int) - shrunk).mean() < 3
    # small images are untouched
    small = decode_image(_save(Image.fromarray(_pattern(600, 450)), "JPEG", quality=92), max_side=1024)
    assert small.size == (600, 450) and small.scale == 1.0 and not any("analysed at" in n for n in small.notes)


def test_a_large_rotated_jpeg_reports_its_upright_size():
    exif = Image.Exif()
    exif[0x0112] = 6
    big = np.asarray(Image.fromarray(_pattern(64, 48)).resize((4032, 3024), Image.NEAREST))
    decoded = decode_image(_save(Image.fromarray(big), "JPEG", quality=92, exif=exif), max_side=1024)
    assert decoded.upload_size == (3024, 4032) and decoded.size == (756, 1008)
    top_left = decoded.rgb[:100, :100].reshape(-1, 3).mean(axis=0)  # the stored bottom-left (blue) quadrant
    assert top_left[2] > 150 and top_left[0] < 80


def test_other_large_formats_are_shrunk_to_the_limit():
    big = np.asarray(Image.fromarray(_pattern(64, 48)).resize((2500, 1250), Image.NEAREST))
    decoded = decode_image(_save(Image.fromarray(big), "PNG"), max_side=1024)
    assert decoded.size == (1024, 512) and decoded.upload_size == (2500, 1250)


def test_a_long_narrow_photo_keeps_its_shorter_side():
    # a 3000x150 upload reduced to 1024 px on its longer side would be a 51 px strip the quality gate refuses
    strip = np.asarray(Image.fromarray(_pattern(64, 48)).resize((3000, 150), Image.NEAREST))
    decoded = decode_image(_save(Image.fromarray(strip), "JPEG", quality=92), max_side=1024)
    assert decoded.size == (3000, 150) and decoded.scale == 1.0
    wide = np.asarray(Image.fromarray(_pattern(64, 48)).resize((8000, 600), Image.NEAREST))
    decoded = decode_image(_save(Image.fromarray(wide), "PNG"), max_side=1024)
    assert decoded.size == (3413, 256) and decoded.upload_size == (8000, 600)  # shrunk, but not below 256 px


def test_an_invalid_exif_orientation_is_ignored_without_a_note():
    exif = Image.Exif()
    exif[0x0112] = 9
    decoded = decode_image(_save(Image.fromarray(_pattern(48, 32)), "JPEG", quality=95, exif=exif))
    assert decoded.size == (48, 32) and "EXIF orientation applied" not in decoded.notes


def test_an_all_nan_float_tiff_decodes_without_warnings():
    import warnings

    data = _save(Image.fromarray(np.full((40, 60), np.nan, np.float32), mode="F"), "TIFF")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_image(data)
    assert decoded.size == (60, 40)
