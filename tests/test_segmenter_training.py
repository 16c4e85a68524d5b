"""The segmentation network: model, loss, ONNX export check, and a tiny real `dermscreen train-segmenter` run
whose bundle the Screener then uses."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dermscreen.bundle import SEGMENTER_FILE, Bundle, sha256_bytes  # noqa: E402
from dermscreen.errors import BundleError, ConfigError  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net():
    from dermscreen.training.backbones import create_backbone
    from dermscreen.training.segmenter import LesionSegmenterNet

    torch.manual_seed(0)
    return LesionSegmenterNet(create_backbone("tf_efficientnet_lite0", "none")[0]).eval()


def test_segmenter_net_gives_one_logit_per_pixel(net):
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 64, 64)
    decoder = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("backbone."))
    assert decoder < 400_000  # "light": a fraction of the 3.4 M encoder


def test_dice_bce_loss_rewards_overlap():
    from dermscreen.training.segmenter import dice_bce_loss, dice_iou

    target = torch.zeros(1, 1, 32, 32)
    target[..., 8:24, 8:24] = 1
    right = dice_bce_loss((target * 2 - 1) * 8, target)
    wrong = dice_bce_loss((1 - target * 2) * 8, target)
    assert right < 0.01 and wrong > 1.5
    a = np.zeros((10, 10), bool)
    a[:5] = True
    b = np.zeros((10, 10), bool)
    b[:, :5] = True
    assert dice_iou(a, b) == pytest.approx((0.5, 1 / 3))
    assert dice_iou(a & ~a, b & ~b) == (1.0, 1.0)


def test_onnx_export_matches_torch_and_a_different_model_is_refused(net):
    from dermscreen.training.segmenter import check_onnx, to_onnx

    images = np.random.default_rng(0).normal(0, 1, (2, 3, 64, 64)).astype(np.float32)
    onnx_bytes = to_onnx(net, 64)
    assert check_onnx(onnx_bytes, net, images) <= 1e-4
    with torch.no_grad():
        net.head.bias += 1.0  # the torch model moves; the exported graph does not
    try:
        with pytest.raises(BundleError, match="does not reproduce torch"):
            check_onnx(onnx_bytes, net, images)
    finally:
        with torch.no_grad():
            net.head.bias -= 1.0


@pytest.mark.slow
@pytest.mark.data
def test_train_segmenter_cli_tiny_run_into_a_bundle(ham_dir, tiny_bundle, tmp_path):
    from typer.testing import CliRunner

    from dermscreen.cli import app
    from dermscreen.screening import Screener, ScreenerSettings

    before = {p.name: sha256_bytes(p.read_bytes()) for p in tiny_bundle.iterdir()}
    out = tmp_path / "seg"
    result = CliRunner().invoke(app, [
        "train-segmenter", "--data", str(ham_dir / "HAM10000_metadata.csv"), "--out", str(out),
        "--bundle", str(tiny_bundle), "--max-images", "40", "--epochs", "1", "--image-size", "64",
        "--batch-size", "8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "Test Dice" in result.output
    bundle = Bundle.load(out / "bundle")  # verifies every hash
    assert bundle.has_segmenter
    assert bundle.manifest.files[SEGMENTER_FILE] == sha256_bytes((out / "bundle" / SEGMENTER_FILE).read_bytes())
    spec = bundle.manifest.segmenter
    assert spec.image_size == 64 and spec.mean == (0.5, 0.5, 0.5)  # EfficientNet-Lite's own normalisation
    assert {"test_dice", "test_dice_ci_low", "test_dice_ci_high", "test_iou", "test_n"} <= set(spec.validation)
    assert 0.0 <= spec.validation["test_dice_ci_low"] <= spec.validation["test_dice"] <= spec.validation["test_dice_ci_high"]
    history = json.loads((out / "segmenter.json").read_text())
    assert history["onnx_max_abs_diff"] <= 1e-4 and len(history["history"]) == 1
    # the classifier bundle it started from is untouched
    assert {p.name: sha256_bytes(p.read_bytes()) for p in tiny_bundle.iterdir()} == before
    image = (ham_dir / "images" / "ISIC_0024306.jpg").read_bytes()
    screened = Screener(out / "bundle", ScreenerSettings(ood_refusal=False)).analyze(image)
    assert screened.lesion is not None and screened.lesion.method == "segmenter"
    # adding a segmenter to a bundle that has one says which it replaces (and both test Dice values)
    swapped = CliRunner().invoke(app, ["add-segmenter", "--bundle", str(out / "bundle"), "--segmenter", str(out),
                                       "--out", str(tmp_path / "swapped")])
    assert swapped.exit_code == 0 and "replaces the bundle's segmenter (test Dice" in swapped.output, swapped.output
    refused = CliRunner().invoke(app, ["train-segmenter", "--data", str(ham_dir / "HAM10000_metadata.csv"),
                                       "--out", str(tmp_path / "x"), "--bundle", str(tmp_path / "missing")])
    assert refused.exit_code == 2 and "not found" in refused.output


def test_image_size_must_fit_the_encoder_stride(tmp_path):
    from dermscreen.training.segmenter import train_segmenter

    with pytest.raises(ConfigError, match="multiple of 16"):
        train_segmenter(tmp_path / "none.csv", tmp_path, image_size=100)


def test_zoom_out_places_the_image_small_with_its_mask_mirrored_alongside():
    import random

    from dermscreen.training.data import zoom_out

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mask = np.zeros((30, 40), np.uint8)
    mask[10:20, 5:15] = 255
    big, big_mask = zoom_out([image, mask], 3.0, random.Random(1))
    assert big.shape == (90, 120, 3) and big_mask.shape == (90, 120)
    # the photograph is in there once, unchanged, with its own mask at the same spot
    hits = [(y, x) for y in range(61) for x in range(81) if np.array_equal(big[y:y + 30, x:x + 40], image)]
    assert len(hits) == 1
    y, x = hits[0]
    assert np.array_equal(big_mask[y:y + 30, x:x + 40], mask)
    # the mirrored field around it carries the mirrored lesion too: image and labels stay consistent
    assert (big_mask > 0).sum() > (mask > 0).sum()
    if x > 0:  # the column left of the photograph mirrors its first column, in the image and in the mask
        assert np.array_equal(big[y:y + 30, x - 1], image[:, 0]) and np.array_equal(big_mask[y:y + 30, x - 1], mask[:, 0])
    assert x > 0 or y > 0


def test_zoom_out_probability_is_checked(tmp_path):
    from dermscreen.training.segmenter import train_segmenter

    with pytest.raises(ConfigError, match="zoom-out"):
        train_segmenter(tmp_path / "none.csv", tmp_path, image_size=96, zoom_out=1.5)


def _labelled_images(folder, codes, n_per_class=8):
    """A plain image,dx CSV of random PNGs with the given diagnosis codes (any codes: a custom taxonomy's)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rows = ["image,dx"]
    for code in codes:
        for k in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{code}{k}.png")
            rows.append(f"{code}{k}.png,{code}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder / "data.csv"


def test_labels_outside_ham10000_are_accepted_and_every_missing_mask_is_listed_before_training(tmp_path):
    from dermscreen.training.segmenter import train_segmenter

    csv_path = _labelled_images(tmp_path / "d", ("malig", "benign"))
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("malig0", "malig1", "benign0"):  # 13 of 16 masks are missing
        (masks / f"{name}_segmentation.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"13 mask\(s\) not found: .*and 8 more") as err:
        train_segmenter(csv_path, tmp_path / "seg", masks=masks, image_size=64, epochs=1)
    assert "unknown diagnosis" not in str(err.value) and not (tmp_path / "seg").exists()


def test_the_segmenter_split_of_ham10000_codes_is_unchanged(tmp_path):
    from dermscreen.manifests import load_labels
    from dermscreen.taxonomy import HAM10000
    from dermscreen.training.segmenter import _AnyCodes, _split

    csv_path = _labelled_images(tmp_path / "d", ("nv", "mel", "bkl"))
    ham = load_labels(csv_path)
    anyc = load_labels(csv_path, taxonomy=_AnyCodes(name="any", classes=list(HAM10000.classes)))
    assert anyc.labels == ham.labels
    assert {k: [s.image_id for s in v] for k, v in _split(anyc, None, 0).items()} == \
        {k: [s.image_id for s in v] for k, v in _split(ham, None, 0).items()}
    assert HAM10000.num_classes == 7  # the shared taxonomy is not extended


def test_out_holding_the_bundle_is_refused_before_training(tiny_bundle, tmp_path):
    import shutil

    from dermscreen.training.segmenter import train_segmenter

    shutil.copytree(tiny_bundle, tmp_path / "run" / "bundle")
    with pytest.raises(ConfigError, match="never modified in place"):
        train_segmenter(tmp_path / "none.csv", tmp_path / "run", bundle=tmp_path / "run" / "bundle", image_size=64)


def test_a_diverged_segmenter_is_not_exported(ham_dir, tmp_path, monkeypatch):
    # as the classifier's loop: a loss gone NaN stops training with a sentence instead of exporting a broken model
    from dermscreen.training import segmenter

    monkeypatch.setattr(segmenter, "dice_bce_loss", lambda logits, masks: logits.mean() * float("nan"))
    with pytest.raises(ConfigError, match="diverged"):
        segmenter.train_segmenter(ham_dir / "HAM10000_metadata.csv", tmp_path / "seg", max_images=24, epochs=1,
                                  image_size=64, batch_size=8, threads=1, weights="none")
    assert not (tmp_path / "seg" / SEGMENTER_FILE).exists()


@pytest.mark.parametrize("held", [SEGMENTER_FILE, "bundle"])
def test_an_out_holding_a_segmenter_run_is_refused_before_training(tmp_path, held):
    import re
    import shutil

    # a second run there would overwrite segmenter.onnx and leave the old bundle/ (with the old segmenter) behind
    from dermscreen.training.segmenter import train_segmenter

    csv_path = _labelled_images(tmp_path / "d", ("nv", "mel"))
    out = tmp_path / "seg"
    out.mkdir()
    if held == SEGMENTER_FILE:
        (out / held).write_bytes(b"old")
    else:
        (out / held).mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"{out} already holds a segmenter run ({held}); give a new")):
        train_segmenter(csv_path, out, image_size=64, epochs=1, weights="none")
    assert sorted(p.name for p in out.iterdir()) == [held]
    # a folder of other files (a new run folder the user made, with notes) is fine up to the masks check
    shutil.rmtree(out)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="mask"):
        train_segmenter(csv_path, out, image_size=64, epochs=1, weights="none")
