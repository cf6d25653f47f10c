"""The `qscorer report` page in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which `.ci/run` installs), one browser session for the module; and the
benchmark's smoke run."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import MODEL, make_scored_folder, write_score_file

from qscorer_reward.report import write_report
from qscorer_reward.scoring_job import ScoreRow
from qscorer_reward.testing.browser import chromium_paths, headless_chromium, open_page, requested_urls

if chromium_paths() is None:
    pytest.skip(
        "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium.webdriver.common.by import By  # noqa: E402  (after the skip: selenium is only needed here)
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

HOSTILE = '<img src=x onerror="window.pwned=1">.png'
HOSTILE_TITLE = "</title><script>window.pwned=2</script>"
# name -> score (None: failed); ties at 3.25 and a file that is scored but gone since
SCORES = {"a.png": 2.5, "b.png": 3.75, "nested/c.png": 3.25, "nested/d.png": 4.5, "e.png": 3.25, HOSTILE: 4.0,
          "corrupt.png": None, "gone.png": 1.25, "</li><script>window.pwned=3</script>.png": None}  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    with headless_chromium(1200, 900) as driver:
        yield driver


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder with images/, scores.csv written with relative paths, and report.html made from
    that folder (so the page's filter command starts with a `cd` to it)."""
    root = tmp_path_factory.mktemp("site")
    existing = {name: (48 + 8 * i, 40) for i, name in enumerate(SCORES) if SCORES[name] and name != "gone.png"}
    make_scored_folder(root / "images", existing, seed=1)
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [
        ScoreRow(f"images/{name}", score, None if score is not None else f"cannot read <b>{name}</b>")
        for name, score in SCORES.items()
    ]
    write_score_file(root / "scores.csv", rows)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        write_report("scores.csv", "report.html", model=MODEL, title=HOSTILE_TITLE)
    finally:
        os.chdir(cwd)
    return root


def _cards(browser) -> list[tuple[float, str, str]]:
    """(score, name, alt text) of each card, in page order."""
    cards = browser.execute_script(
        "return [...document.querySelectorAll('#gallery .card')].map(card => {"
        " const image = card.querySelector('img, .no-preview');"
        " return [card.querySelector('.score').textContent, card.querySelector('.name').textContent,"
        " image.alt || image.getAttribute('aria-label')]; });"
    )
    return [(float(score), name, alt) for score, name, alt in cards]


def _pass_count(browser) -> str:
    return browser.find_element(By.ID, "pass-count").text


def _threshold_state(browser) -> tuple[float, int, str]:
    """(threshold in the number box, cards greyed out, command)."""
    threshold = float(browser.find_element(By.ID, "threshold-input").get_property("value"))
    below = len(browser.find_elements(By.CSS_SELECTOR, "#gallery .card.below"))
    return threshold, below, browser.find_element(By.ID, "command").text


def test_gallery_shows_one_card_per_scored_image_in_score_order(browser, site):
    open_page(browser, site / "report.html")
    ordered = sorted((score, f"images/{name}") for name, score in SCORES.items() if score is not None)
    scored = [(score, Path(path).name) for score, path in ordered]  # ties in path order
    cards = _cards(browser)
    assert [(score, name) for score, name, _ in cards] == scored
    assert all(alt.startswith(f"{name}, score {score:.3f}") for score, name, alt in cards)  # alt text: name and score
    titles = browser.execute_script("return [...document.querySelectorAll('#gallery .card')].map(card => card.title)")
    assert titles == [path for _, path in ordered]  # the path on hover
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('#gallery img')].filter(i => i.complete && i.naturalWidth > 0).length"
    )
    assert loaded == len(scored) - 1  # gone.png has no preview
    browser.find_element(By.ID, "sort-toggle").click()
    assert [(score, name) for score, name, _ in _cards(browser)] == scored[::-1]
    browser.find_element(By.ID, "sort-toggle").click()
    assert [(score, name) for score, name, _ in _cards(browser)] == scored


