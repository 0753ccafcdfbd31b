"""Semantic check: AST + data -> checked IR (kinds, shapes, constants, errors)."""
from __future__ import annotations

import csv
import json
from fnmatch import fnmatchcase

import numpy as np
import pytest

import ppl
from ppl.errors import PplError

from conftest import MODEL_NAMES, MODELS, REFERENCE, model_paths, reference_names, reference_paths


def kinds(model):
    return {n: node.kind for n, node in model.nodes.items()}


def csv_column(path, name):
    with open(path, newline="") as f:
        return [row[name] for row in csv.DictReader(f)]


# ---- every bundled and reference model checks with its data -----------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bundled_model_checks_with_data(name):
    mpath, dpath = model_paths(name)
    model = ppl.load(mpath).check(dpath)
    assert model.has_data
    assert any(n.kind == "latent" for n in model.nodes.values())
    assert any(n.kind == "observed" for n in model.nodes.values())
    with open(dpath, newline="") as f:
        nrows = sum(1 for _ in csv.DictReader(f))
    assert nrows in model.dims.values()        # the row count binds N (or J)
    for node in model.nodes.values():          # every size is resolved to a number
        assert all(isinstance(d, int) for d in node.shape), (name, node.name, node.shape)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bundled_model_checks_without_data(name):
    mpath, _ = model_paths(name)
    model = ppl.load(mpath).check()
    assert not model.has_data
    assert model.dims == {}


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="no ../shared/reference")
@pytest.mark.parametrize("name", reference_names())
def test_reference_model_checks_with_data(name):
    mpath, data = reference_paths(name)
    model = ppl.load(mpath).check(data)
    scalars = json.load(open(data[1]))
    for k, v in scalars.items():               # sizes in scalars.json agree with the data
        if k in model.dims:
            assert model.dims[k] == v
    for node in model.nodes.values():
        assert all(isinstance(d, int) for d in node.shape), (name, node.name, node.shape)


# ---- kinds ---------------------------------------------------------------------------------
def test_kinds_eight_schools():
    model = ppl.load(str(MODELS / "eight_schools.ppl")).check(str(MODELS / "eight_schools.csv"))
    assert kinds(model) == {"y": "observed", "sigma": "data", "mu": "latent", "tau": "latent",
                            "theta_raw": "latent", "theta": "deterministic"}
    assert list(model.nodes) == ["y", "sigma", "mu", "tau", "theta_raw", "theta"]   # source order
    assert set(model.nodes["theta"].deps) == {"mu", "tau", "theta_raw"}
    assert set(model.nodes["y"].deps) == {"theta", "sigma"}
    assert model.nodes["tau"].support == "(0, inf)"
    assert model.nodes["mu"].support == "real"
    assert model.nodes["y"].dist.spec == "normal"
    assert model.nodes["theta"].dist is None and model.nodes["theta"].expr is not None
    assert [n.name for n in model.latents()] == ["mu", "tau", "theta_raw"]
    assert model.order.index("theta") < model.order.index("y")
    assert model.order.index("theta_raw") < model.order.index("theta")


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="no ../shared/reference")
def test_kinds_mesquite_log_weight_is_an_observed_constant():
    mpath, data = reference_paths("mesquite-logmesquite")
    model = ppl.load(mpath).check(data)
    k = kinds(model)
    assert k["log_weight"] == "observed"
    assert k["beta"] == "latent" and k["sigma"] == "latent"
    for d in ("weight", "diam1", "diam2", "canopy_height", "total_height", "density", "group"):
        assert k[d] == "data"
    weight = np.array([float(x) for x in csv_column(data[0], "weight")])
    np.testing.assert_allclose(model.values["log_weight"], np.log(weight))
    assert model.nodes["log_weight"].dist.spec == "normal"
    # flat latents: their constraint is the declared type
    assert model.nodes["beta"].declared and model.nodes["beta"].dist is None
    assert model.nodes["beta"].shape == (7,)
    assert model.nodes["sigma"].support == "(0, inf)" and model.nodes["sigma"].shape == ()


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="no ../shared/reference")
def test_constants_computed_at_load_earnings():
    mpath, data = reference_paths("earnings-logearn_interaction_z")
    model = ppl.load(mpath).check(data)
    earn = np.array([float(x) for x in csv_column(data[0], "earn")])
    height = np.array([float(x) for x in csv_column(data[0], "height")])
    assert kinds(model)["log_earn"] == "observed"
    assert kinds(model)["z_height"] == "constant"
    np.testing.assert_allclose(model.values["log_earn"], np.log(earn))
    np.testing.assert_allclose(model.values["z_height"], (height - height.mean()) / height.std(ddof=1))
    assert model.values["z_height"].shape == (len(height),)


