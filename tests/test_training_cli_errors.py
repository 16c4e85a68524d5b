"""Model-building commands fail early, with a sentence and exit 2, on a bad --out, bad numbers or a bad recipe;
a fresh run starts a fresh log and leaves no half-started run folder; Ctrl-C says how to continue."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("torch")

from dermscreen.cli import app  # noqa: E402


def _plain_data(folder, n_per_class=12, codes=("nv", "mel")):
    """A plain image,dx CSV of tiny random PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["image,dx"]
    for code in codes:
        for k in range(n_per_class):
            name = f"{code}{k}.png"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
            rows.append(f"{name},{code}")
    csv_path = folder / "data.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def _recipe(path, **changes):
    lines = {"name": "t", "taxonomy": "ham10000", "backbone": "tf_efficientnet_lite0", "weights": "none",
             "image_size": 32, "epochs": 1, "batch_size": 8, "val_fraction": 0.25, "test_fraction": 0.15,
             "num_workers": 0, "threads": 1, "device": "cpu", **changes}
    path.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    return path


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_train_refuses_an_unwritable_out_before_any_work(tmp_path, where):
    afile = tmp_path / "afile"
    afile.write_text("hi")
    out = afile if where == "file" else afile / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "missing.yaml"), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Cannot write to" in result.output and "is a file" in result.output
    assert "Traceback" not in result.output and afile.read_text() == "hi"


def test_export_refuses_an_out_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("hi")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(afile)])
    assert result.exit_code == 2 and "Cannot write to" in result.output, result.output


@pytest.mark.parametrize("option,value,says", [("--epochs", "0", "--epochs"), ("--image-size", "0", "--image-size"),
                                               ("--batch-size", "0", "--batch-size"), ("--lr", "-1", "above 0"),
                                               ("--lr", "0", "above 0")])
def test_train_segmenter_checks_its_numbers(tmp_path, option, value, says):
    csv_path = _plain_data(tmp_path / "d", n_per_class=1)
    result = CliRunner().invoke(app, ["train-segmenter", "--data", str(csv_path), "--out", str(tmp_path / "seg"),
                                      option, value])
    assert result.exit_code == 2, result.output
    assert says in result.output and not (tmp_path / "seg").exists()


def test_train_segmenter_refuses_an_out_that_is_a_file(tmp_path):
    csv_path = _plain_data(tmp_path / "d", n_per_class=1)
    result = CliRunner().invoke(app, ["train-segmenter", "--data", str(csv_path), "--out", str(csv_path)])
    assert result.exit_code == 2 and "is a file" in result.output, result.output


@pytest.mark.parametrize("change,says", [({"backbone": "not_a_model"}, "Unknown backbone"),
                                         ({"weights": "/nonexistent/w.pth"}, "Weights file not found")])
def test_a_bad_backbone_or_weights_leaves_no_started_run(tmp_path, change, says):
    csv_path = _plain_data(tmp_path / "d")
    recipe = _recipe(tmp_path / "r.yaml", **change)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(recipe), "--data", str(csv_path), "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 2 and says in result.output, result.output
    assert not out.exists()  # no config.yaml, split.csv or train.log that look like a started run
    # a folder the user made is kept, with their own files in it
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    CliRunner().invoke(app, ["train", "--config", str(recipe), "--data", str(csv_path), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_fresh_run_starts_a_fresh_log_and_a_resumed_one_appends(tmp_path):
    from dermscreen.training.runlog import RunFolder, log

    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.log_file.write_text("2026 INFO command: an earlier run stopped before its first epoch\n")
    run.history_csv.write_text("epoch\n1\n")
    run.open(resume=False)
    log.info("the new run")
    run.close()
    text = run.log_file.read_text()
    assert "earlier run" not in text and "the new run" in text and text.count("command:") == 1
    assert not run.history_csv.exists()
    run.open(resume=True)
    run.close()
    assert run.log_file.read_text().count("command:") == 2
    logging.getLogger("dermscreen.training").propagate = True


@pytest.mark.parametrize("saved_epoch", [False, True])
def test_ctrl_c_during_train_says_how_to_continue(tmp_path, monkeypatch, saved_epoch):
    import dermscreen.training.fit as fit

    csv_path = _plain_data(tmp_path / "d", n_per_class=1)
    out = tmp_path / "run"

    def interrupted(cfg, out_dir, resume=False, progress=True):
        (out_dir / "checkpoints").mkdir(parents=True)
        (out_dir / "config.yaml").write_text("name: t\n")
        if saved_epoch:
            (out_dir / "checkpoints" / "last.pt").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(fit, "train", interrupted)
    result = CliRunner().invoke(app, ["train", "--config", str(_recipe(tmp_path / "r.yaml")), "--data",
                                      str(csv_path), "--out", str(out)])
    assert result.exit_code == 130, result.output
    if saved_epoch:
        assert f"dermscreen train --out {out} --resume" in result.output
        assert (out / "config.yaml").exists()
    else:
        assert "nothing to resume" in result.output and not out.exists()
