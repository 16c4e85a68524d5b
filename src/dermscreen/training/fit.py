"""Fit a LesionClassifier, calibrate it on validation, and export a bundle: ``train(config, out)``.

The run folder ``out`` receives (rank 0 only):
``config.yaml`` (resolved recipe), ``train.log``, ``split.csv`` (``image_id,split``: the exact
held-out test set for evaluation), ``history.csv``, ``learning_curves.png``,
``checkpoints/last.pt`` + ``checkpoints/best.pt`` (torch state dicts), and ``bundle/``.
The same code runs alone or under ``torchrun --nproc_per_node N`` (DistributedDataParallel).
"""
from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from ..errors import ConfigError, ManifestError
from ..manifests import LabelledSet, image_id_of, load_labels
from ..metadata import MetadataSpec
from ..preprocess import Preprocessing
from ..splits import SPLIT_NAMES, assert_no_group_leak, grouped_split, subsample
from ..taxonomy import Taxonomy, load_taxonomy
from . import distributed as D
from .config import TrainConfig, check_recipe_paths, data_seed, dump_config, load_config
from .data import BalancedSampler, LesionDataset, class_weights, lesion_boxes
from .model import LesionClassifier, build_model, set_frozen_bn_eval
from .priors import balanced_accuracy, choose_tau, training_prior
from .progress import TrainProgress
from .runlog import RunFolder

log = logging.getLogger("dermscreen.training")


@dataclass
class TrainState:
    """What a checkpoint must restore to continue a run exactly where it stopped."""

    epoch: int = 0  # epochs completed
    best_score: float = -math.inf
    best_loss: float = math.inf
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    """Where a finished run put things, and its validation metrics."""

    run_dir: Path
    bundle_dir: Path | None
    metrics: dict
    epochs_run: int
    best_epoch: int
    wall_time_s: float


# ---------------------------------------------------------------------------------------- data
def load_data(config: TrainConfig) -> tuple[LabelledSet, Taxonomy]:
    """The labelled set named by ``config.data`` (subsampled to ``max_images``) and its taxonomy."""
    if not config.data:
        raise ConfigError("No training data given: pass --data CSV (or set data: in the config).")
    check_recipe_paths(config)  # the extra_train manifests too: before any run folder is made
    taxonomy = load_taxonomy(config.taxonomy)
    data = load_labels(config.data, config.images, taxonomy)
    if config.max_images and config.max_images < len(data):
        data = subsample(data, config.max_images, data_seed(config))
    return data, taxonomy


def make_split(data: LabelledSet, config: TrainConfig) -> dict[str, list[int]]:
    """Lesion-grouped train/val/test indices; raises ConfigError when a split would be unusable."""
    present = [code for code, n in data.class_counts().items() if n]
    if len(present) < 2:
        raise ConfigError(
            f"{data.source or 'The training data'} has images of {len(present)} class(es) "
            f"({', '.join(present) or 'none'}): a classifier needs images of at least two of the taxonomy's "
            f"classes ({', '.join(data.taxonomy.codes)}). Add images of the other classes, or use a taxonomy "
            "with only the classes you have.")
    split = grouped_split(data, config.val_fraction, config.test_fraction, data_seed(config))
    assert_no_group_leak(data, split)
    if len(split["val"]) < 2 or len(split["train"]) < 2:
        raise ConfigError(f"Only {len(data)} images: too few for a train/validation split. Use more data.")
    return split


