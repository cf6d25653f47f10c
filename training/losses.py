"""Training losses for Q-Scorer: plain functions, tensors in, a scalar tensor out.

Scores and MOS are on the same scale (MOS rescaled to 1..5). Every function accepts float tensors
of any float dtype and returns a 0-dim tensor in the dtype of ``predicted`` (float32 in training),
differentiable with respect to ``predicted``.

=================  =======================================================================
loss               formula (batch of B images, pairs i < j)
=================  =======================================================================
score MSE          mean_i (s_i - m_i)^2
score-token CE     mean over answer tokens of -log softmax(logits)[target]
PLCC               (1 - r(s, m)) / 2, r the Pearson correlation over the batch
fidelity           mean_ij 1 - sqrt(p_ij q_ij) - sqrt((1 - p_ij)(1 - q_ij))
                   q_ij = Phi((s_i - s_j) / sigma_ij) (predicted, Thurstone case V)
                   p_ij = Phi((m_i - m_j) / sigma_ij) with MOS std known, else
                   1 / 0.5 / 0 as m_i >, =, < m_j
                   sigma_ij = sqrt(sigma_i^2 + sigma_j^2), sigma = MOS std (or default_std)
margin ranking     mean_ij max(0, margin - sign(m_i - m_j) (s_i - s_j)) over pairs with m_i != m_j
=================  =======================================================================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def score_mse_loss(predicted: torch.Tensor, mos: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted scores ``[B]`` and MOS ``[B]``."""
    return F.mse_loss(predicted, mos.to(predicted.dtype))


def score_token_ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens.

    Args:
        logits: ``[B, T, V]`` logits at the positions that predict the T answer tokens (the answer
            prefix and the score tokens); computed in float32 whatever their dtype.
        targets: ``[B, T]`` int64 token ids those positions predict.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def plcc_loss(predicted: torch.Tensor, mos: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(1 - r) / 2`` with ``r`` the Pearson correlation of predictions and MOS over the batch.

    In [0, 1]; 0 when the scores are an increasing affine function of the MOS. Batches of fewer than
    two images, or with constant MOS, carry no correlation: the loss is then 0 (still connected to
    ``predicted`` so that every rank of a distributed run builds the same graph).
    """
    if predicted.numel() < 2:
        return predicted.sum() * 0.0
    p = predicted - predicted.mean()
    m = mos.to(predicted.dtype) - mos.to(predicted.dtype).mean()
    if float(m.norm()) < eps:
        return predicted.sum() * 0.0
    r = (p * m).sum() / (p.norm() * m.norm() + eps)
    return (1.0 - r) / 2.0


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x), the standard normal distribution function."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def thurstone_probability(difference: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """P(first better than second) = Phi(difference / std) under Thurstone's case V model.

    ``difference``: mean quality of the first minus the second; ``std``: the standard deviation of
    that difference (``sqrt(sigma_1^2 + sigma_2^2)``), > 0.
    """
    return standard_normal_cdf(difference / std)


def fidelity(predicted_probability: torch.Tensor, target_probability: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Fidelity loss between pairwise preference probabilities (any matching shapes), averaged.

    ``1 - sqrt(p q) - sqrt((1 - p)(1 - q))`` per pair: 0 when the probabilities agree, at most 1.
    ``eps`` keeps the square roots differentiable at 0.
    """
    p, q = predicted_probability, target_probability.to(predicted_probability.dtype)
    loss = 1.0 - torch.sqrt(p * q + eps) - torch.sqrt((1.0 - p) * (1.0 - q) + eps)
    return loss.mean()


def fidelity_loss(
    predicted: torch.Tensor,
    mos: torch.Tensor,
    mos_std: torch.Tensor | None = None,
    default_std: float = 1.0,
) -> torch.Tensor:
    """Fidelity loss over all pairs of the batch (see the module docstring for the formula).

    Args:
        predicted: ``[B]`` scores.
        mos: ``[B]`` MOS.
        mos_std: ``[B]`` standard deviation of each MOS on the same scale, NaN where unknown.
            A pair's target is Thurstone's probability when both stds are known, else 1 / 0.5 / 0.
        default_std: the std used for an image whose MOS std is unknown (for the predicted
            probability; with stds known the prediction uses the same sigma as the target, so the
            loss is smallest when the scores equal the MOS, as the MSE term wants).
    """
    batch = predicted.numel()
    if batch < 2:
        return predicted.sum() * 0.0
    mos = mos.to(predicted.dtype)
    if mos_std is None:
        mos_std = torch.full_like(mos, float("nan"))
    mos_std = mos_std.to(predicted.dtype)
    known = ~torch.isnan(mos_std)
    sigma = torch.where(known, mos_std, torch.full_like(mos_std, default_std)).clamp_min(1e-3)
    i, j = torch.triu_indices(batch, batch, offset=1, device=predicted.device)
    pair_std = torch.sqrt(sigma[i] ** 2 + sigma[j] ** 2)
    predicted_probability = thurstone_probability(predicted[i] - predicted[j], pair_std)
    mos_difference = mos[i] - mos[j]
    step = (torch.sign(mos_difference) + 1.0) / 2.0
    both_known = known[i] & known[j]
    target_probability = torch.where(both_known, thurstone_probability(mos_difference, pair_std), step)
    return fidelity(predicted_probability, target_probability)


def margin_ranking_loss(predicted: torch.Tensor, mos: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Hinge loss on every pair with different MOS: the better image should score at least
    ``margin`` higher. 0 when no pair differs."""
    batch = predicted.numel()
    i, j = torch.triu_indices(batch, batch, offset=1, device=predicted.device)
    order = torch.sign(mos[i] - mos[j]).to(predicted.dtype)
    ranked = order != 0
    if not bool(ranked.any()):
        return predicted.sum() * 0.0
    hinge = F.relu(margin - order[ranked] * (predicted[i] - predicted[j])[ranked])
    return hinge.mean()
