"""``dermscreen train-segmenter``: a lesion segmentation network, trained on masks, exported into a bundle.

Model: the EfficientNet-Lite encoder of ``backbones.create_backbone`` (offline ImageNet weights) up to its
stride-16 stage, tapped at strides 4, 8 and 16, and a light U-Net-style decoder (1x1 laterals; upsample,
concatenate the skip and one 3x3 conv per level; ~0.1 M parameters) giving one lesion logit per pixel at the
input size. The stride-32 stages are never run: a lesion outline needs no more context than the stride-16
features already see at these input sizes, and they hold most of the encoder's weights and a third of its
compute (the exported ONNX holds only what runs). The whole frame is squashed to S x S, as
``lesion.OnnxSegmenter`` does at inference.

Data: the masks (``<image_id>_segmentation.png``, lesion >= 128) beside the images; the split is
``splits.grouped_split`` by lesion with the same seed and fractions as the classifier recipe, so the
test lesions are the classifier's test lesions too. Loss: BCE + soft Dice. Quality: per-image Dice and
IoU at the masks' own resolution, mean with a 95 % bootstrap CI, on the validation split after each
epoch (best kept) and on the test split at the end.

Export: ONNX (input ``image`` (N,3,S,S), output ``logits`` (N,1,S,S)), checked against torch on a real
batch (max abs difference <= 1e-4, else nothing is written), then written as ``segmenter.onnx`` into a
copy of a classifier bundle, with ``manifest.segmenter`` and its sha256 in ``manifest.files``.
"""
from __future__ import annotations

import io
import json
import logging
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..bundle import SEGMENTER_BATCH_DIM, SEGMENTER_FILE, Bundle, SegmenterSpec, check_output_folder
from ..errors import BundleError, ConfigError
from ..lesion import add_segmenter, bootstrap_ci, dice_iou  # noqa: F401 (dice_iou: part of this API)
from ..manifests import LabelledSet, Sample, load_labels
from ..splits import grouped_split
from ..taxonomy import HAM10000, DiagnosisClass, Taxonomy
from .backbones import DEFAULT_BACKBONE, create_backbone
from .data import load_rgb, zoom_out

log = logging.getLogger("dermscreen.training")
TAPS = (1, 2, 4)  # EfficientNet(-Lite) block stages ending at strides 4, 8, 16; later stages are not run
DECODER_WIDTHS = (64, 48, 32)  # stride 16, 8, 4
TOLERANCE = 1e-4
MAX_ZOOM = 3.5  # training zoom-out up to this factor: a lesion as small as ~1/3.5 of the frame's side
SEGMENTER_JSON = "segmenter.json"  # beside segmenter.onnx in a train-segmenter run folder: spec and history


# ---- model -------------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class LesionSegmenterNet(nn.Module):
    """forward(image (N,3,S,S)) → lesion logits (N,1,S,S); S a multiple of 16 (the deepest stage run)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        channels = self._tap_channels()
        # 1x1 laterals (as in FPN) keep the decoder light: the 3x3 work happens after fusing, at few channels
        self.lateral = nn.ModuleList([_conv(c, w, 1) for c, w in zip(channels[::-1], DECODER_WIDTHS)])
        self.fuse = nn.ModuleList([_conv(DECODER_WIDTHS[i] + DECODER_WIDTHS[i + 1], DECODER_WIDTHS[i + 1])
                                   for i in range(len(DECODER_WIDTHS) - 1)])
        self.head = nn.Conv2d(DECODER_WIDTHS[-1], 1, 1)

    @torch.no_grad()
    def _tap_channels(self) -> list[int]:
        was = self.backbone.training
        feats = self.encode(torch.zeros(1, 3, 64, 64).to(next(self.backbone.parameters()).device))
        self.backbone.train(was)
        return [f.shape[1] for f in feats]

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps at strides 4, 8 and 16."""
        b = self.backbone
        x = b.bn1(b.conv_stem(image))
        taps = []
        for i, block in enumerate(b.blocks):
            x = block(x)
            if i in TAPS:
                taps.append(x)
            if i == TAPS[-1]:
                break
        return taps

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        feats = self.encode(image)[::-1]  # deepest first
        x = self.lateral[0](feats[0])
        for lateral, fuse, skip in zip(self.lateral[1:], self.fuse, feats[1:]):
            skip = lateral(skip)
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = fuse(torch.cat([x, skip], dim=1))
        return F.interpolate(self.head(x), size=image.shape[-2:], mode="bilinear", align_corners=False)


