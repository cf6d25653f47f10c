"""A cached shard of `SyntheticIQADataset` samples on disk, as a manifest the trainer reads.

Generating a sample costs about 35 ms of one CPU core at 224 px, more than a tiny model's training
step, so a training run on synthetic data reads a shard written once beforehand: BMP files plus a
``manifest.csv`` in the training module's manifest format (``image``, ``mos``, ``group``, in a
grouped shard ``reference``, the group's pristine image, and the sample's ``distortion``,
``level``, ``implementation``, ``source``), and ``shard.json`` with the settings that determine
it. The samples are those of ``SyntheticIQADataset(length, seed=seed, ...)``, so a shard depends
only on its settings, whatever the number of processes that write it.

A dataset entry of a training config with ``format: synthetic_iqa`` names the shard's folder as
its ``path`` and the settings under ``synthetic:`` (`SyntheticSettings`); the shard is written
there when the run starts unless it exists already. A shard written with other settings is refused
rather than overwritten.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

MANIFEST_NAME = "manifest.csv"
SETTINGS_NAME = "shard.json"
MANIFEST_COLUMNS = ("image", "mos", "distortion", "level", "implementation", "source", "group", "reference")
SAMPLES_PER_FOLDER = 1000
# Uncompressed and lossless. A PNG is ~40% smaller but costs ~4 ms to write and ~1.5 ms to decode
# at 224 px (a BMP ~0.2 and ~0.15 ms): decoding alone took a seventh of a tiny model's tower step.
IMAGE_SUFFIX = ".bmp"


@dataclass
class SyntheticSettings:
    """The `SyntheticIQADataset` a shard holds (see its docstring for the meaning of each).

    ``workers``: processes that write the shard (0: one per CPU core); it does not change the shard.
    """

    length: int
    seed: int = 0
    size: int = 224
    distortions: list[str] | None = None
    pristine_fraction: float = 1 / 6  # synthetic_iqa.DEFAULT_PRISTINE_FRACTION (not imported: it loads the generators)
    continuous_levels: bool = True
    group_size: int = 1
    workers: int = 0

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"synthetic length must be >= 1, got {self.length}")
        if self.group_size < 1 or self.length % self.group_size:
            raise ValueError(
                f"synthetic group_size must be >= 1 and divide length {self.length}, got {self.group_size}"
            )
        if self.workers < 0:
            raise ValueError(f"synthetic workers must be >= 0, got {self.workers}")

    def determining(self) -> dict:
        """The settings the shard's contents depend on (all but ``workers``), JSON-ready."""
        settings = asdict(self)
        del settings["workers"]
        if self.group_size == 1:  # shards written before groups existed stay valid
            del settings["group_size"]
        return settings


def ensure_synthetic_shard(directory: str | os.PathLike, settings: SyntheticSettings) -> Path:
    """The manifest of the shard in ``directory``, written first if the folder holds none.

    Raises `ValueError` if ``directory`` holds a shard written with other settings. The shard is
    written into a hidden sibling folder and renamed into place when complete, so an interrupted
    write leaves nothing that looks like a shard, and of two processes writing at once one wins.
    """
    directory = Path(directory)
    expected = settings.determining()
    if (directory / SETTINGS_NAME).is_file():
        found = json.loads((directory / SETTINGS_NAME).read_text())
        if found != expected:
            raise ValueError(
                f"{directory} holds a synthetic shard written with other settings ({found}); "
                f"expected {expected}: use another path or delete it"
            )
        return directory / MANIFEST_NAME
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} is not empty and holds no synthetic shard ({SETTINGS_NAME} missing)")
    partial = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    write_synthetic_shard(partial, settings)
    try:
        if directory.exists():
            directory.rmdir()  # empty (checked above)
        partial.rename(directory)
    except OSError:  # another process finished first: keep its shard if it is the same
        shutil.rmtree(partial, ignore_errors=True)
        return ensure_synthetic_shard(directory, settings)
    return directory / MANIFEST_NAME


def write_synthetic_shard(directory: str | os.PathLike, settings: SyntheticSettings) -> Path:
    """Write the shard of ``settings`` into ``directory`` (created) and return its manifest.

    Samples are written as ``<index // 1000>/<index>.bmp``, by ``settings.workers`` processes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    workers = settings.workers or os.cpu_count() or 1
    chunk = max(1, min(SAMPLES_PER_FOLDER, settings.length // (4 * workers) or 1))
    chunk = -(-chunk // settings.group_size) * settings.group_size  # whole groups: members share one content image
    ranges = [(start, min(start + chunk, settings.length)) for start in range(0, settings.length, chunk)]
    jobs = [(directory, settings, start, stop) for start, stop in ranges]
    started = time.monotonic()
    if workers == 1:
        parts = [_write_range(*job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.starmap(_write_range, jobs)
    rows = [row for part in parts for row in part]
    manifest = directory / MANIFEST_NAME
    with manifest.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (directory / SETTINGS_NAME).write_text(json.dumps(settings.determining(), indent=2) + "\n")
    print(
        f"wrote {settings.length} synthetic samples to {directory} in {time.monotonic() - started:.0f} s "
        f"({workers} processes)",
        flush=True,
    )
    return manifest


def _group_name(source: str, index: int, group_size: int) -> str:
    """The manifest's content id: the source, plus the group's number when groups share one crop."""
    return source if group_size == 1 else f"{source}#{index // group_size}"


def _write_range(directory: Path, settings: SyntheticSettings, start: int, stop: int) -> list[dict]:
    """Write samples ``start .. stop - 1`` and return their manifest rows."""
    import torch

    from .synthetic_iqa import SyntheticIQADataset

    torch.set_num_threads(1)  # one process per core
    dataset = SyntheticIQADataset(
        settings.length,
        seed=settings.seed,
        size=settings.size,
        distortions=settings.distortions,
        pristine_fraction=settings.pristine_fraction,
        continuous_levels=settings.continuous_levels,
        group_size=settings.group_size,
    )
    rows = []
    for index in range(start, stop):
        sample = dataset[index]
        image = _image_name(index)
        (directory / image).parent.mkdir(exist_ok=True)
        pixels = sample["image"].permute(1, 2, 0).numpy()  # uint8 [S, S, 3]
        Image.fromarray(pixels).save(directory / image)
        rows.append(
            dict(
                image=image,
                mos=round(sample["mos"], 4),
                distortion=sample["distortion"],
                level=round(sample["level"], 4),
                implementation=sample["implementation"],
                source=sample["source"],
                group=_group_name(sample["source"], index, settings.group_size),
                # A group's first sample is its content undistorted.
                reference=_image_name(index - index % settings.group_size) if settings.group_size > 1 else "",
            )
        )
    return rows


def _image_name(index: int) -> str:
    return f"{index // SAMPLES_PER_FOLDER:04d}/{index:07d}{IMAGE_SUFFIX}"
