"""models/ppca.ppl — probabilistic PCA with a linear Gaussian encoder, against Tipping & Bishop's
closed-form maximum-likelihood solution (1999): the noise variance is the mean of the P - K
smallest eigenvalues of the sample covariance, W spans the top-K eigenvectors, and with an exact
q(z_n | y_n) the ELBO at the optimum is the log-likelihood there.  Fitted with and without
minibatches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ppl

MODELS = Path(__file__).resolve().parents[1] / "models"


def closed_form(y: np.ndarray, K: int):
    N, P = y.shape
    S = np.cov(y.T, bias=True)
    ev, U = np.linalg.eigh(S)
    ev, U = ev[::-1], U[:, ::-1]
    s2 = ev[K:].mean()
    W = U[:, :K] * np.sqrt(ev[:K] - s2)
    C = W @ W.T + s2 * np.eye(P)
    ll = -N / 2 * (P * np.log(2 * np.pi) + np.linalg.slogdet(C)[1] + np.trace(np.linalg.solve(C, S)))
    return s2, U[:, :K], ll


def principal_angles(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Degrees between the column spans of A and B."""
    qa, _ = np.linalg.qr(A)
    qb, _ = np.linalg.qr(B)
    return np.degrees(np.arccos(np.clip(np.linalg.svd(qa.T @ qb)[1], -1.0, 1.0)))


@pytest.mark.parametrize("options", [dict(steps=400, lr=1.0), dict(batch_size=100, epochs=60, lr=1.0)],
                         ids=["full", "minibatch"])
def test_ppca_reaches_the_closed_form_maximum_likelihood_solution(options):
    y = np.loadtxt(MODELS / "ppca.csv", delimiter=",", skiprows=1)
    s2, U, ll = closed_form(y, 2)
    fit = ppl.load(str(MODELS / "ppca.ppl")).fit(str(MODELS / "ppca.csv"), seed=0, **options)
    W, s = fit.params["W"], float(fit.params["s"])
    assert s * s == pytest.approx(s2, rel=0.05)
    assert principal_angles(W.T, U).max() < 5.0
    assert abs(fit.elbo - ll) < 0.005 * abs(ll)
    assert np.allclose(fit.params["m"], y.mean(0), atol=0.05)
    # (measured: sigma^2 within 0.05% / 0.4%, angles below 0.04 degrees, the ELBO within 1e-5 relative)


def test_ppca_encoder_is_the_exact_posterior_of_each_row():
    y = np.loadtxt(MODELS / "ppca.csv", delimiter=",", skiprows=1)[:5]
    fit = ppl.load(str(MODELS / "ppca.ppl")).fit(str(MODELS / "ppca.csv"), seed=0, steps=400, lr=1.0)
    W, m, s = fit.params["W"], fit.params["m"], float(fit.params["s"])
    # z_n | y_n ~ N(M^-1 W (y_n - m) / s^2, M^-1), M = I + W W^T / s^2 (W is K x P here)
    M = np.eye(2) + W @ W.T / s ** 2
    mean = np.linalg.solve(M, W @ (y - m).T / s ** 2).T
    e = fit.encode({"y": y.tolist()})["z"]
    sd = np.sqrt(np.diag(np.linalg.inv(M)))
    assert np.allclose(e["mean"], mean, atol=0.01 * sd.min())
    assert np.allclose(e["sd"], np.broadcast_to(sd, e["sd"].shape), rtol=0.01)



@pytest.mark.parametrize("options, draws", [(dict(batch_size=100, epochs=60), 2),
                                            (dict(batch_size=100, epochs=60, mc_samples=1), 1),
                                            (dict(steps=400), 2)],
                         ids=["pair", "one-draw", "full-pair"])
def test_ppca_with_an_encoders_few_draws_a_row_reaches_the_closed_form_noise_variance(options, draws):
    # an encoder fit without global latents draws an antithetic pair of z's a row a step for a linear
    # encoder (one for an MLP's), not 16; `mc_samples=1`: exactly one
    y = np.loadtxt(MODELS / "ppca.csv", delimiter=",", skiprows=1)
    s2, U, _ = closed_form(y, 2)
    fit = ppl.load(str(MODELS / "ppca.ppl")).fit(str(MODELS / "ppca.csv"), seed=1, lr=1.0, **options)
    assert fit.mc_samples == draws
    s = float(fit.params["s"])
    assert s * s == pytest.approx(s2, rel=0.05)
    assert principal_angles(fit.params["W"].T, U).max() < 5.0


def test_an_encoder_fit_with_few_draws_keeps_the_default_step_size():
    # the default step shrinks by sqrt(S / 16) with fewer draws, but not where the encoder's draws
    # follow the rows (Family.lr_follows_draws)
    fit = ppl.load(str(MODELS / "ppca.ppl")).fit(str(MODELS / "ppca.csv"), seed=0, batch_size=100, epochs=1)
    assert fit.mc_samples == 2 and fit.lr == pytest.approx(0.1)
