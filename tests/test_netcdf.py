"""ppl/netcdf.py: fit.nc has the InferenceData groups, dims named after the model's symbols, level
labels as coordinates; it reads as a DataTree (ArviZ 1.x's way) and with az.from_netcdf."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import need

import ppl

xr = need("xarray")


def test_groups_dims_and_coordinates(saved_fit):
    d = saved_fit("radon")
    tree = xr.open_datatree(d / "fit.nc", engine="h5netcdf")
    assert set(tree.children) == {"posterior", "sample_stats", "log_likelihood", "posterior_predictive",
                                  "observed_data", "constant_data"}
    post = tree["posterior"]
    assert post["a"].dims == ("chain", "draw", "K")
    fit = ppl.load_fit(str(d))
    assert list(post["K"].values) == fit.model.levels["county"]            # county names as coordinates
    assert np.array_equal(post["a"].values[0], fit.draws["a"])
    assert tree["log_likelihood"]["log_radon"].dims == ("chain", "draw", "N")
    assert np.allclose(tree["log_likelihood"]["log_radon"].values[0], fit.log_likelihood()["log_radon"])
    ss = tree["sample_stats"]
    assert np.allclose(ss["lp"].values[0] - ss["log_q"].values[0], ss["log_weight"].values[0])
    assert ss["psis_weight"].values.sum() == pytest.approx(1.0)
    assert np.array_equal(tree["observed_data"]["log_radon"].values, fit.model.values["log_radon"])
    assert set(tree["constant_data"].data_vars) == {"floor", "county"}
    assert tree["posterior_predictive"]["log_radon"].shape == (1, 1000, fit.model.dims["N"])
    assert tree.attrs["inference_library"] == "ppl"


def test_eight_schools_dims_and_arviz_summary(saved_fit):
    az = need("arviz")
    d = saved_fit("eight_schools")
    idata = az.from_netcdf(str(d / "fit.nc"))
    assert idata.posterior["theta"].dims == ("chain", "draw", "J")
    assert list(idata.posterior["J"].values) == list(range(1, 9))         # 1-based, as ppl names them
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = az.summary(idata, var_names=["theta"], kind="stats")
    assert list(s.index)[0] == "theta[1]"
    fit = ppl.load_fit(str(d))
    assert s.loc["theta[1]", "mean"] == pytest.approx(fit.summary()["theta[1]"]["mean"], abs=1e-3)


def test_mixture_discrete_draws_are_integers(saved_fit):
    tree = xr.open_datatree(saved_fit("mixture") / "fit.nc", engine="h5netcdf")
    z = tree["posterior"]["z"]
    assert z.dtype.kind == "i" and set(np.unique(z.values)) <= {1, 2}


def test_without_h5netcdf_no_fit_nc_and_a_note(monkeypatch, tmp_path):
    import ppl.netcdf as N
    monkeypatch.setattr(N, "available", lambda: False)
    from conftest import MODELS
    fit = ppl.load(str(MODELS / "poisson.ppl")).fit(str(MODELS / "poisson.csv"), draws=100)
    fit.save(str(tmp_path / "o"))
    import json
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert "fit.nc" not in rec["files"] and any("netcdf extra" in n for n in rec["notes"])
    assert ppl.load_fit(str(tmp_path / "o")).loo().elpd_loo < 0        # LOO needs no fit.nc