def check_images(samples, source=None, show: int = 10) -> None:
    """Raise ManifestError listing (up to ``show``) image files that do not decode as images.

    Every file is decoded, so a truncated or damaged one stops the run before the first epoch instead of in it or
    after it (a header alone reads fine). JPEGs are decoded at 1/8 scale: every byte of their compressed data is
    still read (a cut-off file fails), at a fraction of the work. About 1-3 s for HAM10000's 10,015 images
    (2026-11-23, 2-core CPU); ~5 ms per 3000x2250 JPEG.
    """
    from PIL import Image

    bad = []
    for s in samples:
        try:
            with Image.open(s.image_path) as image:
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()  # raises on truncated data, as the training loader's decoder does
        except Exception as exc:  # any failure means the file cannot be trained on
            reason = _reason(exc)
            bad.append(f"{s.image_path} ({type(exc).__name__}{': ' + reason if reason else ''})")
    if bad:
        more = f", and {len(bad) - show} more" if len(bad) > show else ""
        raise ManifestError(
            f"{len(bad)} of the {len(samples)} training-run images cannot be opened as images: "
            f"{'; '.join(bad[:show])}{more}. Replace these files with readable images (JPEG, PNG, ...), or remove "
            f"their rows from {source or 'the labels CSV'}, before training.")


def _reason(exc: Exception) -> str:
    # Pillow's truncation message ("image file is truncated ...") says what is wrong; its "cannot identify image
    # file '<path>'" only repeats the path the list already gives
    text = str(exc)
    return "" if not text or "cannot identify" in text else text


def data_warnings(data: LabelledSet, split: dict[str, list[int]], train_data: LabelledSet) -> list[str]:
    """Sentences about data that trains but gives weak or optimistic results: missing lesion ids, and
    classes without training or validation images."""
    out = []
    ungrouped = sum(1 for s in data.samples if not (s.lesion_id or s.patient_id))
    if ungrouped:
        source = data.source or "the training data"
        which = (f"{source} has no lesion_id or patient_id column, so the split is made by image" if
                 ungrouped == len(data) else f"{ungrouped} of the {len(data)} images in {source} have no "
                 "lesion_id or patient_id, so they are split one by one")
        out.append(f"{which}: if several images show one lesion, they can land in train and in validation/test, "
                   "and the validation and test scores may be optimistic. Add a lesion_id column to keep the "
                   "images of one lesion together.")
    no_train = [c for c, n in train_data.class_counts().items() if not n]
    no_val = [c for c, n in data.subset(split.get("val", [])).class_counts().items() if not n]
    if no_train:
        out.append(f"no training images of class(es) {', '.join(no_train)}: the model cannot learn to "
                   "recognise them. Add images of these classes, or use a taxonomy without them.")
    if no_val:
        out.append(f"no validation images of class(es) {', '.join(no_val)}: calibration, the best epoch and "
                   "the validation scores do not cover them. Add images of these classes (or raise "
                   "val_fraction).")
    return out


def training_data(data: LabelledSet, split: dict[str, list[int]], config: TrainConfig,
                  taxonomy: Taxonomy) -> LabelledSet:
    """The training split of ``data`` plus every ``config.extra_train`` image that cannot leak into val/test.

    An extra image is dropped when its image id is already in ``data`` (another copy of an image
    that is split already) or its lesion/patient group has an image in val or test.
    """
    train = data.subset(split["train"])
    if not config.extra_train:
        return train
    held_out = {data.samples[i].group_id for name in ("val", "test") for i in split.get(name, [])}
    seen = {s.image_id for s in data.samples}
    extra = []
    for source in config.extra_train:
        more = load_labels(source.data, source.images, taxonomy)
        kept = [s for s in more.samples if s.image_id not in seen and s.group_id not in held_out]
        log.info("extra training data %s: %d of %d images kept (others are copies of split images or "
                 "belong to val/test lesions)", source.data, len(kept), len(more))
        seen.update(s.image_id for s in kept)
        extra.extend(kept)
    return LabelledSet(train.samples + extra, train.source, train.format, taxonomy, train.sha256)