# ---- data --------------------------------------------------------------------------------------------
def mask_path(sample: Sample, masks_dir: Path | None) -> Path:
    """Where ``sample``'s mask lives: ``masks_dir`` or ``<images folder>/../masks``."""
    folder = masks_dir or sample.image_path.parent.parent / "masks"
    return folder / f"{sample.image_id}_segmentation.png"


def read_mask(path: Path) -> np.ndarray:
    """A reference mask file → bool (H, W), lesion where >= 128."""
    try:
        return np.asarray(Image.open(path).convert("L")) >= 128
    except OSError as exc:
        raise ConfigError(f"Cannot read the mask {path}: {exc}. Give --masks with <image_id>_segmentation.png "
                          "files for every image.") from None


class MaskDataset(Dataset):
    """(image (3,S,S) normalised, mask (1,S,S) float, index) of samples.

    When training: zoom-out (probability ``zoom_out``, factor up to ``max_zoom``), flips, quarter turns and mild
    colour jitter.
    """

    def __init__(self, samples: list[Sample], masks_dir: Path | None, spec: SegmenterSpec, train: bool, seed: int = 0,
                 zoom_out: float = 0.0, max_zoom: float = MAX_ZOOM):
        self.samples, self.masks_dir, self.spec, self.train, self.seed = samples, masks_dir, spec, train, seed
        self.zoom_out, self.max_zoom = zoom_out, max_zoom
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.spec.image_size
        sample = self.samples[i]
        image = np.asarray(load_rgb(sample.image_path))
        mask = read_mask(mask_path(sample, self.masks_dir)).astype(np.uint8) * 255
        rng = random.Random(hash((self.seed, self.epoch, i)))
        if self.train and self.zoom_out > 0 and rng.random() < self.zoom_out:  # no draw when off: old runs replay
            # lesions small and off-centre in a wide field, as a phone photo shows them (HAM10000 has few)
            image, mask = zoom_out([image, mask], rng.uniform(1.2, self.max_zoom), rng)
        x = np.asarray(Image.fromarray(image).resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0
        m = np.asarray(Image.fromarray(mask).resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0
        if self.train:
            if rng.random() < 0.5:
                x, m = x[:, ::-1], m[:, ::-1]
            if rng.random() < 0.5:
                x, m = x[::-1], m[::-1]
            if rng.random() < 0.5:  # dermoscopy has no "up": quarter turns are as real as flips
                x, m = np.rot90(x), np.rot90(m)
            x = np.clip(x * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05), 0.0, 1.0)
        x = (x - np.asarray(self.spec.mean, np.float32)) / np.asarray(self.spec.std, np.float32)
        return (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(m))[None], i)


# ---- loss and metrics -----------------------------------------------------------------------------------
def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + (1 - soft Dice per image, averaged): BCE for per-pixel calibration, Dice for the overlap we report."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + 1.0) / (p.sum(1) + t.sum(1) + 1.0)
    return bce + (1.0 - dice).mean()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: MaskDataset, device, batch_size: int, threshold: float = 0.5) -> dict[str, float]:
    """Per-image Dice/IoU at each mask's own resolution → {dice, dice_ci_low, dice_ci_high, iou, ..., n}."""
    model.eval()
    dices, ious = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for images, _, index in loader:
        probs = torch.sigmoid(model(images.to(device))).cpu()
        for prob, i in zip(probs, index.tolist()):
            truth = read_mask(mask_path(dataset.samples[i], dataset.masks_dir))
            full = F.interpolate(prob[None], size=truth.shape, mode="bilinear", align_corners=False)[0, 0]
            d, j = dice_iou(full.numpy() > threshold, truth)
            dices.append(d)
            ious.append(j)
    d, j = np.array(dices), np.array(ious)
    (dl, dh), (il, ih) = bootstrap_ci(d), bootstrap_ci(j)
    return {"dice": float(d.mean()), "dice_ci_low": dl, "dice_ci_high": dh, "iou": float(j.mean()),
            "iou_ci_low": il, "iou_ci_high": ih, "n": float(len(d))}


