"""``qscorer report``: an offline HTML page of scored images, for choosing a filter threshold.

The page (one file, inline CSS and JS, nothing fetched from the network) shows the images of a
``qscorer score`` output sorted by score, a histogram of the scores, a threshold slider that greys
out the images below it and counts those that pass, the ``qscorer filter`` command for that
threshold, and the files that failed. Thumbnails (longest side `THUMBNAIL_SIDE`, JPEG) are embedded
in the page up to `EMBED_LIMIT` images; above that they are files in a folder beside the page
(``report.html`` -> ``report_files/``), named after the image's path, size and modification time,
so a re-run writes only the thumbnails of new or changed images.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import json
import math
import os
import re
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from .scoring_job import ScoreRow, read_rows

THUMBNAIL_SIDE = 192
THUMBNAIL_QUALITY = 80
EMBED_LIMIT = 1000
GENERATOR = '<meta name="generator" content="qscorer report">'
PAGE_FILES = Path(__file__).parent / "report_page"
# Thumbnail files this module writes (and, with .tmp, is writing): KEY_WIDTHxHEIGHT.jpg
THUMBNAIL_NAME = re.compile(r"(?P<key>[0-9a-f]{20})_(?P<width>\d+)x(?P<height>\d+)\.jpg(?P<partial>\.tmp)?")


@dataclass
class ReportModel:
    """What the page says about the model the scores came from."""

    name: str
    score_range: tuple[float, float]

    @classmethod
    def from_config(cls, config, model: str | os.PathLike | None = None) -> ReportModel:
        """From a `QScorerConfig` and the ``--model`` it was loaded from (``None``: bundled)."""
        return cls(config.model_name or (str(model) if model else "bundled default"), tuple(config.score_range))


def report_model(model: str | os.PathLike | None) -> ReportModel:
    """The name and score range of the checkpoint ``model`` (``None``: the bundled default), read
    from its config alone; no weights are loaded. Raises `OSError` / `ValueError` as
    `QScorerConfig.from_json_file` does."""
    from .checkpoint import resolve_checkpoint
    from .config import CONFIG_NAME, QScorerConfig

    return ReportModel.from_config(QScorerConfig.from_json_file(resolve_checkpoint(model) / CONFIG_NAME), model)


@dataclass
class ReportSummary:
    """What a report holds: images with a score, files without one, scored images without a
    thumbnail, and the thumbnail files written and reused (0 and 0 when embedded)."""

    scored: int
    failed: int
    without_preview: int
    thumbnails_written: int
    thumbnails_reused: int
    thumbnail_folder: Path | None

    @property
    def exit_status(self) -> int:
        return 1 if self.failed or self.without_preview else 0


@dataclass
class Thumbnail:
    """A thumbnail as the page refers to it: ``src`` (a data URI or a path relative to the page)."""

    src: str
    width: int
    height: int


def thumbnail_folder(output: Path) -> Path:
    """Where the thumbnails of a large report go: ``report.html`` -> ``report_files``."""
    return output.with_name(f"{output.stem}_files")


def report_output_problem(output: Path, score_file: Path | None = None) -> str | None:
    """Why ``output`` cannot be written as a report, or ``None``. A file is only replaced if a
    previous report wrote it, and never the scores file itself."""
    if score_file is not None and output.resolve() == score_file.resolve():
        return f"{output} is the scores file; choose another report name (e.g. report.html)"
    if output.is_dir():
        return f"{output} is a folder; name the report's HTML file (e.g. {output / 'report.html'})"
    if output.exists():
        with open(output, "rb") as stream:
            head = stream.read(2048)
        if GENERATOR.encode() not in head:
            return f"{output} exists and is not a qscorer report; choose another name or remove it"
    return None


# ------------------------------------------------------------------------------ thumbnails


def open_rgb(path: Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, read as the scorer reads it. Raises `ValueError`
    naming the file when it is missing, unreadable or too large."""
    from .preprocessing import DEFAULT_MAX_IMAGE_PIXELS, open_image

    return open_image(path, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, reduce_to_pixels=(2 * THUMBNAIL_SIDE) ** 2)


def make_thumbnail(path: Path) -> tuple[bytes, int, int]:
    """JPEG bytes of ``path`` scaled down (never up) to a longest side of `THUMBNAIL_SIDE`, and
    the thumbnail's width and height."""
    image = open_rgb(path)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BICUBIC, reducing_gap=2.0)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue(), image.width, image.height


def _thumbnail_key(path: Path) -> str:
    """Names the thumbnail of this version of the file (path, size, modification time)."""
    stat = path.stat()
    identity = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{THUMBNAIL_SIDE}\0{THUMBNAIL_QUALITY}"
    return hashlib.sha1(identity.encode()).hexdigest()[:20]


