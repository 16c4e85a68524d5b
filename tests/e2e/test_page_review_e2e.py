"""The web page after a review: where the result lands, what "Analyse again" and "Forget all" act on, what the
status line says, and the layout on phones (375 and 320 px), in headless Chromium like test_web_e2e.py."""
from __future__ import annotations

import base64
import math
import re
import shutil
from pathlib import Path

import pytest

from test_web_e2e import TRANSFER, base, browser, images, playwright_api, upload  # noqa: F401 (fixtures)

pytestmark = pytest.mark.data
expect = playwright_api.expect
PHONE = {"viewport": {"width": 375, "height": 667}, "is_mobile": True, "has_touch": True}
UNREACHABLE = "The server could not be reached; check the connection and try again."


@pytest.fixture()
def allowed() -> list[str]:
    """Console errors a test expects (prefixes): say, Chromium's own line for a request the test refused."""
    return []


@pytest.fixture()
def open_page(browser, base, allowed):  # noqa: F811
    """Opens tabs (each its own context) whose requests must stay on ``base`` and whose scripts log no error."""
    contexts, requests, errors = [], [], []

    def opener(path: str = "/", **options):
        context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, "permissions": ["camera"],
                                         **options})
        contexts.append(context)
        context.on("request", lambda r: requests.append(r.url))
        tab = context.new_page()
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.set_default_timeout(30_000)
        tab.goto(base + path)
        expect(tab.locator("#model-line")).to_contain_text("tiny-test-model")  # the page is wired up
        return tab

    yield opener
    for context in contexts:
        context.close()
    outside = [u for u in requests if not (u.startswith(base + "/") or u.startswith(("blob:", "data:")))]
    assert requests and not outside, f"requests left the server: {outside}"
    # a refused upload's 4xx is logged by Chromium itself, as is a request a test made fail on purpose
    expected = ("Failed to load resource: the server responded with a status of 4", *allowed)
    unexpected = [e for e in errors if not e.startswith(expected)]
    assert not unexpected, f"the page logged errors: {unexpected}"


@pytest.fixture()
def page(open_page):
    return open_page()


def in_view(page, selector: str) -> bool:
    """Whether the element's box lies inside the viewport, top to bottom."""
    box = page.locator(selector).first.bounding_box()
    return box["y"] >= 0 and box["y"] + box["height"] <= page.viewport_size["height"]


def drop(page, selector: str, paths: list[Path]) -> bool:
    """Drops ``paths`` on the element as one drag; returns whether the page cancelled the browser's default."""
    files = [[base64.b64encode(p.read_bytes()).decode(), p.name] for p in paths]
    return page.evaluate("""([selector, files]) => {
        const dt = new DataTransfer();
        for (const [b64, name] of files) {
            dt.items.add(new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type: "image/jpeg"}));
        }
        const over = new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true});
        document.querySelector(selector).dispatchEvent(over);
        const ev = new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true});
        document.querySelector(selector).dispatchEvent(ev);
        return over.defaultPrevented && ev.defaultPrevented;
    }""", [selector, files])


def hold_analyses(page) -> list:
    """Routes /api/v1/analyze to a list and leaves the requests pending there until the test lets them go."""
    held = []
    page.route("**/api/v1/analyze", lambda route: held.append(route))
    return held


def wait_for(page, condition, what: str, timeout_ms: int = 15_000) -> None:
    """Polls ``condition`` from Python (the page's CSP forbids wait_for_function's string evaluation)."""
    for _ in range(timeout_ms // 100):
        if condition():
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"timed out waiting for {what}")


# ---- where the result lands ------------------------------------------------------------------------------

def test_result_tier_is_in_view_after_an_upload_on_a_phone(open_page, images):  # noqa: F811
    phone = open_page(**PHONE)
    upload(phone, images[0])
    assert phone.evaluate("() => document.activeElement.id") == "result"  # screen readers are moved there
    assert in_view(phone, "#result .tier") and in_view(phone, "#result .recommendation")


def test_revisiting_an_entry_brings_its_tier_into_view(page, images):  # noqa: F811
    for image in images:
        upload(page, image)
    page.locator("#timeline li:nth-child(1) button.entry").click()
    expect(page.locator("#result img").first).to_have_attribute("alt", f"The analysed image: {images[0].name}")
    assert in_view(page, "#result .tier") and in_view(page, "#result .recommendation")
    # the status line says which analysis is on screen, briefly
    expect(page.locator("#status")).to_contain_text(f"Showing {images[0].name}")


