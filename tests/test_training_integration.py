"""End-to-end training runs on real and synthetic images: train → calibrate → export → reload → run.

Each run is tiny (tens to ~200 images, 64-96 px, one or two epochs) so all of them together take a
few minutes on a 2-core CPU; they prove the pipeline works, not that the model is good.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from dermscreen.bundle import Bundle  # noqa: E402
from dermscreen.errors import BundleError  # noqa: E402
from dermscreen.manifests import load_labels  # noqa: E402
from dermscreen.preprocess import preprocess  # noqa: E402
from dermscreen.taxonomy import load_taxonomy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
pytestmark = pytest.mark.slow


def _write_config(path: Path, **settings) -> Path:
    import yaml

    base = dict(image_size=64, epochs=1, batch_size=16, freeze_stages=3, num_workers=0, threads=1,
                val_fraction=0.3, test_fraction=0.1, onnx_exporter="torchscript", warmup_epochs=0.2)
    base.update(settings)
    path.write_text(yaml.safe_dump(base))
    return path


def _torch_model_from_run(run: Path, num_classes: int, meta_dim: int = 0):
    from dermscreen.training.config import load_config
    from dermscreen.training.model import build_model

    model, _ = build_model(load_config(run / "config.yaml"), num_classes, meta_dim, weights="none")
    model.load_state_dict(torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"])
    return model.eval()


def _read_split(run: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    with open(run / "split.csv", newline="") as f:
        for row in csv.DictReader(f):
            out[row["split"]].add(row["image_id"])
    return out


# ------------------------------------------------------------------------ (a) real data, 1 epoch
@pytest.fixture(scope="module")
def tiny_run(ham_dir, tmp_path_factory) -> Path:
    """One epoch of configs/tiny.yaml (~200 real HAM10000 images, 96 px) through the CLI; the run folder."""
    from typer.testing import CliRunner

    from dermscreen.cli import app

    run = tmp_path_factory.mktemp("tiny") / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(CONFIGS / "tiny.yaml"),
                                      "--data", str(ham_dir / "HAM10000_metadata.csv"), "--out", str(run)])
    assert result.exit_code == 0, result.output
    return run


@pytest.mark.data
def test_tiny_run_writes_its_files_and_a_lesion_grouped_split(tiny_run, ham_dir):
    for name in ("config.yaml", "train.log", "split.csv", "history.csv", "learning_curves.png",
                 "checkpoints/last.pt", "checkpoints/best.pt", "bundle/model.onnx"):
        assert (tiny_run / name).is_file(), name
    data = load_labels(ham_dir / "HAM10000_metadata.csv")
    lesion = {s.image_id: s.lesion_id for s in data.samples}
    split = _read_split(tiny_run)
    assert 150 <= sum(map(len, split.values())) <= 250
    by_split = {k: {lesion[i] for i in v} for k, v in split.items()}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    assert not (by_split["val"] & by_split["test"])


@pytest.mark.data
def test_tiny_run_bundle_manifest_is_complete(tiny_run):
    bundle = Bundle.load(tiny_run / "bundle")  # verifies every hash
    m = bundle.manifest
    assert m.taxonomy.codes == load_taxonomy("ham10000").codes and m.model.backbone == "tf_efficientnet_lite0"
    assert m.preprocessing.image_size == 96 and m.preprocessing.mean == (0.5, 0.5, 0.5)
    assert {p.name for p in m.operating_points} == {"sensitivity_first", "balanced"}
    assert m.operating_points[0].sensitivity >= 0.95
    assert m.ood is not None and 0.9 <= m.ood.validation_kept <= 1.0
    # the colour check is fitted beside the embedding one; together they keep most validation images
    assert m.ood.colour_threshold is not None and 0.9 <= m.ood.colour_validation_kept <= 1.0
    assert m.ood.validation_kept_both <= min(m.ood.validation_kept, m.ood.colour_validation_kept)
    assert bundle.arrays["ood_colour_precision"].shape == (8, 8)
    assert m.calibration.temperature > 0 and m.calibration.ece_after is not None
    assert 0 <= m.metrics["balanced_accuracy"] <= 1 and "malignant_auc" in m.metrics
    assert "non-commercial" in m.card.licence and any("V-VI" in x for x in m.card.limitations)
    assert m.training["data"]["images"] == sum(map(len, _read_split(tiny_run).values()))
    assert m.training["seed"] == 0 and m.training["wall_time_s"] > 0
    assert bundle.arrays["classifier_weight"].shape == (7, 1280)


@pytest.mark.data
def test_tiny_run_onnx_matches_torch_on_held_out_real_images(tiny_run, ham_dir):
    bundle = Bundle.load(tiny_run / "bundle")
    test_ids = sorted(_read_split(tiny_run)["test"])[:6]
    images = np.stack([preprocess(Image.open(ham_dir / "images" / f"{i}.jpg"), bundle.manifest.preprocessing)
                       for i in test_ids])
    got = bundle.run(images)
    with torch.no_grad():
        want = [t.numpy() for t in _torch_model_from_run(tiny_run, 7)(torch.from_numpy(images))]
    for name, ref in zip(["logits", "embedding", "features"], want):
        assert got[name].shape == ref.shape
        assert np.abs(got[name] - ref).max() <= 1e-4, name
    # the CAM contract: logits = spatial mean of classifier weights · feature map + bias
    w, b = bundle.arrays["classifier_weight"], bundle.arrays["classifier_bias"]
    cam_logits = np.einsum("cd,ndhw->nc", w, got["features"]) / np.prod(got["features"].shape[2:]) + b
    np.testing.assert_allclose(cam_logits, got["logits"], atol=1e-4)


@pytest.mark.data
def test_tiny_run_bundle_refuses_tampering_and_evaluates_on_the_test_split(tiny_run, ham_dir, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_run / "bundle", tampered)
    raw = bytearray((tampered / "arrays.npz").read_bytes())
    raw[-100] ^= 0xFF
    (tampered / "arrays.npz").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.load(tampered)

    # the evaluation command (core path, no torch) reads the bundle and the held-out split
    from dermscreen.evaluation.evaluate import evaluate

    ev = evaluate(tiny_run / "bundle", ham_dir / "HAM10000_metadata.csv", None, tmp_path / "eval",
                  split_file=tiny_run / "split.csv", split="test", bootstrap=20)
    assert ev.metrics["data"]["images"] == len(_read_split(tiny_run)["test"])

    # without split.csv the same images are chosen: the split is remade from the rule and hash the manifest records
    # (tiny.yaml subsamples with max_images, so the subsample is remade too)
    rule = Bundle.load(tiny_run / "bundle").manifest.training["split"]
    assert rule["max_images"] and len(rule["sha256"]) == 64
    remade = evaluate(tiny_run / "bundle", ham_dir / "HAM10000_metadata.csv", None, tmp_path / "eval2",
                      split="test", bootstrap=20)
    assert remade.metrics["data"]["split"]["remade"] is True
    with open(ev.files["predictions"], newline="") as a, open(remade.files["predictions"], newline="") as b:
        assert a.read() == b.read()


# ------------------------------------------------------------------------ (b) user taxonomies
@pytest.mark.data
def test_three_class_taxonomy_on_relabelled_real_images_with_metadata_and_resume(ham_dir, tmp_path):
    from dermscreen.metadata import MetadataSpec
    from dermscreen.training.fit import train_from_files

    rows = []
    with open(ham_dir / "HAM10000_metadata.csv", newline="") as f:
        per_class: dict[str, int] = {}
        for r in csv.DictReader(f):
            if r["dx"] in ("mel", "nv", "bkl") and per_class.get(r["dx"], 0) < 20:
                per_class[r["dx"]] = per_class.get(r["dx"], 0) + 1
                rows.append([str(ham_dir / "images" / f"{r['image_id']}.jpg"), r["dx"], r["lesion_id"],
                             r["age"], r["sex"], r["localization"]])
    labels = tmp_path / "three.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["image", "dx", "lesion_id", "age", "sex", "site"], *rows])
    config = _write_config(tmp_path / "c.yaml", taxonomy=str(CONFIGS / "taxonomies" / "three_class.yaml"),
                           metadata_fusion=True, data=str(labels))
    run = tmp_path / "run"
    first = train_from_files(config, run, progress=False)
    assert first.epochs_run == 1
    resumed = train_from_files(config, run, resume=True, progress=False, epochs=2)
    assert resumed.epochs_run == 2
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "history.csv"))] == [1, 2]

    bundle = Bundle.load(resumed.bundle_dir)
    m = bundle.manifest
    assert m.taxonomy.codes == ["mel", "nv", "bkl"] and m.model.inputs == ["image", "metadata"]
    assert [p.name for p in m.operating_points] == ["sensitivity_first", "balanced"]
    x = np.zeros((2, 3, 64, 64), np.float32)
    meta = np.stack([MetadataSpec().encode(45, "female", "back"), MetadataSpec().encode(80, "male", "face")])
    out = bundle.run(x, meta)
    assert out["logits"].shape == (2, 3)
    assert not np.allclose(out["logits"][0], out["logits"][1])  # the metadata reaches the logits

    from typer.testing import CliRunner

    from dermscreen.cli import app

    again = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert np.array_equal(Bundle.load(tmp_path / "again").arrays["classifier_weight"],
                          bundle.arrays["classifier_weight"])


def test_ensemble_recipe_trains_each_seed_and_exports_their_average(ham_dir, tmp_path):
    # ensemble_seeds: one ordinary run folder per member on one split, then one bundle whose logits are the
    # members' average (plus the prior correction) and whose embedding is their embeddings side by side
    from dermscreen.training.fit import train_from_files

    config = _write_config(tmp_path / "c.yaml", data=str(ham_dir / "HAM10000_metadata.csv"), max_images=60,
                           freeze_stages=2, ensemble_seeds=[0, 1])
    run = tmp_path / "run"
    result = train_from_files(config, run, progress=False)
    members = [run / "member-seed0", run / "member-seed1"]
    assert all((m / "checkpoints" / "best.pt").is_file() for m in members)
    assert (members[0] / "split.csv").read_bytes() == (members[1] / "split.csv").read_bytes() \
        == (run / "split.csv").read_bytes()
    bundle = Bundle.load(result.bundle_dir)
    m = bundle.manifest
    assert m.model.members == 2 and m.model.embedding_dim == 2 * 1280
    assert [r["seed"] for r in m.training["ensemble"]["members"]] == [0, 1]
    assert m.training["ensemble"]["shared_stages"] == 2 and m.training["epochs_run"] == 2
    assert m.training["backbone_weights"].startswith("ImageNet")  # what the members were fine-tuned from

    test_ids = _read_split(run)["test"]
    paths = [ham_dir / "images" / f"{i}.jpg" for i in sorted(test_ids)[:3]]
    x = np.stack([preprocess(Image.open(p).convert("RGB"), bundle.manifest.preprocessing) for p in paths])
    out = bundle.run(x)
    torch_out = [_torch_model_from_run(f, 7)(torch.from_numpy(x)) for f in members]
    with torch.no_grad():
        mean_logits = sum(o[0] for o in torch_out).numpy() / 2
        embedding = torch.cat([o[1] for o in torch_out], dim=1).numpy()
    shift = np.asarray(m.training["prior_correction"]["bias_shift"], np.float32)
    assert np.allclose(out["logits"], mean_logits + shift, atol=1e-4)
    assert np.allclose(out["embedding"], embedding, atol=1e-4)

    # resuming finds both members finished: no new epoch, the same ensemble again
    again = train_from_files(config, run, resume=True, progress=False)
    assert [int(r["epoch"]) for r in csv.DictReader(open(members[1] / "history.csv"))] == [1]
    assert np.allclose(Bundle.load(again.bundle_dir).run(x)["logits"], out["logits"], atol=1e-5)


def test_recipe_sweep_scores_a_variant_as_the_exported_pipeline_does(ham_dir, tmp_path):
    # benchmarks/sweep_recipes.py produced the model card's recipe study: its validation numbers must be the ones
    # the pipeline itself (join, prior correction, calibration: finish_ensemble) gives the same checkpoints, and
    # what it keeps must be a run folder that `dermscreen export` finishes
    import tarfile

    from dermscreen.training.reexport import export_run

    base = _write_config(tmp_path / "base.yaml", max_images=120, freeze_stages=2)
    study = tmp_path / "study.yaml"
    # a fixed prior correction: each member and the ensemble shift their bias, so scoring the members must not
    # leave their shifts in the ensemble (the flaw the first study had)
    study.write_text("pair: {overrides: {lr: 0.003, prior_correction: 1.0}, seeds: [0, 1]}\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sweep_recipes.py"), "--sweep", str(study),
                           "--config", str(base), "--data", str(ham_dir / "HAM10000_metadata.csv"),
                           "--out", str(out), "--runs", str(tmp_path / "runs"), "--device", "cpu", "--workers", "0",
                           "--keep-best"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((out / "sweep.jsonl").read_text().splitlines()[0])
    assert record["name"] == "pair" and [m["seed"] for m in record["members"]] == [0, 1]
    swept = record["ensemble"]

    kept = tmp_path / "kept"
    with tarfile.open(out / "pair-run.tar") as tar:
        tar.extractall(kept, filter="data")
    for seed in (0, 1):
        shutil.copyfile(out / f"pair-member-seed{seed}-best.pt",
                        kept / "pair" / f"member-seed{seed}" / "checkpoints" / "best.pt")
    manifest = Bundle.load(export_run(kept / "pair")).manifest
    assert manifest.model.members == 2
    assert manifest.training["prior_correction"]["tau"] == swept["tau"]
    assert manifest.calibration.temperature == pytest.approx(swept["temperature"], rel=1e-4)
    for key in ("balanced_accuracy", "nll", "malignant_auc"):
        assert manifest.metrics[key] == pytest.approx(swept[key], abs=1e-5), key


def _blob_image(rng, size: int, centre: tuple[int, int], radius: int, colour, skin_noise: float,
                blob_noise: float) -> Image.Image:
    """A noisy skin-coloured square with a noisy round blob of ``colour`` (radius in pixels) at ``centre`` (y, x)."""
    yy, xx = np.mgrid[:size, :size]
    blob = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2
    img = np.full((size, size, 3), (225, 190, 170), np.float64) + rng.normal(0, skin_noise, (size, size, 3))
    img[blob] = np.asarray(colour) + rng.normal(0, blob_noise, (int(blob.sum()), 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _labels_csv(folder: Path, rows: list[list[str]]) -> Path:
    """A plain image,dx labels CSV of ``rows`` in ``folder``."""
    with open(folder / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "dx"], *rows])
    return folder / "labels.csv"


def _synthetic_eleven_class(folder: Path, per_class: int = 5) -> Path:
    """Images whose colour and blob size depend on the class, in a plain CSV over the 11-class taxonomy."""
    codes = load_taxonomy(CONFIGS / "taxonomies" / "eleven_class.yaml").codes
    rng = np.random.default_rng(0)
    rows = []
    for c, code in enumerate(codes):
        colour = np.array([40 + 20 * c, 200 - 15 * c, 90 + (37 * c) % 120])
        for k in range(per_class):
            radius = 10 + 2 * c + rng.integers(-2, 3)
            centre = (40 + rng.integers(-6, 7), 40)
            _blob_image(rng, 80, centre, radius, colour, 8, 8).save(folder / f"{code}_{k}.png")
            rows.append([f"{code}_{k}.png", code])
    return _labels_csv(folder, rows)


def test_eleven_class_taxonomy_on_synthetic_images(tmp_path):
    from dermscreen.training.fit import train_from_files

    (tmp_path / "data").mkdir()
    labels = _synthetic_eleven_class(tmp_path / "data")
    config = _write_config(tmp_path / "c.yaml", taxonomy=str(CONFIGS / "taxonomies" / "eleven_class.yaml"),
                           val_fraction=0.4, test_fraction=0.0)
    result = train_from_files(config, tmp_path / "run", progress=False, data=str(labels))
    bundle = Bundle.load(result.bundle_dir)
    assert bundle.manifest.taxonomy.num_classes == 11
    assert bundle.arrays["classifier_weight"].shape == (11, 1280)
    assert bundle.run(np.zeros((3, 3, 64, 64), np.float32))["logits"].shape == (3, 11)
    assert "Inherits the licence" in bundle.manifest.card.licence  # not HAM10000: no NC claim invented


def test_own_data_with_ham10000_as_extra_train_inherits_its_licence(tmp_path):
    """configs/default*.yaml add HAM10000 as extra_train: a model trained with them on one's own plain CSV
    inherits HAM10000's non-commercial licence too (the card must not call its licence unknown)."""
    from dermscreen.training.export import HAM_CITATION
    from dermscreen.training.fit import train_from_files

    (tmp_path / "own").mkdir()
    labels = _two_kinds(tmp_path / "own", per_class=12)
    ham = tmp_path / "ham"
    (ham / "images").mkdir(parents=True)
    rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    for k, dx in enumerate(["nv", "mel"] * 3):  # a HAM10000-format manifest (synthetic images)
        Image.open(tmp_path / "own" / f"{dx}_{k}.png").convert("RGB").save(ham / "images" / f"ISIC_{k:07d}.jpg")
        rows.append(f"HAM_{k:07d},ISIC_{k:07d},{dx},histo,50.0,male,back")
    (ham / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
    config = _write_config(tmp_path / "c.yaml", val_fraction=0.35, test_fraction=0.0,
                           extra_train=[{"data": str(ham / "HAM10000_metadata.csv")}])
    result = train_from_files(config, tmp_path / "run", progress=False, data=str(labels))
    card = Bundle.load(result.bundle_dir).manifest.card
    assert "CC BY-NC-SA 4.0" in card.licence and "non-commercial" in card.licence, card.licence
    assert "owner must state" in card.licence and card.citation == HAM_CITATION
    assert "6 more images" in card.training_data and "HAM10000 images (extra_train)" in card.training_data


def _two_kinds(folder: Path, per_class: int = 36) -> Path:
    """Naevi drawn as small light-brown round blobs, melanomas as large dark ones, in a plain CSV: a task any
    working training loop learns in a few epochs, and a broken one (no weight update, labels shuffled) cannot."""
    rng = np.random.default_rng(1)
    rows = []
    for dx, colour, radius in (("nv", (170, 120, 90), 9), ("mel", (55, 35, 40), 20)):
        for k in range(per_class):
            r = radius + rng.integers(-2, 3)
            cy, cx = 32 + rng.integers(-5, 6, 2)
            _blob_image(rng, 64, (cy, cx), r, colour, 10, 12).save(folder / f"{dx}_{k}.png")
            rows.append([f"{dx}_{k}.png", dx])
    return _labels_csv(folder, rows)


def test_training_learns_a_task_that_can_be_learned(tmp_path):
    """The other runs check files and shapes; this one checks that training improves the model: the training
    loss falls and the held-out images are ranked almost perfectly (chance: AUC 0.5)."""
    from typer.testing import CliRunner

    from dermscreen.cli import app

    (tmp_path / "data").mkdir()
    labels = _two_kinds(tmp_path / "data")
    config = _write_config(tmp_path / "c.yaml", epochs=4, lr=0.003, val_fraction=0.35, test_fraction=0.0,
                           warmup_epochs=0.0)
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--data", str(labels),
                                      "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "run" / "history.csv", newline="") as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    metrics = Bundle.load(tmp_path / "run" / "bundle").manifest.metrics  # validation: images it never trained on
    assert metrics["malignant_auc"] >= 0.95, metrics


# ------------------------------------------------------------------------ (c) torchrun, 2 processes
@pytest.mark.data
def test_torchrun_two_cpu_processes_train_and_export(ham_dir, tmp_path):
    config = _write_config(tmp_path / "c.yaml", max_images=80, device="cpu")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dermscreen.cli", "train", "--config", str(config), "--data", str(ham_dir / "HAM10000_metadata.csv"),
           "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "2 process(es)" in log
    bundle = Bundle.load(run / "bundle")
    assert bundle.manifest.training["processes"] == 2
    assert bundle.run(np.zeros((2, 3, 64, 64), np.float32))["logits"].shape == (2, 7)
    assert json.loads((run / "bundle" / "manifest.json").read_text())["files"]
