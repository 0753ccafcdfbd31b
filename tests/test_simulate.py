"""Forward simulation by the compiled model (LogJoint.simulate): every registry distribution draws
what its density says, the prior predictive of a normal model has its closed-form moments, the
posterior predictive given exact posterior draws has variance sigma^2 + Var(mu | y), declared
constraints restrict the prior, and every shipped model simulates with the right shapes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ppl
from ppl import distributions as DS
from ppl.backend.log_joint import LogJoint
from ppl.plan import plan
from conftest import MODEL_NAMES, model_paths

N_DRAWS = 40000

# name -> (arguments as model text, statistic, exact value); `x` is declared with these
CASES = {
    "normal": ("0.5, 2", "mean", 0.5),
    "student_t": ("5, 0.5, 2", "mean", 0.5),
    "cauchy": ("0.5, 2", "median", 0.5),
    "half_normal": ("2", "mean", 2 * math.sqrt(2 / math.pi)),
    "half_cauchy": ("2", "median", 2.0),
    "half_student_t": ("3, 2", "median", 2 * 0.7648923),          # |t_3| median: 0.7649
    "exponential": ("1.5", "mean", 1 / 1.5),
    "gamma": ("2.5, 3", "mean", 2.5 / 3),
    "inv_gamma": ("3.5, 3", "mean", 3 / 2.5),
    "lognormal": ("0.2, 0.5", "mean", math.exp(0.2 + 0.125)),
    "beta": ("2, 3.5", "mean", 2 / 5.5),
    "uniform": ("-1, 3", "mean", 1.0),
    "laplace": ("0.5, 2", "mean", 0.5),
    "logistic": ("0.5, 2", "mean", 0.5),
    "weibull": ("2, 3", "mean", 3 * math.gamma(1.5)),
    "dirichlet": ("[2.0, 3.0, 5.0]", "mean", [0.2, 0.3, 0.5]),
    "multi_normal": ("[1.0, -1.0], [[2.0, 0.5], [0.5, 1.0]]", "mean", [1.0, -1.0]),
    "multi_normal_cholesky": ("[1.0, -1.0], [[1.0, 0.0], [0.5, 1.0]]", "mean", [1.0, -1.0]),
    "lkj_corr_cholesky": ("2", "mean_diag", 1.0),
    "bernoulli": ("0.3", "mean", 0.3),
    "bernoulli_logit": ("0.4", "mean", 1 / (1 + math.exp(-0.4))),
    "binomial": ("10, 0.3", "mean", 3.0),
    "binomial_logit": ("10, 0.4", "mean", 10 / (1 + math.exp(-0.4))),
    "poisson": ("3.5", "mean", 3.5),
    "poisson_log": ("1.2", "mean", math.exp(1.2)),
    "neg_binomial_2": ("4, 1.5", "var", 4 + 16 / 1.5),
    "categorical": ("[0.2, 0.5, 0.3]", "mean", 2.1),
    "categorical_logit": ("[0.0, 1.0, -1.0]", "mean", float(np.dot([1, 2, 3], np.exp([0, 1, -1]) / np.exp([0, 1, -1]).sum()))),
}


def test_every_distribution_has_a_case():
    assert set(CASES) == set(DS.REGISTRY)


def _simulate(src, data=None, given=None, S=N_DRAWS, seed=0):
    m = ppl.loads(src, "sim.ppl").check(data)
    lj = LogJoint(m, plan(m))
    return m, lj, lj.simulate(given or {}, S, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CASES))
def test_draws_follow_the_density(name):
    args, stat, exact = CASES[name]
    spec = DS.REGISTRY[name]
    dims = {"lkj_corr_cholesky": "[3, 3]", "dirichlet": "", "multi_normal": "", "multi_normal_cholesky": ""}
    src = f"x{dims.get(name, '')} ~ {name}({args})\n" + ("" if not spec.discrete else "w ~ normal(0, 1)\n")
    m, lj, out = _simulate(src)
    x = out["x"].numpy()
    assert x.shape[0] == N_DRAWS and np.isfinite(x).all()
    # every draw lies in the support: its log density is finite
    dist = lj.distribution(m.nodes["x"])(dict(lj.known), (N_DRAWS,) + tuple(m.nodes["x"].shape[:len(m.nodes["x"].shape) - spec.event_rank]))
    assert torch.isfinite(dist.log_prob(out["x"])).all(), name
    if not spec.discrete and spec.event_rank == 0:
        # the draws' quartiles against the density's: integrate exp(log p) over the range of the draws
        lo, hi = np.quantile(x, [0.0002, 0.9998])
        t = torch.linspace(float(lo), float(hi), 20001, dtype=torch.float64)
        grid_dist = lj.distribution(m.nodes["x"])(dict(lj.known), (t.shape[0],))
        dens = torch.exp(grid_dist.log_prob(t)).numpy()
        cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(t.numpy()))])
        cdf = 0.0002 + cdf / cdf[-1] * 0.9996
        for q in (0.25, 0.5, 0.75):
            assert abs(np.interp(np.quantile(x, q), t.numpy(), cdf) - q) < 0.012, (name, q)
    if stat == "mean":
        est, se = x.mean(0), x.std(0) / math.sqrt(N_DRAWS)
        assert np.all(np.abs(est - np.asarray(exact)) < 5 * se + 1e-9), (name, est, exact, se)
    elif stat == "median":
        est = np.median(x)
        assert abs(est - exact) < 0.03 * max(1.0, abs(exact)), (name, est, exact)
    elif stat == "var":
        assert abs(x.var() / exact - 1) < 0.05, (name, x.var(), exact)
    else:          # a Cholesky factor of a correlation matrix: rows of unit length
        rows = (x ** 2).sum(-1)
        assert np.allclose(rows, 1.0), name


NORMAL = """
data y: real[N]
mu ~ normal(0, 2)
y ~ normal(mu, 1)
"""
Y = [0.3, 1.1, -0.4, 0.8]


def test_prior_predictive_moments():
    _, _, out = _simulate(NORMAL, {"y": Y}, S=100000)
    y = out["y"].numpy()
    assert np.all(np.abs(y.var(0) / 5.0 - 1) < 0.03)          # tau^2 + sigma^2
    c = np.cov(y[:, 0], y[:, 1])[0, 1]
    assert abs(c / 4.0 - 1) < 0.03                              # tau^2
    assert np.all(np.abs(y.mean(0)) < 0.05)


def test_posterior_predictive_variance():
    prec = 1 / 4 + len(Y)
    post_mean, post_var = sum(Y) / prec, 1 / prec
    S = 10000
    mu = post_mean + math.sqrt(post_var) * torch.randn(S, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, _, out = _simulate(NORMAL, {"y": Y}, {"mu": mu}, S=S, seed=6)
    y = out["y"].numpy()
    assert torch.equal(out["mu"], mu)
    assert np.all(np.abs(y.var(0) / (1 + post_var) - 1) < 0.05)
    assert np.all(np.abs(y.mean(0) - post_mean) < 0.06)


def test_declared_constraints_restrict_the_prior():
    src = "data y: real[N]\nsigma: real<lower=1> ~ normal(0, 1)\nmu: ordered[3] ~ normal(0, 1)\ny ~ normal(mu[1], sigma)\n"
    _, _, out = _simulate(src, {"y": [0.2]})
    s = out["sigma"].numpy()
    assert s.min() > 1
    # a standard normal restricted to (1, inf): mean phi(1) / (1 - Phi(1)) = 1.5251
    assert abs(s.mean() - 1.5251) < 0.01
    mu = out["mu"].numpy()
    assert np.all(np.diff(mu, axis=-1) > 0)


def test_same_seed_same_draws():
    a = _simulate(NORMAL, {"y": Y}, S=50, seed=9)[2]["y"]
    b = _simulate(NORMAL, {"y": Y}, S=50, seed=9)[2]["y"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shipped_models_simulate(name):
    m = ppl.load(model_paths(name)[0]).check(model_paths(name)[1])
    lj = LogJoint(m, plan(m))
    out = lj.simulate({}, 3, torch.Generator().manual_seed(0))
    for n, node in m.nodes.items():
        if node.kind in ("latent", "observed", "deterministic"):
            assert tuple(out[n].shape) == (3,) + tuple(node.shape), n
