"""Colour contrast (WCAG 2.2) of the palettes every front end shows: the API's tier colours (screening.TIERS, used
with white text by the HTML report) and the web page's tier colours and focus ring (static/app.css)."""
from __future__ import annotations

import re

import pytest

from dermscreen.screening import TIERS
from dermscreen.serve.app import STATIC

CSS = (STATIC / "app.css").read_text(encoding="utf-8")
CSS_TIER = {"high": "high", "moderate": "moderate", "low": "low", "cannot_assess": "unknown"}


def css_colours(css: str) -> dict[str, str]:
    """The custom properties whose value is a hex colour: {"--name": "#rrggbb"}."""
    return {name: value for name, value in re.findall(r"(--[\w-]+)\s*:\s*(#[0-9a-fA-F]{3,6})\s*;", css)}


def luminance(colour: str) -> float:
    """WCAG relative luminance of a #rgb or #rrggbb colour."""
    hex_ = colour.lstrip("#")
    if len(hex_) == 3:
        hex_ = "".join(c * 2 for c in hex_)
    channels = [int(hex_[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two colours (1 to 21)."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_the_contrast_formula_matches_known_ratios():
    assert contrast("#000", "#fff") == pytest.approx(21.0)
    assert contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)
    assert contrast("#e65100", "#ffffff") == pytest.approx(3.79, abs=0.01)  # the old "moderate": too light


@pytest.mark.parametrize("tier", sorted(TIERS))
def test_every_tier_colour_carries_white_text_at_aa(tier):
    # the HTML report and the page write white normal-size text on these (WCAG 1.4.3: 4.5:1)
    assert contrast(TIERS[tier]["colour"], "#ffffff") >= 4.5
    page = css_colours(CSS)[f"--{CSS_TIER[tier]}"]
    assert contrast(page, css_colours(CSS)["--accent-ink"]) >= 4.5
    assert TIERS[tier]["colour"].lower() == page.lower(), "the API, the report and the page show different colours"


def test_the_focus_indicator_stands_out_against_the_page():
    colours = css_colours(CSS)
    rings = set(re.findall(r"outline\s*:[^;}]*var\((--[\w-]+)\)", CSS))
    halos = set(re.findall(r"box-shadow\s*:[^;}]*var\((--focus[\w-]*)\)", CSS))
    assert rings == {"--focus"} and halos == {"--focus-halo"}
    for ring in rings:  # WCAG 2.2 SC 1.4.11: 3:1 against the white panels and the page background
        for background in ("--panel", "--bg"):
            assert contrast(colours[ring], colours[background]) >= 3, (ring, background)
        for halo in halos:  # the band inside the ring must not blur into it
            assert contrast(colours[ring], colours[halo]) >= 3
    # every rule that draws the ring also draws its band (the timeline buttons unset both with `all: unset`)
    rules = re.findall(r"[^{}]*\{[^}]*outline\s*:[^;}]*var\(--focus\)[^}]*\}", CSS)
    assert len(rules) >= 3  # any focus, the file input's label, the timeline buttons
    for rule in rules:
        assert "var(--focus-halo)" in rule, rule.strip()