def test_threshold_controls_count_grey_out_and_give_the_exact_filter_command(browser, site):
    open_page(browser, site / "report.html")
    scores = [score for score in SCORES.values() if score is not None]

    def expect(threshold: float) -> None:
        passed = sum(score >= threshold for score in scores)
        assert _pass_count(browser).startswith(f"{passed} of {len(scores)} pass")
        number, below, command = _threshold_state(browser)
        assert number == threshold and below == len(scores) - passed
        assert float(re.search(r"--min-score (\S+) ", command)[1]) == threshold
        line_x, low, high, left, right = browser.execute_script(
            "const box = document.getElementById('histogram').dataset;"
            "return [document.getElementById('histogram-threshold').getAttribute('x1'),"
            " box.low, box.high, box.left, box.right].map(Number);"
        )
        assert line_x == pytest.approx(left + (threshold - low) / (high - low) * (right - left))  # the line moved

    box = browser.find_element(By.ID, "threshold-input")
    box.clear()
    box.send_keys("3.25")  # ties at 3.25 pass, as with `filter --min-score 3.25`
    expect(3.25)
    slider = browser.find_element(By.ID, "threshold-slider")
    slider.send_keys(Keys.END)
    expect(4.5)
    for _ in range(50):
        slider.send_keys(Keys.ARROW_LEFT)
    expect(4.0)
    slider.send_keys(Keys.HOME)
    expect(1.2)

    box.clear()
    box.send_keys("3.3")
    dest = browser.find_element(By.ID, "dest-input")
    dest.clear()
    dest.send_keys("kept here")
    command = browser.find_element(By.ID, "command").text
    assert command == f"cd {site} && qscorer filter images --scores scores.csv --min-score 3.3 --dest 'kept here'"
    # The command, run as copied, places exactly the images the page counts as passing.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode in (0, 1), result.stderr  # 1: corrupt.png has no score
    copied = sorted(str(p.relative_to(site / "kept here")) for p in (site / "kept here").rglob("*.png"))
    assert copied == sorted(name for name, score in SCORES.items() if score and score >= 3.3)


def test_failed_files_are_listed_with_their_error_and_hostile_names_are_text(browser, site):
    open_page(browser, site / "report.html")
    problems = browser.find_element(By.ID, "failed").text
    assert "images/corrupt.png: cannot read <b>corrupt.png</b>" in problems
    assert "images/</li><script>window.pwned=3</script>.png" in problems
    assert "images/gone.png (scored 1.250, no preview)" in problems
    assert browser.find_element(By.TAG_NAME, "h1").text == HOSTILE_TITLE
    assert browser.title == HOSTILE_TITLE
    assert HOSTILE in [name for _, name, _ in _cards(browser)]
    assert browser.execute_script("return window.pwned") is None
    assert browser.find_elements(By.CSS_SELECTOR, "img[src='x'], #failed b, #failed script") == []


def test_the_page_makes_no_network_request_and_renders(browser, site, tmp_path):
    open_page(browser, site / "report.html")
    browser.find_element(By.ID, "sort-toggle").click()
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    urls = requested_urls(browser)
    assert (site / "report.html").as_uri() in urls
    assert all(url.startswith("data:") or url.startswith(site.as_uri()) for url in urls), urls
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]  # CSP let it all run

    browser.execute_script("window.scrollTo(0, 0)")
    screenshot = tmp_path / "report.png"
    browser.save_screenshot(str(screenshot))
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # text, chart, photos

    # The check can fail: a page that loads an image over http is caught.
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><img src="http://127.0.0.1:9/x.png">')
    open_page(browser, bad)
    assert "http://127.0.0.1:9/x.png" in requested_urls(browser)


