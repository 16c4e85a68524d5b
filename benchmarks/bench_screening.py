"""Benchmark the Screener in process: per-stage latency of one image, and batch throughput on all cores.

Usage:
  python benchmarks/bench_screening.py --model runs/<run>/bundle [--data ../shared/data] [--single 200]
         [--batch 1000] [--workers N] [--torch-reference] [--no-lesion] [--large 50]
  python benchmarks/bench_screening.py --tiny     # the test suite's tiny model: pipeline overhead only

Single image: bytes → ScreeningResult with heatmap (CAMs computed) and the overlay PNG encoded
(as the API does when asked), intra-op threads = all cores; prints median and p95 per stage.
Batch: one Screener with 1 intra-op thread per call, a thread pool of --workers (default: all
cores) over --batch real images; then the same files through dermscreen.batch with --workers
processes, the calling one included (what `dermscreen predict FOLDER` does); prints images/s. Last, unless
--no-cli (or --no-ood), `dermscreen predict --json` over those files in a fresh interpreter: what a user waits.
--torch-reference times the same classifier (every member of an ensemble) in torch eager (timm, random
weights: speed does not depend on the weights) on the same input, for the ONNX/torch ratio; it needs the
train extra.
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def cpu_probe_ms() -> float:
    """Milliseconds for a fixed pure-Python loop (best of 3). This VM's speed drifts by up to ~50 % within
    minutes; printed beside every result so runs from different moments can be compared (lower = faster)."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - t)
    return best * 1000


