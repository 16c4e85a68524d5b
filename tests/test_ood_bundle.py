import json
import zipfile

import numpy as np
import pytest

from dermscreen.bundle import ARRAYS_FILE, MANIFEST, MODEL_FILE, Bundle
from dermscreen.errors import BundleError
from dermscreen.ood import MahalanobisOOD


def test_mahalanobis_separates_far_points():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 32))
    labels = rng.integers(0, 3, 3000)
    emb = centres[labels] + rng.normal(0, 1, (3000, 32))
    ood = MahalanobisOOD.fit(emb[:2000], labels[:2000], n_components=16)
    inside = ood.score(emb[2000:])
    outside = ood.score(rng.normal(0, 1, (500, 32)) * 6 + 20)
    threshold = np.quantile(inside, 0.95)
    assert (outside > threshold).mean() > 0.99
    again = MahalanobisOOD.from_arrays(ood.to_arrays())
    np.testing.assert_allclose(again.score(emb[:10]), ood.score(emb[:10]), rtol=1e-5)


def test_bundle_loads_runs_and_zips(tiny_bundle, tmp_path):
    b = Bundle.load(tiny_bundle)
    out = b.run(np.zeros((3, 3, 64, 64), np.float32))
    assert out["logits"].shape == (3, 7) and out["embedding"].shape == (3, 16)
    assert out["features"].shape[:2] == (3, 16)
    assert b.arrays["classifier_weight"].shape == (7, 16)
    # the classifier weights in arrays.npz are those the graph applies: logits = W·embedding + b
    np.testing.assert_allclose(out["embedding"] @ b.arrays["classifier_weight"].T + b.arrays["classifier_bias"],
                               out["logits"], atol=1e-5)
    zipped = Bundle.zip(tiny_bundle, tmp_path / "b.zip")
    z = Bundle.load(zipped)
    assert z.sha256 == b.sha256 and z.manifest == b.manifest


def test_bundle_with_metadata_defaults_to_unknown(tiny_bundle_meta):
    b = Bundle.load(tiny_bundle_meta)
    x = np.zeros((2, 3, 64, 64), np.float32)
    unknown = b.run(x)["logits"]
    known = b.run(x, metadata=np.stack([b.manifest.model.metadata.encode(60, "male", "back")] * 2))["logits"]
    assert not np.allclose(unknown, known)


@pytest.mark.parametrize("victim", [MODEL_FILE, ARRAYS_FILE])
def test_tampered_file_is_refused(tiny_bundle, tmp_path, victim):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{victim} does not match its sha256"):
        Bundle.load(copy)


