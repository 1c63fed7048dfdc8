"""The report in a real browser: headless Debian Chromium driven by Playwright renders the page from the
fixture records, with every section present, no broken image and no console error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qanalyze.report.html import SECTIONS, render_report
from qanalyze.report.inputs import collect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the probe's flags: without the background-networking ones Chromium keeps dialling Google on a closed network
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian package chromium; `make test` installs it where apt-get can)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


def _open(browser, page_path: Path, width: int = 1280):
    page = browser.new_page(viewport={"width": width, "height": 900})
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", lambda request: None if request.url.startswith(("file:", "data:", "about:"))
            else problems.append(f"network request to {request.url}"))
    page.goto(page_path.as_uri(), wait_until="load")
    return page, problems


def test_report_renders_every_section_without_broken_images_or_errors(browser, sweep_folder, tmp_path):
    out = tmp_path / "report.html"
    result = render_report(collect([sweep_folder]), out, png_dir=tmp_path / "figures")
    assert result.filled == list(SECTIONS)
    page, problems = _open(browser, out)
    for section in SECTIONS:
        assert page.locator(f"section#{section} h2").count() == 1, section
        assert page.locator(f"section#{section} .missing").count() == 0, section
    images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(images) == len(result.pngs) == 10
    assert all(complete and width > 0 and height > 0 for complete, width, height in images), images
    # readable without scrolling sideways, even with every table opened
    page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot = tmp_path / "report.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 50_000
    assert problems == []
    page.close()


def test_a_report_from_a_sensitivity_file_alone_says_what_is_missing(browser, sweep_folder, tmp_path):
    out = tmp_path / "sensitivity.html"
    render_report(collect([sweep_folder / "sensitivity.json"]), out)
    page, problems = _open(browser, out)
    for section in ("plan", "pareto"):
        assert page.locator(f"section#{section} .missing").count() == 1, section
    assert page.locator("section#sensitivity img").count() == 3  # bars, density and the layer x module type heatmap
    assert problems == []
    page.close()
