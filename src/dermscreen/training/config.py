"""The training recipe: a pydantic model read from YAML; unknown keys are errors, not silently ignored."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ..errors import ConfigError
from .data import AugmentConfig


class ExtraTrainData(BaseModel):
    """A further manifest whose images only ever join the training split (e.g. another copy of the data)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="manifest CSV; a relative path in a recipe: see load_config")
    images: str | None = None

    @model_validator(mode="after")
    def _absolute(self) -> "ExtraTrainData":
        self.data, self.images = _absolute(self.data), _absolute(self.images)
        return self


class TrainConfig(BaseModel):
    """Everything that defines a training run; saved resolved as ``config.yaml`` in the run folder."""

    model_config = ConfigDict(extra="forbid")

    name: str = "dermscreen-model"
    # data: a manifest CSV (HAM10000 metadata, ISIC one-hot or plain image,dx) and its images folder;
    # both can be given (or overridden) on the command line
    data: str | None = None
    images: str | None = None
    taxonomy: str = Field("ham10000", description="'ham10000' or a taxonomy YAML path")
    # use at most this many images (a class-stratified, lesion-grouped subsample; for smoke runs)
    max_images: int | None = Field(None, ge=10)
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, ge=0, lt=0.5)
    # More training images from other manifests. The split is made on `data` alone; an extra image joins
    # training only if its image id is not in `data` and its lesion (group) is in no val/test split, so
    # held-out scores stay clean. Needs lesion ids in both manifests to filter by lesion.
    extra_train: list[ExtraTrainData] = Field(default_factory=list)
    # folder of reference lesion masks, <image_id>_segmentation.png (lesion >= 128), for augment.lesion_crop;
    # None: each image's <images folder>/../masks. Images without a mask simply never get the lesion crop.
    masks: str | None = None

    backbone: str = "tf_efficientnet_lite0"
    weights: str = Field("imagenet", description="imagenet | none | timm | timm:<tag> | path to .pth/.safetensors")
    image_size: int = Field(224, ge=32, le=1024)
    resize: Literal["center_crop", "squash"] = "center_crop"
    drop_rate: float = Field(0.2, ge=0, lt=1)
    metadata_fusion: bool = False
    metadata_hidden: int = Field(32, ge=4)

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the new layers")
    backbone_lr_scale: float = Field(0.3, ge=0, le=1, description="backbone lr = lr * this")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    # epochs at the start where only the new layers learn (backbone lr 0), so the random head
    # does not wreck the pretrained features
    freeze_epochs: int = Field(0, ge=0)
    # stem + this many block stages never train (cheaper on CPU; 0 = train everything)
    freeze_stages: int = Field(0, ge=0)
    balance: Literal["sampler", "loss", "none"] = "sampler"
    balance_power: float = Field(0.5, ge=0, le=1, description="weights ∝ count^-power; 1 = fully balanced")
    label_smoothing: float = Field(0.05, ge=0, lt=0.5)
    # Logit adjustment for the class prior the model was trained under (sampler/loss weighting): the
    # exported classifier bias gets -tau * log(training prior). "auto" picks tau on validation balanced
    # accuracy (also used to choose the best epoch); "none" or 0 switches it off; a number fixes tau.
    prior_correction: Literal["auto", "none"] | float = "auto"
    # "auto" exports the best tau whose calibrated validation ECE stays at or below this (None: no limit).
    # Epochs are still ranked by the best balanced accuracy any tau reaches.
    prior_correction_max_ece: float | None = Field(0.05, gt=0, le=1)
    patience: int = Field(6, ge=1, description="epochs without validation balanced-accuracy gain before stopping")
    augment: AugmentConfig = AugmentConfig()

    seed: int = 0
    split_seed: int | None = Field(None, ge=0, description=(
        "seed of the train/val/test split and the max_images subsample (None: seed); fixing it while "
        "changing seed retrains on the same split, so two runs differ only by their random training draws"))
    ensemble_seeds: list[int] = Field(default_factory=list, description=(
        "train one member per seed, one after another on the same split (split_seed, else seed), each with its "
        "own early stop, and export their average as one model (dermscreen.training.ensemble); empty: one model"))
    num_workers: int = Field(2, ge=0)
    threads: int | None = Field(None, ge=1, description="torch CPU threads per process (default: torch's choice)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: bool = Field(True, description="bfloat16 mixed precision when training on a GPU (ignored on CPU)")
    export: bool = True
    export_check_images: int = Field(4, ge=1)
    # dynamo (torch.export, the supported exporter) or torchscript (deprecated, several times faster)
    onnx_exporter: Literal["dynamo", "torchscript"] = "dynamo"
    # relative recipe paths found in none of the folders load_config looks in: {setting: (path, sentence)}; told by
    # check_recipe_paths when a run starts, not at load time: a recipe must still load where its data is absent
    # (tests, --data given on the command line, a machine without the shared data).
    _unfound: dict[str, tuple[str, str]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _absolute_paths(self) -> "TrainConfig":
        # a run's config.yaml must name the same files from any working directory (resume, export), and a
        # resume with the absolute path of the same file is the same run
        self.data, self.images, self.masks = _absolute(self.data), _absolute(self.images), _absolute(self.masks)
        if self.taxonomy.lower() != "ham10000":
            self.taxonomy = _absolute(self.taxonomy)
        return self

    @model_validator(mode="after")
    def _fractions(self) -> "TrainConfig":
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20% of images for training")
        if self.ensemble_seeds:
            if len(self.ensemble_seeds) < 2 or len(set(self.ensemble_seeds)) != len(self.ensemble_seeds):
                raise ValueError("ensemble_seeds needs at least two different seeds (or none, for one model)")
            if self.metadata_fusion:
                raise ValueError("ensemble_seeds does not support metadata_fusion yet: train one model instead")
        return self



def _absolute(path: str | None) -> str | None:
    """``path`` made absolute against the working directory (``..`` folded, symlinks kept); None stays None."""
    return None if path is None or not str(path).strip() else os.path.abspath(os.path.expanduser(path))


def data_seed(config: TrainConfig) -> int:
    """The seed that picks the images and their split: ``split_seed``, or ``seed`` when it is not set."""
    return config.seed if config.split_seed is None else config.split_seed


def load_config(path: str | Path | None, **overrides) -> TrainConfig:
    """Read a YAML recipe (or defaults when ``path`` is None), apply non-None ``overrides``, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"Config file {path} is a folder: give a recipe YAML file (see configs/*.yaml).")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"Config file not found: {path}.") from None
        except OSError as exc:
            raise ConfigError(f"Config file {path} cannot be read: {exc.strerror or exc}.") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {path} must be a mapping of settings (key: value).")
        data, unfound = _resolve_relative(data, path)
    given = {k: v for k, v in overrides.items() if v is not None}
    data.update(given)
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # a bad value given on the command line is not the config file's fault: say where each one came from
        from_cli = [bool(e["loc"]) and e["loc"][0] in given for e in errors]
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}"
            f"{' (--' + str(e['loc'][0]).replace('_', '-') + ' on the command line)' if cli else ''}: {e['msg']}"
            for e, cli in zip(errors, from_cli))
        if all(from_cli):
            where = "A command-line option is" if len(errors) == 1 else "Command-line options are"
        else:
            where = f"Config file {path} is" if path else "The training settings are"
        raise ConfigError(f"{where} invalid: {problems}. "
                          "See configs/default.yaml for every setting and its meaning.") from None
    if path is not None:
        # a path given on the command line replaces the recipe's, so the recipe's is not looked for
        config._unfound = {key: found for key, found in unfound.items() if key.split("[")[0] not in given}
    return config


_PATH_KEYS = ("data", "images", "masks")  # with extra_train[].data/images and taxonomy: the recipe's paths


def _resolve_relative(data: dict, recipe: Path) -> tuple[dict, dict[str, tuple[str, str]]]:
    """``data`` with its relative paths looked up, and {setting: (path, sentence)} for those found nowhere.

    A relative path in a recipe is looked up in the working directory (as always), then in the recipe's folder,
    then in that folder's parent, so a recipe works from any folder: the shipped configs/*.yaml name the data
    relative to the repository root (``../shared/data/...``), the folder they are documented to be run from, and
    a recipe of one's own can name files beside it. A taxonomy YAML is looked for in the recipe's folder first,
    as it always was. A path found nowhere stays relative to the working directory (taxonomy: the recipe's
    folder) and check_recipe_paths names it, as written, when a run starts.
    """
    home = recipe.absolute().parent  # absolute: the parent of a recipe named "c.yaml" is not "."
    here = (Path(), "the current folder")
    beside = (home, "the recipe's folder")
    above = (home.parent, "the recipe folder's parent")
    out, unfound = dict(data), {}

    def locate(key: str, value, places: list[tuple[Path, str]]):
        if not isinstance(value, str) or not value.strip() or Path(os.path.expanduser(value)).is_absolute():
            return value
        for folder, _ in places:
            if (folder / value).exists():
                return str(folder / value)
        looked: dict[str, str] = {}
        for folder, what in places:
            looked.setdefault(os.path.abspath(folder), what)  # each folder once (the recipe may be in the cwd)
        where = ", ".join(f"{what} {folder}" for folder, what in looked.items())
        unfound[key] = (os.path.abspath(places[0][0] / value), f"{key} {value!r} in {recipe} (looked for in {where})")
        return str(places[0][0] / value)

    for key in _PATH_KEYS:
        if key in out:
            out[key] = locate(key, out[key], [here, beside, above])
    tax = out.get("taxonomy")
    if isinstance(tax, str) and tax.lower() != "ham10000":
        out["taxonomy"] = locate("taxonomy", tax, [beside, here, above])
    if isinstance(out.get("extra_train"), list):
        out["extra_train"] = [
            {**item, **{k: locate(f"extra_train[{i}].{k}", item[k], [here, beside, above])
                        for k in ("data", "images") if k in item}} if isinstance(item, dict) else item
            for i, item in enumerate(out["extra_train"])]
    return out, unfound


def check_recipe_paths(config: TrainConfig) -> None:
    """Raise ConfigError naming every relative path of the recipe that is still not there, as the recipe wrote it
    and where it was looked for (else the error would name a path, made absolute, that the user never typed)."""
    uses_masks = config.augment.enabled and config.augment.lesion_crop > 0  # else `masks` is never read
    missing = [sentence for key, (path, sentence) in config._unfound.items()
               if not Path(path).exists() and (key != "masks" or uses_masks)]
    if missing:
        raise ConfigError(f"Not found: {'; '.join(missing)}. A relative path in a recipe is looked for in the "
                          "current folder, then beside the recipe, then in the recipe folder's parent: run from the "
                          "folder it is relative to, or give an absolute path.")


def dump_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML to ``path``."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
