"""Gradient estimators (ppl.infer.estimators, through ppl.infer.engine.VI): the reparameterised and
the score-function ELBO gradients agree in expectation (with each other, and
with the exact gradient where it is known in closed form); on a discrete latent,
the score path's gradients (Rao-Blackwellised score function for z, pathwise
for the continuous block) agree in expectation with the exact gradient of the
same ELBO, computed by summing over z."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ppl
from ppl.backend.log_joint import LogJoint
from ppl.config import FitConfig
from ppl.infer.engine import VI
from ppl.infer.discrete import discrete_families
from ppl.infer.objectives import OBJECTIVES
from ppl.infer.families import FAMILIES, Preconditioner
from ppl.plan import plan

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(src, data, estimator="auto", family="meanfield", seed=0):
    model = ppl.loads(src, "m.ppl").check(data)
    p = plan(model, estimator)
    lj = LogJoint(model, p, DT)
    gen = torch.Generator().manual_seed(seed)
    D = lj.dim
    A = torch.ones(D, dtype=DT) if family == "meanfield" else torch.eye(D, dtype=DT)
    fam = FAMILIES[family](Preconditioner(torch.zeros(D, dtype=DT), A), gen)
    dq = discrete_families(model, lj, p, gen)
    return model, p, lj, fam, dq


def _estimator(model, p, lj, fam, dq, continuous):
    config = FitConfig()
    return VI(lj, fam, OBJECTIVES["elbo"](config), dq, p, config, continuous)


def _grads(est, S, R):
    """R independent gradient estimates of minus the ELBO -> (R, n_params) and the objective values."""
    params = est.parameters()
    out, objs = [], []
    for _ in range(R):
        for q in params:
            q.grad = None
        terms = est.surrogate_loss(S)
        terms.loss.backward()
        out.append(torch.cat([q.grad.reshape(-1) for q in params]).detach().clone())
        objs.append(terms.value)
    return torch.stack(out).numpy(), np.array(objs)


def _agree(a, b, z=4.5):
    """Means of two samples of gradient vectors agree within z combined standard errors, per component."""
    ma, mb = a.mean(0), b.mean(0)
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    return np.abs(ma - mb) <= z * se + 1e-9, ma, mb, se


NORMAL_MEAN = """
data y: real[N]
mu ~ normal(0, 1)
y ~ normal(mu, 1)
"""
Y = [0.8, 1.9, 1.1, 2.4, 0.3]


def _set(fam, **vals):
    with torch.no_grad():
        for k, v in vals.items():
            fam._params[k].copy_(torch.as_tensor(v, dtype=DT))


@pytest.mark.parametrize("continuous,S,R", [("reparam", 8, 200), ("score", 64, 400)])
def test_gradient_matches_closed_form(continuous, S, R):
    """Normal mean, known noise, q = N(m, s^2): ELBO = -(1+N)(m^2 + s^2)/2 + sum(y) m + log s + const, so
    dELBO/dm = sum(y) - (1+N) m and dELBO/dlog s = 1 - (1+N) s^2."""
    est_plan = "score-all" if continuous == "score" else "auto"
    model, p, lj, fam, dq = _setup(NORMAL_MEAN, {"y": Y}, est_plan)
    assert all(v.estimator == ("score" if continuous == "score" else "reparam") for v in p.values())
    m, log_s = -0.5, 0.0
    _set(fam, m=[m], log_s=[log_s])
    est = _estimator(model, p, lj, fam, dq, continuous)
    g, objs = _grads(est, S, R)
    N, s = len(Y), math.exp(log_s)
    exact = -np.array([sum(Y) - (1 + N) * m, 1 - (1 + N) * s * s])          # gradient of the loss = -ELBO
    se = g.std(0, ddof=1) / math.sqrt(R)
    assert np.all(se < 0.1 * np.abs(exact)), (se, exact)                      # the test has power
    assert np.all(np.abs(g.mean(0) - exact) < 4.5 * se + 1e-9), (g.mean(0), exact, se)
    # and the objective is an unbiased ELBO estimate
    elbo = (-(1 + N) * (m * m + s * s) / 2 + sum(Y) * m - 0.5 * sum(v * v for v in Y)
            - 0.5 * (N + 1) * math.log(2 * math.pi) + log_s + 0.5 * (1 + math.log(2 * math.pi)))
    assert abs(objs.mean() - elbo) < 4.5 * objs.std(ddof=1) / math.sqrt(R) + 1e-9


NONCONJ = """
data y: real[N]
mu ~ normal(0, 2)
sigma ~ lognormal(0, 0.5)
y ~ normal(mu, sigma)
"""


@pytest.mark.parametrize("family", ["meanfield", "fullrank"])
def test_reparam_and_score_agree(family):
    yv = [0.5, -1.2, 2.2, 1.4, 0.1, -0.3]
    model, p, lj, fam, dq = _setup(NONCONJ, {"y": yv}, "auto", family)
    _, p_s, lj_s, fam_s, dq_s = _setup(NONCONJ, {"y": yv}, "score-all", family, seed=1)
    if family == "meanfield":
        vals = dict(m=[0.9, 0.4], log_s=[math.log(0.5), math.log(0.3)])
    else:
        vals = dict(m=[0.9, 0.4], L=[[math.log(0.5), 0.0], [0.2, math.log(0.3)]])
    _set(fam, **vals)
    _set(fam_s, **vals)
    g_r, o_r = _grads(_estimator(model, p, lj, fam, dq, "reparam"), 16, 300)
    g_s, o_s = _grads(_estimator(model, p_s, lj_s, fam_s, dq_s, "score"), 128, 300)
    ok, ma, mb, se = _agree(g_r, g_s)
    # only the components the ELBO depends on (fullrank's L above the diagonal is unused)
    used = np.abs(ma) > 1e-12
    assert used.sum() >= 4
    assert ok[used].all(), (ma, mb, se)
    assert (se[used] < 0.25 * np.abs(ma[used])).sum() >= 3, (se, ma)         # power: estimates are informative
    # the two ELBO estimates agree too
    assert abs(o_r.mean() - o_s.mean()) < 4.5 * math.sqrt(o_r.var(ddof=1) / len(o_r) + o_s.var(ddof=1) / len(o_s))


MIXTURE = """
data y: real[N]
K = 2
w ~ dirichlet(ones(K))
mu: ordered[K] ~ normal(0, 3)
sigma[K] ~ half_normal(2)
z[N] ~ categorical(w)
y ~ normal(mu[z], sigma[z])
"""
YMIX = [-2.1, -1.7, 0.2, 2.5, 3.1, -1.0]


def _exact_score_path_objective(lj, fam, q, M=20000):
    """The score path's ELBO, E_q(theta) q(z)[log p(theta, z, y) - log q(z)] + H[q(theta)], with the sum
    over z done exactly (q(z) factorises over rows and each factor touches one row's z) and a large
    fixed set of theta draws; differentiable in the family parameters and q's logits."""
    theta = fam.rsample(M)
    N = q.shape[0]
    per_k = []
    prior = None
    for k in (1.0, 2.0):
        ev = lj.evaluate(theta, {"z": torch.full((M, N), k, dtype=DT)}, keep_factors=True)
        local = ev.factors["z"] + ev.factors["y"]                    # (M, N): log p(z_n = k | w) + log p(y_n | k)
        if prior is None:
            prior = ev.total - local.sum(-1)                          # the continuous latents' part
        per_k.append(local.mean(0))
    F = torch.stack(per_k, -1)                                        # (N, 2)
    logq = torch.log_softmax(q.param, -1)
    return prior.mean() + (logq.exp() * (F - logq)).sum() + fam.entropy()


def test_discrete_score_path_gradients_match_exact_sum_over_z():
    model, p, lj, fam, dq = _setup(MIXTURE, {"y": YMIX}, "score", "meanfield", seed=3)
    assert p["z"].estimator == "score" and set(dq) == {"z"}
    q = dq["z"]
    g0 = torch.Generator().manual_seed(11)
    with torch.no_grad():
        q.param.copy_(torch.randn(q.param.shape, generator=g0, dtype=DT))
    _set(fam, m=[0.3, -1.0, 0.5, 0.2, -0.1], log_s=[-1.0, -1.5, -1.2, -1.3, -1.4])
    est = _estimator(model, p, lj, fam, dq, "reparam")
    params = est.parameters()
    # exact gradient of the same objective
    for t in params:
        t.grad = None
    (-_exact_score_path_objective(lj, fam, q)).backward()
    exact = torch.cat([t.grad.reshape(-1) for t in params]).numpy()
    g, objs = _grads(est, 64, 300)
    mean = g.mean(0)
    se = g.std(0, ddof=1) / math.sqrt(len(g))
    n_cont = sum(t.numel() for t in fam.parameters())
    # the exact reference has its own Monte Carlo error (M theta draws): allow for it
    tol = 4.5 * se + 0.02 * np.abs(exact) + 1e-3
    bad = np.abs(mean - exact) > tol
    assert not bad[:n_cont].any(), ("continuous", mean[:n_cont], exact[:n_cont], se[:n_cont])
    assert not bad[n_cont:].any(), ("discrete logits", mean[n_cont:], exact[n_cont:], se[n_cont:])
    # power: the logits' gradients are clearly non-zero and resolved
    big = np.abs(exact[n_cont:]) > 0.2
    assert big.sum() >= 4 and np.all(se[n_cont:][big] < 0.3 * np.abs(exact[n_cont:][big]))
    # the reported objective estimates the same ELBO
    with torch.no_grad():
        ref = float(_exact_score_path_objective(lj, fam, q))
    assert abs(objs.mean() - ref) < 4.5 * objs.std(ddof=1) / math.sqrt(len(objs)) + 0.02 * abs(ref)


def test_score_and_enumerate_fits_agree():
    """Fitted posterior means of the same mixture, with z summed out or on the score path, agree."""
    rng = np.random.default_rng(0)
    yv = np.concatenate([rng.normal(-2.5, 0.7, 60), rng.normal(2.0, 0.7, 40)])
    m = ppl.loads(MIXTURE, "mix.ppl")
    a = m.fit({"y": yv.tolist()}, estimator="auto", seed=1, steps=400, draws=500).summary()
    b = m.fit({"y": yv.tolist()}, estimator="score", seed=1, steps=1500, draws=500).summary()
    for k in ("mu[1]", "mu[2]", "w[1]", "sigma[1]", "sigma[2]"):
        sd = max(a[k]["sd"], 1e-3)
        assert abs(a[k]["mean"] - b[k]["mean"]) < 1.0 * sd + 0.05 * abs(a[k]["mean"]), (k, a[k], b[k])
    assert abs(a["mu[1]"]["mean"] + 2.5) < 0.4 and abs(a["mu[2]"]["mean"] - 2.0) < 0.4


@pytest.mark.parametrize("family,precond", [("meanfield", "diag"), ("fullrank", "diag"), ("fullrank", "full")])
def test_closed_form_gradient_equals_autograd(family, precond):
    """The default path (the closed-form estimator: autograd through the log joint only, the family's chain rule
    in closed form) gives exactly the gradient of the autograd surrogate on the same draws."""
    model = ppl.loads(NONCONJ + "z[3] ~ normal(mu, sigma)\n", "m.ppl").check({"y": [0.5, -1.2, 2.2, 1.4]})
    p = plan(model, "auto")
    lj = LogJoint(model, p, DT)
    D = lj.dim
    g0 = torch.Generator().manual_seed(5)
    mu0 = torch.randn(D, generator=g0, dtype=DT)
    if precond == "diag":
        A = 0.3 + torch.rand(D, generator=g0, dtype=DT)
        A = A if family == "meanfield" else torch.diag(A)
    else:
        A = torch.tril(0.3 * torch.randn(D, D, generator=g0, dtype=DT), -1) + torch.diag(0.5 + torch.rand(D, generator=g0, dtype=DT))
    fam = FAMILIES[family](Preconditioner(mu0, A), torch.Generator().manual_seed(9))
    with torch.no_grad():
        fam.flat.copy_(0.3 * torch.randn(fam.flat.shape, generator=g0, dtype=DT))
    est = _estimator(model, p, lj, fam, {}, "reparam")
    assert est.estimator.name == "closed-form"
    for S in (1, 7):
        fam.gen.manual_seed(S)
        fam.flat.grad = None
        value = est.gradient(S)
        closed = fam.flat.grad.clone()
        fam.gen.manual_seed(S)
        fam.flat.grad = None
        terms = est.surrogate_loss(S)
        terms.loss.backward()
        if family == "fullrank":              # L above the diagonal is not used: autograd gives zeros there too
            assert torch.all(closed[D:].view(D, D).triu(1) == 0)
        torch.testing.assert_close(closed, fam.flat.grad, rtol=1e-9, atol=1e-10)
        assert value == pytest.approx(terms.value, rel=1e-12, abs=1e-10)


# ---- count latents on the score path: the discretised-logistic q, Rao-Blackwellisation, baseline, control variate
COUNT = """
data y: real[N]
n[N] ~ poisson(20)
y ~ normal(n, 2)
"""
YCOUNT = [17.1, 24.4, 19.4, 13.0]


def _count_vi(seed=0):
    from ppl.infer.estimators import ScoreOptions  # noqa: F401  (the options the tests switch)
    model, p, lj, fam, dq = _setup(COUNT, {"y": YCOUNT}, "score", "meanfield", seed=seed)
    q = dq["n"]
    with torch.no_grad():                      # off the optimum: gradients clearly non-zero
        q.param[..., 0] += torch.tensor([0.3, -0.4, 0.2, 0.5], dtype=DT)
        q.param[..., 1] -= 0.5
    return _estimator(model, p, lj, fam, dq, "reparam"), q


def _exact_count_grad(q):
    """The ELBO summed exactly over q's values (its grid), differentiated by autograd."""
    vals, lq, covered = q.grid()
    assert covered.all()
    y = torch.tensor(YCOUNT, dtype=DT)
    logp = vals * math.log(20.0) - 20.0 - torch.lgamma(vals + 1) - 0.5 * ((y - vals) / 2.0) ** 2 \
        - math.log(2.0 * math.sqrt(2 * math.pi))
    elbo = (torch.exp(lq) * torch.where(torch.isfinite(lq), logp - lq, torch.zeros_like(lq))).sum()
    q.param.grad = None
    (-elbo).backward()
    return q.param.grad.reshape(-1).numpy().copy()


def _count_grads(vi, q, opts, R, S=16):
    vi.score_options = opts
    q.control_variate = None
    out = []
    for _ in range(R):
        q.param.grad = None
        vi.surrogate_loss(S).loss.backward()
        out.append(q.param.grad.reshape(-1).clone())
    return torch.stack(out).numpy()


def test_count_score_gradients_are_unbiased_and_each_reduction_lowers_their_variance():
    """Plain score function, + Rao-Blackwellisation over the Markov blanket, + leave-one-out baseline,
    + learned control variate: every one agrees in expectation with the exact gradient (summed over q's
    values), and the total variance falls, measured: RB + baseline far below plain, the control variate
    below that."""
    from ppl.infer.estimators import ScoreOptions
    vi, q = _count_vi()
    exact = _exact_count_grad(q)
    variances = {}
    for label, opts in (("plain", ScoreOptions(False, False, False)), ("rb+loo", ScoreOptions(True, True, False)),
                        ("rb+loo+cv", ScoreOptions(True, True, True))):
        g = _count_grads(vi, q, opts, 120)
        se = g.std(0, ddof=1) / math.sqrt(len(g))
        assert (np.abs(g.mean(0) - exact) <= 4.5 * se + 1e-3 * np.abs(exact)).all(), (label, g.mean(0), exact, se)
        variances[label] = float(g.var(0).sum())
    assert variances["rb+loo"] < variances["plain"] / 5, variances
    assert variances["rb+loo+cv"] < variances["rb+loo"] / 2, variances


def test_vimco_is_an_objective_with_leave_one_out_signals():
    from ppl.infer.estimators import _leave_one_out_bounds
    assert "vimco" in OBJECTIVES
    lw = torch.tensor([-3.0, -1.0, -2.5, -0.2], dtype=DT)
    got = _leave_one_out_bounds(lw)
    for k in range(4):
        rep = lw.clone()
        rep[k] = (lw.sum() - lw[k]) / 3
        assert abs(float(got[k]) - float(torch.logsumexp(rep, 0) - math.log(4))) < 1e-12
    f = ppl.loads(COUNT, "c.ppl").fit({"y": YCOUNT[:3]}, estimator="score", objective="vimco", seed=1, steps=1000,
                                      draws=1000)
    assert f.objective == "vimco" and f.estimator == "score (n)"
    exact = ppl.loads(COUNT, "c.ppl").fit({"y": YCOUNT[:3]}, seed=1)     # summed out: its ELBO is log p(y)
    # the multi-sample bound (64 draws) climbs to log p(y); its q is wider than the posterior (as IWAE's)
    assert exact.optimizer == "exact" and abs(f.elbo - exact.elbo) < 0.1, (f.elbo, exact.elbo)
    s, e = f.summary(), exact.summary()
    for k in ("n[1]", "n[2]", "n[3]"):
        assert abs(s[k]["mean"] - e[k]["mean"]) < 0.5 * e[k]["sd"], (k, s[k], e[k])


def test_score_path_and_enumeration_agree_on_counts():
    """A latent rate and the counts under it: summed over windows (exact for the counts) and on the score
    path (the count q's location following the rate) agree; a mean-field q, independent of the rate, had
    the rate's sd 27% low here."""
    src = "data y: int<lower=0>[N]\nlam ~ gamma(3, 0.1)\nn[N] ~ poisson(lam)\ny ~ binomial(n, 0.5)\n"
    data = {"y": [11, 17, 14]}
    m = ppl.loads(src, "r.ppl")
    a = m.fit(data, seed=1)
    b = m.fit(data, estimator="score", seed=1)
    assert a.estimator.startswith("reparam + truncated enumeration") and b.estimator == "reparam + score (n)"
    sa, sb = a.summary(), b.summary()
    for k in ("lam", "n[1]", "n[2]", "n[3]"):
        assert abs(sa[k]["mean"] - sb[k]["mean"]) < 0.15 * sa[k]["sd"], (k, sa[k], sb[k])
        assert abs(sb[k]["sd"] / sa[k]["sd"] - 1) < 0.12, (k, sa[k], sb[k])


def test_conditional_count_q_gradients_match_the_exact_sum():
    """The count q conditioned on a latent rate, q(n | lam): the score path's gradients (pathwise for lam's
    q, Rao-Blackwellised score function with the baseline and control variate for n's, through lam too)
    agree in expectation with the exact gradient of the same ELBO, summed over n's values on a fixed set of
    lam draws."""
    src = "data y: int<lower=0>[N]\nlam ~ gamma(3, 0.1)\nn[N] ~ poisson(lam)\ny ~ binomial(n, 0.5)\n"
    model, p, lj, fam, dq = _setup(src, {"y": [11, 17]}, "score", "meanfield", seed=5)
    q = dq["n"]
    assert q.param.shape == (2, 3)                           # location, log scale, slope on log lam
    _set(fam, m=[math.log(30.0)], log_s=[math.log(0.15)])
    q.center(torch.tensor([math.log(30.0)], dtype=DT), torch.tensor([0.15], dtype=DT))
    with torch.no_grad():
        q.param.copy_(torch.tensor([[0.3, -1.5, 0.4], [-0.2, -1.3, 0.1]], dtype=DT))
    est = _estimator(model, p, lj, fam, dq, "reparam")
    params = est.parameters()
    eps = torch.randn((2000, 1), generator=torch.Generator().manual_seed(9), dtype=DT)
    for t in params:
        t.grad = None
    pm = fam._params
    theta = fam.pre.to_theta(pm["m"] + torch.exp(pm["log_s"]) * eps)
    vals, lq, covered = q.grid(theta)                        # (G, M, N)
    assert covered.all()
    total = 0.0
    for g in range(vals.shape[0]):
        ev = lj.evaluate(theta, {"n": vals[g].detach()}, keep_factors=True)
        local = ev.factors["n"] + ev.factors["y"]
        if g == 0:
            total = (ev.total - local.sum(-1)).mean()        # lam's prior and Jacobian
        w = torch.exp(lq[g])
        total = total + torch.where(w > 0, w * (local - lq[g]), torch.zeros_like(w)).sum(-1).mean()
    (-(total + fam.entropy())).backward()
    exact = torch.cat([t.grad.reshape(-1) for t in params]).numpy()
    g, _ = _grads(est, 16, 200)
    se = g.std(0, ddof=1) / math.sqrt(len(g))
    tol = 4.5 * se + 0.02 * np.abs(exact) + 1e-3
    assert (np.abs(g.mean(0) - exact) <= tol).all(), (g.mean(0), exact, se)
    assert (np.abs(exact[-6:]) > 5 * se[-6:]).sum() >= 3    # the count q's gradients are resolved
