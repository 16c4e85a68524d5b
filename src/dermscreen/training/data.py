"""Training data: a torch Dataset over a LabelledSet, dermoscopy augmentation, class balancing.

Every image goes through :func:`dermscreen.preprocess.normalize` and the same resize as at
inference (:func:`dermscreen.preprocess.resize_for_model`), so training and serving cannot drift.
Augmentation acts on the PIL image before that final resize/normalise step.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageEnhance
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import Dataset, Sampler

from ..imaging import read_image_file
from ..lesion import mask_box
from ..manifests import LabelledSet
from ..metadata import MetadataSpec
from ..preprocess import Preprocessing, model_box, normalize, preprocess, resize_for_model


class AugmentConfig(BaseModel):
    """Augmentation strengths; dermoscopy has no canonical orientation, so flips and 90° turns are free."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    flips: bool = True
    rotate90: bool = True
    # random-resized crop: share of the (model-view) area kept, and aspect-ratio range
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (0.8, 1.25)
    # small free rotation on top of the 90° turns (degrees); corners are filled by reflection
    rotate_degrees: float = Field(10.0, ge=0, le=45)
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)
    saturation: float = Field(0.2, ge=0, le=1)
    hue: float = Field(0.03, ge=0, le=0.5)
    # zoom-out: with this probability the view is widened by up to zoom_out_max x with its own skin mirrored
    # outwards, so the lesion is seen smaller and off-frame context is not new; the Screener's smart crop
    # around a small lesion in a wide photo shows the model just such views
    zoom_out: float = Field(0.0, ge=0, le=1)
    zoom_out_max: float = Field(1.8, ge=1, le=4)
    # lesion crop: with this probability (for images with a reference mask, TrainConfig.masks) the view is a
    # square centred on the lesion that it fills lesion_crop_fill of (the Screener's smart crop, seen in
    # training, so a lesion-centred square is not a new framing to the model); skin beyond the photograph's
    # edge is mirrored. Drawn before zoom-out, which then applies to the other views only.
    lesion_crop: float = Field(0.0, ge=0, le=1)
    lesion_crop_fill: tuple[float, float] = (0.45, 0.75)

    @field_validator("lesion_crop_fill")
    @classmethod
    def _fill_range(cls, fill: tuple[float, float]) -> tuple[float, float]:
        if not 0.05 <= fill[0] <= fill[1] <= 1:
            raise ValueError("must be [low, high] with 0.05 <= low <= high <= 1")
        return fill


def load_rgb(path) -> Image.Image:
    """Open an image file as an upright sRGB PIL image, decoded as inference decodes it; ImageError naming the file."""
    return Image.fromarray(read_image_file(path))


def _model_view(image: Image.Image, spec: Preprocessing) -> Image.Image:
    """The part of the frame the model sees at inference (the centred square for center_crop)."""
    box = model_box(image.size, spec)
    return image if box == (0, 0, *image.size) else image.crop(box)


def _random_resized_crop(image: Image.Image, aug: AugmentConfig, rng: random.Random) -> Image.Image:
    w, h = image.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*aug.scale)
        ratio = math.exp(rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1])))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return image.crop((left, top, left + cw, top + ch))
    return image


def zoom_out(arrays: list[np.ndarray], factor: float, rng: random.Random) -> list[np.ndarray]:
    """(H, W[, C]) arrays of one frame (an image, its mask), each placed at the same random spot of a frame
    ``factor`` x wider and taller that is filled by mirroring them outwards (the same skin, no seams; a
    mask is mirrored with its image, so the labels stay true)."""
    h, w = arrays[0].shape[:2]
    extra_h, extra_w = round(h * (factor - 1)), round(w * (factor - 1))
    top, left = rng.randint(0, extra_h), rng.randint(0, extra_w)
    pads = ((top, extra_h - top), (left, extra_w - left))
    return [np.pad(a, pads + ((0, 0),) * (a.ndim - 2), mode="symmetric") for a in arrays]