def write_split(data: LabelledSet, split: dict[str, list[int]], path: Path) -> None:
    """Write ``image_id,split`` rows (every image of ``data``) to ``path``."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "split"])
        for name in SPLIT_NAMES:
            for i in split[name]:
                w.writerow([data.samples[i].image_id, name])


def read_split(data: LabelledSet, path: Path) -> dict[str, list[int]]:
    """Indices per split from a ``split.csv`` written by :func:`write_split` for the same data."""
    where = {s.image_id: i for i, s in enumerate(data.samples)}
    split: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            image_id = image_id_of(row["image_id"])  # ids as the manifests make them (older runs kept ".jpg")
            if image_id not in where:
                raise ConfigError(f"{path} names image {row['image_id']!r}, which is not in the training data; "
                                  "resume with the same --data as the original run.")
            split[row["split"]].append(where[image_id])
    return split


def _loaders(config, data, split, train_data, spec, meta, ctx, taxonomy):
    """(train DataLoader, its sampler, val dataset) for this process."""
    boxes = None
    if config.augment.enabled and config.augment.lesion_crop > 0:
        boxes = lesion_boxes(train_data.samples, config.masks)
        if not boxes:
            raise ConfigError("augment.lesion_crop needs reference lesion masks (<image_id>_segmentation.png), "
                              f"but none were found for the training images in {config.masks or '<images>/../masks'}; "
                              "set `masks:` in the recipe or set augment.lesion_crop to 0.")
        if ctx.is_main:
            log.info("lesion crop: reference masks for %d of %d training images", len(boxes), len(train_data))
    train_set = LesionDataset(train_data, spec, config.augment, meta, config.seed, boxes)
    val_set = LesionDataset(data.subset(split["val"]), spec, None, meta)
    if config.balance == "sampler":
        sampler = BalancedSampler(train_set.labels, taxonomy.num_classes, power=config.balance_power,
                                  rank=ctx.rank, world_size=ctx.world_size, seed=config.seed)
    else:
        sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=config.seed)
    per_rank_batch = max(1, config.batch_size // ctx.world_size)
    # drop_last: a final batch of one image breaks BatchNorm in training mode
    loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, num_workers=config.num_workers,
                        drop_last=len(sampler) > per_rank_batch, pin_memory=ctx.device.type == "cuda",
                        persistent_workers=config.num_workers > 0)
    return loader, sampler, train_set, val_set


# ------------------------------------------------------------------------------------ schedule
def _optimizer(model: LesionClassifier, config: TrainConfig, steps_per_epoch: int):
    """AdamW over backbone/new-layer groups with warmup + cosine decay (backbone held at 0 while frozen)."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    head = [p for p in model.head_parameters() if p.requires_grad]
    groups = [{"params": head, "lr": config.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_scale})
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    total = max(1, config.epochs * steps_per_epoch)
    warm = max(1, int(config.warmup_epochs * steps_per_epoch))
    frozen = config.freeze_epochs * steps_per_epoch

    def shape(step: int, start: int = 0) -> float:
        if step < start:
            return 0.0
        s = step - start
        if s < warm:
            return (s + 1) / warm
        progress = min(1.0, (step - start - warm) / max(1, total - start - warm))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    lambdas = [lambda s: shape(s)] + ([lambda s: shape(s, frozen)] if backbone else [])
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def _loss(config: TrainConfig, labels: list[int], num_classes: int, device) -> nn.Module:
    weight = None
    if config.balance == "loss":
        weight = torch.as_tensor(class_weights(labels, num_classes, config.balance_power), device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


# ------------------------------------------------------------------------------------ epochs
def _to(batch, device):
    images, meta, labels = batch
    nb = device.type == "cuda"
    return (images.to(device, non_blocking=nb), meta.to(device, non_blocking=nb) if meta.numel() else None,
            torch.as_tensor(labels).to(device, non_blocking=nb))


def train_epoch(model, loader, optimizer, scheduler, loss_fn, ctx, progress: TrainProgress,
                amp: bool = False) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean training loss over all processes, images/s of this process)."""
    amp = amp and ctx.device.type == "cuda"
    model.train()
    set_frozen_bn_eval(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
    total, count, start = 0.0, 0, time.perf_counter()
    for batch in loader:
        images, meta, labels = _to(batch, ctx.device)
        # bfloat16 autocast on GPU: about twice the throughput, no loss scaling needed
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(images, meta)[0]
        loss = loss_fn(logits.float(), labels)
        if not torch.isfinite(loss):
            raise ConfigError("Training diverged (the loss became NaN or infinite): lower lr in the config.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * len(labels)
        count += len(labels)
        progress.batch_done(total / count)
    rate = count / max(time.perf_counter() - start, 1e-9)
    return D.all_mean(total / max(count, 1), ctx), rate


@torch.no_grad()
def predict(model: LesionClassifier, dataset: LesionDataset, indices, device, batch_size: int,
            num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embeddings) of ``dataset`` items ``indices`` without augmentation."""
    model.eval()
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, num_workers=num_workers)
    logits, embs = [], []
    for batch in loader:
        images, meta, _ = _to(batch, device)
        out = model(images, meta)
        logits.append(out[0].float().cpu().numpy())
        embs.append(out[1].float().cpu().numpy())
    if not logits:
        return np.zeros((0, model.classifier.out_features), np.float32), np.zeros((0, model.classifier.in_features), np.float32)
    return np.concatenate(logits), np.concatenate(embs)


