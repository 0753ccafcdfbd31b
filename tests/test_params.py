"""`param` declarations (ppl/backend/params.py and its seam through the
checker, the log joint and every optimiser): point estimates fitted jointly
with q, against closed forms: a sample mean, type-II maximum likelihood of a
normal-normal hierarchy (the closed-form marginal likelihood maximised by
torch's L-BFGS), probabilistic PCA with per-row latents (Tipping & Bishop's
closed form), least squares on relu features, a relu network at a local
optimum; bijections keep a param in its set; outputs report values."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import ppl
from ppl.cli import main

MEAN = """
data y: real[N]
param m: real
param s: real<lower=0>
y ~ normal(m, s)
"""

HIER = """
data y: real[J]
data sigma: real<lower=0>[J]
param mu: real
param tau: real<lower=0>
theta[J] ~ normal(mu, tau)
y ~ normal(theta, sigma)
"""


def _minimise(f, x0, iters: int = 100):
    """Damped Newton (Levenberg-Marquardt) with autograd's exact Hessian: an independent reference
    optimiser (torch.optim would import torch._dynamo, 7 s)."""
    x = torch.tensor(x0, dtype=torch.float64)
    fx, lam = float(f(x)), 1e-3
    eye = torch.eye(x.numel(), dtype=torch.float64)
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(f, x)
        H = torch.autograd.functional.hessian(f, x)
        while lam < 1e12:
            step = torch.linalg.solve(H + lam * eye, -g)
            fn = float(f(x + step))
            if fn <= fx:
                break
            lam *= 10
        if not fn <= fx:
            break
        x, done = x + step, fx - fn < 1e-13
        fx, lam = fn, max(lam / 10, 1e-12)
        if done:
            break
    return x, fx


def test_param_mean_and_sd_are_the_sample_moments():
    y = np.random.default_rng(0).normal(3.0, 2.0, 50)
    fit = ppl.loads(MEAN).fit({"y": y.tolist()}, seed=1)
    assert float(fit.params["m"]) == pytest.approx(y.mean(), abs=1e-4)
    assert float(fit.params["s"]) == pytest.approx(y.std(), rel=1e-4)         # ML: divisor N
    loglik = -0.5 * len(y) * (math.log(2 * math.pi * y.var()) + 1)
    assert fit.elbo == pytest.approx(loglik, abs=1e-6)     # no latents: the ELBO is the log-likelihood
    assert "m" not in fit.draws and "s" not in fit.draws


def test_type2_ml_of_a_hierarchy_matches_the_closed_form_marginal():
    rng = np.random.default_rng(4)
    J = 30
    sigma = rng.uniform(0.5, 2.0, J)
    y = rng.normal(1.0, 2.0, J) + sigma * rng.normal(size=J)
    yt, st = torch.tensor(y), torch.tensor(sigma)
    # y_j ~ N(mu, sqrt(tau^2 + sigma_j^2)) with theta integrated out; maximised over (mu, log tau)
    x, neg = _minimise(lambda x: -torch.distributions.Normal(x[0], torch.sqrt(torch.exp(2 * x[1]) + st ** 2))
                    .log_prob(yt).sum(), [0.0, 0.0])
    mu_ml, tau_ml = float(x[0]), math.exp(float(x[1]))
    assert 0.5 < tau_ml < 5                                  # an interior maximiser
    # theta_j given (mu, tau, y) are independent normals: mean-field q is exact, the ELBO's maximum
    # is the log marginal likelihood, and its maximiser in (mu, tau) the type-II ML estimate
    fit = ppl.loads(HIER).fit({"y": y.tolist(), "sigma": sigma.tolist()}, method="meanfield", seed=1)
    assert float(fit.params["mu"]) == pytest.approx(mu_ml, rel=1e-2)
    assert float(fit.params["tau"]) == pytest.approx(tau_ml, rel=1e-2)
    assert fit.elbo == pytest.approx(-neg, abs=1e-3)
    # q(theta) is the exact conditional posterior at the ML estimate
    v = 1.0 / (1.0 / tau_ml ** 2 + 1.0 / sigma ** 2)
    m = v * (mu_ml / tau_ml ** 2 + y / sigma ** 2)
    assert np.abs(fit.draws["theta"].mean(0) - m).max() < 0.15 * np.sqrt(v).min()


def test_ppca_latent_rows_times_a_param_matrix_reach_the_ml_solution():
    """z[N, K] @ W[K, P]: a latent matrix times a param matrix, plus a bias row.  The ML noise variance is
    the mean of the discarded eigenvalues of the sample covariance, and W W^T the kept eigenvalue less
    it (Tipping & Bishop 1999); at that W the posterior of each z_n is exactly Gaussian and diagonal."""
    model = """
