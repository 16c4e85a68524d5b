"""`dermscreen predict` and `dermscreen info` through typer's CliRunner (no torch, tiny bundle)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from dermscreen import screening_commands


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    """The two commands on their own app: the same functions cli.py registers."""
    app = typer.Typer()
    app.command("predict")(screening_commands.predict)
    app.command("info")(screening_commands.info)
    return app


@pytest.fixture()
def folder(tmp_path):
    """Two good images in nested folders (same file name), and one broken file."""
    rng = np.random.default_rng(0)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (150, 200, 3), np.uint8)).save(buf, format="PNG")
        (tmp_path / sub / "lesion.png").write_bytes(buf.getvalue())
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "b" / "notes.txt").write_text("ignored: not an image suffix")
    return tmp_path


def test_json_lines_and_bad_file_continue(app, folder, tiny_bundle):
    res = CliRunner().invoke(app, ["predict", str(folder), "--model", str(tiny_bundle), "--json"])
    assert res.exit_code == 1  # one file failed
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 3
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and errors[0]["file"].endswith("broken.jpg")
    assert errors[0]["error"]["type"] == "CorruptImageError"
    for line in lines:
        if "error" not in line:
            assert line["risk"]["tier"] in ("high", "moderate", "low", "cannot_assess")
            assert line["model"]["name"] == "tiny-test-model"


def test_reports_are_written_where_asked(app, folder, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(folder / "a"), str(folder / "b" / "lesion.png"),
                                   "--model", str(tiny_bundle), "--html", str(out / "html"),
                                   "--fhir", str(out / "fhir"), "--heatmap", str(out / "heat")],
                             env={"COLUMNS": "250"})  # wide enough for the paths in the table
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "html").iterdir()) == ["lesion-2.html", "lesion.html"]
    fhir = json.loads((out / "fhir" / "lesion.fhir.json").read_text())
    assert fhir["resourceType"] == "DiagnosticReport"
    assert res.stdout.count("lesion.png") == 2  # one table row per image
    assert "not a diagnosis" in res.output
    # this model refuses both images as out of distribution: no heatmap, and the user is told why
    assert list((out / "heat").iterdir()) == []
    assert " ".join(res.output.split()).count("no heatmap written: the image was not assessed") == 2


def test_heatmap_files_for_assessable_images(app, folder, tiny_bundle, tmp_path):
    from dermscreen.bundle import ARRAYS_FILE, MODEL_FILE, Bundle

    bundle = Bundle.load(tiny_bundle)  # the same model, with an OOD threshold every image passes
    manifest = bundle.manifest.model_copy(update={"ood": bundle.manifest.ood.model_copy(update={"threshold": 1e12})})
    lenient = Bundle.write(tmp_path / "lenient", manifest,
                           {n: bundle.file(n) for n in (MODEL_FILE, ARRAYS_FILE)})
    res = CliRunner().invoke(app, ["predict", str(folder / "a" / "lesion.png"), "--model", str(lenient),
                                   "--heatmap", str(tmp_path / "heat")])
    assert res.exit_code == 0, res.output
    heat = Image.open(tmp_path / "heat" / "lesion.heatmap.png")
    assert heat.size == (200, 150) and heat.mode == "RGB"
    assert "concern" in res.stdout  # the table shows a risk tier, not "Cannot assess"
    assert "no heatmap" not in res.output


def test_bad_option_stops_with_usage_error(app, folder, tiny_bundle):
    res = CliRunner().invoke(app, ["predict", str(folder / "a"), "--model", str(tiny_bundle), "--site", "moon"])
    assert res.exit_code == 2 and "Unknown site" in res.output


def test_report_folders_that_cannot_be_made_are_explained_before_the_model_loads(app, folder, tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for option, target, words in (("--html", a_file, "is a file, not a folder"),
                                  ("--fhir", a_file / "sub", "cannot create this folder")):
        # a model path that does not exist: the folder error must come first, so it is found before any work
        res = CliRunner().invoke(app, ["predict", str(folder / "a"), "--model", str(tmp_path / "nope"), option,
                                       str(target)])
        said = " ".join(res.output.split())  # rich wraps long lines
        assert res.exit_code == 2 and words in said and option in said, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)


def test_threads_below_one_is_a_usage_error(app, folder, tiny_bundle):
    res = CliRunner().invoke(app, ["predict", str(folder / "a"), "--model", str(tiny_bundle), "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output and "Traceback" not in res.output


def test_metadata_a_model_ignores_is_said_so_and_unknown_is_accepted(app, folder, tiny_bundle):
    res = CliRunner().invoke(app, ["predict", str(folder / "a"), "--model", str(tiny_bundle), "--age", "40",
                                   "--sex", "u", "--site", "unknown", "--json"])
    assert res.exit_code == 0, res.output
    assert "does not use age, sex or site" in res.stderr
    result = json.loads(res.stdout.splitlines()[0])
    assert result["debug"]["metadata_used"] is False

    def keys(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield k
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)

    assert not {"age", "sex", "site", "patient"} & set(keys(result))  # not recorded, as the note says


def test_a_bad_files_line_names_it_once(app, folder, tiny_bundle):
    res = CliRunner().invoke(app, ["predict", str(folder / "b" / "broken.jpg"), "--model", str(tiny_bundle)])
    assert res.exit_code == 1
    line = next(line for line in res.stderr.splitlines() if "broken.jpg" in line)
    assert line.count("broken.jpg") == 1, line


def test_missing_model_is_explained(app, folder, tmp_path):
    res = CliRunner().invoke(app, ["predict", str(folder / "a"), "--model", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not found" in res.output


def test_info(app, tiny_bundle):
    res = CliRunner().invoke(app, ["info", "--model", str(tiny_bundle)])
    assert res.exit_code == 0 and "tiny-test-model" in res.stdout and "sensitivity_first" in res.stdout
    card = json.loads(CliRunner().invoke(app, ["info", "--model", str(tiny_bundle), "--json"]).stdout)
    assert card["classes"][0]["code"] == "akiec" and card["ood"]["threshold"] > 0 and "licence" in card
    # docs/model-card.md describes the shipped model only: another bundle is pointed at evaluate instead
    said = " ".join(res.stdout.split())
    assert "docs/model-card.md" not in said and "dermscreen evaluate --split test" in said
    shipped = " ".join(CliRunner().invoke(app, ["info"], env={"COLUMNS": "200"}).stdout.split())
    assert "docs/model-card.md" in shipped


def test_info_says_which_split_its_metrics_come_from(tiny_bundle):
    from rich.console import Console

    from dermscreen.screening import Screener

    card = Screener(tiny_bundle).model_card()
    card["metrics"] = {"split": "val", "images": 855, "balanced_accuracy": 0.7133, "malignant_auc": 0.9084}
    console = Console(record=True, width=200)
    screening_commands._print_card(card, console)
    said = console.export_text()
    assert "validation metrics (855 images): balanced_accuracy 0.713, malignant_auc 0.908" in said
    assert "855.000" not in said and "dermscreen evaluate --split test" in said  # not the shipped model's card


def test_worker_processes_give_the_serial_answers_in_order(app, folder, tiny_bundle, ham_dir, tmp_path):
    # more files than workers: two spawned processes share them; the answers, their order, the error
    # line and the report names must be exactly those of the one-process run
    real = sorted((ham_dir / "images").glob("*.jpg"))[:5]
    for p in real:
        (folder / "a" / p.name).write_bytes(p.read_bytes())
    runs = {}
    for workers in ("1", "2"):
        html = tmp_path / f"html{workers}"
        res = CliRunner().invoke(app, ["predict", str(folder), "--model", str(tiny_bundle), "--json",
                                       "--workers", workers, "--html", str(html)])
        assert res.exit_code == 1, res.output
        lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
        runs[workers] = (lines, sorted(p.name for p in html.iterdir()))
    (serial, serial_files), (parallel, parallel_files) = runs["1"], runs["2"]
    assert [line["file"] for line in parallel] == [line["file"] for line in serial]
    assert len(parallel) == 8 and sum("error" in line for line in parallel) == 1
    for a, b in zip(serial, parallel):
        if "error" not in a:
            assert a["risk"] == b["risk"] and a["p_malignant"] == pytest.approx(b["p_malignant"], abs=1e-6)
    assert parallel_files == serial_files and "lesion-2.html" in parallel_files


def _record_process(path, stem, result, rgb):
    """A batch writer that writes nothing: it names the process that analysed the file."""
    return [Path(f"{stem}.pid{os.getpid()}")]


def test_the_calling_process_works_beside_its_workers_and_order_is_kept(tiny_bundle, ham_dir):
    # the caller analyses files while its spawned worker starts (and whenever the next answer is not back):
    # both processes take files, and the answers still come in input order, one per file
    from dermscreen.batch import screen_files
    from dermscreen.screening import ScreenerSettings

    real = sorted((ham_dir / "images").glob("*.jpg"))[:40]
    outcomes = list(screen_files(real, tiny_bundle, ScreenerSettings(threads=1), workers=2, writer=_record_process))
    assert [o.index for o in outcomes] == list(range(40)) and [o.path for o in outcomes] == real
    assert all(o.error is None and o.result["status"] in ("ok", "cannot_assess") for o in outcomes)
    processes = {o.written[0].suffix for o in outcomes}
    assert len(processes) == 2 and f".pid{os.getpid()}" in processes
    assert outcomes[0].written[0].suffix == f".pid{os.getpid()}"  # the first answer never waits for a worker


def test_a_chunk_keeps_its_order_around_unreadable_files_and_stops_writing_at_a_full_disk(tiny_bundle, ham_dir,
                                                                                          tmp_path):
    # analyze_files: one model run per chunk, answers in the chunk's order whatever could not be read, and once a
    # report could not be written no later file of the chunk is written (each says why, as the first did)
    import errno

    from dermscreen.batch import analyze_files
    from dermscreen.screening import Screener, ScreenerSettings

    real = sorted((ham_dir / "images").glob("*.jpg"))[:4]
    paths = [real[0], tmp_path / "missing.jpg", tmp_path, real[1], real[2], real[3]]
    jobs = [(10 + i, p, f"s{i}") for i, p in enumerate(paths)]
    screener = Screener(tiny_bundle, ScreenerSettings(threads=1))
    calls: list[str] = []

    def writer(path, stem, result, rgb):
        calls.append(stem)
        if stem == "s3":
            raise OSError(errno.ENOSPC, "No space left on device", f"out/{stem}.html")
        return [Path(f"out/{stem}.html")]

    outcomes = analyze_files(screener, jobs, writer, {"heatmap": False})
    assert [o.index for o in outcomes] == [10, 11, 12, 13, 14, 15] and [o.path for o in outcomes] == paths
    assert outcomes[0].written == (Path("out/s0.html"),) and outcomes[0].error is None
    assert "cannot read the file" in outcomes[1].error and not outcomes[1].fatal
    assert "not a regular file" in outcomes[2].error and not outcomes[2].fatal
    assert outcomes[3].fatal and "No space left on device" in outcomes[3].error and outcomes[3].result
    assert calls == ["s0", "s3"]  # s4 and s5 were analysed, not written
    for later in outcomes[4:]:
        assert later.fatal and later.error == outcomes[3].error and later.result and not later.written


def test_no_lesion_skips_the_outline_and_abcd(app, ham_dir):
    # a real photograph, the shipped model: outlined and measured by default, not with --no-lesion (bulk screening)
    image_id = (ham_dir / "HAM10000_metadata.csv").read_text().splitlines()[1].split(",")[1]
    answers = {}
    for flag in ("--lesion", "--no-lesion"):
        res = CliRunner().invoke(app, ["predict", str(ham_dir / "images" / f"{image_id}.jpg"), "--json", flag])
        assert res.exit_code == 0, res.output
        answers[flag] = json.loads(res.stdout.splitlines()[0])
        assert answers[flag]["status"] == "ok"
    assert answers["--lesion"]["lesion"]["found"] and answers["--lesion"]["lesion"]["abcd"] is not None
    assert answers["--no-lesion"]["lesion"] is None and "lesion" not in answers["--no-lesion"]["timings_ms"]


def test_brackets_in_names_are_printed_as_they_are(app, tiny_bundle, tmp_path):
    # rich reads "[...]" as markup: two lesions "[left]" and "[right]" must not both print as "lesion.jpg",
    # and "[/x]" (a closing tag nothing opened) must not end in a traceback
    folder = tmp_path / "d[/x]"  # the folder "x]" inside "d[": its path holds a closing tag
    folder.mkdir(parents=True)
    rgb = np.random.default_rng(1).integers(0, 255, (150, 200, 3), np.uint8)
    for name in ("lesion[left].png", "lesion[right].png"):
        Image.fromarray(rgb).save(folder / name)
    (folder / "broken[red].jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    res = CliRunner().invoke(app, ["predict", str(folder), "--model", str(tiny_bundle)], env={"COLUMNS": "250"})
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output  # one bad file; no traceback
    assert "lesion[left].png" in res.output and "lesion[right].png" in res.output
    assert "d[/x]/broken[red].jpg" in res.output
    bundle = tmp_path / "b[/x]"
    res = CliRunner().invoke(app, ["info", "--model", str(bundle)], env={"COLUMNS": "250"})
    assert res.exit_code == 2 and "b[/x]" in res.output, res.output


def test_a_model_onnxruntime_cannot_load_is_a_sentence(app, tiny_bundle, tmp_path):
    # its hash is right (e.g. exported with a newer opset than this onnxruntime knows), so only loading it fails
    from dermscreen.bundle import MANIFEST, Bundle, Manifest

    files = {p.name: p.read_bytes() for p in tiny_bundle.iterdir() if p.is_file() and p.name != MANIFEST}
    manifest = Manifest.model_validate_json((tiny_bundle / MANIFEST).read_bytes())
    files[manifest.model.file] = files[manifest.model.file][:200]
    broken = Bundle.write(tmp_path / "broken", manifest, files)
    for args in (["info"], ["predict", str(tiny_bundle / MANIFEST)]):
        res = CliRunner().invoke(app, [*args, "--model", str(broken)], env={"COLUMNS": "250"})
        assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
        assert "could not be loaded by onnxruntime" in res.output and "export the model again" in res.output


def test_a_report_that_cannot_be_written_is_said_so_and_its_result_kept(app, folder, tiny_bundle, tmp_path,
                                                                        monkeypatch):
    # before, a full disk was reported as "cannot read the file" and the analysis thrown away
    import errno

    def full_disk(self, path, stem, result, rgb):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "html" / f"{stem}.html"))

    monkeypatch.setattr(screening_commands._Outputs, "__call__", full_disk)
    res = CliRunner().invoke(app, ["predict", str(folder / "a" / "lesion.png"), "--model", str(tiny_bundle),
                                   "--html", str(tmp_path / "html"), "--json", "--workers", "1"],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 2, res.output
    said = " ".join(res.output.split())
    assert "could not write the report" in said and "lesion.html (No space left on device)" in said
    assert "cannot read the file" not in said
    results = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["risk"]["tier"]  # the analysis itself is printed


@pytest.mark.skipif(__import__("shutil").which("script") is None, reason="needs util-linux's script (a terminal)")
def test_json_lines_reach_stdout_when_run_in_a_terminal(folder, tiny_bundle, tmp_path):
    # in a terminal the progress bar is live, and rich used to send what was printed meanwhile (the JSON lines)
    # to its own console, stderr: `dermscreen predict FOLDER --json > out.jsonl` wrote an empty file
    import shlex
    import subprocess
    import sys

    out = tmp_path / "out.jsonl"
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "dermscreen", "predict", str(folder / "a"),
                                                str(folder / "b" / "lesion.png"), "--model", str(tiny_bundle),
                                                "--json", "--workers", "1"]) + f" > {shlex.quote(str(out))}"
    done = subprocess.run(["script", "-q", "-c", command, "/dev/null"], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and all(line["file"].endswith("lesion.png") for line in lines)


def test_two_files_of_one_name_are_told_apart_and_earlier_reports_are_not_replaced(app, folder, tiny_bundle,
                                                                                   tmp_path):
    # folder/a/lesion.png and folder/b/lesion.png: the table shows where each is, JSON names the reports written
    reports = folder / "reports"  # inside the screened folder: a later run must not screen its heatmaps
    args = ["predict", str(folder / "a"), str(folder / "b"), "--model", str(tiny_bundle), "--workers", "1"]
    res = CliRunner().invoke(app, [*args, "--html", str(reports), "--heatmap", str(reports)], env={"COLUMNS": "250"})
    assert res.exit_code == 1, res.output  # broken.jpg
    assert "│ a/lesion.png" in res.output and "│ b/lesion.png" in res.output
    assert "score /100" in res.output
    assert "Cannot assess The model cannot assess this image" in " ".join(res.output.split())  # what the tier asks
    again = CliRunner().invoke(app, [*args, "--html", str(reports), "--json"], env={"COLUMNS": "250"})
    assert again.exit_code == 2 and "report file(s) of an earlier run would be replaced" in again.output
    assert "--overwrite" in again.output
    again = CliRunner().invoke(app, [*args, "--html", str(reports), "--json", "--overwrite"], env={"COLUMNS": "250"})
    lines = [json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")]
    assert sorted(Path(r).name for line in lines for r in line.get("reports", [])) == ["lesion-2.html", "lesion.html"]
    html = (reports / "lesion-2.html").read_text()
    # the report says which file it is about, from the screened folder on: not the folders above it
    assert "Skin lesion screening: b/lesion.png" in html and str(folder) not in html
    walked = CliRunner().invoke(app, ["predict", str(folder), "--model", str(tiny_bundle), "--json"])
    assert not [line for line in walked.stdout.splitlines() if ".heatmap.png" in line or "reports" in line]


def test_what_is_not_a_regular_file_or_far_too_large_is_refused_unread(app, tiny_bundle, tmp_path):
    from dermscreen import batch

    big = tmp_path / "huge.tif"
    with open(big, "wb") as f:
        f.truncate(batch.MAX_FILE_BYTES + 1)  # sparse: no disk used
    res = CliRunner().invoke(app, ["predict", str(big), "/dev/zero", "--model", str(tiny_bundle)],
                             env={"COLUMNS": "250"})
    said = " ".join(res.output.split())
    assert res.exit_code == 1 and "image files over 300 MB are not read" in said
    assert "/dev/zero: this is not a regular file" in said


def test_a_file_name_that_is_not_utf8_is_analysed_and_reported(app, folder, tiny_bundle, tmp_path):
    # a name from another system's encoding (b"caf\xe9.png") used to end in a UnicodeEncodeError traceback, a
    # 0-byte report and the rest of the folder unanalysed
    import os

    (tmp_path / "odd").mkdir()
    name = os.fsdecode(b"caf\xe9.png")
    (tmp_path / "odd" / name).write_bytes((folder / "a" / "lesion.png").read_bytes())
    (tmp_path / "odd" / "good.png").write_bytes((folder / "a" / "lesion.png").read_bytes())
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "odd"), "--model", str(tiny_bundle), "--json",
                                   "--html", str(tmp_path / "reports"), "--workers", "1"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [Path(line["file"]).name for line in lines] == ["caf\ufffd.png", "good.png"]
    reports = sorted((tmp_path / "reports").iterdir())
    assert len(reports) == 2 and all(p.stat().st_size > 1000 for p in reports)


def test_a_labels_path_that_is_not_utf8_is_refused_with_a_sentence(tmp_path):
    import os

    from dermscreen.errors import ManifestError
    from dermscreen.manifests import load_labels

    path = tmp_path / os.fsdecode(b"lab\xe9ls.csv")
    path.write_text("image,dx\nx.png,nv\n")
    with pytest.raises(ManifestError, match="is not valid UTF-8"):
        load_labels(path)


def test_linked_folders_are_screened_once_and_a_loop_ends(app, folder, tiny_bundle, tmp_path):
    import os

    top = tmp_path / "top"
    top.mkdir()
    os.symlink(folder / "a", top / "patient-a")  # a linked folder: its image is screened
    os.symlink(top, top / "patient-a-again")  # a link back up: walked once, no loop
    res = CliRunner().invoke(app, ["predict", str(top), "--model", str(tiny_bundle), "--json"])
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert res.exit_code == 0 and [Path(line["file"]).name for line in lines] == ["lesion.png"], res.output


def test_reports_may_go_into_the_screened_folder_or_the_one_above(app, folder, tiny_bundle, monkeypatch):
    # the report folder is left out of the walk only where it lies inside a screened folder: "--html ." beside
    # the photos, or "--html photos" for "photos" itself, must still screen them
    monkeypatch.chdir(folder)
    for args in (["a", "--html", "."], ["a", "--html", "a"]):
        res = CliRunner().invoke(app, ["predict", *args, "--model", str(tiny_bundle), "--json", "--overwrite"])
        lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
        assert res.exit_code == 0 and len(lines) == 1 and lines[0]["file"].endswith("lesion.png"), res.output