def test_image_checks_come_right_after_the_tier(page, images):  # noqa: F811
    upload(page, images[0])
    order = page.evaluate("""() => [...document.querySelectorAll('#result-body > *')].map(e =>
        e.matches('.recommendation') ? 'recommendation' : e.querySelector('.messages') ? 'checks'
        : e.querySelector('.score') ? 'score' : e.matches('.viewer-row') ? 'viewer' : '')""")
    assert order.index("checks") == order.index("recommendation") + 1, order
    assert order.index("checks") < order.index("score") < order.index("viewer"), order


def test_short_summary_in_the_status_line_not_a_live_result_card(page, images):  # noqa: F811
    analyse_again = page.locator("#analyze")
    expect(analyse_again).to_be_hidden()  # nothing to re-analyse yet
    upload(page, images[0])
    expect(analyse_again).to_be_visible()
    assert page.locator("#result").get_attribute("aria-live") is None  # the long card is not read out on change
    top = page.locator("#result .diagnoses li").first.locator("span").first.inner_text().replace(" (malignant)", "")
    tier = page.locator("#result .tier strong").inner_text()
    expect(page.locator("#status")).to_have_text(re.compile(
        rf"^Done: {re.escape(tier)}, malignancy score \d+ of 100; most likely {re.escape(top)} \(\d+%\)\.$"))
    assert page.locator("#status").get_attribute("aria-live") == "polite"


# ---- what the buttons act on ---------------------------------------------------------------------------

def test_analyse_again_reanalyses_the_image_on_screen(page, images):  # noqa: F811
    upload(page, images[0])
    upload(page, images[1])
    page.locator("#timeline li:nth-child(1) button.entry").click()
    page.locator("#analyze").click()
    page.locator("#timeline li:nth-child(3)").wait_for()
    expect(page.locator("#timeline li:nth-child(3) .when")).to_contain_text(images[0].name)
    expect(page.locator("#result img").first).to_have_attribute("alt", f"The analysed image: {images[0].name}")


def test_forget_all_aborts_the_analysis_under_way_and_clears_patient_details(page, images, allowed):  # noqa: F811
    allowed.append("Failed to load resource: net::ERR_")  # the aborted request, if Chromium reports it
    page.locator("details.patient summary").click()
    page.fill("#age", "54")
    page.select_option("#sex", "female")
    page.locator("#site").select_option(index=1)
    upload(page, images[2])  # "Forget all" is there once the timeline holds something
    held = hold_analyses(page)
    page.set_input_files("#file", str(images[0]))
    wait_for(page, lambda: held, "the upload")
    # a second image while the first is under way is not dropped silently
    drop(page, "#dropzone", [images[1]])
    expect(page.locator("#status")).to_contain_text(f"Still analysing {images[0].name}")
    page.locator("#clear").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("Forgotten")
    try:
        held[0].continue_()  # the server's answer arrives after all
    except playwright_api.Error:
        pass  # the page already gave up on it
    page.wait_for_timeout(1500)
    expect(page.locator("#status")).to_contain_text("Forgotten")
    assert page.locator("#timeline li").count() == 0 and page.locator("#result").is_hidden()
    assert [page.input_value(f"#{f}") for f in ("age", "sex", "site")] == ["", "", ""]
    # the pressed button went with the timeline: focus lands on the file chooser, not on <body>
    assert page.evaluate("() => document.activeElement.id") == "file"
    expect(page.locator("#analyze")).to_be_hidden()


def test_compare_ticks_survive_showing_and_adding_entries(page, images):  # noqa: F811
    upload(page, images[0])
    upload(page, images[1])
    first = page.locator("#pick-1")
    first.check()
    page.locator("#timeline li:nth-child(2) button.entry").click()  # re-renders the timeline
    expect(first).to_be_checked()
    page.locator("#pick-2").check()
    upload(page, images[2])
    expect(first).to_be_checked()
    expect(page.locator("#pick-2")).to_be_checked()
    expect(page.locator("#compare")).to_be_enabled()
    page.locator("#compare").click()
    expect(page.locator("#compare-view .tier")).to_have_count(2)
    page.locator("#timeline li:nth-child(1) button.entry").click()
    expect(page.locator("#compare-view .tier")).to_have_count(2)  # still the ticked pair
    first.uncheck()  # the view no longer matches the ticks: it closes
    expect(page.locator("#compare-view")).to_be_hidden()
    expect(page.locator("#compare")).to_be_disabled()


