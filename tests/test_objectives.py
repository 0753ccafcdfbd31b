"""Objectives that show themselves (ppl/infer/objectives.py): each names itself in the header and
the JSON, and reports its value at the fitted q with a Monte Carlo error; the IWAE bound rises with
K towards log p(y), computed exactly for a normal-normal model; the importance-sampling estimate of
log p(y) agrees with the exact one within its error; Renyi with alpha < 1 gives wider sds than the
ELBO on a skewed posterior."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import ppl
from ppl.config import FitConfig
from ppl.infer.objectives import OBJECTIVES, log_evidence
from ppl.report import table, to_json

# y_n ~ normal(mu1 + mu2, 1), mu1, mu2 ~ normal(0, 1): the posterior correlates mu1 and mu2 (-0.5 with
# one row), so a mean-field q is not exact and the importance weights vary
NN_SRC = "data y: real[N]\nmu1 ~ normal(0, 1)\nmu2 ~ normal(0, 1)\ny ~ normal(mu1 + mu2, 1)\n"
NN_Y = np.array([1.3])


def _nn_log_evidence(y):
    """y ~ N(0, 2 11' + I) exactly."""
    C = 2.0 * np.ones((len(y), len(y))) + np.eye(len(y))
    return float(-0.5 * y @ np.linalg.solve(C, y) - 0.5 * np.linalg.slogdet(C)[1] - 0.5 * len(y) * math.log(2 * math.pi))


def test_estimates_follow_their_definitions():
    lw = np.random.default_rng(0).normal(-3.0, 0.7, 4096)
    cfg = FitConfig.from_python()
    elbo, se = OBJECTIVES["elbo"](cfg).estimate(lw, 16)
    assert elbo == pytest.approx(lw.mean()) and se == pytest.approx(lw.std(ddof=1) / 64)
    assert OBJECTIVES["iwae"](cfg).estimate(lw, 1)[0] == pytest.approx(lw.mean())        # K = 1: the ELBO
    batches = lw.reshape(256, 16)
    want = np.mean(np.log(np.exp(batches).mean(1)))
    assert OBJECTIVES["iwae"](cfg).estimate(lw, 16)[0] == pytest.approx(want)
    assert OBJECTIVES["renyi"](FitConfig.from_python(objective="renyi", alpha=1.0)).estimate(lw, 16)[0] == \
        pytest.approx(lw.mean())                                                           # alpha -> 1: the ELBO
    v, se = log_evidence(lw)
    assert v == pytest.approx(math.log(np.exp(lw).mean())) and 0 < se < 0.05
    assert log_evidence(np.full(100, -2.5)) == (pytest.approx(-2.5), 0.0)                 # exact q: no error


def test_iwae_bound_rises_with_k_towards_the_exact_log_evidence():
    fit = ppl.loads(NN_SRC, "nn.ppl").fit({"y": NN_Y.tolist()}, method="meanfield", seed=0, draws=20000)
    exact = _nn_log_evidence(NN_Y)
    iwae = OBJECTIVES["iwae"](fit.config)
    bounds = [iwae.estimate(fit.log_weights, K) for K in (1, 4, 16, 64, 256, 1024)]
    values = [b for b, _ in bounds]
    assert all(a < b for a, b in zip(values, values[1:])), values                     # rises with K
    assert all(b <= exact + 3 * se for b, se in bounds), (values, exact)              # a lower bound
    assert exact - values[0] > 0.1 and exact - values[-1] < 0.2 * (exact - values[0])  # most of the gap closed
    v, se = fit.log_evidence, fit.log_evidence_se                                     # K = all 20000 draws
    assert fit.khat < 0.7 and abs(v - exact) < 4 * se + 1e-3, (v, se, exact)


def test_iwae_fit_names_itself_and_reports_log_evidence():
    fit = ppl.loads(NN_SRC, "nn.ppl").fit({"y": NN_Y.tolist()}, method="meanfield", objective="iwae", seed=1,
                                          draws=2000)
    exact = _nn_log_evidence(NN_Y)
    assert "K = 16" in fit.objective_note and "importance-weighted" in fit.objective_note
    assert fit.objective_value <= exact + 3 * fit.objective_se                         # still a bound
    assert abs(fit.log_evidence - exact) < 4 * fit.log_evidence_se + 1e-3
    text = table(fit)
    assert "objective  iwae (importance-weighted bound" in text
    assert f"IWAE bound {fit.objective_value:.4f} ± " in text and "log p(y)   " in text
    out = json.loads(to_json(fit))
    assert out["objective"] == "iwae" and "K = 16" in out["objective_description"]
    assert out["objective_value"] == pytest.approx(fit.objective_value) and out["objective_se"] > 0
    assert out["log_evidence"] == pytest.approx(fit.log_evidence) and out["log_evidence_se"] > 0


def test_renyi_below_one_is_wider_than_the_elbo_on_a_skewed_posterior():
    """lam ~ gamma(1, 1), one count of 0: an exponential posterior (mean 0.5), skewed in log lam too."""
    src, data = "data y: int<lower=0>[N]\nlam ~ gamma(1, 1)\ny ~ poisson(lam)\n", {"y": [0]}
    elbo = ppl.loads(src, "skew.ppl").fit(data, seed=0, draws=4000)
    renyi = ppl.loads(src, "skew.ppl").fit(data, seed=0, draws=4000, objective="renyi", alpha=0.5)
    assert "alpha 0.5" in renyi.objective_note and json.loads(to_json(renyi))["objective"] == "renyi"
    sd_elbo, sd_renyi = np.log(elbo.draws["lam"]).std(), np.log(renyi.draws["lam"]).std()
    assert sd_renyi > 1.05 * sd_elbo, (sd_renyi, sd_elbo)
