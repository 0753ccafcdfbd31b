"""Supports from the graph (ppl.bounds): the per-element bounds a discrete latent gets from its own
distribution and from the nodes that use it."""
from __future__ import annotations

import numpy as np

import ppl
from ppl.bounds import bounds


def _model(src, data):
    return ppl.loads(src, "b.ppl").check(data)


def test_binomial_trials_bound_each_element_by_the_observed_successes():
    m = _model("data y: int<lower=0>[N]\nn[N] ~ poisson(20)\ny ~ binomial(n, 0.3)\n", {"y": [3, 0, 7]})
    b = bounds(m, "n")
    np.testing.assert_array_equal(b.lo, [3, 0, 7])
    assert np.isinf(b.hi).all()
    assert b.why == ["n >= y (binomial trials)"]


def test_a_scalar_trials_latent_is_bounded_by_the_largest_success_count():
    m = _model("data y: int<lower=0>[N]\nn ~ poisson(20)\ny ~ binomial_logit(n, 0.1)\n", {"y": [3, 9, 7]})
    assert float(bounds(m, "n").lo) == 9


def test_a_shifted_use_shifts_the_bound():
    m = _model("data y: int<lower=0>[N]\nn[N] ~ poisson(5)\ny ~ binomial(n + 2, 0.9)\n", {"y": [3, 1, 7]})
    b = bounds(m, "n")
    np.testing.assert_array_equal(b.lo, [1, 0, 5])          # n + 2 >= y, and n >= 0 from the support
    assert b.why == ["n >= y - 2 (binomial trials)"]


def test_a_latent_upper_limit_is_a_relation_and_the_support_gives_the_rest():
    m = _model("data y: real[N]\nn[N] ~ poisson(10)\nk[N] ~ binomial(n, 0.5)\ny ~ normal(k, 1)\n",
               {"y": [1.0, 2.0]})
    b = bounds(m, "n")
    assert b.relations == ["n >= k (binomial trials)"] and (b.lo == 0).all()
    assert (bounds(m, "k").lo == 0).all() and np.isinf(bounds(m, "k").hi).all()   # trials latent: no number


def test_an_index_bounds_a_count_and_a_categorical_keeps_its_support():
    m = _model("data y: real[N]\nmu[3] ~ normal(0, 1)\nk[N] ~ poisson(1)\ny ~ normal(mu[k], 1)\n",
               {"y": [0.1, 0.2]})
    b = bounds(m, "k")
    assert (b.lo == 1).all() and (b.hi == 3).all() and b.why == ["k indexes 3 values"]
    m = _model("data y: real[N]\nw ~ dirichlet(ones(4))\nz[N] ~ categorical(w)\ny ~ normal(z, 1)\n",
               {"y": [0.1, 0.2]})
    b = bounds(m, "z")
    assert (b.lo == 1).all() and (b.hi == 4).all() and not b.why
