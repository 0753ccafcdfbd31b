"""Relaxed discrete latents (ppl.backend.relax, ppl.infer.relaxed, the soft index of ppl.expr): the
relaxed objective against a hand-written one and its gradient against finite differences at fixed
Gumbel noise; the relaxations' densities against torch's and their rounding (Gumbel-max) against
the categorical; a fit of a 3-component mixture against the exact (enumerated) posterior; the
automatic choice; the usage errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ppl
from ppl.backend.log_joint import LogJoint
from ppl.backend.ops import TorchOps
from ppl.backend.relax import RELAXATIONS
from ppl.cli import main
from ppl.config import FitConfig
from ppl.errors import PplError, UsageError
from ppl.infer.discrete import discrete_families
from ppl.infer.engine import VI
from ppl.infer.families import FAMILIES, Preconditioner
from ppl.infer.objectives import OBJECTIVES
from ppl.plan import plan

DT = torch.float64
W = [0.2, 0.3, 0.5]

KNOWN_MEANS = """
data y: real[N]
data mu: real[3]
K = 3
w = [0.2, 0.3, 0.5]
z[N] ~ categorical(w)
y ~ normal(mu[z], 1)
"""

MIX = """
data y: real[N]
K = 3
w = [0.2, 0.3, 0.5]
mu: ordered[K] ~ normal(0, 5)
z[N] ~ categorical(w)
y ~ normal(mu[z], 1)
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a, b, rtol=1e-7, atol=1e-9):
    """(torch.testing.assert_close's first call imports for seconds)"""
    assert a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol), (a, b)


