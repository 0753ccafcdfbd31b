"""Minibatch stochastic VI (ppl/infer/minibatch.py): the scaled objective against the full one (all
rows in one batch, an epoch of batches, gradients with a ragged last batch), the located error for
nodes that mix rows, bad --batch-size values, and fits against the full-batch fit (logistic
regression) and against the exact mean-field optimum (a model with one latent per row)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ppl
from ppl.backend.log_joint import LogJoint
from ppl.backend.runtime import Batch, Runtime
from ppl.cli import main
from ppl.config import FitConfig
from ppl.errors import UsageError
from ppl.infer.families import MeanField
from ppl.infer.improper import q_moments
from ppl.infer.laplace import cold_start
from ppl.infer import minibatch
from ppl.infer.minibatch import Epochs, RowLocal
from ppl.plan import plan

DT = torch.float64
GOLDEN = Path(__file__).parent / "golden" / "minibatch"

LOCAL = """
data y: real[N]
mu ~ normal(0, 5)
tau ~ lognormal(0, 1)
z[N] ~ normal(mu, tau)
y ~ normal(z, 0.5)
"""


def _local(N=11, seed=0):
    rng = np.random.default_rng(seed)
    y = 1.0 + rng.normal(size=N) + 0.5 * rng.normal(size=N)
    model = ppl.loads(LOCAL, "local.ppl").check({"y": y.tolist()})
    lj = LogJoint(model, plan(model), Runtime(dtype=DT))
    start = cold_start(lj.dim, DT, False, "cold")
    fam = RowLocal(MeanField, start, lj, torch.Generator().manual_seed(seed), FitConfig(batch_size=3))
    return y, lj, fam


def _draws(lj, fam, S=4, seed=1):
    """Global draws (S, globals) and every row's local draws (S, N, K), and theta in the model's layout."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(S, lj.dim, dtype=DT, generator=g)
    return theta[:, fam.g_idx], theta[:, fam.l_idx], theta


def _batch_value(lj, fam, theta_g, z, idx):
    b = Batch.rows(lj.row_data, idx, fam.N)
    return lj.evaluate(None, blocks=fam.blocks(theta_g, z[:, idx]), batch=b).total


def test_one_batch_of_all_rows_is_the_full_objective():
    _, lj, fam = _local()
    theta_g, z, theta = _draws(lj, fam)
    full = lj.log_prob(theta)
    perm = torch.randperm(fam.N, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_batch_value(lj, fam, theta_g, z, perm), full, rtol=1e-12, atol=1e-9)
    # the draws for PSIS put the rows back in the model's layout
    t, lq = fam.rsample_with_log_q(3)
    assert t.shape == (3, lj.dim) and torch.isfinite(lj.log_prob(t)).all() and torch.isfinite(lq).all()


def test_an_epoch_of_scaled_batches_averages_to_the_full_objective_and_gradient():
    """Same draws; batches of 4, 4 and a ragged 3 of 11 rows: the objectives weighted by B/N add up to
    the full one, and so do the gradients in the globals; each local row's gradient, scaled back by
    B/N (what the row's step uses), is its gradient in the full objective."""
    _, lj, fam = _local(N=11)
    theta_g, z, theta = _draws(lj, fam)
    theta_g.requires_grad_(True)
    z.requires_grad_(True)
    full = lj.log_prob(theta_with(fam, theta_g, z)).sum()
    g_full, z_full = torch.autograd.grad(full, (theta_g, z))
    total, g_total = 0.0, torch.zeros_like(theta_g)
    batches = list(Epochs(lj.row_data, 11, 4, seed=0).epoch())
    assert [b.size for b in batches] == [4, 4, 3] and sorted(torch.cat([b.index for b in batches]).tolist()) == \
        list(range(11))
    for b in batches:
        zb = z.detach()[:, b.index].clone().requires_grad_(True)
        v = lj.evaluate(None, blocks=fam.blocks(theta_g, zb), batch=b).total.sum()
        g, gz = torch.autograd.grad(v, (theta_g, zb))
        w = b.size / 11
        assert b.scale == pytest.approx(1 / w)
        total += w * float(v.detach())
        g_total += w * g
        torch.testing.assert_close(gz * w, z_full[:, b.index], rtol=1e-10, atol=1e-12)
    assert total == pytest.approx(float(full.detach()), rel=1e-12)
    torch.testing.assert_close(g_total, g_full, rtol=1e-10, atol=1e-12)


