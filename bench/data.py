"""Seeded data generators for the benchmark models.

    python bench/data.py [--only NAME[,NAME...]] [--force]

writes, for each benchmark model NAME, the directory bench/data/NAME/ with
  model.ppl    the ppl model (the same model every system fits)
  data.csv     its data (columns by name, as `ppl fit` reads them)
  data.json    scalars and the true parameters (not read by any system's fit)
Everything is a pure function of the fixed seed below, so the files are the
same on every machine; existing files are kept unless --force (or the
generator's version changes).  bench/data/ is git-ignored.

Models (MODELS below):
  eight_schools   Rubin (1981) real data, J=8, non-centered
  logistic        N=5,000, D=10, bernoulli_logit
  radon           varying intercepts, K=85 counties with string labels, N=919
  linreg_1e4/1e5/1e6   linear regression, D=20, N=10^4, 10^5, 10^6
  mixture         2-component normal mixture, per-row assignments z[N] (N=1,000)
  hier_k1000, hier_k10000        the non-centred varying-intercepts model with K=1,000 / 10,000 groups
                                 ("g00017"-style labels, ~20 rows a group, group sd 0.5): N=20,000 / 200,000
  hier_centred_k1000, hier_slopes_k1000, hier_poisson_k1000, hier_bernoulli_k1000
                                 K=1,000 variants: centred, varying slopes, Poisson and Bernoulli outcomes
The hier_* data and model texts come from tests/hier_data.py (shared with the
tests' fixtures in tests/data/hier/, which regenerate the same data bit for
bit); each has its own fixed seed stream there, independent of this file's
model order.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import hier_data  # noqa: E402  (tests/hier_data.py: the hier_* generators, shared with the test fixtures)

DATA = os.path.join(HERE, "data")
SEED = 20261122
VERSION = 2

EIGHT_SCHOOLS = """\
# eight schools, non-centered (Rubin 1981)
data y: real[J]
data sigma: real<lower=0>[J]

mu ~ normal(0, 5)
tau ~ half_cauchy(5)
theta_raw[J] ~ normal(0, 1)
theta = mu + tau * theta_raw
y ~ normal(theta, sigma)
"""

LOGISTIC = """\
# logistic regression, N=5,000, D=10
data X: real[N, D] from "x*"
data y: int<lower=0, upper=1>[N]

alpha ~ normal(0, 2.5)
beta[D] ~ normal(0, 2.5)
y ~ bernoulli_logit(alpha + X @ beta)
"""

RADON = """\
# radon-like varying intercepts: K=85 counties (string labels), N=919
data log_radon: real[N]
data floor: real[N]
data county: level[N] of K

mu_a ~ normal(0, 10)
sigma_a ~ half_normal(5)
a[K] ~ normal(mu_a, sigma_a)
b ~ normal(0, 10)
sigma_y ~ half_normal(5)
log_radon ~ normal(a[county] + b * floor, sigma_y)
"""

LINREG = """\
# linear regression, D=20
data X: real[N, D] from "x*"
data y: real[N]

