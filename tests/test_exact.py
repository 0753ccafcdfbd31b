"""Accuracy on models with exact posteriors (DESIGN §5): fitted through the
Python API with default settings (method auto), and with meanfield where the
posterior factorises, means within 0.1 posterior sd and sds within 15% of the
closed form computed here in numpy; every fit's verdict is 'good'.

Run `python tests/test_exact.py` for the error table."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np
import pytest

import ppl

MEAN_TOL = 0.1      # |mean error| / posterior sd
SD_TOL = 0.15       # |sd ratio - 1|


@dataclass
class Case:
    name: str
    src: str
    data: Dict
    exact: Dict[str, Tuple[float, float]]        # param -> (mean, sd)
    methods: Tuple[str, ...]


def _betaln(a, b):
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def normal_mean() -> Case:
    rng = np.random.default_rng(101)
    N, sigma, m0, s0 = 20, 2.0, 1.0, 3.0
    y = rng.normal(2.3, sigma, N)
    prec = 1 / s0 ** 2 + N / sigma ** 2
    mean = (m0 / s0 ** 2 + y.sum() / sigma ** 2) / prec
    src = f"data y: real[N]\nmu ~ normal({m0}, {s0})\ny ~ normal(mu, {sigma})\n"
    return Case("normal_mean", src, {"y": y.tolist()}, {"mu": (mean, 1 / math.sqrt(prec))}, ("auto", "meanfield"))


def gamma_poisson() -> Case:
    rng = np.random.default_rng(102)
    N, a0, b0 = 30, 3.0, 0.5                       # gamma(alpha, beta) with beta a rate
    y = rng.poisson(4.2, N)
    a, b = a0 + y.sum(), b0 + N
    src = f"data y: int<lower=0>[N]\nlam ~ gamma({a0}, {b0})\ny ~ poisson(lam)\n"
    return Case("gamma_poisson", src, {"y": y.tolist()}, {"lam": (a / b, math.sqrt(a) / b)}, ("auto", "meanfield"))


def beta_binomial() -> Case:
    rng = np.random.default_rng(103)
    N, a0, b0 = 25, 2.0, 2.0
    n = rng.integers(3, 15, N)                      # trials per row
    y = rng.binomial(n, 0.3)
    a, b = a0 + y.sum(), b0 + (n - y).sum()
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    src = f"data n: int<lower=0>[N]\ndata y: int<lower=0>[N]\np ~ beta({a0}, {b0})\ny ~ binomial(n, p)\n"
    return Case("beta_binomial", src, {"n": n.tolist(), "y": y.tolist()}, {"p": (mean, math.sqrt(var))},
                ("auto", "meanfield"))


def linear_regression() -> Case:
    """Known noise, correlated predictors (pairwise correlation 0.9): a correlated Gaussian posterior."""
    rng = np.random.default_rng(104)
    N, D, sigma, s0 = 40, 3, 1.5, 5.0
    C = 0.9 * np.ones((D, D)) + 0.1 * np.eye(D)
    X = rng.normal(size=(N, D)) @ np.linalg.cholesky(C).T
    y = 0.7 + X @ np.array([1.0, -0.5, 0.3]) + rng.normal(0, sigma, N)
    Z = np.column_stack([np.ones(N), X])            # alpha, beta[1..D]
    P = Z.T @ Z / sigma ** 2 + np.eye(D + 1) / s0 ** 2
    cov = np.linalg.inv(P)
    mean = cov @ (Z.T @ y) / sigma ** 2
    src = (f"data X: real[N, D]\ndata y: real[N]\nalpha ~ normal(0, {s0})\nbeta[D] ~ normal(0, {s0})\n"
           f"y ~ normal(alpha + X @ beta, {sigma})\n")
    names = ["alpha"] + [f"beta[{i + 1}]" for i in range(D)]
    exact = {k: (mean[i], math.sqrt(cov[i, i])) for i, k in enumerate(names)}
    corr = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    assert np.abs(corr[1:, 1:][np.triu_indices(D, 1)]).max() > 0.5     # the posterior really is correlated
    return Case("linear_regression", src, {"X": X.tolist(), "y": y.tolist()}, exact, ("auto",))


def gaussian_hierarchy() -> Case:
    """mu ~ N(0, 5^2), theta_j ~ N(mu, tau^2) with tau known, y_j ~ N(theta_j, sigma_j^2): jointly Gaussian."""
    rng = np.random.default_rng(105)
    J, s_mu, tau = 8, 5.0, 2.0
    sig = rng.uniform(0.8, 3.0, J)
    y = 1.5 + rng.normal(0, tau, J) + rng.normal(0, sig)
    # precision of (mu, theta_1..J)
    P = np.zeros((J + 1, J + 1))
    P[0, 0] = 1 / s_mu ** 2 + J / tau ** 2
    P[0, 1:] = P[1:, 0] = -1 / tau ** 2
    P[1:, 1:] = np.diag(1 / tau ** 2 + 1 / sig ** 2)
    h = np.concatenate([[0.0], y / sig ** 2])
    cov = np.linalg.inv(P)
    mean = cov @ h
    src = (f"data y: real[J]\ndata sigma: real<lower=0>[J]\nmu ~ normal(0, {s_mu})\n"
           f"theta[J] ~ normal(mu, {tau})\ny ~ normal(theta, sigma)\n")
    names = ["mu"] + [f"theta[{j + 1}]" for j in range(J)]
    exact = {k: (mean[i], math.sqrt(cov[i, i])) for i, k in enumerate(names)}
    return Case("gaussian_hierarchy", src, {"y": y.tolist(), "sigma": sig.tolist()}, exact, ("auto",))


CASES = [normal_mean(), gamma_poisson(), beta_binomial(), linear_regression(), gaussian_hierarchy()]
PARAMS = [pytest.param(c, m, id=f"{c.name}-{m}") for c in CASES for m in c.methods]


def fit_case(case: Case, method: str):
    # 4000 draws: the Monte Carlo error of the reported moments (~0.016 sd) stays well inside the bars
    return ppl.loads(case.src, f"{case.name}.ppl").fit(case.data, method=method, seed=0, draws=4000)


def errors(case: Case, fit):
    s = fit.summary()
    rows = []
    for k, (m, sd) in case.exact.items():
        rows.append((k, (s[k]["mean"] - m) / sd, s[k]["sd"] / sd))
    return rows


@pytest.mark.parametrize("case,method", PARAMS)
def test_exact_posterior(case, method):
    f = fit_case(case, method)
    if method == "auto":
        assert f.method == "fullrank"                         # auto picks fullrank at this size
    else:
        assert f.method == method
    for k, err, ratio in errors(case, f):
        assert abs(err) <= MEAN_TOL, f"{case.name} {method} {k}: mean off by {err:.3f} sd"
        assert abs(ratio - 1) <= SD_TOL, f"{case.name} {method} {k}: sd ratio {ratio:.3f}"
    assert f.verdict_label == "good", (f.verdict, f.khat, f.ess)
    assert np.isfinite(f.elbo)


if __name__ == "__main__":          # the accuracy table
    print(f"{'model':<20} {'method':<10} {'param':<10} {'err/sd':>7} {'sd ratio':>8}  verdict (k-hat, ESS)")
    for c in CASES:
        for m in c.methods:
            f = fit_case(c, m)
            for k, err, ratio in errors(c, f):
                print(f"{c.name:<20} {f.method:<10} {k:<10} {err:>7.3f} {ratio:>8.3f}  "
                      f"{f.verdict_label} ({f.khat:.2f}, {f.ess:.2f}) {f.steps} steps")
