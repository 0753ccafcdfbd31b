"""Pareto-smoothed importance sampling (ppl.infer.psis) on cases with known
answers, and the verdict's rules on constructed inputs."""
from __future__ import annotations

import numpy as np
import pytest

from ppl.infer.families import FAMILIES
from ppl.infer.psis import gpd_fit, psis, verdict


def _normal_ratios(s, S=20000, seed=0):
    """log p - log q for target N(0, 1) and proposal N(0, s^2), draws from q."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, s, size=S)
    return -0.5 * x * x + 0.5 * (x / s) ** 2 + np.log(s)


@pytest.mark.parametrize("s", [0.8, 0.6])
def test_khat_normal_proposal_too_narrow(s):
    """A too-narrow normal proposal gives weights with Pareto tail index k = 1 - s^2 (0.36 for s = 0.8)."""
    ks = [psis(_normal_ratios(s, seed=seed)).khat for seed in range(3)]
    assert abs(np.mean(ks) - (1 - s * s)) < 0.1, ks


def test_khat_wide_proposal_is_low():
    """A proposal wider than the target has bounded weights: k-hat well below 0.5."""
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.5, size=20000)
    lw = -0.5 * x * x + 0.5 * (x / 1.5) ** 2 + np.log(1.5)
    r = psis(lw)
    assert r.khat < 0.3
    assert 0.5 < r.ess < 1.0


def test_exact_weights():
    """q = p: every log ratio equal -> k-hat low, ESS exactly 1, sd(log w) 0, uniform weights."""
    S = 4000
    r = psis(np.full(S, -3.7))
    assert r.khat < 0.5
    assert r.ess == pytest.approx(1.0, abs=1e-12)
    assert r.sd_log_w == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(r.weights, 1.0 / S)


def test_exact_weights_up_to_rounding():
    """An exact q (a Gaussian posterior fitted exactly) gives log ratios equal up to rounding: k-hat 0,
    not the inf or nan of a GPD fitted to exceedances of 1e-14."""
    rng = np.random.default_rng(3)
    r = psis(-1234.5 + 1e-12 * rng.normal(size=1000))
    assert r.khat == 0.0
    assert r.ess == pytest.approx(1.0, abs=1e-9)


def test_nearly_exact_weights():
    rng = np.random.default_rng(2)
    r = psis(1e-6 * rng.normal(size=4000))
    assert r.ess > 0.999
    assert r.sd_log_w < 1e-5


@pytest.mark.parametrize("xi,sigma", [(0.2, 1.0), (0.5, 2.0), (0.8, 0.5)])
def test_gpd_fit_recovers_shape(xi, sigma):
    rng = np.random.default_rng(int(10 * xi))
    u = rng.random(5000)
    x = sigma * (np.power(1 - u, -xi) - 1) / xi            # generalised Pareto(xi, sigma) draws
    k, s = gpd_fit(x)
    assert abs(k - xi) < 0.07, (k, xi)
    assert abs(s / sigma - 1) < 0.1, (s, sigma)


@pytest.mark.parametrize("xi", [0.3, 0.6, 0.9])
def test_psis_khat_of_pareto_weights(xi):
    """Importance weights that are themselves Pareto with shape xi: k-hat estimates xi."""
    ks = []
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        lw = -xi * np.log(rng.random(20000))               # w = U^(-xi): tail index 1/xi
        ks.append(psis(lw).khat)
    assert abs(np.mean(ks) - xi) < 0.1, ks


def test_weights_normalised_and_shift_invariant():
    lw = _normal_ratios(0.7, S=5000, seed=3)
    a, b = psis(lw), psis(lw + 1234.5)
    assert a.weights.sum() == pytest.approx(1.0)
    assert np.all(a.weights >= 0)
    assert a.khat == pytest.approx(b.khat)
    assert np.allclose(a.weights, b.weights)
    assert a.ess == pytest.approx(b.ess)
    assert a.sd_log_w == pytest.approx(np.std(lw))
    assert 1.0 / len(lw) <= a.ess <= 1.0


def test_smoothing_never_raises_the_largest_weight():
    lw = _normal_ratios(0.5, S=5000, seed=4)
    raw = np.exp(lw - lw.max())
    raw /= raw.sum()
    r = psis(lw)
    # the smoothed tail is capped at the largest raw (unnormalised) weight, so the relative ESS can only improve
    assert r.ess >= 1.0 / np.sum(raw * raw) / len(lw) - 1e-12


def test_one_dominant_weight():
    lw = np.zeros(1000)
    lw[17] = 200.0
    r = psis(lw)
    assert r.ess < 0.01


def test_non_finite_log_ratios():
    rng = np.random.default_rng(5)
    lw = rng.normal(size=2000)
    lw[:10] = -np.inf
    lw[10:12] = np.nan
    r = psis(lw)
    assert np.isfinite(r.khat) and np.all(np.isfinite(r.weights)) and r.weights.sum() == pytest.approx(1.0)
    assert np.all(r.weights[:12] < 1e-100)
    allbad = psis(np.full(100, -np.inf))
    assert allbad.khat == np.inf and allbad.ess == 0.0


# ---- the verdict --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("khat,ess,label", [
    (0.3, 0.8, "good"),
    (0.69, 0.3, "good"),
    (0.9, 0.95, "good"),          # k-hat high but weights nearly uniform: k-hat alone misleads
    (0.5, 0.2, "fair"),           # k-hat fine but few effective draws
    (0.8, 0.7, "fair"),           # k-hat high, ESS middling
    (0.8, 0.5, "unreliable"),     # both bad
    (0.7, 0.59, "unreliable"),
    (0.2, 0.05, "unreliable"),    # almost no effective draws, whatever k-hat says
    (float("inf"), 0.0, "unreliable"),
])
def test_verdict_rules(khat, ess, label):
    got, text = verdict(khat, ess, FAMILIES["fullrank"], True)
    assert got == label
    assert text.startswith(label)
    assert f"{khat:.2f}" in text


def test_verdict_high_khat_with_tight_log_weights():
    """k-hat >= 1 is overridden only when the log weights barely vary (sd < 0.1) and the ESS is high."""
    assert verdict(2.2, 0.995, FAMILIES["fullrank"], True, 0.995, 0.046)[0] == "good"
    assert verdict(2.2, 0.995, FAMILIES["fullrank"], True, 0.995, 0.3)[0] != "good"
    assert verdict(2.2, 0.995, FAMILIES["fullrank"], True, 0.995)[0] != "good"
    assert verdict(2.2, 0.95, FAMILIES["fullrank"], True, 0.5, 0.05)[0] != "good"


def test_verdict_advice():
    from ppl.config import cli_opt
    _, t = verdict(0.9, 0.2, FAMILIES["meanfield"], True)
    assert "method='fullrank'" in t and "--" not in t           # Python spelling by default
    _, t = verdict(0.9, 0.2, FAMILIES["meanfield"], True, opt=cli_opt)
    assert "--method fullrank" in t and "non-centring" not in t and "--steps" not in t
    _, t = verdict(0.9, 0.2, FAMILIES["fullrank"], True, opt=cli_opt)
    assert "try --method flow" in t                                # full-rank's richer family
    _, t = verdict(0.9, 0.2, FAMILIES["fullrank"], True, tried=["fullrank", "flow", "mixture"])
    assert "method=" not in t and "auto tried fullrank, flow, mixture: none fits this posterior better" in t
    _, t = verdict(0.9, 0.2, FAMILIES["flow"], True)
    assert "method=" not in t and "no family here fits this posterior better" in t
    _, t = verdict(0.9, 0.2, FAMILIES["fullrank"], True, centred=["a"], tried=["fullrank", "flow"])
    assert "non-centring 'a'" in t and "flow" not in t
    _, t = verdict(0.9, 0.2, FAMILIES["fullrank"], False, opt=lambda n, v=None: f"{n}=" if v is None else f"{n}={v!r}")
    assert "more steps=" in t and "--" not in t
    label, t = verdict(0.2, 0.9, FAMILIES["meanfield"], True)
    assert label == "good" and "mean-field" in t
    label, t = verdict(0.2, 0.9, FAMILIES["fullrank"], False)
    assert label == "good" and "step cap" in t
    _, t = verdict(0.2, 0.9, FAMILIES["fullrank"], True)
    assert "step cap" not in t and "mean-field" not in t


# ---- regressions: one draw carrying the weight must never look good ---------------------------------------------
def test_verdict_not_good_when_one_draw_dominates():
    rng = np.random.default_rng(0)
    lw = 0.01 * rng.normal(size=1000)
    lw[17] = 20.0                                          # raw weight of one draw: e^20 times every other
    raw = np.exp(lw - lw.max())
    raw /= raw.sum()
    assert raw.max() > 0.999
    r = psis(lw)
    assert r.khat > 0.7
    label, text = verdict(r.khat, r.ess, FAMILIES["fullrank"], True, r.ess_raw)
    assert label != "good", text


def test_khat_high_when_one_weight_dominates_tied_bulk():
    lw = np.zeros(1000)
    lw[17] = 200.0
    r = psis(lw)
    assert r.khat > 0.7, r.khat


def test_centred_latents_from_the_model():
    import ppl
    from ppl.plan import centred_latents
    from conftest import model_paths
    assert centred_latents(ppl.load(model_paths("eight_schools")[0]).check()) == []
    assert centred_latents(ppl.load(model_paths("radon")[0]).check()) == ["a"]
    src = "data y: real[J]\nmu ~ normal(0, 5)\ntau ~ half_cauchy(5)\ns = 2 * tau\ntheta[J] ~ normal(mu, s)\ny ~ normal(theta, 1)\n"
    assert centred_latents(ppl.loads(src, "c.ppl").check()) == ["theta"]
