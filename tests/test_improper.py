"""Improper posteriors: refused by the check when no likelihood term reaches a flat latent; ended
with exit 3 naming the latents when the likelihood reaches it without identifying it (a flat ridge,
a flat scale with one data row, separation, an unused element); never a 1e300 table with exit 0.
Proper models with heavy tails and funnels are not touched.  No NumPy or torch warning reaches
stderr, also on fits whose draws overflow."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import ppl
from ppl.cli import main
from ppl.errors import EXIT_NUMERIC, PplError

from conftest import CENTERED, MODELS, REFERENCE, ROOT, reference_names

GOLDEN_VALID = sorted((ROOT / "tests" / "golden" / "data" / "models").glob("*.ppl"))



@pytest.fixture
def fit_cli(tmp_path, capsys):
    """fit_cli(model_text, csv_text or None, *args) -> (exit code, stdout, stderr) of `ppl fit`, with
    every Python warning recorded: any warning fails the test (they would reach the terminal)."""
    def run(src, data=None, *args):
        m = tmp_path / "m.ppl"
        m.write_text(src)
        argv = ["fit", str(m)]
        if data is not None:
            d = tmp_path / "d.csv"
            d.write_text(data)
            argv.append(str(d))
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            code = main(argv + list(args))
        out, err = capsys.readouterr()
        assert not rec, [f"{w.category.__name__}: {w.message}" for w in rec]
        assert "Warning" not in err and "Traceback" not in err, err
        return code, out, err
    return run


def _col(name, values):
    return name + "\n" + "\n".join(str(v) for v in values) + "\n"


Y5 = _col("y", [0.3, -1.2, 0.8, 1.5, 0.1])


def assert_improper(code, err, names):
    assert code == EXIT_NUMERIC, err
    assert "inference failed" in err and "looks improper" in err, err
    head = err.split("looks improper")[0]
    for n in names:
        assert f"'{n}'" in head, err
    assert err.count("\n") == 1, err          # one message, no table, no progress residue


# ---- run time: the likelihood reaches the latents but does not identify them ------------------------
def test_flat_ridge_exits_3_naming_both(fit_cli):
    code, out, err = fit_cli("data y: real[N]\nmu1: real\nmu2: real\ny ~ normal(mu1 + mu2, 1)\n", Y5)
    assert_improper(code, err, ["mu1", "mu2"])
    assert out == "" and "give them proper priors" in err


def test_flat_scale_with_one_data_row_exits_3(fit_cli):
    code, _, err = fit_cli("data y: real[N]\nmu ~ normal(0, 1)\nsigma: real<lower=0>\ny ~ normal(mu, sigma)\n",
                           _col("y", [0.7]))
    assert_improper(code, err, ["sigma"])
    assert "(sigma ~ ...)" in err and "'mu'" not in err


def test_separable_logistic_with_a_flat_slope_exits_3(fit_cli):
    code, _, err = fit_cli("data x: real[N]\ndata y: int<lower=0, upper=1>[N]\na ~ normal(0, 1)\nb: real\n"
                           "y ~ bernoulli_logit(a + b * x)\n",
                           "x,y\n-2,0\n-1,0\n-0.5,0\n0.5,1\n1,1\n2,1\n")
    assert_improper(code, err, ["b"])
    assert "'a'" not in err


def test_unused_element_of_a_flat_vector_is_named(fit_cli):
    code, _, err = fit_cli("data x: real[N]\ndata y: real[N]\nbeta: real[3]\nsigma ~ half_normal(1)\n"
                           "y ~ normal(beta[1] + beta[2] * x, sigma)\n",
                           "x,y\n-2,0.1\n-1,0.5\n-0.5,0.3\n0.5,1.2\n1,1.1\n2,2.3\n")
    assert_improper(code, err, ["beta[3]"])
    assert "beta[1]" not in err and "beta[2]" not in err


def test_collinear_predictors_with_flat_coefficients_exit_3(fit_cli):
    code, _, err = fit_cli("data x1: real[N]\ndata x2: real[N]\ndata y: real[N]\nalpha ~ normal(0, 5)\n"
                           "beta: real[2]\nsigma ~ half_normal(2)\n"
                           "y ~ normal(alpha + beta[1] * x1 + beta[2] * x2, sigma)\n",
                           "x1,x2,y\n1,2,0.5\n2,4,1.1\n3,6,1.4\n4,8,2.2\n5,10,2.4\n")
    assert_improper(code, err, ["beta"])


RIDGE_FUNNEL = """
data y: real[N]
data g: level[N] of K
tau ~ half_cauchy(1)
a[K] ~ normal(0, tau)
b: real
c: real
y ~ normal(a[g] + b + c, 1)
"""
GROUPS = "y,g\n0.3,1\n-1.2,2\n0.8,3\n1.5,1\n0.1,2\n0.4,3\n"


def test_ridge_beside_a_funnel_is_caught_on_q_after_a_cold_start(fit_cli):
    # the funnel defeats the mode search (cold start, no Laplace test): q's check after the warm-up
    code, _, err = fit_cli(RIDGE_FUNNEL, GROUPS)
    assert_improper(code, err, ["b", "c"])
    assert "scale grew without bound" in err
    assert "'tau'" not in err and "'a'" not in err


@pytest.mark.parametrize("args", [
    ("--init", "zero"),                                  # dadvi: q checked at the end of the warm-up
    ("--init", "zero", "--optimizer", "adam"),           # Adam: q checked every 500 steps
    ("--init", "zero", "--method", "meanfield"),         # mean-field cannot grow along the ridge
    ("--init", "zero", "--method", "lowrank"),
], ids=["dadvi", "adam", "meanfield", "lowrank"])
def test_ridge_from_a_cold_start_exits_3(fit_cli, args):
    code, _, err = fit_cli("data y: real[N]\nmu1: real\nmu2: real\ny ~ normal(mu1 + mu2, 1)\n", Y5, *args)
    assert_improper(code, err, ["mu1", "mu2"])


def test_ridge_in_a_model_above_the_full_hessian_size(fit_cli):
    # 600 group effects: the Laplace start knows only the Hessian's diagonal, which hides the ridge
    rng = np.random.default_rng(1)
    rows = "\n".join(f"{rng.normal():.3f},{i % 600}" for i in range(1800))
    code, _, err = fit_cli("data y: real[N]\ndata g: level[N] of K\na[K] ~ normal(0, 1)\nb: real\nc: real\n"
                           "s ~ half_normal(1)\ny ~ normal(a[g] + b + c, s)\n", "y,g\n" + rows + "\n")
    assert_improper(code, err, ["b", "c"])


def test_api_raises_the_numeric_error():
    m = ppl.loads("data y: real[N]\nmu1: real\nmu2: real\ny ~ normal(mu1 + mu2, 1)\n", "ridge.ppl")
    with pytest.raises(PplError) as e:
        m.fit({"y": [0.3, -1.2, 0.8]})
    assert e.value.code == EXIT_NUMERIC
    assert e.value.render().startswith("ridge.ppl: error: inference failed: the posterior of 'mu1', 'mu2'")


def test_reported_at_the_terminal_without_traceback_or_warning(tmp_path):
    """The reproduction of the bug report, as a user runs it (a real process, its real stderr)."""
    (tmp_path / "m.ppl").write_text("data y: real[N]\nmu ~ normal(0, 1)\nsigma: real<lower=0>\ny ~ normal(mu, sigma)\n")
    (tmp_path / "d.csv").write_text("y\n0.7\n")
    p = subprocess.run([sys.executable, "-m", "ppl", "fit", "m.ppl", "d.csv"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == EXIT_NUMERIC, p.stderr
    assert p.stdout == ""
    assert p.stderr.startswith("m.ppl: error: inference failed: the posterior of 'sigma' looks improper"), p.stderr
    assert "Warning" not in p.stderr and "Traceback" not in p.stderr


# ---- check time: no likelihood term reaches the flat latent --------------------------------------------
@pytest.mark.parametrize("src,name,what", [
    ("data y: real[N]\nmu ~ normal(0, 1)\ns: real<lower=0>\ny ~ normal(mu, 1)\n", "s", "no likelihood term uses it"),
    ("data y: real[N]\nmu: real\ny ~ normal(0, 1)\n", "mu", "no likelihood term uses it"),
    ("m: real\nz ~ normal(m, 1)\n", "m", "only the prior of 'z'"),
    ("data y: real[N]\nm: real\nz ~ normal(m, 1)\nd = 2 * z\nw ~ normal(d, 1)\ny ~ normal(0, 1)\n", "m",
     "only the prior of 'z'"),
    ("data y: real[N]\nv: ordered[2]\ny ~ normal(0, 1)\n", "v", "no likelihood term uses it"),
], ids=["unused-scale", "no-likelihood", "prior-only", "prior-chain", "ordered"])
def test_check_refuses_flat_latents_no_likelihood_reaches(src, name, what, fit_cli, check_errors):
    (d,) = check_errors(src, {"y": [0.3, 1.0]} if "data y" in src else None)
    assert d.message.startswith(f"'{name}' has a flat prior and ") and what in d.message, d.message
    assert "posterior is improper" in d.message and f"give it a prior ({name}" in d.message
    assert d.span.line == 1 + [line.split(":")[0] for line in src.split("\n")].index(name)   # at the declaration
    code, out, err = fit_cli(src, _col("y", [0.3, 1.0]) if "data y" in src else None)
    assert code == 1 and out == "" and f"error: '{name}' has a flat prior" in err


@pytest.mark.parametrize("src", [
    # flat on a bounded set: proper whether used or not
    "data y: real[N]\nmu ~ normal(0, 1)\np: real<lower=0, upper=1>\nw: simplex[3]\ny ~ normal(mu, 1)\n",
    # flat and reached by data through a deterministic node and another latent's prior
    "data y: real[N]\nm: real\ns: real<lower=0>\nz ~ normal(m, 1)\nmu = 2 * z\ny ~ normal(mu, s)\n",
    # the only path to data is a truncated prior: conservatively not refused
    "data y: real[N]\nm: real\nz: real<lower=0> ~ normal(m, 1)\ny ~ normal(z, 1)\n",
], ids=["bounded", "reached", "truncated"])
def test_check_accepts_proper_or_reached_flat_latents(src, check_text):
    check_text(src, {"y": [0.3, -1.2, 0.8, 1.5, 0.1]})


def test_proper_counterpart_fits(fit_cli):
    """The bug report's model with the unused latent removed and a flat scale the data identify."""
    code, out, err = fit_cli("data y: real[N]\nmu ~ normal(0, 1)\ns: real<lower=0>\ny ~ normal(mu, s)\n", Y5)
    assert code == 0, err
    assert "mu" in out and "\ns " in out