def machine_info() -> str:
    """One line: date, CPU model, cores, OS, Python and onnxruntime versions, and the CPU probe."""
    import onnxruntime

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')} · {cpu} · {os.cpu_count()} cores · "
            f"{platform.platform()} · Python {sys.version.split()[0]} · onnxruntime {onnxruntime.__version__} · "
            f"CPU probe {cpu_probe_ms():.0f} ms (1M-step Python loop, lower = faster VM phase)")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values."""
    return float(np.percentile(np.asarray(values), q))


def image_paths(data: Path, n: int) -> list[Path]:
    """Up to n real image files, spread over ham10000_224 then ham10000."""
    paths = sorted((data / "ham10000_224" / "images").glob("*.jpg")) + sorted((data / "ham10000" / "images").glob("*.jpg"))
    if not paths:
        sys.exit(f"no images under {data}; pass --data")
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def load_images(data: Path, n: int) -> list[bytes]:
    """The bytes of up to n real images, spread over ham10000_224 then ham10000."""
    return [p.read_bytes() for p in image_paths(data, n)]


def bench_single(screener, images: list[bytes]) -> dict[str, list[float]]:
    """Per-stage timings (ms) of analyse-with-heatmap plus overlay PNG encoding, one image at a time."""
    for data in images[:10]:  # warm-up: allocator, onnxruntime kernels, ICC caches
        screener.analyze(data).to_json(include_heatmap=True)
    stages: dict[str, list[float]] = {}
    for data in images:
        t0 = time.perf_counter()
        result = screener.analyze(data, heatmap=True)
        t1 = time.perf_counter()
        result.to_json(include_heatmap=True)
        t2 = time.perf_counter()
        for stage, ms in result.timings_ms.items():
            stages.setdefault(stage, []).append(ms)
        stages.setdefault("overlay PNG + JSON", []).append((t2 - t1) * 1000)
        stages.setdefault("end to end (bytes → JSON with heatmap)", []).append((t2 - t0) * 1000)
    return stages


def phone_sized(images: list[bytes], size: tuple[int, int]) -> list[bytes]:
    """The images enlarged (bicubic) to ``size`` and saved as JPEG (quality 90): stand-ins for phone photos,
    whose 12 MP the HAM10000 copies here do not have."""
    from PIL import Image

    out = []
    for data in images:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_batch(screener, images: list[bytes], workers: int, heatmap: bool) -> tuple[float, int]:
    """Images per second analysing ``images`` with a pool of ``workers`` threads; and the refusals count."""
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda d: screener.analyze(d, heatmap=heatmap), images[: workers * 4]))  # warm-up
        t0 = time.perf_counter()
        results = list(pool.map(lambda d: screener.analyze(d, heatmap=heatmap), images))
        elapsed = time.perf_counter() - t0
    return len(images) / elapsed, sum(r.status != "ok" for r in results)


def bench_processes(model, paths: list[Path], workers: int, heatmap: bool, ood: bool,
                    lesion: dict) -> tuple[float, float, float, int]:
    """dermscreen.batch.screen_files (what `dermscreen predict FOLDER` runs) over files on disk with
    ``workers`` processes: (images/s including the workers' start, seconds to the first result,
    images/s after the first result, refusals)."""
    from dermscreen.batch import screen_files
    from dermscreen.screening import ScreenerSettings

    settings = ScreenerSettings(ood_refusal=ood, threads=1, **lesion)
    t0 = time.perf_counter()
    first, refused = None, 0
    for outcome in screen_files(paths, model, settings, workers=workers, heatmap=heatmap):
        if first is None:
            first = time.perf_counter() - t0
        refused += outcome.result is None or outcome.result["status"] != "ok"
    total = time.perf_counter() - t0
    steady = (len(paths) - 1) / max(total - (first or 0.0), 1e-9)
    return len(paths) / total, first or 0.0, steady, refused


def bench_cli(model, paths: list[Path], workers: int, no_lesion: bool) -> tuple[float, int]:
    """`dermscreen predict --json FILE…` in a fresh interpreter, as a user runs it: (images/s over the whole
    command, its start, imports and printing included; lines printed)."""
    command = [sys.executable, "-m", "dermscreen", "predict", "--json", "--workers", str(workers)]
    command += (["--model", str(model)] if model else []) + (["--no-lesion"] if no_lesion else [])
    t0 = time.perf_counter()
    out = subprocess.run(command + [str(p) for p in paths], capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if out.returncode not in (0, 1):  # 1: some files could not be analysed, which the line count shows
        sys.exit(f"dermscreen predict failed ({out.returncode}): {out.stderr[-500:]}")
    return len(paths) / elapsed, len(out.stdout.splitlines())


def bench_torch(bundle, runs: int = 100) -> tuple[float, float] | None:
    """(ONNX median ms, torch eager median ms) of the classifier's forward (all members) on one preprocessed image."""
    try:
        import torch
        from dermscreen.training.backbones import create_backbone
    except ImportError as exc:
        print(f"torch reference skipped: {exc} (install the train extra)")
        return None
    size = bundle.manifest.preprocessing.image_size
    x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    from dermscreen.errors import DermscreenError

    m = bundle.manifest
    try:
        backbone, info = create_backbone(m.model.backbone, weights="none")
    except DermscreenError as exc:
        print(f"torch reference skipped: {exc}")
        return None
    from dermscreen.training.model import EnsembleClassifier, LesionClassifier

    classes = m.taxonomy.num_classes
    if m.model.members > 1:
        # the same graph as the bundle's: copies of one backbone (speed does not depend on the weights), so
        # their frozen trunk is shared exactly as in the exported ensemble
        import copy

        members = [LesionClassifier(copy.deepcopy(backbone), info.num_features, classes)
                   for _ in range(m.model.members)]
        model = EnsembleClassifier(members, int(m.training.get("ensemble", {}).get("shared_stages", 0)))
    else:
        model = LesionClassifier(backbone, info.num_features, classes)
    model.eval()

    def eager():
        with torch.inference_mode():
            model(torch.from_numpy(x))

    def timed(fn) -> float:
        for _ in range(10):
            fn()
        t = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1000)
        return statistics.median(t)

    return timed(lambda: bundle.run(x)), timed(eager)


def print_single(stages: dict[str, list[float]]) -> None:
    """Markdown table of median and p95 per stage."""
    print("\n| stage | median ms | p95 ms |\n|---|---|---|")
    for stage, values in stages.items():
        print(f"| {stage} | {statistics.median(values):.2f} | {percentile(values, 95):.2f} |")


