"""Score IQA datasets with a model and report the metrics, on one process or sharded over several."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from qscorer_reward.extras import require_extra

from .data import IQADataset, IQARecord, collate_items
from .metrics import iqa_metrics

require_extra("train", "qscorer_reward.training")

METRIC_COLUMNS = ("srcc", "plcc", "krcc", "rmse", "rmse_raw")


def predict(
    score_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    records: Sequence[IQARecord],
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    description: str = "eval",
) -> tuple[dict[int, float], list[tuple[str, str]]]:
    """Score this process's share of ``records``: every ``world_size``-th from ``rank``.

    ``score_fn`` maps a list of uint8 ``[3, H, W]`` images to scores ``[B]``. Every process runs
    the same number of batches (shares are padded by repeating the start), as collective
    communication in a distributed model's forward needs. An unreadable image is replaced in its
    batch by the next readable one (the count of forward passes stays the same) and reported in
    the returned ``(path, error)`` list, without a score. Returns ``{record index: score}``.
    """
    from tqdm.auto import tqdm

    dataset = IQADataset(records)
    per_rank = math.ceil(len(records) / world_size)
    indices = np.resize(np.arange(len(records)), per_rank * world_size)[rank::world_size].tolist()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_items,
        generator=torch.Generator().manual_seed(0),  # leaves the global generator untouched
    )
    scores: dict[int, float] = {}
    failed: list[tuple[str, str]] = []
    with torch.no_grad():
        for batch in tqdm(loader, desc=description, disable=not progress, file=sys.stderr, leave=False):
            failed.extend(batch["failed"])
            values = score_fn(batch["pixels"]).float().cpu().tolist()
            for index, valid, value in zip(batch["index"].tolist(), batch["valid"].tolist(), values):
                if valid:
                    scores[index] = value
    return scores, failed


def dataset_metrics(records: Sequence[IQARecord], scores: dict[int, float]) -> dict[str, float]:
    """`iqa_metrics` over the records that have a score (``n`` says how many)."""
    indices = sorted(scores)
    if len(indices) < 2:
        return {name: float("nan") for name in METRIC_COLUMNS} | {"n": len(indices)}
    return iqa_metrics([scores[i] for i in indices], [records[i].mos for i in indices])


def format_table(report: dict[str, dict[str, float]]) -> str:
    """A fixed-width table of per-dataset metrics (rows: datasets, columns: metrics and n)."""
    width = max([len("dataset"), *map(len, report)])
    lines = [f"{'dataset':<{width}}  " + "  ".join(f"{name:>8}" for name in (*METRIC_COLUMNS, "n"))]
    for name, metrics in report.items():
        values = "  ".join(f"{metrics.get(column, float('nan')):8.4f}" for column in METRIC_COLUMNS)
        lines.append(f"{name:<{width}}  {values}  {int(metrics.get('n', 0)):8d}")
    return "\n".join(lines)


def write_report(report: dict, path: str | os.PathLike) -> None:
    """Write the report as JSON (NaN written as null)."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(report), indent=2) + "\n")