def test_bounded_flat_latent_unused_fits(fit_cli):
    code, out, err = fit_cli("data y: real[N]\nmu ~ normal(0, 1)\np: real<lower=0, upper=1>\ny ~ normal(mu, 1)\n",
                             Y5)
    assert code == 0, err


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.ppl")), ids=lambda p: p.stem)
def test_bundled_models_pass_the_check(path, check_text):
    check_text(path.read_text(), str(path.with_suffix(".csv")))


@pytest.mark.parametrize("path", GOLDEN_VALID, ids=lambda p: p.stem)
def test_golden_valid_models_pass_the_check(path, check_text):
    check_text(path.read_text())


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="no ../shared/reference")
@pytest.mark.parametrize("name", reference_names())
def test_reference_models_pass_the_check(name):
    d = REFERENCE / name
    ppl.load(str(d / "model.ppl")).check([str(d / "data.csv"), str(d / "scalars.json")])


# ---- no false positives at run time ------------------------------------------------------------------------
def test_eight_schools_is_not_improper(fit_cli):
    code, out, err = fit_cli((MODELS / "eight_schools.ppl").read_text(), (MODELS / "eight_schools.csv").read_text())
    assert code == 0, err


def test_centred_funnel_is_not_improper(fit_cli):
    code, out, err = fit_cli(CENTERED, (MODELS / "eight_schools.csv").read_text(), "--seed", "1")
    assert code == 0, err
    assert "cold start" in out


