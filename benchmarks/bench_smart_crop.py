"""Smart crop: balanced accuracy on validation images zoomed out synthetically, with and without smart crop.

Usage:
  python benchmarks/bench_smart_crop.py --model runs/<run>/bundle [--split runs/<run>/split.csv]
         [--part val|test] [--data ../shared/data] [--images 1000] [--factor 3] [--threads 1] [--no-refine]

Zoom-out: each validation photograph (the lesion with the skin around it) is placed at a seeded random position
on a field ``factor`` times wider and taller, made of that image's own skin: lesion, lens-edge and other dark
pixels are replaced by skin cloned from shifted copies of the same image, and the result is mirror-tiled from
where the photograph sits, so the field next to each edge continues that edge's skin; the photograph's edges
are blended into it over 8 % of its shorter side. The lesion keeps its pixel size, so it fills 1/factor of what
it filled, like a lesion photographed small in a wide field by a phone. ``--paste lesion``: only the lesion (its
mask dilated 8 px, feathered) is pasted, so its own surroundings are replaced too (harder; the first variant,
though the field's anchoring and the seeded placement now differ from it, so its numbers move a little).

Four conditions, the same bundle: original images with smart crop off (the reference) and on, zoomed-out
images with smart crop off and on. The quality gate and OOD refusal are off so every image gets an answer;
balanced accuracy (7 classes, top-1) with a 95 % bootstrap CI (1,000 resamples), and how often smart crop
fired. The validation split is the run's (``--split``, rows with split=val) or grouped_split seed 0.
Prints a markdown section for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def validation_samples(data: Path, split_csv: Path | None, limit: int, part: str = "val") -> list:
    """The ``part`` (val or test) samples of the run's split (else of grouped_split seed 0), seeded order, at most
    ``limit``."""
    from dermscreen.manifests import load_labels
    from dermscreen.splits import grouped_split

    labelled = load_labels(data / "ham10000" / "HAM10000_metadata.csv")
    if split_csv is not None:
        with open(split_csv, newline="", encoding="utf-8") as f:
            wanted = {row["image_id"] for row in csv.DictReader(f) if row.get("split") == part}
        val = [s for s in labelled.samples if s.image_id in wanted]
    else:
        val = [labelled.samples[i] for i in grouped_split(labelled, seed=0)[part]]
    order = np.random.default_rng(0).permutation(len(val))[:limit]
    return [val[i] for i in order]


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * px + 1))
    return np.asarray(img) > 0


def skin_field(rgb: np.ndarray, lesion: np.ndarray, size: tuple[int, int], rng: np.random.Generator,
               origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A (height, width, 3) field of this image's skin: lesion and lens-edge pixels cloned from skin, mirror-tiled.

    The tiling is anchored at ``origin`` (x, y), where the photograph will be pasted, so the field next to each
    of its edges continues that edge's own skin (mirrored): no seam where the photograph meets the field.
    """
    value = rgb.max(axis=2).astype(np.float32)
    # the lesion, the lens edge's dark corners and any other dark spot (a second mole) are not plain skin
    not_skin = _dilate(lesion | (value < 0.7 * np.median(value)), 4)
    skin = rgb[~not_skin]
    if len(skin) < 100:  # the lesion fills the frame: fall back to a plain skin tone
        skin = np.array([[200, 150, 130]], np.uint8)
    patch = rgb.copy()
    # fill the hole with skin texture copied from shifted copies of the image (like cloning a patch of skin),
    # trying shifts of growing size in eight directions; what no shift reaches gets sampled skin colours
    remaining = not_skin.copy()
    h, w = lesion.shape
    for step in (0.25, 0.4, 0.55, 0.7):
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)):
            shift = (round(dy * step * h), round(dx * step * w))
            source_ok = np.roll(~not_skin, shift, axis=(0, 1))
            fill = remaining & source_ok
            patch[fill] = np.roll(rgb, shift, axis=(0, 1))[fill]
            remaining &= ~fill
    patch[remaining] = skin[rng.integers(0, len(skin), int(remaining.sum()))]
    w, h = size
    ph, pw = patch.shape[:2]
    x0, y0 = origin
    return np.pad(patch, ((y0, max(0, h - ph - y0)), (x0, max(0, w - pw - x0)), (0, 0)), mode="symmetric")[:h, :w]


def _frame_alpha(h: int, w: int, feather: float) -> np.ndarray:
    """(h, w, 1) weights: 1 inside, ramping smoothly to 0 over ``feather`` of the shorter side at the edges."""
    ramp = max(1.0, feather * min(h, w))
    ys = np.minimum(np.arange(h), np.arange(h)[::-1])[:, None] + 0.5
    xs = np.minimum(np.arange(w), np.arange(w)[::-1])[None, :] + 0.5
    t = np.clip(np.minimum(ys, xs) / ramp, 0.0, 1.0)
    return (t * t * (3 - 2 * t))[..., None].astype(np.float32)  # smoothstep: no visible seam


