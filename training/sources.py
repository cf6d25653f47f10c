"""From a `DatasetConfig` to the records it selects: manifest or official reader, split, selection."""

from __future__ import annotations

from .config import DatasetConfig
from .data import IQARecord, assign_random_split, read_manifest
from .official import OFFICIAL_READERS


def load_records(spec: DatasetConfig) -> list[IQARecord]:
    """The records of ``spec``: read, randomly split if asked (``test_fraction``), and restricted to
    ``spec.split``. Raises `ValueError` naming the dataset when nothing is left."""
    if spec.format == "manifest":
        records = read_manifest(spec.path, spec.image_root, spec.mos_range)
    else:
        records = OFFICIAL_READERS[spec.format](spec.path)
    if spec.test_fraction is not None:
        if any(record.split for record in records):
            raise ValueError(f"dataset {spec.name!r} has its own split; test_fraction is for datasets without one")
        records = assign_random_split(records, spec.test_fraction, spec.split_seed)
    if spec.split is not None:
        present = sorted({record.split for record in records if record.split})
        records = [record for record in records if record.split == spec.split]
        if not records:
            hint = "" if present else " (it has no split labels: set test_fraction for a random split)"
            raise ValueError(
                f"dataset {spec.name!r}: no records in split {spec.split!r}; splits present: {present}{hint}"
            )
    if not records:
        raise ValueError(f"dataset {spec.name!r} ({spec.path}) has no records")
    return records
