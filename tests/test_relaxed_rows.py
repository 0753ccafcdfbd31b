"""Relaxed discrete per-row latents under minibatches and encoders of categorical latents
(ppl/infer/relaxed_rows.py): the scaled relaxed objective against the full one (one batch of all
rows, to 1e-9) and against a hand-written one; an epoch of batches with a ragged last batch against
the full objective and gradient (globals, free logits, encoder weights and `param`s); the final pass
against the exact ELBO; the fitted responsibilities of a well-separated mixture against the exact
posterior's; auto's choice; the located and usage errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ppl
from ppl.backend.log_joint import LogJoint
from ppl.backend.runtime import Batch, Runtime
from ppl.cli import main
from ppl.config import FitConfig
from ppl.errors import UsageError
from ppl.infer.discrete import discrete_families
from ppl.infer.families import MeanField
from ppl.infer.laplace import cold_start
from ppl.infer.minibatch import Epochs
from ppl.infer.relaxed_rows import RelaxedRows, objective
from ppl.plan import plan

DT = torch.float64

MIX = """
data y: real[N]
K = 3
w = [0.2, 0.3, 0.5]
mu[K] ~ normal(0, 5)
z[N] ~ categorical(w)
y ~ normal(mu[z], 1)
"""

CODES = """
data x: int<lower=0, upper=1>[N, P]
K = 3
param W: real[K, P]
param b: real[P]
c[N] ~ categorical(ones(K) / K)
x ~ bernoulli_logit(W[c] + b)
amortize c from x hidden [5] activation tanh
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def _mixture_data(N, seed, means=(-4.0, 0.0, 4.0)):
    rng = np.random.default_rng(seed)
    z = rng.choice(3, size=N, p=[0.2, 0.3, 0.5])
    return np.asarray(means)[z] + rng.normal(size=N)


def _codes_data(N, P=6, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.random((3, P)) < 0.5
    c = rng.integers(0, 3, size=N)
    flip = rng.random((N, P)) < 0.1
    return (protos[c] ^ flip).astype(int)


def _family(src, data, B, seed=0):
    model = ppl.loads(src, "m.ppl").check(data)
    pl = plan(model, "relaxed")
    lj = LogJoint(model, pl, Runtime(dtype=DT))
    gen = torch.Generator().manual_seed(seed)
    fam = RelaxedRows(MeanField, cold_start(lj.dim, DT, False, "cold"), lj, gen, FitConfig(batch_size=B))
    disc = discrete_families(model, lj, pl, gen)
    with torch.no_grad():
        for q in disc.values():
            q.param.copy_(torch.randn(q.param.shape, generator=gen, dtype=DT))
    assert fam.adopt(disc) == {}
    with torch.no_grad():
        for p in lj.params.tensors():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    return model, lj, fam


def _noise(lj, fam, name, S, seed=3):
    relaxation = lj.relaxed[name][0]
    q = fam.qs[name]
    return relaxation.noise(q.param.shape, S, torch.Generator().manual_seed(seed), DT, torch.device("cpu"))


def test_one_batch_of_all_rows_is_the_full_objective_and_the_hand_written_one():
    y = _mixture_data(13, 0)
    model, lj, fam = _family(MIX, {"y": y.tolist()}, 13)
    S = 4
    theta = torch.randn(S, lj.dim, dtype=DT, generator=torch.Generator().manual_seed(1))
    ent = torch.tensor(0.7, dtype=DT)
    u = _noise(lj, fam, "z", S)
    for T in (0.5, None):                         # relaxed, and the discrete ELBO at the hard draws
        full = objective(fam, lj, theta, ent, T, None, {"z": u})[0]
        perm = torch.randperm(13, generator=torch.Generator().manual_seed(5))
        b = Batch.rows(lj.row_data, perm, 13)
        assert b.scale == 1.0
        one = objective(fam, lj, theta, ent, T, b, {"z": u[:, perm]})[0]
        one, full = one.detach(), full.detach()
        assert abs(float(one) - float(full)) < 1e-9 * max(1.0, abs(float(full))), (T, one, full)
    # by hand, at T = 0.5: mu[z] reads the relaxed one-hot; z's terms in closed form
    l = fam.tables["z"].table
    g = -torch.log(-torch.log(u))
    wts = torch.softmax((l + g) / 0.5, -1)                                 # (S, N, K)
    q = torch.softmax(l, -1)
    mu = theta                                                              # (S, K): real, no transform
    d = lj.relaxed["z"][0].draw(l, u, 0.5)
    d.q_logits = l
    lp = lj.evaluate(theta, {"z": d}, keep_factors=True).factors["mu"].reshape(S, -1).sum(-1)   # mu's prior
    assert torch.allclose(lp, torch.distributions.Normal(0.0, 5.0).log_prob(mu).sum(-1), atol=1e-6)
    m = (wts * mu[:, None, :]).sum(-1)
    lp = lp + torch.distributions.Normal(m, 1.0).log_prob(torch.as_tensor(y)).sum(-1)
    lw = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=DT))
    hand = lp.mean() + ent + (q * lw).sum() - (q * torch.log(q)).sum()
    full = objective(fam, lj, theta, ent, 0.5, None, {"z": u})[0]
    assert abs(float(full.detach()) - float(hand)) < 1e-9, (full, hand)


