"""The run page's region-version rule in a real browser, against the vendored htmx and static/js/dex.js: a
region read from an older Postgres snapshot never replaces a newer one, whichever way it arrives (an action's
response swapped out of band with hx-swap-oob="true", which htmx hands over as a DocumentFragment)."""

from __future__ import annotations

from pathlib import Path

import django_htmx
from playwright.sync_api import sync_playwright

from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parents[2]
HTMX = Path(django_htmx.__file__).parent / "static" / "django_htmx" / "htmx-2.js"


def test_an_older_region_is_dropped_and_a_newer_one_lands() -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_content(
                '<body><section id="header" data-version="10-0">failed</section>'
                '<section id="output" data-version="10-2">old output</section></body>'
            )
            page.add_script_tag(path=str(HTMX))
            page.add_script_tag(path=str(ROOT / "static" / "js" / "dex.js"))
            shown = page.evaluate(
                """() => {
                    htmx.swap(document.body,
                        '<section id="header" hx-swap-oob="true" data-version="9-0">queued</section>' +
                        '<section id="output" hx-swap-oob="true" data-version="10-1">new output</section>',
                        {swapStyle: "none"});
                    return [document.getElementById("header").textContent,
                            document.getElementById("output").textContent];
                }"""
            )
        finally:
            browser.close()
    # 9-0 was read before 10-0: dropped. 10-1 saw fewer transactions in progress than 10-2: newer, swapped in.
    assert shown == ["failed", "new output"]
