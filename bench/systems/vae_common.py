"""Shared by the hand-written VAE baselines of bench/vae.py (plain torch and Pyro): the digits CSV, the
held-out split `ppl fit --holdout F` makes, models/vae.ppl's architecture as nn.Modules, ppl's step-size
schedule and the held-out ELBO per row computed as ppl computes it.  Imports only numpy and torch (it
runs under ppl's interpreter and under the peers' venv).

models/vae.ppl, as ppl fits it (ppl/infer/amortized.py, ppl/backend/params.py):
- decoder: z (L=2) -> Linear(2, 128) -> relu -> Linear(128, 64) -> Bernoulli logits; prior N(0, I);
  weights start Glorot-normal N(0, 2 / (fan_in + fan_out)), biases 0 (ppl's `param` start);
- encoder (`amortize z from x hidden [128] activation relu`): the inputs standardised by the training
  rows' column means and sds (sd 0 -> 1); h = relu(Linear(64, 128)) with He-normal weights and zero
  bias; mean = Linear([h, x] -> 2) (a linear skip from the inputs), log sd = Linear(h -> 2).  ppl starts
  the mean head by least squares on its Laplace start and the log-sd head's bias at the start's log
  sds; here both heads start at 0 (q = the prior), the one difference in the start.
- held-out rows: ppl's split_holdout: np.random.default_rng(seed + 7).permutation(N), the first
  round(F N) (at least 1, at most N - 1) held out, both sets in file order.
- held-out ELBO per row (amortized.heldout_elbo): 200 draws of z_n ~ q(z_n | x_n) per row, the mean
  over draws and rows of log p(x_n | z) + log N(z; 0, I) - log q(z | x_n).
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch import nn

HELDOUT_DRAWS = 200       # ppl's heldout_elbo default
LATENT = 2
HIDDEN = 128


def load_digits_csv(path: str) -> np.ndarray:
    """The px1..px64 columns of models/digits.py's CSV -> (N, 64) float64 array of 0/1."""
    with open(path) as f:
        header = f.readline().strip().split(",")
    cols = [i for i, h in enumerate(header) if h.startswith("px")]
    return np.loadtxt(path, delimiter=",", skiprows=1, usecols=cols, dtype=np.float64)


def split_holdout(N: int, fraction: float, seed: int):
    """ppl's rule (ppl/infer/amortized.py split_holdout) -> (train rows, held-out rows), sorted."""
    n_out = min(N - 1, max(1, int(round(fraction * N))))
    perm = np.random.default_rng(int(seed) + 7).permutation(N)
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


def ppl_lr(t: int, lr0: float) -> float:
    """ppl's Adam schedule (engine.sqrt_decay): lr0 / sqrt(1 + t / 100) at step t (0-based)."""
    return lr0 / math.sqrt(1.0 + t / 100.0)


# ppl's default for this model: Adam step 0.1 (16 MC samples, a Laplace start), times 0.1 for the
# encoder's weights (ENCODER_LR_SCALE) and for the `param`s (PARAM_LR_SCALE)
PPL_WEIGHT_LR = 0.01


class Decoder(nn.Module):
    def __init__(self, P: int, gen: torch.Generator):
        super().__init__()
        self.l1, self.l2 = nn.Linear(LATENT, HIDDEN), nn.Linear(HIDDEN, P)
        with torch.no_grad():
            for lin in (self.l1, self.l2):
                fan_out, fan_in = lin.weight.shape
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * math.sqrt(2.0 / (fan_in + fan_out)))
                lin.bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(z)))             # Bernoulli logits


class Encoder(nn.Module):
    def __init__(self, P: int, gen: torch.Generator):
        super().__init__()
        self.hid = nn.Linear(P, HIDDEN)
        self.mean = nn.Linear(HIDDEN + P, LATENT)
        self.log_sd = nn.Linear(HIDDEN, LATENT)
        with torch.no_grad():
            self.hid.weight.copy_(torch.randn(self.hid.weight.shape, generator=gen) * math.sqrt(2.0 / P))
            for p in (self.hid.bias, self.mean.weight, self.mean.bias, self.log_sd.weight, self.log_sd.bias):
                p.zero_()

    def forward(self, x: torch.Tensor):
        """x standardised (B, P) -> (mean (B, L), log sd (B, L))."""
        h = torch.relu(self.hid(x))
        return self.mean(torch.cat([h, x], 1)), self.log_sd(h)


class Data:
    """The training and held-out rows as tensors, the encoder's standardised inputs alongside."""

    def __init__(self, path: str, holdout: float, seed: int, dtype=torch.float64):
        X = load_digits_csv(path)
        tr, ho = split_holdout(X.shape[0], holdout, seed)
        self.x = torch.as_tensor(X[tr], dtype=dtype)
        self.x_held = torch.as_tensor(X[ho], dtype=dtype)
        mean = self.x.mean(0)
        sd = self.x.std(0, correction=0)          # ppl's standardisation (amortized.standard_sd)
        sd = torch.where(sd > 0, torch.maximum(sd, 0.25 * sd[sd > 0].median()), torch.ones_like(sd))
        self.xs = (self.x - mean) / sd
        self.xs_held = (self.x_held - mean) / sd
        self.N, self.P = self.x.shape


_LOG2PI = math.log(2 * math.pi)


def row_elbo_terms(enc: Encoder, dec: Decoder, x: torch.Tensor, xs: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """eps (S, B, L) -> (S, B): log p(x_n | z) + log N(z; 0, I) - log q(z | x_n) at z = mu + sd eps."""
    mu, log_sd = enc(xs)
    z = mu + eps * torch.exp(log_sd)
    logits = dec(z)
    log_lik = -nn.functional.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    log_prior = (-0.5 * z * z - 0.5 * _LOG2PI).sum(-1)
    log_q = (-0.5 * eps * eps - 0.5 * _LOG2PI - log_sd).sum(-1)
    return log_lik + log_prior - log_q


@torch.no_grad()
def heldout_elbo(enc: Encoder, dec: Decoder, data: Data, seed: int, draws: int = HELDOUT_DRAWS) -> float:
    g = torch.Generator().manual_seed(int(seed) + 211)
    eps = torch.randn((draws, data.x_held.shape[0], LATENT), generator=g, dtype=data.x_held.dtype)
    return float(row_elbo_terms(enc, dec, data.x_held, data.xs_held, eps).mean())


def arguments(extra=()) -> argparse.Namespace:
    """The baselines' command line (`extra`: (flag, kwargs) pairs of their own), with one thread and
    the chosen default dtype set."""
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    for flag, kw in extra:
        ap.add_argument(flag, **kw)
    ap.add_argument("--lr0", type=float, default=PPL_WEIGHT_LR)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--dtype", default="float64")
    a = ap.parse_args()
    torch.set_num_threads(1)
    a.torch_dtype = getattr(torch, a.dtype)
    torch.set_default_dtype(a.torch_dtype)
    return a
