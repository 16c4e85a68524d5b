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
