"""Benchmark lesion segmentation: Dice/IoU on held-out HAM10000 lesions, and the added latency per image.

Usage:
  python benchmarks/bench_lesion.py [--data ../shared/data] [--images 1000] [--latency 200]
         [--segmenter BUNDLE]     # a bundle with segmenter.onnx; default: the classical fallback

Quality: the test split of ``grouped_split`` (seed 0, 15 %, grouped by lesion_id: the same held-out
lesions a classifier trained with the default recipe never saw) against the masks in
``ham10000/masks`` (thresholded at 128); mean Dice and IoU with 95 % bootstrap CIs (2,000
resamples of images), median, and the share of images where no lesion was found.
Latency: what the Screener adds per image with smart crop and ABCD on (segment → box → crop box →
ABCD → outline PNG), one thread, median and p95 over ``--latency`` images, after 10 warm-up runs; with
--segmenter also the Screener's whole lesion stage on the same images zoomed out 3x, where a small lesion
gets a second segmentation.
Prints a markdown section for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def held_out(data: Path, limit: int) -> list:
    """Samples of the lesion-grouped test split, in a seeded random order, at most ``limit``."""
    from dermscreen.manifests import load_labels
    from dermscreen.splits import grouped_split

    labelled = load_labels(data / "ham10000" / "HAM10000_metadata.csv")
    split = grouped_split(labelled, seed=0)
    test = [labelled.samples[i] for i in split["test"]]
    order = np.random.default_rng(0).permutation(len(test))[:limit]
    return [test[i] for i in order]


def ground_truth(sample) -> np.ndarray:
    """The sample's reference mask, bool (H, W)."""
    path = sample.image_path.parent.parent / "masks" / f"{sample.image_id}_segmentation.png"
    return np.asarray(Image.open(path).convert("L")) >= 128


def full_size(seg, shape: tuple[int, int]) -> np.ndarray:
    """A Segmentation's mask resized (nearest) to the image's (H, W)."""
    if seg.mask.shape == shape:
        return seg.mask
    return np.asarray(Image.fromarray(seg.mask.astype(np.uint8)).resize((shape[1], shape[0]), Image.NEAREST)) > 0


def measure_quality(samples: list, segment) -> dict:
    """Dice/IoU of ``segment`` (rgb → Segmentation) over samples; means, CIs, medians, not-found share."""
    from dermscreen.lesion import bootstrap_ci, dice_iou

    dices, ious, missed = [], [], 0
    for s in samples:
        rgb = np.asarray(Image.open(s.image_path).convert("RGB"))
        seg = segment(rgb)
        missed += not seg.found
        d, i = dice_iou(full_size(seg, rgb.shape[:2]), ground_truth(s))
        dices.append(d)
        ious.append(i)
    d, i = np.array(dices), np.array(ious)
    return {"n": len(d), "dice": d.mean(), "dice_ci": bootstrap_ci(d), "dice_median": float(np.median(d)),
            "iou": i.mean(), "iou_ci": bootstrap_ci(i), "iou_median": float(np.median(i)),
            "not_found": missed / len(d), "dice_below_0.5": float((d < 0.5).mean())}


def measure_latency(samples: list, segment, repeats: int) -> dict[str, dict[str, float]]:
    """Median and p95 ms per part of the lesion stage over ``repeats`` images, as wall time and as this
    thread's CPU time (the second is what the code costs; the first also counts waiting for a busy core)."""
    from dermscreen import lesion

    names = ("segment", "abcd", "outline", "total")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    images = [np.asarray(Image.open(s.image_path).convert("RGB")) for s in samples[:repeats]]
    for rgb in images[:10]:
        segment(rgb)
    for rgb in images:
        marks = [(time.perf_counter(), time.thread_time())]
        seg = segment(rgb)
        marks.append((time.perf_counter(), time.thread_time()))
        lesion.smart_crop_box(seg.box(), seg.image_size)
        lesion.abcd(seg, rgb)
        marks.append((time.perf_counter(), time.thread_time()))
        lesion.outline_png(seg, seg.image_size)
        marks.append((time.perf_counter(), time.thread_time()))
        for i, k in enumerate(names):
            a, b = (marks[i], marks[i + 1]) if k != "total" else (marks[0], marks[-1])
            wall[k].append((b[0] - a[0]) * 1000)
            cpu[k].append((b[1] - a[1]) * 1000)
    return {k: {"wall_median": statistics.median(wall[k]), "wall_p95": float(np.percentile(wall[k], 95)),
                "cpu_median": statistics.median(cpu[k]), "cpu_p95": float(np.percentile(cpu[k], 95))} for k in names}


