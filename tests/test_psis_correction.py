"""PSIS-corrected answers (ppl/infer/fit.py `Fit.summary`, draw_stats.weighted_column_stats): the
weighted summaries against their formulas; on skewed posteriors with exact answers (a gamma-Poisson
rate, a normal scale under a flat prior) the corrected mean and sd are closer to the exact ones than
q's own; where k-hat >= 0.7 the summary is q's, and the outputs say which."""
from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest

import ppl
from ppl.infer.draw_stats import column_stats, weighted_column_stats
from ppl.report import table, to_json


def test_weighted_stats_with_equal_weights_are_numpys():
    x = np.random.default_rng(0).normal(size=(500, 3)) * [1.0, 10.0, 0.1]
    q, mean, sd = weighted_column_stats(x, np.full(500, 1 / 500))
    q0, mean0, sd0 = column_stats(x)
    assert np.allclose(mean, mean0) and np.allclose(sd, sd0)            # ddof 1 for equal weights
    assert np.allclose(q, q0, atol=0.02 * sd0)                           # midpoint vs NumPy's interpolation


def test_weighted_stats_formulas():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 2))
    w = rng.uniform(0.1, 2.0, 400)
    w /= w.sum()
    q, mean, sd = weighted_column_stats(x, w)
    m = w @ x
    assert np.allclose(mean, m)
    assert np.allclose(sd, np.sqrt((w @ (x - m) ** 2) / (1 - w @ w)))
    for j in range(2):                                                   # half the mass lies below the median
        assert abs(w[x[:, j] <= q[1, j]].sum() - 0.5) <= w.max()


def test_weighted_stats_leave_non_finite_columns_unweighted():
    x = np.column_stack([np.arange(10.0), np.r_[np.arange(9.0), np.inf]])
    w = np.linspace(1, 2, 10)
    q, mean, sd = weighted_column_stats(x, w / w.sum())
    assert mean[1] == np.inf and sd[1] == np.inf
    assert mean[0] > 4.5                                                 # weighted towards the later rows


def _gamma_poisson():
    y = [0, 1, 2]
    a, b = 1 + sum(y), 1 + len(y)                                        # gamma(1, 1) prior: gamma(4, 4)
    return ("data y: int<lower=0>[N]\nlam ~ gamma(1, 1)\ny ~ poisson(lam)\n", {"y": y}, "lam",
            a / b, math.sqrt(a) / b)


def _flat_scale():
    """y ~ normal(0, sigma), sigma flat: sigma^2 ~ InvGamma((N-1)/2, sum y^2 / 2)."""
    y = np.array([1.9, -3.1, 0.4, 2.6, -0.8, 1.5, -2.2, 0.3, 3.4, -1.2])
    al, be = (len(y) - 1) / 2, float((y ** 2).sum()) / 2
    m = math.sqrt(be) * math.exp(math.lgamma(al - 0.5) - math.lgamma(al))
    return ("data y: real[N]\nsigma: real<lower=0>\ny ~ normal(0, sigma)\n", {"y": y.tolist()}, "sigma",
            m, math.sqrt(be / (al - 1) - m * m))


@functools.lru_cache(maxsize=None)
def _iwae_fit(case):
    src, data, *_ = case()
    return ppl.loads(src, "skewed.ppl").fit(data, seed=0, draws=4000, objective="iwae")


@pytest.mark.parametrize("case", [_gamma_poisson, _flat_scale], ids=["gamma_poisson", "flat_scale"])
def test_corrected_answers_are_closer_to_the_exact_skewed_posterior(case):
    """A mass-covering fit (IWAE: q wider than the skewed posterior, so the weights are bounded and
    k-hat < 0.7): q's own sd is 30-80% too wide; the weighted draws get within 5% and 0.05 sd."""
    _, _, par, m, sd = case()
    fit = _iwae_fit(case)
    assert fit.khat < 0.7 and fit.corrected
    c, r = fit.summary()[par], fit.summary(corrected=False)[par]
    assert abs(c["mean"] - m) / sd < 0.05 and abs(c["sd"] / sd - 1) < 0.05, (c, m, sd)
    assert abs(c["mean"] - m) < abs(r["mean"] - m) and abs(c["sd"] - sd) < abs(r["sd"] - sd), (c, r, m, sd)


def test_no_correction_with_too_few_effective_draws():
    src, data, *_ = _gamma_poisson()
    fit = ppl.loads(src, "skewed.ppl").fit(data, seed=0, draws=200, objective="iwae", steps=300)
    assert fit.khat < 0.7 and fit.weights_ess < 500 and not fit.corrected
    assert "effective draws of 200: too few" in table(fit)


def test_no_correction_where_khat_is_high_and_outputs_say_which():
    src, data, par, m, sd = _gamma_poisson()
    fit = ppl.loads(src, "skewed.ppl").fit(data, seed=0, draws=500)     # the ELBO's q: k-hat ~1.2 here
    assert fit.khat >= 0.7 and not fit.corrected
    assert fit.summary() == fit.summary(corrected=False)
    out = json.loads(to_json(fit))
    assert out["summary"] == "q" and out["params_q"] is None
    assert "summary    q's draws, unweighted" in table(fit)
    out = json.loads(to_json(_iwae_fit(_gamma_poisson)))
    assert out["summary"] == "psis" and set(out["params_q"]) == set(out["params"])
    assert out["params"][par]["sd"] != out["params_q"][par]["sd"]
    text = table(_iwae_fit(_gamma_poisson))
    assert "summary    PSIS-corrected" in text and "q mean" in text


def test_weights_csv_matches_the_draws_and_reproduces_the_table(tmp_path):
    from ppl.report import write_outputs
    src, data, par, *_ = _gamma_poisson()
    fit = ppl.loads(src, "skewed.ppl").fit(data, seed=0, draws=800, objective="iwae", steps=300)
    assert fit.corrected and len(fit.weights) == 800                  # fewer draws than PSIS's 1000
    write_outputs(fit, str(tmp_path / "out"), force=False)
    draws = np.genfromtxt(tmp_path / "out" / "draws.csv", delimiter=",", names=True)
    w = np.loadtxt(tmp_path / "out" / "weights.csv", skiprows=1)
    assert len(w) == len(draws) == 800
    assert np.average(draws[par], weights=w) == pytest.approx(fit.summary()[par]["mean"], rel=1e-9)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["summary"] == "psis"
