"""Unit tests of the training pipeline's parts: config, weights, data, sampling, model, export check."""
from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from dermscreen.errors import BundleError, ConfigError  # noqa: E402
from dermscreen.manifests import load_labels  # noqa: E402
from dermscreen.metadata import MetadataSpec  # noqa: E402
from dermscreen.preprocess import Preprocessing, preprocess  # noqa: E402
from dermscreen.taxonomy import HAM10000  # noqa: E402
from dermscreen.training.config import TrainConfig, load_config  # noqa: E402
from dermscreen.training.data import AugmentConfig, BalancedSampler, LesionDataset, augment, class_weights  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------- config
def test_shipped_configs_validate(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    default, tiny = load_config(root / "default.yaml"), load_config(root / "tiny.yaml")
    assert default.backbone == "tf_efficientnet_lite0" and default.weights == "imagenet"
    assert tiny.image_size <= 128 and tiny.max_images and tiny.max_images <= 400
    # every variant recipe, and every variant of the recipe studies, must still be a valid config (a renamed or
    # removed setting would otherwise break them silently; benchmarks/sweep_recipes.py applies them this way)
    for path in root.glob("*.yaml"):
        load_config(path)
    studies = list((root / "sweeps").glob("*.yaml"))
    assert studies
    for study in studies:
        for name, spec in yaml.safe_load(study.read_text()).items():
            recipe = {**yaml.safe_load((root / "default.yaml").read_text()), **spec["overrides"]}
            recipe["ensemble_seeds"] = spec["seeds"] if len(spec["seeds"]) > 1 else []
            (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
            load_config(tmp_path / f"{name}.yaml")


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(path)


def test_bad_config_value_names_the_setting(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("balance: oversample\n")
    with pytest.raises(ConfigError, match="balance"):
        load_config(path)
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(None, val_fraction=0.7)


def test_overrides_win_and_taxonomy_path_is_relative_to_the_config(tmp_path):
    (tmp_path / "tax.yaml").write_text("name: t\nclasses: [{code: a, name: A, group: benign}, "
                                       "{code: b, name: B, group: malignant}]\n")
    (tmp_path / "c.yaml").write_text("epochs: 5\ntaxonomy: tax.yaml\n")
    cfg = load_config(tmp_path / "c.yaml", epochs=2, device=None)
    assert cfg.epochs == 2
    assert cfg.taxonomy == str(tmp_path / "tax.yaml")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/recipe.yaml")


# ---------------------------------------------------------------------------------------- compat shim
def test_compat_shim_makes_timm_importable_and_is_idempotent():
    from dermscreen.training import _torchvision_compat as compat

    compat.ensure_torchvision()
    first = sys.modules["torchvision"]
    library = compat._LIBRARY
    compat.ensure_torchvision()  # second call: already imported, must change nothing
    assert sys.modules["torchvision"] is first
    assert compat._LIBRARY is library
    import timm  # noqa: F401  (would raise "operator torchvision::nms does not exist" without the shim)

    assert hasattr(first, "__version__")


@pytest.mark.parametrize("already_imported", [True, False])
def test_compat_shim_is_a_no_op_when_torchvision_loads(monkeypatch, already_imported):
    from dermscreen.training import _torchvision_compat as compat

    monkeypatch.setattr(compat, "_LIBRARY", None)
    monkeypatch.setattr(compat, "SHIM_APPLIED", False)
    # a module already in sys.modules is what a successful `import torchvision` returns
    fake = type(sys)("torchvision")
    if already_imported:
        fake.__version__ = "0.0-test"
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    compat.ensure_torchvision()
    assert compat._LIBRARY is None and compat.SHIM_APPLIED is False
    assert sys.modules["torchvision"] is fake


# ---------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_offline_package_keys_map_one_to_one_onto_timm(name):
    from dermscreen.training.backbones import _read_state_dict, _timm, rename_lukemelas, weight_package_file

    model = _timm().create_model(name, pretrained=False)
    state = _read_state_dict(weight_package_file(name))
    renamed = rename_lukemelas(state, model)
    own = model.state_dict()
    assert set(renamed) == set(own)
    assert all(tuple(renamed[k].shape) == tuple(own[k].shape) for k in own)
    model.load_state_dict(renamed, strict=True)


def test_imagenet_weights_classify_a_real_photo_sensibly():
    """Grace Hopper in uniform (matplotlib's sample photo): ImageNet 'military uniform' (652) must rank top-3."""
    import matplotlib

    from dermscreen.training.backbones import _read_state_dict, _timm, load_into, weight_package_file

    name = "tf_efficientnet_lite0"
    model = _timm().create_model(name, pretrained=False).eval()
    random_logits_model = _timm().create_model(name, pretrained=False).eval()
    load_into(model, _read_state_dict(weight_package_file(name)), name)
    photo = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    x = torch.from_numpy(preprocess(photo, Preprocessing(image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3)))[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
        random_feats = random_logits_model.forward_features(x)
        feats = model.forward_features(x)
    assert 652 in probs.topk(3).indices.tolist()
    assert probs.max() > 0.2  # a confident ImageNet prediction, not a flat distribution
    assert not torch.allclose(feats, random_feats, atol=1e-3)


def test_create_backbone_from_local_files(tmp_path):
    from safetensors.torch import save_file

    from dermscreen.training.backbones import create_backbone

    source, info = create_backbone("tf_efficientnet_lite0", "none")
    assert info.num_features == 1280 and info.mean == (0.5, 0.5, 0.5)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    for file in ("w.pth", "w.safetensors"):
        loaded, info = create_backbone("tf_efficientnet_lite0", str(tmp_path / file))
        assert info.weights == f"file {file}"
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_weights_errors_are_clear(tmp_path):
    from dermscreen.training.backbones import create_backbone

    with pytest.raises(ConfigError, match="Unknown backbone"):
        create_backbone("no_such_net", "none")
    with pytest.raises(ConfigError, match="not found"):
        create_backbone("tf_efficientnet_lite0", str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="No offline ImageNet weights"):
        create_backbone("resnet18", "imagenet")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="do not fit"):
        create_backbone("tf_efficientnet_lite0", str(tmp_path / "other.pth"))


def test_timm_hub_weights_fail_fast_without_network(monkeypatch):
    import time

    from dermscreen.training import backbones

    monkeypatch.setattr(backbones, "HUB_HOST", ("hub.invalid", 443))  # .invalid never resolves (RFC 2606)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="not reachable"):
        backbones.create_backbone("tf_efficientnet_lite0", "timm:in1k")
    assert time.perf_counter() - t0 < 30


# ---------------------------------------------------------------------------------------- data
@pytest.fixture()
def synthetic_set(tmp_path):
    """A plain CSV of 12 synthetic 120x90 images over 3 HAM10000 classes, with patient metadata."""
    rng = np.random.default_rng(0)
    rows = ["image,dx,lesion_id,age,sex,site"]
    for i in range(12):
        arr = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png,{['nv', 'mel', 'bkl'][i % 3]},L{i // 2},{30 + i},{'male' if i % 2 else ''},back")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return load_labels(tmp_path / "labels.csv")


def test_dataset_without_augmentation_is_exactly_the_inference_preprocessing(synthetic_set):
    spec = Preprocessing(image_size=48, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = LesionDataset(synthetic_set, spec, aug=None, metadata=MetadataSpec())
    image, meta, label = ds[3]
    want = preprocess(Image.open(synthetic_set.samples[3].image_path), spec)
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 48, 48)
    np.testing.assert_array_equal(image.numpy(), want)
    np.testing.assert_array_equal(meta.numpy(), MetadataSpec().encode(33, "male", "back"))
    assert label == HAM10000.index("nv")


def test_augmented_items_have_model_shape_and_vary_by_epoch(synthetic_set):
    spec = Preprocessing(image_size=40)
    ds = LesionDataset(synthetic_set, spec, aug=AugmentConfig(), metadata=None, seed=1)
    a, meta, _ = ds[0]
    assert tuple(a.shape) == (3, 40, 40) and meta.numel() == 0
    assert torch.equal(a, ds[0][0])  # same (seed, epoch, item): same draw, on any worker
    ds.set_epoch(1)
    assert not torch.equal(a, ds[0][0])
    assert np.isfinite(a.numpy()).all()


def test_augment_keeps_size_and_flips_are_pixel_exact():
    img = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    spec = Preprocessing(image_size=32)
    only_geometry = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotate_degrees=0, brightness=0,
                                  contrast=0, saturation=0, hue=0)
    src = np.asarray(img)
    dihedral = [np.rot90(f, k) for f in (src, src[:, ::-1]) for k in range(4)]
    for seed in range(8):
        out = np.asarray(augment(img, spec, only_geometry, random.Random(seed)))
        assert out.shape == (32, 32, 3)
        assert any(np.array_equal(out, d) for d in dihedral)  # one of the 8 symmetries, no resampling
    jittered = augment(img, spec, AugmentConfig(), random.Random(0))
    assert jittered.size == (32, 32)


def test_zoom_out_shows_the_view_smaller_with_mirrored_skin_around_it():
    src = np.zeros((32, 32, 3), np.uint8)
    src[12:20, 12:20] = 255  # a bright 8 px "lesion" in the middle of a black frame
    img = Image.fromarray(src)
    spec = Preprocessing(image_size=32)
    only_geometry = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotate_degrees=0, brightness=0, contrast=0,
                         saturation=0, hue=0, flips=False, rotate90=False)
    assert np.array_equal(np.asarray(augment(img, spec, AugmentConfig(**only_geometry), random.Random(0))), src)
    zoomed = AugmentConfig(zoom_out=1.0, zoom_out_max=2.0, **only_geometry)
    import scipy.ndimage as ndi

    largest = []
    for seed in range(8):
        labels, n = ndi.label(np.asarray(augment(img, spec, zoomed, random.Random(seed)))[..., 0] > 127)
        largest.append(np.bincount(labels.ravel())[1:].max() if n else 0)
    # the lesion (and its mirrored copies) is seen smaller than its 64 px, never larger, never lost
    assert all(0 < a <= 64 for a in largest) and sum(a < 56 for a in largest) >= 6, largest
    # off by default, and an older recipe's random draws are not disturbed by the new option
    assert AugmentConfig().zoom_out == 0.0


def test_class_weights_and_balanced_sampler():
    labels = [0] * 90 + [1] * 9 + [2] * 1
    w = class_weights(labels, 4, power=1.0)
    assert w[0] < w[1] < w[2] and w[3] == 1.0  # absent class: neutral weight
    assert np.isclose(w[:3].mean(), 1.0)
    sampler = BalancedSampler(labels, 4, num_samples=3000, power=1.0, seed=0)
    drawn = np.bincount(np.asarray(labels)[list(sampler)], minlength=3)
    assert np.all(np.abs(drawn / drawn.sum() - 1 / 3) < 0.05)
    shards = [list(BalancedSampler(labels, 4, num_samples=100, rank=r, world_size=2, seed=0)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 50 and shards[0] != shards[1]
    s = BalancedSampler(labels, 4, seed=0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first


# ---------------------------------------------------------------------------------------- model
def _tiny_model(meta_dim=0, num_classes=3):
    from dermscreen.training.config import TrainConfig
    from dermscreen.training.model import build_model

    cfg = TrainConfig(weights="none", drop_rate=0.0, freeze_stages=2)
    model, _ = build_model(cfg, num_classes, meta_dim)
    return model.eval()


def test_model_outputs_and_cam_identity():
    model = _tiny_model(meta_dim=MetadataSpec().dim)
    x = torch.randn(2, 3, 64, 64)
    meta = torch.from_numpy(np.stack([MetadataSpec().encode(50, "female", "back")] * 2))
    with torch.no_grad():
        logits, emb, feats = model(x, meta)
        image_logits = torch.einsum("cd,ndhw->nchw", model.classifier.weight, feats).mean((2, 3)) + model.classifier.bias
    assert logits.shape == (2, 3) and emb.shape == (2, 1280) and feats.shape == (2, 1280, 2, 2)
    # the bundle's CAM contract: image logits are the spatial mean of classifier weights · feature map
    torch.testing.assert_close(image_logits + model.metadata_head(meta), logits, atol=1e-4, rtol=1e-4)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("backbone.conv_stem") for n in frozen) and any(".blocks.1." in n for n in frozen)
    assert not any(".blocks.2." in n for n in frozen)


def test_backbone_lr_is_zero_while_frozen():
    from dermscreen.training.fit import _optimizer

    model = _tiny_model()
    cfg = TrainConfig(weights="none", epochs=4, freeze_epochs=1, warmup_epochs=1)
    opt, sched = _optimizer(model, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert all(bb == 0 for _, bb in lrs[:5]) and lrs[6][1] > 0
    assert max(h for h, _ in lrs) <= cfg.lr + 1e-12 and lrs[-1][0] < lrs[6][0]


def test_export_check_fails_loudly_when_onnx_differs():
    from dermscreen.training.export import check_onnx, to_onnx

    model = _tiny_model()
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    onnx_bytes = to_onnx(model, 64, exporter="torchscript")
    diffs = check_onnx(onnx_bytes, model, x)
    assert max(diffs.values()) <= 1e-4
    with torch.no_grad():
        model.classifier.bias += 0.01  # the torch model no longer matches the exported graph
    with pytest.raises(BundleError, match="does not reproduce"):
        check_onnx(onnx_bytes, model, x)


# ---------------------------------------------------------------------------------------- command line
def test_train_command_errors_are_sentences_not_tracebacks(tmp_path):
    from typer.testing import CliRunner

    from dermscreen.cli import app

    runner = CliRunner()
    no_data = runner.invoke(app, ["train", "--out", str(tmp_path / "r")])
    assert no_data.exit_code == 2 and "No training data given" in no_data.output
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    bad_key = runner.invoke(app, ["train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "r")])
    assert bad_key.exit_code == 2 and "epochz" in bad_key.output
    missing = runner.invoke(app, ["train", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "r")])
    assert missing.exit_code == 2 and "not found" in missing.output
    nothing = runner.invoke(app, ["train", "--resume", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path)])
    assert nothing.exit_code == 2
    not_a_run = runner.invoke(app, ["export", str(tmp_path)])
    assert not_a_run.exit_code == 2 and "not a training run folder" in not_a_run.output
    assert not (tmp_path / "r").exists()  # a failed start writes nothing


def test_prior_correction_raises_balanced_accuracy_of_a_prior_biased_classifier():
    from dermscreen.training.priors import balanced_accuracy, choose_tau, shift, training_prior

    # a classifier that learnt the skewed training prior: true class evidence + log prior on every logit
    rng = np.random.default_rng(0)
    counts = np.array([600, 60, 20])
    labels = np.repeat(np.arange(3), [200, 200, 200])
    evidence = np.eye(3)[labels] * 1.5 + rng.normal(0, 1, (600, 3))
    prior = training_prior(np.repeat(np.arange(3), counts), 3, "none", 0.0)
    assert prior == pytest.approx(counts / counts.sum())
    logits = evidence + np.log(prior)
    tau, scores = choose_tau(logits, labels, prior, "auto")
    plain = balanced_accuracy(labels, logits.argmax(1), 3)
    assert scores[0.0] == pytest.approx(plain)
    assert 0.75 <= tau <= 1.25 and scores[tau] > plain + 0.15  # undoing the prior is what helps
    assert np.allclose(shift(prior, tau), -tau * np.log(prior))
    assert choose_tau(logits, labels, prior, "none") == (0.0, {0.0: pytest.approx(plain)})
    # a fully balanced sampler leaves no prior to correct; power 0.5 leaves the square root
    assert training_prior(np.repeat(np.arange(3), counts), 3, "sampler", 1.0) == pytest.approx(np.full(3, 1 / 3))
    half = training_prior(np.repeat(np.arange(3), counts), 3, "sampler", 0.5)
    assert half == pytest.approx(np.sqrt(counts) / np.sqrt(counts).sum())


def test_extra_training_images_never_come_from_val_or_test_lesions(tmp_path, synthetic_set):
    from dermscreen.training.config import ExtraTrainData
    from dermscreen.training.fit import make_split, training_data

    config = TrainConfig(val_fraction=0.25, test_fraction=0.25, seed=0)
    split = make_split(synthetic_set, config)
    held = {synthetic_set.samples[i].lesion_id for name in ("val", "test") for i in split[name]}
    train_lesion = synthetic_set.samples[split["train"][0]].lesion_id
    # another copy of the data set: one image of a training lesion, one of a held-out lesion, one copy of a
    # split image (same id), and one lesion the main manifest lacks
    extra = tmp_path / "extra"
    extra.mkdir()
    rows = ["image,dx,lesion_id"]
    for name, lesion in (("x1", train_lesion), ("x2", sorted(held)[0]), ("img0", "L0"), ("x3", "NEW")):
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(extra / f"{name}.png")
        rows.append(f"{name}.png,nv,{lesion}")
    (extra / "labels.csv").write_text("\n".join(rows) + "\n")
    plain = training_data(synthetic_set, split, config, HAM10000)
    assert [s.image_id for s in plain.samples] == [synthetic_set.samples[i].image_id for i in split["train"]]
    config.extra_train = [ExtraTrainData(data=str(extra / "labels.csv"))]
    more = training_data(synthetic_set, split, config, HAM10000)
    added = [s for s in more.samples[len(plain):]]
    assert [s.image_id for s in added] == ["x1", "x3"]
    assert all(s.lesion_id not in held for s in more.samples)


def test_prior_correction_respects_the_calibration_limit():
    from dermscreen.calibration import expected_calibration_error, fit_temperature, softmax
    from dermscreen.training.priors import choose_tau

    # validation with the real (skewed) class mix: undoing the prior fully would miscalibrate it
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), [600, 60, 20])
    prior = np.array([600, 60, 20]) / 680
    logits = np.eye(3)[labels] * 1.5 + rng.normal(0, 1, (680, 3)) + np.log(prior)
    free, scores = choose_tau(logits, labels, prior, "auto")
    for limit in (0.05, 0.03, 0.02):
        tau, _ = choose_tau(logits, labels, prior, "auto", max_ece=limit)
        assert tau <= free
        if tau:
            shifted = logits - tau * np.log(prior)
            assert expected_calibration_error(softmax(shifted, fit_temperature(shifted, labels)), labels) <= limit
    strict, _ = choose_tau(logits, labels, prior, "auto", max_ece=0.02)
    assert strict < free and scores[strict] < scores[free]  # the limit binds here: it costs balanced accuracy


def test_lesion_box_in_image_scales_a_same_aspect_mask_and_maps_a_centre_square_into_a_wider_one():
    from dermscreen.training.data import lesion_box_in_image

    mask = np.zeros((150, 200), bool)
    mask[30:90, 100:160] = True  # rows 30-89, columns 100-159 of a 4:3 frame
    assert lesion_box_in_image(mask, (200, 150)) == (100, 30, 160, 90)
    assert lesion_box_in_image(mask, (400, 300)) == (200, 60, 320, 180)
    # a 224 px centre square of the frame (HAM10000's sharp copy): columns 25-174 of the mask, scaled by 224/150
    assert lesion_box_in_image(mask, (224, 224)) == (112, 44, 202, 135)
    outside = np.zeros((150, 200), bool)
    outside[10:20, 2:20] = True  # left of the centre square
    assert lesion_box_in_image(outside, (224, 224)) is None
    assert lesion_box_in_image(np.zeros((150, 200), bool), (200, 150)) is None


def test_lesion_crop_centres_a_square_the_lesion_fills_and_mirrors_skin_beyond_the_edge():
    from dermscreen.training.data import lesion_crop

    src = np.full((150, 200, 3), 200, np.uint8)
    src[60:90, 20:50] = 0  # a dark 30 px lesion near the left edge
    crop = np.asarray(lesion_crop(Image.fromarray(src), (20, 60, 50, 90), 0.5, random.Random(0)))
    assert crop.shape == (60, 60, 3)  # 30 px / 0.5
    ys, xs = np.nonzero(crop[..., 0] == 0)
    assert ys.max() - ys.min() + 1 == 30 and xs.max() - xs.min() + 1 == 30  # the whole lesion, unscaled
    assert abs((ys.mean() - 29.5)) <= 6.5 and abs(xs.mean() - 29.5) <= 6.5  # centred, give or take a tenth
    # a square wider than the frame: skin is mirrored beyond the edges, so the lesion appears mirrored too
    wide = np.asarray(lesion_crop(Image.fromarray(src), (20, 60, 50, 90), 0.1, random.Random(0)))
    assert wide.shape == (300, 300, 3) and (wide[..., 0] == 0).sum() > 900
    # off by default
    assert AugmentConfig().lesion_crop == 0.0


def test_augment_uses_the_lesion_crop_only_when_a_box_is_known(tmp_path):
    from dermscreen.training.data import lesion_boxes

    spec = Preprocessing(image_size=32)
    src = np.full((60, 80, 3), 200, np.uint8)
    src[10:20, 71:79] = 0  # a small lesion off to the right, outside the centred square the model sees
    img = Image.fromarray(src)
    only_geometry = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotate_degrees=0, brightness=0, contrast=0,
                         saturation=0, hue=0, flips=False, rotate90=False, lesion_crop=1.0)
    aug = AugmentConfig(**only_geometry)
    plain = np.asarray(augment(img, spec, aug, random.Random(0)))
    assert (plain < 100).sum() == 0  # no box: the centred square, which misses the lesion
    cropped = np.asarray(augment(img, spec, aug, random.Random(0), box=(71, 10, 79, 20)))
    assert (cropped[..., 0] < 100).sum() > 50  # the lesion, now in view and larger
    # boxes come from <image_id>_segmentation.png files; images without one are left out
    from dermscreen.manifests import Sample

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img.save(tmp_path / "images" / "a.png")
    img.save(tmp_path / "images" / "b.png")
    mask = np.zeros((60, 80), np.uint8)
    mask[10:20, 71:79] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a_segmentation.png")
    samples = [Sample("a", tmp_path / "images" / "a.png", "nv"), Sample("b", tmp_path / "images" / "b.png", "nv")]
    assert lesion_boxes(samples, None) == {"a": (71, 10, 79, 20)}


def test_split_seed_keeps_the_split_while_the_training_seed_changes(ham_dir):
    # two runs that differ only by their random training draws must share the split (and so the test lesions)
    from dermscreen.manifests import load_labels
    from dermscreen.training.fit import make_split

    data = load_labels(ham_dir / "HAM10000_metadata.csv")
    base = make_split(data, TrainConfig(seed=0))
    assert make_split(data, TrainConfig(seed=1, split_seed=0)) == base
    assert make_split(data, TrainConfig(seed=1)) != base  # without it, a new seed is a new split


def test_resume_compares_the_split_used_and_allows_a_new_name(tmp_path):
    # an ensemble resumes ordinary run folders as its members: their saved split_seed may be None (= seed) and
    # their name differs; a different split or learning rate must still be refused
    from dermscreen.training.config import dump_config
    from dermscreen.training.ensemble import member_config
    from dermscreen.training.runlog import RunFolder

    run = RunFolder(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    dump_config(TrainConfig(name="old", seed=0), run.config_yaml)
    member = member_config(TrainConfig(name="new", seed=0, ensemble_seeds=[0, 1]), 0)
    assert member.split_seed == 0 and member.name == "new-seed0" and member.ensemble_seeds == []
    assert run.resumed_config(member) is member
    with pytest.raises(ConfigError, match="split_seed"):
        run.resumed_config(member.model_copy(update={"split_seed": 1}))
    with pytest.raises(ConfigError, match="lr"):
        run.resumed_config(member.model_copy(update={"lr": 0.1}))


def test_ensemble_config_needs_two_distinct_seeds_and_no_metadata():
    with pytest.raises(ConfigError, match="two different seeds"):
        load_config(None, ensemble_seeds=[3, 3])
    with pytest.raises(ConfigError, match="metadata_fusion"):
        load_config(None, ensemble_seeds=[0, 1], metadata_fusion=True)
    assert load_config(None, ensemble_seeds=[0, 1]).ensemble_seeds == [0, 1]


def test_ensemble_of_members_that_share_nothing_still_averages_their_logits():
    import torch

    from dermscreen.training.model import EnsembleClassifier, build_model

    config = TrainConfig(freeze_stages=0, image_size=64)
    torch.manual_seed(0)
    members = [build_model(config, 7, weights="none")[0].eval() for _ in range(2)]  # different random weights
    ensemble = EnsembleClassifier(members, shared_stages=2)
    assert ensemble.shared_stages == 0  # their stems differ, so nothing is shared
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, embedding, features = ensemble(x)
        outs = [m(x) for m in members]
    assert torch.allclose(logits, (outs[0][0] + outs[1][0]) / 2, atol=1e-5)
    assert embedding.shape == (2, 2 * members[0].classifier.in_features) and features.shape[1] == embedding.shape[1]


# ---------------------------------------------------------------------------------------- QA pass 2
def test_one_class_is_refused_and_missing_classes_and_lesion_ids_are_warned_about(tmp_path, synthetic_set):
    from dermscreen.training.fit import data_warnings, make_split

    only_nv = synthetic_set.subset([i for i, s in enumerate(synthetic_set.samples) if s.dx == "nv"])
    with pytest.raises(ConfigError, match=r"images of 1 class\(es\) \(nv\).*at least two"):
        make_split(only_nv, TrainConfig())
    config = TrainConfig(val_fraction=0.25, test_fraction=0.25, seed=0)
    split = make_split(synthetic_set, config)
    train = synthetic_set.subset(split["train"])
    warnings = data_warnings(synthetic_set, split, train)
    # the set has lesion ids: no split-by-image warning; the taxonomy's other 4 classes have no images at all
    assert not any("lesion_id" in w for w in warnings)
    assert any(w.startswith("no training images of class(es) akiec, bcc, df, vasc") for w in warnings)
    assert any(w.startswith("no validation images of class(es) akiec, bcc, df, vasc") for w in warnings)
    # a class whose only images are held out is named
    no_mel_train = train.subset([i for i, s in enumerate(train.samples) if s.dx != "mel"])
    assert any("class(es) akiec, bcc, df, mel, vasc" in w for w in data_warnings(synthetic_set, split, no_mel_train))
    # without lesion or patient ids the split is by image: say so
    (tmp_path / "nolesion.csv").write_text("image,dx\n" + "".join(f"img{i}.png,{['nv', 'mel', 'bkl'][i % 3]}\n"
                                                                 for i in range(12)))
    plain = load_labels(tmp_path / "nolesion.csv")
    warnings = data_warnings(plain, split, plain.subset(split["train"]))
    assert any("no lesion_id or patient_id column, so the split is made by image" in w and "optimistic" in w
               for w in warnings)


def test_run_config_paths_are_absolute_and_a_resume_compares_resolved_paths(tmp_path, monkeypatch):
    from dermscreen.training.config import dump_config
    from dermscreen.training.runlog import RunFolder

    (tmp_path / "d").mkdir()
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tax.yaml").write_text("name: t\nclasses: [{code: a, name: A, group: benign}, "
                                               "{code: b, name: B, group: malignant}]\n")
    (tmp_path / "cfg" / "c.yaml").write_text("taxonomy: tax.yaml\nimages: d/images\n"
                                             "extra_train: [{data: d/more.csv}]\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("cfg/c.yaml", data="d/x.csv")
    assert config.data == str(tmp_path / "d" / "x.csv") and config.images == str(tmp_path / "d" / "images")
    assert config.taxonomy == str(tmp_path / "cfg" / "tax.yaml")
    assert config.extra_train[0].data == str(tmp_path / "d" / "more.csv")
    run = RunFolder(tmp_path / "run")
    (run.root / "checkpoints").mkdir(parents=True)
    run.last_pt.write_bytes(b"")
    dump_config(config, run.config_yaml)
    assert yaml.safe_load(run.config_yaml.read_text())["data"] == str(tmp_path / "d" / "x.csv")
    # from another folder: the saved paths still name the same files, and --data ABS is the same run
    monkeypatch.chdir(tmp_path / "d")
    saved = load_config(run.config_yaml)
    assert saved.data == config.data and saved.taxonomy == config.taxonomy
    assert run.resumed_config(load_config(run.config_yaml, data=str(tmp_path / "d" / "x.csv"))).data == config.data
    assert run.resumed_config(load_config(run.config_yaml, data="x.csv")).data == config.data
    with pytest.raises(ConfigError, match="differs .* in data"):
        run.resumed_config(load_config(run.config_yaml, data="y.csv"))
    # an older run folder with relative paths still resumes from the folder it was started in
    monkeypatch.chdir(tmp_path)
    run.config_yaml.write_text(run.config_yaml.read_text().replace(str(tmp_path) + "/", ""))
    assert yaml.safe_load(run.config_yaml.read_text())["data"] == "d/x.csv"
    assert run.resumed_config(load_config(run.config_yaml, data=str(tmp_path / "d" / "x.csv"))).data == config.data


def test_config_folder_and_bad_command_line_values_are_sentences_that_blame_the_right_source(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match="is a folder: give a recipe YAML file"):
        load_config(tmp_path / "adir")
    (tmp_path / "ok.yaml").write_text("epochs: 1\n")
    with pytest.raises(ConfigError, match=r"^A command-line option is invalid: epochs \(--epochs on the command "
                                          r"line\): Input should be greater than or equal to 1") as err:
        load_config(tmp_path / "ok.yaml", epochs=0)
    assert "ok.yaml" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^Command-line options are invalid: .*--max-images.*--threads"):
        load_config(tmp_path / "ok.yaml", max_images=5, threads=0)
    (tmp_path / "bad.yaml").write_text("lr: -1\n")
    with pytest.raises(ConfigError, match=r"Config file .*bad.yaml is invalid: lr: .*; epochs \(--epochs on the "
                                          r"command line\)|Config file .*bad.yaml is invalid: epochs \(--epochs"):
        load_config(tmp_path / "bad.yaml", epochs=0)


def test_read_split_accepts_ids_an_older_run_wrote_with_their_extension(tmp_path, synthetic_set):
    from dermscreen.training.fit import read_split

    (tmp_path / "split.csv").write_text("image_id,split\nimg0.png,train\nimg1,val\n")
    split = read_split(synthetic_set, tmp_path / "split.csv")
    assert split == {"train": [0], "val": [1], "test": []}


def test_an_unreadable_image_stops_training_before_the_run_folder_and_the_first_epoch(tmp_path, synthetic_set):
    from dermscreen.errors import ManifestError
    from dermscreen.training.fit import check_images, train

    check_images(synthetic_set.samples)  # readable images pass
    (tmp_path / "img3.png").write_text("not an image")
    (tmp_path / "img5.png").write_bytes(b"")
    config = TrainConfig(data=str(tmp_path / "labels.csv"), val_fraction=0.25, test_fraction=0.25, device="cpu",
                         weights="none", epochs=1, num_workers=0)
    with pytest.raises(ManifestError, match=r"2 of the 12 training-run images cannot be opened as images: "
                                            r".*img3.png \(UnidentifiedImageError\); .*img5.png.*labels.csv"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_image_stops_training_before_the_first_epoch(tmp_path, monkeypatch, fmt):
    # its header reads fine: only decoding its pixels finds the missing end
    import dermscreen.training.fit as fit
    from dermscreen.errors import ManifestError

    rng = np.random.default_rng(0)
    ext = fmt.lower().replace("jpeg", "jpg")
    rows = ["image,dx,lesion_id"]
    for i in range(12):
        # smooth gradients plus noise: a JPEG with most of its bytes in the compressed data
        arr = (np.linspace(0, 255, 96)[None, :, None] + rng.integers(0, 60, (72, 96, 3))).clip(0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(tmp_path / f"img{i}.{ext}", fmt)
        rows.append(f"img{i}.{ext},{['nv', 'mel', 'bkl'][i % 3]},L{i // 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    whole = (tmp_path / f"img4.{ext}").read_bytes()
    (tmp_path / f"img4.{ext}").write_bytes(whole[: len(whole) * 2 // 3])
    with Image.open(tmp_path / f"img4.{ext}") as image:
        assert image.size == (96, 72)  # the header check alone passed it
    monkeypatch.setattr(fit, "train_epoch", lambda *a, **k: pytest.fail("an epoch started"))
    config = TrainConfig(data=str(tmp_path / "labels.csv"), val_fraction=0.25, test_fraction=0.25, device="cpu",
                         weights="none", epochs=1, num_workers=0, image_size=32)
    with pytest.raises(ManifestError, match=rf"1 of the 12 training-run images cannot be opened as images: "
                                            rf"\S*img4.{ext} \(OSError: image file is truncated"):
        fit.train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.data
def test_model_card_names_the_size_of_every_image_source_it_trained_on(ham_dir, ham224_dir):
    from dermscreen.manifests import load_labels
    from dermscreen.training.finish import _source_resolution

    sharp = load_labels(ham224_dir / "HAM10000_metadata.csv").samples[:3]
    whole = load_labels(ham_dir / "HAM10000_metadata.csv").samples[:3]
    assert _source_resolution(sharp) == "224x224 px"
    assert _source_resolution([*sharp, *whole]) == "224x224 px and 200x150 px"  # main data + extra_train