def test_kinds_mixture():
    model = ppl.load(str(MODELS / "mixture.ppl")).check(str(MODELS / "mixture.csv"))
    assert kinds(model) == {"y": "observed", "K": "constant", "w": "latent", "mu": "latent",
                            "sigma": "latent", "z": "latent"}
    assert int(model.values["K"]) == 2
    z, mu, w = model.nodes["z"], model.nodes["mu"], model.nodes["w"]
    n = len(csv_column(str(MODELS / "mixture.csv"), "y"))
    assert z.discrete and z.is_int and z.shape == (n,)
    assert not mu.discrete and mu.declared and mu.constraint.kind == "ordered" and mu.shape == (2,)
    assert w.support == "simplex" and w.shape == (2,)
    assert model.nodes["sigma"].support == "(0, inf)"


def test_constant_without_latent_dependence_is_computed(check_text):
    m = check_text("data x: real[N]\nmu ~ normal(0, 1)\nx ~ normal(mu, 1)\nK = 3\nv = ones(K) * 2\n"
                   "s = sum(x)\nt = mu + s\n", {"x": [1.0, 2.0, 4.0]})
    assert kinds(m) == {"x": "observed", "K": "constant", "v": "constant", "s": "constant",
                        "mu": "latent", "t": "deterministic"}
    assert m.values["K"] == 3
    np.testing.assert_array_equal(m.values["v"], [2.0, 2.0, 2.0])
    assert float(m.values["s"]) == 7.0
    assert "t" not in m.values
    assert m.nodes["v"].shape == (3,)


def test_comparison_gives_one_or_zero(check_text):
    m = check_text("data x: real[N]\nc = x > 1.5\nd = x <= 1\nmu ~ normal(0, 1)\n", {"x": [1.0, 2.0, 3.0]})
    np.testing.assert_array_equal(m.values["c"], [0, 1, 1])
    np.testing.assert_array_equal(m.values["d"], [1, 0, 0])
    assert m.nodes["c"].is_int


def test_observing_a_deterministic_of_a_latent_is_an_error(check_errors):
    (d,) = check_errors("mu ~ normal(0,1)\nt = mu + 1\nt ~ normal(0, 1)\n")
    assert d.span.line == 3
    assert "depends on the latent 'mu'" in d.message


# ---- shapes -----------------------------------------------------------------------------------
def test_radon_k_bound_by_levels():
    mpath, dpath = model_paths("radon")
    model = ppl.load(mpath).check(dpath)
    county = csv_column(dpath, "county")
    assert model.dims["K"] == len(set(county))
    assert model.dims["N"] == len(county)
    assert model.nodes["a"].shape == (len(set(county)),)
    assert model.nodes["county"].is_int
    assert model.levels["county"] == sorted(set(county))
    assert model.values["county"].min() == 1 and model.values["county"].max() == len(set(county))


def test_logistic_d_bound_by_from_pattern():
    mpath, dpath = model_paths("logistic")
    model = ppl.load(mpath).check(dpath)
    header = next(csv.reader(open(dpath)))
    xcols = [h for h in header if fnmatchcase(h, "x*")]
    n = len(csv_column(dpath, "y"))
    assert model.dims == {"N": n, "D": len(xcols)}
    assert model.nodes["X"].shape == (n, len(xcols))
    assert model.nodes["beta"].shape == (len(xcols),)
    first = next(csv.DictReader(open(dpath)))
    np.testing.assert_allclose(model.values["X"][0], [float(first[c]) for c in xcols])


