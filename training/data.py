"""IQA records, the manifest format, the torch dataset and the mixed-dataset sampler.

A manifest lists one image per row, as CSV (with a header) or JSONL (one object per line):

==========  ========  ===================================================================
column      required  meaning
==========  ========  ===================================================================
image       yes       image file, absolute or relative to the manifest's folder
mos         yes       mean opinion score (on 1..5, or give the dataset's ``mos_range``)
mos_std     no        standard deviation of the opinion scores, same scale as ``mos``
split       no        ``train`` / ``val`` / ``test`` (any label; selected with ``split=``)
group       no        content id (e.g. the reference image) kept on one side of random splits
==========  ========  ===================================================================

Other columns are ignored. MOS are rescaled to 1..5 as the paper does,
``mos_n = 4 (mos - low) / (high - low) + 1``, and the std by the same factor.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qscorer_reward.preprocessing import DEFAULT_MAX_IMAGE_PIXELS, load_image

MOS_SCALE = (1.0, 5.0)
MANIFEST_COLUMNS = ("image", "mos", "mos_std", "split", "group")
REQUIRED_COLUMNS = ("image", "mos")


@dataclass(frozen=True)
class IQARecord:
    """One rated image.

    Attributes:
        path: the image file.
        mos: mean opinion score on the 1..5 scale (higher is better).
        mos_std: standard deviation of the opinions on the same scale, or ``None`` if unknown.
        split: the dataset's split label (``"train"``, ``"val"``, ``"test"``...) or ``None``.
        group: content id (e.g. the reference image of a distorted one) or ``None``.
    """

    path: Path
    mos: float
    mos_std: float | None = None
    split: str | None = None
    group: str | None = None


def rescale_mos(value: float, mos_range: tuple[float, float], higher_is_better: bool = True) -> float:
    """``value`` on ``mos_range`` mapped linearly to 1..5 (reversed for DMOS, where lower is better)."""
    low, high = mos_range
    unit = (value - low) / (high - low)
    return MOS_SCALE[0] + (MOS_SCALE[1] - MOS_SCALE[0]) * (unit if higher_is_better else 1.0 - unit)


def rescale_std(value: float | None, mos_range: tuple[float, float]) -> float | None:
    """A standard deviation on ``mos_range`` in units of the 1..5 scale."""
    if value is None:
        return None
    return value * (MOS_SCALE[1] - MOS_SCALE[0]) / (mos_range[1] - mos_range[0])


# ---------------------------------------------------------------------------------------- manifests


def read_manifest(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    mos_range: tuple[float, float] | None = None,
) -> list[IQARecord]:
    """Read a CSV or JSONL manifest (format in the module docstring).

    Args:
        path: ``.csv`` or ``.jsonl`` / ``.json`` file.
        image_root: folder that relative image paths start from (default: the manifest's folder).
        mos_range: ``(low, high)`` of the manifest's MOS scale, rescaled to 1..5; ``None`` means the
            values are already on 1..5, and values outside it are an error.

    Raises `ValueError` naming the file for missing required columns (before anything else is
    read), a row whose MOS is not a number, or MOS outside 1..5 without ``mos_range``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found")
    root = Path(image_root) if image_root is not None else path.parent
    rows = list(_manifest_rows(path))
    records = []
    for line, row in rows:
        where = f"{path}, {'line' if path.suffix.lower() != '.csv' else 'row'} {line}"
        mos = _number(row.get("mos"), "mos", where)
        std = row.get("mos_std")
        std = None if std in (None, "") else _number(std, "mos_std", where)
        if mos_range is not None:
            mos, std = rescale_mos(mos, mos_range), rescale_std(std, mos_range)
        elif not MOS_SCALE[0] - 1e-6 <= mos <= MOS_SCALE[1] + 1e-6:
            raise ValueError(
                f"{where}: mos {mos} is outside 1..5; give the dataset's mos_range (e.g. [0, 100]) to rescale it"
            )
        records.append(
            IQARecord(
                path=root / Path(str(row["image"])),  # an absolute image path replaces the root
                mos=mos,
                mos_std=std,
                split=_text(row.get("split")),
                group=_text(row.get("group")),
            )
        )
    return records


def _manifest_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row dict) pairs; checks the columns before yielding anything."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            _check_columns(reader.fieldnames or [], path)
            yield from ((index + 2, row) for index, row in enumerate(reader))
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as stream:
            lines = [(index + 1, line) for index, line in enumerate(stream) if line.strip()]
        rows = []
        for line_number, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {line_number}: not a JSON object ({err})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}")
            _check_columns(list(row), path, line_number)
            rows.append((line_number, row))
        yield from rows
    else:
        raise ValueError(f"{path}: a manifest must be .csv or .jsonl, got {path.suffix!r}")