def _mixture_data(N, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.choice(3, N, p=W)
    return rng.normal(np.array([-4.0, 0.0, 4.0])[z], 1.0)


def _vi(src, data, seed=0):
    model = ppl.loads(src, "m.ppl").check(data)
    p = plan(model, "relaxed")
    lj = LogJoint(model, p, DT)
    gen = torch.Generator().manual_seed(seed)
    D = lj.dim
    fam = FAMILIES["meanfield"](Preconditioner(torch.zeros(D, dtype=DT), torch.ones(D, dtype=DT)), gen)
    dq = discrete_families(model, lj, p, gen)
    config = FitConfig()
    return VI(lj, fam, OBJECTIVES["elbo"](config), dq, p, config, "relaxed")


def test_soft_index_is_the_weighted_sum_and_a_one_hot_is_the_gather():
    g = torch.Generator().manual_seed(0)
    ops = TorchOps(DT)
    for xshape, axis in (((4, 3), 1), ((4, 3, 2), 1), ((1, 3), 1), ((4, 5, 3), 2)):
        x = torch.randn(xshape, generator=g, dtype=DT)
        w = torch.softmax(torch.randn((4, 7, 3), generator=g, dtype=DT), -1)
        got = ops.soft_index(x, w, axis)
        xs = x.expand((4,) + tuple(xshape[1:]))
        assert got.shape == (4,) + tuple(xshape[1:axis]) + (7,) + tuple(xshape[axis + 1:])
        want = torch.zeros_like(got)
        for o in np.ndindex(*got.shape):       # out[s, pre, i, post] = sum_k w[s, i, k] x[s, pre, k, post]
            s, pre, i, post = o[0], o[1:axis], o[axis], o[axis + 1:]
            want[o] = sum(w[s, i, k] * xs[(s,) + pre + (k,) + post] for k in range(3))
        _close(got, want)
        idx = torch.randint(0, 3, (4, 7), generator=g)
        onehot = torch.nn.functional.one_hot(idx, 3).to(DT)
        _close(ops.soft_index(x, onehot, axis), ops.index(x, idx, axis))


def test_relaxed_objective_by_hand_and_its_gradient_against_finite_differences():
    y = _mixture_data(12, 1)
    mu = np.array([-2.5, 0.3, 2.8])
    vi = _vi(KNOWN_MEANS, {"y": y.tolist(), "mu": mu.tolist()})
    est = vi.estimator
    assert est.name == "relaxed" and vi.program.dim == 0
    q = vi.discrete["z"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        q.param.copy_(torch.randn(q.param.shape, generator=g, dtype=DT))
    S, T = 5, 0.4
    noise = {"z": RELAXATIONS["concrete"].noise(q.param.shape, S, g, DT, "cpu")}

    def by_hand(logits):
        gum = -torch.log(-torch.log(noise["z"]))
        w = torch.softmax((logits + gum) / T, -1)                         # (S, N, 3)
        m = w @ torch.tensor(mu, dtype=DT)
        lik = (-0.5 * (torch.tensor(y, dtype=DT) - m) ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1).mean()
        qp = torch.softmax(logits, -1)
        return lik + (qp * (torch.log(torch.tensor(W, dtype=DT)) - torch.log_softmax(logits, -1))).sum()

    sur = est.surrogate_at(T, noise, value=False)
    assert sur.value == pytest.approx(float(by_hand(q.param.detach())), rel=1e-12)
    q.param.grad = None
    sur.loss.backward()
    grad = -q.param.grad.clone()
    h = 1e-6
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        base = q.param.detach().clone()
        for i in np.ndindex(*base.shape):
            for sgn in (1, -1):
                q.param[i] = base[i] + sgn * h
                fd[i] += sgn * est.surrogate_at(T, noise, value=False).value / (2 * h)
            q.param[i] = base[i]
    _close(grad, fd, rtol=1e-5, atol=1e-6)
    assert grad.abs().max() > 0.1


BERNOULLI = """
data y: real[N]
data a: real
data b: real
z[N] ~ bernoulli(0.3)
y ~ normal(z * a + (1 - z) * b, 1)
"""


def test_relaxed_bernoulli_objective_by_hand_and_its_gradient():
    """A relaxed bernoulli in arithmetic: the model reads sigmoid((l + logistic noise) / T)."""
    y = np.array([2.9, -1.2, 0.4, 3.3, -0.7, 1.1])
    vi = _vi(BERNOULLI, {"y": y.tolist(), "a": 3.0, "b": -1.0})
    est = vi.estimator
    q = vi.discrete["z"]
    with torch.no_grad():
        q.param.copy_(torch.tensor([1.5, -2.0, 0.1, 2.5, -1.0, 0.3], dtype=DT))
    g = torch.Generator().manual_seed(6)
    S, T = 4, 0.3
    noise = {"z": RELAXATIONS["binary-concrete"].noise(q.param.shape, S, g, DT, "cpu")}

    def by_hand(l):
        u = noise["z"]
        zr = torch.sigmoid((l + torch.log(u) - torch.log1p(-u)) / T)
        m = zr * 3.0 + (1 - zr) * -1.0
        lik = (-0.5 * (torch.tensor(y, dtype=DT) - m) ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1).mean()
        p = torch.sigmoid(l)
        return lik + (p * (math.log(0.3) - torch.log(p)) + (1 - p) * (math.log(0.7) - torch.log1p(-p))).sum()

    l0 = q.param.detach().clone().requires_grad_(True)
    want = by_hand(l0)
    want.backward()
    sur = est.surrogate_at(T, noise, value=False)
    assert sur.value == pytest.approx(float(want.detach()), rel=1e-12)
    q.param.grad = None
    sur.loss.backward()
    _close(-q.param.grad, l0.grad, rtol=1e-10, atol=1e-12)
    # the value is the discrete model's ELBO at the rounded draws (an exact draw of q per sample)
    v = est.surrogate_at(T, noise).value
    hard = (torch.log(noise["z"]) - torch.log1p(-noise["z"]) + q.param.detach() > 0).to(DT)
    m = hard * 3.0 + (1 - hard) * -1.0
    lw = (-0.5 * (torch.tensor(y, dtype=DT) - m) ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1) + \
        torch.distributions.Bernoulli(probs=torch.tensor(0.3, dtype=DT)).log_prob(hard).sum(-1) - \
        torch.distributions.Bernoulli(logits=q.param.detach()).log_prob(hard).sum(-1)
    assert v == pytest.approx(float(lw.mean()), rel=1e-12)


def test_gradient_through_a_latent_mean_against_finite_differences():
    """mu latent (ordered: the bijection's Jacobian too): d objective / d theta and / d logits."""
    y = _mixture_data(10, 2)
    vi = _vi(MIX, {"y": y.tolist()})
    est = vi.estimator
    q = vi.discrete["z"]
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        q.param.copy_(torch.randn(q.param.shape, generator=g, dtype=DT))
    S, T = 3, 0.5
    noise = {"z": RELAXATIONS["concrete"].noise(q.param.shape, S, g, DT, "cpu")}
    theta = torch.randn((S, vi.program.dim), generator=g, dtype=DT).requires_grad_(True)
    sur = est.surrogate_at(T, noise, theta=theta, value=False)
    sur.loss.backward()
    g_theta, g_q = -theta.grad.clone(), -q.param.grad.clone()
    h = 1e-6
    with torch.no_grad():
        for t, grad in ((theta, g_theta), (q.param, g_q)):
            base = t.detach().clone()
            for i in list(np.ndindex(*base.shape))[:12]:
                vals = []
                for sgn in (1, -1):
                    t[i] = base[i] + sgn * h
                    vals.append(est.surrogate_at(T, noise, theta=theta.detach(), value=False).value)
                t[i] = base[i]
                assert grad[i].item() == pytest.approx((vals[0] - vals[1]) / (2 * h), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["concrete", "binary-concrete"])
def test_relaxations_densities_and_rounding(name):
    g = torch.Generator().manual_seed(5)
    R = RELAXATIONS[name]
    logits = torch.randn((4, 3) if R.categories else (4,), generator=g, dtype=DT)
    T = 0.7
    u = R.noise(logits.shape, 20000, g, DT, "cpu")
    d = R.draw(logits, u, T)
    if R.categories:
        ref = torch.distributions.relaxed_categorical.ExpRelaxedCategorical(torch.tensor(T, dtype=DT), logits=logits)
        freq = torch.stack([(d.hard == k).to(DT).mean(0) for k in (1, 2, 3)], -1)
        probs = torch.softmax(logits, -1)
        _close(d.weights.sum(-1), torch.ones_like(d.hard))
    else:
        ref = torch.distributions.relaxed_bernoulli.LogitRelaxedBernoulli(torch.tensor(T, dtype=DT), logits=logits)
        freq, probs = d.hard.mean(0), torch.sigmoid(logits)
    _close(R.log_density(logits, d.x[:50], T), ref.log_prob(d.x[:50]))
    # rounding is an exact draw of the discrete q (Gumbel-max): frequencies within 4.5 standard errors
    se = torch.sqrt(probs * (1 - probs) / 20000)
    assert bool((torch.abs(freq - probs) < 4.5 * se + 1e-9).all())
    # the exact z-terms: E_q[log p] summed over values
    p_logits = torch.randn(logits.shape, generator=g, dtype=DT)
    if R.categories:
        want = (torch.softmax(logits, -1) * torch.log_softmax(p_logits, -1)).sum(-1)
    else:
        want = torch.distributions.Bernoulli(logits=logits).probs * torch.log(torch.sigmoid(p_logits)) + \
            (1 - torch.sigmoid(logits)) * torch.log(torch.sigmoid(-p_logits))
    _close(R.cross_entropy(logits, p_logits), want)


def _exact_responsibilities(y, mu_draws):
    lp = -0.5 * (y[None, :, None] - mu_draws[:, None, :]) ** 2 + np.log(W)
    r = np.exp(lp - lp.max(-1, keepdims=True))
    return (r / r.sum(-1, keepdims=True)).mean(0)


def test_relaxed_fit_against_the_enumerated_posterior():
    y = _mixture_data(120, 0)
    m = ppl.loads(MIX, "mix.ppl")
    exact = m.fit({"y": y.tolist()}, estimator="auto", seed=1, draws=400)
    assert "enumerate" in exact.estimator
    fit = m.fit({"y": y.tolist()}, estimator="relaxed", seed=1, draws=400, steps=600)
    assert "relaxed (z)" in fit.estimator
    q = torch.softmax(fit.q.discrete["z"].param.detach(), -1).numpy()            # the reported q: categorical
    r = _exact_responsibilities(y, exact.draws["mu"])
    err = np.abs(q - r)
    assert np.quantile(err.max(-1), 0.95) < 0.05 and err.max() < 0.1, (np.sort(err.max(-1))[-8:])
    assert ((r.max(-1) > 0.2) & (r.max(-1) < 0.8)).sum() >= 5     # ... but some are not
    a, b = exact.summary(), fit.summary(corrected=False)
    for k in ("mu[1]", "mu[2]", "mu[3]"):
        assert abs(a[k]["mean"] - b[k]["mean"]) < 0.25 * a[k]["sd"] + 0.01, (k, a[k], b[k])
    # the reported ELBO is the discrete model's: below log p(y), and close to the enumerated fit's
    assert fit.elbo < exact.log_evidence + 0.5 and fit.elbo > exact.elbo - 0.05 * len(y)
    # z's draws are q's (categorical), not relaxed
    assert set(np.unique(fit.draws["z"])) <= {1.0, 2.0, 3.0}


SUMMED = MIX + "total ~ normal(sum(mu[z]), 10)\n"     # sum over rows: z cannot be summed out


def test_auto_takes_relaxed_when_the_score_path_is_noisy_and_says_so():
    y = _mixture_data(60, 3)
    m = ppl.loads(SUMMED, "m.ppl")
    fit = m.fit({"y": y.tolist(), "total": float(y.sum())}, seed=1, steps=300, draws=100)
    assert "relaxed (z); auto: the score path's gradient variance at the start" in fit.estimator, fit.estimator
    assert "above 10x" in fit.estimator


def test_relaxed_usage_errors(tmp_path, capsys):
    cont = tmp_path / "c.ppl"
    cont.write_text("data y: real[N]\nmu ~ normal(0, 1)\ny ~ normal(mu, 1)\n")
    (tmp_path / "d.json").write_text('{"y": [0.1, 0.2], "n": [3, 4]}')
    with pytest.raises(UsageError, match="applies to discrete latents"):
        ppl.load(str(cont)).fit(str(tmp_path / "d.json"), estimator="relaxed")
    pois = tmp_path / "p.ppl"
    pois.write_text("data y: real[N]\nn[N] ~ poisson(5)\ny ~ normal(n, 1)\n")
    with pytest.raises(PplError) as e:
        ppl.load(str(pois)).fit(str(tmp_path / "d.json"), estimator="relaxed")
    text = str(e.value)
    assert "p.ppl:2:" in text and "cannot relax 'n'" in text and "no continuous relaxation" in text
    assert "valid: auto, reparam, score, enumerate, relaxed" in text
    code = main(["fit", str(pois), str(tmp_path / "d.json"), "--estimator", "relaxed"])
    err = capsys.readouterr().err
    assert code == 2 and "p.ppl:2:" in err and "^" in err and "Traceback" not in err
    # a categorical used as a number (not an index) cannot be relaxed: located at the use
    used = tmp_path / "u.ppl"
    used.write_text("data y: real[N]\nz[N] ~ categorical([0.5, 0.5])\ny ~ normal(z, 1)\n")
    with pytest.raises(PplError) as e:
        ppl.load(str(used)).fit(str(tmp_path / "d.json"), estimator="relaxed")
    assert "u.ppl:3:12" in str(e.value) and "can only be an index" in str(e.value)
    with pytest.raises(UsageError, match="relaxed"):
        FitConfig.from_python(estimator="relaxe")
    for objective in ("vimco", "iwae"):
        with pytest.raises(UsageError, match="fits the ELBO only"):
            FitConfig.from_python(estimator="relaxed", objective=objective)


@pytest.mark.parametrize("line,z_why,b_why", [
    ("y ~ normal(mu[z] + b, 1)", None, None),
    ("m = mu[z]\ny ~ normal(m * b + sum(mu[z]), 1)", None, None),
    ("y ~ normal(x[ix[z]], 1)", "cannot be an index", None),          # the soft x[z] is a number: no index
    ("y ~ normal(mu[z + 1], 1)", "cannot be an index", None),
    ("y ~ normal(mu[1] * z, 1)", "can only be an index", None),
    ("y ~ normal(mu[b], 1)", None, "cannot be an index"),
    ("y ~ normal(mu[z] * (b > 0), 1)", None, "comparison"),
])
def test_which_uses_can_be_relaxed(line, z_why, b_why):
    from ppl.plan import relax_refusal
    src = ("data y: real[N]\ndata x: real[3]\ndata ix: int[3]\nK = 3\nmu[K] ~ normal(0, 1)\n"
           "z[N] ~ categorical([0.2, 0.3, 0.5])\nb[N] ~ bernoulli(0.4)\n" + line + "\n")
    model = ppl.loads(src, "m.ppl").check({"y": [0.1, 0.2], "x": [1.0, 2.0, 3.0], "ix": [1, 2, 3]})
    for name, why in (("z", z_why), ("b", b_why)):
        got = relax_refusal(model, name)
        assert (got is None) if why is None else (got is not None and why in got[0]), (name, got)