def _embedded_thumbnail(path: Path) -> Thumbnail | str:
    try:
        data, width, height = make_thumbnail(path)
    except ValueError as err:
        return str(err)
    return Thumbnail("data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"), width, height)


def _filed_thumbnail(path: Path, folder: Path, existing: dict[str, str]) -> tuple[Thumbnail | str, bool]:
    """The thumbnail of ``path`` in ``folder``, reused from ``existing`` (key -> file name) or
    written atomically; and whether it was written."""
    try:
        key = _thumbnail_key(path)
    except OSError as err:
        return f"{path}: {err.strerror or err}", False
    name, written = existing.get(key), False
    if name is None:
        try:
            data, width, height = make_thumbnail(path)
        except ValueError as err:
            return str(err), False
        name = f"{key}_{width}x{height}.jpg"
        _write_atomically(folder / name, data)
        written = True
    width, height = (int(THUMBNAIL_NAME.fullmatch(name)[part]) for part in ("width", "height"))
    return Thumbnail(f"{quote(folder.name)}/{name}", width, height), written


def make_thumbnails(
    paths: list[Path], folder: Path | None, workers: int | None = None
) -> tuple[list[Thumbnail | str], int, int]:
    """For each of ``paths``, its `Thumbnail` or the reason there is none; embedded as data URIs
    when ``folder`` is ``None``, else files in ``folder`` (kept from earlier runs when the image is
    unchanged; thumbnails of images no longer listed are removed). Returns also the counts of
    thumbnail files written and reused. Images are decoded on ``workers`` threads (Pillow releases
    the GIL while decoding and encoding)."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        if folder is None:
            return list(pool.map(_embedded_thumbnail, paths)), 0, 0
        folder.mkdir(parents=True, exist_ok=True)
        ours = {name: THUMBNAIL_NAME.fullmatch(name) for name in os.listdir(folder)}
        existing = {match["key"]: name for name, match in ours.items() if match and not match["partial"]}
        results = list(pool.map(lambda path: _filed_thumbnail(path, folder, existing), paths))
    thumbnails = [thumbnail for thumbnail, _ in results]
    written = sum(was_written for _, was_written in results)
    kept = {thumbnail.src.rsplit("/", 1)[1] for thumbnail in thumbnails if isinstance(thumbnail, Thumbnail)}
    remove_thumbnails(folder, keep=kept)
    return thumbnails, written, len(kept) - written


def remove_thumbnails(folder: Path, keep: set[str] = frozenset()) -> None:
    """Delete the thumbnail files in ``folder`` (only files named as this module names them)
    except ``keep``, and the folder once empty."""
    for name in os.listdir(folder):
        if THUMBNAIL_NAME.fullmatch(name) and name not in keep:
            (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: something of the user's is in it
        folder.rmdir()


# ------------------------------------------------------------------------------ the page


def histogram_svg(scores: list[float], low: float, high: float, bins: int) -> str:
    """An inline SVG histogram of ``scores`` over ``[low, high]`` in ``bins`` equal bins, with the
    elements the page's script moves: ``#histogram-below`` (shade) and ``#histogram-threshold``."""
    width, height, left, right, top, bottom = 640, 150, 34, 630, 10, 124
    counts = [0] * bins
    for score in scores:
        counts[min(bins - 1, max(0, int((score - low) / (high - low) * bins)))] += 1
    tallest = max(counts, default=0) or 1
    bin_width = (right - left) / bins
    # The script draws the threshold at x = left + (threshold - low) / (high - low) * (right - left).
    parts = [
        f'<svg id="histogram" viewBox="0 0 {width} {height}" role="img" data-low="{low}" data-high="{high}" '
        f'data-left="{left}" data-right="{right}" '
        f'aria-label="Histogram of {len(scores)} scores from {low:g} to {high:g}">'
    ]
    for index, count in enumerate(counts):
        bar = (bottom - top) * count / tallest
        start = low + (high - low) * index / bins
        end = low + (high - low) * (index + 1) / bins
        parts.append(
            f'<rect class="bar" x="{left + index * bin_width + 0.5:.1f}" y="{bottom - bar:.1f}" '
            f'width="{max(bin_width - 1, 0.5):.1f}" height="{bar:.1f}"><title>{start:.2f} to {end:.2f}: '
            f"{count} image(s)</title></rect>"
        )
    parts.append(f'<rect id="histogram-below" class="below" x="{left}" y="{top}" width="0" height="{bottom - top}"/>')
    parts.append(f'<line class="axis" x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}"/>')
    # Labels at round numbers: the smallest step (1, 2, 2.5 or 5 times a power of ten) giving at most 6.
    steps = [mantissa * 10.0**exponent for exponent in range(-3, 6) for mantissa in (1, 2, 2.5, 5)]
    labels = [range(math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9) + 1) for step in steps]
    step, indices = next(((step, indices) for step, indices in zip(steps, labels) if len(indices) <= 6), (1, ()))
    for index in indices:
        x = left + (right - left) * (index * step - low) / (high - low)
        parts.append(f'<line class="axis" x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 17}" text-anchor="middle">{index * step:g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 9}" text-anchor="end">{max(counts, default=0)}</text>')
    parts.append(
        f'<line id="histogram-threshold" class="threshold" x1="{left}" y1="{top - 6}" x2="{left}" y2="{bottom}"/>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


def score_domain(scores: list[float], score_range: tuple[float, float]) -> tuple[float, float]:
    """The slider's and histogram's range: the scores' span widened to tenths (the model's score
    range when there are no scores)."""
    if not scores:
        return score_range
    low, high = math.floor(min(scores) * 10) / 10, math.ceil(max(scores) * 10) / 10
    return (low, high) if high > low else (low, low + 0.1)


def filter_command(score_file: Path, rows: list[ScoreRow], sources: list[str] | None) -> str:
    """The ``qscorer filter`` command up to its threshold, for the files of ``rows``: ``sources``
    (the ``score`` run's PATHs) or else the deepest folder holding them all, scores read from
    ``score_file``. Prefixed by a ``cd`` to the current folder when relative paths need it."""
    paths = [row.path for row in rows]
    if not sources:
        folders = [os.path.dirname(path) or "." for path in paths] or ["."]
        try:
            folder = os.path.commonpath(folders)
        except ValueError:  # absolute and relative paths mixed
            folder = ""
        sources = [folder or os.path.commonpath([str(Path(folder).resolve()) for folder in folders])]
    words = ["qscorer", "filter", *sources, "--scores", str(score_file), "--min-score"]
    command = " ".join(shlex.quote(word) for word in words) + " "
    if not all(os.path.isabs(path) for path in [*sources, str(score_file), *paths]):
        command = f"cd {shlex.quote(os.getcwd())} && {command}"
    return command


def _script_json(value) -> str:
    """JSON safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` can end it or open a comment."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _problems_html(failed: list[ScoreRow], unpreviewed: list[tuple[ScoreRow, str]]) -> str:
    if not failed and not unpreviewed:
        return ""
    items = [
        f'<li><span class="path">{html.escape(row.path)}</span>: <span class="error">'
        f"{html.escape(row.error or 'no score')}</span></li>"
        for row in failed
    ]
    items += [
        f'<li><span class="path">{html.escape(row.path)}</span> (scored {row.score:.3f}, no preview): '
        f'<span class="error">{html.escape(reason)}</span></li>'
        for row, reason in unpreviewed
    ]
    heading = f"{len(failed)} file(s) without a score" + (
        f", {len(unpreviewed)} scored without a preview" if unpreviewed else ""
    )
    opened = " open" if len(items) <= 20 else ""
    return (
        f'<details class="problems" id="problems"{opened}><summary><h2>{heading}</h2></summary>\n'
        f'<ul id="failed">\n' + "\n".join(items) + "\n</ul></details>"
    )


def render_page(
    *,
    title: str,
    model: ReportModel,
    score_file: Path,
    scored: list[ScoreRow],
    thumbnails: list[Thumbnail | str],
    failed: list[ScoreRow],
    command: str,
) -> str:
    """The report's HTML; ``scored`` sorted by score, ``thumbnails`` in the same order."""
    scores = [row.score for row in scored]
    low, high = score_domain(scores, model.score_range)
    threshold = str(round(statistics.median(scores), 2) if scores else low)
    images = []
    for row, thumbnail in zip(scored, thumbnails):
        has_thumbnail = isinstance(thumbnail, Thumbnail)
        images.append(
            {
                "score": row.score,
                "name": Path(row.path).name,
                "path": row.path,
                "thumb": thumbnail.src if has_thumbnail else None,
                "width": thumbnail.width if has_thumbnail else None,
                "height": thumbnail.height if has_thumbnail else None,
                "href": Path(row.path).resolve().as_uri(),
                "note": None if has_thumbnail else thumbnail,
            }
        )
    bins = min(50, max(10, round(2 * math.sqrt(len(scores)))))
    data = {
        "images": images,
        "command": command,
        "threshold": threshold,
    }
    unpreviewed = [(row, thumb) for row, thumb in zip(scored, thumbnails) if not isinstance(thumb, Thumbnail)]
    score_low, score_high = model.score_range
    stats = f" (min {min(scores):.3f}, median {statistics.median(scores):.3f}, max {max(scores):.3f})" if scores else ""
    meta = (
        f"model {model.name}: scores in [{score_low:g}, {score_high:g}], higher is better. "
        f"{len(scored)} image(s) scored{stats}, {len(failed)} without a score; from {score_file}."
    )
    style = (PAGE_FILES / "page.css").read_text()
    script = (PAGE_FILES / "page.js").read_text()
    # Only this page's own style and script may run, and nothing may be fetched but data: URIs
    # and local files (the thumbnails folder, the originals the cards link to).
    csp = (
        f"default-src 'none'; img-src data: file:; style-src {_csp_hash(style)}; "
        f"script-src {_csp_hash(script)}; base-uri 'none'; form-action 'none'"
    )
    fields = {
        "csp": csp,
        "title": html.escape(title),
        "style": style,
        "meta": html.escape(meta),
        "histogram": histogram_svg(scores, low, high, bins),
        "low": str(low),
        "high": str(high),
        "threshold": threshold,
        "problems": _problems_html(failed, unpreviewed),
        "scores_name": html.escape(str(score_file)),
        "data": _script_json(data),
        "script": script,
    }
    template = (PAGE_FILES / "page.html").read_text()
    return re.sub(r"\{\{(\w+)\}\}", lambda match: fields[match.group(1)], template)


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``: a reader sees the old file or the new one, never a part."""
    temporary = path.with_name(f"{path.name}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_report(
    score_file: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: ReportModel,
    title: str | None = None,
    sources: list[str] | None = None,
    embed_limit: int = EMBED_LIMIT,
    workers: int | None = None,
) -> ReportSummary:
    """Write the report of the ``qscorer score`` CSV/JSONL output ``score_file`` to ``output``.

    Image paths in the file are taken from the current folder, as ``qscorer filter`` takes them;
    a path listed twice counts once (its last row). ``sources``: the PATHs the scores came from,
    for the page's filter command (default: the deepest folder holding every file). Thumbnails are
    embedded up to ``embed_limit`` scored images, else filed beside the page. Raises `ValueError`
    when the scores file is malformed or ``output`` may not be replaced, `OSError` when a file
    cannot be read or written; nothing is left half-written.
    """
    score_file, output = Path(score_file), Path(output)
    problem = report_output_problem(output, score_file)
    if problem:
        raise ValueError(problem)
    rows = list({Path(row.path).resolve(): row for row in read_rows(score_file)}.values())
    scored, failed = [], []
    for row in rows:
        if row.score is not None and math.isfinite(row.score):
            scored.append(row)
        else:
            failed.append(row if row.score is None else ScoreRow(row.path, None, f"score {row.score} is not finite"))
    scored.sort(key=lambda row: (row.score, row.path))
    folder = thumbnail_folder(output) if len(scored) > embed_limit else None
    if folder is None and thumbnail_folder(output).is_dir():  # left by a larger report of this name
        remove_thumbnails(thumbnail_folder(output))
    thumbnails, written, reused = make_thumbnails([Path(row.path) for row in scored], folder, workers)
    page = render_page(
        title=title or f"Scores of {score_file.name}",
        model=model,
        score_file=score_file,
        scored=scored,
        thumbnails=thumbnails,
        failed=failed,
        command=filter_command(score_file, rows, sources),
    )
    _write_atomically(output, page.encode("utf-8"))
    without_preview = sum(not isinstance(thumbnail, Thumbnail) for thumbnail in thumbnails)
    return ReportSummary(len(scored), len(failed), without_preview, written, reused, folder)


def run_report(
    score_file: Path,
    output: Path,
    *,
    model: ReportModel,
    title: str | None = None,
    sources: list[str] | None = None,
) -> int:
    """`write_report`, with its outcome (or the error) as one line on stderr; returns the exit
    status: 0, 1 when some files have no score or no preview, 2 when no report was written."""
    try:
        summary = write_report(score_file, output, model=model, title=title, sources=sources)
    except (OSError, ValueError) as err:
        print(f"error: no report written: {err}", file=sys.stderr)
        return 2
    if summary.thumbnail_folder is None:
        thumbnails = "thumbnails embedded"
    else:
        thumbnails = (
            f"thumbnails in {summary.thumbnail_folder}: {summary.thumbnails_written} written, "
            f"{summary.thumbnails_reused} reused"
        )
    print(
        f"report {output}: {summary.scored} image(s), {summary.failed} without a score, "
        f"{summary.without_preview} without a preview; {thumbnails}",
        file=sys.stderr,
    )
    return summary.exit_status