@pytest.mark.parametrize("args", [(), ("--method", "meanfield"), ("--optimizer", "adam", "--seed", "2")])
def test_centred_funnel_other_paths_are_not_improper(fit_cli, args):
    code, out, err = fit_cli(CENTERED, (MODELS / "eight_schools.csv").read_text(), *args)
    assert code == 0, err


@pytest.mark.parametrize("src,data", [
    ("tau ~ half_cauchy(5)\n", None),                                                  # heavy tail, no data
    ("data y: real[N]\ntau ~ half_cauchy(1)\ny ~ normal(0, tau)\n", _col("y", [0.4])),  # one row, proper prior
    ("data y: real[N]\nmu: real\ny ~ student_t(1, mu, 1)\n", _col("y", [0.5])),       # Cauchy likelihood, flat
    ("x ~ normal(0, 1000)\nz ~ normal(x, 1)\n", None),                                # very wide, still proper
    ("h ~ laplace(0, 1)\n", None),                                                     # a kink: zero curvature
    ("data y: real[N]\nmu: real\nsigma: real<lower=0>\ny ~ normal(mu, sigma)\n",       # flat, three rows: proper
     _col("y", [0.5, 1.3, -0.2])),
], ids=["half-cauchy", "half-cauchy-one-row", "cauchy-flat", "wide", "kink", "flat-normal-3-rows"])
def test_proper_heavy_or_flat_models_are_not_improper(fit_cli, src, data):
    code, out, err = fit_cli(src, data)
    assert code == 0, err


