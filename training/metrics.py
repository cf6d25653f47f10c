"""IQA evaluation metrics in numpy (float64): SRCC, PLCC after the 4-parameter logistic fit, KRCC, RMSE.

The logistic mapping is the one of the IQA literature (VQEG), fitted by least squares from the
predictions to the MOS before PLCC and RMSE are computed::

    f(x) = beta2 + (beta1 - beta2) / (1 + exp(-(x - beta3) / |beta4|))

Correlations follow scipy's definitions (``spearmanr``, ``pearsonr``, ``kendalltau`` tau-b), which
the tests check them against; a correlation is NaN when either input is constant.
"""

from __future__ import annotations

import math

import numpy as np

# Rows of the pairwise sign matrices `kendall_tau` computes at once: 8 * KENDALL_CHUNK * n bytes each.
KENDALL_CHUNK = 256


def _as_float_arrays(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"predictions and MOS differ in length: {x.size} vs {y.size}")
    if x.size < 2:
        raise ValueError(f"at least 2 images are needed for a correlation, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("predictions and MOS must be finite")
    return x, y


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy's ``rankdata(method="average")``)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values, and the average rank of each run.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    average = (starts + ends + 1) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def pearson(x, y) -> float:
    """Pearson linear correlation; NaN if either input is constant."""
    x, y = _as_float_arrays(x, y)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denominator if denominator > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman rank correlation (SRCC): Pearson on average ranks."""
    x, y = _as_float_arrays(x, y)
    return pearson(rankdata(x), rankdata(y))


def kendall_tau(x, y) -> float:
    """Kendall's tau-b (KRCC), which accounts for ties as scipy's ``kendalltau`` does."""
    x, y = _as_float_arrays(x, y)
    n = x.size
    concordance = 0.0  # sum over ordered pairs i != j of sign(dx) sign(dy), twice the sum over i < j
    for start in range(0, n, KENDALL_CHUNK):
        sx = np.sign(x[start : start + KENDALL_CHUNK, None] - x[None, :])
        sy = np.sign(y[start : start + KENDALL_CHUNK, None] - y[None, :])
        concordance += float(np.einsum("ij,ij->", sx, sy))
    pairs = n * (n - 1) / 2.0
    ties_x = sum(t * (t - 1) / 2.0 for t in np.unique(x, return_counts=True)[1])
    ties_y = sum(t * (t - 1) / 2.0 for t in np.unique(y, return_counts=True)[1])
    denominator = math.sqrt((pairs - ties_x) * (pairs - ties_y))
    return (concordance / 2.0) / denominator if denominator > 0 else float("nan")


def logistic4(x, beta) -> np.ndarray:
    """The 4-parameter logistic ``beta2 + (beta1 - beta2) / (1 + exp(-(x - beta3) / |beta4|))``."""
    b1, b2, b3, b4 = beta
    z = np.clip((np.asarray(x, dtype=np.float64) - b3) / abs(b4), -500, 500)
    return b2 + (b1 - b2) / (1.0 + np.exp(-z))


def fit_logistic4(predicted, mos, max_iterations: int = 500) -> np.ndarray:
    """Least-squares fit of `logistic4` from ``predicted`` to ``mos`` (Levenberg-Marquardt).

    Returns ``beta`` (float64 ``[4]``, ``beta4 > 0``). The fit runs on standardised data (so it is
    invariant to the scales of both) from the usual start: the MOS extremes as asymptotes (in the
    order of the correlation's sign), the mean prediction as midpoint, the prediction spread as
    slope scale. Raises `ValueError` for constant
    predictions, which no monotonic mapping can relate to the MOS.
    """
    x, y = _as_float_arrays(predicted, mos)
    x_mean, x_scale = x.mean(), x.std()
    y_mean, y_scale = y.mean(), y.std()
    if x_scale == 0:
        raise ValueError("the predictions are constant: no logistic mapping can be fitted")
    y_scale = y_scale or 1.0
    xs, ys = (x - x_mean) / x_scale, (y - y_mean) / y_scale

    def residual(beta):
        return logistic4(xs, beta) - ys

    def jacobian(beta):
        b1, b2, b3, b4 = beta
        s = 1.0 / (1.0 + np.exp(-np.clip((xs - b3) / b4, -500, 500)))
        slope = (b1 - b2) * s * (1.0 - s)
        return np.stack([s, 1.0 - s, -slope / b4, -slope * (xs - b3) / b4**2], axis=1)

    # Upper asymptote on the side the data rise towards (a decreasing relation has beta1 < beta2).
    high, low = (ys.max(), ys.min()) if xs @ ys >= 0 else (ys.min(), ys.max())
    beta = np.array([high, low, 0.0, 1.0])
    cost = float(residual(beta) @ residual(beta))
    damping = 1e-3
    for _ in range(max_iterations):
        r, jac = residual(beta), jacobian(beta)
        normal = jac.T @ jac
        gradient = jac.T @ r
        step = np.linalg.lstsq(normal + damping * np.diag(np.diag(normal) + 1e-12), -gradient, rcond=None)[0]
        candidate = beta + step
        candidate[3] = abs(candidate[3]) or 1e-6
        candidate_cost = float(residual(candidate) @ residual(candidate))
        if candidate_cost < cost:
            converged = cost - candidate_cost <= 1e-12 * max(cost, 1e-30)
            beta, cost, damping = candidate, candidate_cost, max(damping / 10.0, 1e-12)
            if converged:
                break
        else:
            damping *= 10.0
            if damping > 1e12:
                break
    b1, b2, b3, b4 = beta
    return np.array([y_mean + y_scale * b1, y_mean + y_scale * b2, x_mean + x_scale * b3, x_scale * b4])


def iqa_metrics(predicted, mos) -> dict[str, float]:
    """The standard IQA report for one dataset.

    Returns ``srcc``, ``krcc`` (rank correlations of the raw predictions), ``plcc`` and ``rmse``
    (after the logistic mapping fitted to these data, as the literature reports them),
    ``rmse_raw`` (of the predictions as they are: whether the absolute MOS scale is right) and
    ``n``. With constant predictions the correlations are NaN and ``rmse`` is that of the mean.
    """
    x, y = _as_float_arrays(predicted, mos)
    metrics = {"srcc": spearman(x, y), "krcc": kendall_tau(x, y)}
    try:
        mapped = logistic4(x, fit_logistic4(x, y))
    except ValueError:
        mapped = np.full_like(y, y.mean())
    metrics["plcc"] = pearson(mapped, y) if mapped.std() > 0 else float("nan")
    metrics["rmse"] = float(np.sqrt(np.mean((mapped - y) ** 2)))
    metrics["rmse_raw"] = float(np.sqrt(np.mean((x - y) ** 2)))
    metrics["n"] = int(x.size)
    return metrics