@pytest.mark.parametrize("which", ["free", "encoder"])
def test_an_epoch_with_a_ragged_last_batch_gives_the_full_objective_and_gradient(which):
    """Batches of 4, 4 and 3 of 11 rows on the same draws: the objectives weighted by B/N add up to the
    full one, and so do the gradients of every parameter the engine steps (globals, encoder weights,
    `param`s); each free row's logits gradient, weighted by B/N, is its gradient in the full objective."""
    N, S = 11, 3
    if which == "free":
        model, lj, fam = _family(MIX, {"y": _mixture_data(N, 2).tolist()}, 4)
        name = "z"
    else:
        model, lj, fam = _family(CODES, {"x": _codes_data(N).tolist()}, 4)
        name = "c"
    theta = torch.randn(S, lj.dim, dtype=DT, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    ent = torch.tensor(0.0, dtype=DT)
    u = _noise(lj, fam, name, S)
    params = [theta] + [p for e in fam.encoders.values() for p in e.parameters()] + lj.params.tensors()
    full, leaves, *_ = objective(fam, lj, theta, ent, 0.4, None, {name: u})
    grads_full = torch.autograd.grad(full, params + ([leaves[name]] if which == "free" else []),
                                     allow_unused=True)
    batches = list(Epochs(lj.row_data, N, 4, seed=0).epoch())
    assert [b.size for b in batches] == [4, 4, 3]
    total, acc = 0.0, [torch.zeros_like(p) for p in params]
    for b in batches:
        v, lb, *_ = objective(fam, lj, theta, ent, 0.4, b, {name: u[:, b.index]})
        gs = torch.autograd.grad(v, params + ([lb[name]] if which == "free" else []), allow_unused=True)
        w = b.size / N
        total += w * float(v.detach())
        for a, g in zip(acc, gs):
            if g is not None:
                a += w * g
        if which == "free":
            torch.testing.assert_close(gs[-1] * w, grads_full[-1][b.index], rtol=1e-10, atol=1e-12)
    assert total == pytest.approx(float(full), rel=1e-12)
    for a, g in zip(acc, grads_full):
        if g is not None:
            torch.testing.assert_close(a, g, rtol=1e-10, atol=1e-12)
    assert sum(float(g.abs().sum()) for g in grads_full[1:len(params)] if g is not None) > 0 or which == "free"


def test_the_final_pass_is_the_exact_elbo_of_q():
    """Known means: the ELBO of q is a finite sum over each row's K values; the final pass (exact draws
    of q, z's terms in closed form) estimates it."""
    src = "data y: real[N]\ndata mu: real[3]\nK = 3\nz[N] ~ categorical([0.2, 0.3, 0.5])\ny ~ normal(mu[z], 1)\n"
    y = _mixture_data(40, 4)
    model, lj, fam = _family(src, {"y": y.tolist(), "mu": [-4.0, 0.0, 4.0]}, 8)
    l = fam.tables["z"].table
    q = torch.softmax(l, -1)
    lpy = torch.distributions.Normal(torch.tensor([-4.0, 0.0, 4.0], dtype=DT), 1.0).log_prob(
        torch.as_tensor(y)[:, None])
    exact = float((q * (torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=DT)) + lpy - torch.log(q))).sum())
    est = fam.full_elbo(None, draws=4000)
    # the estimate's sd: the rows' data terms vary with their draw of z
    sd = float(torch.sqrt((q * lpy ** 2).sum(-1) - (q * lpy).sum(-1) ** 2).pow(2).sum().sqrt()) / math.sqrt(4000)
    assert abs(est - exact) < 4 * sd + 1e-9, (est, exact, sd)


