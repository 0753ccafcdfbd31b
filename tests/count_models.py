"""The count-latent models, their data generators and exact posteriors (numpy only): tests/test_windows.py and
the benchmark bench/counts/run.py use them.

Every model is a function of its data; each returns {flattened name: (mean, sd)} computed by summing the
counts over a range that holds all but < 1e-14 of the mass, and integrating the continuous latents on a
fine grid where there are any (a 1-D grid of 4,000 points, or 2-D 600 x 600 for the zero-inflated model).
"""
from __future__ import annotations

import math

import numpy as np
from math import lgamma

MODELS = {
    "thin": """data y: int<lower=0>[N]
n[N] ~ poisson(20)
y ~ binomial(n, 0.3)
""",
    "rate": """data y: int<lower=0>[N]
lam ~ gamma(3, 0.1)
n[N] ~ poisson(lam)
y ~ binomial(n, 0.5)
""",
    "noisy": """data y: real[N]
n[N] ~ poisson(20)
y ~ normal(n, 2)
""",
    "zip": """data y: int<lower=0>[N]
theta ~ beta(1, 1)
lam ~ gamma(2, 0.2)
z[N] ~ bernoulli(theta)          # 1: a structural zero
n[N] ~ poisson(lam)              # the count, hidden under a structural zero
y ~ binomial(n, 1 - z)           # y = n, or 0 when z = 1
""",
}


def simulate(name: str, N: int, seed: int):
    rng = np.random.default_rng(seed)
    if name == "thin":
        return {"y": rng.binomial(rng.poisson(20, N), 0.3).tolist()}
    if name == "rate":
        lam = rng.gamma(3, 1 / 0.1)
        return {"y": rng.binomial(rng.poisson(lam, N), 0.5).tolist()}
    if name == "noisy":
        return {"y": np.round(rng.poisson(20, N) + rng.normal(0, 2, N), 3).tolist()}
    if name == "zip":
        z = rng.random(N) < 0.3
        return {"y": np.where(z, 0, rng.poisson(2.5, N)).tolist()}
    raise KeyError(name)


def _lpois(k, lam):
    k = np.asarray(k, dtype=float)
    return k * np.log(lam) - lam - np.vectorize(lgamma)(k + 1)


def _lbinom(y, n, p):
    n = np.asarray(n, dtype=float)
    y = np.asarray(y, dtype=float)
    out = np.full(np.broadcast(y, n).shape, -np.inf)
    ok = n >= y
    lg = np.vectorize(lgamma)
    nn, yy = np.broadcast_to(n, out.shape), np.broadcast_to(y, out.shape)
    out[ok] = (lg(nn[ok] + 1) - lg(yy[ok] + 1) - lg(nn[ok] - yy[ok] + 1)
               + yy[ok] * math.log(p) + (nn[ok] - yy[ok]) * math.log1p(-p))
    return out


def _moments(logw, values):
    w = np.exp(logw - logw.max())
    w /= w.sum()
    m = float((w * values).sum())
    return m, float(math.sqrt(max((w * (values - m) ** 2).sum(), 0.0)))


def exact(name: str, data) -> dict:
    y = np.asarray(data["y"], dtype=float)
    out = {}
    if name == "thin":                                  # n = y + Poisson(20 * 0.7)
        for i, yi in enumerate(y):
            out[f"n[{i + 1}]"] = (yi + 14.0, math.sqrt(14.0))
        return out
    if name == "noisy":
        k = np.arange(0, 200)
        for i, yi in enumerate(y):
            lw = _lpois(k, 20.0) - 0.5 * ((yi - k) / 2.0) ** 2
            out[f"n[{i + 1}]"] = _moments(lw, k)
        return out
    if name == "rate":                                  # lam | y ~ gamma(3 + sum y, 0.1 + N / 2)
        a, b = 3 + y.sum(), 0.1 + 0.5 * len(y)
        m, v = a / b, a / b ** 2
        out["lam"] = (m, math.sqrt(v))
        for i, yi in enumerate(y):                      # n = y + Poisson(lam / 2)
            out[f"n[{i + 1}]"] = (yi + m / 2, math.sqrt(m / 2 + v / 4))
        return out
    if name == "zip":
        th = (np.arange(600) + 0.5) / 600
        lam = np.linspace(1e-3, 30, 1200)
        T, L = np.meshgrid(th, lam, indexing="ij")
        zero = y == 0
        logp = (2 - 1) * np.log(L) - 0.2 * L              # gamma(2, 0.2) prior, beta(1, 1) flat
        p0 = np.log(T + (1 - T) * np.exp(-L))             # y = 0
        logp = logp + zero.sum() * p0
        for yi in y[~zero]:
            logp = logp + np.log1p(-T) + _lpois(yi, L)
        w = np.exp(logp - logp.max())
        w /= w.sum()
        mt = (w * T).sum()
        ml = (w * L).sum()
        out["theta"] = (mt, math.sqrt((w * (T - mt) ** 2).sum()))
        out["lam"] = (ml, math.sqrt((w * (L - ml) ** 2).sum()))
        pz = T / (T + (1 - T) * np.exp(-L))               # P(z = 1 | y = 0, theta, lam)
        ez, ez2 = (w * pz).sum(), (w * pz).sum()
        en = (w * pz * L).sum()                           # n | z=1 ~ Poisson(lam); z=0: n = 0
        en2 = (w * pz * (L + L * L)).sum()
        for i, yi in enumerate(y):
            if yi == 0:
                out[f"z[{i + 1}]"] = (ez, math.sqrt(max(ez2 - ez * ez, 0.0)))
                out[f"n[{i + 1}]"] = (en, math.sqrt(max(en2 - en * en, 0.0)))
            else:
                out[f"z[{i + 1}]"] = (0.0, 0.0)
                out[f"n[{i + 1}]"] = (yi, 0.0)
        return out
    raise KeyError(name)
