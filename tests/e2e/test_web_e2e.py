"""The one-page web app in a real headless Chromium (Debian's ``chromium``, driven by Playwright for Python).

A uvicorn server on 127.0.0.1 serves the tiny bundle (OOD-permissive copy); every test records the
page's requests and fails if any left that server. Skipped only when chromium or playwright is absent.
"""
from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from servehelpers import permissive_bundle, start_server, stop_server

CHROMIUM = os.environ.get("DERMSCREEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.data  # uploads real HAM10000 images
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        # a synthetic camera, so the getUserMedia path runs without hardware or a permission prompt
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
TIERS = {"High concern", "Moderate concern", "Low concern", "Cannot assess"}


@pytest.fixture(scope="module")
def base(tiny_bundle, tmp_path_factory):
    proc, url = start_server(permissive_bundle(tiny_bundle, tmp_path_factory.mktemp("e2e") / "bundle"))
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser, base):
    """A fresh tab (own context: no shared memory) whose every request is checked to stay on ``base``."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, permissions=["camera"])
    requests: list[str] = []
    context.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    tab = context.new_page()
    tab.on("pageerror", lambda e: errors.append(str(e)))
    # a refused upload's 4xx is logged by Chromium itself; only script errors count
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error"
           and not m.text.startswith("Failed to load resource: the server responded with a status of 4") else None)
    tab.set_default_timeout(30_000)
    yield tab
    context.close()
    outside = [u for u in requests if not (u.startswith(base + "/") or u.startswith(("blob:", "data:")))]
    assert requests and not outside, f"requests left the server: {outside}"
    assert not errors, f"the page logged errors: {errors}"


@pytest.fixture(scope="module")
def images(ham_dir) -> list[Path]:
    return sorted((ham_dir / "images").glob("ISIC_*.jpg"))[:3]


def upload(page, path: Path) -> None:
    before = page.locator("#timeline li").count()
    page.set_input_files("#file", str(path))
    page.locator(f"#timeline li:nth-child({before + 1})").wait_for()


def test_upload_shows_result_with_heatmap_and_disclaimer(page, base, images, tmp_path):
    page.goto(base + "/")
    expect = playwright_api.expect
    expect(page.locator("#model-line")).to_contain_text("tiny-test-model")
    expect(page.locator("#metadata-note")).to_contain_text("neither stored nor returned")
    upload(page, images[0])
    result = page.locator("#result")
    expect(result).to_be_visible()
    assert page.locator("#result .tier strong").inner_text() in TIERS
    assert page.locator("#result .recommendation").inner_text().strip()
    assert int(page.locator("#result .score .value").inner_text()) in range(0, 101)
    expect(page.locator("#result .diagnoses li")).to_have_count(3)
    assert "not a diagnosis" in page.locator("#result .disclaimer").inner_text()
    assert "Licence: CC BY-NC-SA" in page.locator("#result .meta").inner_text()  # the tiny bundle's default card
    overlay = page.locator("#result img.overlay")
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert overlay.evaluate("img => img.naturalWidth") > 0
    page.locator("#result input[type=range]").fill("0.2")
    assert overlay.evaluate("img => getComputedStyle(img).opacity") == "0.2"
    malignant_map = overlay.get_attribute("src")
    page.locator("#result select").select_option("top")
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert overlay.get_attribute("src") != malignant_map
    expect(page.locator("#status")).to_contain_text("Done")
    # the long card is not a live region (a screen reader would read all of it); the status line sums it up
    assert page.locator("#result").get_attribute("aria-live") is None
    assert page.locator("#status").get_attribute("aria-live") == "polite"
    expect(page.locator("#status")).to_contain_text("malignancy score")
    page.screenshot(path=str(tmp_path / "result.png"), full_page=True)


TRANSFER = """([b64, name]) => {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], name, {type: "image/jpeg"}));
    return dt;
}"""


def paste(page, path: Path, name: str) -> None:
    """Paste ``path`` into the page as if from the clipboard."""
    dt = page.evaluate_handle(TRANSFER, [base64.b64encode(path.read_bytes()).decode(), name])
    page.evaluate("dt => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}))", dt)


def test_drag_and_drop_is_analysed(page, base, images):
    page.goto(base + "/")
    dt = page.evaluate_handle(TRANSFER, [base64.b64encode(images[1].read_bytes()).decode(), "dropped.jpg"])
    page.dispatch_event("#dropzone", "dragover", {"dataTransfer": dt})
    assert "over" in page.locator("#dropzone").get_attribute("class")
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dt})
    page.locator("#timeline li").wait_for()
    playwright_api.expect(page.locator("#result img").first).to_have_attribute("alt", "The analysed image: dropped.jpg")


def test_paste_timeline_and_side_by_side_compare(page, base, images):
    page.goto(base + "/")
    assert page.locator("#skip").is_hidden()  # it leads to the result: none yet
    upload(page, images[0])
    assert page.locator("#skip").get_attribute("hidden") is None and page.locator("#result").is_visible()
    paste(page, images[1], "clipboard.jpg")
    page.locator("#timeline li:nth-child(2)").wait_for()
    playwright_api.expect(page.locator("#result img").first).to_have_attribute("alt", "The analysed image: clipboard.jpg")
    page.locator("#timeline li:nth-child(1) input[type=checkbox]").check()
    assert page.locator("#compare").is_disabled()
    page.locator("#timeline li:nth-child(2) input[type=checkbox]").check()
    page.locator("#compare").click()
    compare = page.locator("#compare-view")
    playwright_api.expect(compare.locator(".tier")).to_have_count(2)
    assert heading_name(compare, 0) == images[0].name and heading_name(compare, 1) == "clipboard.jpg"
    page.locator("#timeline li:nth-child(1) button.entry").click()  # revisit the first analysis
    playwright_api.expect(page.locator("#result img").first).to_have_attribute("alt", f"The analysed image: {images[0].name}")
    page.locator("#clear").click()
    playwright_api.expect(page.locator("#timeline li")).to_have_count(0)
    assert page.locator("#result").is_hidden() and page.locator("#skip").is_hidden()


def test_tiff_upload_shows_the_servers_preview_of_the_image(page, base, images, tmp_path):
    from PIL import Image

    tiff = tmp_path / "lesion.tif"
    Image.open(images[0]).save(tiff, "TIFF")  # a format Chromium cannot draw
    page.goto(base + "/")
    upload(page, tiff)
    shown = "img => img.decode().then(() => img.naturalWidth, () => 0)"
    viewer = page.locator("#result .viewer img").first
    assert viewer.get_attribute("alt") == "The analysed image: lesion.tif"
    assert viewer.get_attribute("src").startswith("data:image/jpeg;base64,")
    assert viewer.evaluate(shown) > 0
    assert page.locator("#timeline li:nth-child(1) img").evaluate(shown) > 0
    assert page.locator("#result img.overlay").evaluate(shown) > 0
    upload(page, images[1])  # a JPEG the browser draws itself: no preview asked for
    assert page.locator("#result .viewer img").first.get_attribute("src").startswith("blob:")
    assert page.locator("#timeline li:nth-child(2) img").evaluate(shown) > 0


def heading_name(compare, index: int) -> str:
    """The file name in the heading of the index-th card of the compare view."""
    return compare.locator(".compare-title").nth(index).inner_text().split(" · ")[0]


def test_debug_mode_sliders_recompute_the_tier(page, base, images):
    page.goto(base + "/?debug=1")
    upload(page, images[2])
    debug = page.locator("#debug")
    playwright_api.expect(debug).to_be_visible()
    playwright_api.expect(page.locator("#dbg-logits tr")).to_have_count(7)
    tier = page.locator("#dbg-tier")
    assert tier.inner_text() == {"high": "High", "moderate": "Moderate", "low": "Low"}[
        page.locator("#result .tier").get_attribute("data-tier")]  # unchanged sliders agree with the server
    for op in ("sensitivity_first", "balanced"):
        page.locator(f"#dbg-op-{op}").fill("0")
    assert tier.inner_text() == "High"
    for op in ("sensitivity_first", "balanced"):
        page.locator(f"#dbg-op-{op}").fill("1")
    assert tier.inner_text() == "Low"
    before = page.locator("#dbg-logits").inner_text()
    page.locator("#dbg-temperature").fill("4")
    assert page.locator("#dbg-temperature-out").inner_text() == "4.00"
    assert page.locator("#dbg-logits").inner_text() != before
    page.locator("#dbg-ood").fill("0")
    assert tier.inner_text() == "Cannot assess"


def take_camera_photo(page) -> None:
    """Open the live camera (Chromium's synthetic one), wait for a frame, capture it and wait for its analysis."""
    page.locator("#camera-open").click()
    playwright_api.expect(page.locator("#camera-video")).to_be_visible()
    page.locator("#camera-video").evaluate(
        "v => new Promise(done => v.readyState >= 2 ? done() : v.addEventListener('loadeddata', () => done()))")
    page.locator("#camera-snap").click()
    playwright_api.expect(page.locator("#timeline li")).to_have_count(1)
    assert "camera photo" in page.locator("#timeline li").inner_text()


def test_camera_capture_is_analysed(page, base):
    page.goto(base + "/")
    take_camera_photo(page)
    assert page.locator("#camera").is_hidden()
    assert page.locator("#file").get_attribute("accept") and page.locator("#camera-fallback").get_attribute("capture") == "environment"


def test_unreadable_file_shows_the_servers_message(page, base, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n" * 10)
    page.goto(base + "/")
    page.set_input_files("#file", str(notes))
    status = page.locator("#status")
    playwright_api.expect(status).to_contain_text("not an image we can read")
    assert status.get_attribute("role") == "status" and "error" in status.get_attribute("class")
    assert page.locator("#result").is_hidden()


def test_phone_sized_screen_and_labelled_controls(browser, base, images):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    phone = context.new_page()
    phone.goto(base + "/")
    upload(phone, images[0])
    assert phone.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1")
    unlabelled = phone.evaluate("""() => [...document.querySelectorAll('input, select, button')]
        .filter(e => e.getAttribute('aria-hidden') !== 'true' && e.type !== 'file')
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id || e.outerHTML)""")
    assert unlabelled == []
    context.close()


def test_keyboard_focus_order(page, base):
    page.goto(base + "/")
    order = []
    for _ in range(5):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.id || document.activeElement.tagName.toLowerCase()"))
        if order[-1] == "file":  # the input is visually hidden: its focus must show on its label
            ring = page.locator("label[for=file]").evaluate(
                "l => ((s) => [s.outlineStyle, s.outlineColor, s.boxShadow])(getComputedStyle(l))")
            assert ring[:2] == ["solid", "rgb(27, 31, 36)"] and "rgb(255, 191, 71)" in ring[2], ring
    # no "Skip to result" link first: it is hidden until there is a result
    assert order == ["file", "camera-open", "summary", "opt-heatmap", "opt-tta"], order


def test_api_docs_page_renders_locally(page, base):
    page.goto(base + "/docs")
    playwright_api.expect(page.locator("h2", has_text="POST /api/v1/analyze")).to_be_visible()
    playwright_api.expect(page.locator("h2", has_text="Schema ScreeningResult")).to_be_visible()
    assert "multipart/form-data" in page.locator("main").inner_text()
    examples = page.locator("footer code")
    assert examples.nth(0).inner_text().endswith(f"{base}/api/v1/analyze")  # this server, not port 8000
    assert f'"{base}/api/v1/analyze?heatmap=false"' in examples.nth(1).inner_text()