alpha ~ normal(0, 10)
beta[D] ~ normal(0, 10)
sigma ~ half_normal(5)
y ~ normal(alpha + X @ beta, sigma)
"""

MIXTURE = """\
# two-component normal mixture with a per-row assignment z (summed out exactly)
data y: real[N]
K = 2
w ~ dirichlet(ones(K))
mu: ordered[K] ~ normal(0, 10)
sigma[K] ~ half_normal(2)
z[N] ~ categorical(w)
y ~ normal(mu[z], sigma[z])
"""

# syllables for made-up county names (strings, unsorted in the file, some sharing prefixes)
_SYL = ["ait", "kin", "an", "oka", "beck", "er", "bel", "tra", "mi", "ben", "ton", "blue", "earth", "brown",
        "carl", "car", "ver", "cass", "chip", "pe", "wa", "chi", "sa", "go", "clay", "clear", "wa", "ter",
        "cook", "cot", "ton", "wood", "crow", "wing", "da", "ko", "dodge", "doug", "las", "fa", "ri", "bault"]


def _county_names(rng, k):
    names = set()
    while len(names) < k:
        n = "".join(rng.choice(_SYL) for _ in range(rng.integers(2, 4)))
        name = n.capitalize() + (" " + rng.choice(["Lake", "River", "Falls"]) if rng.random() < 0.15 else "")
        names.add(name)
    return sorted(names)


def gen_eight_schools(rng):
    y = [28, 8, -3, 7, -1, 1, 18, 12]
    sigma = [15, 10, 16, 11, 9, 11, 10, 18]
    cols = {"y": np.array(y, float), "sigma": np.array(sigma, float)}
    return EIGHT_SCHOOLS, cols, {"J": 8}


def gen_logistic(rng, n=5000, d=10):
    X = rng.normal(size=(n, d))
    alpha = 0.3
    beta = rng.normal(0, 0.7, d)
    p = 1 / (1 + np.exp(-(alpha + X @ beta)))
    y = (rng.random(n) < p).astype(int)
    cols = {"y": y}
    for j in range(d):
        cols[f"x{j + 1}"] = X[:, j]
    return LOGISTIC, cols, {"N": n, "D": d, "true": {"alpha": alpha, "beta": beta.tolist()}}


def gen_radon(rng, n=919, k=85):
    names = _county_names(rng, k)
    # uneven group sizes like Minnesota's (1 to ~100 houses a county): every county at least one row
    w = rng.lognormal(0, 1.2, k)
    sizes = 1 + rng.multinomial(n - k, w / w.sum())
    mu_a, sigma_a, b, sigma_y = 1.4, 0.33, -0.65, 0.76
    a = rng.normal(mu_a, sigma_a, k)
    county = np.repeat(np.arange(k), sizes)
    floor = (rng.random(n) < 0.17).astype(float)
    log_radon = rng.normal(a[county] + b * floor, sigma_y)
    perm = rng.permutation(n)
    cols = {"log_radon": log_radon[perm], "floor": floor[perm],
            "county": np.array(names, dtype=object)[county[perm]]}
    return RADON, cols, {"N": n, "K": k, "true": {"mu_a": mu_a, "sigma_a": sigma_a, "b": b, "sigma_y": sigma_y}}


def gen_linreg(rng, n, d=20):
    X = rng.normal(size=(n, d))
    alpha, sigma = 1.0, 1.5
    beta = rng.normal(0, 1, d)
    y = alpha + X @ beta + rng.normal(0, sigma, n)
    cols = {"y": y}
    for j in range(d):
        cols[f"x{j + 1}"] = X[:, j]
    return LINREG, cols, {"N": n, "D": d, "true": {"alpha": alpha, "beta": beta.tolist(), "sigma": sigma}}


def gen_mixture(rng, n=1000):
    w1 = 0.35
    z = rng.random(n) < w1
    y = np.where(z, rng.normal(-2.0, 0.7, n), rng.normal(2.5, 1.0, n))
    return MIXTURE, {"y": y}, {"N": n, "true": {"w": [w1, 1 - w1], "mu": [-2.0, 2.5], "sigma": [0.7, 1.0]}}


def gen_hier(name):
    """A hier_* model: (model text, columns, meta), from tests/hier_data.py with the model's own seed."""
    spec = hier_data.SPECS[name]
    cols, true = hier_data.generate(**spec)
    meta = {"N": true["N"], "K": true["K"], "family": spec["family"], "generator": spec,
            "data_sha256": hier_data.data_sha256(cols),
            "true": {k: v for k, v in true.items() if k not in ("N", "K")}}
    return hier_data.model_text(spec["family"]), cols, meta


HIER_MODELS = list(hier_data.SPECS)

MODELS = {
    "eight_schools": gen_eight_schools,
    "logistic": gen_logistic,
    "radon": gen_radon,
    "mixture": gen_mixture,
    "linreg_1e4": lambda rng: gen_linreg(rng, 10_000),
    "linreg_1e5": lambda rng: gen_linreg(rng, 100_000),
    "linreg_1e6": lambda rng: gen_linreg(rng, 1_000_000),
    # the hier_* models ignore the per-model stream: each has a fixed seed of its own in tests/hier_data.py
    **{name: (lambda rng, name=name: gen_hier(name)) for name in HIER_MODELS},
}