def test_each_compare_checkbox_names_its_analysis(page, images):  # noqa: F811
    upload(page, images[0])
    upload(page, images[1])
    names = [c.get_attribute("aria-label") for c in page.locator("#timeline input[type=checkbox]").all()]
    assert len(set(names)) == 2
    for name, image in zip(names, images):
        assert name.startswith(f"Compare: {image.name}, ")
    expect(page.get_by_role("checkbox", name=names[1])).to_have_id("pick-2")


# ---- what the status line says -------------------------------------------------------------------------

def test_several_dropped_files_and_a_drop_outside_the_zone_are_accounted_for(page, images):  # noqa: F811
    assert drop(page, "#dropzone", images)
    page.locator("#timeline li").wait_for()
    status = page.locator("#status")
    expect(status).to_contain_text("Done")
    expect(status).to_contain_text("One image at a time: 2 other files were not analysed")
    assert page.locator("#timeline li").count() == 1
    # dropped on the footer: analysed, not opened by the browser in place of the page (losing the timeline)
    assert drop(page, "footer", [images[1]])
    page.locator("#timeline li:nth-child(2)").wait_for()
    expect(page.locator("#result img").first).to_have_attribute("alt", f"The analysed image: {images[1].name}")


def test_unreachable_server_is_said_in_words(page, images, allowed):  # noqa: F811
    allowed.append("Failed to load resource: net::ERR_CONNECTION_REFUSED")
    page.route("**/api/v1/analyze", lambda route: route.abort("connectionrefused"))
    page.set_input_files("#file", str(images[0]))
    expect(page.locator("#status")).to_have_text(UNREACHABLE)
    assert "error" in page.locator("#status").get_attribute("class")


# ---- debug what-if -------------------------------------------------------------------------------------

def off_grid(body: dict) -> dict:
    """The server's answer with a temperature and a threshold between the sliders' steps, and its tier to match.

    The threshold lies a hair from P(malignant), on the side where rounding it to the slider's 0.01 step would
    carry it across P(malignant): a what-if on snapped sliders then disagrees with the server.
    """
    d = body["debug"]
    d["temperature"] = 0.732  # the slider's step of 0.05 would make it 0.75
    z = [v / d["temperature"] for v in d["logits"]]  # the page's softmax, step by step
    e = [math.exp(v - max(z)) for v in z]
    p = sum(x / sum(e) for x, c in zip(e, body["probabilities"]) if c["group"] == "malignant")
    upper = (p * 100) % 1 >= 0.5
    threshold = p - 1e-7 if upper else p + 1e-7
    high, moderate = sorted(d["operating_points"], key=lambda op: -op["threshold"])
    high["threshold"], moderate["threshold"] = threshold, threshold / 2
    tier = "high" if p >= threshold else "moderate"
    body["risk"].update(tier=tier, label={"high": "High concern", "moderate": "Moderate concern"}[tier])
    return body


def test_untouched_what_if_tier_is_the_servers_tier(open_page, base, images):  # noqa: F811
    import httpx

    # the page's multipart body (a Blob) does not reach a route handler: the server is asked here instead
    with httpx.Client(base_url=base, timeout=60) as client:
        answer = client.post("/api/v1/analyze", files={"image": (images[0].name, images[0].read_bytes(), "image/jpeg")})
    assert answer.status_code == 200, answer.text
    page = open_page("/?debug=1")
    page.route("**/api/v1/analyze", lambda route: route.fulfill(json=off_grid(answer.json())))
    upload(page, images[0])
    expect(page.locator("#debug")).to_be_visible()
    server = page.locator("#result .tier").get_attribute("data-tier")
    expect(page.locator("#dbg-tier")).to_have_attribute("data-tier", server)
    expect(page.locator("#dbg-temperature-out")).to_have_text("0.73")
    page.locator("#dbg-temperature").fill("4")  # moved: now the slider's own value counts
    expect(page.locator("#dbg-temperature-out")).to_have_text("4.00")