def validate(model: LesionClassifier, val_set: LesionDataset, config: TrainConfig, ctx,
             train_labels=()) -> tuple[np.ndarray, dict]:
    """Validation logits (all processes share the work) and {loss, balanced_accuracy[, after prior correction]}."""
    mine = list(range(ctx.rank, len(val_set), ctx.world_size))
    logits, _ = predict(model, val_set, mine, ctx.device, config.batch_size * 2)
    parts = D.gather_objects((mine, logits), ctx)
    order = np.concatenate([np.asarray(p[0], dtype=int) for p in parts])
    all_logits = np.concatenate([p[1] for p in parts])[np.argsort(order)]
    labels = np.asarray(val_set.labels)
    t = torch.from_numpy(all_logits)
    loss = float(nn.functional.cross_entropy(t, torch.from_numpy(labels)))
    bacc = balanced_accuracy(labels, all_logits.argmax(1), all_logits.shape[1])
    row = {"val_loss": loss, "val_balanced_accuracy": bacc}
    if config.prior_correction not in ("none", 0, 0.0):
        # the exported model gets the prior correction, so the best epoch is the best after it
        prior = training_prior(train_labels, all_logits.shape[1], config.balance, config.balance_power)
        tau, scores = choose_tau(all_logits, labels, prior, config.prior_correction)
        row.update(val_balanced_accuracy_corrected=scores[tau], prior_tau=tau)
    return all_logits, row


