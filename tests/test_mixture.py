"""The `mixture` family (ppl/infer/mixture.py): its density against torch's own mixture of
multivariate normals, its stratified ELBO against the plain ELBO of its draws, and what it is for:
both modes of bimodal posteriors (a sign-symmetric product, a mixture likelihood without an
ordering) where one Gaussian covers one mode or the saddle between them."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import ppl
from ppl.errors import UsageError
from ppl.infer.families import Preconditioner
from ppl.infer.mixture import Mixture

D, K = 3, 3


class _Config:
    components = K


def _mixture(seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn((D, D), generator=g, dtype=torch.float64)
    pre = Preconditioner(torch.randn(D, generator=g, dtype=torch.float64),
                         torch.linalg.cholesky(B @ B.T + 0.5 * torch.eye(D, dtype=torch.float64)))
    mix = Mixture(pre, g, _Config())
    with torch.no_grad():
        mix.flat.copy_(torch.randn(mix.flat.shape, generator=g, dtype=torch.float64))
    return mix


def test_log_q_is_the_mixture_density():
    """log q(theta) equals torch's MixtureSameFamily of the components mapped to theta
    (mean mu0 + A m_k, Cholesky factor A C_k), computed independently."""
    mix = _mixture()
    p = mix._raw
    A, mu0 = mix.pre.A, mix.pre.mu0
    C = torch.tril(p["L"], -1) + torch.diag_embed(torch.exp(torch.diagonal(p["L"], dim1=-2, dim2=-1)))
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=p["logits"]),
        torch.distributions.MultivariateNormal(mu0 + p["m"] @ A.T, scale_tril=A @ C))
    theta = ref.sample((50,))
    assert torch.allclose(mix.log_q(theta).detach(), ref.log_prob(theta), atol=1e-10)
    draws, log_q = mix.rsample_with_log_q(20)
    assert torch.allclose(log_q.detach(), ref.log_prob(draws.detach()), atol=1e-10)


class _Gaussian:
    """A stand-in compiled model: log p = an anisotropic Gaussian in theta."""
    score = False
    dim = D

    def __init__(self):
        self.scale = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)

    def log_prob(self, theta, batch=None):
        return -0.5 * ((theta / self.scale) ** 2).sum(-1)

    def evaluate(self, theta, batch=None):
        class E:
            pass
        e = E()
        e.total = self.log_prob(theta)
        return e

    def largest_node(self):
        return 1


def test_the_stratified_elbo_is_the_elbo():
    """Per component its own draws, weighted by the weights: the same expectation as
    E_q[log p - log q] over ancestral draws (within Monte Carlo error), and its gradient reaches the
    weights."""
    mix, model = _mixture(1), _Gaussian()
    torch.manual_seed(0)
    eps = torch.randn((20000, D), dtype=torch.float64)
    strat = mix.stratified_rows(model, eps)
    theta, log_q = mix.rsample_with_log_q(200000)
    plain = (model.log_prob(theta) - log_q).detach()
    se = math.sqrt(float(strat.detach().var()) / 20000 + float(plain.var()) / 200000)
    assert abs(float(strat.detach().mean()) - float(plain.mean())) < 4 * se
    strat.mean().backward()
    g = mix.flat.grad[:K]
    assert torch.isfinite(g).all() and float(g.abs().max()) > 0


AB = """
data y: real[N]
a ~ normal(0, 1)
b ~ normal(0, 1)
y ~ normal(a * b, 1)
"""
Y_AB = [float(v) for v in np.round(np.random.default_rng(0).normal(1.5, 1, 20), 4)]


def _grid_ab():
    g = np.linspace(-5, 5, 1001)
    A, B = np.meshgrid(g, g, indexing="ij")
    y = np.array(Y_AB)
    lp = -0.5 * A ** 2 - 0.5 * B ** 2 - 0.5 * ((y[None, None, :] - (A * B)[..., None]) ** 2).sum(-1)
    w = np.exp(lp - lp.max())
    w /= w.sum()
    return float(np.sqrt((w * A ** 2).sum())), float((w * np.abs(A)).sum())


def test_both_modes_of_a_sign_symmetric_product():
    """y ~ normal(a b, 1): the posterior has two modes, (a, b) and (-a, -b).  The mixture puts half its
    mass on each and matches a's sd and E|a| from a grid; the full-rank Gaussian cannot."""
    sd_a, abs_a = _grid_ab()
    m = ppl.loads(AB, "ab.ppl")
    f = m.fit({"y": Y_AB}, method="mixture", seed=1, draws=20000)
    a, b = f.draws["a"], f.draws["b"]
    # (the split of mass between the two mirror modes is weakly pinned by the ELBO: 0.57 and 0.44 at
    # seeds 1 and 2 since the new mode search changed the full-rank start; 0.50 before)
    assert abs(float(((a > 0) & (b > 0)).mean()) - 0.5) < 0.1
    assert abs(float(((a < 0) & (b < 0)).mean()) - 0.5) < 0.1
    assert abs(float(a.std()) / sd_a - 1) < 0.1 and abs(float(np.abs(a).mean()) / abs_a - 1) < 0.1
    assert "2 modes found" in f.verdict and "raised the ELBO" in f.verdict
    fr = m.fit({"y": Y_AB}, method="fullrank", seed=1, draws=4000)
    both = float(((fr.draws["a"] > 0) & (fr.draws["b"] > 0)).mean())
    assert both < 0.15 or both > 0.85 or abs(float(np.abs(fr.draws["a"]).mean()) / abs_a - 1) > 0.2   # one mode, or the saddle
    assert f.elbo > fr.elbo + 0.5         # up to log 2 over a Gaussian on one of two mirror modes (0.84 measured)


