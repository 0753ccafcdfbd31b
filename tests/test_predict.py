"""ppl/predict.py: posterior and prior predictive draws against closed forms, new rows, new levels,
observed columns left out of new data."""
from __future__ import annotations

import numpy as np
import pytest

import ppl
from ppl.cli import main
from conftest import MODELS

M = str(MODELS)

KNOWN_SIGMA = """
data y: real[N]
mu ~ normal(0, 3)
y ~ normal(mu, 2)
"""


def test_posterior_predictive_variance_is_sigma2_plus_var_mu():
    rng = np.random.default_rng(1)
    y = rng.normal(1.0, 2.0, 20)
    fit = ppl.loads(KNOWN_SIGMA).fit({"y": y.tolist()}, draws=10000, seed=3)
    rep = fit.predict()["y"]
    assert rep.shape == (10000, 20)
    var_mu = 1.0 / (1 / 9 + 20 / 4)                     # the exact posterior of mu
    mean_mu = var_mu * y.sum() / 4
    assert np.mean(np.var(rep, axis=0, ddof=1)) == pytest.approx(4 + var_mu, rel=0.03)
    assert np.mean(rep) == pytest.approx(mean_mu, abs=0.05)
    # the replicates do not replace the data: the draws of mu are the fit's
    assert np.allclose(fit.predict()["mu"], fit.draws["mu"])


def test_prior_predictive_matches_its_closed_form():
    fit = ppl.loads(KNOWN_SIGMA).fit({"y": [0.0, 1.0, 2.0]}, draws=10000, seed=3)
    out = fit.predict(prior=True, seed=5)
    rep = out["y"]
    assert rep.shape == (10000, 3)
    cov = np.cov(rep.T)
    assert np.mean(np.diag(cov)) == pytest.approx(9 + 4, rel=0.03)        # var mu + sigma^2
    assert np.mean(cov[np.triu_indices(3, 1)]) == pytest.approx(9, rel=0.05)   # shared mu
    assert np.var(out["mu"]) == pytest.approx(9, rel=0.04)
    # not the posterior: the posterior sd of mu is about 1.1
    assert np.std(fit.draws["mu"]) < 1.3


def test_same_seed_same_prediction():
    fit = ppl.loads(KNOWN_SIGMA).fit({"y": [0.0, 1.0, 2.0]}, draws=200, seed=3)
    a, b = fit.predict(seed=7)["y"], fit.predict(seed=7)["y"]
    assert np.array_equal(a, b) and not np.array_equal(a, fit.predict(seed=8)["y"])


def test_new_rows_and_a_new_level(saved_fit, tmp_path):
    fit = ppl.load_fit(str(saved_fit("radon")))
    K = fit.draws["a"].shape[1]
    labels = fit.model.levels["county"]
    new = tmp_path / "new.csv"
    new.write_text(f"county,floor\n{labels[2]},0\nNowhere,1\n{labels[2]},1\n")   # no log_radon column
    out = fit.predict(str(new), seed=2)
    S = fit.draws["a"].shape[0]
    assert out["log_radon"].shape == (S, 3)
    a = out["a"]
    assert a.shape == (S, K + 1)
    assert np.array_equal(a[:, :K], fit.draws["a"])            # the fitted counties keep their draws
    # the new county is drawn from its prior given the hyperparameters: var = E sigma_a^2 + Var mu_a
    want = np.mean(fit.draws["sigma_a"] ** 2) + np.var(fit.draws["mu_a"])
    assert np.var(a[:, K]) == pytest.approx(want, rel=0.15)
    assert abs(np.mean(a[:, K]) - np.mean(fit.draws["mu_a"])) < 4 * np.sqrt(want / S) + 0.02
    # a known county's row: mean a[k] + b * floor
    b = fit.draws["b"]
    assert np.mean(out["log_radon"][:, 2]) == pytest.approx(np.mean(a[:, 2] + b), abs=0.1)
    # rows 1 and 3 differ by the floor effect only
    assert np.mean(out["log_radon"][:, 2] - out["log_radon"][:, 0]) == pytest.approx(np.mean(b), abs=0.1)


def test_mixture_new_rows_draw_z_from_its_prior(saved_fit):
    fit = ppl.load_fit(str(saved_fit("mixture")))
    out = fit.predict({"y": [0.0] * 5}, seed=1)
    # z for new rows: categorical(w), not the fitted rows' conditionals
    assert out["z"].shape[1] == 5
    assert np.mean(out["z"] == 2) == pytest.approx(np.mean(fit.draws["w"][:, 1]), abs=0.03)


def test_cli_predict_writes_csv_and_nc(saved_fit, tmp_path, capsys):
    d = saved_fit("eight_schools")
    capsys.readouterr()
    csv_out, nc_out = tmp_path / "rep.csv", tmp_path / "rep.nc"
    assert main(["predict", M + "/eight_schools.ppl", str(d), "--draws", "300", "--out", str(csv_out)]) == 0
    head = csv_out.read_text().splitlines()
    assert head[0].split(",")[:3] == ["mu", "tau", "theta_raw[1]"] and "y[8]" in head[0] and len(head) == 301
    stdout = capsys.readouterr().out
    assert stdout.startswith("posterior predictive: 300 draws; replicated: y") and "y[1]" in stdout
    assert main(["predict", M + "/eight_schools.ppl", str(d), "--prior", "--out", str(nc_out)]) == 0
    from conftest import need
    xr = need("xarray")
    tree = xr.open_datatree(nc_out, engine="h5netcdf")
    assert set(tree.children) == {"prior", "prior_predictive"}
    assert tree["prior_predictive"]["y"].dims == ("chain", "draw", "J")


def test_cli_predict_refuses_a_latent_the_fit_lacks(saved_fit, tmp_path, capsys):
    d = saved_fit("eight_schools")
    capsys.readouterr()
    m = tmp_path / "more.ppl"
    m.write_text((open(M + "/eight_schools.ppl").read()) + "extra ~ normal(0, 1)\n")
    assert main(["predict", str(m), str(d)]) == 1
    err = capsys.readouterr().err
    assert "more.ppl:" in err and "'extra' is a latent here, but the fit has no draws of it" in err
    assert "Traceback" not in err


def test_cli_predict_with_extra_generated_quantities(saved_fit, tmp_path, capsys):
    d = saved_fit("eight_schools")
    capsys.readouterr()
    m = tmp_path / "gq.ppl"
    m.write_text(open(M + "/eight_schools.ppl").read() + "best = theta[1] - theta[3]\n")
    assert main(["predict", str(m), str(d), "--vars", "best"]) == 0
    out = capsys.readouterr().out
    assert "best" in out
    fit = ppl.load_fit(str(d))
    mean = float(out.split("best")[1].split()[0])
    assert mean == pytest.approx(np.mean(fit.draws["theta"][:, 0] - fit.draws["theta"][:, 2]), abs=1e-3)