# ------------------------------------------------------------------------------------ the run
def train(config: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train, calibrate and export per ``config`` into run folder ``out``; returns a TrainResult on every rank."""
    start = time.perf_counter()
    ctx = D.setup(config.device)
    try:
        if config.ensemble_seeds:
            from .ensemble import train_ensemble

            return train_ensemble(config, Path(out), resume, progress, ctx, start)
        return _run(config, Path(out), resume, progress, ctx, start)
    finally:
        D.teardown(ctx)


def _run(config, out, resume, show_progress, ctx, start, finish: bool = True) -> TrainResult:
    """Train one model into run folder ``out``; with ``finish`` also calibrate it, fit OOD and export it."""
    run = RunFolder(out, ctx.is_main)
    if resume:
        config = run.resumed_config(config)
    _set_threads(config, ctx)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    data, taxonomy = load_data(config)
    split = read_split(data, run.split_csv) if resume else make_split(data, config)
    check_images(data.samples, data.source)  # before the run folder and the first epoch, not after it
    if ctx.is_main:
        run.open(resume)
        dump_config(config, run.config_yaml)
        if not resume:
            write_split(data, split, run.split_csv)
        log.info("data: %s", data.summary())
        log.info("split: %s", {k: len(v) for k, v in split.items()})
    meta_spec = MetadataSpec() if config.metadata_fusion else None
    model, info = build_model(config, taxonomy.num_classes, meta_spec.dim if meta_spec else 0)
    spec = Preprocessing(image_size=config.image_size, resize=config.resize, mean=info.mean, std=info.std)
    log.info("backbone %s (%d features), weights: %s, device %s, %d process(es)",
             info.name, info.num_features, info.weights, ctx.device, ctx.world_size)
    train_data = training_data(data, split, config, taxonomy)
    if config.extra_train:
        check_images(train_data.samples[len(split["train"]):], "the extra_train manifests")
    if ctx.is_main and config.extra_train:
        log.info("training images: %s", train_data.summary()["class_counts"])
    if ctx.is_main:
        for warning in data_warnings(data, split, train_data):
            log.warning(warning)
    loader, sampler, train_set, val_set = _loaders(config, data, split, train_data, spec, meta_spec, ctx, taxonomy)
    model.to(ctx.device)
    state = TrainState()
    optimizer, scheduler = _optimizer(model, config, len(loader))
    if resume:
        state = run.load_last(model, optimizer, scheduler, ctx.device)
    fitted = _fit(model, loader, sampler, train_set, val_set, optimizer, scheduler, config, ctx, run, state,
                  taxonomy, show_progress)
    if not ctx.is_main or not finish:
        run.close()
        return TrainResult(run.root, None, {}, fitted.epoch, fitted.best_epoch, time.perf_counter() - start)
    from .finish import finish_run

    return finish_run(model, run, config, data, split, train_data, spec, meta_spec, info, taxonomy, fitted, ctx,
                      start)


def _set_threads(config: TrainConfig, ctx) -> None:
    import os

    threads = config.threads
    if threads is None and ctx.distributed and ctx.device.type == "cpu":
        # N processes on one machine would each grab every core and fight over them
        threads = max(1, (os.cpu_count() or 1) // ctx.world_size)
    if threads:
        torch.set_num_threads(threads)


def _fit(model, loader, sampler, train_set, val_set, optimizer, scheduler, config, ctx, run, state,
         taxonomy, show_progress) -> TrainState:
    """The epoch loop with early stopping; returns the final TrainState (best weights in best.pt)."""
    ddp = model
    if ctx.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    loss_fn = _loss(config, train_set.labels, taxonomy.num_classes, ctx.device)
    if state.epoch and state.epoch - state.best_epoch >= config.patience:
        log.info("already stopped early after epoch %d (best epoch %d): no further epochs", state.epoch,
                 state.best_epoch)
        return state
    with TrainProgress(config.epochs, len(loader), enabled=show_progress and ctx.is_main,
                       start_epoch=state.epoch) as progress:
        for epoch in range(state.epoch, config.epochs):
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            progress.start_epoch(epoch)
            t0 = time.perf_counter()
            train_loss, rate = train_epoch(ddp, loader, optimizer, scheduler, loss_fn, ctx, progress, config.amp)
            _, val = validate(model, val_set, config, ctx, train_set.labels)
            row = {"epoch": epoch + 1, "train_loss": train_loss, **val, "lr": optimizer.param_groups[0]["lr"],
                   "images_per_s": rate * ctx.world_size, "seconds": time.perf_counter() - t0}
            improved = _update_best(state, row)
            state.epoch = epoch + 1
            state.history.append(row)
            progress.epoch_done(row, improved)
            if ctx.is_main:
                run.log_epoch(row, improved)
                run.save_checkpoints(model, optimizer, scheduler, state, config, improved)
            if D.broadcast_flag(state.epoch - state.best_epoch >= config.patience, ctx):
                log.info("early stop: no validation balanced-accuracy gain for %d epochs", config.patience)
                break
    return state


def _update_best(state: TrainState, row: dict) -> bool:
    score, loss = row.get("val_balanced_accuracy_corrected", row["val_balanced_accuracy"]), row["val_loss"]
    if score > state.best_score or (score == state.best_score and loss < state.best_loss):
        state.best_score, state.best_loss, state.best_epoch = score, loss, row["epoch"]
        return True
    return False


def train_from_files(config_path, out, resume=False, progress=True, **overrides) -> TrainResult:
    """Load a YAML recipe with command-line ``overrides`` and :func:`train` it into ``out``."""
    return train(load_config(config_path, **overrides), out, resume=resume, progress=progress)