def test_symbolic_shapes_without_data():
    m = ppl.load(str(MODELS / "eight_schools.ppl")).check()
    assert {n: node.shape for n, node in m.nodes.items()} == {
        "y": ("J",), "sigma": ("J",), "mu": (), "tau": (), "theta_raw": ("J",), "theta": ("J",)}
    m = ppl.load(str(MODELS / "logistic.ppl")).check()
    assert m.nodes["X"].shape == ("N", "D") and m.nodes["beta"].shape == ("D",)
    assert m.nodes["y"].shape == ("N",)
    m = ppl.load(str(MODELS / "radon.ppl")).check()
    assert m.nodes["a"].shape == ("K",) and m.nodes["county"].shape == ("N",)
    m = ppl.load(str(MODELS / "mixture.ppl")).check()
    assert m.nodes["z"].shape == ("N",) and m.nodes["w"].shape == (2,)   # K = 2 is a constant


def test_symbolic_size_mismatch_is_an_error(check_errors):
    (d,) = check_errors("data x: real[N]\nmu[M] ~ normal(0,1)\nd = x + mu\n")
    assert d.span.line == 3 and "(N) and (M)" in d.message


def test_broadcast_scalar_and_vector_ok(check_text):
    m = check_text("a[N, K] ~ normal(0,1)\nb[K] ~ normal(0, 1)\nc = a + b\nd = 2 * b + 1\n"
                   "e = [1, 2, 3] + a[1, 1]\n")
    assert m.nodes["c"].shape == ("N", "K")
    assert m.nodes["d"].shape == ("K",)
    assert m.nodes["e"].shape == (3,)


def test_broadcast_n1_against_n_is_a_located_error(check_errors):
    src = "data x: real[N, 1]\ndata y: real[N]\nmu ~ normal(0,1)\nd = x + y\ny ~ normal(mu, 1)\n"
    for data in (None, {"x": [[1.0], [2.0], [3.0]], "y": [1.0, 2.0, 3.0]}):
        (d,) = check_errors(src, data)
        assert (d.span.line, d.span.col, d.span.end_col) == (4, 5, 10)
        assert "surely not meant" in d.message
        assert "(3, 3)" in d.message if data else "(N, N)" in d.message


def test_broadcast_n1_against_n_in_likelihood_is_an_error(check_errors):
    (d,) = check_errors("data x: real[N, 1]\ndata y: real[N]\nmu ~ normal(0,1)\ny ~ normal(x + mu, 1)\n",
                        {"x": [[1.0], [2.0]], "y": [1.0, 2.0]})
    assert d.span.line == 4 and "(2, 1)" in d.message and "'y'" in d.message


def test_mismatched_literal_sizes(check_errors):
    (d,) = check_errors("data x: real[3]\nmu[4] ~ normal(0,1)\nd = x + mu\n", {"x": [1, 2, 3]})
    assert d.span.line == 3 and "(3) and (4)" in d.message


def test_matmul_shapes(check_text, check_errors):
    m = check_text("data X: real[N, D]\nb[D] ~ normal(0, 1)\nm = X @ b\n", {"X": [[1, 2], [3, 4], [5, 6]]})
    assert m.nodes["m"].shape == (3,)
    (d,) = check_errors("data X: real[N, D]\nq[3] ~ normal(0,1)\nr = X @ q\n", {"X": [[1, 2], [3, 4]]})
    assert d.span.line == 3 and "inner sizes differ" in d.message


# ---- indexing ------------------------------------------------------------------------------------
def test_literal_index_range(check_errors, check_text):
    m = check_text("a[3] ~ normal(0,1)\nt = a[1] + a[3]\n")
    assert m.nodes["t"].shape == ()
    (d,) = check_errors("a[3] ~ normal(0,1)\nu = a[4]\n")
    assert (d.span.line, d.span.col) == (2, 7)
    assert "index 4 out of range" in d.message and "3 elements" in d.message
    (d,) = check_errors("a[3] ~ normal(0,1)\nu = a[0]\n")
    assert "indexes start at 1" in d.message


def test_gather_index_range_checked_against_data(check_errors, check_text):
    m = check_text("data g: int[N]\na[3] ~ normal(0,1)\nt = a[g]\n", {"g": [1, 2, 3, 3]})
    assert m.nodes["t"].shape == (4,)
    (d,) = check_errors("data g: int[N]\na[3] ~ normal(0,1)\nt = a[g]\n", {"g": [1, 2, 5]})
    assert d.span.line == 3 and "up to 5" in d.message


