"""``dermscreen train`` and ``dermscreen export``: command-line front ends of the training pipeline.

torch is imported inside the commands only, so ``dermscreen --help`` and the core install work without it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import DermscreenError


def _fail(exc: Exception) -> None:
    typer.secho(f"Error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _need_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        _fail(DermscreenError("Training needs the train extra: pip install 'dermscreen[train]'."))


def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Training recipe YAML (e.g. configs/default.yaml). "
                                          "With --resume, defaults to the run's saved config.yaml."),
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled CSV: HAM10000 metadata, ISIC one-hot, or image,dx."),
    images: Optional[Path] = typer.Option(None, "--images", help="Images folder (default: <CSV folder>/images, "
                                          "or the CSV's folder for image,dx files)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder for config, log, split, checkpoints, curves and bundle."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last.pt."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Override the config's number of epochs."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (GPU if present), cpu, cuda or cuda:N."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Train on a lesion-grouped subsample (smoke runs)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Data-loading worker processes."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads per process."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bars (logs still go to train.log)."),
) -> None:
    """Train a classifier, calibrate it on validation and export a bundle into OUT/bundle.

    Runs unchanged under torchrun --nproc_per_node N (one process per GPU, or CPU processes).
    """
    _need_torch()
    from .config import load_config
    from .fit import train as run_training

    from ..bundle import check_output_folder

    # Under torchrun every process runs this command: only the first checks and cleans up the run folder (two
    # would make and remove the same folder under each other: "it is not writable (File exists)")
    main = os.environ.get("RANK", "0") == "0"
    before = _run_files(out)
    try:
        if main:
            check_output_folder(out)  # a bad --out fails now, with a sentence
        if config is None and resume and (out / "config.yaml").is_file():
            config = out / "config.yaml"
        overrides = dict(data=_str(data), images=_str(images), epochs=epochs, device=device, max_images=max_images,
                         num_workers=num_workers, threads=threads)
        cfg = load_config(config, **overrides)
        result = run_training(cfg, out, resume=resume, progress=not no_progress)
    except DermscreenError as exc:
        if not resume and main:
            _remove_unstarted(out, before)
        _fail(exc)
        return
    except KeyboardInterrupt:
        if _started(out):  # an ensemble's members save their epochs in out/member-seed<N>
            typer.secho(f"Interrupted; continue with: dermscreen train --out {out} --resume", err=True)
        else:
            if not resume and main:
                _remove_unstarted(out, before)
            typer.secho("Interrupted before the first epoch was saved; nothing to resume: run the same command "
                        "again to start over.", err=True)
        raise typer.Exit(code=130) from None
    if result.bundle_dir is not None:
        m = result.metrics
        what = (f"{len(cfg.ensemble_seeds)} members, {result.epochs_run} epoch(s) in all (each member's best epoch "
                "in its folder's train.log)" if cfg.ensemble_seeds else
                f"{result.epochs_run} epoch(s) (best: {result.best_epoch})")
        typer.echo(f"Trained {what}; this command ran {result.wall_time_s:.0f} s. "
                   f"Validation balanced accuracy {m.get('balanced_accuracy', float('nan')):.3f}, "
                   f"malignant AUC {m.get('malignant_auc', float('nan')):.3f}.")
        typer.echo(f"Bundle: {result.bundle_dir}   held-out test split: {result.run_dir / 'split.csv'}")


def export(
    run: Path = typer.Argument(..., help="A finished or interrupted training run folder (holds config.yaml, "
                               "split.csv and checkpoints/best.pt)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Bundle folder to write (default: RUN/bundle)."),
    data: Optional[Path] = typer.Option(None, "--data", help="The run's labelled CSV, if it moved."),
    images: Optional[Path] = typer.Option(None, "--images", help="The run's images folder, if it moved."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Re-calibrate a run's best checkpoint on its validation split and export it as a bundle."""
    _need_torch()
    from .reexport import export_run

    try:
        if out is not None:
            from ..bundle import check_output_folder

            check_output_folder(out)  # before minutes of re-calibration and ONNX export
        folder = export_run(run, out, data=_str(data), images=_str(images), device=device)
    except DermscreenError as exc:
        _fail(exc)
        return
    typer.echo(f"Bundle: {folder}")


