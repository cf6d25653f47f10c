"""Synthetic IQA data: pristine content (`content`) distorted by the synthetic distortion types
(`distortions`) and labelled with a 1..5 MOS (`quality_labels`).

Training data, a map-style torch dataset, deterministic in ``(seed, index)`` (so any worker, any
order and any resumed run sees the same sample for an index)::

    dataset = SyntheticIQADataset(length=100_000, seed=0, size=224)
    sample = dataset[7]
    sample["image"]           # torch.uint8 [3, size, size], RGB (what QScorer accepts)
    sample["mos"]             # float in [1, 5], 5.0 for pristine samples
    sample["distortion"]      # a DISTORTION_TYPES name, or "pristine"
    sample["level"]           # float: 0.0 for pristine, else in [1, 5] (fractional if continuous_levels)
    sample["implementation"]  # the training implementation used ("none" for pristine)
    sample["source"]          # "photo:<name>", "dead_leaves" or "spectral_texture"

The default collate function batches these into ``image`` [B, 3, size, size] uint8, ``mos`` and
``level`` float64 [B] and lists of strings.

Evaluation data: `write_evaluation_set` writes crops of the `content.HELD_OUT_PHOTOS`, each pristine
and distorted by every type at levels 1..5 with the held-out implementations, as PNG files plus a
CSV manifest (columns `MANIFEST_COLUMNS`; ``image`` relative to the manifest, ``group`` the id shared
by a pristine crop and its distorted versions). `read_sample_rows` reads it back; the columns
``image``, ``mos`` and ``group`` follow the training module's manifest format (`read_manifest`), so its
reader takes the set as it is.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .content import HELD_OUT_PHOTOS, photo_crop, quantise, training_content
from .distortions import DISTORTION_TYPES, LEVELS, MIN_SIDE
from .image_ops import to_tensor_uint8, to_uint8
from .quality_labels import fidelity, mos_label

PRISTINE = "pristine"
MANIFEST_NAME = "manifest.csv"
# The arguments an evaluation set was written with, beside its manifest.
SETTINGS_NAME = "evaluation_set.json"
MANIFEST_COLUMNS = ("image", "mos", "distortion", "level", "implementation", "source", "group")
# One in six samples is pristine: as many as each distortion level when levels are drawn uniformly.
DEFAULT_PRISTINE_FRACTION = 1 / 6


class SyntheticIQADataset(torch.utils.data.Dataset):
    """``length`` synthetic training samples; see the module docstring for their fields.

    Args:
        length: number of samples (indices ``0 .. length - 1``).
        seed: the dataset's seed; sample ``i`` depends only on ``(seed, i)`` and the arguments below.
        size: side of the square images, >= 32. Photos smaller than ``size`` are left out.
        distortions: names of the `DISTORTION_TYPES` to use (default: all), drawn uniformly.
        pristine_fraction: probability that a sample is undistorted (label 5).
        continuous_levels: draw levels uniformly in [1, 5] (the type's parameter interpolated between
            its five levels, so the model does not learn five fixed settings) instead of from {1..5}.
        group_size: with ``G > 1``, indices ``g * G .. g * G + G - 1`` form group ``g``: one content
            image, pristine at the group's first index and distorted independently at the others
            (``pristine_fraction`` is then unused). A batch of whole groups shows what each
            distortion changed on the same content, the signal a ranking loss can use.
    """

    def __init__(
        self,
        length: int,
        *,
        seed: int = 0,
        size: int = 224,
        distortions: Sequence[str] | None = None,
        pristine_fraction: float = DEFAULT_PRISTINE_FRACTION,
        continuous_levels: bool = True,
        group_size: int = 1,
    ):
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if not 0.0 <= pristine_fraction <= 1.0:
            raise ValueError(f"pristine_fraction must be within [0, 1], got {pristine_fraction}")
        if size < MIN_SIDE:
            raise ValueError(f"size must be >= {MIN_SIDE}, got {size}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self._group_content: tuple[int, np.ndarray, str] | None = None  # the last group's, reused by its members
        self.length = length
        self.seed = seed
        self.size = size
        self.distortions = _checked_distortion_names(distortions)
        self.pristine_fraction = pristine_fraction
        self.continuous_levels = continuous_levels

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        if self.group_size == 1:
            rng = np.random.default_rng([self.seed, index])
            pristine, source = training_content(self.size, rng)
            if rng.random() < self.pristine_fraction:
                return _sample(pristine, 5.0, PRISTINE, 0.0, "none", source)
        else:
            group, member = divmod(index, self.group_size)
            pristine, source = self._content_of_group(group)
            if member == 0:
                return _sample(pristine, 5.0, PRISTINE, 0.0, "none", source)
            rng = np.random.default_rng([self.seed, group, member])
        distortion = DISTORTION_TYPES[self.distortions[int(rng.integers(len(self.distortions)))]]
        level = float(rng.uniform(LEVELS[0], LEVELS[-1])) if self.continuous_levels else float(rng.choice(LEVELS))
        implementation = distortion.choose_implementation(rng, "train")
        distorted = quantise(distortion(pristine, level, rng, implementation))
        mos = mos_label(level, fidelity(pristine, distorted))
        return _sample(distorted, mos, distortion.name, level, implementation, source)

    def _content_of_group(self, group: int) -> tuple[np.ndarray, str]:
        if self._group_content is None or self._group_content[0] != group:
            pristine, source = training_content(self.size, np.random.default_rng([self.seed, group]))
            self._group_content = (group, pristine, source)
        return self._group_content[1], self._group_content[2]


def _sample(image: np.ndarray, mos: float, distortion: str, level: float, implementation: str, source: str) -> dict:
    return dict(
        image=to_tensor_uint8(image),
        mos=float(mos),
        distortion=distortion,
        level=float(level),
        implementation=implementation,
        source=source,
    )


def _checked_distortion_names(names: Sequence[str] | None) -> list[str]:
    if names is None:
        return list(DISTORTION_TYPES)
    unknown = sorted(set(names) - set(DISTORTION_TYPES))
    if unknown or not names:
        raise ValueError(f"unknown or no distortion types {unknown}; choose from {sorted(DISTORTION_TYPES)}")
    return list(names)


def write_evaluation_set(
    directory: str | os.PathLike,
    *,
    crops_per_photo: int = 4,
    size: int = 224,
    seed: int = 0,
    distortions: Sequence[str] | None = None,
) -> Path:
    """Write the held-out evaluation set to ``directory`` and return the manifest's path.

    For each of the `content.HELD_OUT_PHOTOS`, ``crops_per_photo`` random ``size`` x ``size`` crops;
    each crop is saved pristine (level 0, label 5) and distorted by every type of ``distortions``
    (default: all) at levels 1..5 with a held-out implementation, as
    ``<crop>/<distortion>_<level>.png``. Labels come from `quality_labels`. The images depend only on
    ``(seed, photo, crop index, type, level)``, so a subset of types gives the same images as the
    full set for those types. The arguments are recorded in `SETTINGS_NAME` (see `evaluation_settings`).
    """
    if crops_per_photo < 1 or size < MIN_SIDE:
        raise ValueError(f"need crops_per_photo >= 1 and size >= {MIN_SIDE}, got {crops_per_photo} and {size}")
    directory = Path(directory)
    names = _checked_distortion_names(distortions)
    rows = []
    for photo_index, photo in enumerate(HELD_OUT_PHOTOS):
        for crop_index in range(crops_per_photo):
            crop = f"{photo}_{crop_index}"
            (directory / crop).mkdir(parents=True, exist_ok=True)
            pristine = photo_crop(photo, size, np.random.default_rng([seed, photo_index, crop_index]))
            common = dict(source=f"photo:{photo}", group=crop)
            _save_png(directory / crop / f"{PRISTINE}.png", pristine)
            pristine_fields = dict(distortion=PRISTINE, level=0, implementation="none")
            rows.append(dict(image=f"{crop}/{PRISTINE}.png", mos=5.0, **pristine_fields, **common))
            versions = distorted_versions(pristine, names, (seed, photo_index, crop_index), "held_out")
            for name, level, implementation, distorted, mos in versions:
                image = f"{crop}/{name}_{level}.png"
                _save_png(directory / image, distorted)
                fields = dict(distortion=name, level=level, implementation=implementation)
                rows.append(dict(image=image, mos=round(mos, 4), **fields, **common))
    settings = evaluation_settings(crops_per_photo=crops_per_photo, size=size, seed=seed, distortions=names)
    (directory / SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n")
    manifest = directory / MANIFEST_NAME
    with manifest.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def distorted_versions(
    pristine: np.ndarray, names: Sequence[str], seed: Sequence[int], split: str
) -> Iterator[tuple[str, int, str, np.ndarray, float]]:
    """Every type of ``names`` at every integer level applied to one pristine unit image with a
    ``split`` implementation, as ``(type, level, implementation, distorted unit image, label)``.

    Each version's implementation and randomness come from ``default_rng([*seed, t, level])``, ``t``
    the type's index in `DISTORTION_TYPES`, so a version does not depend on which other types are
    asked for.
    """
    all_names = list(DISTORTION_TYPES)
    for name in names:
        distortion = DISTORTION_TYPES[name]
        for level in LEVELS:
            rng = np.random.default_rng([*seed, all_names.index(name), level])
            implementation = distortion.choose_implementation(rng, split)
            distorted = quantise(distortion(pristine, level, rng, implementation))
            yield name, level, implementation, distorted, mos_label(level, fidelity(pristine, distorted))


def evaluation_settings(*, crops_per_photo: int, size: int, seed: int, distortions: Sequence[str] | None) -> dict:
    """What determines an evaluation set: the `write_evaluation_set` arguments and the held-out
    photos, as the JSON-ready dict stored in `SETTINGS_NAME`."""
    return dict(
        crops_per_photo=crops_per_photo,
        size=size,
        seed=seed,
        distortions=_checked_distortion_names(distortions),
        held_out_photos=list(HELD_OUT_PHOTOS),
    )


def _save_png(path: Path, image: np.ndarray) -> None:
    # Fast zlib setting: the set is written once per evaluation directory and size hardly matters.
    Image.fromarray(to_uint8(image)).save(path, compress_level=1)


def read_sample_rows(manifest: str | os.PathLike) -> list[dict]:
    """Rows of a manifest written by `write_evaluation_set`: dicts with the `MANIFEST_COLUMNS`,
    ``image`` an absolute `Path`, ``mos`` and ``level`` floats, the rest strings."""
    manifest = Path(manifest)
    with manifest.open(newline="") as file:
        reader = csv.DictReader(file)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{manifest}: missing columns {sorted(missing)}")
        rows = list(reader)
    for row in rows:
        row["image"] = (manifest.parent / row["image"]).resolve()
        row["mos"] = float(row["mos"])
        row["level"] = float(row["level"])
    return rows