def main() -> None:
    """Parse arguments, run the benchmarks, print markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="bundle folder or zip (default: DERMSCREEN_MODEL or the installed default)")
    ap.add_argument("--tiny", action="store_true", help="use the test suite's tiny random model (needs onnx)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--single", type=int, default=200, help="images for the single-image latency")
    ap.add_argument("--batch", type=int, default=1000, help="images for the batch throughput")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-ood", action="store_true", help="disable OOD refusal (so every image reaches the heatmap)")
    ap.add_argument("--torch-reference", action="store_true", help="also time the backbone in torch eager")
    ap.add_argument("--large", type=int, default=0,
                    help="also time this many images enlarged to a 12 MP (4032x3024) JPEG, as a phone takes them")
    ap.add_argument("--no-lesion", action="store_true",
                    help="lesion stage off (no outline, smart crop or ABCD), as `dermscreen predict --no-lesion`")
    ap.add_argument("--no-cli", action="store_true",
                    help="skip timing `dermscreen predict --json` over the batch files in a fresh interpreter")
    args = ap.parse_args()

    from dermscreen.screening import Screener, ScreenerSettings

    model = args.model
    tmp = None
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from tinybundle import make_tiny_bundle

        tmp = tempfile.TemporaryDirectory()
        model = make_tiny_bundle(Path(tmp.name) / "tiny")
        args.no_ood = True  # the tiny model's OOD statistics are random
    print(f"# Screener benchmark\n{machine_info()}")
    lesion = {"smart_crop": False, "abcd": False} if args.no_lesion else {}
    single = Screener(model, ScreenerSettings(ood_refusal=not args.no_ood, **lesion))
    b = single.bundle.manifest
    print(f"model {b.name} {b.version} ({single.identity.backbone}, {b.preprocessing.image_size} px), "
          f"sha256 {single.bundle.sha256[:12]}, OOD refusal {'off' if args.no_ood else 'on'}, "
          f"lesion stage {'off' if args.no_lesion else 'on'}")
    images = load_images(args.data, max(args.single, args.batch))
    stages = bench_single(single, images[: args.single])
    print(f"\n## single image, in process, all cores for onnxruntime ({args.single} real images)")
    print_single(stages)
    if args.large:
        large = bench_single(single, phone_sized(images[: args.large], (4032, 3024)))
        print(f"\n## single 12 MP photo (4032x3024 JPEG, {args.large} real images enlarged), in process")
        print_single(large)
    batch = Screener(single.bundle, ScreenerSettings(ood_refusal=not args.no_ood, threads=1, **lesion))
    for heatmap in (True, False) if args.batch else ():  # --batch 0: single-image latency only
        rate, refused = bench_batch(batch, images[: args.batch], args.workers, heatmap)
        print(f"\nbatch: {args.batch} images, {args.workers} worker threads, heatmap {'on' if heatmap else 'off'}: "
              f"**{rate:.1f} images/s** ({refused} answered cannot_assess)")
    paths = image_paths(args.data, args.batch) if args.batch else []
    for heatmap in (True, False) if args.batch else ():
        rate, first, steady, refused = bench_processes(model, paths, args.workers, heatmap, not args.no_ood, lesion)
        print(f"\nbatch: {len(paths)} image files, {args.workers} processes (dermscreen.batch: the caller and "
              f"{args.workers - 1} spawned, as `dermscreen predict FOLDER`), heatmap {'on' if heatmap else 'off'}: "
              f"**{rate:.1f} images/s** including the workers' start ({first:.2f} s to the first result), "
              f"{steady:.1f} images/s after it; {refused} cannot_assess")
    if paths and not args.no_ood and not args.no_cli:  # predict has no switch for OOD refusal
        rate, lines = bench_cli(model, paths, args.workers, args.no_lesion)
        print(f"\nbatch: `dermscreen predict --json` over the same {len(paths)} files in a fresh interpreter "
              f"({args.workers} processes, heatmap off): **{rate:.1f} images/s** over the whole command (Python's "
              f"start, imports and printing included); {lines} lines printed")
    if args.torch_reference:
        ref = bench_torch(single.bundle)
        if ref:
            print(f"\nclassifier forward ({single.identity.backbone}), 1 image: onnxruntime {ref[0]:.2f} ms, "
                  f"torch eager {ref[1]:.2f} ms (torch/onnx = {ref[1] / ref[0]:.2f}x)")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
