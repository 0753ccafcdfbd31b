"""Distribution registry (ppl.distributions + ppl.backend.dists): every DistSpec
builds with valid example arguments and its log_prob equals a closed form
written here independently (math.lgamma, numpy), in Stan's parameterisations:
gamma/inv_gamma with a rate/scale beta, weibull(k, lambda), neg_binomial_2 by
mean and overdispersion, categorical over 1..K, poisson_log by log-rate.
Densities integrate (pmfs sum) to one, and the first moments are Stan's."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppl import distributions as DS
from ppl.supports import SUPPORTS
from ppl.backend import dists as D

DT = torch.float64
LOG2PI = math.log(2 * math.pi)
lg = math.lgamma


def _lchoose(n, k):
    return lg(n + 1) - lg(k + 1) - lg(n - k + 1)


def _lsig(a):      # log sigmoid(a), stable
    return -math.log1p(math.exp(-a)) if a > 0 else a - math.log1p(math.exp(a))


def _normal(x, m, s):
    return -0.5 * LOG2PI - math.log(s) - 0.5 * ((x - m) / s) ** 2


def _student(x, nu, m, s):
    z = (x - m) / s
    return lg((nu + 1) / 2) - lg(nu / 2) - 0.5 * math.log(nu * math.pi) - math.log(s) - (nu + 1) / 2 * math.log1p(z * z / nu)


def _cauchy(x, m, s):
    z = (x - m) / s
    return -math.log(math.pi * s * (1 + z * z))


# name -> (example args, values to evaluate, closed form f(x, *args))
SCALAR = {
    "normal": ((0.5, 2.0), [-3.0, 0.0, 0.5, 4.2], _normal),
    "student_t": ((4.0, 0.5, 2.0), [-3.0, 0.0, 0.5, 9.0], _student),
    "cauchy": ((0.5, 2.0), [-30.0, 0.0, 0.5, 4.0], _cauchy),
    "half_normal": ((2.0,), [0.01, 0.5, 1.0, 5.0], lambda x, s: math.log(2) + _normal(x, 0.0, s)),
    "half_cauchy": ((2.0,), [0.01, 0.5, 1.0, 50.0], lambda x, s: math.log(2) + _cauchy(x, 0.0, s)),
    "half_student_t": ((3.0, 2.0), [0.01, 0.5, 1.0, 20.0], lambda x, nu, s: math.log(2) + _student(x, nu, 0.0, s)),
    "exponential": ((1.5,), [0.01, 0.5, 1.0, 6.0], lambda x, r: math.log(r) - r * x),
    # gamma(alpha, beta): beta is a RATE
    "gamma": ((2.5, 3.0), [0.05, 0.5, 1.0, 3.0],
              lambda x, a, b: a * math.log(b) - lg(a) + (a - 1) * math.log(x) - b * x),
    # inv_gamma(alpha, beta): beta is a SCALE
    "inv_gamma": ((2.5, 3.0), [0.05, 0.5, 1.0, 7.0],
                  lambda x, a, b: a * math.log(b) - lg(a) - (a + 1) * math.log(x) - b / x),
    "lognormal": ((0.2, 0.7), [0.05, 0.5, 1.0, 7.0], lambda x, m, s: _normal(math.log(x), m, s) - math.log(x)),
    "beta": ((2.0, 3.5), [0.01, 0.3, 0.5, 0.97],
             lambda x, a, b: lg(a + b) - lg(a) - lg(b) + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x)),
    "uniform": ((-1.5, 2.0), [-1.4, 0.0, 1.99], lambda x, lo, hi: -math.log(hi - lo)),
    "laplace": ((0.5, 2.0), [-3.0, 0.5, 0.6, 8.0], lambda x, m, b: -math.log(2 * b) - abs(x - m) / b),
    "logistic": ((0.5, 2.0), [-30.0, 0.0, 0.5, 40.0],
                 lambda x, m, s: -(x - m) / s - 2 * math.log1p(math.exp(-(x - m) / s)) - math.log(s)),
    # weibull(k, lambda): shape k, scale lambda (Stan's order)
    "weibull": ((1.5, 2.0), [0.05, 0.5, 2.0, 6.0],
                lambda x, k, lam: math.log(k) - math.log(lam) + (k - 1) * math.log(x / lam) - (x / lam) ** k),
    "bernoulli": ((0.3,), [0.0, 1.0], lambda x, p: math.log(p) if x == 1 else math.log1p(-p)),
    "bernoulli_logit": ((-0.7,), [0.0, 1.0], lambda x, a: _lsig(a) if x == 1 else _lsig(-a)),
    "binomial": ((7.0, 0.3), [0.0, 2.0, 7.0],
                 lambda x, n, p: _lchoose(n, x) + x * math.log(p) + (n - x) * math.log1p(-p)),
    "binomial_logit": ((7.0, 0.4), [0.0, 2.0, 7.0],
                       lambda x, n, a: _lchoose(n, x) + x * _lsig(a) + (n - x) * _lsig(-a)),
    "poisson": ((3.5,), [0.0, 1.0, 4.0, 15.0], lambda x, lam: x * math.log(lam) - lam - lg(x + 1)),
    "poisson_log": ((1.2,), [0.0, 1.0, 4.0, 15.0], lambda x, a: x * a - math.exp(a) - lg(x + 1)),
    # neg_binomial_2(mu, phi): mean mu, variance mu + mu^2 / phi
    "neg_binomial_2": ((4.0, 1.5), [0.0, 1.0, 4.0, 30.0],
                       lambda x, mu, phi: lg(x + phi) - lg(x + 1) - lg(phi) + phi * math.log(phi / (mu + phi))
                       + x * math.log(mu / (mu + phi))),
}

VECTOR = {"dirichlet", "multi_normal", "multi_normal_cholesky", "lkj_corr_cholesky", "categorical",
          "categorical_logit"}


def _t(v):
    return torch.as_tensor(v, dtype=DT)


def _build(name, *args, **kw):
    spec = DS.REGISTRY[name]
    return spec.build(D, *[_t(a) for a in args], **kw)


def test_registry_is_covered():
    """Every registry entry has a closed-form test here (a new entry needs one)."""
    assert set(DS.REGISTRY) == set(SCALAR) | VECTOR
    for name, spec in DS.REGISTRY.items():
        assert spec.name == name
        assert spec.discrete == SUPPORTS[spec.support].discrete, name
        assert len(spec.param_event_ranks) in (0, spec.arity)
        for _, kind in spec.params:
            assert kind in DS.PARAM_CHECKS
        assert spec.support in SUPPORTS


def test_design_names_are_registered():
    names = ("normal student_t cauchy half_normal half_cauchy half_student_t exponential gamma inv_gamma lognormal "
             "beta uniform laplace logistic weibull dirichlet multi_normal multi_normal_cholesky lkj_corr_cholesky "
             "bernoulli bernoulli_logit binomial binomial_logit poisson poisson_log neg_binomial_2 categorical "
             "categorical_logit").split()
    assert set(names) == set(DS.REGISTRY)


@pytest.mark.parametrize("name", sorted(SCALAR))
def test_scalar_log_prob_closed_form(name):
    args, xs, f = SCALAR[name]
    assert len(args) == DS.REGISTRY[name].arity
    d = _build(name, *args)
    got = d.log_prob(_t(xs))
    want = torch.tensor([f(x, *args) for x in xs], dtype=DT)
    assert got.dtype == DT
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), (name, got, want)


@pytest.mark.parametrize("name", sorted(SCALAR))
def test_scalar_log_prob_batched(name):
    """A leading sample dimension on the parameters broadcasts against the values (as the log joint uses it)."""
    args, xs, f = SCALAR[name]
    S = 3
    scale = [1.0, 1.1, 1.3]
    # perturb the last positive/real parameter per sample (n of the binomials stays an integer)
    batched = []
    for i, a in enumerate(args):
        if i == len(args) - 1 and name not in ("uniform",):
            batched.append([[a * c] for c in scale])
        else:
            batched.append([[a]] * S)
    if name in ("bernoulli", "binomial"):
        batched[-1] = [[args[-1] * c] for c in (1.0, 0.9, 1.2)]
    d = _build(name, *batched)
    got = d.log_prob(_t([xs]))
    assert got.shape == (S, len(xs))
    for s in range(S):
        a_s = [b[s][0] for b in batched]
        want = torch.tensor([f(x, *a_s) for x in xs], dtype=DT)
        assert torch.allclose(got[s], want, rtol=1e-10, atol=1e-10), name


def _integrate(logpdf, support, lo=None, hi=None):
    """Integral of exp(logpdf) over the support, by the trapezoid rule in a variable that maps R onto it."""
    t = np.linspace(-40.0, 40.0, 60001)
    if support == "real":
        t = np.linspace(-26.0, 26.0, 60001)
        x, dx = np.sinh(t), np.cosh(t)
    elif support == "positive":
        t = np.linspace(-30.0, 30.0, 60001)
        x, dx = np.exp(t), np.exp(t)
    elif support == "unit_interval":
        x = 1 / (1 + np.exp(-t))
        dx = x * (1 - x)
    elif support == "interval":
        s = 1 / (1 + np.exp(-t))
        x, dx = lo + (hi - lo) * s, (hi - lo) * s * (1 - s)
    else:
        raise AssertionError(support)
    keep = dx > 0
    x, dx, t = x[keep], dx[keep], t[keep]
    with torch.no_grad():
        lp = logpdf(torch.as_tensor(x, dtype=DT)).numpy()
    g = np.exp(lp) * dx
    g[~np.isfinite(g)] = 0.0
    return float(np.sum((g[1:] + g[:-1]) * np.diff(t)) / 2), x, np.exp(lp) * dx, t


CONTINUOUS_SCALAR = sorted(n for n in SCALAR if not DS.REGISTRY[n].discrete)


@pytest.mark.parametrize("name", CONTINUOUS_SCALAR)
def test_density_integrates_to_one(name):
    args, _, _ = SCALAR[name]
    spec = DS.REGISTRY[name]
    d = _build(name, *args)
    lo, hi = (args if spec.support == "interval" else (None, None))
    total, *_ = _integrate(d.log_prob, spec.support, lo, hi)
    assert abs(total - 1.0) < 1e-4, (name, total)


@pytest.mark.parametrize("nu,sigma", [(1.0, 1.0), (3.0, 2.0), (7.5, 0.3)])
def test_half_student_t_normalised(nu, sigma):
    d = _build("half_student_t", nu, sigma)
    total, *_ = _integrate(d.log_prob, "positive")
    assert abs(total - 1.0) < 1e-4, total


# first moments in Stan's parameterisation: (args, mean)
MEANS = {
    "gamma": ((2.5, 3.0), 2.5 / 3.0),                         # alpha / beta (beta a rate)
    "inv_gamma": ((2.5, 3.0), 3.0 / 1.5),                     # beta / (alpha - 1)
    "weibull": ((1.5, 2.0), 2.0 * math.gamma(1 + 1 / 1.5)),   # lambda Gamma(1 + 1/k)
    "exponential": ((1.5,), 1 / 1.5),                         # 1 / rate
    "lognormal": ((0.2, 0.7), math.exp(0.2 + 0.245)),
    "half_normal": ((2.0,), 2.0 * math.sqrt(2 / math.pi)),
    "beta": ((2.0, 3.5), 2.0 / 5.5),
    "logistic": ((0.5, 2.0), 0.5),
    "laplace": ((0.5, 2.0), 0.5),
}


@pytest.mark.parametrize("name", sorted(MEANS))
def test_stan_parameterisation_mean(name):
    args, mean = MEANS[name]
    spec = DS.REGISTRY[name]
    d = _build(name, *args)
    _, x, w, t = _integrate(d.log_prob, spec.support)
    g = x * w
    m = float(np.sum((g[1:] + g[:-1]) * np.diff(t)) / 2)
    assert abs(m - mean) < 1e-4 * max(1.0, abs(mean)), (name, m, mean)


# ---- discrete: pmfs sum to one, moments --------------------------------------------------------------
def _pmf_moments(d, ks):
    lp = d.log_prob(_t(ks))
    p = torch.exp(lp).numpy()
    ks = np.asarray(ks, dtype=float)
    m = float((p * ks).sum())
    return float(p.sum()), m, float((p * (ks - m) ** 2).sum())


def test_neg_binomial_2_mean_variance():
    mu, phi = 4.0, 1.5
    total, m, v = _pmf_moments(_build("neg_binomial_2", mu, phi), list(range(3000)))
    assert abs(total - 1) < 1e-9
    assert abs(m - mu) < 1e-6
    assert abs(v - (mu + mu * mu / phi)) < 1e-5


@pytest.mark.parametrize("name,args,ks,mean,var", [
    ("poisson", (3.5,), range(200), 3.5, 3.5),
    ("poisson_log", (1.2,), range(200), math.exp(1.2), math.exp(1.2)),
    ("binomial", (7.0, 0.3), range(8), 2.1, 7 * 0.3 * 0.7),
    ("binomial_logit", (7.0, 0.4), range(8), 7 / (1 + math.exp(-0.4)),
     7 / (1 + math.exp(-0.4)) / (1 + math.exp(0.4))),
    ("bernoulli", (0.3,), range(2), 0.3, 0.21),
    ("bernoulli_logit", (-0.7,), range(2), 1 / (1 + math.exp(0.7)), math.exp(0.7) / (1 + math.exp(0.7)) ** 2),
])
def test_pmf_sums_to_one_with_right_moments(name, args, ks, mean, var):
    total, m, v = _pmf_moments(_build(name, *args), list(ks))
    assert abs(total - 1) < 1e-9 and abs(m - mean) < 1e-9 and abs(v - var) < 1e-8, (total, m, v)


def test_poisson_log_stable_for_extreme_log_rates():
    d = _build("poisson_log", [-60.0, 40.0, 0.0])
    k = _t([0.0, math.floor(math.exp(40.0)), 3.0])
    got = d.log_prob(k)
    assert torch.isfinite(got).all()
    want = [-math.exp(-60.0), float(k[1]) * 40.0 - math.exp(40.0) - lg(float(k[1]) + 1), 0.0 - 1.0 - lg(4.0)]
    assert torch.allclose(got, _t(want), rtol=1e-10, atol=1e-8)


# ---- categorical: 1-based values ----------------------------------------------------------------------
def test_categorical_is_one_based():
    p = [0.2, 0.5, 0.3]
    d = _build("categorical", p)
    got = d.log_prob(_t([1.0, 2.0, 3.0]))
    assert torch.allclose(got, torch.log(_t(p)), rtol=1e-12)
    assert abs(float(torch.exp(got).sum()) - 1.0) < 1e-12


def test_categorical_logit_is_one_based():
    a = [0.3, -1.0, 2.0, 0.0]
    d = _build("categorical_logit", a)
    got = d.log_prob(_t([1.0, 2.0, 3.0, 4.0]))
    lse = math.log(sum(math.exp(v) for v in a))
    assert torch.allclose(got, _t([v - lse for v in a]), rtol=1e-12)


def test_categorical_batched_like_the_log_joint():
    """probs (S, 1, K) against values (S, N) -> (S, N), as the log joint aligns a per-row categorical."""
    g = torch.Generator().manual_seed(0)
    P = torch.softmax(torch.randn(2, 1, 3, generator=g, dtype=DT), -1)
    z = _t([[1, 3, 2, 2], [3, 3, 1, 2]])
    got = _build("categorical", P).log_prob(z)
    assert got.shape == (2, 4)
    for s in range(2):
        for n in range(4):
            assert math.isclose(float(got[s, n]), math.log(float(P[s, 0, int(z[s, n]) - 1])), rel_tol=1e-12)
    # per-row probabilities (S, N, K)
    P2 = torch.softmax(torch.randn(2, 4, 3, generator=g, dtype=DT), -1)
    got2 = _build("categorical", P2).log_prob(z)
    want2 = torch.log(P2.gather(-1, (z.long() - 1).unsqueeze(-1)).squeeze(-1))
    assert torch.allclose(got2, want2, rtol=1e-12)


# ---- multivariate ---------------------------------------------------------------------------------------
def _mvn_logpdf(x, mu, S):
    x, mu, S = (np.asarray(v, dtype=float) for v in (x, mu, S))
    d = x - mu
    sign, logdet = np.linalg.slogdet(S)
    return -0.5 * (len(mu) * LOG2PI + logdet + d @ np.linalg.solve(S, d))


def test_dirichlet_closed_form():
    a = [1.0, 2.0, 3.5]
    xs = [[0.2, 0.3, 0.5], [0.05, 0.05, 0.9]]
    got = _build("dirichlet", a).log_prob(_t(xs))
    want = [lg(sum(a)) - sum(lg(ai) for ai in a) + sum((ai - 1) * math.log(xi) for ai, xi in zip(a, x)) for x in xs]
    assert torch.allclose(got, _t(want), rtol=1e-10)
    spec = DS.REGISTRY["dirichlet"]
    assert spec.value_shape([(3,)], lambda a, b: a or b) == ((), (3,))


def test_multi_normal_closed_form():
    mu = [0.0, 1.0, 2.0]
    S = [[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 3.0]]
    xs = [[0.3, -1.0, 2.5], [1.0, 1.0, 1.0]]
    got = _build("multi_normal", mu, S).log_prob(_t(xs))
    assert torch.allclose(got, _t([_mvn_logpdf(x, mu, S) for x in xs]), rtol=1e-10)


def test_multi_normal_cholesky_closed_form():
    mu = [0.0, 1.0, 2.0]
    L = np.array([[1.5, 0.0, 0.0], [0.3, 1.0, 0.0], [-0.2, 0.4, 2.0]])
    xs = [[0.3, -1.0, 2.5], [1.0, 1.0, 1.0]]
    got = _build("multi_normal_cholesky", mu, L).log_prob(_t(xs))
    assert torch.allclose(got, _t([_mvn_logpdf(x, mu, L @ L.T) for x in xs]), rtol=1e-10)


def _lkj_unnorm(L, eta):
    """Stan: log LKJCholesky(L | eta) = sum_{k=2}^K (K - k + 2 eta - 2) log L_kk + const."""
    K = L.shape[-1]
    return sum((K - k + 2 * eta - 2) * math.log(float(L[k - 1, k - 1])) for k in range(2, K + 1))


def _random_corr_cholesky(K, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.biject_to(torch.distributions.constraints.corr_cholesky)
    return t(torch.randn(K * (K - 1) // 2, generator=g, dtype=DT))


@pytest.mark.parametrize("eta", [0.7, 1.0, 2.5])
def test_lkj_corr_cholesky_2x2_normalised(eta):
    """K = 2: the correlation r = L[2,1] has density Beta((r+1)/2 | eta, eta) / 2."""
    for r in (-0.9, -0.2, 0.0, 0.6):
        L = _t([[1.0, 0.0], [r, math.sqrt(1 - r * r)]])
        got = float(_build("lkj_corr_cholesky", eta, event=(2, 2)).log_prob(L))
        u = (r + 1) / 2
        want = lg(2 * eta) - 2 * lg(eta) + (eta - 1) * (math.log(u) + math.log1p(-u)) - math.log(2)
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9), (eta, r, got, want)


@pytest.mark.parametrize("K,eta", [(3, 1.5), (4, 0.8)])
def test_lkj_corr_cholesky_shape_in_stan_form(K, eta):
    d = _build("lkj_corr_cholesky", eta, event=(K, K))
    Ls = [_random_corr_cholesky(K, s) for s in range(4)]
    got = [float(d.log_prob(L)) for L in Ls]
    want = [_lkj_unnorm(L, eta) for L in Ls]
    for i in range(1, 4):
        assert math.isclose(got[i] - got[0], want[i] - want[0], rel_tol=1e-9, abs_tol=1e-9)


def test_every_spec_builds_with_its_arity():
    """Built with valid arguments, each distribution gives finite log densities in its support."""
    examples = {n: (SCALAR[n][0], SCALAR[n][1][0]) for n in SCALAR}
    examples.update({
        "dirichlet": (([1.0, 2.0],), [0.4, 0.6]),
        "multi_normal": (([0.0, 0.0], [[1.0, 0.2], [0.2, 1.0]]), [0.1, 0.2]),
        "multi_normal_cholesky": (([0.0, 0.0], [[1.0, 0.0], [0.2, 1.0]]), [0.1, 0.2]),
        "lkj_corr_cholesky": ((2.0,), [[1.0, 0.0], [0.6, 0.8]]),
        "categorical": (([0.3, 0.7],), 2.0),
        "categorical_logit": (([0.3, 0.7],), 1.0),
    })
    for name, spec in DS.REGISTRY.items():
        args, x = examples[name]
        assert len(args) == spec.arity, name
        kw = {"event": (2, 2)} if name == "lkj_corr_cholesky" else {}
        lp = _build(name, *args, **kw).log_prob(_t(x))
        assert torch.isfinite(lp).all() and lp.dim() == 0, name
