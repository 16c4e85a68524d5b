"""Measure "cannot assess" refusals: in-distribution dermoscopy vs images that are not dermoscopy at all.

Usage: python benchmarks/bench_ood.py --model runs/<run>/bundle [--data ../shared/data] [--n-in 1000]
       [--ids val_ids.txt]

In-distribution: HAM10000 images (``--ids``: a file of image ids, one per line or a CSV with an
``image_id`` column, to restrict to the model's validation/test images; without it a spread sample
of ham10000_224 is used, which may include training images and so flatters the refusal rate).
Target: <= 5 % refused.

Not dermoscopy (target: >= 95 % refused), built offline, no download:
- natural photographs shipped inside the scikit-image wheel (astronaut, coffee, cat, rocket,
  motorcycle, Hubble field, retina, coins, bricks, grass, gravel, ...) and matplotlib's sample
  photos, each used whole and as 4 random crops (25-60 % of the side), so framing varies;
- documents: rendered pages of text, and scikit-image's scanned page and text images;
- synthetic frames: uniform colours (incl. skin tones), noise (uniform, Gaussian, coloured),
  gradients and checkerboards.
Reported per group: refused by the quality gate, by the OOD check, and in total.
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
_SKIMAGE_SKIP = {"lfw_subset.npy", "motorcycle_disp.npz", "lbpcascade_frontalface_opencv.xml", "README.txt",
                 "multipage.tif", "multipage_rgb.tif", "no_time_for_that_tiny.gif"}


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def natural_photos(rng: np.random.Generator) -> dict[str, list[bytes]]:
    """scikit-image and matplotlib sample images (whole + 4 random crops each), split photos/documents."""
    files = []
    try:
        import skimage.data

        files += [p for p in sorted(Path(skimage.data.__file__).parent.iterdir())
                  if p.suffix in (".png", ".jpg") and p.name not in _SKIMAGE_SKIP]
    except ImportError:
        print("scikit-image not installed (pip install 'dermscreen[bench]'): its sample photos are skipped")
    import matplotlib

    mpl = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
    files += [mpl / n for n in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png") if (mpl / n).exists()]
    groups: dict[str, list[bytes]] = {"natural photos (whole + crops)": [], "scanned documents / text": []}
    for path in files:
        rgb = _rgb(path)
        group = "scanned documents / text" if path.stem in ("page", "text") else "natural photos (whole + crops)"
        groups[group].append(_png(rgb))
        h, w = rgb.shape[:2]
        for _ in range(4):
            side = int(min(h, w) * rng.uniform(0.25, 0.6))
            if side < 64:
                continue
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            groups[group].append(_png(np.ascontiguousarray(rgb[y:y + side, x:x + side])))
    return groups


def documents(n: int, rng: np.random.Generator) -> list[bytes]:
    """Rendered text pages (black/blue text on white/cream), like a photographed letter or form."""
    words = "patient referral dermatology lesion report date clinic name address result follow up".split()
    out = []
    for i in range(n):
        img = Image.new("RGB", (600, 450), tuple(int(v) for v in rng.integers(225, 256, 3)))
        draw = ImageDraw.Draw(img)
        for line in range(int(rng.integers(8, 20))):
            text = " ".join(rng.choice(words, int(rng.integers(3, 9))))
            draw.text((30, 20 + line * 21), text, fill=(0, 0, int(rng.integers(0, 120))))
        out.append(_png(np.asarray(img)))
    return out


def synthetic(rng: np.random.Generator) -> dict[str, list[bytes]]:
    """Blank frames, noise, gradients and checkerboards at 300x225."""
    h, w = 225, 300
    colours = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (224, 172, 150), (190, 130, 110), (90, 60, 50),
               (200, 40, 40), (40, 40, 200)]
    blanks = [_png(np.full((h, w, 3), c, np.uint8)) for c in colours]
    noise = [_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(6)]
    noise += [_png(np.clip(rng.normal(128, s, (h, w, 3)), 0, 255).astype(np.uint8)) for s in (10, 30, 60)]
    noise += [_png(np.clip(rng.normal(0, 25, (h, w, 1)) + np.array(c), 0, 255).astype(np.uint8))
              for c in colours[3:6]]
    yy, xx = np.mgrid[0:h, 0:w]
    patterns = [_png(np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1).astype(np.uint8)),
                _png(np.repeat(((xx // 25 + yy // 25) % 2 * 255).astype(np.uint8)[..., None], 3, -1)),
                _png(np.repeat(((xx // 7 + yy // 7) % 2 * 200 + 30).astype(np.uint8)[..., None], 3, -1))]
    return {"blank frames": blanks, "noise": noise, "gradients / checkerboards": patterns}


def in_distribution(data: Path, n: int, ids_file: Path | None) -> list[bytes]:
    """HAM10000 image bytes: those listed in ``ids_file``, else a spread sample of ham10000_224."""
    folder = data / "ham10000_224" / "images"
    if ids_file:
        text = ids_file.read_text()
        if "image_id" in text.splitlines()[0]:
            ids = [row["image_id"] for row in csv.DictReader(io.StringIO(text))]
        else:
            ids = [line.strip() for line in text.splitlines() if line.strip()]
        paths = [p for i in ids for p in (folder / f"{i}.jpg", data / "ham10000" / "images" / f"{i}.jpg") if p.exists()]
        paths = list(dict.fromkeys(paths))
    else:
        paths = sorted(folder.glob("*.jpg"))
    step = max(1, len(paths) // n)
    return [p.read_bytes() for p in paths[::step][:n]]


def refusals(screener, images: list[bytes]) -> tuple[int, int, int]:
    """(refused by quality, refused by OOD, total cannot_assess) over images."""
    quality = ood = 0
    for data in images:
        result = screener.analyze(data, heatmap=False)
        quality += not result.quality.passed
        ood += result.ood.in_distribution is False
    return quality, ood, quality + ood


def main() -> None:
    """Parse arguments, run both sets through the Screener, print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a trained bundle (the tiny test model's OOD is meaningless)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--n-in", type=int, default=1000)
    ap.add_argument("--ids", type=Path, help="image ids of the model's validation/test images")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from dermscreen.screening import Screener

    rng = np.random.default_rng(args.seed)
    screener = Screener(args.model)
    m = screener.bundle.manifest
    print(f"# OOD refusal benchmark: model {m.name} {m.version} ({m.model.backbone}), OOD threshold "
          f"{screener.ood_threshold}")
    groups = {"IN: HAM10000 dermoscopy": in_distribution(args.data, args.n_in, args.ids)}
    groups.update(natural_photos(rng))
    groups["scanned documents / text"] = groups.get("scanned documents / text", []) + documents(20, rng)
    groups.update(synthetic(rng))
    print("\n| set | n | refused: quality | refused: OOD | cannot assess |\n|---|---|---|---|---|")
    out_total = out_refused = 0
    for name, images in groups.items():
        q, o, total = refusals(screener, images)
        print(f"| {name} | {len(images)} | {q} | {o} | {total} ({total / max(1, len(images)):.1%}) |")
        if not name.startswith("IN:"):
            out_total, out_refused = out_total + len(images), out_refused + total
    print(f"| **all non-dermoscopic** | {out_total} | | | {out_refused} ({out_refused / max(1, out_total):.1%}) |")


if __name__ == "__main__":
    main()
