"""``dermscreen evaluate`` end to end: three manifest formats on real images, subsets, splits, bad input, no torch."""
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
import typer
from PIL import Image
from typer.testing import CliRunner

from dermscreen.evaluation.commands import evaluate
from dermscreen.manifests import ISIC_COLUMNS

REPO = Path(__file__).resolve().parents[1]
CODES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _app() -> typer.Typer:
    # a local app with just this command: the full cli imports every subsystem
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test wrapper."""

    app.command("evaluate")(evaluate)
    return app


def _run(*args: str | Path, env: dict | None = None):
    return CliRunner().invoke(_app(), ["evaluate", *map(str, args)], env=env)


def _ham_rows(ham_dir: Path, per_class: int = 7, extra_nv: int = 1) -> list[dict]:
    """50 HAM10000 metadata rows: the first ``per_class`` of each class in file order, plus extra nevi."""
    with (ham_dir / "HAM10000_metadata.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked = []
    for code in CODES:
        take = per_class + (extra_nv if code == "nv" else 0)
        picked += [r for r in rows if r["dx"] == code][:take]
    return picked


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _ham_csv(tmp: Path, rows: list[dict]) -> Path:
    header = list(rows[0])
    return _write_csv(tmp / "ham.csv", header, [[r[h] for h in header] for r in rows])


def _isic_csv(tmp: Path, rows: list[dict]) -> Path:
    return _write_csv(tmp / "isic.csv", ["image", *ISIC_COLUMNS],
                      [[r["image_id"], *[float(c.lower() == r["dx"]) for c in ISIC_COLUMNS]] for r in rows])


def _plain_csv(tmp: Path, rows: list[dict], images: Path, name: str = "plain.csv") -> Path:
    """Plain image,dx CSV whose image paths are relative to the CSV, as users write them."""
    rel = Path(os.path.relpath(images, tmp))
    return _write_csv(tmp / name, ["image", "dx", "lesion_id", "age", "sex", "site"],
                      [[str(rel / f"{r['image_id']}.jpg"), r["dx"], r["lesion_id"], r["age"], r["sex"],
                        r["localization"]] for r in rows])


def _read_predictions(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _assert_self_contained(html: str) -> None:
    lowered = html.lower()
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered
    assert 'src="http' not in lowered and "url(http" not in lowered
    assert lowered.count('src="data:image/png;base64,') == 3


@pytest.mark.data
def test_three_manifest_formats_evaluate_identically(tmp_path, ham_dir, tiny_bundle):
    rows = _ham_rows(ham_dir)
    images = ham_dir / "images"
    runs = {
        "ham": ["--labels", _ham_csv(tmp_path, rows), "--images", images],
        "isic": ["--labels", _isic_csv(tmp_path, rows), "--images", images],
        "plain": ["--labels", _plain_csv(tmp_path, rows, images)],
    }
    outputs = {}
    for name, args in runs.items():
        result = _run("--model", tiny_bundle, *args, "--out", tmp_path / name, "--bootstrap", 100)
        assert result.exit_code == 0, result.output
        outputs[name] = _read_predictions(tmp_path / name / "predictions.csv")
        assert {p.name for p in (tmp_path / name).iterdir()} == {
            "predictions.csv", "metrics.json", "metrics.md", "report.html", "confusion_matrix.png",
            "roc_curves.png", "reliability.png"}
    ham = outputs["ham"]
    assert len(ham) == 50 and [r["image"] for r in ham] == [r["image_id"] for r in rows]
    assert list(ham[0]) == ["image", "true_dx", *[f"p_{c}" for c in CODES], "p_malignant", "predicted_dx",
                            "ood_score", "in_distribution"]
    for other in ("isic", "plain"):
        assert [r["p_mel"] for r in outputs[other]] == [r["p_mel"] for r in ham]
        assert [r["true_dx"] for r in outputs[other]] == [r["dx"] for r in rows]
    probs = np.array([[float(r[f"p_{c}"]) for c in CODES] for r in ham])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    metrics = json.loads((tmp_path / "ham" / "metrics.json").read_text())
    assert metrics["classes_evaluated"] == CODES and metrics["classes_absent"] == []
    assert metrics["bootstrap"]["unit"] == "lesion"
    assert json.loads((tmp_path / "isic" / "metrics.json").read_text())["bootstrap"]["unit"] == "image"
    assert set(metrics["subgroups"]) == {"sex", "age_band", "site"}
    overall = metrics["overall"]
    assert overall["n"] == 50 and set(overall["per_class"]) == set(CODES)
    assert set(overall["operating_points"]) == {"sensitivity_first", "balanced"}
    assert 0.0 <= overall["headline"]["balanced_accuracy"]["value"] <= 1.0
    md = (tmp_path / "ham" / "metrics.md").read_text()
    assert f"bootstrap resamples by {metrics['bootstrap']['unit']}." in md
    bacc = overall["headline"]["balanced_accuracy"]
    assert f"| balanced_accuracy | {bacc['value']:.3f} ({bacc['ci95'][0]:.3f}–{bacc['ci95'][1]:.3f}) |" in md
    mel = overall["per_class"]["mel"]
    assert f"| mel | {mel['n']} | " in md and "| sensitivity_first | " in md and "| sex: " in md
    html = (tmp_path / "ham" / "report.html").read_text()
    _assert_self_contained(html)
    assert "tiny-test-model" in html and metrics["model"]["sha256"] in html and "not a diagnosis" in html


@pytest.mark.data
def test_subset_of_classes_and_split_file(tmp_path, ham_dir, tiny_bundle_meta):
    rows = [r for r in _ham_rows(ham_dir, per_class=10) if r["dx"] in ("nv", "mel", "bkl")]
    labels = _plain_csv(tmp_path, rows, ham_dir / "images")
    test_ids = [r["image_id"] for r in rows[::2]]
    split = _write_csv(tmp_path / "split.csv", ["image_id", "split"],
                       [[r["image_id"], "test" if r["image_id"] in test_ids else "train"] for r in rows])
    result = _run("--model", tiny_bundle_meta, "--labels", labels, "--split-file", split, "--split", "test",
                  "--out", tmp_path / "out", "--bootstrap", 50, "--tta")
    assert result.exit_code == 0, result.output
    assert "Evaluated on the classes present only: bkl, mel, nv" in result.output
    predictions = _read_predictions(tmp_path / "out" / "predictions.csv")
    assert [r["image"] for r in predictions] == test_ids
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["classes_evaluated"] == ["bkl", "mel", "nv"]
    assert metrics["classes_absent"] == ["akiec", "bcc", "df", "vasc"]
    assert metrics["data"]["split"] == {"file": str(split), "split": "test", "listed": len(test_ids),
                                        "evaluated": len(test_ids), "missing_from_labels": 0}
    assert metrics["settings"]["tta"].startswith("mean of logits")
    assert "Absent, not evaluated" in (tmp_path / "out" / "report.html").read_text()


def _synthetic_set(folder: Path, n: int = 28) -> Path:
    """n random PNG images over all seven classes, with a plain CSV beside them."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"s{i}.png")
        rows.append([f"s{i}.png", CODES[i % 7], f"L{i // 2}", 20 + 2 * i, "male" if i % 2 else "female", "back"])
    return _write_csv(folder / "labels.csv", ["image", "dx", "lesion_id", "age", "sex", "site"], rows)


