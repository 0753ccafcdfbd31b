"""Every bundled model (models/*.ppl with its CSV) fits briefly through the CLI
with --format json and gives finite parameters; the mixture through
--estimator auto (its z summed out), enumerate and score."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ppl.cli import main

from conftest import MODELS, ROOT

MODEL_FILES = sorted(p.stem for p in MODELS.glob("*.ppl"))

# parameters each model must report (latents and deterministics, Stan-style names)
EXPECTED = {
    "eight_schools": ["mu", "tau", "theta_raw[1]", "theta_raw[8]", "theta[1]", "theta[8]"],
    "radon": ["mu_a", "sigma_a", "a[1]", "b", "sigma_y"],
    "logistic": ["alpha", "beta[1]", "beta[3]"],
    "mixture": ["w[1]", "w[2]", "mu[1]", "mu[2]", "sigma[1]", "sigma[2]"],
    "poisson": ["a", "b"],
}
POSITIVE = {"tau", "sigma_a", "sigma_y", "sigma[1]", "sigma[2]", "w[1]", "w[2]"}


# models whose full-data steps are dear: two epochs of minibatches instead of 300 steps on every row
QUICK = {"vae": ("--batch-size", "256", "--epochs", "2"), "vae_cat": ("--batch-size", "256", "--epochs", "2")}


def _fit_json(capsys, name, *extra):
    length = QUICK.get(name, ("--steps", "300"))
    code = main(["fit", str(MODELS / f"{name}.ppl"), str(MODELS / f"{name}.csv"), "--format", "json",
                 *length, "--seed", "3", "--draws", "300", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _check_params(name, res):
    params = res["params"]
    for k in EXPECTED.get(name, []):
        assert k in params, f"{name}: {k} missing"
    for k, v in params.items():
        for c in ("mean", "sd", "q5", "q50", "q95"):
            assert v[c] is not None and math.isfinite(v[c]), (name, k, c, v)
        assert v["sd"] >= 0 and v["q5"] <= v["q50"] <= v["q95"], (name, k, v)
    for k in POSITIVE & set(params):
        assert params[k]["q5"] > 0, (name, k)
    assert res["elbo"] is not None and math.isfinite(res["elbo"])
    assert 0 < res["steps"] <= 300


def test_all_models_listed():
    assert set(EXPECTED) <= set(MODEL_FILES)


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_fits(capsys, name):
    res = _fit_json(capsys, name)
    _check_params(name, res)


@pytest.mark.parametrize("flag,word", [("auto", "enumerate (z)"), ("enumerate", "enumerate (z)"),
                                       ("score", "score (z)")])
def test_mixture_estimators(capsys, flag, word):
    res = _fit_json(capsys, "mixture", "--estimator", flag)
    _check_params("mixture", res)
    assert word in res["estimator"]
    p = res["params"]
    # the bundled data has two clear groups: the ordered means are apart and the weights sum to one
    assert p["mu[1]"]["mean"] < p["mu[2]"]["mean"] - 1.0
    assert abs(p["w[1]"]["mean"] + p["w[2]"]["mean"] - 1) < 1e-9
    # z is reported in 1..K
    zs = [v for k, v in p.items() if k.startswith("z[")]
    assert zs and all(1 <= v["q5"] and v["q95"] <= 2 for v in zs)


def test_enumerate_and_score_agree_on_the_mixture(capsys):
    a = _fit_json(capsys, "mixture")["params"]
    b = _fit_json(capsys, "mixture", "--estimator", "score", "--steps", "300")["params"]
    for k in ("mu[1]", "mu[2]", "w[1]"):
        assert abs(a[k]["mean"] - b[k]["mean"]) < 2 * a[k]["sd"] + 0.05, (k, a[k], b[k])


def test_entry_point_subprocess():
    """The installed `ppl` script, as a user runs it: stdout is one JSON object."""
    p = subprocess.run([sys.executable, "-m", "ppl", "fit", str(MODELS / "poisson.ppl"), str(MODELS / "poisson.csv"),
                        "--format", "json", "--steps", "200"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    _check_params("poisson", res)