def _check_columns(columns: Sequence[str], path: Path, line: int | None = None) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        where = f"{path}" + (f", line {line}" if line else "")
        raise ValueError(
            f"{where}: manifest is missing the required column(s) {missing}; found {list(columns)}. "
            f"Columns: image, mos (required), mos_std, split, group (optional)"
        )


def _number(value, name: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {name} must be finite, got {value!r}")
    return number


def _text(value) -> str | None:
    return None if value in (None, "") else str(value)


def write_manifest(records: Sequence[IQARecord], path: str | os.PathLike) -> Path:
    """Write ``records`` as a CSV or JSONL manifest (by suffix), image paths relative to its folder
    where they lie under it. MOS are written on the 1..5 scale."""
    path = Path(path)
    rows = []
    for record in records:
        rows.append(
            {
                "image": _relative_to(record.path, path.parent).as_posix(),
                "mos": record.mos,
                "mos_std": record.mos_std,
                "split": record.split,
                "group": record.group,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=MANIFEST_COLUMNS)
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    elif path.suffix.lower() in (".jsonl", ".json"):
        with open(path, "w", encoding="utf-8") as stream:
            stream.writelines(json.dumps(row) + "\n" for row in rows)
    else:
        raise ValueError(f"{path}: a manifest must be .csv or .jsonl")
    return path


def _relative_to(file: Path, folder: Path) -> Path:
    """``file`` relative to ``folder`` if it lies under it, else absolute."""
    file = file.resolve()
    return file.relative_to(folder.resolve()) if file.is_relative_to(folder.resolve()) else file


# ---------------------------------------------------------------------------------------- selection


def assign_random_split(records: Sequence[IQARecord], test_fraction: float, seed: int = 0) -> list[IQARecord]:
    """Label records ``"train"`` / ``"test"`` for a dataset without an official split.

    The choice hashes each record's group (its content id, else its path) with ``seed``, so images
    of one content land on the same side, and a record's side does not depend on the others.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labelled = []
    for record in records:
        key = f"{seed}:{record.group if record.group is not None else record.path.as_posix()}"
        draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        split = "test" if draw < test_fraction else "train"
        labelled.append(replace(record, split=split))
    return labelled


def check_images(
    records: Sequence[IQARecord], max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[list[IQARecord], list[tuple[Path, str]]]:
    """Split ``records`` into those whose image file exists and has a readable image header, and
    ``(path, reason)`` for the others. Only headers are read, so this is quick; a file damaged
    further in is found when it is decoded, and skipped then."""
    readable, problems = [], []
    for record in records:
        try:
            with Image.open(record.path) as image:
                width, height = image.size
            if width * height > max_image_pixels:
                problems.append((record.path, f"{width}x{height} is over the {max_image_pixels}-pixel limit"))
                continue
        except FileNotFoundError:
            problems.append((record.path, "no such file"))
            continue
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            problems.append((record.path, f"cannot read image ({err})"))
            continue
        readable.append(record)
    return readable, problems


# ---------------------------------------------------------------------------------------- torch dataset


class IQADataset(torch.utils.data.Dataset):
    """Images and their MOS for training and evaluation, read with the scorer's own `load_image`.

    Item ``i`` is a dict: ``pixels`` (uint8 ``[3, H, W]``), ``mos`` / ``mos_std`` (float,
    ``mos_std`` NaN when unknown), ``index`` (``i``), ``path`` (str), ``valid`` and ``failed``.
    An image that cannot be read is skipped: the item then holds the next readable record
    (``valid`` is False, so evaluation discards its score; training simply uses it, with its own
    MOS) and ``failed`` lists ``(path, error)`` of the images passed over. Keeping every item
    filled keeps the batches, and so the processes of a distributed run, in step.

    ``augment(pixels, rng)`` (optional) is applied with a generator seeded by ``(seed, epoch, i)``,
    so an item is the same whenever it is drawn in an epoch, in any process, on a resumed run too.
    """

    def __init__(
        self,
        records: Sequence[IQARecord],
        augment=None,
        seed: int = 0,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if not records:
            raise ValueError("an IQADataset needs at least one record")
        self.records = list(records)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.max_image_pixels = max_image_pixels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        failed = []
        for offset in range(len(self.records)):
            record = self.records[(index + offset) % len(self.records)]
            try:
                pixels = load_image(record.path, self.max_image_pixels)
            except ValueError as err:
                failed.append((str(record.path), str(err)))
                continue
            if self.augment is not None:
                pixels = self.augment(pixels, np.random.default_rng([self.seed, self.epoch, index]))
            return {
                "index": index,
                "valid": offset == 0,
                "path": str(record.path),
                "mos": record.mos,
                "mos_std": float("nan") if record.mos_std is None else record.mos_std,
                "pixels": pixels,
                "failed": failed,
            }
        raise ValueError(f"none of the {len(self.records)} images could be read; first error: {failed[0][1]}")


def collate_items(items: list[dict]) -> dict:
    """Batch dataset items: ``pixels`` (list of uint8 ``[3, H, W]``), ``mos`` / ``mos_std``
    (float32 ``[B]``), ``index`` (int64 ``[B]``), ``valid`` (bool ``[B]``), ``paths``, and
    ``failed``: the ``(path, error)`` pairs of the images skipped."""
    return {
        "pixels": [item["pixels"] for item in items],
        "mos": torch.tensor([item["mos"] for item in items], dtype=torch.float32),
        "mos_std": torch.tensor([item["mos_std"] for item in items], dtype=torch.float32),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "valid": torch.tensor([item["valid"] for item in items], dtype=torch.bool),
        "paths": [item["path"] for item in items],
        "failed": [pair for item in items for pair in item["failed"]],
    }


# ---------------------------------------------------------------------------------------- sampling


class MixtureSampler(torch.utils.data.Sampler[int]):
    """Indices into the concatenation of several datasets, for one process of a distributed run.

    Without weights, an epoch visits every image once, in a shuffled order. With per-dataset
    ``weights``, an epoch draws ``samples_per_epoch`` images (default: the total size), dataset
    ``d`` contributing ``samples_per_epoch * w_d / sum(w)`` of them, each dataset walked through
    in its own shuffled order and restarted as often as needed (a small dataset with a large
    weight repeats; a large one with a small weight is visited partly, a different part each epoch).

    The epoch's global order depends only on ``(seed, epoch)``; process ``rank`` of
    ``num_replicas`` takes every ``num_replicas``-th index of it, after the order is padded by
    repeating its start so that every process gets the same count. `set_position` skips the
    first indices of this process's share, which is how a resumed run continues mid-epoch.

    With ``group_size`` G > 1, each dataset's indices form groups of G consecutive indices (every
    size a multiple of G), and the order moves whole groups: an epoch is a shuffled sequence of
    groups, a weighted draw counts groups, and processes take whole groups in turn. A batch of a
    multiple of G then holds whole groups.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float] | None = None,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        group_size: int = 1,
    ):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every dataset needs at least one image, got sizes {list(sizes)}")
        if group_size < 1 or any(size % group_size for size in sizes):
            raise ValueError(f"group_size must be >= 1 and divide every dataset size {list(sizes)}, got {group_size}")
        if weights is not None and (len(weights) != len(sizes) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"weights must be one non-negative number per dataset, not all 0, got {weights}")
        self.group_size = group_size
        self.sizes = [size // group_size for size in sizes]  # in groups
        self.weights = None if weights is None else [float(w) for w in weights]
        self.samples_per_epoch = (samples_per_epoch or sum(sizes)) // group_size  # in groups
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0

    def set_position(self, position: int) -> None:
        """Start this process's share of the current epoch at its ``position``-th index."""
        self.position = position

    def global_order(self) -> np.ndarray:
        """The epoch's indices into the concatenated datasets, before sharding."""
        return self._member_indices(self._group_order())

    def _member_indices(self, groups: np.ndarray) -> np.ndarray:
        """The indices of the members of ``groups``, group by group."""
        return (groups[:, None] * self.group_size + np.arange(self.group_size)).ravel()

    def _group_order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        offsets = np.cumsum([0, *self.sizes[:-1]])
        if self.weights is None:
            return rng.permutation(sum(self.sizes))
        total = sum(self.weights)
        counts = [round(self.samples_per_epoch * w / total) for w in self.weights]
        parts = []
        for dataset, (size, count) in enumerate(zip(self.sizes, counts)):
            # The dataset's own shuffled walk continues across epochs, so a partly visited dataset
            # shows different images each epoch.
            walk_rng = np.random.default_rng([self.seed, 1_000_003, dataset])
            start = self.epoch * count
            rounds = (start + count) // size + 1
            walk = np.concatenate([walk_rng.permutation(size) for _ in range(rounds)])
            parts.append(offsets[dataset] + walk[start : start + count])
        return rng.permutation(np.concatenate(parts))

    def shard(self) -> np.ndarray:
        order = self._group_order()
        padded = math.ceil(len(order) / self.num_replicas) * self.num_replicas
        order = np.resize(order, padded)  # repeats the start to fill
        return self._member_indices(order[self.rank :: self.num_replicas])

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.position :].tolist())

    def __len__(self) -> int:
        per_replica = math.ceil(self._epoch_length() / self.num_replicas) * self.group_size
        return max(per_replica - self.position, 0)

    def _epoch_length(self) -> int:
        if self.weights is None:
            return sum(self.sizes)
        total = sum(self.weights)
        return sum(round(self.samples_per_epoch * w / total) for w in self.weights)
