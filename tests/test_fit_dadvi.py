"""The fixed-draw finish (`--optimizer dadvi`, ppl.infer.engine.FixedDraws): exact on Gaussian
posteriors (moment-matched draws), the same optimum as Adam elsewhere, and the rules of
`--optimizer auto`."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import ppl
from ppl.errors import UsageError

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "models")

REGRESSION = """
data x: real[N]
data y: real[N]
alpha ~ normal(0, 10)
beta ~ normal(0, 10)
y ~ normal(alpha + beta * x, 1.5)
"""


def _regression_data(seed=4, N=30):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 1.0, N)             # off-centre: alpha and beta correlate strongly
    y = 1.0 - 0.7 * x + rng.normal(0, 1.5, N)
    return x, y


def _exact_regression(x, y, s=1.5, prior_sd=10.0):
    X = np.stack([np.ones_like(x), x], 1)
    prec = X.T @ X / s ** 2 + np.eye(2) / prior_sd ** 2
    cov = np.linalg.inv(prec)
    return cov @ (X.T @ y / s ** 2), cov


def test_gaussian_posterior_is_fitted_exactly():
    """Linear regression with known noise: the posterior is Gaussian, so with moment-matched draws the
    fixed-draw optimum is the posterior itself: mean and covariance to rounding, weights uniform."""
    x, y = _regression_data()
    mean, cov = _exact_regression(x, y)
    fit = ppl.loads(REGRESSION, "reg.ppl").fit({"x": x.tolist(), "y": y.tolist()}, seed=3, draws=200000)
    assert fit.optimizer == "dadvi" and fit.method == "fullrank" and fit.converged
    d = np.stack([fit.draws["alpha"], fit.draws["beta"]], 1)
    se = np.sqrt(np.diag(cov) / d.shape[0])
    assert np.all(np.abs(d.mean(0) - mean) < 5 * se), (d.mean(0), mean)
    assert np.allclose(np.cov(d.T), cov, rtol=0.02, atol=0.02 * np.sqrt(np.outer(np.diag(cov), np.diag(cov))).max())
    assert abs(np.corrcoef(d.T)[0, 1] - cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1])) < 0.01
    assert fit.sd_log_w < 1e-6 and fit.khat == 0.0 and fit.verdict_label == "good"


def test_fixed_draw_optimum_is_adams_optimum():
    """Eight schools (a non-Gaussian posterior): the fixed-draw fit and a long Adam fit agree."""
    path = os.path.join(MODELS, "eight_schools.ppl"), os.path.join(MODELS, "eight_schools.csv")
    m = ppl.load(path[0])
    a = m.fit(path[1], seed=1, draws=20000, optimizer="dadvi").summary()
    b = m.fit(path[1], seed=2, draws=20000, optimizer="adam", steps=3000, mc_samples=64, tol=0).summary()
    for k in ("mu", "tau", "theta[1]", "theta[8]"):
        assert abs(a[k]["mean"] - b[k]["mean"]) < 0.1 * b[k]["sd"], (k, a[k], b[k])
        assert abs(a[k]["sd"] / b[k]["sd"] - 1) < 0.1, (k, a[k], b[k])


@pytest.mark.parametrize("options,want", [
    ({}, "dadvi"),
    ({"steps": 200}, "adam"),                         # --steps N runs N Adam steps
    ({"lr": 0.05}, "adam"),
    ({"mc_samples": 8}, "adam"),
    ({"method": "meanfield"}, "dadvi"),
    ({"method": "flow", "steps": 50}, "anneal"),       # the flow: its own schedule
    ({"method": "lowrank"}, "adam"),                  # no closed-form chain rule for low-rank
    ({"objective": "iwae", "steps": 50}, "adam"),
])
def test_auto_chooses(options, want):
    x, y = _regression_data()
    fit = ppl.loads(REGRESSION, "reg.ppl").fit({"x": x.tolist(), "y": y.tolist()}, seed=0, draws=100, **options)
    assert fit.optimizer == want
    assert (fit.evals > 0) == (want == "dadvi")


def test_large_data_uses_adam():
    rng = np.random.default_rng(0)
    N = 20000                                         # 16 MC samples would exceed the per-step budget
    x = rng.normal(size=N)
    fit = ppl.loads(REGRESSION, "reg.ppl").fit({"x": x.tolist(), "y": (2 * x + rng.normal(size=N)).tolist()},
                                               seed=0, draws=100)
    assert fit.optimizer == "adam" and fit.mc_samples < 16


def test_dadvi_refuses_families_without_a_closed_form_gradient():
    x, y = _regression_data()
    with pytest.raises(UsageError, match="optimizer='dadvi' needs"):
        ppl.loads(REGRESSION, "reg.ppl").fit({"x": x.tolist(), "y": y.tolist()}, method="flow", optimizer="dadvi")
    with pytest.raises(UsageError, match=r"valid: auto, adam, dadvi, anneal"):
        ppl.loads(REGRESSION, "reg.ppl").fit({"x": x.tolist(), "y": y.tolist()}, optimizer="newton")


def test_cli_reports_the_optimizer():
    args = [sys.executable, "-m", "ppl", "fit", os.path.join(MODELS, "eight_schools.ppl"),
            os.path.join(MODELS, "eight_schools.csv"), "--format", "json", "--draws", "200"]
    out = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    assert out["optimizer"] == "dadvi" and out["evaluations"] > 0 and out["fixed_draws"] >= 1000
    out = json.loads(subprocess.run(args + ["--steps", "100"], capture_output=True, text=True, check=True).stdout)
    assert out["optimizer"] == "adam" and out["steps"] == 100 and out["evaluations"] == 0
    r = subprocess.run(args + ["--optimizer", "dadvi", "--method", "flow"], capture_output=True, text=True)
    assert r.returncode == 2 and "--optimizer dadvi needs" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("extra", [[], ["--steps", "50"], ["--method", "flow", "--steps", "20"]])
def test_a_fit_imports_neither_sympy_nor_dynamo(extra):
    """Start-up cost is part of speed: torch imports sympy (0.3 s) for autograd.grad's grad_outputs and
    in Transform.inverse_shape, and torch._dynamo (1 s) in torch.optim; a fit must touch none of them."""
    code = ("import sys, ppl.cli; rc = ppl.cli.main(sys.argv[1:]); "
            "print('LOADED', [m for m in ('sympy', 'torch._dynamo') if m in sys.modules]); sys.exit(rc)")
    args = [sys.executable, "-c", code, "fit", os.path.join(MODELS, "eight_schools.ppl"),
            os.path.join(MODELS, "eight_schools.csv"), "--draws", "100"] + extra
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout, r.stdout[-300:]
