"""Shared fixtures: paths to the real data, and a tiny synthetic bundle."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__import__("os").environ.get("DERMSCREEN_DATA", REPO.parent / "shared" / "data"))
HAM = DATA / "ham10000"
HAM224 = DATA / "ham10000_224"


def _need_data() -> None:
    if not (HAM / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real data not found at {DATA} (set DERMSCREEN_DATA)")


@pytest.fixture(scope="session")
def ham_dir() -> Path:
    """../shared/data/ham10000 (200x150 whole-frame copy of HAM10000)."""
    _need_data()
    return HAM


@pytest.fixture(scope="session")
def ham224_dir() -> Path:
    """../shared/data/ham10000_224 (224x224 centre-crop copy of 5,984 images)."""
    _need_data()
    return HAM224


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A verified bundle folder with a tiny random ONNX model over the HAM10000 taxonomy (64 px input)."""
    from tinybundle import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle_meta(tmp_path_factory) -> Path:
    """Like tiny_bundle, but the model also takes a metadata vector (age, sex, site)."""
    from tinybundle import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny_meta", metadata=True)


# ---- CI: a skipped test is a failed one ----------------------------------------------------------------------------
# Every skip here means "something this test needs is missing" (the data, chromium, an optional package). On a
# developer's machine that is a skip; in CI (.ci/run sets DERMSCREEN_NO_SKIPS=1) it would let the suite pass
# green with whole parts unrun, e.g. after a failed chromium install, so it fails instead.
NO_SKIPS = __import__("os").environ.get("DERMSCREEN_NO_SKIPS") == "1"


def _as_failure(report, what: str) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{what} was skipped, and DERMSCREEN_NO_SKIPS=1 forbids skips: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        _as_failure(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped:  # a whole module skipped (e.g. chromium not found)
        _as_failure(report, collector.nodeid)


def pytest_collection_modifyitems(items):
    # every test that reads the real data is marked `data` (so `-m "not data"` leaves it out), whether or not it
    # says so itself: it is known from the fixtures it takes
    for item in items:
        if {"ham_dir", "ham224_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.data)
