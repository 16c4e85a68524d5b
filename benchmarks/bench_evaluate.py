"""Evaluation throughput of a model bundle on real HAM10000 images (core path: onnxruntime, no torch).

Usage: python benchmarks/bench_evaluate.py [--model BUNDLE] [--data ../shared/data/ham10000] [--images 1000]

Prints images/s for the whole prediction step (decode + preprocess + model + OOD score), for
decoding alone and for the model alone, then the time of the metrics (bootstrap) and of a full
``evaluate`` (plots and report written into a temporary folder that is deleted afterwards).

Without ``--model`` it uses $DERMSCREEN_MODEL, the installed default model, or the newest bundle
under runs/; when there is none it builds the tiny random test model at 224 px and says so loudly:
those numbers measure the pipeline, not a real backbone.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ham10000"


def find_model(tmp: Path) -> tuple[Path, str]:
    """(bundle path, label): the given/default/newest trained bundle, else a tiny 224 px test bundle."""
    from dermscreen.errors import BundleError
    from dermscreen.inference import resolve_model

    try:
        return resolve_model(None), "default model"
    except BundleError:
        pass
    trained = sorted((REPO / "runs").glob("**/manifest.json"), key=lambda p: p.stat().st_mtime)
    if trained:
        return trained[-1].parent, "newest trained bundle under runs/"
    sys.path.insert(0, str(REPO / "tests"))
    from tinybundle import make_tiny_bundle

    return make_tiny_bundle(tmp / "tiny224", image_size=224), "TINY RANDOM TEST MODEL (not a real backbone)"


def machine_info() -> str:
    """One paragraph: date, CPU count, platform, python and library versions."""
    import onnxruntime
    import sklearn

    return (f"date {datetime.datetime.now().isoformat(timespec='seconds')}; CPUs {os.cpu_count()} "
            f"(affinity {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}); "
            f"{platform.platform()}; {platform.processor() or platform.machine()}; python {platform.python_version()}; "
            f"onnxruntime {onnxruntime.__version__}; numpy {np.__version__}; scikit-learn {sklearn.__version__}")


def sample_labels(data: Path, n: int, tmp: Path) -> Path:
    """A HAM10000 metadata CSV of ``n`` rows drawn with seed 0 (written into ``tmp``)."""
    lines = (data / "HAM10000_metadata.csv").read_text().splitlines()
    rows = lines[1:]
    random.Random(0).shuffle(rows)
    out = tmp / "labels.csv"
    out.write_text("\n".join([lines[0], *rows[:n]]) + "\n")
    return out


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    """Parse arguments, run the measurements, print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="bundle folder or zip (default: see module docstring)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with HAM10000_metadata.csv + images/")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPUs, 2-8)")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()

    from dermscreen.bundle import Bundle
    from dermscreen.evaluation.evaluate import evaluate
    from dermscreen.inference import _load_input, predict_samples
    from dermscreen.manifests import load_labels

    with tempfile.TemporaryDirectory(prefix="dermscreen-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model, label = (args.model, "given with --model") if args.model else find_model(tmp)
        bundle = Bundle.load(model)
        labels = sample_labels(args.data, args.images, tmp)
        data = load_labels(labels, args.data / "images", taxonomy=bundle.manifest.taxonomy)
        spec = bundle.manifest.preprocessing
        print(machine_info())
        print(f"model: {bundle.manifest.name} {bundle.manifest.version} ({bundle.manifest.model.backbone}, "
              f"{spec.image_size} px) from {model} [{label}]")
        print(f"data: {len(data)} images from {args.data}; batch {args.batch_size}; TTA {'on' if args.tta else 'off'}")

        predict_samples(bundle, data.samples[: args.batch_size], batch_size=args.batch_size)  # warm-up
        _, t_pred = timed(predict_samples, bundle, data.samples, batch_size=args.batch_size, tta=args.tta,
                          workers=args.workers)
        workers = args.workers or max(2, min(8, os.cpu_count() or 2))
        with ThreadPoolExecutor(workers) as pool:
            inputs, t_decode = timed(lambda: list(pool.map(lambda s: _load_input(s.image_path, spec), data.samples)))
        batch = np.stack(inputs[: args.batch_size])
        runs = max(1, len(data) // args.batch_size)
        _, t_model = timed(lambda: [bundle.run(batch, outputs=["logits", "embedding"]) for _ in range(runs)])
        result, t_eval = timed(evaluate, model, labels, args.data / "images", tmp / "eval",
                               batch_size=args.batch_size, tta=args.tta, bootstrap=args.bootstrap, workers=args.workers)

        n = len(data)
        print(f"prediction (decode + preprocess + model + OOD): {n / t_pred:8.1f} images/s  ({t_pred:.2f} s)")
        print(f"  decode + preprocess only ({workers} threads): {n / t_decode:8.1f} images/s")
        model_rate = runs * args.batch_size / t_model
        print(f"  model only (batches of {args.batch_size}):           {model_rate:8.1f} images/s")
        print(f"full evaluate() incl. {args.bootstrap} bootstrap resamples, subgroups, plots, report: {t_eval:.2f} s "
              f"({n / t_eval:.1f} images/s)")
        headline = result.metrics["overall"]["headline"]
        print(f"balanced accuracy on these images: {headline['balanced_accuracy']['value']:.3f}")


if __name__ == "__main__":
    main()
