"""Speed of `qscorer report` and of its page in a headless Chromium, on many small scored images.

The images are crops of the bundled example photos (96 to 192 px a side, half PNG, half JPEG),
with scores drawn around 3.2 and 1% failed rows, in a `qscorer score` CSV. Measured:

- ``qscorer report`` wall time (a fresh process, as a user runs it) on all the images (thumbnails
  filed in ``report_files/``, none there yet), again (every thumbnail reused), on the first 1,000
  (embedded), and on an empty scores file (the fixed cost: Python, torch and the package import);
  per 1,000 images = (wall - fixed) / images * 1,000.
- In Chromium (headless, this machine's CPU), median of ``--loads`` loads of each page: first
  paint and first contentful paint (Paint Timing API), the page's ``gallery-ready`` mark (the first
  cards are in the gallery) and ``load``; then a threshold sweep (lowest to highest and back: every
  card shown changes), a sort toggle, and the next cards after a scroll to the end of the gallery,
  each timed to the second animation frame after it (style, layout and paint included).

``--screenshot PATH`` also scores the bundled examples with the bundled model (``qscorer score
--report``) and saves a screenshot of that page (the one in docs/cli.md). Run from the repository
root::

    .venv/bin/python benchmarks/bench_report.py [--images 10000] [--json out.json] [--screenshot docs/report.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from timing import machine_info

from qscorer_reward.scoring_job import ScoreRow, write_rows
from qscorer_reward.testing.browser import headless_chromium, open_page

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"

PAGE_TIMINGS = """
const paint = await new Promise(done => {  // the paint entries, once the first contentful paint happened
  const seen = {};
  new PerformanceObserver((list, observer) => {
    for (const entry of list.getEntries()) seen[entry.name] = entry.startTime;
    if ("first-contentful-paint" in seen) { observer.disconnect(); done(seen); }
  }).observe({type: "paint", buffered: true});
});
const ready = performance.getEntriesByName("gallery-ready")[0];  // the first cards are in the gallery
const navigation = performance.getEntriesByType("navigation")[0];
return {first_paint_ms: paint["first-paint"], first_contentful_paint_ms: paint["first-contentful-paint"],
        first_cards_ms: ready.startTime, load_ms: navigation.loadEventEnd,
        cards: document.querySelectorAll("#gallery .card").length};