def lesion_crop(image: Image.Image, box: tuple[int, int, int, int], fill: float, rng: random.Random) -> Image.Image:
    """A square around the lesion ``box`` (left, top, right, bottom) that its longest side fills ``fill`` of,
    centred on it give or take a tenth of the side (a segmenter's box is not exact). Like smart_crop_box it is
    shifted to stay inside the frame where it fits; where it does not, the skin beyond the edge is mirrored."""
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    left, top, right, bottom = box
    side = max(8, round(max(right - left, bottom - top) / fill))
    cx = (left + right) / 2 + rng.uniform(-0.1, 0.1) * side
    cy = (top + bottom) / 2 + rng.uniform(-0.1, 0.1) * side
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    if side <= w:
        x0 = min(max(0, x0), w - side)
    if side <= h:
        y0 = min(max(0, y0), h - side)
    pad_x, pad_y = (max(0, -x0), max(0, x0 + side - w)), (max(0, -y0), max(0, y0 + side - h))
    if any(pad_x + pad_y):
        arr = np.pad(arr, (pad_y, pad_x, (0, 0)), mode="symmetric")
    x0, y0 = x0 + pad_x[0], y0 + pad_y[0]
    return Image.fromarray(np.ascontiguousarray(arr[y0:y0 + side, x0:x0 + side]))