def theta_with(fam, theta_g, z):
    cols = torch.cat([fam.g_idx, fam.l_idx.reshape(-1)])
    parts = torch.cat([theta_g, z.reshape(z.shape[0], -1)], 1)
    return parts[:, torch.argsort(cols)]


def test_global_model_batch_gradient_with_a_ragged_last_batch():
    """No local latents (logistic regression): the weighted batch gradients of the closed-form
    estimator's objective give the full gradient."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 3))
    y = (rng.random(10) < 0.5).astype(int)
    src = Path(__file__).parents[1].joinpath("models", "logistic.ppl").read_text()
    model = ppl.loads(src, "lr.ppl").check({"X": X.tolist(), "y": y.tolist()})
    lj = LogJoint(model, plan(model), Runtime(dtype=DT))
    theta = torch.randn(5, lj.dim, dtype=DT, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    g_full, = torch.autograd.grad(lj.log_prob(theta).sum(), theta)
    g = torch.zeros_like(theta)
    for b in Epochs(lj.row_data, 10, 4, seed=7).epoch():          # 4, 4, 2 rows
        gb, = torch.autograd.grad(lj.log_prob(theta, batch=b).sum(), theta)
        g += gb * (b.size / 10)
    torch.testing.assert_close(g, g_full, rtol=1e-10, atol=1e-12)


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mixes_rows", "mixes_rows_deterministic"])
def test_a_node_that_mixes_rows_is_a_located_error(name, capsys, monkeypatch):
    monkeypatch.chdir(GOLDEN)
    capsys.readouterr()
    code = main(["fit", f"{name}.ppl", "xy.csv", "--batch-size", "2", "--progress", "off"])
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert lines[0].startswith(f"{name}.ppl:") and "mixes the data rows" in lines[0] and "--batch-size" in lines[0]
    col = int(lines[0].split(":")[2])
    assert lines[2].index("^") - lines[2].index("|") - 2 == col - 1          # the caret under the column
    assert err + f"# exit {code}\n" == (GOLDEN / f"{name}.err").read_text()


@pytest.mark.parametrize("args,expect", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "-5"], "--batch-size must be at least 1, got -5"),
    (["--batch-size", "7"], "--batch-size 7 is larger than the data: there are 6 rows"),
    (["--batch-size", "2", "--optimizer", "dadvi"], "--optimizer dadvi fixes its draws over the full data and "
                                                    "cannot run on minibatches"),
    (["--epochs", "3"], "--epochs applies with --batch-size"),
    (["--batch-size", "2", "--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "2", "--objective", "iwae"], "--objective iwae cannot run on minibatches"),
])
def test_bad_batch_options_are_usage_errors(args, expect, capsys, monkeypatch):
    monkeypatch.chdir(GOLDEN)
    capsys.readouterr()
    code = main(["fit", "ok.ppl", "xy.csv", "--progress", "off"] + args)
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("ppl fit: error: ") and expect in err and err.count("\n") == 1, err


def test_python_spells_the_options_its_way():
    m = ppl.loads("data y: real[N]\nmu ~ normal(0, 1)\ny ~ normal(mu, 1)\n", "m.ppl")
    with pytest.raises(UsageError, match=r"batch_size= must be at least 1, got 0"):
        m.fit({"y": [1.0, 2.0]}, batch_size=0)
    with pytest.raises(UsageError, match=r"batch_size=3 is larger than the data: there are 2 rows"):
        m.fit({"y": [1.0, 2.0]}, batch_size=3)
    with pytest.raises(UsageError, match=r"batch_size= takes a whole number"):
        m.fit({"y": [1.0, 2.0]}, batch_size=1.5)
    with pytest.raises(UsageError, match=r"needs data with rows"):
        ppl.loads("mu ~ normal(0, 1)\n", "n.ppl").fit({}, batch_size=1)


# ---- fits -----------------------------------------------------------------------------------------
def test_logistic_regression_minibatch_agrees_with_the_full_batch_fit(tmp_path, monkeypatch):
    """... with its start (the mode search) on a subsample of 4,000 of the 20,000 rows."""
    monkeypatch.setattr(minibatch, "START_ROWS", 4000)
    rng = np.random.default_rng(11)
    N, D = 20_000, 5
    X = rng.normal(size=(N, D))
    y = (rng.random(N) < 1 / (1 + np.exp(-(0.3 + X @ (0.5 * rng.normal(size=D)))))).astype(int)
    data = {"X": X.tolist(), "y": y.tolist()}
    m = ppl.load(str(Path(__file__).parents[1] / "models" / "logistic.ppl"))
    full = m.fit(data, method="meanfield", optimizer="dadvi", draws=4000).summary()
    f = m.fit(data, method="meanfield", batch_size=256, epochs=12, draws=4000)
    s = f.summary()
    for k in full:
        assert abs(s[k]["mean"] - full[k]["mean"]) < 0.1 * full[k]["sd"], (k, s[k], full[k])
        assert abs(s[k]["sd"] / full[k]["sd"] - 1) < 0.12, (k, s[k], full[k])
    assert "minibatches of 256 of 20000 rows" in f.method_note
    assert f.init == "Laplace at the mode of 4000 random rows (scaled to 20000)"


def test_a_long_epoch_stops_inside_the_first_epoch_and_agrees_with_the_full_batch_fit(monkeypatch):
    """5,000 batches an epoch (200,000 rows, B = 40), every latent global: the convergence windows are
    100 steps inside the epoch, so the fit (its start on 3,000 rows, about 8 sds off) converges, decays
    and averages (at least AVG_STEPS) before the first epoch ends, and still agrees with the full-batch
    fit.  On windows of whole epochs it would run at least two epochs."""
    monkeypatch.setattr(minibatch, "START_ROWS", 3000)
    rng = np.random.default_rng(5)
    N, D, B = 200_000, 3, 40
    X = rng.normal(size=(N, D))
    y = (rng.random(N) < 1 / (1 + np.exp(-(0.3 + X @ np.array([0.5, -0.4, 0.2]))))).astype(int)
    data = {"X": X.tolist(), "y": y.tolist()}
    m = ppl.load(str(Path(__file__).parents[1] / "models" / "logistic.ppl"))
    full = m.fit(data, method="meanfield", optimizer="dadvi")
    f = m.fit(data, method="meanfield", batch_size=B)
    per_epoch = -(-N // B)
    assert minibatch.AVG_STEPS < f.steps < per_epoch, f.method_note
    assert f.converged
    # q's own moments (the summaries' draws would add their Monte Carlo error, ~0.05 sd at 4000 draws)
    with torch.no_grad():
        (m_full, v_full), (m_mb, v_mb) = q_moments(full.q.family)[:2], q_moments(f.q.family)[:2]
    sd_full, sd_mb = v_full.sqrt(), v_mb.sqrt()
    assert float(((m_mb - m_full) / sd_full).abs().max()) < 0.1, ((m_mb - m_full) / sd_full)
    assert float((sd_mb / sd_full - 1).abs().max()) < 0.1, sd_mb / sd_full
    assert f.init == "Laplace at the mode of 3000 random rows (scaled to 200000)"


def _meanfield_optimum(y, sy=0.5):
    """The exact mean-field optimum of LOCAL (closed-form expectations, L-BFGS): mu, log tau, z."""
    y = torch.tensor(y)
    N = len(y)
    p = torch.zeros(4 + 2 * N, dtype=DT, requires_grad=True)

    def elbo(p):
        a, lb, c, ld, m, ls = p[0], p[1], p[2], p[3], p[4:4 + N], p[4 + N:]
        b2, d2, s2 = torch.exp(2 * lb), torch.exp(2 * ld), torch.exp(2 * ls)
        e = -0.5 * (a * a + b2) / 25 - 0.5 * math.log(2 * math.pi * 25) - 0.5 * (c * c + d2) - 0.5 * math.log(2 * math.pi)
        e = e + (-c - 0.5 * torch.exp(-2 * c + 2 * d2) * ((m - a) ** 2 + s2 + b2)).sum() - 0.5 * N * math.log(2 * math.pi)
        e = e - 0.5 * ((y - m) ** 2 + s2).sum() / sy ** 2 - N * math.log(sy) - 0.5 * N * math.log(2 * math.pi)
        return e + lb + ld + ls.sum() + (N + 2) * 0.5 * (1 + math.log(2 * math.pi))

    from ppl.infer.optim import lbfgs
    x, _ = lbfgs(lambda q: -elbo(q), p.detach(), max_iter=3000, gtol=1e-9)
    return x, float(elbo(x))


def test_local_latent_per_row_minibatch_reaches_the_mean_field_optimum():
    """z[N] ~ normal(mu, tau), y ~ normal(z, 0.5): minibatches of 25 of 100 rows (per-row q for z)
    against the exact mean-field optimum, which the full-batch fit also reaches."""
    rng = np.random.default_rng(0)
    N = 100
    y = 1.0 + rng.normal(size=N) + 0.5 * rng.normal(size=N)
    opt, elbo_opt = _meanfield_optimum(y)
    f = ppl.loads(LOCAL, "local.ppl").fit({"y": y.tolist()}, method="meanfield", batch_size=25, epochs=150,
                                          init="zero", draws=4000)
    s = f.summary(corrected=False)            # q itself (against the mean-field optimum), not PSIS-weighted
    mu, lt = f.draws["mu"], np.log(f.draws["tau"])
    assert abs(mu.mean() - float(opt[0])) < 0.1 * math.exp(float(opt[1]))
    assert abs(lt.mean() - float(opt[2])) < 0.1 * math.exp(float(opt[3]))
    assert abs(mu.std() / math.exp(float(opt[1])) - 1) < 0.1 and abs(lt.std() / math.exp(float(opt[3])) - 1) < 0.1
    zm = np.array([s[f"z[{i + 1}]"]["mean"] for i in range(N)])
    zs = np.array([s[f"z[{i + 1}]"]["sd"] for i in range(N)])
    s_opt = np.exp(opt[4 + N:].numpy())
    assert np.max(np.abs(zm - opt[4:4 + N].numpy()) / s_opt) < 0.15
    assert np.max(np.abs(zs / s_opt - 1)) < 0.1
    # the reported ELBO is a pass over all rows with the final q: within its noise of the optimum
    assert elbo_opt - 1.0 < f.elbo < elbo_opt + 0.5
    assert "mean-field per row for 'z'" in f.method_note


def test_the_final_pass_gives_elbo_khat_and_weighted_draws(monkeypatch):
    """Where the final pass over all rows affords few draws (here 40), log p is known at those only:
    the ELBO, k-hat and the PSIS weights come from them, the 1000 reported draws are q's."""
    monkeypatch.setattr(minibatch, "PASS_BUDGET", 1)
    rng = np.random.default_rng(3)
    N = 3000
    X = rng.normal(size=(N, 3))
    y = (rng.random(N) < 1 / (1 + np.exp(-(X @ np.array([0.5, -0.3, 0.2]))))).astype(int)
    m = ppl.load(str(Path(__file__).parents[1] / "models" / "logistic.ppl"))
    f = m.fit({"X": X.tolist(), "y": y.tolist()}, batch_size=500, epochs=3, draws=1000)
    assert f.draws["beta"].shape == (1000, 3)
    assert f.q_draws.theta.shape[0] == len(f.q_draws.log_p) == len(f.weights) == minibatch.PASS_DRAWS
    assert np.isfinite(f.khat)
    lw = f.q_draws.log_p - f.q_draws.log_q
    assert f.elbo == pytest.approx(float(np.mean(lw)))
    # log p summed over chunks of rows (monkeypatched small: 7 chunks) is the full data's
    monkeypatch.setattr(minibatch, "CHUNK_ELEMENTS", 500 * 40)
    with torch.no_grad():
        full_lp = f.q.program.log_prob(f.q_draws.theta).numpy()
        np.testing.assert_allclose(minibatch.log_p_rows(f.q.program, f.q_draws.theta).numpy(), full_lp, rtol=1e-12)
    np.testing.assert_allclose(f.q_draws.log_p, full_lp, rtol=1e-12)
    # the same q's ELBO from the per-chunk pass with 2000 draws
    from ppl.infer.engine import VI
    from ppl.infer.objectives import OBJECTIVES
    vi = VI(f.q.program, f.q.family, OBJECTIVES["elbo"](f.config), {}, f.q.plan, f.config)
    torch.manual_seed(0)
    assert f.elbo == pytest.approx(minibatch.full_elbo(vi, 2000), abs=4 * float(np.std(lw)) / math.sqrt(40) + 1e-6)
    pytest.importorskip("matplotlib")
    from ppl.plots import marginals
    assert marginals(f)[:4] == b"\x89PNG"          # q's 1000 draws and the 40 weighted ones