def test_bad_rows_and_files_exit_nonzero_with_the_place_named(tmp_path, tiny_bundle):
    labels = _synthetic_set(tmp_path)
    bad = tmp_path / "bad.csv"
    lines = labels.read_text().splitlines()
    lines[2] = lines[2].replace(",bcc,", ",melanomaish,")
    bad.write_text("\n".join(lines) + "\n")
    result = _run("--model", tiny_bundle, "--labels", bad, "--out", tmp_path / "o1")
    assert result.exit_code != 0
    assert "bad.csv" in result.output and "row 3" in result.output and "melanomaish" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o1").exists()  # nothing written on failure

    wrong = _write_csv(tmp_path / "wrong.csv", ["file", "label"], [["s0.png", "nv"]])
    result = _run("--model", tiny_bundle, "--labels", wrong, "--out", tmp_path / "o2")
    assert result.exit_code != 0 and "Unrecognised manifest header" in result.output

    (tmp_path / "s5.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = _run("--model", tiny_bundle, "--labels", labels, "--out", tmp_path / "o3")
    assert result.exit_code != 0 and "s5.png" in result.output and "Traceback" not in result.output


def test_model_problems_are_clear_errors(tmp_path, tiny_bundle, monkeypatch):
    labels = _synthetic_set(tmp_path)
    result = _run("--model", tmp_path / "nope", "--labels", labels, "--out", tmp_path / "o")
    assert result.exit_code != 0 and "not found" in result.output

    tampered = shutil.copytree(tiny_bundle, tmp_path / "tampered")
    (tampered / "arrays.npz").write_bytes((tampered / "arrays.npz").read_bytes() + b"x")
    result = _run("--model", tampered, "--labels", labels, "--out", tmp_path / "o")
    assert result.exit_code != 0 and "sha256" in result.output

    import dermscreen.bundle

    monkeypatch.setattr(dermscreen.bundle, "DEFAULT_BUNDLE_DIR", tmp_path / "no-default")
    result = _run("--labels", labels, "--out", tmp_path / "o", env={"DERMSCREEN_MODEL": ""})
    assert result.exit_code != 0 and "--model" in result.output
    result = _run("--labels", labels, "--out", tmp_path / "o", "--bootstrap", 0,
                  env={"DERMSCREEN_MODEL": str(tiny_bundle)})
    assert result.exit_code == 0, result.output


def test_evaluation_path_never_imports_torch(tmp_path, tiny_bundle):
    labels = _synthetic_set(tmp_path)
    code = (
        "import sys, typer\n"
        "from typer.testing import CliRunner\n"
        "from dermscreen.evaluation.commands import evaluate\n"
        "app = typer.Typer()\n"
        "app.callback()(lambda: None)\n"
        "app.command('evaluate')(evaluate)\n"
        f"r = CliRunner().invoke(app, ['evaluate', '--model', {str(tiny_bundle)!r}, '--labels', {str(labels)!r},"
        f" '--out', {str(tmp_path / 'out')!r}, '--bootstrap', '20'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm'))\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "HEAVY []" in proc.stdout
    assert (tmp_path / "out" / "report.html").is_file()


def _split_csv(folder: Path, labels: Path) -> Path:
    """An image_id,split CSV over the synthetic set: every third image test, one in five val, the rest train."""
    with labels.open(newline="") as fh:
        ids = [Path(r["image"]).stem for r in csv.DictReader(fh)]
    parts = ["test" if i % 3 == 0 else "val" if i % 5 == 0 else "train" for i in range(len(ids))]
    return _write_csv(folder / "split.csv", ["image_id", "split"], list(zip(ids, parts)))


def test_split_without_split_file_is_refused_and_the_console_names_the_selection(tmp_path, tiny_bundle):
    labels = _synthetic_set(tmp_path)
    result = _run("--model", tiny_bundle, "--labels", labels, "--split", "test", "--out", tmp_path / "o1")
    assert result.exit_code == 2 and "--split-file" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o1").exists()

    result = _run("--model", tiny_bundle, "--labels", labels, "--out", tmp_path / "o2", "--bootstrap", 0)
    assert result.exit_code == 0, result.output
    assert f"all images of {labels}: 28 images." in " ".join(result.output.split())

    split = _split_csv(tmp_path, labels)
    result = _run("--model", tiny_bundle, "--labels", labels, "--split-file", split, "--out", tmp_path / "o3",
                  "--bootstrap", 0)  # --split-file alone: the test split
    assert result.exit_code == 0, result.output
    assert f"test split of {split}: 10 images." in " ".join(result.output.split())
    assert "not held-out" not in result.output
    assert json.loads((tmp_path / "o3" / "metrics.json").read_text())["warnings"] == []


def test_bad_out_is_refused_before_any_prediction(tmp_path, tiny_bundle, monkeypatch):
    import dermscreen.evaluation.evaluate as ev

    def no_prediction(*args, **kwargs):
        raise AssertionError("predicted before checking --out")

    monkeypatch.setattr(ev, "predict_samples", no_prediction)
    labels = _synthetic_set(tmp_path)
    (tmp_path / "afile").write_text("hi")
    for out, words in [(tmp_path / "afile", "it is a file"), (tmp_path / "afile" / "x", "is a file"),
                       ("/dev/null/x", "is a file"), ("/proc/dermscreen-eval", "not writable")]:
        result = _run("--model", tiny_bundle, "--labels", labels, "--out", out)
        assert result.exit_code == 2, (out, result.output)
        text = " ".join(result.output.split())
        assert f"Cannot write to {out}" in text and words in text and "Traceback" not in text
    assert (tmp_path / "afile").read_text() == "hi"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dermscreen")] == []


def test_folder_with_an_earlier_evaluation_needs_overwrite(tmp_path, tiny_bundle):
    labels = _synthetic_set(tmp_path)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a folder with other files is fine
    assert _run("--model", tiny_bundle, "--labels", labels, "--out", out, "--bootstrap", 0).exit_code == 0
    first = (out / "metrics.json").read_text()
    result = _run("--model", tiny_bundle, "--labels", labels, "--out", out, "--bootstrap", 0)
    assert result.exit_code == 2 and "already holds an evaluation" in result.output and "--overwrite" in result.output
    assert (out / "metrics.json").read_text() == first  # untouched

    (out / "metrics.json").unlink()  # any one of the outputs is enough to refuse
    (out / "reliability.png").unlink()
    result = _run("--model", tiny_bundle, "--labels", labels, "--out", out, "--bootstrap", 0)
    assert result.exit_code == 2 and "report.html" in result.output

    split = _split_csv(tmp_path, labels)
    result = _run("--model", tiny_bundle, "--labels", labels, "--split-file", split, "--out", out, "--bootstrap", 0,
                  "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(_read_predictions(out / "predictions.csv")) == 10 and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "metrics.json").read_text())["data"]["split"]["evaluated"] == 10


def test_seen_splits_are_flagged_as_not_held_out(tmp_path, tiny_bundle):
    labels = _synthetic_set(tmp_path)
    split = _split_csv(tmp_path, labels)
    for part, words in [("train", "trained this model"), ("val", "calibrated it")]:
        out = tmp_path / part
        result = _run("--model", tiny_bundle, "--labels", labels, "--split-file", split, "--split", part,
                      "--out", out, "--bootstrap", 0)
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert "Warning:" in text and words in text and "not held-out" in text
        assert f"{part} split of {split}" in text
        warnings = json.loads((out / "metrics.json").read_text())["warnings"]
        assert len(warnings) == 1 and words in warnings[0]
        assert f"> **Warning:** {warnings[0]}" in (out / "metrics.md").read_text()
        assert "Not held-out:" in (out / "report.html").read_text()


def test_metrics_md_carries_the_disclaimer(tmp_path, tiny_bundle):
    from dermscreen import DISCLAIMER

    labels = _synthetic_set(tmp_path)
    assert _run("--model", tiny_bundle, "--labels", labels, "--out", tmp_path / "o", "--bootstrap", 0).exit_code == 0
    assert DISCLAIMER in (tmp_path / "o" / "metrics.md").read_text()
    # it says how its CIs were made, as they were made: here none (it used to claim "0 bootstrap resamples by lesion")
    assert "no confidence intervals (bootstrap off)" in (tmp_path / "o" / "metrics.md").read_text()
