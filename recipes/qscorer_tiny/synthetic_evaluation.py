"""Measure a Q-Scorer on the held-out synthetic evaluation set (`synthetic_iqa.write_evaluation_set`).

Per distortion type, over all crops of the held-out photos, each crop pristine (level 0) and at
levels 1..5 with the type's held-out implementations:

- ``srcc``: Spearman rank correlation between the scores and the negated level, pooled over the
  crops (so content differences between crops count against it); 1 means every stronger
  distortion scored lower, 0 no relation. A scorer giving every image the same score has no
  ranking and counts as 0 (Spearman's coefficient is undefined there).
- ``within_crop_srcc``: the same per crop (its 6 images), averaged over crops: ranking with content fixed.
- ``pristine_above_level5``: fraction of crops whose pristine version scores strictly above its
  level-5 version (ties count as failures).

Summary: ``mean_srcc`` (mean of the per-type ``srcc``), ``mean_within_crop_srcc``,
``pristine_above_level5`` (pooled over all crop and type pairs) and ``srcc_vs_label`` (Spearman
correlation between scores and the synthetic MOS labels over all images, which also tests the
ordering across types). With a ``source`` column (the evaluation set's photo of each crop),
``mean_srcc_per_source`` repeats ``mean_srcc`` on each source's crops alone. `TARGETS` are the
acceptance levels of the bundled default model.

`mean_srcc_interval` gives a bootstrap interval of ``mean_srcc`` over the crops: how much the number
depends on which crops happened to be drawn (not how much it moves between training runs).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import torch
from scipy import stats

from .synthetic_iqa import PRISTINE

TARGETS = {"mean_srcc": 0.85, "pristine_above_level5": 0.95}


def score_rows(scorer, rows: list[dict], batch_size: int = 16) -> np.ndarray:
    """Scores ``[N]`` float64 of the images of manifest ``rows`` (from `synthetic_iqa.read_sample_rows`)."""
    with torch.no_grad():
        scores = scorer([str(row["image"]) for row in rows], batch_size=batch_size)
    return scores.double().cpu().numpy()


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rank correlation; 0.0 when either side is constant (no ranking information)."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if len(first) < 2 or np.ptp(first) == 0 or np.ptp(second) == 0:
        return 0.0
    return float(stats.spearmanr(first, second).statistic)


def summarise(rows: list[dict], scores: np.ndarray) -> dict:
    """The measures described in the module docstring, as a JSON-ready dict:
    ``{"per_distortion": {name: {"srcc", "within_crop_srcc", "pristine_above_level5", "images"}},
    "mean_srcc", "mean_within_crop_srcc", "pristine_above_level5", "srcc_vs_label", "images",
    "crops", "targets", "meets_targets"}``, plus ``"mean_srcc_per_source": {source: mean_srcc}``
    when the rows carry a ``source``."""
    by_type = _versions_by_type(rows, scores)
    per_distortion = {}
    pristine_wins = []
    for name, crops in by_type.items():
        wins = [_pristine_beats_level5(versions) for versions in crops.values()]
        wins = [win for win in wins if win is not None]
        pristine_wins += wins
        per_distortion[name] = dict(
            srcc=_pooled_srcc(crops.values()),
            within_crop_srcc=float(np.mean([spearman(*_scores_and_quality(versions)) for versions in crops.values()])),
            pristine_above_level5=float(np.mean(wins)) if wins else math.nan,
            images=sum(len(versions) for versions in crops.values()),
        )
    summary = dict(
        per_distortion=per_distortion,
        mean_srcc=_mean(entry["srcc"] for entry in per_distortion.values()),
        mean_within_crop_srcc=_mean(entry["within_crop_srcc"] for entry in per_distortion.values()),
        pristine_above_level5=_mean(pristine_wins),
        srcc_vs_label=spearman(scores, [row["mos"] for row in rows]),
        images=len(rows),
        crops=sum(row["distortion"] == PRISTINE for row in rows),
        targets=TARGETS,
    )
    summary["meets_targets"] = all(summary[key] >= target for key, target in TARGETS.items())
    source_of_crop = {row["group"]: row["source"] for row in rows if "source" in row}
    if source_of_crop:
        summary["mean_srcc_per_source"] = {
            source: _mean_srcc(by_type, [crop for crop, its_source in source_of_crop.items() if its_source == source])
            for source in sorted(set(source_of_crop.values()))
        }
    return summary


def mean_srcc_interval(
    rows: list[dict], scores: np.ndarray, *, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile bootstrap interval of `summarise`'s ``mean_srcc``: the crops are drawn with
    replacement ``resamples`` times (as many as there are; a crop drawn twice counts twice) and
    ``mean_srcc`` recomputed on each draw. Seeded, so the same inputs give the same interval."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    by_type = _versions_by_type(rows, scores)
    crops = sorted({crop for crops_of_type in by_type.values() for crop in crops_of_type})
    rng = np.random.default_rng(seed)
    draws = (rng.integers(len(crops), size=len(crops)) for _ in range(resamples))
    means = [_mean_srcc(by_type, [crops[i] for i in draw]) for draw in draws]
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def _versions_by_type(rows: list[dict], scores: np.ndarray) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{type: {crop: [(level, score), ...]}}``, each crop's pristine version first (level 0)."""
    if len(rows) != len(scores):
        raise ValueError(f"{len(rows)} rows but {len(scores)} scores")
    pristine_score = {row["group"]: score for row, score in zip(rows, scores) if row["distortion"] == PRISTINE}
    by_type: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(dict)
    for row, score in zip(rows, scores):
        if row["distortion"] == PRISTINE:
            continue
        versions = by_type[row["distortion"]].setdefault(row["group"], [(0.0, float(pristine_score[row["group"]]))])
        versions.append((row["level"], float(score)))
    return by_type


