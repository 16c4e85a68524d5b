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


def test_export_refuses_a_non_empty_out_before_any_work(tmp_path):
    # a bundle written over another would leave its segmenter.onnx behind, unlisted in the new manifest
    out = tmp_path / "defcopy"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "segmenter.onnx").write_bytes(b"old")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(out)])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"{out} is not empty; give a new or empty folder" in said and "Traceback" not in said
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "segmenter.onnx"]
    # a new or empty folder is accepted (here the run is what is missing)
    (tmp_path / "empty").mkdir()
    for empty in (out / "new", tmp_path / "empty"):
        result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(empty)])
        assert result.exit_code == 2 and "is not a training run folder" in result.output, result.output


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


def test_a_failed_ensemble_start_leaves_no_member_folders(tmp_path):
    csv_path = _plain_data(tmp_path / "d")
    recipe = _recipe(tmp_path / "r.yaml", backbone="not_a_model", ensemble_seeds="[0, 1]")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(recipe), "--data", str(csv_path), "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 2 and "Unknown backbone" in result.output, result.output
    assert not out.exists()  # no out/member-seed0 with config.yaml, split.csv, train.log, checkpoints/
    # a member that saved an epoch is kept (it can be resumed); the others and the user's files too
    (out / "member-seed0" / "checkpoints").mkdir(parents=True)
    (out / "member-seed0" / "checkpoints" / "last.pt").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    CliRunner().invoke(app, ["train", "--config", str(recipe), "--data", str(csv_path), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["member-seed0", "notes.txt"]
    assert sorted(p.name for p in (out / "member-seed0").iterdir()) == ["checkpoints"]


def test_a_run_whose_members_saved_epochs_keeps_its_files_when_it_fails_later(tmp_path):
    # e.g. the second member diverges, or the join fails: config.yaml, split.csv and train.log are what --resume
    # (and the user reading the log) need
    from dermscreen.training.commands import _remove_unstarted, _run_files

    out = tmp_path / "run"
    before = _run_files(out)
    for name in ("config.yaml", "split.csv", "train.log"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("written by this run")
    for member in ("member-seed0", "member-seed1"):
        (out / member / "checkpoints").mkdir(parents=True)
        (out / member / "checkpoints" / "last.pt").write_bytes(b"x")
    _remove_unstarted(out, before)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "member-seed0", "member-seed1", "split.csv",
                                                     "train.log"]


def test_recipe_paths_work_from_any_folder_and_a_missing_one_is_named_as_written(tmp_path, monkeypatch):
    from dermscreen.training.config import load_config
    from dermscreen.training.fit import load_data, training_data

    # labels beside the recipe, and extra_train as the shipped configs/*.yaml name it: ../shared/... relative to
    # the repository root, the recipe folder's parent
    repo = tmp_path / "repo"
    csv_path = _plain_data(repo / "configs" / "labels")
    more = _plain_data(tmp_path / "shared" / "more", codes=("bkl",), n_per_class=2)
    recipe = _recipe(repo / "configs" / "r.yaml", data="labels/data.csv",
                     extra_train="[{data: ../shared/more/data.csv}]")
    (tmp_path / "elsewhere").mkdir()
    for cwd in (tmp_path / "elsewhere", repo):
        monkeypatch.chdir(cwd)
        config = load_config(recipe)
        assert config.data == str(csv_path) and config.extra_train[0].data == str(more)
        data, taxonomy = load_data(config)
        assert len(data) == 24 and str(data.source) == str(csv_path)
        split = {"train": list(range(len(data))), "val": [], "test": []}
        assert len(training_data(data, split, config, taxonomy)) == 26
    # a path found nowhere: the error names it as the recipe wrote it and where it was looked for, before any run
    # folder is made (not /shared/nowhere.csv, the path made absolute against the current folder)
    _recipe(recipe, data="labels/data.csv", extra_train="[{data: ../shared/nowhere.csv}]", ensemble_seeds="[0, 1]")
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(recipe), "--out", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "extra_train[0].data '../shared/nowhere.csv'" in said, said
    assert f"the current folder {tmp_path / 'elsewhere'}" in said and f"the recipe's folder {repo / 'configs'}" in said
    assert f"the recipe folder's parent {repo}" in said and "Traceback" not in said
    assert not out.exists()


def test_under_torchrun_only_the_first_process_checks_the_run_folder(tmp_path, monkeypatch):
    # every torchrun process runs `dermscreen train`: two checking one folder made and removed it under each other
    # ("Cannot write to run: it is not writable (File exists)", a CI failure)
    import dermscreen.bundle

    def racing(folder):
        raise AssertionError("a second process checked the run folder")

    monkeypatch.setattr(dermscreen.bundle, "check_output_folder", racing)
    monkeypatch.setenv("RANK", "1")
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "none.csv" in result.output and "second process" not in result.output, \
        result.output


def test_add_segmenter_names_an_unknown_installed_model_in_a_sentence(tmp_path):
    from typer.testing import CliRunner

    from dermscreen.cli import app

    result = CliRunner().invoke(app, ["add-segmenter", "--bundle", "default-int9", "--segmenter", str(tmp_path),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert "models installed with dermscreen are named default, default-int8" in result.output
    assert not (tmp_path / "out").exists()