def _exact_responsibilities(y, mu, w=(0.2, 0.3, 0.5)):
    """p(z_n = k | y, mu) averaged over the draws of mu (S, K)."""
    lp = np.log(w)[None, None, :] - 0.5 * (y[None, :, None] - mu[:, None, :]) ** 2
    lp -= lp.max(-1, keepdims=True)
    p = np.exp(lp)
    return (p / p.sum(-1, keepdims=True)).mean(0)


def test_fitted_responsibilities_of_a_mixture_under_minibatches_match_the_exact_ones():
    src = MIX.replace("mu[K] ~", "mu: ordered[K] ~")
    y = _mixture_data(150, 0, means=(-3.0, 0.0, 3.0))
    m = ppl.loads(src, "mix.ppl")
    exact = m.fit({"y": y.tolist()}, estimator="auto", seed=1, draws=400)
    assert "enumerate" in exact.estimator
    fit = m.fit({"y": y.tolist()}, estimator="relaxed", batch_size=32, seed=1, draws=400)
    assert "relaxed (z)" in fit.estimator and "minibatches of 32 of 150 rows" in fit.method_note
    q = torch.softmax(fit.q.discrete["z"].param.detach(), -1).numpy()
    r = _exact_responsibilities(y, exact.draws["mu"])
    err = np.abs(q - r)
    assert np.quantile(err.max(-1), 0.95) < 0.05 and err.max() < 0.12, np.sort(err.max(-1))[-8:]
    assert ((r.max(-1) > 0.2) & (r.max(-1) < 0.8)).sum() >= 5          # some rows are uncertain
    a, b = exact.summary(), fit.summary(corrected=False)
    for k in ("mu[1]", "mu[2]", "mu[3]"):
        assert abs(a[k]["mean"] - b[k]["mean"]) < 0.3 * a[k]["sd"] + 0.02, (k, a[k], b[k])
    # the reported ELBO is the discrete model's over all rows: below log p(y), near the enumerated fit's
    assert fit.elbo < exact.log_evidence + 0.5 and fit.elbo > exact.elbo - 0.02 * len(y), (fit.elbo, exact.elbo)
    assert set(np.unique(fit.draws["z"])) <= {1.0, 2.0, 3.0}


def test_an_encoder_of_a_categorical_code_fits_and_auto_says_it_relaxed():
    x = _codes_data(300, P=8, seed=1)
    m = ppl.loads(CODES, "codes.ppl")
    fit = m.fit({"x": x.tolist()}, batch_size=64, seed=2, draws=100, epochs=60)
    assert "relaxed (c)" in fit.estimator and "auto: relaxed for c (c: an encoder gives q's logits)" in fit.estimator
    assert "encoder c from x: MLP [5] tanh -> logits" in fit.method_note
    # exact log p(x) of the fitted decoder (a mixture of 3 product-Bernoullis): the ELBO is below it,
    # and close (the codes are well separated: q's posterior is almost exact)
    W, b = fit.params["W"], fit.params["b"]
    logit = W + b                                                     # (K, P)
    lpx = (x[:, None, :] * -np.logaddexp(0, -logit) + (1 - x[:, None, :]) * -np.logaddexp(0, logit)).sum(-1)
    log_px = float(np.sum(np.logaddexp.reduce(lpx + np.log(1 / 3), axis=1)))
    assert fit.elbo < log_px + 1.0 and fit.elbo > log_px - 0.05 * len(x), (fit.elbo, log_px)


