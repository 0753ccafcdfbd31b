"""ppl/loo.py: the pointwise log-likelihood against a direct computation, PSIS-LOO against ArviZ on
fit.nc, the p/q-corrected estimate against ArviZ's PSIS of the same ratios, and a comparison of two
radon models ranked as the data say (the floor effect is clear in them)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import need

import ppl
from ppl.cli import main
from conftest import MODELS

M = str(MODELS)

az = need("arviz")      # in the test extra


def _az_loo(path):
    idata = az.from_netcdf(str(path))
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return az.loo(idata, pointwise=True)


@pytest.mark.parametrize("name", ["eight_schools", "radon", "mixture"])
def test_loo_equals_arviz_on_fit_nc(saved_fit, name):
    d = saved_fit(name)
    fit = ppl.load_fit(str(d))
    ours = fit.loo(correct=False)
    ref = _az_loo(d / "fit.nc")
    assert ours.elpd_loo == pytest.approx(float(ref["elpd_loo"]), abs=0.02)
    assert ours.se == pytest.approx(float(ref["se"]), abs=0.02)
    assert ours.p_loo == pytest.approx(float(ref["p_loo"]), abs=0.02)
    assert np.allclose(ours.pointwise, np.asarray(ref["loo_i"]).reshape(-1), atol=0.01)
    # ArviZ takes a tail of ceil(3 sqrt(S)) draws, ppl floor(...): the k-hats agree closely, not exactly
    assert np.allclose(ours.khat, np.asarray(ref["pareto_k"]).reshape(-1), atol=0.1)


def test_log_likelihood_of_normal_observations(saved_fit):
    fit = ppl.load_fit(str(saved_fit("eight_schools")))
    ll = fit.log_likelihood()["y"]
    y, s = fit.model.values["y"], fit.model.values["sigma"]
    th = fit.draws["theta"]
    want = -0.5 * ((y - th) / s) ** 2 - np.log(s) - 0.5 * math.log(2 * math.pi)
    assert np.allclose(ll, want, rtol=1e-10, atol=1e-10)


def test_mixture_log_likelihood_sums_z_out(saved_fit):
    fit = ppl.load_fit(str(saved_fit("mixture")))
    ll = fit.log_likelihood()["y"]
    y = fit.model.values["y"]
    w, mu, sg = fit.draws["w"], fit.draws["mu"], fit.draws["sigma"]
    dens = sum(w[:, k, None] * np.exp(-0.5 * ((y - mu[:, k, None]) / sg[:, k, None]) ** 2)
               / (sg[:, k, None] * math.sqrt(2 * math.pi)) for k in range(2))
    assert np.allclose(ll, np.log(dens), rtol=1e-9, atol=1e-9)


def test_corrected_loo_is_psis_of_the_ratios_p_over_q(saved_fit):
    fit = ppl.load_fit(str(saved_fit("eight_schools")))
    ours = fit.loo(correct=True)
    ll = fit.log_likelihood()["y"]
    log_w = fit.q_draws.log_p - fit.q_draws.log_q
    ratios = log_w[:, None] - ll                                 # (S, n)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lw, k = az.psislw(ratios.T, reff=1.0)                    # normalised log weights per observation
    elpd_i = np.array([np.logaddexp.reduce(lw[i] + ll[:, i]) for i in range(ll.shape[1])])
    assert ours.elpd_loo == pytest.approx(elpd_i.sum(), abs=0.05)
    assert np.allclose(ours.khat, k, atol=0.1)


RADON_NO_FLOOR = """
data log_radon: real[N]
data county: level[N] of K
mu_a ~ normal(0, 10)
sigma_a ~ half_normal(5)
a[K] ~ normal(mu_a, sigma_a)
sigma_y ~ half_normal(5)
log_radon ~ normal(a[county], sigma_y)
"""


def test_radon_floor_model_ranks_first_in_ppl_loo_and_az_compare(saved_fit, tmp_path, capsys):
    with_floor = saved_fit("radon")
    m = tmp_path / "radon_nofloor.ppl"
    m.write_text(RADON_NO_FLOOR)
    without = tmp_path / "nofloor"
    assert main(["fit", str(m), M + "/radon.csv", "--out", str(without), "--format", "json"]) == 0
    capsys.readouterr()
    assert main(["loo", "--plain", str(without), str(with_floor)]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[-1].splitlines()
    assert table[1].split()[0] == str(with_floor) and table[2].split()[0] == str(without)
    diff, se = float(table[2].split()[4]), float(table[2].split()[5])
    assert diff > se > 0            # 88 rows: the floor effect (b = -0.62 +- 0.21) shows, less than 2 se
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmp = az.compare({"floor": az.from_netcdf(str(with_floor / "fit.nc")),
                          "no_floor": az.from_netcdf(str(without / "fit.nc"))})
    assert list(cmp.index) == ["floor", "no_floor"]
    assert float(cmp.loc["no_floor", "elpd_diff"]) == pytest.approx(diff, abs=0.05)
    assert float(cmp.loc["no_floor", "dse"]) == pytest.approx(se, abs=0.05)


def test_loo_of_fits_of_different_data_is_a_usage_error(saved_fit, capsys):
    a, b = saved_fit("eight_schools"), saved_fit("radon")
    capsys.readouterr()
    assert main(["loo", str(a), str(b)]) == 2
    assert "different numbers of observations" in capsys.readouterr().err


def test_loo_of_a_conjugate_model_equals_the_exact_leave_one_out_density():
    # mu ~ normal(0, 3), y_i ~ normal(mu, 2): p(y_i | y_-i) = normal(m_-i, sqrt(4 + v_-i)) exactly
    rng = np.random.default_rng(2)
    y = rng.normal(1.0, 2.0, 12)
    y[0] = 7.5                                              # one far observation: a long LOO tail
    fit = ppl.loads("data y: real[N]\nmu ~ normal(0, 3)\ny ~ normal(mu, 2)\n").fit({"y": y.tolist()},
                                                                                  draws=20000, seed=1)
    exact = []
    for i in range(len(y)):
        rest = np.delete(y, i)
        v = 1 / (1 / 9 + len(rest) / 4)
        m = v * rest.sum() / 4
        sd = math.sqrt(4 + v)
        exact.append(-0.5 * ((y[i] - m) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi))
    for correct in (True, False):
        l = fit.loo(correct=correct)
        assert l.elpd_loo == pytest.approx(sum(exact), abs=0.05), correct
        assert np.allclose(l.pointwise, exact, atol=0.02)
        assert l.bad == 0
