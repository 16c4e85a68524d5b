"""After the epochs: best weights → calibration, OOD statistics, metrics → exported bundle (main process)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..bundle import Manifest, ModelSpec
from ..ood_fit import colour_check, file_colours
from ..splits import split_sha256
from .calibrate import calibrate, fit_ood, validation_metrics
from .config import data_seed
from .data import LesionDataset, load_rgb
from .export import build_card, export_bundle
from .priors import choose_tau, shift, training_prior

log = logging.getLogger("dermscreen.training")


def finish_run(model, run, config, data, split, train_data, spec, meta_spec, info, taxonomy, state, ctx, start,
               ensemble: dict | None = None):
    """Prior-correct and calibrate the best checkpoint on validation, fit OOD, export the bundle; a TrainResult.

    ``ensemble``: the members' record when ``model`` is an EnsembleClassifier (its weights are already set)."""
    from .fit import TrainResult, predict

    try:
        if ensemble is None and run.best_pt.exists():
            run.load_best(model, ctx.device)
        val_eval = LesionDataset(data.subset(split["val"]), spec, None, meta_spec)
        train_eval = LesionDataset(train_data, spec, None, meta_spec)
        bs, workers = config.batch_size * 2, config.num_workers
        val_logits, val_emb = predict(model, val_eval, range(len(val_eval)), ctx.device, bs, workers)
        val_labels = np.asarray(val_eval.labels)
        val_logits, prior_record = _correct_prior(model, config, train_data, val_logits, val_labels, taxonomy)
        calibration, points = calibrate(val_logits, val_labels, taxonomy)
        metrics = validation_metrics(val_logits, val_labels, taxonomy, calibration.temperature)
        metrics.update(ece_before=calibration.ece_before, ece_after=calibration.ece_after)
        log.info("temperature %.3f, ECE %.4f -> %.4f; validation: %s", calibration.temperature,
                 calibration.ece_before, calibration.ece_after, metrics)
        _, train_emb = predict(model, train_eval, range(len(train_eval)), ctx.device, bs, workers)
        ood = fit_ood(train_emb, np.asarray(train_eval.labels))
        # the colour check beside it, and both thresholds chosen together (dermscreen.ood_fit)
        colour, ood_spec = colour_check(ood, file_colours(s.image_path for s in train_data.samples),
                                        file_colours(s.image_path for s in val_eval.data.samples), val_emb)
        log.info("OOD: embedding threshold %.3f keeps %.1f%%, colour threshold %.3f keeps %.1f%%, both keep %.1f%% "
                 "of validation images", ood_spec.threshold, 100 * ood_spec.validation_kept,
                 ood_spec.colour_threshold, 100 * ood_spec.colour_validation_kept, 100 * ood_spec.validation_kept_both)
        bundle_dir = None
        if config.export:
            manifest = _manifest(run, config, data, split, train_data, spec, meta_spec, info, taxonomy, state, ctx,
                                 start, calibration, points, ood_spec, metrics, prior_record, ensemble)
            images, meta = _check_batch(val_eval, config.export_check_images)
            arrays = {**ood.to_arrays(), **colour.to_arrays()}
            bundle_dir = export_bundle(model, run.bundle_dir, manifest, arrays, images, meta, config.onnx_exporter)
            log.info("bundle written to %s", bundle_dir)
        wall = time.perf_counter() - start
        log.info("finished in %.1f s", wall)
        return TrainResult(run.root, bundle_dir, metrics, state.epoch, state.best_epoch, wall)
    finally:
        run.close()


def _correct_prior(model, config, train_data, val_logits, val_labels, taxonomy):
    """Fold the chosen logit adjustment into the classifier bias; (adjusted val logits, manifest record)."""
    prior = training_prior(train_data.labels, taxonomy.num_classes, config.balance, config.balance_power)
    tau, scores = choose_tau(val_logits, val_labels, prior, config.prior_correction, config.prior_correction_max_ece)
    delta = shift(prior, tau)
    if tau:
        with torch.no_grad():
            model.classifier.bias.add_(torch.from_numpy(delta).to(model.classifier.bias))
        log.info("prior correction: tau %g, validation balanced accuracy %.4f -> %.4f", tau, scores.get(0.0, float("nan")),
                 scores[tau])
    record = {"tau": tau, "training_prior": [round(float(p), 6) for p in prior],
              "bias_shift": [round(float(d), 6) for d in delta],
              "val_balanced_accuracy_by_tau": {f"{t:g}": round(v, 4) for t, v in scores.items()},
              "max_ece": config.prior_correction_max_ece,
              "method": "logit adjustment, classifier bias -= tau * log(training prior); tau chosen on validation "
                        "(best balanced accuracy whose calibrated ECE stays within max_ece)"}
    return val_logits + delta, record


