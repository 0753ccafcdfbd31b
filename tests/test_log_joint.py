"""The compiled log joint (ppl.backend.log_joint.LogJoint) against log densities
written here by hand in torch, on the unconstrained vector: eight schools,
a radon-like varying-intercept model, logistic regression with X @ beta, and a
model with deterministics, vector literals, declared constraints and a bound
that depends on a latent.  Vectorised over S samples (S results equal S
single evaluations), gradients equal autograd of the hand-written density, and
enumerated discrete latents equal the hand-computed marginal (logsumexp over
components per row)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import ppl
from ppl.backend.log_joint import LogJoint
from ppl.plan import plan

DT = torch.float64
MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models")
LOG2PI = math.log(2 * math.pi)
F = torch.nn.functional


# ---- hand-written densities (plain torch arithmetic) ---------------------------------------------------------
def normal_lp(x, m, s):
    s = torch.as_tensor(s, dtype=DT)
    return -0.5 * LOG2PI - torch.log(s) - 0.5 * ((x - m) / s) ** 2


def half_normal_lp(x, s):
    return math.log(2.0) + normal_lp(x, 0.0, s)


def half_cauchy_lp(x, s):
    return math.log(2.0) - math.log(math.pi * s) - torch.log1p((x / s) ** 2)


def lognormal_lp(x, m, s):
    return normal_lp(torch.log(x), m, s) - torch.log(x)


def positive(u):
    """exp map: value and log|det J|."""
    return torch.exp(u), u


def S_(x):
    """Sum over every dimension but the sample one."""
    return x.reshape(x.shape[0], -1).sum(-1)


# ---- helpers --------------------------------------------------------------------------------------------------
def compile_model(src, data, estimator="auto"):
    model = ppl.loads(src, "m.ppl").check(data)
    return model, LogJoint(model, plan(model, estimator), DT)


def blocks(lj, theta):
    S = theta.shape[0]
    return {b.name: theta[:, b.offset:b.offset + b.size].reshape((S,) + tuple(b.ushape)) for b in lj.blocks}


def random_theta(lj, S=6, seed=0, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(S, lj.dim, generator=g, dtype=DT)


def check_against(lj, hand, theta, discrete=None):
    """Values, per-sample vectorisation and gradients of lj against `hand(blocks) -> (S,)`."""
    theta = theta.clone().requires_grad_(True)
    got = lj.log_prob(theta, discrete)
    want = hand(blocks(lj, theta))
    assert got.shape == (theta.shape[0],)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-9), (got, want)
    # S samples in one pass == S single evaluations
    with torch.no_grad():
        singles = torch.cat([lj.log_prob(theta[s:s + 1], None if discrete is None else
                                         {k: v[s:s + 1] for k, v in discrete.items()})
                             for s in range(theta.shape[0])])
    assert torch.allclose(got.detach(), singles, rtol=1e-12, atol=1e-10)
    # gradients
    g_got, = torch.autograd.grad(got.sum(), theta)
    th2 = theta.detach().clone().requires_grad_(True)
    g_want, = torch.autograd.grad(hand(blocks(lj, th2)).sum(), th2)
    assert torch.allclose(g_got, g_want, rtol=1e-9, atol=1e-9)
    return got


# ---- eight schools ------------------------------------------------------------------------------------------
EIGHT = open(os.path.join(MODELS, "eight_schools.ppl")).read()    # the shipped example
Y8 = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SIG8 = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def test_eight_schools():
    model, lj = compile_model(EIGHT, {"y": Y8, "sigma": SIG8})
    assert lj.dim == 10
    y, sig = torch.tensor(Y8, dtype=DT), torch.tensor(SIG8, dtype=DT)

    def hand(b):
        mu, tr = b["mu"], b["theta_raw"]
        tau, jac = positive(b["tau"])
        theta = mu[:, None] + tau[:, None] * tr
        return (normal_lp(mu, 0, 5) + half_cauchy_lp(tau, 5.0) + jac + S_(normal_lp(tr, 0, 1))
                + S_(normal_lp(y, theta, sig)))
    theta = random_theta(lj, S=7)
    check_against(lj, hand, theta)
    # the deterministic is reported in constrained space
    with torch.no_grad():
        vals = lj.constrain(theta)
        b = blocks(lj, theta)
        assert torch.allclose(vals["theta"], b["mu"][:, None] + torch.exp(b["tau"])[:, None] * b["theta_raw"])
        assert torch.allclose(vals["tau"].reshape(-1), torch.exp(b["tau"]).reshape(-1))


# ---- radon-like varying intercepts ----------------------------------------------------------------------------
RADON = open(os.path.join(MODELS, "radon.ppl")).read()        # the shipped example


def test_radon_like():
    rng = np.random.default_rng(1)
    labels = ["Carver", "Aitkin", "Dakota", "Becker"]
    county = [labels[i] for i in rng.integers(0, 4, size=25)]
    floor = rng.integers(0, 2, size=25).astype(float)
    lr = rng.normal(1.0, 0.8, size=25)
    model, lj = compile_model(RADON, {"log_radon": lr.tolist(), "floor": floor.tolist(), "county": county})
    assert model.dims["K"] == 4
    idx = torch.tensor([sorted(labels).index(c) for c in county])     # labels numbered in sorted order
    y, fl = torch.tensor(lr, dtype=DT), torch.tensor(floor, dtype=DT)

    def hand(b):
        mu_a, a, bb = b["mu_a"], b["a"], b["b"]
        sa, ja = positive(b["sigma_a"])
        sy, jy = positive(b["sigma_y"])
        eta = a[:, idx] + bb[:, None] * fl
        return (normal_lp(mu_a, 0, 10) + half_normal_lp(sa, 5.0) + ja + S_(normal_lp(a, mu_a[:, None], sa[:, None]))
                + normal_lp(bb, 0, 10) + half_normal_lp(sy, 5.0) + jy + S_(normal_lp(y, eta, sy[:, None])))
    check_against(lj, hand, random_theta(lj, S=5, seed=2))


# ---- logistic regression with X @ beta -------------------------------------------------------------------------
LOGISTIC = """
data X: real[N, D]
data y: int<lower=0, upper=1>[N]
alpha ~ normal(0, 2.5)
beta[D] ~ normal(0, 2.5)
y ~ bernoulli_logit(alpha + X @ beta)
"""


def test_logistic_matmul():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(30, 3))
    y = (rng.random(30) < 0.4).astype(int)
    model, lj = compile_model(LOGISTIC, {"X": X.tolist(), "y": y.tolist()})
    Xt, yt = torch.tensor(X, dtype=DT), torch.tensor(y, dtype=DT)

    def hand(b):
        eta = b["alpha"][:, None] + b["beta"] @ Xt.T                     # (S, N)
        return (normal_lp(b["alpha"], 0, 2.5) + S_(normal_lp(b["beta"], 0, 2.5))
                + S_(yt * eta - F.softplus(eta)))
    check_against(lj, hand, random_theta(lj, S=4, seed=3, scale=1.5))


# ---- deterministics, vector literals, declared constraints, a latent bound --------------------------------------
DETS = """
data y: real[N]
data g: int<lower=1, upper=3>[N]
data lo: real
a ~ normal(0, 1)
b ~ normal(1, 2)
s ~ lognormal(0, 0.5)
v = [a, a + b, exp(b)]
p = softmax(v)
c: real<lower=lo, upper=a + 3> ~ normal(0, 2)
o: ordered[3] ~ normal(0, 5)
w: simplex[3] ~ dirichlet([1, 2, 3])
t ~ normal(sum(p * v) + dot(w, o), 1)
y ~ normal(v[g] + c, s)
"""


def _stick_breaking(u):
    """R^{K-1} -> simplex^K with log|det J| (Stan/torch stick-breaking, written out)."""
    K1 = u.shape[-1]
    offset = torch.log(torch.arange(K1, 0, -1, dtype=DT))              # log(K-1-i), i = 0..K-2
    z = torch.sigmoid(u - offset)
    rest = torch.cumprod(1 - z, -1)
    x = torch.cat([z, torch.ones_like(z[..., :1])], -1) * torch.cat([torch.ones_like(z[..., :1]), rest], -1)
    # d x_i / d u_i = z_i (1 - z_i) * (remaining stick before i); triangular Jacobian in the first K-1 coordinates
    before = torch.cat([torch.ones_like(z[..., :1]), rest[..., :-1]], -1)
    ld = (torch.log(z) + torch.log1p(-z) + torch.log(before)).sum(-1)
    return x, ld


def test_deterministics_vector_literals_constraints():
    rng = np.random.default_rng(3)
    yv = rng.normal(size=12)
    gv = rng.integers(1, 4, size=12)
    model, lj = compile_model(DETS, {"y": yv.tolist(), "g": gv.tolist(), "lo": -5.0})
    assert {b.name for b in lj.blocks} == {"a", "b", "s", "c", "o", "w", "t"}
    assert lj.dim == 1 + 1 + 1 + 1 + 3 + 2 + 1
    y, gi = torch.tensor(yv, dtype=DT), torch.tensor(gv - 1)

    def hand(bl):
        a, b = bl["a"], bl["b"]
        s, js = positive(bl["s"])
        v = torch.stack([a, a + b, torch.exp(b)], -1)
        p = torch.softmax(v, -1)
        lo, hi = -5.0, a + 3
        sg = torch.sigmoid(bl["c"])
        c = lo + (hi - lo) * sg
        jc = torch.log(hi - lo) + torch.log(sg) + torch.log1p(-sg)
        uo = bl["o"]
        o = torch.cumsum(torch.cat([uo[:, :1], torch.exp(uo[:, 1:])], -1), -1)
        jo = uo[:, 1:].sum(-1)
        w, jw = _stick_breaking(bl["w"])
        al = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
        dir_lp = math.lgamma(6.0) - sum(math.lgamma(x) for x in (1.0, 2.0, 3.0)) + ((al - 1) * torch.log(w)).sum(-1)
        t = bl["t"]
        return (normal_lp(a, 0, 1) + normal_lp(b, 1, 2) + lognormal_lp(s, 0.0, 0.5) + js
                + normal_lp(c, 0, 2) + jc + S_(normal_lp(o, 0, 5)) + jo + dir_lp + jw
                + normal_lp(t, (p * v).sum(-1) + (w * o).sum(-1), 1)
                + S_(normal_lp(y, v[:, gi] + c[:, None], s[:, None])))
    theta = random_theta(lj, S=6, seed=4, scale=0.8)
    check_against(lj, hand, theta)
    with torch.no_grad():
        vals = lj.constrain(theta)
        assert (vals["o"][:, 1:] > vals["o"][:, :-1]).all()
        assert torch.allclose(vals["w"].sum(-1), torch.ones(6, dtype=DT))
        assert ((vals["c"] > -5) & (vals["c"] < vals["a"] + 3)).all()
        assert torch.allclose(vals["p"].sum(-1), torch.ones(6, dtype=DT))


def test_flat_prior_latents():
    """`NAME: TYPE[dims]` with no `~` contributes only its log|det J| (flat prior on its support)."""
    src = "data y: real[N]\nbeta: real[2]\nsigma: real<lower=0>\ny ~ normal(beta[1] + beta[2], sigma)\n"
    yv = [0.3, -0.2, 1.1]
    model, lj = compile_model(src, {"y": yv})
    y = torch.tensor(yv, dtype=DT)

    def hand(b):
        s, js = positive(b["sigma"])
        return js + S_(normal_lp(y, (b["beta"][:, 0] + b["beta"][:, 1])[:, None], s[:, None]))
    check_against(lj, hand, random_theta(lj, S=3, seed=5))


# ---- enumeration: 2-component mixtures ---------------------------------------------------------------------------
MIXTURE = open(os.path.join(MODELS, "mixture.ppl")).read()    # the shipped example
YMIX = [-2.1, -1.7, 0.2, 2.5, 3.1, 2.2, -2.5, 2.9, 3.3, -1.0]


def _mixture_parts(b):
    w, jw = _stick_breaking(b["w"])
    um = b["mu"]
    mu = torch.cumsum(torch.cat([um[:, :1], torch.exp(um[:, 1:])], -1), -1)
    jm = um[:, 1:].sum(-1)
    sg, js = positive(b["sigma"])
    prior = (math.lgamma(2.0) + jw + S_(normal_lp(mu, 0, 10)) + jm + S_(half_normal_lp(sg, 2.0)) + S_(js))
    return w, mu, sg, prior


# the same mixture, with z reaching the likelihood through deterministics
MIXTURE_DET = MIXTURE.replace("y ~ normal(mu[z], sigma[z])", "m = mu[z]\ns = sigma[z]\ny ~ normal(m, s)")
# and with a vector literal of latents as the categorical's probabilities (the reference model's form)
MIXTURE_VEC = MIXTURE.replace("w ~ dirichlet(ones(K))", "w: simplex[K] ~ dirichlet(ones(K))").replace(
    "z[N] ~ categorical(w)", "z[N] ~ categorical([w[1], w[2]])")
assert "m = mu[z]" in MIXTURE_DET and "simplex[K]" in MIXTURE_VEC and "[w[1], w[2]]" in MIXTURE_VEC


@pytest.mark.parametrize("src", [MIXTURE, MIXTURE_DET, MIXTURE_VEC], ids=["plain", "deterministics", "vector"])
def test_enumeration_marginal_likelihood(src):
    model, lj = compile_model(src, {"y": YMIX})
    p = plan(model)
    assert p["z"].estimator == "enumerate"
    assert lj.dim == 1 + 2 + 2                    # z is summed out: no block
    y = torch.tensor(YMIX, dtype=DT)

    def hand(b):
        w, mu, sg, prior = _mixture_parts(b)
        # per row: logsumexp over the two components
        comp = torch.log(w)[:, None, :] + normal_lp(y[None, :, None], mu[:, None, :], sg[:, None, :])   # (S, N, 2)
        return prior + torch.logsumexp(comp, -1).sum(-1)
    check_against(lj, hand, random_theta(lj, S=5, seed=6))


def test_score_path_conditional_density():
    """With --estimator score, z is an input: the log joint is log p(theta, z)."""
    model, lj = compile_model(MIXTURE, {"y": YMIX}, "score")
    assert plan(model, "score")["z"].estimator == "score"
    y = torch.tensor(YMIX, dtype=DT)
    g = torch.Generator().manual_seed(7)
    S = 4
    z = (torch.rand(S, len(YMIX), generator=g) < 0.5).to(DT) + 1.0
    zi = z.long() - 1

    def hand(b):
        w, mu, sg, prior = _mixture_parts(b)
        return (prior + S_(torch.log(w).gather(1, zi))
                + S_(normal_lp(y, mu.gather(1, zi), sg.gather(1, zi))))
    check_against(lj, hand, random_theta(lj, S=S, seed=8), {"z": z})


def test_enumeration_equals_sum_over_score_path_assignments():
    """Summing exp(log p(theta, z)) over every z (2^N assignments, small N) gives the enumerated marginal."""
    yv = YMIX[:5]
    _, lj_e = compile_model(MIXTURE, {"y": yv})
    _, lj_s = compile_model(MIXTURE, {"y": yv}, "score")
    theta = random_theta(lj_e, S=3, seed=9)
    combos = torch.tensor(np.array(np.meshgrid(*[[1, 2]] * 5, indexing="ij")).reshape(5, -1).T, dtype=DT)  # (32, 5)
    with torch.no_grad():
        tot = torch.stack([lj_s.log_prob(theta, {"z": c.expand(3, 5)}) for c in combos], 0)
        assert torch.allclose(torch.logsumexp(tot, 0), lj_e.log_prob(theta), rtol=1e-10)


SCALAR_Z = """
data y: real[N]
m1 ~ normal(0, 3)
m2 ~ normal(0, 3)
z ~ bernoulli(0.3)
y ~ normal(m1 + (m2 - m1) * z, 1)
"""


def test_enumeration_scalar_latent():
    """A scalar discrete latent shared by every row: the sum over z is outside the product over rows."""
    yv = [0.5, 1.5, 1.1, -0.2]
    model, lj = compile_model(SCALAR_Z, {"y": yv})
    assert plan(model)["z"].estimator == "enumerate"
    y = torch.tensor(yv, dtype=DT)

    def hand(b):
        m1, m2 = b["m1"], b["m2"]
        l0 = math.log(0.7) + S_(normal_lp(y, m1[:, None], 1.0))
        l1 = math.log(0.3) + S_(normal_lp(y, m2[:, None], 1.0))
        return normal_lp(m1, 0, 3) + normal_lp(m2, 0, 3) + torch.logsumexp(torch.stack([l0, l1]), 0)
    check_against(lj, hand, random_theta(lj, S=4, seed=10, scale=1.5))


def test_enumerated_draws_follow_the_exact_conditional():
    """constrain() draws z from p(z | theta, y): with well-separated components it picks the right one."""
    model, lj = compile_model(MIXTURE, {"y": YMIX})
    # w = (0.5, 0.5), mu = (-2, 2.5), sigma = (0.5, 0.5)
    u = torch.tensor([[0.0, -2.0, math.log(4.5), math.log(0.5), math.log(0.5)]], dtype=DT)
    b = {bl.name: bl for bl in lj.blocks}
    theta = torch.zeros(1, lj.dim, dtype=DT)
    theta[0, b["w"].offset] = 0.0
    theta[0, b["mu"].offset:b["mu"].offset + 2] = u[0, 1:3]
    theta[0, b["sigma"].offset:b["sigma"].offset + 2] = u[0, 3:5]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = lj.constrain(theta.expand(200, -1), None, gen)["z"]
    want = torch.tensor([1 if v < 0.25 else 2 for v in YMIX], dtype=DT)
    frac = (z == want).to(DT).mean(0)
    assert (frac[torch.tensor([abs(v - 0.25) > 1.5 for v in YMIX])] > 0.97).all()


# ---- link functions folded into the distribution (poisson(exp(e)) -> poisson_log(e), ...) ---------------------------
@pytest.mark.parametrize("linked,folded", [
    ("y ~ poisson(exp(a + b * x))", "y ~ poisson_log(a + b * x)"),
    ("y ~ bernoulli(inv_logit(a + b * x))", "y ~ bernoulli_logit(a + b * x)"),
    ("y ~ binomial(n, inv_logit(a + b * x))", "y ~ binomial_logit(n, a + b * x)"),
])
def test_link_folding_keeps_the_density(linked, folded):
    from ppl import distributions as DS
    rng = np.random.default_rng(4)
    x = rng.normal(size=12)
    n = rng.integers(1, 6, 12)
    y = np.minimum(rng.poisson(2, 12), n) if "binomial" in linked else \
        (rng.random(12) < 0.5).astype(int) if "bernoulli" in linked else rng.poisson(2, 12)
    head = "data x: real[N]\ndata n: int<lower=0>[N]\ndata y: int<lower=0>[N]\na ~ normal(0, 1)\nb ~ normal(0, 1)\n"
    data = {"x": x.tolist(), "y": y.tolist(), "n": n.tolist()}
    _, lj1 = compile_model(head + linked + "\n", data)
    model2, lj2 = compile_model(head + folded + "\n", data)
    node = lj1.model.nodes["y"]
    assert DS.fold_link(node.dist.spec, node.dist.args)[0] == model2.nodes["y"].dist.spec
    theta = random_theta(lj1, S=5, seed=1, scale=1.0)
    torch.testing.assert_close(lj1.log_prob(theta), lj2.log_prob(theta), rtol=1e-12, atol=1e-10)
    # and the unfolded density (torch.distributions on the linked parameter) agrees too
    eta = theta[:, :1] + theta[:, 1:2] * torch.tensor(x, dtype=DT)
    prior = normal_lp(theta[:, 0], 0, 1) + normal_lp(theta[:, 1], 0, 1)
    yt = torch.tensor(y, dtype=DT)
    D = torch.distributions
    lik = (D.Poisson(torch.exp(eta)).log_prob(yt) if "poisson" in linked else
           D.Bernoulli(probs=torch.sigmoid(eta)).log_prob(yt) if "bernoulli" in linked else
           D.Binomial(torch.tensor(n, dtype=DT), probs=torch.sigmoid(eta)).log_prob(yt))
    torch.testing.assert_close(lj1.log_prob(theta), prior + S_(lik), rtol=1e-9, atol=1e-8)
