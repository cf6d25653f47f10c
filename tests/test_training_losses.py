"""Loss functions against their formulas computed independently (numpy / scipy), and their gradients."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from qscorer_reward.training.losses import (
    fidelity,
    fidelity_loss,
    margin_ranking_loss,
    plcc_loss,
    score_mse_loss,
    score_token_ce_loss,
    thurstone_probability,
)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    predicted = (1 + 4 * torch.rand(6, generator=generator, dtype=torch.float64)).requires_grad_()
    mos = torch.tensor([1.5, 4.2, 3.3, 3.3, 2.0, 4.9], dtype=torch.float64)
    std = torch.tensor([0.4, 0.6, float("nan"), 0.5, 0.3, float("nan")], dtype=torch.float64)
    return predicted, mos, std


def test_mse(batch):
    predicted, mos, _ = batch
    assert score_mse_loss(predicted, mos).item() == pytest.approx(
        np.mean((predicted.detach().numpy() - mos.numpy()) ** 2)
    )


def test_cross_entropy_over_answer_tokens():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=generator, dtype=torch.bfloat16)
    targets = torch.tensor([[1, 2, 6], [0, 0, 3]])
    log_probs = torch.log_softmax(logits.float(), dim=-1).numpy()
    expected = -np.mean([log_probs[b, t, targets[b, t]] for b in range(2) for t in range(3)])
    assert score_token_ce_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_plcc_loss_is_half_of_one_minus_pearson(batch):
    predicted, mos, _ = batch
    expected = (1 - stats.pearsonr(predicted.detach().numpy(), mos.numpy()).statistic) / 2
    assert plcc_loss(predicted, mos).item() == pytest.approx(expected, rel=1e-9)
    assert plcc_loss(2 * mos + 1, mos).item() == pytest.approx(0.0, abs=1e-9)  # affine, increasing
    assert plcc_loss(-mos, mos).item() == pytest.approx(1.0, abs=1e-9)


def test_plcc_loss_is_zero_without_correlation_to_measure():
    one = torch.tensor([3.0], requires_grad=True)
    assert plcc_loss(one, torch.tensor([2.0])).item() == 0.0
    flat = torch.tensor([3.0, 2.0], requires_grad=True)
    loss = plcc_loss(flat, torch.tensor([2.0, 2.0]))
    loss.backward()  # still part of the graph
    assert loss.item() == 0.0 and torch.equal(flat.grad, torch.zeros(2))


def _reference_fidelity(predicted, mos, std, default_std):
    """The formula of the module docstring, pair by pair in plain Python with scipy's normal cdf."""
    losses = []
    for i, j in itertools.combinations(range(len(mos)), 2):
        si = std[i] if not math.isnan(std[i]) else default_std
        sj = std[j] if not math.isnan(std[j]) else default_std
        sigma = math.sqrt(si**2 + sj**2)
        q = stats.norm.cdf((predicted[i] - predicted[j]) / sigma)
        if math.isnan(std[i]) or math.isnan(std[j]):
            p = 1.0 if mos[i] > mos[j] else 0.5 if mos[i] == mos[j] else 0.0
        else:
            p = stats.norm.cdf((mos[i] - mos[j]) / sigma)
        losses.append(1 - math.sqrt(p * q + 1e-8) - math.sqrt((1 - p) * (1 - q) + 1e-8))
    return float(np.mean(losses))


@pytest.mark.parametrize("with_std", [True, False])
def test_fidelity_loss_matches_the_thurstone_formula(batch, with_std):
    predicted, mos, std = batch
    std_values = std.numpy() if with_std else np.full(6, np.nan)
    expected = _reference_fidelity(predicted.detach().numpy(), mos.numpy(), std_values, default_std=0.8)
    got = fidelity_loss(predicted, mos, std if with_std else None, default_std=0.8)
    assert got.item() == pytest.approx(expected, rel=1e-7)


def test_fidelity_with_known_std_is_smallest_at_the_mos():
    mos = torch.tensor([1.2, 2.5, 3.1, 4.6], dtype=torch.float64)
    std = torch.tensor([0.5, 0.7, 0.4, 0.6], dtype=torch.float64)
    at_mos = mos.clone().requires_grad_()
    loss = fidelity_loss(at_mos, mos, std)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-3)  # only the eps under the square roots remains
    assert at_mos.grad.abs().max().item() < 1e-3
    for scale in (0.5, 2.0):
        spread = mos.mean() + scale * (mos - mos.mean())
        assert fidelity_loss(spread, mos, std).item() > loss.item()


def test_fidelity_core_and_thurstone_probability():
    assert thurstone_probability(torch.tensor(0.0), torch.tensor(1.0)).item() == pytest.approx(0.5)
    assert thurstone_probability(torch.tensor(1.0), torch.tensor(2.0)).item() == pytest.approx(stats.norm.cdf(0.5))
    same = torch.tensor([0.1, 0.5, 0.9])
    assert fidelity(same, same).item() == pytest.approx(0.0, abs=1e-3)
    assert fidelity(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(1.0, abs=1e-3)


def test_margin_ranking_loss(batch):
    predicted, mos, _ = batch
    values, targets = predicted.detach().numpy(), mos.numpy()
    hinges = [
        max(0.0, 0.3 - np.sign(targets[i] - targets[j]) * (values[i] - values[j]))
        for i, j in itertools.combinations(range(6), 2)
        if targets[i] != targets[j]
    ]
    assert margin_ranking_loss(predicted, mos, margin=0.3).item() == pytest.approx(np.mean(hinges))
    ordered = torch.tensor([1.0, 2.0, 3.0])
    assert margin_ranking_loss(ordered, ordered, margin=0.5).item() == 0.0
    assert margin_ranking_loss(ordered, torch.full((3,), 2.0)).item() == 0.0  # no pair to rank


@pytest.mark.parametrize(
    "loss",
    [
        lambda p, m, s: score_mse_loss(p, m),
        lambda p, m, s: plcc_loss(p, m),
        lambda p, m, s: fidelity_loss(p, m, s),
        lambda p, m, s: margin_ranking_loss(p, m, margin=2.0),
    ],
    ids=["mse", "plcc", "fidelity", "ranking"],
)
def test_gradients_match_finite_differences(batch, loss):
    predicted, mos, std = batch
    assert torch.autograd.gradcheck(lambda p: loss(p, mos, std), (predicted,), eps=1e-6, atol=1e-6)