# ---- errors -------------------------------------------------------------------------------------
def _cli(tmp_path, capsys, src, data, *args):
    (tmp_path / "m.ppl").write_text(src)
    import json
    (tmp_path / "d.json").write_text(json.dumps(data))
    length = ("--epochs", "2") if "--batch-size" in args else ("--steps", "20")
    code = main(["fit", str(tmp_path / "m.ppl"), str(tmp_path / "d.json"), *length, *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_an_encoder_of_a_global_discrete_latent_is_a_located_error(tmp_path, capsys):
    src = "data y: real[N]\nmu[2] ~ normal(0, 5)\ng ~ categorical([0.5, 0.5])\ny ~ normal(mu[g], 1)\n" \
          "amortize g from y hidden [4]\n"
    code, err = _cli(tmp_path, capsys, src, {"y": [0.1, 0.5, 2.0]})
    assert code != 0 and "m.ppl:5:10" in err and "global latent" in err and "^" in err


def test_a_linear_encoder_of_a_discrete_latent_is_a_located_error(tmp_path, capsys):
    src = "data y: real[N]\nmu[2] ~ normal(0, 5)\nz[N] ~ categorical([0.5, 0.5])\ny ~ normal(mu[z], 1)\n" \
          "amortize z from y linear\n"
    code, err = _cli(tmp_path, capsys, src, {"y": [0.1, 0.5, 2.0]})
    assert code != 0 and "m.ppl:5:" in err and "is discrete" in err and "linear" in err


def test_an_encoder_of_a_discrete_latent_that_cannot_be_relaxed_is_located_at_its_use(tmp_path, capsys):
    src = "data y: real[N]\nz[N] ~ categorical([0.5, 0.5])\ny ~ normal(z, 1)\namortize z from y hidden [4]\n"
    code, err = _cli(tmp_path, capsys, src, {"y": [0.1, 0.5, 2.0]})
    assert code != 0 and "m.ppl:3:12" in err and "cannot be relaxed" in err


def test_a_categorical_code_with_a_continuous_row_latent_is_refused_located(tmp_path, capsys):
    src = "data y: real[N]\nmu[2] ~ normal(0, 5)\nz[N] ~ categorical([0.5, 0.5])\nu[N] ~ normal(0, 1)\n" \
          "y ~ normal(mu[z] + u, 1)\n"
    code, err = _cli(tmp_path, capsys, src, {"y": [0.1, 0.5, 2.0, 3.0]}, "--batch-size", "2",
                     "--estimator", "relaxed")
    assert code == 2 and "m.ppl:4:1" in err and "not supported yet" in err and "'z'" in err


def test_a_global_relaxed_latent_under_batches_is_a_located_error(tmp_path, capsys):
    src = "data y: real[N]\nmu[2] ~ normal(0, 5)\ng ~ categorical([0.5, 0.5])\ny ~ normal(mu[g], 1)\n"
    code, err = _cli(tmp_path, capsys, src, {"y": [0.1, 0.5, 2.0]}, "--batch-size", "2", "--estimator", "relaxed")
    assert code == 2 and "m.ppl:3:1" in err and "global discrete latent" in err


def test_options_relaxed_rows_do_not_serve_are_usage_errors():
    m = ppl.loads(MIX, "mix.ppl")
    y = _mixture_data(20, 0).tolist()
    with pytest.raises(UsageError, match="holdout"):
        m.fit({"y": y}, estimator="relaxed", batch_size=5, holdout=0.2)
    with pytest.raises(UsageError, match="objective"):
        m.fit({"y": y}, estimator="relaxed", batch_size=5, objective="renyi")


def test_a_saved_fit_with_an_encoder_of_a_code_is_restored(tmp_path, capsys):
    """`--out`, then a command on the saved fit: the plan relaxes c again (auto) and q is every row's
    logits, the encoder's weights in place."""
    import json
    from ppl.saved import load_fit
    (tmp_path / "c.ppl").write_text(CODES)
    (tmp_path / "c.json").write_text(json.dumps({"x": _codes_data(60).tolist()}))
    out = tmp_path / "fit"
    assert main(["fit", str(tmp_path / "c.ppl"), str(tmp_path / "c.json"), "--batch-size", "16", "--epochs", "3",
                 "--draws", "50", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["draws", str(out), "--draws", "4"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("lp__,log_q__,c[1]") and len(text.splitlines()) == 5
    restored = load_fit(str(out))
    q = restored.q
    fam = q.family
    assert isinstance(fam, RelaxedRows) and "c" in fam.encoders
    x = torch.as_tensor(np.asarray(_codes_data(60)), dtype=DT).unsqueeze(0)
    torch.testing.assert_close(fam.encoders["c"]({"x": x}), q.discrete["c"].param.detach(), rtol=1e-9, atol=1e-9)