def train_segmenter(
    data: Path = typer.Option(..., "--data", help="Labelled CSV (HAM10000 metadata, ISIC or image,dx) of the images."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: segmenter.onnx, segmenter.json (spec, history), "
                             "and bundle/ when --bundle is given."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Classifier bundle to copy into OUT/bundle with the "
                                          "segmenter added (the original is not modified)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Images folder (default: <CSV folder>/images)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Masks folder of <image_id>_segmentation.png "
                                         "(default: <images folder>/../masks)."),
    backbone: str = typer.Option("tf_efficientnet_lite0", "--backbone", help="timm EfficientNet(-Lite) encoder."),
    weights: str = typer.Option("imagenet", "--weights", help="imagenet (offline package), a file, timm[:tag] or none."),
    image_size: int = typer.Option(256, "--image-size", min=16, help="Square input size, a multiple of 16."),
    epochs: int = typer.Option(20, "--epochs", min=1),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    lr: float = typer.Option(1e-3, "--lr", help="Decoder learning rate, above 0 (the encoder gets a third of it)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Lesion-grouped subsample (smoke runs)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    device: str = typer.Option("auto", "--device", help="auto (GPU if present), cpu, cuda or cuda:N."),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="Data-loading worker processes."),
    seed: int = typer.Option(0, "--seed", help="Split and training seed (0: the classifier recipe's split)."),
    zoom_out: float = typer.Option(0.5, "--zoom-out", help="Share of training images shown zoomed out (placed small, "
                                   "off-centre, in a mirrored wider field) so small lesions in wide photos are found."),
) -> None:
    """Train the lesion segmenter on masks (split by lesion), export segmenter.onnx, and add it to a bundle."""
    _need_torch()
    import logging

    from .segmenter import train_segmenter as run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run(data, out, images=images, masks=masks, bundle=bundle, backbone=backbone, weights=weights,
                     image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, max_images=max_images,
                     threads=threads, device=device, num_workers=num_workers, seed=seed, zoom_out=zoom_out)
    except DermscreenError as exc:
        _fail(exc)
        return
    v = result.spec.validation
    typer.echo(f"Trained {result.epochs} epoch(s) in {result.wall_time_s:.0f} s. Test Dice {v['test_dice']:.3f} "
               f"(95 % CI {v['test_dice_ci_low']:.3f}-{v['test_dice_ci_high']:.3f}), IoU {v['test_iou']:.3f} "
               f"on {v['test_n']:.0f} held-out images.")
    typer.echo(f"Segmenter: {result.onnx_path}" + (f"   bundle: {result.bundle_dir}" if result.bundle_dir else ""))


def add_segmenter(
    bundle: str = typer.Option(..., "--bundle", help="Classifier bundle to extend (not modified): a folder, zip or "
                               "installed model's name."),
    segmenter: Path = typer.Option(..., "--segmenter", help="A train-segmenter run folder (segmenter.onnx + "
                                   "segmenter.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="New bundle folder: the classifier plus segmenter.onnx."),
) -> None:
    """Add an already trained segmenter to a copy of a bundle (no torch needed)."""
    from ..bundle import Bundle, resolve_bundle_path
    from ..lesion import add_segmenter_from_run

    try:
        source = resolve_bundle_path(bundle)  # an unknown installed-model name is one sentence too
        folder = add_segmenter_from_run(source, segmenter, out)
    except DermscreenError as exc:
        _fail(exc)
        return
    before, after = Bundle.load(source).manifest.segmenter, Bundle.load(folder).manifest.segmenter
    if before is not None:  # said, so a better segmenter is not swapped for a worse one unnoticed
        def dice(spec) -> str:
            value = (spec.validation or {}).get("test_dice")
            return f"test Dice {value:.3f}" if value is not None else "test Dice not recorded"

        typer.echo(f"Note: this replaces the bundle's segmenter ({dice(before)}) with the one from {segmenter} "
                   f"({dice(after)}).")
    typer.echo(f"Bundle with segmenter: {folder}")


_RUN_FILES = ("config.yaml", "split.csv", "train.log", "history.csv", "learning_curves.png")


def _run_folders(out: Path) -> list[Path]:
    """``out`` and the ensemble member folders in it (an ensemble recipe trains each in out/member-seed<N>)."""
    members = sorted(p for p in out.glob("member-seed*") if p.is_dir()) if out.is_dir() else []
    return [*members, out]


def _started(out: Path) -> bool:
    """Whether a run in ``out`` (or one of its ensemble members) has saved an epoch, so it can be resumed."""
    return any((folder / "checkpoints" / "last.pt").is_file() for folder in _run_folders(out))


def _run_files(out: Path) -> dict[Path, dict[str, Optional[int]]]:
    """Modification times (None: absent) of the run files in ``out`` and its member folders, to tell what a failed
    start wrote."""
    stamps: dict[Path, dict[str, Optional[int]]] = {}
    for folder in _run_folders(out):
        if not folder.exists():
            continue  # made by this run: absent from the record, so removed again when left empty
        mine: dict[str, Optional[int]] = {}
        for name in _RUN_FILES:
            try:
                mine[name] = (folder / name).stat().st_mtime_ns
            except OSError:
                mine[name] = None
        mine["folder"] = 1
        stamps[folder] = mine
    return stamps


def _remove_unstarted(out: Path, before: dict[Path, dict[str, Optional[int]]]) -> None:
    """After a fresh run failed before its first epoch (no last.pt), remove the run files it wrote, so the
    folder does not look like a started run (a bad backbone or weights fails after they are written). An ensemble
    writes them in out/member-seed<N>: each member folder without a saved epoch is cleaned the same way (members
    first, so ``out`` is removed too when the run made it and nothing else is left in it). Once any member has
    saved an epoch nothing is removed: the run can be resumed, and needs its config.yaml, split.csv and log."""
    if _started(out):
        return
    for folder in _run_folders(out):
        try:
            if (folder / "checkpoints" / "last.pt").exists() or not folder.is_dir():
                continue
            had = before.get(folder, {})
            for name in _RUN_FILES:
                path = folder / name
                try:
                    changed = path.stat().st_mtime_ns != had.get(name)
                except OSError:
                    continue
                if changed:
                    path.unlink()
            for made in (folder / "checkpoints", folder) if had.get("folder") is None else (folder / "checkpoints",):
                if made.is_dir() and not any(made.iterdir()):
                    made.rmdir()
        except OSError:
            pass  # best effort: the error itself is what the user needs to see


def _str(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)
