"""The mode search and the Laplace start (ppl/infer/laplace.py, optim.newton), and the fixed draws
that follow it: ill-conditioned flat-prior regressions (tests/ill_conditioned.py) fitted at the
defaults against their exact posteriors; the batched Hessian against autograd's; Newton on badly
scaled functions; a centred hierarchy keeps its local mode; the fixed draws grow only where the
posterior needs them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ppl
from ppl.backend.log_joint import LogJoint
from ppl.backend.runtime import Runtime
from ppl.config import FitConfig
from ppl.infer import laplace as L
from ppl.infer.optim import newton
from ppl.plan import plan as make_plan

import ill_conditioned as ic
from conftest import model_paths

MEAN_TOL, SD_TOL = 0.1, 0.15
CASES = ic.cases()


def _program(src, data):
    m = ppl.loads(src, "m.ppl").check(data)
    return LogJoint(m, make_plan(m, "auto", FitConfig.from_python().opt), Runtime.make("cpu", "float64", 0))


def test_exact_posterior_is_the_normal_inverse_gamma_one():
    """Flat b and flat sigma: b ~ t_{N-k-1}(b_hat, RSS/(N-k-1) (Z'Z)^-1), sigma^2 ~ InvGamma((N-k-1)/2, RSS/2)."""
    c = ic.years(N=40, seed=5)
    x, y = np.array(c.data["x"]), np.array(c.data["y"])
    Z = np.column_stack([np.ones_like(x), x])
    N, k = Z.shape
    b = np.linalg.lstsq(Z, y, rcond=None)[0]
    rss = float(((y - Z @ b) ** 2).sum())
    nu = N - k - 1
    sd_b = np.sqrt(np.diag(rss / (nu - 2) * np.linalg.inv(Z.T @ Z)))
    a, beta = nu / 2, rss / 2
    e_s = math.sqrt(beta) * math.exp(math.lgamma(a - 0.5) - math.lgamma(a))
    sd_s = math.sqrt(beta / (a - 1) - e_s ** 2)
    got = c.exact
    for name, m, s in [("alpha", b[0], sd_b[0]), ("beta", b[1], sd_b[1]), ("sigma", e_s, sd_s)]:
        assert got[name][0] == pytest.approx(m, abs=1e-6 * s), name
        assert got[name][1] == pytest.approx(s, rel=1e-6), name


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ill_conditioned_regression_fits_at_the_defaults(case):
    fit = ppl.loads(case.src, f"{case.name}.ppl").fit(case.data, seed=1, draws=4000)
    assert fit.init == "Laplace at the mode", fit.init           # no cold start, nothing clamped
    s = fit.summary()
    for k, (m, sd) in case.exact.items():
        err, ratio = (s[k]["mean"] - m) / sd, s[k]["sd"] / sd
        assert abs(err) <= MEAN_TOL, f"{case.name} {k}: mean off by {err:.3f} sd"
        assert abs(ratio - 1) <= SD_TOL, f"{case.name} {k}: sd ratio {ratio:.3f}"
    assert fit.verdict_label == "good", fit.verdict
    assert fit.fixed_draws <= 4096            # a near-Gaussian posterior: not the 16384 of eight schools


def test_a_wide_direction_keeps_its_width():
    """Earnings on height: the intercept's sd is 8e3 (unconstrained units); the old absolute clamp
    (sd > 1e3: unit scale) started the fit 8,000 times too narrow, 5 sds off in the end."""
    case = ic.earnings_on_height()
    lj = _program(case.src, case.data)
    start = L.laplace(lj)
    assert start.note == "Laplace at the mode"
    sd = (start.A @ start.A.T).diagonal().sqrt()
    alpha = next(b.offset for b in lj.blocks if b.name == "alpha")
    assert float(sd[alpha]) == pytest.approx(case.exact["alpha"][1], rel=0.1)


def test_batched_hessian_matches_autograd():
    model, data = model_paths("radon")
    lj = _program(open(model).read(), data)
    x = torch.randn(lj.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.3

    def f(t):
        return -lj.log_prob(t.unsqueeze(0))[0]
    value, grad, H = L.value_grad_hess(lj, x)
    assert value == pytest.approx(float(f(x)), rel=1e-12)
    xg = x.clone().requires_grad_(True)
    assert torch.allclose(grad, torch.autograd.grad(f(xg), xg)[0], rtol=1e-10, atol=1e-10)
    assert torch.allclose(H, torch.autograd.functional.hessian(f, x), rtol=1e-8, atol=1e-8)


def _vgh(f):
    def run(x):
        x = x.detach().requires_grad_(True)
        v = f(x)
        g, = torch.autograd.grad(v, x, create_graph=True)
        H = torch.stack([torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(x.numel())])
        return float(v.detach()), g.detach(), H.detach()
    return run


def test_newton_on_a_badly_scaled_valley():
    """A Rosenbrock valley with its coordinates scaled by 1e4 and 1e-3: the minimum (1e-4, 1e3)."""
    def f(x):
        a, b = 1e4 * x[0], 1e-3 * x[1]
        return (1 - a) ** 2 + 100 * (b - a * a) ** 2
    x0 = torch.zeros(2, dtype=torch.float64)
    res = newton(lambda x: float(f(x)), _vgh(f), x0, max_iter=100)
    assert res.converged
    assert torch.allclose(res.x, torch.tensor([1e-4, 1e3], dtype=torch.float64), rtol=1e-6)


def test_newton_reports_a_density_without_a_mode():
    """exp(-x) on the real line has no minimum of x -> x: not converged, never a false mode."""
    def f(x):
        return x[0] + 0.5 * x[1] ** 2
    res = newton(lambda x: float(f(x)), _vgh(f), torch.zeros(2, dtype=torch.float64), max_iter=30)
    assert not res.converged


def test_centred_radon_starts_at_its_local_mode():
    """Newton from 0 dives into the funnel (tau -> 1e-16); L-BFGS, then Newton, find the local mode."""
    model, data = model_paths("radon")
    src = open(model).read()
    lj = _program(src, data)
    start = L.laplace(lj)
    assert start.note == "Laplace at the mode"
    b = next(b for b in lj.blocks if b.name == "sigma_a")
    assert 0.1 < math.exp(float(start.mu0[b.offset])) < 1.0


def test_fixed_draws_grow_where_the_posterior_needs_them():
    """Eight schools (non-centred): tau's heavy tail needs thousands of draws (the regressions above: at most 4096)."""
    fit = ppl.load(model_paths("eight_schools")[0]).fit(model_paths("eight_schools")[1], seed=1, draws=200)
    assert fit.optimizer == "dadvi" and fit.fixed_draws >= 4096
