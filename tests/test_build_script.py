"""scripts/build-default-model.sh: the shipped model's whole pipeline as one command, run here in a small form
(the tiny recipe, a 1-epoch 64 px segmenter) on real images; a rerun keeps the finished steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "build-default-model.sh"


@pytest.mark.data
def test_one_command_builds_a_bundle_with_segmenter_and_ood_checks_and_evaluates_it(ham_dir, ham224_dir, tmp_path):
    from dermscreen.bundle import Bundle

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DERMSCREEN_BUILD_CONFIG": str(REPO / "configs" / "tiny.yaml"),
           "DERMSCREEN_BUILD_DATA": str(ham224_dir / "HAM10000_metadata.csv"),
           "DERMSCREEN_BUILD_EXTRA": str(ham_dir / "HAM10000_metadata.csv"),
           "DERMSCREEN_BUILD_TRAIN_ARGS": "--max-images 150",
           "DERMSCREEN_BUILD_SEGMENTER_ARGS": "--max-images 100 --epochs 1 --image-size 64 --threads 1 --num-workers 0",
           "DERMSCREEN_BUILD_BOOTSTRAP": "20"}
    # a relative OUT with a space is the caller's, and a run stopped before its first checkpoint (a split.csv, no
    # last.pt) starts again instead of failing to resume
    out = tmp_path / "build out"
    (out / "classifier").mkdir(parents=True)
    (out / ".build-default-model").touch()
    (out / "classifier" / "split.csv").write_text("image_id,split\n")
    done = subprocess.run(["bash", str(SCRIPT), "build out"], env=env, capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4/4 held-out test split" in done.stdout and "To ship it" in done.stdout
    m = Bundle.load(out / "bundle").manifest  # verified
    assert m.segmenter is not None and m.ood is not None and m.ood.colour_threshold is not None
    assert (out / "test" / "metrics.md").is_file() and not (out / "bundle-seg").exists()
    assert "images of split `test`" in (out / "test" / "metrics.md").read_text()
    held = json.loads((out / "held-out.json").read_text())  # the test results, keyed by the bundle they measured
    sha = Bundle.load(out / "bundle").sha256
    assert list(held) == [sha] and held[sha]["split"] == "test" and held[sha]["images"] > 0
    built = {p.name: p.stat().st_mtime_ns for p in (out / "bundle").iterdir()}

    again = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600)
    # (an absolute OUT this time: the same folder)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1/4" not in again.stdout and "2/4" not in again.stdout and "3/4" not in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "bundle").iterdir()} == built  # kept, not rebuilt


def test_missing_data_is_a_sentence(tmp_path):
    env = {**os.environ, "DERMSCREEN_BUILD_DATA": str(tmp_path / "nope.csv")}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "b")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "nope.csv not found" in done.stderr and not (tmp_path / "b").exists()


@pytest.mark.data
def test_a_folder_it_did_not_make_is_refused_untouched(tmp_path, ham_dir):
    theirs = tmp_path / "runs"
    (theirs / "bundle").mkdir(parents=True)
    (theirs / "bundle" / "manifest.json").write_text("{}")
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for out, words in ((theirs, "did not make"), (a_file, "is a file")):
        done = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True)
        assert done.returncode == 2 and words in done.stderr, done.stderr
    assert (theirs / "bundle" / "manifest.json").read_text() == "{}" and a_file.read_text() == "x"
    assert sorted(p.name for p in theirs.iterdir()) == ["bundle"]
