"""The supports registry (ppl.supports): every distribution's support is an entry; continuous supports
give a bijection onto their set; discrete ones give their data test, enumeration and q family; and
binomial latents with a known number of trials are summed out exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import biject_to, constraints

import ppl
from ppl import distributions as DS
from ppl.infer.discrete import DISCRETE_QS
from ppl.supports import SUPPORTS


@pytest.mark.parametrize("name", sorted(DS.REGISTRY))
def test_every_distribution_support_is_registered(name):
    spec = DS.REGISTRY[name]
    sup = SUPPORTS[spec.support]
    assert sup.discrete == spec.discrete
    if sup.discrete:
        assert sup.q in DISCRETE_QS and sup.contains is not None
    else:
        assert sup.constraint is not None and sup.transform is not None


@pytest.mark.parametrize("name", sorted(n for n, s in SUPPORTS.items() if s.constraint is not None))
def test_continuous_supports_map_onto_their_set(name):
    c = SUPPORTS[name].constraint(constraints, torch.tensor(-1.0), torch.tensor(2.0))
    t = biject_to(c)
    shape = (5, 3, 3) if name == "corr_cholesky" else (5, 4)
    x = torch.randn(*t.inverse_shape(shape), dtype=torch.float64) if name in ("simplex", "corr_cholesky") else \
        torch.randn(*shape, dtype=torch.float64)
    assert c.check(t(x)).all(), name


def test_discrete_data_tests():
    assert SUPPORTS["boolean"].contains[0](np.array([0, 1])).all()
    assert not SUPPORTS["boolean"].contains[0](np.array([2])).any()
    assert not SUPPORTS["categorical"].contains[0](np.array([0])).any()
    assert SUPPORTS["nonneg_int"].contains[0](np.array([0, 7])).all()


def _binomial_posterior(y, n, p, noise):
    k = np.arange(n + 1)
    logw = (np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in k])
            + k * math.log(p) + (n - k) * math.log1p(-p) - 0.5 * ((y - k) / noise) ** 2)
    w = np.exp(logw - logw.max())
    return w / w.sum()


def test_binomial_latent_with_a_constant_n_is_enumerated_and_exact():
    src = "data y: real[N]\nmu ~ normal(0, 1)\nz ~ binomial(10, 0.3)\ny ~ normal(z + mu, 1)\n"
    m = ppl.loads(src, "b.ppl")
    g = m.graph({"y": [4.2]})
    assert g.nodes["z"]["estimator"] == "enumerate"
    # with mu pinned by a tight prior the posterior of z is the discrete one below
    src2 = "data y: real[N]\nmu ~ normal(0, 0.001)\nz ~ binomial(10, 0.3)\ny ~ normal(z + mu, 1)\n"
    f = ppl.loads(src2, "b.ppl").fit({"y": [4.2]}, draws=40000, seed=1)
    assert f.estimator == "reparam + enumerate (z)"
    post = _binomial_posterior(4.2, 10, 0.3, 1.0)
    freq = np.bincount(f.draws["z"].astype(int), minlength=11) / 40000
    assert np.abs(freq - post).max() < 0.01


def test_binomial_trials_from_data_per_row():
    src = "data y: real[N]\ndata n: int<lower=0>[N]\nmu ~ normal(0, 0.001)\nz[N] ~ binomial(n, 0.4)\n" \
          "y ~ normal(z + mu, 0.7)\n"
    y, n = [1.3, 5.8, 0.2], [3, 8, 2]
    f = ppl.loads(src, "b.ppl").fit({"y": y, "n": n}, draws=40000, seed=2)
    assert "enumerate (z)" in f.estimator
    for i in range(3):
        post = _binomial_posterior(y[i], n[i], 0.4, 0.7)
        freq = np.bincount(f.draws["z"][:, i].astype(int), minlength=n[i] + 1) / 40000
        assert len(freq) == n[i] + 1                     # never more trials than the row has
        assert np.abs(freq - post).max() < 0.012, i


def test_binomial_latent_on_the_score_path_fits():
    src = "data y: real[N]\nmu ~ normal(0, 0.001)\nz ~ binomial(6, 0.5)\ny ~ normal(z + mu, 1)\n"
    f = ppl.loads(src, "b.ppl").fit({"y": [4.1, 3.7]}, estimator="score", draws=20000, seed=3, steps=1500)
    assert "score (z)" in f.estimator
    k = np.arange(7)
    logw = np.array([math.lgamma(7) - math.lgamma(j + 1) - math.lgamma(7 - j) for j in k]) + \
        sum(-0.5 * (v - k) ** 2 for v in (4.1, 3.7))
    w = np.exp(logw - logw.max())
    mean = float((w / w.sum() * k).sum())
    assert abs(f.draws["z"].mean() - mean) < 0.15