def _pooled_srcc(crops: Iterable[list[tuple[float, float]]]) -> float:
    """SRCC between scores and negated levels over all versions of the given crops."""
    pooled = np.array([version for versions in crops for version in versions])
    return spearman(pooled[:, 1], -pooled[:, 0])


def _mean_srcc(by_type: dict[str, dict[str, list[tuple[float, float]]]], crops: list[str]) -> float:
    """Mean over types of the pooled SRCC on ``crops`` (repeats count); types without them are skipped."""
    return _mean(
        _pooled_srcc(versions[crop] for crop in crops if crop in versions)
        for versions in by_type.values()
        if any(crop in versions for crop in crops)
    )


def _scores_and_quality(versions: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    levels, scores = np.array(versions).T
    return scores, -levels


def _pristine_beats_level5(versions: list[tuple[float, float]]) -> bool | None:
    """Whether the pristine score (first entry) is above the level-5 score; None without a level 5."""
    level5 = [score for level, score in versions if level == 5]
    return bool(versions[0][1] > level5[0]) if level5 else None


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def format_table(summary: dict) -> str:
    """A plain-text table of a `summarise` result, one line per distortion type and the summary."""
    lines = [f"{'distortion':<22} {'SRCC':>7} {'in-crop':>8} {'pristine>L5':>12}"]
    rows = [
        (name, entry["srcc"], entry["within_crop_srcc"], entry["pristine_above_level5"])
        for name, entry in summary["per_distortion"].items()
    ]
    rows.append(("mean", summary["mean_srcc"], summary["mean_within_crop_srcc"], summary["pristine_above_level5"]))
    lines += [f"{name:<22} {srcc:>7.3f} {within:>8.3f} {wins:>12.3f}" for name, srcc, within, wins in rows]
    lines.append(
        f"SRCC against the synthetic MOS labels, all {summary['images']} images: {summary['srcc_vs_label']:.3f}"
    )
    if "mean_srcc_interval" in summary:
        low, high = summary["mean_srcc_interval"]
        lines.append(f"mean SRCC, 95% bootstrap interval over the {summary['crops']} crops: {low:.3f} .. {high:.3f}")
    if "mean_srcc_per_source" in summary:
        per_source = ", ".join(f"{source} {value:.3f}" for source, value in summary["mean_srcc_per_source"].items())
        lines.append(f"mean SRCC per source: {per_source}")
    targets = ", ".join(f"{key} >= {value}" for key, value in summary["targets"].items())
    lines.append(f"targets ({targets}): {'met' if summary['meets_targets'] else 'not met'}")
    return "\n".join(lines)