data y: real[N, P]
K = 1
param W: real[K, P]
param m: real[P]
param s: real<lower=0>
z[N, K] ~ normal(0, 1)
y ~ normal(z @ W + m, s)
"""
    rng = np.random.default_rng(0)
    N, P = 100, 5
    y = rng.normal(size=(N, 1)) @ (2 * rng.normal(size=(1, P))) + rng.normal(size=P) + 0.5 * rng.normal(size=(N, P))
    lam = np.sort(np.linalg.eigvalsh(np.cov(y.T, bias=True)))[::-1]
    s2 = lam[1:].mean()
    loglik = -N / 2 * (P * math.log(2 * math.pi) + math.log(lam[0]) + (P - 1) * math.log(s2) + P)
    fit = ppl.loads(model).fit({"y": y.tolist()}, method="meanfield", seed=1)
    W = fit.params["W"]
    assert float(fit.params["s"]) ** 2 == pytest.approx(s2, rel=1e-3)
    assert float((W @ W.T)[0, 0]) == pytest.approx(lam[0] - s2, rel=1e-3)
    assert np.allclose(fit.params["m"], y.mean(0), atol=1e-3)
    assert fit.elbo == pytest.approx(loglik, abs=1e-2)


def test_least_squares_on_relu_features():
    """relu of data features, a param output layer with a bias: the ML weights are least squares."""
    model = """
data x: real[N, D]
data A: real[D, H]
data y: real[N]
param w: real[H]
param c: real
param s: real<lower=0>
h = relu(x @ A)
y ~ normal(h @ w + c, s)
"""
    rng = np.random.default_rng(1)
    N, D, H = 80, 4, 3                       # well-conditioned features (X'X's eigenvalues 14 to 250)
    x, A = rng.normal(size=(N, D)), rng.normal(size=(D, H))
    h = np.maximum(x @ A, 0)
    y = h @ rng.normal(size=H) + 0.5 + 0.2 * rng.normal(size=N)
    X = np.column_stack([h, np.ones(N)])
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    fit = ppl.loads(model).fit({"x": x.tolist(), "A": A.tolist(), "y": y.tolist()}, seed=1)
    assert np.allclose(fit.params["w"], beta[:H], atol=1e-4)
    assert float(fit.params["c"]) == pytest.approx(beta[H], abs=1e-4)
    assert float(fit.params["s"]) == pytest.approx(np.sqrt(np.mean((y - X @ beta) ** 2)), rel=1e-4)


def test_relu_network_params_reach_a_local_optimum_at_least_as_good_as_the_truth():
    """A two-layer relu network, every weight a param (no latents): ppl's ELBO is the log-likelihood of
    an independent torch forward pass at the fitted weights, that likelihood is at least the generating
    weights', and torch's L-BFGS started from the fitted weights finds no better point nearby."""
    model = """
data x: real[N, D]
data y: real[N]
H = 3
param W1: real[D, H]
param b1: real[H]
param w2: real[H]
param c: real
param s: real<lower=0>
y ~ normal(relu(x @ W1 + b1) @ w2 + c, s)
"""
    rng = np.random.default_rng(0)
    N, D, H = 60, 2, 3
    x = rng.normal(size=(N, D))
    W1, b1, w2 = rng.normal(size=(D, H)), 0.5 * rng.normal(size=H), 2 * rng.normal(size=H)
    y = np.maximum(x @ W1 + b1, 0) @ w2 + 0.3 + 0.1 * rng.normal(size=N)
    xt, yt = torch.tensor(x), torch.tensor(y)

    def nll(W1, b1, w2, c, s):
        return -torch.distributions.Normal(torch.relu(xt @ W1 + b1) @ w2 + c, s).log_prob(yt).sum()
    resid = y - (np.maximum(x @ W1 + b1, 0) @ w2 + 0.3)
    truth = float(nll(*(torch.tensor(v) for v in (W1, b1, w2, 0.3, np.sqrt(np.mean(resid ** 2))))))
    fit = ppl.loads(model).fit({"x": x.tolist(), "y": y.tolist()}, seed=2)
    p = fit.params
    at_fit = float(nll(*(torch.tensor(p[k]) for k in ("W1", "b1", "w2", "c", "s"))))
    assert fit.elbo == pytest.approx(-at_fit, abs=1e-6)
    assert at_fit <= truth
    shapes = [p[k].shape for k in ("W1", "b1", "w2", "c")]
    flat0 = np.concatenate([p[k].reshape(-1) for k in ("W1", "b1", "w2", "c")] + [[math.log(p["s"])]])

    def f(v):
        parts, i = [], 0
        for sh in shapes:
            n = int(np.prod(sh))
            parts.append(v[i:i + n].reshape(sh))
            i += n
        return nll(*parts, torch.exp(v[i]))
    _, best = _minimise(f, flat0)
    assert at_fit - best < 1e-3


def test_a_positive_param_stays_positive_where_its_ml_value_is_zero():
    """Eight schools: the type-II ML estimate of tau is 0 (the between-school spread is smaller than
    the standard errors).  tau = exp(u) stays positive as it heads there."""
    y = [28, 8, -3, 7, -1, 1, 18, 12]
    sigma = [15, 10, 16, 11, 9, 11, 10, 18]
    fit = ppl.loads(HIER).fit({"y": y, "sigma": sigma}, method="meanfield", seed=1)
    tau = float(fit.params["tau"])
    assert 0 < tau < 1.0
    # the marginal likelihood at tau = 0: y_j ~ N(mu, sigma_j), mu the precision-weighted mean
    w = 1 / np.asarray(sigma, float) ** 2
    assert float(fit.params["mu"]) == pytest.approx(np.sum(w * np.asarray(y)) / w.sum(), abs=0.1)


def test_params_map_onto_their_sets_without_a_jacobian():
    from ppl.backend.log_joint import LogJoint
    from ppl.plan import plan
    model = ppl.loads("""
