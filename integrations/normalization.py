"""Normalising Q-Scorer scores for use as rewards beside other reward signals.

Scores live on the MOS scale (`QScorer.score_range`, 1..5). Mixed with a reward on another scale,
they either get mapped to [0, 1] (``"unit"``, a fixed affine map, so rewards stay comparable
across batches) or standardised within each prompt group (``"group_zscore"``, the per-prompt
baseline GRPO and DDPO subtract anyway, made explicit per reward function).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

NORMALIZATIONS = ("unit", "group_zscore")

# Added to the group standard deviation, as GRPO does, so a group of equal scores maps to zeros.
ZSCORE_EPS = 1e-4


def check_normalization(normalize: str | None) -> None:
    """Refuse an unknown normalisation name early, at construction time."""
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be None or one of {NORMALIZATIONS}, got {normalize!r}")


def normalize_scores(
    scores: torch.Tensor,
    normalize: str | None,
    score_range: tuple[float, float],
    groups: Sequence[Hashable] | None = None,
) -> torch.Tensor:
    """Scores ``[N]`` (float, MOS scale) -> rewards ``[N]`` of the same dtype and device.

    Args:
        scores: the scores to normalise; NaN marks a sample without a score and stays NaN.
        normalize: ``None`` (scores unchanged), ``"unit"`` (``(s - low) / (high - low)``, in [0, 1])
            or ``"group_zscore"`` (``(s - mean) / (std + 1e-4)`` over the samples with the same
            ``groups`` key; the standard deviation is the unbiased one, and a group with a single
            scored sample gets 0).
        score_range: ``(low, high)`` of the scorer.
        groups: one hashable key per sample (e.g. its prompt); required for ``"group_zscore"``.
    """
    check_normalization(normalize)
    if normalize is None:
        return scores
    if normalize == "unit":
        low, high = score_range
        return (scores - low) / (high - low)
    if groups is None or len(groups) != len(scores):
        raise ValueError(
            f"normalize='group_zscore' needs one group key per score: got {len(scores)} scores and "
            f"{'no' if groups is None else len(groups)} keys"
        )
    members: dict[Hashable, list[int]] = {}
    for index, key in enumerate(groups):
        members.setdefault(key, []).append(index)
    rewards = scores.clone()
    for indices in members.values():
        group = scores[indices]
        scored = ~torch.isnan(group)
        if scored.sum() < 2:
            rewards[indices] = torch.where(scored, torch.zeros_like(group), group)
            continue
        mean, std = group[scored].mean(), group[scored].std()
        rewards[indices] = (group - mean) / (std + ZSCORE_EPS)
    return rewards
