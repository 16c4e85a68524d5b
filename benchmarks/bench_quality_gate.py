"""Measure the quality gate on real dermoscopic images and on synthetically degraded copies.

Usage: python benchmarks/bench_quality_gate.py [--data ../shared/data] [--degraded 500]

Prints, for every HAM10000 image in both copies, the distribution of each quality measure and the
share of images the gate passes (target >= 99 %) and warns about; then applies controlled
degradations (defocus blur, under/over-exposure, blank frame, thumbnail) to a random sample and
prints the share refused. The numbers justify the defaults in dermscreen.quality (docs/quality-gate.md).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from dermscreen.quality import QualityThresholds, assess, measure

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def degradations() -> dict[str, callable]:
    """Named functions uint8 RGB → uint8 RGB, each a severe version of a real capture failure."""
    def blur(radius):
        return lambda a: np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius)))

    def gain(g):
        return lambda a: np.clip(a.astype(np.float32) * g, 0, 255).astype(np.uint8)

    def thumb(side):
        def f(a):
            h, w = a.shape[:2]
            s = side / min(h, w)
            return np.asarray(Image.fromarray(a).resize((round(w * s), round(h * s)), Image.BILINEAR))
        return f

    return {
        "blur sigma 1 px (mild)": blur(1), "blur sigma 2 px": blur(2), "blur sigma 3 px": blur(3), "blur sigma 5 px": blur(5),
        "exposure x0.5 (mild)": gain(0.5), "exposure x0.3": gain(0.3), "exposure x0.15": gain(0.15),
        "exposure x1.3 (mild)": gain(1.3), "exposure x1.8": gain(1.8), "exposure x3": gain(3.0), "exposure x5": gain(5.0),
        "blank grey frame": lambda a: np.full_like(a, 128),
        "thumbnail 100 px (mild)": thumb(100), "thumbnail 48 px": thumb(48),
    }


def summarise(name: str, reports: list, measures: list[dict]) -> None:
    """Print pass/warn rates, the reasons, and percentiles of each measure for one image set."""
    n = len(reports)
    passed = sum(r.passed for r in reports)
    warned = sum(bool(r.warnings) for r in reports)
    print(f"\n## {name}: {n} images")
    print(f"passed (not refused): {passed}/{n} = {passed / n:.2%}; with a warning: {warned}/{n} = {warned / n:.2%}")
    reasons = Counter(r.refused_reason.split(":")[0] for r in reports if r.refused_reason)
    warns = Counter(w.split(":")[0] for r in reports for w in r.warnings)
    if reasons:
        print("refused:", dict(reasons.most_common()))
    if warns:
        print("warnings:", dict(warns.most_common()))
    print("| measure | p0.5 | p1 | p5 | p50 | p95 | p99 | p99.5 |")
    print("|---|---|---|---|---|---|---|---|")
    for key in ("sharpness", "brightness", "highlights", "clipped", "contrast", "min_side"):
        v = np.array([m[key] for m in measures])
        q = np.percentile(v, [0.5, 1, 5, 50, 95, 99, 99.5])
        print(f"| {key} | " + " | ".join(f"{x:.4g}" for x in q) + " |")


def main() -> None:
    """Parse arguments, measure real and degraded images, print markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--degraded", type=int, default=500, help="images sampled for the degradation test")
    ap.add_argument("--limit", type=int, default=0, help="measure only the first N images of each set (0 = all)")
    args = ap.parse_args()
    print(f"# quality gate measurement, {datetime.datetime.now().isoformat(timespec='seconds')}, "
          f"{platform.platform()}, python {sys.version.split()[0]}")
    print(QualityThresholds().model_dump())
    sets = {"ham10000 (200x150 whole frame)": args.data / "ham10000" / "images",
            "ham10000_224 (224x224 centre crop)": args.data / "ham10000_224" / "images"}
    all_paths = []
    for name, folder in sets.items():
        paths = sorted(folder.glob("*.jpg"))
        if args.limit:
            paths = paths[: args.limit]
        all_paths += paths
        t0 = time.perf_counter()
        images = (_load(p) for p in paths)
        measures, reports = [], []
        for img in images:
            measures.append(measure(img))
            reports.append(assess(img))
        print(f"\n({(time.perf_counter() - t0) / max(1, len(paths)) * 1000:.2f} ms per image incl. JPEG decode)")
        summarise(name, reports, measures)
        failing = [p.name for p, r in zip(paths, reports) if not r.passed]
        if failing:
            print("refused files:", ", ".join(failing[:20]), "..." if len(failing) > 20 else "")

    rng = np.random.default_rng(0)
    sample = [all_paths[i] for i in rng.choice(len(all_paths), min(args.degraded, len(all_paths)), replace=False)]
    originals = [_load(p) for p in sample]
    print(f"\n## synthetic degradations of {len(sample)} random images (both copies)")
    print("| degradation | refused | warned (not refused) |")
    print("|---|---|---|")
    for name, fn in degradations().items():
        reports = [assess(fn(a)) for a in originals]
        refused = sum(not r.passed for r in reports) / len(reports)
        warned = sum(r.passed and bool(r.warnings) for r in reports) / len(reports)
        print(f"| {name} | {refused:.1%} | {warned:.1%} |")


if __name__ == "__main__":
    main()
