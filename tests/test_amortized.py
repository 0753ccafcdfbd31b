"""Encoders declared in the model (`amortize`; ppl/frontend/encoders.py, ppl/infer/amortized.py):
the statement's AST, fits against closed forms (a linear Gaussian model, where the linear encoder
is exact: q(z_n | y_n) and the global's q against their optimum and the exact posterior), with
and without --batch-size, a 2-D local latent with an MLP encoder against the mean-field optimum,
new rows through `fit.encode` (also after a save and `ppl.load_fit`), and `--refine-local` on a
Poisson model (the gap positive, the refined ELBO up to the exact log p(y) by quadrature)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import ppl
from ppl.cli import main
from ppl.errors import UsageError
from ppl.frontend import ast as A

ONE = """data y: real[N]
mu ~ normal(0, 5)
z[N] ~ normal(mu, 1)
y ~ normal(z, 0.5)
amortize z from y linear
"""

TWO = """data y: real[N, P]
data W: real[K, P]
mu[K] ~ normal(0, 5)
z[N, K] ~ normal(mu, 1)
y ~ normal(z @ W, 0.5)
amortize z from y {enc}
"""
W2 = np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.8]])


def _one(N=100, seed=1):
    rng = np.random.default_rng(seed)
    z = 1.5 + rng.normal(size=N)
    return z + 0.5 * rng.normal(size=N)


def _two(N=120, seed=2):
    rng = np.random.default_rng(seed)
    z = np.array([1.0, -0.5]) + rng.normal(size=(N, 2))
    return z @ W2 + 0.5 * rng.normal(size=(N, 3))


def test_the_statement_parses_to_an_ast_node_with_spans_and_its_words_stay_usable_as_names():
    src = ("data y: real[N]\nlinear = 2\nhidden ~ normal(0, 1)\nz[N] ~ normal(hidden * linear, 1)\n"
           "y ~ normal(z, 1)\namortize z from y, y hidden [32, 16] activation tanh\n")
    prog = ppl.loads(src, "m.ppl").program
    assert [s.name for s in prog.statements] == ["y", "linear", "hidden", "z", "y"]
    (d,) = prog.encoders
    assert isinstance(d, A.Amortize) and d.latent.id == "z" and [x.id for x in d.inputs] == ["y", "y"]
    assert [h.value for h in d.hidden] == [32, 16] and d.activation.id == "tanh" and not d.linear
    assert (d.span.line, d.latent.span.col, d.activation.span.col) == (6, 10, 49)
    model = ppl.loads(src, "m.ppl").check({"y": [0.0, 1.0]})
    assert model.encoders[0].hidden == (32, 16) and model.encoders[0].inputs == ("y", "y")


@pytest.fixture(scope="module")
def one_fit():
    y = _one()
    return y, ppl.loads(ONE, "one.ppl").fit({"y": y.tolist()}, seed=0, steps=300)


def test_linear_encoder_is_exact_on_a_linear_gaussian_model_without_batches(one_fit):
    y, fit = one_fit
    N = len(y)
    q = fit.summary(corrected=False)
    # exact posterior of mu: y_n | mu ~ N(mu, 1.25)
    prec = 1 / 25 + N / 1.25
    mu_mean, mu_sd = (y.sum() / 1.25) / prec, 1 / math.sqrt(prec)
    assert abs(q["mu"]["mean"] - mu_mean) < 0.1 * mu_sd
    # q = q(mu) q(z | y): q(mu)'s optimum has mu's conditional precision 1/25 + N
    assert q["mu"]["sd"] == pytest.approx(1 / math.sqrt(1 / 25 + N), rel=0.15)
    # z_n | y_n, mu ~ N((mu + 4 y_n) / 5, 1/5): the encoder's optimum given q(mu)
    e = fit.encode()["z"]
    exact = (q["mu"]["mean"] + 4 * y) / 5
    assert np.abs(e["mean"] - exact).max() < 0.02 * math.sqrt(0.2)
    assert np.allclose(e["sd"], math.sqrt(0.2), rtol=0.02)
    # the PSIS-corrected summary reaches mu's exact marginal
    assert fit.summary()["mu"]["sd"] == pytest.approx(mu_sd, rel=0.15)
    assert "encoder z from y: linear" in fit.method_note


def test_linear_encoder_is_exact_for_a_2d_local_latent_under_minibatches():
    y = _two()
    N, K, s = len(y), 2, 0.5
    fit = ppl.loads(TWO.format(enc="linear"), "two.ppl").fit({"y": y.tolist(), "W": W2.tolist()}, seed=0,
                                                            batch_size=40, epochs=100)
    q = fit.summary(corrected=False)
    C = W2.T @ W2 + s * s * np.eye(3)
    prec = np.eye(K) / 25 + N * W2 @ np.linalg.solve(C, W2.T)
    mu_mean = np.linalg.solve(prec, W2 @ np.linalg.solve(C, y.sum(0)))
    mu_sd = np.sqrt(np.diag(np.linalg.inv(prec)))
    m = np.array([q[f"mu[{i}]"]["mean"] for i in (1, 2)])
    assert np.all(np.abs(m - mu_mean) < 0.15 * mu_sd)
    Sig = np.linalg.inv(np.eye(K) + W2 @ W2.T / s ** 2)
    e = fit.encode()["z"]
    assert e["mean"].shape == (N, K)
    exact = (Sig @ (m[:, None] + W2 @ y.T / s ** 2)).T
    assert np.all(np.abs(e["mean"] - exact).max(0) < 0.02 * np.sqrt(np.diag(Sig)))
    assert np.allclose(e["sd"], np.sqrt(np.diag(Sig)), rtol=0.02)
    assert math.isfinite(fit.elbo)


def test_mlp_encoder_reaches_the_mean_field_optimum_of_a_2d_local_latent():
    y = _two(N=60)
    s = 0.5
    fit = ppl.loads(TWO.format(enc="hidden [16] activation tanh"), "two.ppl").fit(
        {"y": y.tolist(), "W": W2.tolist()}, seed=0, steps=500)
    q = fit.summary(corrected=False)
    m = np.array([q[f"mu[{i}]"]["mean"] for i in (1, 2)])
    Lam = np.eye(2) + W2 @ W2.T / s ** 2
    exact = np.linalg.solve(Lam, m[:, None] + W2 @ y.T / s ** 2).T     # the mean-field optimum's means ...
    e = fit.encode()["z"]
    sd = 1 / np.sqrt(np.diag(Lam))                                       # ... and sds: the conditional ones
    assert np.all(np.abs(e["mean"] - exact).max(0) < 0.05 * sd)
    assert np.allclose(e["sd"], sd, rtol=0.03)


def test_encode_gives_new_rows_their_posterior_and_survives_a_save(tmp_path, one_fit):
    y, fit = one_fit
    mu = fit.summary(corrected=False)["mu"]["mean"]
    new = [-2.0, 0.0, 7.5]
    e = fit.encode({"y": new})["z"]
    assert np.allclose(e["mean"], (mu + 4 * np.asarray(new)) / 5, atol=0.01)
    assert np.allclose(e["sd"], math.sqrt(0.2), rtol=0.02)
    fit.save(str(tmp_path / "out"))
    back = ppl.load_fit(str(tmp_path / "out"))
    e2 = back.encode({"y": new})["z"]
    assert np.array_equal(e2["mean"], e["mean"]) and np.array_equal(e2["sd"], e["sd"])
    assert back.draw(5, seed=3)["z"].shape == (5, len(y))


POISSON = """data y: int<lower=0>[N]
z[N] ~ normal(0.5, 1)
y ~ poisson_log(z)
amortize z from y linear
"""


def _poisson_log_evidence(y) -> float:
    g = np.linspace(-8, 8, 4001)
    lp = -0.5 * (g - 0.5) ** 2 - 0.5 * math.log(2 * math.pi)
    total = 0.0
    for yi in y:
        f = lp + yi * g - np.exp(g) - math.lgamma(yi + 1)
        top = f.max()
        total += top + math.log(np.exp(f - top).sum() * (g[1] - g[0]))
    return total


def test_refine_local_reports_the_amortization_gap(tmp_path, capsys):
    rng = np.random.default_rng(3)
    y = rng.poisson(np.exp(0.5 + rng.normal(size=40)))
    path = tmp_path / "pois.ppl"
    path.write_text(POISSON)
    (tmp_path / "pois.csv").write_text("y\n" + "\n".join(str(int(v)) for v in y) + "\n")
    code = main(["fit", str(path), str(tmp_path / "pois.csv"), "--steps", "200", "--refine-local", "200",
                 "--format", "json", "--progress", "off"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    gap = out["amortization"]
    exact = _poisson_log_evidence(y)
    # the linear encoder cannot follow a Poisson row's posterior (its mean is not linear in y): the
    # per-row Gaussians do better, and no Gaussian beats log p(y)
    assert gap["gap"] > 5.0 and gap["gap"] == pytest.approx(gap["elbo_refined"] - gap["elbo_encoder"])
    assert gap["elbo_refined"] < exact + 0.5
    assert gap["elbo_refined"] > exact - 0.05 * len(y)


def test_refine_local_and_encode_need_an_encoder():
    y = _one(N=20)
    src = ONE.replace("amortize z from y linear\n", "")
    with pytest.raises(UsageError, match="refine_local="):
        ppl.loads(src, "m.ppl").fit({"y": y.tolist()}, refine_local=10, steps=50)
    with pytest.raises(UsageError, match="refine_local="):
        ppl.loads(ONE, "m.ppl").fit({"y": y.tolist()}, refine_local=0)
    fit = ppl.loads(src, "m.ppl").fit({"y": y.tolist()}, steps=50, method="meanfield")
    with pytest.raises(UsageError, match="no encoder"):
        fit.encode({"y": [1.0]})


def test_iaf_steps_make_a_linear_encoder_follow_a_poisson_row_posterior():
    rng = np.random.default_rng(3)
    y = rng.poisson(np.exp(0.5 + rng.normal(size=40)))
    exact = _poisson_log_evidence(y)
    fits = {enc: ppl.loads(POISSON.replace("linear", enc), "pois.ppl").fit({"y": y.tolist()}, seed=0, steps=300)
            for enc in ("linear", "linear iaf 2")}
    # a Gaussian linear in y misses by ~0.5 nats a row; with IAF steps (the row's y as context) q
    # follows each row's skewed posterior to within a few hundredths of a nat per row
    assert fits["linear"].elbo < exact - 0.3 * len(y)
    assert exact - 0.05 * len(y) < fits["linear iaf 2"].elbo < exact + 0.5
    e = fits["linear iaf 2"].encode({"y": [0, 3, 10]})["z"]
    assert np.all(np.diff(e["mean"]) > 0) and np.all(e["sd"] > 0)


def test_predict_draws_new_rows_latents_from_their_encoder_and_graph_says_so(one_fit):
    y, fit = one_fit
    mu = fit.summary(corrected=False)["mu"]["mean"]
    new = np.array([-3.0, 0.0, 5.0])
    p = fit.predict({"y": new.tolist()}, draws=4000, seed=2)
    # z_n | y_n ~ N((mu + 4 y_n) / 5, 0.2) (the prior would give mean mu, sd 1); y_rep adds sd 0.5
    assert np.allclose(p["z"].mean(0), (mu + 4 * new) / 5, atol=0.04)
    assert np.allclose(p["z"].std(0), math.sqrt(0.2), rtol=0.06)
    assert np.allclose(p["y"].std(0), math.sqrt(0.45), rtol=0.06)
    from ppl.graph import build_graph, to_text
    g = build_graph(fit.model)
    assert g.nodes["z"]["encoder"].startswith("linear Gaussian") and "encoder" not in g.nodes["mu"]
    assert "q from an encoder: linear Gaussian" in to_text(g)


def test_holdout_scores_the_rows_set_aside_under_the_encoder():
    y = _one(N=150, seed=5)
    fit = ppl.loads(ONE, "one.ppl").fit({"y": y.tolist()}, seed=0, steps=300, holdout=0.2)
    h = fit.holdout
    assert h["rows"] == 30 and fit.model.rows.size == 120 and h["fraction"] == 0.2
    held = np.setdiff1d(np.round(y, 12), np.round(fit.model.values["y"], 12))
    assert len(held) == 30
    q = fit.summary(corrected=False)["mu"]
    m, v = q["mean"], q["sd"] ** 2
    # per row: E_q(mu) log N(y_n; mu, 1.25) - KL(q(z_n | y_n) || p(z_n | y_n, mu)), with q(z_n | y_n) the
    # exact conditional at mu = m: the KL's mean is v / 10
    exact = np.mean(-0.5 * np.log(2 * np.pi * 1.25) - 0.5 * (held - m) ** 2 / 1.25) - v / 2.5 - v / 10
    assert h["elbo_per_row"] == pytest.approx(exact, abs=0.01)
    assert math.isfinite(h["elbo_per_row_start"])
    with pytest.raises(UsageError, match="holdout="):
        ppl.loads(ONE, "one.ppl").fit({"y": y.tolist()}, holdout=1.5)
    with pytest.raises(UsageError, match="every local latent"):
        ppl.loads(ONE.replace("amortize z from y linear\n", ""), "m.ppl").fit({"y": y.tolist()}, holdout=0.2)


def test_vae_on_the_binarised_digits_trains_and_scores_held_out_rows(capsys):
    from conftest import MODELS
    code = main(["fit", str(MODELS / "vae.ppl"), str(MODELS / "vae.csv"), "--batch-size", "128", "--epochs", "4",
                 "--holdout", "0.1", "--draws", "100", "--format", "json", "--progress", "off"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    h = out["holdout"]
    assert h["rows"] == 180 and math.isfinite(h["elbo_per_row"])
    # 64 binary pixels: the start is near 64 log 2 = 44 nats a row; 4 epochs take off more than 10
    assert h["elbo_per_row"] > h["elbo_per_row_start"] + 10
    assert "encoder z from x: MLP [128] relu" in out["method_note"]


def test_the_digits_script_writes_the_shipped_csv(tmp_path):
    pytest.importorskip("sklearn")
    import importlib.util
    from conftest import MODELS
    spec = importlib.util.spec_from_file_location("digits", MODELS / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    assert digits.write(str(tmp_path / "digits.csv")) == 1797
    assert (tmp_path / "digits.csv").read_text() == (MODELS / "vae.csv").read_text()


@pytest.mark.parametrize("options,match", [(dict(optimizer="dadvi"), "optimizer="), (dict(objective="iwae"), "objective="),
                                           (dict(method="graph"), "method=")])
def test_options_an_encoder_cannot_serve_are_usage_errors(options, match):
    with pytest.raises(UsageError, match=match):
        ppl.loads(ONE, "one.ppl").fit({"y": _one(N=20).tolist()}, **options)


def test_a_minibatch_fit_with_per_row_q_saves_and_restores(tmp_path):
    # (RowLocal had no saved form: `--out` with --batch-size and a local latent failed)
    y = _one(N=30, seed=4)
    src = ONE.replace("amortize z from y linear\n", "")
    fit = ppl.loads(src, "rl.ppl").fit({"y": y.tolist()}, seed=0, batch_size=10, epochs=5)
    fit.save(str(tmp_path / "out"))
    back = ppl.load_fit(str(tmp_path / "out"))
    a, b = fit.q.draw(50, seed=4)[0], back.q.draw(50, seed=4)[0]
    assert np.allclose(a["z"], b["z"]) and np.allclose(a["mu"], b["mu"])


MIXED = """data y: real[N]
data x: real[N]
mu ~ normal(0, 5)
u[N] ~ normal(0, 1)
w[N] ~ normal(0, 1)
y ~ normal(mu + u, 0.5)
x ~ normal(w, 0.5)
amortize u from y linear
"""


def test_one_draw_a_row_keeps_antithetic_pairs_where_per_row_rows_take_natural_gradient_steps():
    # w has no encoder: its rows' natural-gradient steps need the curvature of an antithetic pair, so
    # `mc_samples=1` still draws one pair there (one draw alone once sent the ELBO to -1e15); with
    # globals (mu) the step size follows the draws, as for any family
    rng = np.random.default_rng(0)
    N = 300
    y = (1.0 + rng.normal(size=N) + 0.5 * rng.normal(size=N)).tolist()
    x = (rng.normal(size=N) + 0.5 * rng.normal(size=N)).tolist()
    fits = [ppl.loads(MIXED, "m.ppl").fit({"y": y, "x": x}, seed=0, batch_size=50, epochs=30, **o)
            for o in ({}, {"mc_samples": 1})]
    assert fits[0].mc_samples == 16 and fits[1].mc_samples == 1
    assert fits[1].lr == pytest.approx(0.1 * math.sqrt(1 / 16))
    assert abs(fits[1].elbo - fits[0].elbo) < 0.01 * abs(fits[0].elbo)
    assert abs(fits[1].summary()["mu"]["mean"] - fits[0].summary()["mu"]["mean"]) < 0.05