def measure_zoomed(samples: list, bundle_dir: Path, repeats: int, factor: float = 3.0) -> dict:
    """The Screener's whole lesion stage (outline, the second look at a small lesion, crop, ABCD) plus the
    outline PNG, one thread, on ``repeats`` held-out images placed small (``factor`` x zoomed out) on a
    field of their own skin, as bench_smart_crop.py makes them: median and p95 wall ms, and how often the
    second look ran."""
    from bench_smart_crop import zoom_out
    from dermscreen.screening import Screener, ScreenerSettings

    screener = Screener(bundle_dir, ScreenerSettings(threads=1, quality_gate=False, ood_refusal=False))
    fields = [zoom_out(np.asarray(Image.open(s.image_path).convert("RGB")), ground_truth(s), factor, seed=i)
              for i, s in enumerate(samples[:repeats])]
    for rgb in fields[:10]:
        screener.analyze_image(rgb, heatmap=False)
    totals, refined = [], 0
    for rgb in fields:
        result = screener.analyze_image(rgb, heatmap=False)
        t = time.perf_counter()
        result.outline_png()
        totals.append(result.timings_ms["lesion"] + (time.perf_counter() - t) * 1000)
        refined += result.segmentation is not None and result.segmentation.frame_size is not None
    return {"n": len(fields), "median": statistics.median(totals), "p95": float(np.percentile(totals, 95)),
            "refined": refined / len(fields), "size": fields[0].shape[1::-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--images", type=int, default=1000, help="held-out images for Dice/IoU")
    ap.add_argument("--latency", type=int, default=200, help="images for the latency measurement")
    ap.add_argument("--segmenter", type=Path, default=None, help="bundle with segmenter.onnx (else classical)")
    args = ap.parse_args()
    from dermscreen import lesion

    if args.segmenter:
        from dermscreen.bundle import Bundle

        seg_model = lesion.load_segmenter(Bundle.load(args.segmenter), threads=1)
        segment, name = seg_model.segment, f"ONNX segmenter ({args.segmenter})"
    else:
        segment, name = lesion.segment_classical, "classical fallback (Otsu on (255-B+chroma)/2 + morphology)"
    samples = held_out(args.data, args.images)
    q = measure_quality(samples, segment)
    lat = measure_latency(samples, segment, args.latency)
    from bench_screening import machine_info

    print(f"\n### Lesion segmentation: {name}\n\n{machine_info()}\n")
    print(f"Held-out HAM10000 test split (lesion-grouped, seed 0), {q['n']} images, 200x150, masks at 128:\n")
    print("| measure | mean | 95 % CI | median |\n|---|---|---|---|")
    print(f"| Dice | {q['dice']:.3f} | {q['dice_ci'][0]:.3f}-{q['dice_ci'][1]:.3f} | {q['dice_median']:.3f} |")
    print(f"| IoU | {q['iou']:.3f} | {q['iou_ci'][0]:.3f}-{q['iou_ci'][1]:.3f} | {q['iou_median']:.3f} |")
    print(f"\nNo lesion found: {100 * q['not_found']:.1f} % of images; Dice < 0.5: {100 * q['dice_below_0.5']:.1f} %.\n")
    print(f"Added latency per image (smart crop + ABCD + outline), one thread, {args.latency} images:\n")
    print("| stage | wall median ms | wall p95 ms | CPU median ms | CPU p95 ms |\n|---|---|---|---|---|")
    for k, v in lat.items():
        print(f"| {k} | {v['wall_median']:.2f} | {v['wall_p95']:.2f} | {v['cpu_median']:.2f} | {v['cpu_p95']:.2f} |")
    if args.segmenter:
        z = measure_zoomed(samples, args.segmenter, args.latency)
        print(f"\nThe Screener's lesion stage + outline PNG on {z['n']} of these images zoomed out 3x "
              f"({z['size'][0]}x{z['size'][1]}, the lesion small in a field of its own skin), one thread: "
              f"median {z['median']:.2f} ms, p95 {z['p95']:.2f} ms (wall); the second look at the lesion ran "
              f"on {100 * z['refined']:.0f} %.")


if __name__ == "__main__":
    main()