# ---- camera --------------------------------------------------------------------------------------------

def test_camera_asks_for_a_dermatoscope_and_escape_closes_it(page):
    button = page.locator("#camera-open")
    expect(button).to_have_accessible_description(re.compile("through a dermatoscope"))
    button.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#camera-note")).to_be_visible()
    expect(page.locator("#camera-note")).to_contain_text("dermoscopic images only")
    page.keyboard.press("Escape")
    expect(page.locator("#camera")).to_be_hidden()
    assert page.evaluate("() => document.activeElement.id") == "camera-open"


def test_tta_label_says_the_thresholds_were_set_without_it(page):
    expect(page.get_by_label(re.compile("referral thresholds were set without it"))).to_have_id("opt-tta")


# ---- phones ----------------------------------------------------------------------------------------------

def test_long_file_name_does_not_widen_the_page_on_a_phone(open_page, images, tmp_path):  # noqa: F811
    long_name = tmp_path / ("Patient_Jane_Doe_left_shoulder_lesion_follow_up_visit_2026_11_23_"
                            "dermatoscope_capture_0001.jpg")
    shutil.copy(images[0], long_name)
    phone = open_page(**PHONE)
    upload(phone, long_name)
    upload(phone, images[1])
    phone.locator("#timeline li:nth-child(1) input[type=checkbox]").check()
    phone.locator("#timeline li:nth-child(2) input[type=checkbox]").check()
    phone.locator("#compare").click()
    expect(phone.locator("#compare-view .tier")).to_have_count(2)
    assert phone.evaluate("() => document.documentElement.scrollWidth") <= 375


def test_touch_targets_are_at_least_24_px_on_a_phone(open_page, images):  # noqa: F811
    phone = open_page(**PHONE)
    upload(phone, images[0])
    small = phone.evaluate("""() => [...document.querySelectorAll(
            '#result select, #result input, #timeline input, #timeline label')]
        .map(e => [e.id || e.tagName + '.' + e.textContent.trim(), e.getBoundingClientRect().height])
        .filter(([, h]) => h < 24)""")
    assert small == []


@pytest.mark.parametrize("path", ["/", "/?debug=1"])
def test_nothing_overflows_at_320_px(open_page, images, path):  # noqa: F811
    phone = open_page(path, viewport={"width": 320, "height": 640}, is_mobile=True, has_touch=True)
    upload(phone, images[0])
    assert phone.evaluate("() => document.documentElement.scrollWidth") <= 320
    # nothing pokes into a panel's padding, let alone out of it
    spill = phone.evaluate("""() => [...document.querySelectorAll('.panel')].filter(p => !p.hidden).flatMap(p => {
        const right = p.getBoundingClientRect().right - parseFloat(getComputedStyle(p).paddingRight) - 1;
        // a data table may scroll sideways inside its own box
        return [...p.querySelectorAll('*')].filter(e => e.getClientRects().length)
            .filter(e => !e.parentElement.closest('.scroll-x') && e.getBoundingClientRect().right > right + 0.5)
            .map(e => `${p.id} > ${e.tagName}.${e.className}: ${e.getBoundingClientRect().right - right}`);
    })""")
    assert spill == []


def test_the_page_says_how_the_model_did_on_held_out_images_or_that_it_is_not_known(page, base):  # noqa: F811
    # the tiny test model has no held-out results (models/held-out.json is keyed by the shipped model's sha256):
    # the page says so; the shipped model's results go through the same function, given its card's held_out
    from dermscreen.bundle import DEFAULT_BUNDLE_DIR, Bundle
    from dermscreen.evaluation.held_out import held_out_for

    page.goto(base + "/")
    playwright_api.expect(page.locator("#model-performance")).to_have_text(
        re.compile("No held-out test results are recorded"))
    card = page.evaluate("() => fetch('/api/v1/model').then(r => r.json())")
    shipped = held_out_for(Bundle.load(DEFAULT_BUNDLE_DIR).sha256)
    line = page.evaluate("card => performanceLine(card)", {**card, "held_out": shipped})
    assert line.startswith("On 855 held-out test images, its referral threshold flagged 95.5 % (95 % CI 91–99 %)")
    assert "69.1 % of benign ones unreferred" in line