"""

# Time from an input to the second animation frame after it: the change is then laid out and painted.
INTERACTIONS = """
const frames = () => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
const slider = document.getElementById("threshold-slider");
const timed = async (action) => {
  const start = performance.now();
  action();
  await frames();
  return performance.now() - start;
};
await frames();
const sweep_ms = await timed(() => { slider.value = slider.min; slider.dispatchEvent(new Event("input")); });
const sweep_back_ms = await timed(() => { slider.value = slider.max; slider.dispatchEvent(new Event("input")); });
const sort_ms = await timed(() => document.getElementById("sort-toggle").click());
const gallery = document.getElementById("gallery");
const total = JSON.parse(document.getElementById("report-data").textContent).images.length;
let more_ms = null;  // null: every card is shown already
if (gallery.children.length < total) {
  more_ms = await new Promise(done => {
    const start = performance.now();
    new MutationObserver((_, observer) => {
      observer.disconnect();
      frames().then(() => done(performance.now() - start));
    }).observe(gallery, {childList: true});
    window.scrollTo(0, document.body.scrollHeight);
  });
}
return {threshold_sweep_ms: Math.max(sweep_ms, sweep_back_ms), sort_toggle_ms: sort_ms, next_cards_ms: more_ms};
"""


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` crops of the example photos in ``folder`` (kept between runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [np.asarray(Image.open(path).convert("RGB")) for path in sorted(EXAMPLES.glob("*.png"))]
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{index // 1000:02d}" / f"img_{index:05d}.{'png' if index % 2 else 'jpg'}"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(exist_ok=True)
        photo = photos[index % len(photos)]
        height, width = (int(rng.integers(96, min(192, side) + 1)) for side in photo.shape[:2])
        top, left = rng.integers(0, photo.shape[0] - height + 1), rng.integers(0, photo.shape[1] - width + 1)
        Image.fromarray(photo[top : top + height, left : left + width]).save(path, quality=90)
    return paths


def write_scores(path: Path, images: list[Path], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows = [
        ScoreRow(str(image), None, "cannot read image (benchmark)")
        if rng.random() < 0.01
        else ScoreRow(str(image), float(np.clip(rng.normal(3.2, 0.6), 1, 5)))
        for image in images
    ]
    with open(path, "w", newline="") as stream:
        write_rows(rows, "csv", stream)


def time_report(scores: Path, output: Path) -> float:
    """Seconds of a ``qscorer report`` process."""
    command = [sys.executable, "-m", "qscorer_reward.cli", "report", str(scores), "--output", str(output)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode not in (0, 1):
        raise RuntimeError(result.stderr)
    return seconds


def page_timings(driver, page: Path, loads: int) -> dict:
    runs = []
    for _ in range(loads):
        open_page(driver, page)
        runs.append(driver.execute_script(PAGE_TIMINGS))
    result = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "cards"}
    result["cards"] = runs[0]["cards"]
    result.update(driver.execute_script(INTERACTIONS))
    result["html_bytes"] = page.stat().st_size
    return result


def screenshot(path: Path, work: Path) -> None:
    """Score the bundled examples with the bundled model and save a screenshot of the report."""
    demo = work / "qscorer-demo"
    shutil.rmtree(demo, ignore_errors=True)
    shutil.copytree(EXAMPLES, demo / "examples" / "images")
    command = [sys.executable, "-m", "qscorer_reward.cli", "score", "examples/images", "--output", "scores.csv",
               "--report", "report.html", "--no-progress"]  # fmt: skip
    subprocess.run(command, cwd=demo, check=True, capture_output=True)
    with headless_chromium(980, 1000) as driver:
        open_page(driver, demo / "report.html")
        driver.save_screenshot(str(path))
    # A palette of 160 colours keeps the PNG small and the photos recognisable.
    Image.open(path).convert("RGB").quantize(160, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="scored images (default 10,000)")
    parser.add_argument("--loads", type=int, default=5, help="page loads per page in Chromium (default 5)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the images here between runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--screenshot", type=Path, help="save a screenshot of the examples' report here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-report-") as temporary:
        work = args.workdir or Path(temporary)
        images = make_images(work / "images", args.images)
        scores, first_thousand, empty = work / "scores.csv", work / "scores_1000.csv", work / "empty.csv"
        write_scores(scores, images)
        lines = scores.read_text().splitlines(keepends=True)
        first_thousand.write_text("".join(lines[:1001]))
        empty.write_text(lines[0])
        shutil.rmtree(work / "report_files", ignore_errors=True)

        fixed = time_report(empty, work / "empty.html")
        fresh = time_report(scores, work / "report.html")
        rerun = time_report(scores, work / "report.html")
        embedded = time_report(first_thousand, work / "embedded.html")
        per_thousand = {
            "thumbnails_written": (fresh - fixed) / args.images * 1000,
            "thumbnails_reused": (rerun - fixed) / args.images * 1000,
            "embedded_1000": embedded - fixed,
        }
        results = {
            "machine": machine_info(),
            "images": args.images,
            "report_seconds": {"fixed": fixed, "fresh": fresh, "rerun": rerun, "embedded_1000": embedded},
            "seconds_per_1000_images": per_thousand,
        }
        with headless_chromium(1200, 900) as driver:
            results["chromium"] = {
                f"{args.images}_filed": page_timings(driver, work / "report.html", args.loads),
                "1000_embedded": page_timings(driver, work / "embedded.html", args.loads),
            }
        if args.screenshot:
            screenshot(args.screenshot, work)
            results["screenshot_bytes"] = args.screenshot.stat().st_size
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
