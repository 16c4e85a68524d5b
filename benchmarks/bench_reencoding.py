"""How much the Screener's answer moves when the same photograph is saved again as JPEG.

Usage:
  python benchmarks/bench_reencoding.py [--images 150] [--quality 90 95] [--model BUNDLE]

Held-out images (the default model's test split, remade from ../shared/data/ham10000_224's labels, seeded
random order) are analysed as they are and after one re-save as JPEG at each quality; printed per quality: how many
were assessed both times, the absolute change of the malignancy score (0-100; median, 90th percentile, max) and
the share whose risk tier changed, with the smart crop on (default) and off. It measures robustness, not accuracy:
a score near a referral threshold may cross it.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def resaved(data: bytes, quality: int) -> bytes:
    """The image saved again as JPEG at ``quality``."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def measure(screener, files: list[bytes], quality: int) -> dict[str, float]:
    """Score changes and tier changes between each file and its re-saved copy (both assessed)."""
    changes, tiers = [], 0
    for data in files:
        a = screener.analyze(data, heatmap=False)
        b = screener.analyze(resaved(data, quality), heatmap=False)
        if a.status != "ok" or b.status != "ok":
            continue
        changes.append(abs(a.malignancy_score - b.malignancy_score))
        tiers += a.risk.tier != b.risk.tier
    d = np.array(changes)
    return {"n": len(d), "median": float(np.median(d)), "p90": float(np.percentile(d, 90)), "max": float(d.max()),
            "tier_changed": tiers / max(len(d), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--quality", type=int, nargs="+", default=[90, 95])
    ap.add_argument("--model", default=None, help="bundle (default: the shipped model, whose test split is used)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from dermscreen.evaluation.evaluate import _load
    from dermscreen.screening import Screener, ScreenerSettings

    _, test, _ = _load(args.model, args.data / "ham10000_224" / "HAM10000_metadata.csv", None, None, "test")
    order = np.random.default_rng(0).permutation(len(test.samples))[:args.images]
    files = [test.samples[i].image_path.read_bytes() for i in order]
    print("| JPEG quality | smart crop | assessed both times | score change median / p90 / max | tier changed |")
    print("|---|---|---|---|---|")
    for quality in args.quality:
        for crop in (True, False):
            screener = Screener(args.model, ScreenerSettings(smart_crop=crop, abcd=crop))
            r = measure(screener, files, quality)
            print(f"| {quality} | {'on' if crop else 'off'} | {r['n']} of {len(files)} | {r['median']:.1f} / "
                  f"{r['p90']:.1f} / {r['max']:.1f} | {100 * r['tier_changed']:.1f} % |", flush=True)


if __name__ == "__main__":
    main()