# ---- no NumPy warnings on overflowing draws ----------------------------------------------------------------
@pytest.mark.parametrize("src,col,expect", [
    ("x ~ normal(0, 1)\nd = exp(exp(exp(x)))\n", "d", ("inf", "inf")),     # some draws overflow to inf
    ("tau ~ half_cauchy(5)\nv = tau ^ 60\n", "v", None),                   # huge finite draws (1e150+)
])
def test_overflowing_draws_give_no_warning(fit_cli, tmp_path, src, col, expect):
    code, out, err = fit_cli(src, None, "--out", str(tmp_path / "o"))
    assert code == 0 and err == "", err
    row = next(l.split() for l in out.splitlines() if l.startswith(col + " "))
    if expect is not None:
        assert (row[1], row[2]) == expect, row      # mean inf, sd inf: not nan
    else:
        assert all(v not in ("nan", "inf") for v in row[1:]), row
    code, out, err = fit_cli(src, None, "--format", "json")
    assert code == 0 and err == ""


def test_column_stats_match_numpy_on_ordinary_draws_and_repair_extreme_ones():
    from ppl.infer.draw_stats import column_stats
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 3))
    q, m, s = column_stats(x)
    assert np.array_equal(q, np.quantile(x, [0.05, 0.5, 0.95], axis=0))
    assert np.array_equal(m, x.mean(0)) and np.array_equal(s, x.std(0, ddof=1))
    inf = np.where(np.arange(1000) % 10 == 0, np.inf, x[:, 0])           # 10% +inf
    both = np.where(np.arange(1000) % 2 == 0, np.inf, -np.inf)
    huge = x[:, 1] * 1e200
    nan = x[:, 2].copy()
    nan[7] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, m, s = column_stats(np.stack([inf, both, huge, nan], 1))
    capped = np.where(np.isinf(inf), 1e300, inf)          # the same order statistics below the infs
    assert q[0, 0] == np.quantile(capped, 0.05) and q[1, 0] == np.quantile(capped, 0.5)
    assert q[2, 0] == np.inf and m[0] == np.inf and s[0] == np.inf
    assert np.isnan(m[1]) and s[1] == np.inf and q[0, 1] == -np.inf and q[2, 1] == np.inf
    np.testing.assert_allclose([m[2], s[2]], [x[:, 1].mean() * 1e200, x[:, 1].std(ddof=1) * 1e200], rtol=1e-12)
    assert np.isnan(m[3]) and np.isnan(s[3]) and np.isnan(q[:, 3]).all()


def test_psis_on_extreme_log_ratios_gives_no_warning():
    from ppl.infer.psis import psis
    rng = np.random.default_rng(0)
    lw = np.concatenate([rng.normal(size=990), [1e300, -1e300] * 5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = psis(lw)
    assert r.sd_log_w > 1e290 and np.isfinite(r.sd_log_w) and r.ess < 0.01
