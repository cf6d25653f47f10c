"""IQA metrics against scipy's on the same data, and the logistic fit on known curves."""

import math

import numpy as np
import pytest
from scipy import optimize, stats

from qscorer_reward.training.metrics import (
    fit_logistic4,
    iqa_metrics,
    kendall_tau,
    logistic4,
    pearson,
    rankdata,
    spearman,
)


def _noisy_pairs(n, seed, ties):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = x + rng.normal(scale=0.7, size=n)
    if ties:  # rounding makes many ties, as MOS on a coarse scale and quantised scores have
        x, y = np.round(x, 1), np.round(y, 1)
    return x, y


@pytest.mark.parametrize("n", [2, 3, 17, 600, 2500])
@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_scipy(n, ties):
    x, y = _noisy_pairs(n, seed=n, ties=ties)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert np.array_equal(rankdata(x), stats.rankdata(x))


def test_kendall_handles_ties_in_both_inputs_like_scipy():
    x = np.array([1, 1, 2, 2, 3, 3, 3, 4.0])
    y = np.array([2, 1, 1, 3, 3, 3, 4, 4.0])
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def test_correlations_of_constant_input_are_nan():
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(pearson([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]))
    assert math.isnan(kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (([1.0, 2.0], [1.0]), "differ in length"),
        (([1.0], [1.0]), "at least 2"),
        (([1.0, np.nan], [1.0, 2.0]), "finite"),
    ],
)
def test_bad_input_is_refused(values, message):
    with pytest.raises(ValueError, match=message):
        spearman(*values)


@pytest.mark.parametrize("beta", [[4.5, 1.2, 0.3, 0.7], [1.0, 5.0, -2.0, 3.0], [80.0, 10.0, 55.0, 9.0]])
def test_logistic_fit_recovers_a_known_curve(beta):
    rng = np.random.default_rng(1)
    x = rng.uniform(beta[2] - 4 * beta[3], beta[2] + 4 * beta[3], size=400)
    fitted = fit_logistic4(x, logistic4(x, beta))
    np.testing.assert_allclose(logistic4(x, fitted), logistic4(x, beta), atol=1e-6 * abs(beta[0] - beta[1]))
    # The same curve, whichever way round the asymptotes are written (|beta4| > 0 by convention).
    if beta[0] > beta[1]:
        np.testing.assert_allclose(fitted, beta, rtol=1e-5, atol=1e-6)


def test_logistic_fit_on_noisy_data_is_as_good_as_scipys_least_squares():
    rng = np.random.default_rng(2)
    x = rng.uniform(1, 5, size=300)
    y = logistic4(x, [4.8, 1.1, 3.2, 0.5]) + rng.normal(scale=0.3, size=300)

    def curve(values, b1, b2, b3, b4):
        return logistic4(values, [b1, b2, b3, b4])

    reference, _ = optimize.curve_fit(curve, x, y, p0=[y.max(), y.min(), x.mean(), x.std()], maxfev=20000)
    ours = fit_logistic4(x, y)

    def sse(beta):
        return float(((logistic4(x, beta) - y) ** 2).sum())

    assert sse(ours) <= sse(reference) * (1 + 1e-9)


def test_logistic_fit_refuses_constant_predictions():
    with pytest.raises(ValueError, match="constant"):
        fit_logistic4([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])


def test_iqa_report_plcc_and_rmse_are_after_the_logistic_mapping():
    rng = np.random.default_rng(3)
    mos = rng.uniform(1, 5, size=200)
    predicted = np.exp(mos)  # monotonic but far from linear and on another scale
    metrics = iqa_metrics(predicted, mos)
    assert metrics["srcc"] == pytest.approx(1.0)
    assert metrics["krcc"] == pytest.approx(1.0)
    mapped = logistic4(predicted, fit_logistic4(predicted, mos))
    assert metrics["plcc"] == pytest.approx(stats.pearsonr(mapped, mos).statistic, abs=1e-12)
    assert metrics["plcc"] > stats.pearsonr(predicted, mos).statistic  # the mapping linearises
    assert metrics["rmse"] == pytest.approx(np.sqrt(np.mean((mapped - mos) ** 2)))
    assert metrics["rmse_raw"] == pytest.approx(np.sqrt(np.mean((predicted - mos) ** 2)))
    assert metrics["n"] == 200


def test_iqa_report_for_constant_predictions():
    metrics = iqa_metrics([3.0] * 5, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert math.isnan(metrics["srcc"]) and math.isnan(metrics["plcc"])
    assert metrics["rmse"] == pytest.approx(np.std([1.0, 2.0, 3.0, 4.0, 5.0]))