def test_readable_on_a_narrow_window(browser, site):
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 360, "height": 740, "deviceScaleFactor": 1, "mobile": True}
    )
    try:
        open_page(browser, site / "report.html")
        layout = browser.execute_script(
            "const cards = [...document.querySelectorAll('#gallery .card')].slice(0, 2)"
            "  .map(card => card.getBoundingClientRect());"
            "return {scroll: document.documentElement.scrollWidth, width: window.innerWidth,"
            " columns: cards[1].top === cards[0].top ? 2 : 1, cardWidth: cards[0].width};"
        )
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert layout["width"] == 360 and layout["scroll"] <= 360  # nothing sticks out sideways
    assert layout["columns"] == 2 and layout["cardWidth"] >= 110


def test_large_reports_file_thumbnails_beside_the_page_and_show_cards_as_you_scroll(browser, tmp_path):
    count = 450
    paths = make_scored_folder(tmp_path / "images", {f"{i:03d}.png": (24, 16) for i in range(count)}, seed=2)
    scores = [round(1 + 4 * i / count, 3) for i in range(count)][::-1]
    write_score_file(tmp_path / "scores.csv", [ScoreRow(str(p), score) for p, score in zip(paths, scores)])
    summary = write_report(tmp_path / "scores.csv", tmp_path / "big.html", model=MODEL, embed_limit=100)
    assert summary.thumbnail_folder == tmp_path / "big_files" and summary.thumbnails_written == count
    open_page(browser, tmp_path / "big.html")
    wait = WebDriverWait(browser, 20)
    count_loaded = (
        "return [...document.querySelectorAll('#gallery img')].filter(i => i.complete && i.naturalWidth).length"
    )
    wait.until(lambda driver: driver.execute_script(count_loaded) > 0)
    first = _cards(browser)
    assert len(first) < count  # the first cards only, more as the gallery scrolls
    assert browser.execute_script(
        "return [...document.querySelectorAll('#gallery img')].every(i => i.loading === 'lazy')"
    )
    thumbnails = [url for url in requested_urls(browser) if url.startswith((tmp_path / "big_files").as_uri())]
    assert 0 < len(thumbnails) < len(first)  # only the thumbnails near the window are read

    box = browser.find_element(By.ID, "threshold-input")
    box.clear()
    box.send_keys("4")  # cards shown later get the threshold too
    while len(browser.find_elements(By.CSS_SELECTOR, "#gallery .card")) < count:
        shown = len(browser.find_elements(By.CSS_SELECTOR, "#gallery .card"))
        browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        wait.until(lambda driver, shown=shown: len(driver.find_elements(By.CSS_SELECTOR, "#gallery .card")) > shown)
    assert [score for score, _, _ in _cards(browser)] == sorted(scores)
    passed = sum(score >= 4 for score in scores)
    assert _pass_count(browser).startswith(f"{passed} of {count} pass")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery .card.below")) == count - passed
    urls = requested_urls(browser)
    assert all(url.startswith(("data:", tmp_path.as_uri())) for url in urls), urls


PAGE_TIMINGS = ("first_paint_ms", "first_contentful_paint_ms", "first_cards_ms", "load_ms", "threshold_sweep_ms",
                "sort_toggle_ms", "next_cards_ms")  # fmt: skip


@pytest.mark.slow
def test_benchmark_runs_and_reports_every_number(tmp_path):
    """`benchmarks/bench_report.py` on a few hundred images: every number is reported (no timing
    assertions: the machine is shared)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_report.py"
    out = tmp_path / "bench.json"
    command = [sys.executable, str(script), "--images", "250", "--loads", "1", "--json", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(out.read_text())
    numbers = [*results["report_seconds"].values(), *results["seconds_per_1000_images"].values()]
    for page in results["chromium"].values():
        assert page["cards"] > 0
        numbers += [page[key] for key in PAGE_TIMINGS]
    assert all(isinstance(number, (int, float)) and math.isfinite(number) and number >= 0 for number in numbers)
