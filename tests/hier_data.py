"""Seeded data for the hierarchical models with thousands of groups (pure numpy).

The one generator of these data sets: bench/data.py imports this module for its
`hier_*` models, and tests regenerate a fixture's data from the parameters and
seed stored in tests/data/hier/NAME.json:

    import hier_data
    fix = hier_data.load_fixture("hier_k1000")
    cols, true = hier_data.generate(**fix["generator"])     # bit-identical to bench/data/hier_k1000/data.csv
    hier_data.write_csv(path, cols)                          # the CSV `ppl fit` reads

Every real column is rounded to 9 significant digits (what the benchmark's
CSV holds), so the in-memory columns and the CSV carry the same numbers.
Groups are labelled "g00001".."g0K" (zero-padded: ppl's sorted string levels
are then the group numbers, so `z[k]` is group "g0..k").  About 20 rows per
group (at least one each: sizes 1 + multinomial), rows shuffled.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

SEED = 20261122
HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "data", "hier")

_HEAD = """\
data y: real[N]
data x: real[N]
data g: level[N] of K
"""

TEXTS = {
    # the model: non-centred varying intercepts
    "noncentred": "# varying intercepts, non-centred\n" + _HEAD + """
mu ~ normal(0, 5)
tau ~ half_normal(2)
z[K] ~ normal(0, 1)
b ~ normal(0, 5)
sigma ~ half_normal(2)
y ~ normal(mu + tau * z[g] + b * x, sigma)
""",
    "centred": "# varying intercepts, centred\n" + _HEAD + """
mu ~ normal(0, 5)
tau ~ half_normal(2)
a[K] ~ normal(mu, tau)
b ~ normal(0, 5)
sigma ~ half_normal(2)
y ~ normal(a[g] + b * x, sigma)
""",
    "slopes": "# varying intercepts and slopes, non-centred\n" + _HEAD + """
mu ~ normal(0, 5)
tau ~ half_normal(2)
z[K] ~ normal(0, 1)
b ~ normal(0, 5)
tau_b ~ half_normal(2)
zb[K] ~ normal(0, 1)
sigma ~ half_normal(2)
y ~ normal(mu + tau * z[g] + (b + tau_b * zb[g]) * x, sigma)
""",
    "poisson": """\
# varying intercepts, non-centred, Poisson outcome
data y: int<lower=0>[N]
data x: real[N]
data g: level[N] of K

mu ~ normal(0, 5)
tau ~ half_normal(2)
z[K] ~ normal(0, 1)
b ~ normal(0, 5)
y ~ poisson_log(mu + tau * z[g] + b * x)
""",
    "bernoulli": """\
# varying intercepts, non-centred, Bernoulli outcome
data y: int<lower=0, upper=1>[N]
data x: real[N]
data g: level[N] of K

mu ~ normal(0, 5)
tau ~ half_normal(2)
z[K] ~ normal(0, 1)
b ~ normal(0, 5)
y ~ bernoulli_logit(mu + tau * z[g] + b * x)
""",
}

# the true values of each family (group effects with sd 0.5 everywhere)
TRUE = {
    "noncentred": dict(mu=1.0, tau=0.5, b=0.7, sigma=1.0),
    "centred": dict(mu=1.0, tau=0.5, b=0.7, sigma=1.0),
    "slopes": dict(mu=1.0, tau=0.5, b=0.7, tau_b=0.3, sigma=1.0),
    "poisson": dict(mu=0.5, tau=0.5, b=0.3),
    "bernoulli": dict(mu=-0.3, tau=0.5, b=0.8),
}

# benchmark model name -> the generator's arguments (each its own fixed seed stream)
SPECS = {
    "hier_k1000": dict(family="noncentred", K=1000, rows_per_group=20, seed=[SEED, 101]),
    "hier_k10000": dict(family="noncentred", K=10000, rows_per_group=20, seed=[SEED, 102]),
    "hier_centred_k1000": dict(family="centred", K=1000, rows_per_group=20, seed=[SEED, 103]),
    "hier_slopes_k1000": dict(family="slopes", K=1000, rows_per_group=20, seed=[SEED, 104]),
    "hier_poisson_k1000": dict(family="poisson", K=1000, rows_per_group=20, seed=[SEED, 105]),
    "hier_bernoulli_k1000": dict(family="bernoulli", K=1000, rows_per_group=20, seed=[SEED, 106]),
}

# the group-level latents of each family (the rest are the "globals")
LOCALS = {"noncentred": ("z",), "centred": ("a",), "slopes": ("z", "zb"), "poisson": ("z",), "bernoulli": ("z",)}


def _csv_round(v):
    """float64 values rounded to 9 significant digits, exactly as '%.9g' writes and reads them back."""
    return np.asarray(np.char.mod("%.9g", v), dtype=np.float64)


def labels(K):
    width = max(5, len(str(K)))
    return np.array([f"g{k + 1:0{width}d}" for k in range(K)], dtype=object)


def generate(family, K, rows_per_group=20, seed=(SEED, 101)):
    """({'y', 'x', 'g'} columns, true values) of one data set; a pure function of the arguments."""
    if family not in TEXTS:
        raise ValueError(f"unknown family {family!r}")
    rng = np.random.default_rng(list(seed))
    t = TRUE[family]
    n = K * rows_per_group
    sizes = 1 + rng.multinomial(n - K, np.full(K, 1.0 / K))
    g = np.repeat(np.arange(K), sizes)
    x = _csv_round(rng.normal(0.0, 1.0, n))
    z = rng.normal(0.0, 1.0, K)
    eta = t["mu"] + t["tau"] * z[g] + t["b"] * x
    if family == "slopes":
        zb = rng.normal(0.0, 1.0, K)
        eta = eta + t["tau_b"] * zb[g] * x
    if family == "poisson":
        y = rng.poisson(np.exp(eta)).astype(np.int64)
    elif family == "bernoulli":
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-eta))).astype(np.int64)
    else:
        y = _csv_round(rng.normal(eta, t["sigma"]))
    perm = rng.permutation(n)
    cols = {"y": y[perm], "x": x[perm], "g": labels(K)[g[perm]]}
    true = dict(t, N=n, K=K, group_sd_sample=float(np.std(t["tau"] * z)))
    return cols, true


def model_text(family):
    return TEXTS[family]


def data_sha256(cols):
    """A digest of the columns' exact contents (float64/int64 bytes, labels joined by newlines)."""
    h = hashlib.sha256()
    for name in ("y", "x"):
        a = cols[name]
        a = a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a.astype(np.float64)
        h.update(name.encode() + a.tobytes())
    h.update(b"g" + "\n".join(cols["g"].tolist()).encode())
    return h.hexdigest()


def write_csv(path, cols, step=50_000, names=("y", "x", "g")):
    """The columns `names` (y,x,g by default) with reals as '%.9g' (what they already are) and integers as
    integers."""
    names = list(names)
    n = len(cols[names[0]])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(",".join(names) + "\n")
        for i in range(0, n, step):
            parts = []
            for nm in names:
                c = cols[nm][i:i + step]
                if c.dtype == object:
                    parts.append(np.asarray(c, dtype=str))
                elif np.issubdtype(c.dtype, np.integer):
                    parts.append(c.astype(str))
                else:
                    parts.append(np.char.mod("%.9g", c))
            rows = parts[0]
            for p in parts[1:]:
                rows = np.char.add(np.char.add(rows, ","), p)
            f.write("\n".join(rows.tolist()) + "\n")
    os.replace(tmp, path)


def load_fixture(name):
    with open(os.path.join(FIXTURES, f"{name}.json")) as f:
        return json.load(f)