def _check_batch(dataset: LesionDataset, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    # at least two images, so the exported graph is checked with a batch other than its tracing one
    idx = [i % len(dataset) for i in range(max(2, min(n, len(dataset))))]
    items = [dataset[i] for i in idx]
    images = torch.stack([it[0] for it in items]).numpy()
    meta = torch.stack([it[1] for it in items]).numpy() if dataset.metadata is not None else None
    return images, meta


def _source_resolution(samples) -> str | None:
    """'224x224 px', or 'A and B' when the training images come from folders of different sizes (extra_train)."""
    first = {}
    for s in samples:  # one image per folder: a copy of a dataset is one size throughout
        first.setdefault(s.image_path.parent, s.image_path)
    sizes = []
    for path in first.values():
        try:
            w, h = load_rgb(path).size
        except Exception:  # only decorates the model card
            continue
        if f"{w}x{h} px" not in sizes:
            sizes.append(f"{w}x{h} px")
    return " and ".join(sizes) or None


def _manifest(run, config, data, split, train_data, spec, meta_spec, info, taxonomy, state, ctx, start,
              calibration, points, ood_spec, metrics, prior_record, ensemble=None) -> Manifest:
    import timm

    summary = data.summary()
    extras = [_load_extra(source, taxonomy) for source in config.extra_train]
    splits = {name: data.subset(idx).summary() for name, idx in split.items() if idx}
    splits["train"] = train_data.summary()  # with the extra_train images, if any
    training = {
        "data": summary,
        "splits": {k: {"images": v["images"], "groups": v["groups"], "class_counts": v["class_counts"]}
                   for k, v in splits.items()},
        "split_file": str(run.split_csv.resolve()),
        # how to make the split again from the same labels file (dermscreen evaluate --split, no --split-file):
        # the rule, and the result's hash to prove the remade split is this one
        "split": {"seed": data_seed(config), "val_fraction": config.val_fraction,
                  "test_fraction": config.test_fraction, "max_images": config.max_images,
                  "sha256": split_sha256(data, split)},
        "extra_train": [_extra_summary(source, more) for source, more in zip(config.extra_train, extras)],
        "prior_correction": prior_record,
        "recipe": config.model_dump(mode="json"),
        "backbone_weights": info.weights,
        "seed": config.seed,
        "split_seed": data_seed(config),
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "wall_time_s": round(time.perf_counter() - start, 1),  # this process only (a resumed run: since resuming)
        # training time of every epoch, all sessions of a resumed run included (wall_time_s does not see earlier ones)
        "epoch_seconds_total": round(sum(float(row.get("seconds", 0.0)) for row in state.history), 1),
        "device": str(ctx.device),
        "processes": ctx.world_size,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
    }
    if ensemble is not None:
        training["ensemble"] = ensemble
    card = build_card(summary, data.format, config.image_size,
                      _source_resolution([*data.samples, *train_data.samples]),
                      extra_training_sentence(config, len(split["train"]), train_data),
                      _contributing_formats(extras, train_data.samples[len(split["train"]):]))
    return Manifest(
        name=config.name, taxonomy=taxonomy, preprocessing=spec,
        model=ModelSpec(backbone=info.name, embedding_dim=info.num_features,
                        members=len(ensemble["members"]) if ensemble else 1,
                        inputs=["image", "metadata"] if meta_spec else ["image"], metadata=meta_spec),
        calibration=calibration, operating_points=points, ood=ood_spec, metrics=metrics,
        training=training, card=card,
    )


def _load_extra(source, taxonomy):
    """The extra_train manifest ``source`` as a LabelledSet (None when it no longer loads: it only decorates)."""
    from ..manifests import load_labels

    try:
        return load_labels(source.data, source.images, taxonomy, check_files=False)
    except Exception:  # only decorates the record and the card
        return None


def _extra_summary(source, more) -> dict:
    # what each extra manifest was (path and hash), so the bundle says exactly which data it saw
    if more is None:
        return {"source": source.data}
    return {"source": source.data, "images_folder": source.images, "manifest_sha256": more.sha256,
            "images_in_manifest": len(more)}


def _contributing_formats(extras, added) -> list[str]:
    """Formats of the extra manifests that gave training images (``added``: the extra images training used),
    for the card's licence; a manifest that no longer loads counts with an unknown ("plain") format."""
    ids = {s.image_id for s in added}
    formats = []
    for more in extras:
        if not ids:
            break
        if more is None:
            formats.append("plain")  # its licence cannot be known: say so rather than leave it out
            continue
        mine = ids & {s.image_id for s in more.samples}
        if mine:
            formats.append(more.format)
        ids -= mine  # an id in two manifests came from the first one (fit.training_data keeps the first copy)
    return formats


def extra_training_sentence(config, split_train: int, train_data) -> str | None:
    """The model card's words for the extra_train images (None when there are none)."""
    added = len(train_data) - split_train
    if not config.extra_train or added <= 0:
        return None
    names = ", ".join(Path(source.data).parent.name + "/" + Path(source.data).name for source in config.extra_train)
    counts = ", ".join(f"{k} {v}" for k, v in train_data.class_counts().items())
    unit = train_data.group_kind(plural=False)
    return (f"It was split by {unit} into train/validation/test; training also used {added} more images from "
            f"{names} (training only: no copy of a split image, no image of a validation or test {unit}), "
            f"so {len(train_data)} training images in all; training class counts: {counts}.")
