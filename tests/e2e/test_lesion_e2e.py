"""The web page's lesion panel in headless Chromium: ABCD descriptors beside the image, the outline over it."""
from __future__ import annotations

import pytest

from test_web_e2e import base, browser, images, page, playwright_api, upload  # noqa: F401 (fixtures)

pytestmark = pytest.mark.data


def test_abcd_panel_and_outline(page, base, images, tmp_path):  # noqa: F811
    expect = playwright_api.expect
    page.goto(base + "/")
    upload(page, images[0])
    panel = page.locator("#result .lesion")
    expect(panel).to_be_visible()
    expect(panel.locator("h3")).to_have_text("Lesion (ABCD)")
    expect(panel.locator("dt")).to_have_count(4)
    text = panel.inner_text()
    for cue in ("Asymmetry", "Border", "Colours", "Diameter", "Compactness", "not a diagnosis"):
        assert cue in text
    outline = page.locator("#result img.outline")
    assert outline.get_attribute("src").startswith("data:image/png;base64,")
    assert outline.evaluate("img => img.naturalWidth") > 0
    # the outline lies exactly over the image, like the heatmap
    image_box = page.locator("#result .viewer img").first.bounding_box()
    outline_box = outline.bounding_box()
    assert abs(image_box["width"] - outline_box["width"]) < 1 and abs(image_box["y"] - outline_box["y"]) < 1
    toggle = page.locator("#result .viewer-col input[type=checkbox]")
    toggle.uncheck()
    expect(outline).to_be_hidden()
    toggle.check()
    expect(outline).to_be_visible()
    page.screenshot(path=str(tmp_path / "lesion.png"), full_page=True)


def test_outline_is_drawn_without_the_heatmap(page, base, images):  # noqa: F811
    page.goto(base + "/")
    page.locator("#opt-heatmap").uncheck()
    upload(page, images[1])
    assert page.locator("#result img.overlay").count() == 0
    assert page.locator("#result img.outline").get_attribute("src").startswith("data:image/png;base64,")