data y: real[N]
param s: real<lower=0>
param u: real<lower=-1, upper=2>
param v: real[2, 3]
y ~ normal(u, s)
""").check({"y": [0.5, 1.0]})
    lj = LogJoint(model, plan(model))
    P = lj.params
    v0 = P.values()
    assert float(v0["s"]) == 1.0 and float(v0["u"]) == pytest.approx(0.5)     # the initial values
    assert float(v0["v"].std()) > 0                                          # a matrix: small random values
    with torch.no_grad():
        P.u["s"].fill_(-40.0)
        P.u["u"].fill_(50.0)
    v1 = P.values()
    assert 0 < float(v1["s"]) < 1e-15 and -1 < float(v1["u"]) <= 2
    # the log joint is the likelihood alone: no log|det J| of the params
    with torch.no_grad():
        P.u["s"].fill_(math.log(2.0))
        P.u["u"].fill_(0.0)
        lp = float(lj.log_prob(torch.zeros((1, 0), dtype=torch.float64))[0])
    expect = -2 * (math.log(2.0) + 0.5 * math.log(2 * math.pi)) - 0.5 * ((1.0 - 0.5) / 2.0) ** 2
    assert lp == pytest.approx(expect, abs=1e-12)


def test_outputs_report_params_as_values(tmp_path, capsys):
    model = tmp_path / "m.ppl"
    model.write_text(MEAN)
    data = tmp_path / "y.json"
    y = np.random.default_rng(0).normal(3.0, 2.0, 40)
    data.write_text(json.dumps({"y": y.tolist()}))
    assert main(["fit", str(model), str(data), "--format", "json", "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["point_estimates"]["m"] == pytest.approx(y.mean(), abs=1e-4)
    assert set(out["point_estimates"]) == {"m", "s"} and "m" not in out["params"]
    assert main(["fit", str(model), str(data), "--seed", "1", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.split()[:1] == ["m"])
    assert float(row.split()[1]) == pytest.approx(y.mean(), abs=1e-3) and len(row.split()) == 2
    header = (tmp_path / "o" / "draws.csv").read_text().splitlines()[0]
    assert "m" not in header.split(",")
    fit = ppl.load_fit(str(tmp_path / "o"))               # restored with its params ...
    assert float(fit.params["m"]) == pytest.approx(y.mean(), abs=1e-4)
    rep = fit.predict(draws=4000, seed=2)["y"]             # ... which the predictive uses
    assert rep.mean() == pytest.approx(y.mean(), abs=0.05)
    assert rep.std() == pytest.approx(y.std(), rel=0.03)


def test_relu_and_sigmoid_functions():
    from ppl import functions as FN
    from ppl.backend.ops import TorchOps
    x = torch.tensor([[-2.0, 0.0, 3.0]], dtype=torch.float64)
    ops = TorchOps(torch.float64, torch.device("cpu"))
    assert torch.equal(FN.REGISTRY["relu"].impl(ops, x), torch.tensor([[0.0, 0.0, 3.0]], dtype=torch.float64))
    assert torch.allclose(FN.REGISTRY["sigmoid"].impl(ops, x), FN.REGISTRY["inv_logit"].impl(ops, x))
    from ppl.distributions import fold_link
    from ppl.frontend.ast import Call, Name
    from ppl.errors import Span
    sp = Span(None, 1, 1, 1, 2)
    assert fold_link("bernoulli", (Call("sigmoid", (Name("a", sp),), sp, sp),))[0] == "bernoulli_logit"


def test_graph_draws_a_param_as_a_box():
    from ppl.graph import build_graph, to_dot, to_text
    g = build_graph(ppl.loads(HIER).check())
    assert g.nodes["tau"]["kind"] == "param"
    assert "param tau" in to_dot(g) and "shape=box" in to_dot(g).split('"tau" [')[1].splitlines()[0]
    assert "param         tau" in to_text(g)