def _write_csv(path, cols):
    """Every column, reals with 9 significant digits (every system reads the same CSV, so what it holds
    is the data): the writer of tests/hier_data.py."""
    hier_data.write_csv(path, cols, names=list(cols))


def paths(name):
    d = os.path.join(DATA, name)
    return d, os.path.join(d, "model.ppl"), os.path.join(d, "data.csv"), os.path.join(d, "data.json")


def ensure(name, force=False, quiet=False):
    """Write bench/data/NAME/ unless it is there at the current VERSION; returns the directory."""
    d, model_p, csv_p, json_p = paths(name)
    if not force and os.path.exists(json_p) and os.path.exists(csv_p):
        try:
            with open(json_p) as f:
                if json.load(f).get("_version") == VERSION:
                    return d
        except (OSError, ValueError):
            pass
    os.makedirs(d, exist_ok=True)
    # one stream per model, so adding a model never changes another's data
    rng = np.random.default_rng([SEED, list(MODELS).index(name)])
    src, cols, meta = MODELS[name](rng)
    with open(model_p, "w") as f:
        f.write(src)
    _write_csv(csv_p, cols)
    meta = dict(meta, _version=VERSION, _seed=SEED, model=name)
    with open(json_p, "w") as f:
        json.dump(meta, f, indent=1)
    if not quiet:
        print(f"wrote {os.path.relpath(d)} ({os.path.getsize(csv_p) / 1e6:.1f} MB csv)", file=sys.stderr)
    return d


def load(name):
    """(columns dict of numpy arrays, meta dict) of a generated model, read back from its CSV/JSON."""
    d, _, csv_p, json_p = paths(name)
    with open(json_p) as f:
        meta = json.load(f)
    with open(csv_p) as f:
        header = f.readline().strip().split(",")
    if name == "radon":
        raw = np.loadtxt(csv_p, delimiter=",", skiprows=1, dtype=str)
        cols = {"log_radon": raw[:, 0].astype(float), "floor": raw[:, 1].astype(float), "county": raw[:, 2]}
    elif name in HIER_MODELS:
        raw = np.loadtxt(csv_p, delimiter=",", skiprows=1, dtype=str)
        y = raw[:, 0].astype(np.int64) if meta["family"] in ("poisson", "bernoulli") else raw[:, 0].astype(float)
        cols = {"y": y, "x": raw[:, 1].astype(float), "g": raw[:, 2]}
    else:
        arr = np.loadtxt(csv_p, delimiter=",", skiprows=1, ndmin=2)
        cols = {h: arr[:, j] for j, h in enumerate(header)}
    return cols, meta


def arrays(name):
    """Model-ready arrays shared by the hand-written systems: X, y, county index (0-based), ..."""
    cols, meta = load(name)
    if name == "eight_schools":
        return {"y": cols["y"], "sigma": cols["sigma"]}
    if name == "radon":
        labels = sorted(set(cols["county"].tolist()))          # ppl: distinct string labels sorted -> 1..K
        index = {s: i for i, s in enumerate(labels)}
        return {"log_radon": cols["log_radon"], "floor": cols["floor"],
                "county": np.array([index[s] for s in cols["county"]], dtype=np.int64), "K": len(labels)}
    if name == "mixture":
        return {"y": cols["y"]}
    if name in HIER_MODELS:
        labels = sorted(set(cols["g"].tolist()))               # ppl: distinct string labels sorted -> 1..K
        index = {s: i for i, s in enumerate(labels)}
        return {"y": cols["y"], "x": cols["x"], "g": np.array([index[s] for s in cols["g"]], dtype=np.int64),
                "K": len(labels), "family": meta["family"]}
    xs = sorted((h for h in cols if h.startswith("x")), key=lambda h: int(h[1:]))
    return {"X": np.stack([cols[h] for h in xs], 1), "y": cols["y"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated model names (default: all)")
    ap.add_argument("--force", action="store_true", help="rewrite even if present")
    a = ap.parse_args(argv)
    names = a.only.split(",") if a.only else list(MODELS)
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n!r} (models: {', '.join(MODELS)})")
        ensure(n, a.force)


if __name__ == "__main__":
    main()