def zoom_out(rgb: np.ndarray, lesion: np.ndarray, factor: float, seed: int, paste: str = "image") -> np.ndarray:
    """``rgb`` placed small, feathered, at a seeded position on a skin field ``factor`` x wider and taller.

    ``paste="image"``: the whole photograph (the lesion with the skin around it, as a wider shot would show it),
    its edges blended into the field over 8 % of its shorter side. ``paste="lesion"``: only the lesion (its mask
    dilated 8 px, feathered), so its own surroundings are replaced by the field (the harder, older variant).
    """
    rng = np.random.default_rng(seed)
    h, w = lesion.shape
    size = (round(w * factor), round(h * factor))
    x0 = int(rng.integers(0, size[0] - w + 1))
    y0 = int(rng.integers(0, size[1] - h + 1))
    field = skin_field(rgb, lesion, size, rng, (x0, y0)).astype(np.float32)
    if paste == "image":
        alpha = _frame_alpha(h, w, 0.08)
    else:
        alpha = np.asarray(Image.fromarray(_dilate(lesion, 8).astype(np.uint8) * 255).filter(
            ImageFilter.GaussianBlur(4)), dtype=np.float32)[..., None] / 255.0
    region = field[y0:y0 + h, x0:x0 + w]
    field[y0:y0 + h, x0:x0 + w] = region * (1 - alpha) + rgb.astype(np.float32) * alpha
    return np.clip(field + 0.5, 0, 255).astype(np.uint8)


def balanced_accuracy_ci(y: np.ndarray, pred: np.ndarray, n: int = 1000) -> tuple[float, float, float]:
    """Balanced accuracy and its 95 % bootstrap CI."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # predicted classes absent from a (re)sample warn; the score is defined
        point = balanced_accuracy_score(y, pred)
        boots = [balanced_accuracy_score(y[i], pred[i]) for i in rng.integers(0, len(y), (n, len(y)))]
    return float(point), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="a trained bundle folder or zip")
    ap.add_argument("--split", type=Path, default=None, help="the run's split.csv (its val rows are used)")
    ap.add_argument("--part", choices=("val", "test"), default="val",
                    help="which held-out part of the split: val (where settings are chosen) or test (a check after)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--factor", type=float, default=3.0, help="how many times wider and taller the zoomed-out field is")
    ap.add_argument("--paste", choices=("image", "lesion"), default="image",
                    help="paste the whole photograph (default) or only the lesion onto the skin field")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--crop-below", type=float, nargs="+", default=None,
                    help="smart_crop_below values to compare (default: the Screener's)")
    ap.add_argument("--crop-fill", type=float, default=None, help="smart_crop_fill (default: the Screener's)")
    ap.add_argument("--no-refine", action="store_true", help="crop around the first outline (no second segmentation)")
    args = ap.parse_args()
    from dermscreen.screening import Screener, ScreenerSettings

    common = dict(quality_gate=False, ood_refusal=False, heatmap=False, abcd=False, threads=args.threads)
    without = Screener(args.model, ScreenerSettings(smart_crop=False, **common))
    below = args.crop_below or [ScreenerSettings().smart_crop_below]
    fill = {} if args.crop_fill is None else {"smart_crop_fill": args.crop_fill}
    fill["smart_crop_refine"] = not args.no_refine
    crops = {b: Screener(without.bundle, ScreenerSettings(smart_crop=True, smart_crop_below=b, **fill, **common))
             for b in below}
    with_crop = crops[below[0]]
    codes = with_crop.bundle.manifest.taxonomy.codes
    samples = validation_samples(args.data, args.split, args.images, args.part)
    keys = ["orig_off", "zoom_off"] + [f"{n}_on_{b:g}" for b in below for n in ("orig", "zoom")]
    truth, preds, fired = [], {k: [] for k in keys}, {k: 0 for k in keys}
    start = time.perf_counter()
    for k, s in enumerate(samples):
        rgb = np.asarray(Image.open(s.image_path).convert("RGB"))
        mask = np.asarray(Image.open(s.image_path.parent.parent / "masks" / f"{s.image_id}_segmentation.png")
                          .convert("L")) >= 128
        zoomed = zoom_out(rgb, mask, args.factor, seed=k, paste=args.paste)
        truth.append(codes.index(s.dx))
        for name, image in (("orig", rgb), ("zoom", zoomed)):
            off = without.analyze_image(image, heatmap=False)
            preds[f"{name}_off"].append(int(np.argmax([p.probability for p in off.probabilities])))
            for b, screener in crops.items():
                on = screener.analyze_image(image, heatmap=False)
                preds[f"{name}_on_{b:g}"].append(int(np.argmax([p.probability for p in on.probabilities])))
                fired[f"{name}_on_{b:g}"] += on.lesion is not None and on.lesion.crop_box is not None
    y = np.array(truth)
    from bench_screening import machine_info

    where = "validation" if args.part == "val" else "test"
    print(f"\n### Smart crop on zoomed-out {where} images (benchmarks/bench_smart_crop.py)\n\n{machine_info()}\n")
    m = with_crop.bundle.manifest
    print(f"Model {m.name} {m.version} ({m.model.backbone}, {m.preprocessing.image_size} px), {len(y)} {where} "
          f"images, zoom-out factor {args.factor:g} (pasted: {args.paste}), {time.perf_counter() - start:.0f} s.\n")
    print(f"Segmentation: {'the bundle segmenter' if with_crop.segmenter is not None else 'classical'}"
          f"{', outline refined around a small lesion' if with_crop.settings.smart_crop_refine else ''}; "
          f"the lesion fills {with_crop.settings.smart_crop_fill:g} of the crop's side.\n")
    print("| images | smart crop (crop when the lesion's longest side < x of the shorter side) | balanced accuracy "
          "| 95 % CI | crop fired |\n|---|---|---|---|---|")
    for key in sorted(keys, key=lambda k: (not k.startswith("orig"), k)):
        ba, lo, hi = balanced_accuracy_ci(y, np.array(preds[key]))
        name, _, b = key.partition("_on_")
        label = ("original" if key.startswith("orig") else "zoomed out") + " | " + (f"on, x = {b}" if b else "off")
        share = f"{100 * fired[key] / len(y):.0f} %" if b else ""
        print(f"| {label} | {ba:.3f} | {lo:.3f}-{hi:.3f} | {share} |")


if __name__ == "__main__":
    main()
