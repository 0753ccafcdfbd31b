"""Ill-conditioned linear regressions with exact posteriors (pure numpy).

The one generator of these cases: tests/test_laplace.py fits them at small
sizes and bench/modes.py times `ppl fit` on them as a user runs it.

    y ~ normal(Z b, sigma),   Z = [1, x1, x2, ...] with uncentred predictors
    (calendar years around 2000, earnings in dollars ~1e4), b flat
    (`alpha: real`) or normal(0, s0); sigma flat on its constrained scale
    (`sigma: real<lower=0>`: density 1 in sigma, as Stan's undeclared prior)
    or half-normal(s0).

The exact posterior: given sigma, b is Gaussian (precision Z'Z / sigma^2 +
P0, by least squares on the augmented system [Z / sigma; sqrt(P0)], so the
1e8 condition number of Z'Z never enters); sigma's marginal density
p(sigma | y) = p(sigma) N(y; 0, ...) integrated over b in closed form, on a
grid in log sigma wide enough for 12 posterior sds; b's marginal moments are
the grid's mixture of Gaussians.  With a flat prior on b and sigma this is
the multivariate t of the normal-inverse-gamma posterior: sigma^2 ~
InvGamma((N - k - 1) / 2, RSS / 2) and b ~ t_{N-k-1}(b_hat, RSS / (N-k-1) (Z'Z)^-1)
(checked against those formulas in tests/test_laplace.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np


@dataclass
class Case:
    name: str
    src: str                              # the ppl model
    data: Dict[str, list]                 # columns
    exact: Dict[str, Tuple[float, float]]  # parameter -> (mean, sd)


def _regression_src(names: List[str], prior: Optional[float], sigma_prior: Optional[float]) -> str:
    lines = [f"data {x}: real[N]" for x in names[1:]] + ["data y: real[N]"]
    for b in ["alpha"] + [f"beta{i}" if len(names) > 2 else "beta" for i in range(1, len(names))]:
        lines.append(f"{b} ~ normal(0, {prior:g})" if prior else f"{b}: real")
    lines.append(f"sigma ~ half_normal({sigma_prior:g})" if sigma_prior else "sigma: real<lower=0>")
    coefs = ["beta" if len(names) == 2 else f"beta{i}" for i in range(1, len(names))]
    lines.append("y ~ normal(alpha + " + " + ".join(f"{c} * {x}" for c, x in zip(coefs, names[1:])) + ", sigma)")
    return "\n".join(lines) + "\n"


def exact_posterior(Z: np.ndarray, y: np.ndarray, prior_sd: Optional[float] = None,
                    sigma_prior_sd: Optional[float] = None, grid: int = 601):
    """-> (means, sds) of (b..., sigma) under flat or normal(0, prior_sd) priors on b and a flat or
    half-normal(sigma_prior_sd) prior on sigma (constrained scale)."""
    N, k = Z.shape
    P0 = np.zeros(k) if prior_sd is None else np.full(k, 1.0 / prior_sd ** 2)
    # the centre of the grid: the flat-prior least squares fit
    b_ls = np.linalg.lstsq(Z, y, rcond=None)[0]
    s_hat = math.sqrt(float(np.sum((y - Z @ b_ls) ** 2)) / N)
    spread = 1.0 / math.sqrt(2 * max(N - k, 1))         # sd of log sigma, roughly
    log_s = math.log(s_hat) + np.linspace(-14, 14, grid) * spread
    logw = np.empty(grid)
    means = np.empty((grid, k))
    covs = np.empty((grid, k, k))
    for i, ls in enumerate(log_s):
        s = math.exp(ls)
        A = np.vstack([Z / s, np.diag(np.sqrt(P0))])
        r = np.concatenate([y / s, np.zeros(k)])
        Q, R = np.linalg.qr(A)
        m = np.linalg.solve(R, Q.T @ r)
        resid = float(np.sum((r - A @ m) ** 2))       # ||y - Z m||^2 / s^2 + m' P0 m
        logdet_P = 2 * np.sum(np.log(np.abs(np.diag(R))))
        # log p(y | s) integrated over b (constants in s dropped), + log p(s), + log |d s / d log s|
        lp = -N * ls - 0.5 * resid - 0.5 * logdet_P + ls
        if sigma_prior_sd is not None:
            lp -= 0.5 * s * s / sigma_prior_sd ** 2
        logw[i] = lp
        Rinv = np.linalg.inv(R)
        means[i], covs[i] = m, Rinv @ Rinv.T
    w = np.exp(logw - logw.max())
    assert w[0] < 1e-12 * w.max() and w[-1] < 1e-12 * w.max(), "grid too narrow"
    w /= w.sum()
    mean_b = w @ means
    cov_b = np.einsum("i,ijk->jk", w, covs) + np.einsum("i,ij,ik->jk", w, means - mean_b, means - mean_b)
    s = np.exp(log_s)
    mean_s = float(w @ s)
    sd_s = math.sqrt(float(w @ (s - mean_s) ** 2))
    return np.append(mean_b, mean_s), np.append(np.sqrt(np.diag(cov_b)), sd_s)


def regression(name: str, X: np.ndarray, y: np.ndarray, names: List[str], prior: Optional[float] = None,
               sigma_prior: Optional[float] = None) -> Case:
    Z = np.column_stack([np.ones(len(y)), X])
    mean, sd = exact_posterior(Z, y, prior, sigma_prior)
    coefs = ["alpha"] + (["beta"] if Z.shape[1] == 2 else [f"beta{i}" for i in range(1, Z.shape[1])]) + ["sigma"]
    data = {x: X[:, j].tolist() for j, x in enumerate(names[1:])}
    data["y"] = y.tolist()
    return Case(name, _regression_src(names, prior, sigma_prior), data,
                {c: (float(m), float(s)) for c, m, s in zip(coefs, mean, sd)})


def years(N: int = 60, seed: int = 1) -> Case:
    """A trend over calendar years 1971..2030 (x ~ 2000, sd 17): alpha and beta correlate at -0.9996."""
    rng = np.random.default_rng(seed)
    x = np.arange(2001 - N // 2, 2001 - N // 2 + N, dtype=float)
    y = np.round(2.5 + 0.03 * (x - 2000) + rng.normal(0, 0.4, N), 3)
    return regression("years", x[:, None], y, ["y", "x"])


def height_on_earnings(N: int = 1200, seed: int = 2, name: str = "height_on_earn") -> Case:
    """Height in inches (~66) on earnings in dollars (~2e4, skewed)."""
    rng = np.random.default_rng(seed)
    earn = np.round(np.exp(rng.normal(9.8, 0.6, N)), 0)
    height = np.round(64.5 + 6e-5 * earn + rng.normal(0, 3.8, N), 2)
    return regression(name, earn[:, None], height, ["height", "earn"])


def earnings_on_height(N: int = 1200, seed: int = 4, prior: Optional[float] = None,
                       name: str = "earn_on_height") -> Case:
    """Earnings in dollars (~2e4, sd 1.9e4) on height in inches (~66): Gelman & Hill's earn ~ height
    (intercept -6e4, slope 1.3e3, sigma 1.9e4)."""
    rng = np.random.default_rng(seed)
    height = np.round(rng.normal(66.6, 3.8, N), 1)
    earn = np.round(np.maximum(0.0, -61000 + 1300 * height + rng.normal(0, 19000, N)), -2)
    return regression(name, height[:, None], earn, ["earn", "height"], prior)


def years_gdp(N: int = 100, seed: int = 3, prior: Optional[float] = None, name: str = "years_gdp") -> Case:
    """Two uncentred predictors correlated at ~0.99: year (~1990) and GDP per head (~2e4)."""
    rng = np.random.default_rng(seed)
    year = np.arange(1990 - N // 2, 1990 - N // 2 + N, dtype=float)
    gdp = np.round(2e4 * np.exp(0.02 * (year - 1990)) * np.exp(rng.normal(0, 0.05, N)), 0)
    y = np.round(1.0 + 0.02 * (year - 1990) + 1e-4 * (gdp - 2e4) + rng.normal(0, 0.3, N), 3)
    return regression(name, np.column_stack([year, gdp]), y, ["y", "year", "gdp"], prior)


def cases() -> List[Case]:
    """The cases bench/modes.py measures (the issue's sizes): one uncentred predictor (years, earnings
    both ways), two correlated ones, and proper but wide normal(0, 1000) priors on the coefficients
    (against an intercept of -6e4 that prior is not vague: the exact posterior shows the conflict)."""
    return [years(), height_on_earnings(), earnings_on_height(), years_gdp(),
            earnings_on_height(prior=1000.0, name="earn_on_height_wide"),
            years_gdp(prior=1000.0, name="years_gdp_wide")]
