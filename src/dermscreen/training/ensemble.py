"""An ensemble recipe (``ensemble_seeds: [0, 1]``): train one member per seed, export their average as one model.

Why: on this project's 2-core CPU a run fits 3-4 epochs, and two runs of one recipe that differ only by their
training seed differ by ~0.03 in validation balanced accuracy and more in specificity at a fixed sensitivity
(docs/model-card.md, runs e and g). Their average was better than either on every validation measure, where
averaging their weights (a "soup") was not. The members share the split and every setting but the seed, train one
after another in ``OUT/member-seed<seed>/`` (ordinary run folders, each with its own early stop, resumable),
and are then joined into an ``EnsembleClassifier`` that is prior-corrected, calibrated, OOD-fitted and
exported like a single model into ``OUT/bundle``: the front ends need no new code.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from ..errors import ConfigError
from ..preprocess import Preprocessing
from .backbones import BackboneInfo
from .config import TrainConfig, data_seed, dump_config

log = logging.getLogger("dermscreen.training")


def member_config(config: TrainConfig, seed: int) -> TrainConfig:
    """The single-model recipe of the member trained with ``seed``: the same split for every member."""
    return config.model_copy(update={"name": f"{config.name}-seed{seed}", "seed": seed,
                                     "split_seed": data_seed(config), "ensemble_seeds": []})


def member_folder(out: Path, seed: int) -> Path:
    return out / f"member-seed{seed}"


def train_ensemble(config: TrainConfig, out: Path, resume: bool, show_progress: bool, ctx, start: float):
    """Train (or, with ``resume``, continue or reuse) every member, then join, calibrate and export them."""
    from .fit import TrainResult, _run

    results = []
    for seed in config.ensemble_seeds:
        folder = member_folder(out, seed)
        # --resume continues members that have started and starts the others
        again = resume and (folder / "checkpoints" / "last.pt").is_file()
        results.append(_run(member_config(config, seed), folder, again, show_progress, ctx, time.perf_counter(),
                            finish=False))
    if not ctx.is_main:
        return TrainResult(out, None, {}, sum(r.epochs_run for r in results), 0, time.perf_counter() - start)
    return finish_ensemble(config, out, ctx, start)


def finish_ensemble(config: TrainConfig, out: Path, ctx, start: float, bundle_dir: str | Path | None = None):
    """Join the trained members in ``out`` into one model; calibrate, fit OOD and export it (``out/bundle``)."""
    from .finish import finish_run
    from .fit import TrainState, load_data, read_split, training_data
    from .model import EnsembleClassifier, build_model
    from .runlog import RunFolder

    run = RunFolder(out)
    if bundle_dir is not None:
        run.bundle_dir = Path(bundle_dir)
    folders = [member_folder(out, seed) for seed in config.ensemble_seeds]
    for folder in folders:
        if not (folder / "checkpoints" / "best.pt").is_file():
            raise ConfigError(f"Ensemble member {folder} has no checkpoints/best.pt: train it first "
                              "(dermscreen train ... --resume continues the members).")
    splits = [(folder / "split.csv").read_bytes() for folder in folders]
    if any(s != splits[0] for s in splits[1:]):
        raise ConfigError(f"The members in {out} were trained on different splits; they cannot be averaged.")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folders[0] / "split.csv", run.split_csv)
    run.open(resume=True)  # appends to the ensemble's own train.log; there is no last.pt at this level
    dump_config(config, run.config_yaml)
    data, taxonomy = load_data(config)
    split = read_split(data, run.split_csv)
    members, infos, states = [], [], []
    for seed, folder in zip(config.ensemble_seeds, folders):
        model, info = build_model(member_config(config, seed), taxonomy.num_classes, 0, weights="none")
        model.load_state_dict(torch.load(folder / "checkpoints" / "best.pt", map_location="cpu",
                                         weights_only=True)["model"])
        members.append(model)
        infos.append(info)
        last = folder / "checkpoints" / "last.pt"
        states.append(TrainState(**torch.load(last, map_location="cpu", weights_only=True)["state"])
                      if last.is_file() else TrainState())
    model = EnsembleClassifier(members, config.freeze_stages)
    log.info("ensemble of %d members (seeds %s, best epochs %s), shared frozen trunk: %d stages",
             len(members), config.ensemble_seeds, [s.best_epoch for s in states], model.shared_stages)
    first = infos[0]
    # the members were built without pretrained weights (their checkpoints replace every weight): the source
    # they were fine-tuned from is in their own logs
    info = BackboneInfo(first.name, first.num_features * len(members), first.mean, first.std,
                        RunFolder(folders[0]).weights_source())
    spec = Preprocessing(image_size=config.image_size, resize=config.resize, mean=info.mean, std=info.std)
    # the manifest's epochs and history are the members' together; each member's own record is kept beside them
    state = TrainState(epoch=sum(s.epoch for s in states), best_epoch=0,
                       history=[{"member_seed": seed, **row} for seed, s in zip(config.ensemble_seeds, states)
                                for row in s.history])
    record = {"members": [{"seed": seed, "folder": folder.name, "epochs_run": s.epoch, "best_epoch": s.best_epoch,
                           "epoch_seconds_total": round(sum(float(r.get("seconds", 0.0)) for r in s.history), 1)}
                          for seed, folder, s in zip(config.ensemble_seeds, folders, states)],
              "shared_stages": model.shared_stages,
              "method": "logits averaged (feature maps concatenated, classifiers side by side / members)"}
    train_data = training_data(data, split, config, taxonomy)
    return finish_run(model, run, config, data, split, train_data, spec, None, info, taxonomy, state, ctx, start,
                      ensemble=record)