def test_missing_and_unlisted_files_are_refused(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    (copy / ARRAYS_FILE).unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(copy)
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    manifest["files"] = {}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unverifiable"):
        Bundle.load(copy)


@pytest.mark.parametrize("edit, says", [
    (lambda m: m["calibration"].update(temperature=-3), "calibration.temperature: Input should be greater than 0"),
    (lambda m: m["operating_points"][0].update(threshold=5), "operating_points.0.threshold: Input should be less"),
    (lambda m: m["ood"].update(threshold=-1), "ood.threshold: Input should be greater than or equal to 0"),
])
def test_a_hand_edited_manifest_with_impossible_values_is_refused(tiny_bundle, tmp_path, edit, says):
    # the manifest holds the hashes, so it is not hashed itself: its values are checked instead (a negative
    # temperature used to load and invert every probability)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    edit(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not match the bundle schema") as refused:
        Bundle.load(copy)
    assert says in str(refused.value) and "pydantic.dev" not in str(refused.value)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        Bundle.load(tmp_path / "nothing")
    (tmp_path / "f.txt").write_text("hello")
    with pytest.raises(BundleError, match="neither a bundle folder nor a zip"):
        Bundle.load(tmp_path / "f.txt")
    with zipfile.ZipFile(tmp_path / "e.zip", "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(tmp_path / "e.zip")


# ---- bad output folders, custom taxonomies, damaged segmenter runs (QA pass 2) --------------------------------
def _two_class_data(folder, n=16):
    """A plain image,dx CSV of random PNGs in the classes malig/benign, and a split.csv for it."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    rows, split = ["image,dx"], ["image_id,split"]
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"im{k}.png")
        rows.append(f"im{k}.png,{('malig', 'benign')[k % 2]}")
        split.append(f"im{k},{('train', 'train', 'val', 'test')[k % 4]}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    (folder / "split.csv").write_text("\n".join(split) + "\n")
    return folder / "data.csv", folder / "split.csv"


def test_refit_ood_reads_the_data_with_the_bundles_own_taxonomy(tmp_path):
    from tinybundle import make_tiny_bundle

    from dermscreen.ood_fit import refit_ood
    from dermscreen.taxonomy import DiagnosisClass, Taxonomy

    two = Taxonomy(name="two", classes=[DiagnosisClass(code="malig", name="Malignant", group="malignant"),
                                        DiagnosisClass(code="benign", name="Benign", group="benign")])
    bundle = make_tiny_bundle(tmp_path / "b", taxonomy=two)
    data, split = _two_class_data(tmp_path / "d")
    out = refit_ood(bundle, data, split, tmp_path / "refit", threads=1)  # was: unknown diagnosis code 'benign'
    refit = Bundle.load(out)
    assert refit.manifest.taxonomy.codes == ["malig", "benign"] and refit.manifest.ood.colour_threshold > 0


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_bundle_write_and_refit_ood_refuse_an_unwritable_out(tiny_bundle, tmp_path, where):
    from dermscreen.errors import ConfigError
    from dermscreen.ood_fit import refit_ood

    afile = tmp_path / "afile"
    afile.write_text("hi")
    out = afile if where == "file" else afile / "bundle"
    source = Bundle.load(tiny_bundle)
    with pytest.raises(ConfigError, match="Cannot write to .* is a file"):
        Bundle.write(out, source.manifest, {n: source.file(n) for n in source.manifest.files})
    with pytest.raises(ConfigError, match="Cannot write to .* is a file"):  # before any image is read
        refit_ood(tiny_bundle, tmp_path / "no.csv", tmp_path / "no_split.csv", out)
    assert afile.read_text() == "hi"


def test_check_output_folder_leaves_no_folder_behind(tmp_path):
    from dermscreen.bundle import check_output_folder

    assert check_output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec_text,says", [("not json", "not valid JSON"),
                                            ('{"spec": {"backbone": 3}}', "spec is missing or malformed"),
                                            ('{"history": []}', "spec is missing or malformed")])
def test_add_segmenter_names_a_damaged_segmenter_json(tiny_bundle, tmp_path, spec_text, says):
    from typer.testing import CliRunner

    from dermscreen.cli import app

    run = tmp_path / "seg"
    run.mkdir()
    (run / "segmenter.onnx").write_bytes(b"x")
    (run / "segmenter.json").write_text(spec_text)
    result = CliRunner().invoke(app, ["add-segmenter", "--bundle", str(tiny_bundle), "--segmenter", str(run),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "segmenter.json is not a valid train-segmenter spec" in text and says in text
    assert not (tmp_path / "out").exists()


def test_add_segmenter_refuses_an_unwritable_out(tiny_bundle, tmp_path):
    from dermscreen.errors import ConfigError
    from dermscreen.lesion import add_segmenter

    (tmp_path / "afile").write_text("hi")
    with pytest.raises(ConfigError, match="is a file"):
        add_segmenter(tiny_bundle, tmp_path / "afile", b"x", None)


def test_derived_bundles_are_written_only_into_new_or_empty_folders(tiny_bundle, tmp_path):
    # a folder holding another bundle (its segmenter.onnx would stay behind, unlisted) or a user's images is refused
    from dermscreen.bundle import check_new_bundle_folder
    from dermscreen.errors import ConfigError
    from dermscreen.lesion import add_segmenter
    from dermscreen.ood_fit import refit_ood

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "segmenter.onnx").write_bytes(b"an older bundle's file")
    with pytest.raises(ConfigError, match="is not empty"):
        refit_ood(tiny_bundle, tmp_path / "data.csv", tmp_path / "split.csv", busy)
    with pytest.raises(ConfigError, match="is not empty"):
        add_segmenter(tiny_bundle, busy, b"", None)
    (tmp_path / "empty").mkdir()
    assert check_new_bundle_folder(tmp_path / "empty", tiny_bundle) == tmp_path / "empty"
    assert (busy / "segmenter.onnx").read_bytes() == b"an older bundle's file"