def lesion_box_in_image(mask: np.ndarray, image_size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The bounding box (left, top, right, bottom) of a reference mask's lesion (bool H, W) in the pixels of an
    image of ``image_size`` (width, height); None when the lesion is empty or outside the image.

    A mask of the image's aspect ratio is scaled. Otherwise the image is taken to be the mask frame's centred
    crop at the image's aspect: HAM10000's sharper 224 px copy is the centre square of the 600x450 photographs
    whose masks are 4:3.
    """
    box = mask_box(mask)
    if box is None:
        return None
    mh, mw = mask.shape
    iw, ih = image_size
    if abs(iw / ih - mw / mh) < 0.02:
        cw, ch = mw, mh
    elif iw / ih < mw / mh:  # the image is narrower: the crop spans the mask's full height
        cw, ch = mh * iw / ih, mh
    else:
        cw, ch = mw, mw * ih / iw
    ox, oy = (mw - cw) / 2, (mh - ch) / 2
    sx, sy = iw / cw, ih / ch
    left, right = max(0, math.floor((box[0] - ox) * sx)), min(iw, math.ceil((box[2] - ox) * sx))
    top, bottom = max(0, math.floor((box[1] - oy) * sy)), min(ih, math.ceil((box[3] - oy) * sy))
    if right - left < 2 or bottom - top < 2:
        return None
    return left, top, right, bottom


def lesion_boxes(samples, masks_dir) -> dict[str, tuple[int, int, int, int]]:
    """{image_id: lesion box in that image's pixels} for the samples whose reference mask
    (``<image_id>_segmentation.png`` in ``masks_dir``, else in ``<images folder>/../masks``) exists."""
    from .segmenter import mask_path, read_mask  # segmenter imports this module

    boxes = {}
    for sample in samples:
        path = mask_path(sample, None if masks_dir is None else Path(masks_dir))
        if not path.is_file():
            continue
        with Image.open(sample.image_path) as im:  # the header only: the size, not the pixels
            size = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF turns it a quarter: decoded upright
                size = size[::-1]
        box = lesion_box_in_image(read_mask(path), size)
        if box is not None:
            boxes[sample.image_id] = box
    return boxes


def _small_rotation(image: Image.Image, degrees: float, rng: random.Random) -> Image.Image:
    if degrees <= 0:
        return image
    angle = rng.uniform(-degrees, degrees)
    # pad by reflection first so the rotated corners show skin, not black wedges the model could learn
    arr = np.asarray(image)
    pad = int(math.ceil(max(arr.shape[:2]) * 0.21))
    padded = Image.fromarray(np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="reflect"))
    rotated = padded.rotate(angle, resample=Image.BILINEAR)
    return rotated.crop((pad, pad, pad + image.size[0], pad + image.size[1]))


def _colour_jitter(image: Image.Image, aug: AugmentConfig, rng: random.Random) -> Image.Image:
    ops = [
        (ImageEnhance.Brightness, aug.brightness),
        (ImageEnhance.Contrast, aug.contrast),
        (ImageEnhance.Color, aug.saturation),
    ]
    rng.shuffle(ops)
    for enhancer, strength in ops:
        if strength > 0:
            image = enhancer(image).enhance(rng.uniform(1 - strength, 1 + strength))
    if aug.hue > 0:
        hsv = np.asarray(image.convert("HSV")).copy()
        shift = int(round(rng.uniform(-aug.hue, aug.hue) * 255))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
        image = Image.fromarray(hsv, "HSV").convert("RGB")
    return image


def augment(image: Image.Image, spec: Preprocessing, aug: AugmentConfig, rng: random.Random,
            box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """A randomly augmented RGB PIL image at the model's input size (``spec.image_size`` square); ``box`` is
    the lesion's bounding box in ``image`` (from its reference mask) when known."""
    # no random draw for an option that is off: older recipes replay exactly
    if box is not None and aug.lesion_crop > 0 and rng.random() < aug.lesion_crop:
        image = lesion_crop(image, box, rng.uniform(*aug.lesion_crop_fill), rng)
    else:
        image = _model_view(image, spec)
        if aug.zoom_out > 0 and rng.random() < aug.zoom_out:
            image = Image.fromarray(zoom_out([np.asarray(image)], rng.uniform(1.0, aug.zoom_out_max), rng)[0])
    image = _random_resized_crop(image, aug, rng)
    # resize to the model size before the cheap pixel ops: the source may be much larger
    image = image.resize((spec.image_size, spec.image_size), Image.BILINEAR)
    if aug.rotate_degrees > 0:
        image = _small_rotation(image, aug.rotate_degrees, rng)
    if aug.flips and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if aug.flips and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_TOP_BOTTOM)
    if aug.rotate90:
        turns = rng.randrange(4)
        if turns:
            image = image.transpose([Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270][turns - 1])
    return _colour_jitter(image, aug, rng)


class LesionDataset(Dataset):
    """Items are (image 3xSxS float32, metadata vector (dim,) or (0,), label) for a LabelledSet."""

    def __init__(self, data: LabelledSet, spec: Preprocessing, aug: AugmentConfig | None = None,
                 metadata: MetadataSpec | None = None, seed: int = 0,
                 boxes: dict[str, tuple[int, int, int, int]] | None = None):
        self.data = data
        self.boxes = boxes or {}  # image_id -> lesion box, for augment's lesion crop
        self.spec = spec
        self.aug = aug if aug is not None and aug.enabled else None
        self.metadata = metadata
        self.labels = data.labels
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (call once per epoch, like DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def __getitem__(self, i: int):
        sample = self.data.samples[i]
        image = load_rgb(sample.image_path)
        if self.aug is None:
            x = preprocess(image, self.spec)
        else:
            # seeded per (seed, epoch, item): the same run draws the same augmentations on any
            # number of workers or processes, which keeps --resume and DDP runs reproducible
            rng = random.Random(hash((self.seed, self.epoch, i)))
            view = augment(image, self.spec, self.aug, rng, self.boxes.get(sample.image_id))
            x = normalize(np.asarray(resize_for_model(view, self.spec)), self.spec)
        if self.metadata is not None:
            meta = self.metadata.encode(sample.age, sample.sex, sample.site)
        else:
            meta = np.zeros(0, dtype=np.float32)
        return torch.from_numpy(x), torch.from_numpy(meta), self.labels[i]


def class_weights(labels: list[int], num_classes: int, power: float = 1.0) -> np.ndarray:
    """Per-class weights ∝ count^-power, normalised to mean 1 over present classes (absent → 1)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.ones(num_classes)
    w[present] = counts[present] ** -power
    w[present] /= w[present].mean()
    return w.astype(np.float32)


class BalancedSampler(Sampler[int]):
    """Draws indices with probability ∝ class_weight[label], sharded over DDP ranks.

    Every rank draws the same seeded sequence per epoch and keeps its own stride of it, so the
    ranks together see one class-balanced epoch without communicating.
    """

    def __init__(self, labels: list[int], num_classes: int, num_samples: int | None = None,
                 power: float = 1.0, rank: int = 0, world_size: int = 1, seed: int = 0):
        w = class_weights(labels, num_classes, power)[np.asarray(labels, dtype=int)]
        self.probs = torch.as_tensor(w / w.sum(), dtype=torch.double)
        total = num_samples or len(labels)
        self.per_rank = int(math.ceil(total / world_size))
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's draw."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draw = torch.multinomial(self.probs, self.per_rank * self.world_size, replacement=True, generator=g)
        return iter(draw[self.rank::self.world_size].tolist())
