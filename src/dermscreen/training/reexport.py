"""Export a bundle from an existing run folder (e.g. an interrupted run, or to a different place)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..bundle import check_output_folder
from ..errors import ConfigError
from ..metadata import MetadataSpec
from ..preprocess import Preprocessing
from . import distributed as D
from .config import load_config
from .fit import TrainState, load_data, read_split, training_data
from .finish import finish_run
from .model import build_model
from .runlog import RunFolder


def export_run(run_dir: str | Path, out: str | Path | None = None, data: str | None = None,
               images: str | None = None, device: str | None = None) -> Path:
    """Calibrate run ``run_dir``'s best checkpoint on its validation split and write a bundle; returns its folder."""
    start = time.perf_counter()
    run = RunFolder(run_dir)
    if out is not None:
        check_new_export_folder(out, run.bundle_dir)
    config = load_config(run.config_yaml, data=data, images=images, device=device, export=True) \
        if run.config_yaml.is_file() else None
    is_ensemble = config is not None and config.ensemble_seeds  # its members hold the checkpoints
    if not is_ensemble and (config is None or not run.best_pt.is_file() or not run.split_csv.is_file()):
        raise ConfigError(f"{run.root} is not a training run folder with config.yaml, split.csv and "
                          "checkpoints/best.pt.")
    ctx = D.DistContext(0, 1, 0, D.resolve_device(config.device))
    if is_ensemble:
        from .ensemble import finish_ensemble

        return finish_ensemble(config, run.root, ctx, start, bundle_dir=out).bundle_dir
    dataset, taxonomy = load_data(config)
    split = read_split(dataset, run.split_csv)
    meta_spec = MetadataSpec() if config.metadata_fusion else None
    # the checkpoint replaces every weight, so skip loading the pretrained ones
    model, info = build_model(config, taxonomy.num_classes, meta_spec.dim if meta_spec else 0, weights="none")
    info = type(info)(info.name, info.num_features, info.mean, info.std, run.weights_source())
    model.to(ctx.device)
    spec = Preprocessing(image_size=config.image_size, resize=config.resize, mean=info.mean, std=info.std)
    state = TrainState()
    if run.last_pt.is_file():
        state = TrainState(**torch.load(run.last_pt, map_location="cpu", weights_only=True)["state"])
    if out is not None:
        run.bundle_dir = Path(out)
    run.open(resume=True)
    train_data = training_data(dataset, split, config, taxonomy)
    result = finish_run(model, run, config, dataset, split, train_data, spec, meta_spec, info, taxonomy, state, ctx,
                        start)
    return result.bundle_dir


def check_new_export_folder(out: str | Path, default: Path) -> Path:
    """``out`` as a Path when an exported bundle can be written there: writable and new or empty. A bundle written
    over another would leave the other's files (a segmenter.onnx, say) beside it, unlisted in its manifest, and
    one written into a folder of other files mixes with them (as dermscreen calibrate refuses, for the same
    reasons)."""
    out = check_output_folder(out)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; give a new or empty folder for the exported bundle (or leave out "
                          f"--out to write the run's own bundle folder, {default}, again).")
    return out