MIX = """
data y: real[N]
mu[2] ~ normal(0, 5)
z[N] ~ categorical([0.5, 0.5])
y ~ normal(mu[z], 1)
"""


def test_both_labellings_of_a_mixture_likelihood():
    """Two components without an ordering: (mu1, mu2) near (-2, 2) and near (2, -2) equally likely.
    The mixture finds both (each mu's mean near 0, ELBO log 2 above one mode's Gaussian)."""
    rng = np.random.default_rng(1)
    y = np.concatenate([rng.normal(-2, 1, 15), rng.normal(2, 1, 15)]).round(4).tolist()
    m = ppl.loads(MIX, "mix.ppl")
    f = m.fit({"y": y}, method="mixture", components=2, seed=1, draws=20000)
    s = f.summary()
    for k in ("mu[1]", "mu[2]"):
        assert abs(s[k]["mean"]) < 0.2 and 1.7 < s[k]["sd"] < 2.2, s[k]
    base_elbo = float(re.search(r"fullrank fit \(.*ELBO (-?[0-9.]+)\)", f.init).group(1))   # its start
    assert abs(f.elbo - base_elbo - math.log(2)) < 0.05


def test_on_a_gaussian_posterior_the_mixture_keeps_the_full_rank_fit():
    y = [1.2, 0.4, 2.1, 1.7, 0.9, 1.5]
    f = ppl.loads("data y: real[N]\nmu ~ normal(0, 2)\ny ~ normal(mu, 1)\n", "c.ppl").fit(
        {"y": y}, method="mixture", seed=0, draws=20000)
    assert "did not raise the ELBO" in f.verdict and "this is the fullrank fit" in f.verdict
    prec = 0.25 + len(y)
    s = f.summary()["mu"]
    assert abs(s["mean"] - sum(y) / prec) < 0.05 / math.sqrt(prec) and abs(s["sd"] * math.sqrt(prec) - 1) < 0.05


def test_components_belongs_to_the_mixture():
    with pytest.raises(UsageError, match="method='mixture' is fitted by objective='elbo' or objective='iwae'"):
        ppl.loads("mu ~ normal(0, 1)\n", "m.ppl").fit(method="mixture", objective="renyi")
    with pytest.raises(UsageError, match="components= applies to method= mixture"):
        ppl.loads("mu ~ normal(0, 1)\n", "m.ppl").fit(method="fullrank", components=2)
    with pytest.raises(UsageError, match="components= must be at least 1"):
        ppl.loads("mu ~ normal(0, 1)\n", "m.ppl").fit(method="mixture", components=0)


def test_the_fixed_draw_optimiser_serves_the_mixture_when_asked():
    """auto fits the mixture by fixed draws; asking for them is not refused (the flow's are Adam's only)."""
    y = [1.2, 0.4, 2.1, 1.7, 0.9, 1.5]
    m = ppl.loads("data y: real[N]\nmu ~ normal(0, 2)\ny ~ normal(mu, 1)\n", "c.ppl")
    f = m.fit({"y": y}, method="mixture", optimizer="dadvi", components=2, seed=0, draws=200)
    assert f.optimizer == "dadvi" and f.evals > 0
    with pytest.raises(UsageError, match="optimizer='dadvi' needs"):
        m.fit({"y": y}, method="flow", optimizer="dadvi")
