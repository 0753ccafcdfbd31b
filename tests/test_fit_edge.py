"""Fits at the edges: no usable mode, kinks, ELBO near zero, numerical failure."""
import math
import os

import pytest

import ppl
from ppl.errors import PplError
from conftest import CENTERED

HERE = os.path.dirname(os.path.abspath(__file__))
EIGHT = os.path.join(HERE, "..", "models", "eight_schools.csv")



def test_funnel_falls_back_to_a_cold_start_and_is_not_called_good():
    fit = ppl.loads(CENTERED, "centered.ppl").fit(EIGHT, seed=1, method="fullrank")   # (auto escalates)
    assert fit.init.startswith("cold start")
    assert fit.verdict_label != "good", fit.verdict


def test_kink_starts_at_unit_scale_and_an_elbo_near_zero_converges():
    # laplace(0, 1) has no curvature at its mode; its best Gaussian has sd about 1.25 (true sd sqrt 2)
    fit = ppl.loads("h ~ laplace(0, 1)\n", "kink.ppl").fit(None, seed=0, draws=4000)
    s = fit.summary()["h"]
    assert "clamped" in fit.init
    assert abs(s["mean"]) < 0.1 and 1.0 < s["sd"] < 1.5
    assert fit.converged and fit.steps < 10000


def test_overflowing_model_exits_3_naming_the_latent(tmp_path):
    d = tmp_path / "d.csv"
    d.write_text("y\n1\n2\n")
    m = ppl.loads("data y: real[N]\nx ~ normal(0, 100)\ny ~ normal(exp(exp(exp(x))), 1)\n", "bad.ppl")
    with pytest.raises(PplError) as e:
        m.fit(str(d), seed=0)
    assert e.value.code == 3 and "'x'" in e.value.render()