def test_real_index_is_an_error(check_errors):
    (d,) = check_errors("a[2] ~ normal(0,1)\nx = a[1.0]\n")
    assert "must be an integer" in d.message


def test_too_many_indexes(check_errors):
    (d,) = check_errors("mu ~ normal(0,1)\nt = mu[2]\n")
    assert "too many indexes" in d.message


def test_matrix_index_axis_by_axis(check_text):
    m = check_text("a[N, K] ~ normal(0,1)\nr = a[1]\ne = a[2, 1]\n")
    assert m.nodes["r"].shape == ("K",)
    assert m.nodes["e"].shape == ()


# ---- errors: collected, located, in source order ----------------------------------------------
def test_all_errors_in_source_order(check_errors):
    # c and e are checked after b (topological order) but reported by line
    diags = check_errors("c = b[5]\nd = [1,2] + [1,2,3]\nb[3] ~ normal(0, 1)\ne = b[0]\n")
    assert [d.span.line for d in diags] == [1, 2, 4]
    assert "index 5" in diags[0].message and "do not match" in diags[1].message
    assert "start at 1" in diags[2].message


def test_name_errors_collected(check_errors):
    diags = check_errors("a ~ normal(0, 1)\nb ~ normal(a, 1)\nc = a + zzz\nd ~ normall(0, 1)\ne = exx(1)\n"
                         "f ~ normal(b, qq)\n")
    assert [(d.span.line, d.span.col) for d in diags] == [(3, 9), (4, 5), (5, 5), (6, 15)]
    assert diags[0].message == "unknown name 'zzz'"
    assert "did you mean 'normal'" in diags[1].message
    assert "did you mean 'exp'" in diags[2].message


def test_did_you_mean_in_rendered_error(check_errors):
    (d,) = check_errors("data floor: real[N]\nb ~ normal(0, 1)\ndata y: real[N]\ny ~ normal(b * floo, 1)\n")
    r = d.render()
    assert r.splitlines()[0] == "m.ppl:4:16: error: unknown name 'floo'; did you mean 'floor'?"
    assert r.splitlines()[1] == "    4 | y ~ normal(b * floo, 1)"
    assert r.splitlines()[2] == "      |                ^^^^"


def test_redefinition_and_cycle(check_errors):
    (d,) = check_errors("a ~ normal(0, 1)\na ~ normal(0, 1)\n")
    assert d.span.line == 2 and "already has a distribution at line 1" in d.message
    (d,) = check_errors("a = b\nb = a\nc ~ normal(a, 1)\n")
    assert "depends on itself" in d.message


def test_constraint_outside_support_and_discrete_on_real(check_errors):
    diags = check_errors("data y: real[N]\nx: real ~ gamma(2, 2)\ny ~ poisson(x)\n", {"y": [1, 2, 3]})
    assert [d.span.line for d in diags] == [2, 3]
    assert "gamma's support is (0, inf)" in diags[0].message
    assert "declare it int" in diags[1].message


def test_bounded_latent_inside_support_is_fine(check_text):
    m = check_text("sigma: real<lower=0> ~ normal(0, 1)\n")
    assert m.nodes["sigma"].declared and m.nodes["sigma"].constraint.kind == "lower"


def test_bad_constant_argument(check_errors):
    (d,) = check_errors("mu ~ normal(0, -1)\n")
    assert (d.span.line, d.span.col) == (1, 16) and "must be positive" in d.message


def test_no_latent_is_an_error(check_errors):
    (d,) = check_errors("data y: real[N]\ny ~ normal(0,1)\n", {"y": [1.0]})
    assert "nothing to infer" in d.message


def test_empty_model_is_an_error(check_errors):
    (d,) = check_errors("# only a comment\n")
    assert "empty" in d.message


def test_unbound_size_with_data(check_errors):
    diags = check_errors("data y: real[N]\nb[M] ~ normal(0, 1)\n", {"y": [1.0, 2.0]})
    assert any("the size M is not given by any data" in d.message and d.span.line == 2 for d in diags)