# ---- export ------------------------------------------------------------------------------------------
def to_onnx(model: nn.Module, image_size: int) -> bytes:
    """The segmenter as ONNX bytes (TorchScript exporter, opset 17, dynamic batch): image → logits."""
    model = model.cpu().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, image_size, image_size),), buf, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: SEGMENTER_BATCH_DIM}, "logits": {0: SEGMENTER_BATCH_DIM}},
                          dynamo=False, opset_version=17)
    return buf.getvalue()


def check_onnx(onnx_bytes: bytes, model: nn.Module, images: np.ndarray, tolerance: float = TOLERANCE) -> float:
    """Max abs difference of ONNX Runtime vs torch logits on ``images``; BundleError above ``tolerance``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as served
    got = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": images.astype(np.float32)})[0]
    with torch.no_grad():
        want = model.cpu().eval()(torch.from_numpy(images.astype(np.float32))).numpy()
    diff = float(np.max(np.abs(got - want)))
    if not diff <= tolerance:
        raise BundleError(f"ONNX export of the segmenter does not reproduce torch: max abs difference {diff:.2e} "
                          f"exceeds {tolerance:g}. Nothing was written.")
    return diff


# ---- the command's work ---------------------------------------------------------------------------------
@dataclass
class SegmenterResult:
    """What a train-segmenter run produced."""

    onnx_path: Path
    spec: SegmenterSpec
    bundle_dir: Path | None
    epochs: int
    wall_time_s: float


class _AnyCodes(Taxonomy):
    """HAM10000's classes, then any other code as it is met: train-segmenter reads no diagnoses, and the split is
    stratified by whatever codes the CSV uses (HAM10000 data keeps the classifier recipe's split)."""

    def index(self, code: str) -> int:
        key = code.strip().lower()
        for i, c in enumerate(self.classes):
            if c.code == key:
                return i
        self.classes.append(DiagnosisClass.model_construct(code=key, name=key, group="benign", description=""))
        return len(self.classes) - 1


def _subsample(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    if not n or n >= len(samples):
        return samples
    return [samples[i] for i in sorted(np.random.default_rng(seed).permutation(len(samples))[:n])]


def _split(data: LabelledSet, max_images: int | None, seed: int) -> dict[str, list[Sample]]:
    """Lesion-grouped train/val/test samples (the classifier recipe's fractions and seed)."""
    split = grouped_split(data, val_fraction=0.15, test_fraction=0.15, seed=seed)
    out = {k: [data.samples[i] for i in v] for k, v in split.items()}
    if max_images:  # smoke runs: keep the proportions, never mix the splits
        out = {k: _subsample(v, max(2, round(max_images * len(v) / len(data))), seed) for k, v in out.items()}
    return out


def check_new_segmenter_folder(out: Path) -> None:
    """Refuse an ``out`` that already holds a segmenter run: its files would be overwritten one by one, and an old
    bundle/ (holding the old segmenter) left beside the new segmenter.onnx when this run has no --bundle."""
    held = [name for name in (SEGMENTER_FILE, SEGMENTER_JSON, "bundle") if (out / name).exists()]
    if held:
        raise ConfigError(f"{out} already holds a segmenter run ({', '.join(held)}); give a new or empty folder "
                          "for --out.")


def train_segmenter(data_csv: Path, out: Path, *, images: Path | None = None, masks: Path | None = None,
                    bundle: Path | None = None, backbone: str = DEFAULT_BACKBONE, weights: str = "imagenet",
                    image_size: int = 256, epochs: int = 20, batch_size: int = 16, lr: float = 1e-3,
                    max_images: int | None = None, threads: int | None = None, device: str = "auto",
                    num_workers: int = 0, seed: int = 0, zoom_out: float = 0.5) -> SegmenterResult:
    """Train on ``data_csv``'s images and masks, export ONNX into ``out`` (and a bundle); returns SegmenterResult."""
    from .distributed import resolve_device

    for name, value in (("--epochs", epochs), ("--image-size", image_size), ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name} {value} must be at least 1.")
    if not lr > 0:
        raise ConfigError(f"--lr {lr:g} must be above 0.")
    if image_size % 16:  # the encoder is cut after its stride-16 stage (see the module docstring)
        raise ConfigError(f"image size {image_size} must be a multiple of 16 (the encoder's deepest stride used).")
    if not 0.0 <= zoom_out <= 1.0:
        raise ConfigError(f"zoom-out probability {zoom_out} must be between 0 and 1.")
    start = time.perf_counter()
    out = Path(out)
    check_output_folder(out)  # a bad --out should fail now, not after hours of training
    if bundle is not None:
        if (out / "bundle").resolve() == Path(bundle).resolve():
            raise ConfigError(f"--bundle {bundle} is the folder this run writes its new bundle to ({out / 'bundle'}): "
                              "a bundle is never modified in place; give another --out.")
        Bundle.load(bundle)  # a wrong --bundle should fail now, not after hours of training
    check_new_segmenter_folder(out)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = resolve_device(device)
    # the segmenter needs images and masks only: any diagnosis codes are accepted (custom taxonomies too)
    data = load_labels(data_csv, images, taxonomy=_AnyCodes(name="any", classes=list(HAM10000.classes)))
    parts = _split(data, max_images, seed)
    missing = [mask_path(s, masks) for part in parts.values() for s in part if not mask_path(s, masks).is_file()]
    if missing:  # all of them now, not one by one in the middle of training
        shown = ", ".join(str(p) for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"{len(missing)} mask(s) not found: {shown}. Give --masks FOLDER holding "
                          "<image_id>_segmentation.png for every image, or leave those images out of --data.")
    encoder, info = create_backbone(backbone, weights)
    spec = SegmenterSpec(backbone=backbone, image_size=image_size, mean=info.mean, std=info.std)
    model = LesionSegmenterNet(encoder).to(dev)
    log.info("segmenter: %s encoder (%s), %d/%d/%d images, %d px, device %s", backbone, info.weights,
             len(parts["train"]), len(parts["val"]), len(parts["test"]), image_size, dev)
    train_set = MaskDataset(parts["train"], masks, spec, train=True, seed=seed, zoom_out=zoom_out)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size,
                        num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    # the encoder is pretrained, the decoder is not: a gentler step for the encoder keeps its features
    optimizer = torch.optim.AdamW([{"params": model.backbone.parameters(), "lr": lr / 3},
                                   {"params": [p for n, p in model.named_parameters() if not n.startswith("backbone.")]}],
                                  lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[lr / 3, lr], total_steps=max(1, epochs * len(loader)))
    val_set = MaskDataset(parts["val"], masks, spec, train=False)
    best, best_state = -1.0, None
    out.mkdir(parents=True, exist_ok=True)
    history = []
    for epoch in range(epochs):
        model.train()
        train_set.epoch = epoch
        losses = []
        for x, m, _ in loader:
            loss = dice_bce_loss(model(x.to(dev)), m.to(dev))
            if not torch.isfinite(loss):  # as the classifier's loop: a diverged model must not be exported
                raise ConfigError("Segmenter training diverged (the loss became NaN or infinite): lower --lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        val = evaluate(model, val_set, dev, batch_size * 2)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None, **val})
        log.info("epoch %d: loss %.4f, val Dice %.4f (%.4f-%.4f), IoU %.4f", epoch + 1, history[-1]["loss"] or 0,
                 val["dice"], val["dice_ci_low"], val["dice_ci_high"], val["iou"])
        if val["dice"] > best:
            best, best_state = val["dice"], {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test = evaluate(model, MaskDataset(parts["test"], masks, spec, train=False), dev, batch_size * 2)
    spec = spec.model_copy(update={"validation": {**{f"test_{k}": v for k, v in test.items()},
                                                  "val_dice": best, "seed": float(seed),
                                                  "zoom_out": float(zoom_out)}})
    check = torch.stack([val_set[i][0] for i in range(min(4, len(val_set)))]).numpy()
    onnx_bytes = to_onnx(model, image_size)
    diff = check_onnx(onnx_bytes, model, check)
    log.info("segmenter ONNX vs torch max abs diff %.2e; test Dice %.4f (%.4f-%.4f), IoU %.4f", diff, test["dice"],
             test["dice_ci_low"], test["dice_ci_high"], test["iou"])
    onnx_path = out / SEGMENTER_FILE
    onnx_path.write_bytes(onnx_bytes)
    (out / SEGMENTER_JSON).write_text(json.dumps({"spec": spec.model_dump(), "history": history,
                                                  "onnx_max_abs_diff": diff}, indent=2), encoding="utf-8")
    bundle_dir = add_segmenter(bundle, out / "bundle", onnx_bytes, spec) if bundle else None
    return SegmenterResult(onnx_path, spec, bundle_dir, epochs, time.perf_counter() - start)
