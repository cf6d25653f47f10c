"""``qscorer score --engine ray``: offline scoring on Ray Data, across the machines of a Ray cluster.

The files to score (local files and folders, as `qscorer_reward.scoring_job.search_images` finds
them, and URIs that pyarrow's file systems read: ``s3://``, ``gs://``, ``hdfs://``, ``file://``...)
become a dataset of paths; ``map_batches`` sends batches of them to a pool of scorer actors (one
per GPU of the cluster, else ``actors`` CPU actors), and the rows stream back to this process.

Rows and files are the ``qscorer score`` ones: local files are scored by
`qscorer_reward.scoring_job.score_files` inside the actors (so every row, error text included, is
what the default engine writes), rows are appended and flushed as they arrive, and at the end the
file is rewritten whole in input order by the scoring job's own `merge_rows` and
`write_atomically`. ``--resume`` keeps the scored rows of an interrupted run and scores the rest.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from qscorer_reward.extras import require_extra
from qscorer_reward.scoring_job import (
    IMAGE_SUFFIXES,
    ScoreRow,
    ScoreSummary,
    existing_output_files,
    merge_rows,
    open_for_append,
    open_row_file,
    previous_rows,
    score_files,
    search_images,
    write_atomically,
    write_rows,
)


def is_uri(path: str) -> bool:
    return "://" in path


def find_inputs(paths: Iterable[str]) -> tuple[list[str], list[ScoreRow]]:
    """The files to score, in order, each once, and the rows of what the search skipped: local
    files and folders as `qscorer_reward.scoring_job.search_images` finds them; a URI of a file as
    is, of a folder its image files, recursively and sorted."""
    found: dict[str, None] = {}
    skipped: list[ScoreRow] = []
    for path in paths:
        if is_uri(path):
            found.update(dict.fromkeys(_list_uri(path)))
        else:
            search = search_images([path])
            found.update(dict.fromkeys(str(file) for file in search.paths))
            skipped.extend(search.skipped)
    return list(found), skipped


def _list_uri(uri: str) -> list[str]:
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(path)
    if info.type != fs.FileType.Directory:
        return [uri]  # a missing file is listed, to be reported
    scheme = uri.split("://", 1)[0]
    entries = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
    files = [entry.path for entry in entries if entry.type == fs.FileType.File]
    images = sorted(file for file in files if Path(file).suffix.lower() in IMAGE_SUFFIXES)
    return [f"{scheme}://{image}" for image in images]


class ScoringActor:
    """A Ray Data actor: a batch of paths (``{"path": [...]}``) -> their rows (``path``, ``score``
    NaN where it failed, ``error`` empty where it did not)."""

    def __init__(self, model: str | None, dtype: str | None, batch_size: int):
        import ray
        import torch

        from qscorer_reward.scorer import QScorer

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        device = "cuda" if ray.get_gpu_ids() else None
        self.scorer = QScorer.from_pretrained(model, device=device, dtype=getattr(torch, dtype) if dtype else None)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(path) for path in batch["path"]]
        local = [Path(path) for path in paths if not is_uri(path)]
        rows = {row.path: row for row in score_files(self.scorer, local, self.batch_size)}
        rows.update((row.path, row) for row in self._score_uris([path for path in paths if is_uri(path)]))
        ordered = [rows[path] for path in paths]
        return {
            "path": np.array(paths, dtype=object),
            "score": np.array([math.nan if row.score is None else row.score for row in ordered], dtype=np.float64),
            "error": np.array([row.error or "" for row in ordered], dtype=object),
        }

    def _score_uris(self, uris: list[str]) -> Iterator[ScoreRow]:
        from pyarrow import fs

        from .images import decode_image, score_images

        loaded = []
        for uri in uris:
            try:
                filesystem, path = fs.FileSystem.from_uri(uri)
                with filesystem.open_input_file(path) as stream:
                    data = stream.readall()
                loaded.append(
                    (
                        uri,
                        decode_image(data, self.scorer.max_image_pixels, uri, self.scorer.backbone.decode_pixel_budget),
                    )
                )
            except (OSError, ValueError) as err:  # unreachable, missing, not an image
                yield ScoreRow(uri, None, str(err) if str(err).startswith(uri) else f"{uri}: {err}")
        for start in range(0, len(loaded), self.batch_size):
            chunk = loaded[start : start + self.batch_size]
            for (uri, _), result in zip(chunk, score_images(self.scorer, [image for _, image in chunk])):
                if isinstance(result, ValueError):
                    yield ScoreRow(uri, None, f"{uri}: {result}")
                else:
                    yield ScoreRow(uri, result, None)


def run_ray_job(
    files: list[str],
    output: Path | None,
    output_format: str,
    *,
    model: str | None = None,
    dtype: str | None = None,
    resume: bool = False,
    batch_size: int = 16,
    actors: int | None = None,
    address: str | None = None,
    progress: bool = True,
    skipped: Iterable[ScoreRow] = (),
) -> ScoreSummary:
    """Score ``files`` (as `find_inputs` lists them) on Ray Data and write their rows to ``output``
    (stdout when ``None``) in ``output_format``, the ``skipped`` rows of the search at the end.

    A CSV or JSONL ``output`` gets each row as it comes, then is rewritten whole in input order;
    ``resume`` keeps its scored rows (else it is replaced). A table, or stdout, gets the rows in
    input order at the end. Connects to ``address`` (default: the Ray instance this process
    already has, else a new local one, shut down at the end).
    """
    require_extra("serve", __name__)
    import ray

    skipped = list(skipped)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)  # not Ray's INFO lines
    try:
        resumable = output is not None and output_format != "table"
        kept = {}
        if resumable and resume:
            kept = {row.path: row for row in previous_rows(output, output_format) if row.score is not None}
        elif resumable:
            for stale in existing_output_files(output):
                stale.unlink()
        remaining = [path for path in files if path not in kept]
        rows = _score_on_ray(remaining, model, dtype, batch_size, actors, progress) if remaining else iter(())
        if resumable:
            with open_for_append(output, fresh=not resume) as stream:
                summary = write_rows(rows, output_format, stream, header=stream.tell() == 0)
            merged = merge_rows([*previous_rows(output, output_format), *skipped], files)
            write_atomically(output, merged, output_format)
            summary.skipped = len(skipped)
        else:
            collected = [*rows, *skipped]
            with open_row_file(output, "w") if output else contextlib.nullcontext(sys.stdout) as stream:
                summary = write_rows(merge_rows(collected, files), output_format, stream)
        summary.kept = len(files) - len(remaining)
        return summary
    finally:
        if started:
            ray.shutdown()


def _score_on_ray(
    paths: list[str], model: str | None, dtype: str | None, batch_size: int, actors: int | None, progress: bool
) -> Iterator[ScoreRow]:
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = actors or max(gpus, 1)
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    if model is not None and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())  # the actors' working folder is not ours
    dataset = ray.data.from_items([{"path": path} for path in paths])
    scored = dataset.map_batches(
        ScoringActor,
        fn_constructor_kwargs={"model": model, "dtype": dtype, "batch_size": batch_size},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        **resources,
    )
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        for path, score, error in zip(batch["path"], batch["score"], batch["error"]):
            yield ScoreRow(str(path), None if math.isnan(score) else float(score), error or None)
