"""ppl.structure: the posterior's coupling structure, checked against the dense Hessian.

On small instances, every non-zero entry of the Hessian of `lj.log_prob` (at random points)
must be allowed by the structure (no coupling between two different groups), and on the
hierarchical arrow models the structure must be tight (one small group per level).  The
shipped models and the reference models (shared/reference) must be covered correctly too.
At 10,000 groups the analysis is fast and allocates nothing quadratic in dim."""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch

import ppl
from ppl.backend.log_joint import LogJoint
from ppl.plan import plan as make_plan
from ppl.structure import Structure, structure

from conftest import MODEL_NAMES, REFERENCE, model_paths, reference_names

HEAD = "data y: real[N]\ndata x: real[N]\ndata g: level[N] of K\n"
COUNTS = "data n: int<lower=0>[N]\ndata x: real[N]\ndata g: level[N] of K\n"
BINARY = "data d: int<lower=0, upper=1>[N]\ndata x: real[N]\ndata g: level[N] of K\n"
NONCENTRED = HEAD + """mu ~ normal(0, 5)
tau ~ half_normal(2)
z[K] ~ normal(0, 1)
b ~ normal(0, 5)
sigma ~ half_normal(2)
y ~ normal(mu + tau * z[g] + b * x, sigma)
"""
CENTRED = HEAD + """mu ~ normal(0, 5)
tau ~ half_normal(2)
a[K] ~ normal(mu, tau)
b ~ normal(0, 5)
sigma ~ half_normal(2)
y ~ normal(a[g] + b * x, sigma)
"""
SLOPES = HEAD + """mu_a ~ normal(0, 5)
s_a ~ half_normal(2)
mu_c ~ normal(0, 5)
s_c ~ half_normal(2)
a[K] ~ normal(mu_a, s_a)
c[K] ~ normal(mu_c, s_c)
sigma ~ half_normal(2)
y ~ normal(a[g] + c[g] * x, sigma)
"""
POISSON = COUNTS + """mu ~ normal(0, 2)
tau ~ half_normal(1)
z[K] ~ normal(0, 1)
n ~ poisson_log(mu + tau * z[g])
"""
BERNOULLI = BINARY + """mu ~ normal(0, 2)
tau ~ half_normal(1)
z[K] ~ normal(0, 1)
b ~ normal(0, 1)
d ~ bernoulli_logit(mu + tau * z[g] + b * x)
"""
REGRESSION = """data y: real[N]
data X: real[N, D]
beta[D] ~ normal(0, 1)
sigma ~ half_normal(2)
y ~ normal(X @ beta, sigma)
"""
CROSSED = """data y: real[N]
data g1: level[N] of K1
data g2: level[N] of K2
s1 ~ half_normal(1)
s2 ~ half_normal(1)
u[K1] ~ normal(0, s1)
v[K2] ~ normal(0, s2)
sigma ~ half_normal(1)
y ~ normal(u[g1] + v[g2], sigma)
"""

# arrow models: (text, data kind, expected group size b, expected number of globals)
ARROWS = {
    "noncentred": (NONCENTRED, "y", 1, 4),
    "centred": (CENTRED, "y", 1, 4),
    "slopes": (SLOPES, "y", 2, 5),
    "poisson": (POISSON, "n", 1, 2),
    "bernoulli": (BERNOULLI, "d", 1, 3),
}


def grouped_data(rng, K: int, per_group: int, outcome: str = "y") -> dict:
    N = K * per_group
    g = np.repeat(np.arange(1, K + 1), per_group)
    rng.shuffle(g)
    data = {"g": g.tolist(), "x": rng.normal(size=N).tolist(), "K": K}
    if outcome == "y":
        data["y"] = rng.normal(size=N).tolist()
    elif outcome == "n":
        data["n"] = rng.poisson(3.0, size=N).tolist()
    else:
        data["d"] = rng.integers(0, 2, size=N).tolist()
    return data


def build(text: str, data, estimator: str = "auto"):
    model = ppl.loads(text, "m.ppl").check(data)
    p = make_plan(model, estimator)
    lj = LogJoint(model, p)
    return model, p, lj


def analyse(text: str, data, **kw):
    model, p, lj = build(text, data)
    return lj, structure(model, p, lj.blocks, lj.dim, **kw)


def hessian(lj: LogJoint, theta: torch.Tensor) -> np.ndarray:
    return torch.autograd.functional.hessian(lambda t: lj.log_prob(t[None])[0], theta).numpy()


def forbidden(lj: LogJoint, s: Structure, points: int = 3, seed: int = 0, scale: float = 0.5):
    """Entries (i, j) with |H_ij| > 1e-10 that the structure says are zero, at `points` random points."""
    idx = np.arange(lj.dim)
    allowed = s.allowed(idx[:, None], idx[None, :])
    gen = torch.Generator().manual_seed(seed)
    bad = set()
    for _ in range(points):
        theta = torch.randn(lj.dim, generator=gen, dtype=torch.float64) * scale
        H = hessian(lj, theta)
        assert np.all(np.isfinite(H))
        bad |= {tuple(x) for x in np.argwhere((np.abs(H) > 1e-10) & ~allowed)}
    return sorted(bad)


def well_formed(s: Structure, dim: int):
    assert s.dim == dim
    seen = np.concatenate([s.globals] + [b.reshape(-1) for b in s.buckets])
    assert np.array_equal(np.sort(seen), np.arange(dim)), "every coordinate exactly once"
    assert all(b.ndim == 2 and b.shape[0] > 0 for b in s.buckets)
    assert len({b.shape[1] for b in s.buckets}) == len(s.buckets), "one bucket per group size"
    if s.buckets:
        assert s.groups is s.buckets[0]
    else:
        assert s.groups.shape == (0, 0)


# ---- the arrow: correct and tight -------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ARROWS))
@pytest.mark.parametrize("K", [4, 6])
def test_arrow_models_are_tight_and_correct(name, K):
    text, outcome, b, G = ARROWS[name]
    rng = np.random.default_rng(K)
    lj, s = analyse(text, grouped_data(rng, K, 3, outcome))
    well_formed(s, lj.dim)
    assert s.groups.shape == (K, b), s.describe()
    assert len(s.buckets) == 1
    assert s.globals.size == G, s.describe()
    assert forbidden(lj, s) == []
    # every group is one level: its coordinates are element k of each group-level block
    offsets = sorted({blk.offset for blk in lj.blocks if blk.shape == (K,)})
    assert s.groups.tolist() == [[o + k for o in offsets] for k in range(K)]


def test_the_hessian_check_sees_couplings():
    """A structure that ignores the globals is caught: the test above has teeth."""
    lj, s = analyse(NONCENTRED, grouped_data(np.random.default_rng(1), 4, 3))
    wrong = Structure(lj.dim, np.arange(lj.dim)[:, None], (np.arange(lj.dim)[:, None],), np.zeros(0, np.int64))
    assert forbidden(lj, wrong, points=1)


def test_vector_coefficient_is_global():
    rng = np.random.default_rng(2)
    N, D = 12, 3
    lj, s = analyse(REGRESSION, {"y": rng.normal(size=N).tolist(), "X": rng.normal(size=(N, D)).tolist()})
    well_formed(s, lj.dim)
    assert s.groups.shape[0] == 0 and s.globals.size == lj.dim == D + 1
    assert forbidden(lj, s) == []


@pytest.mark.parametrize("K1,K2,max_group", [(4, 3, 32), (5, 4, 32), (12, 3, 8), (6, 6, 4)])
def test_crossed_effects_are_correct(K1, K2, max_group):
    rng = np.random.default_rng(K1 * 10 + K2)
    N = 30
    data = {"y": rng.normal(size=N).tolist(), "g1": rng.integers(1, K1 + 1, N).tolist(),
            "g2": rng.integers(1, K2 + 1, N).tolist(), "K1": K1, "K2": K2}
    lj, s = analyse(CROSSED, data, max_group=max_group)
    well_formed(s, lj.dim)
    assert all(b.shape[1] <= max_group for b in s.buckets)
    assert forbidden(lj, s) == []


def test_crossed_effects_split_off_the_smaller_factor():
    """Too large to merge: the factor with fewer levels goes global, the other stays local."""
    rng = np.random.default_rng(7)
    K1, K2, N = 40, 3, 200
    data = {"y": rng.normal(size=N).tolist(), "g1": rng.integers(1, K1 + 1, N).tolist(),
            "g2": rng.integers(1, K2 + 1, N).tolist(), "K1": K1, "K2": K2}
    lj, s = analyse(CROSSED, data)
    well_formed(s, lj.dim)
    v = next(b for b in lj.blocks if b.name == "v")
    assert set(range(v.offset, v.offset + v.size)) <= set(s.globals.tolist())
    assert s.groups.shape == (K1, 1)
    assert forbidden(lj, s, points=1) == []


# ---- more shapes of models: correctness ------------------------------------------------------
OTHERS = {
    "nested": ("""data y: real[N]
data g: level[N] of K
data state: int[K]
t ~ half_normal(1)
s[3] ~ normal(0, 1)
a[K] ~ normal(s[state], t)
sigma ~ half_normal(1)
y ~ normal(a[g], sigma)
""", {"state": [1, 1, 2, 2, 3, 3]}),
    "varying_scale": (HEAD + """mu ~ normal(0, 1)
sg[K] ~ half_normal(1)
a[K] ~ normal(0, 1)
y ~ normal(mu + a[g], sg[g])
""", {}),
    "deterministics_softmax_cumsum": (HEAD + """w[K] ~ normal(0, 1)
p = softmax(w)
c = cumsum(exp(w))
e[K] ~ normal(0, 1)
r = e * 2 + log(p) + c
sigma ~ half_normal(1)
y ~ normal(r[g] + sum(e) / 10, sigma)
""", {}),
    "literal_gathers_and_vector": (HEAD + """beta[3] ~ normal(0, 1)
z[K] ~ normal(0, 1)
sigma ~ half_normal(1)
v = [beta[1], beta[2] * 2]
y ~ normal(beta[1] + beta[3] * x + z[g] * v[2], sigma)
""", {}),
    "bounds_vary": (HEAD + """lo ~ normal(0, 1)
a: real<lower=lo>[K] ~ normal(0, 3)
sigma ~ half_normal(1)
y ~ normal(a[g], sigma)
""", {}),
    "simplex_ordered": (HEAD + """w ~ dirichlet(ones(K))
m: ordered[K] ~ normal(0, 3)
z[K] ~ normal(0, 1)
sigma ~ half_normal(1)
y ~ normal(m[g] + z[g] + log(w[g]), sigma)
""", {}),
    "matrix_latent": ("""data y: real[N]
data X: real[N, D]
data g: level[N] of K
B[D, K] ~ normal(0, 1)
sigma ~ half_normal(1)
M = X @ B
y ~ normal(M[1, g] + rep(x0, N), sigma)
x0 ~ normal(0, 1)
""", {"X": "matrix"}),
    "enumerated_mixture": ("""data y: real[N]
w ~ dirichlet(ones(2))
mu: ordered[2] ~ normal(0, 5)
sigma[2] ~ half_normal(2)
z[N] ~ categorical(w)
y ~ normal(mu[z], sigma[z])
""", {"plain": True}),
    "score_path_poisson": ("""data y: real[N]
data g: level[N] of K
lam ~ gamma(2, 1)
a[K] ~ normal(0, 1)
k[N] ~ poisson(lam)
y ~ normal(a[g] + k / 100, 1)
""", {}),
    "flat_and_interval": (HEAD + """beta: real[2]
s: real<lower=0, upper=5>
z[K] ~ normal(0, s)
y ~ normal(beta[1] + beta[2] * x + z[g], 1)
""", {}),
    "multi_normal": ("""data y: real[N]
data g: level[N] of K
data S: real[2, 2]
m[2] ~ normal(0, 1)
ab[K, 2] ~ multi_normal(m, S)
y ~ normal(ab[g, 1] + ab[g, 2], 1)
""", {"S": [[1.0, 0.3], [0.3, 1.0]]}),
    "enumerated_local": (HEAD + """d ~ normal(0, 1)
s ~ half_normal(1)
a[K] ~ normal(0, 1)
z[N] ~ bernoulli(0.3)
y ~ normal(a[g] + z * d, s)
""", {}),
    "enumerated_scalar": (HEAD + """a[K] ~ normal(0, 1)
z ~ bernoulli(0.5)
y ~ normal(a[g] + z, 1)
""", {}),
    "pairs": ("""data w: level[N] of K
data l: level[N] of K
data y: int<lower=0, upper=1>[N]
a[K] ~ normal(0, 1)
y ~ bernoulli_logit(a[w] - a[l])
""", {"pairs": True}),
}


def _other_data(name, extra, rng, K=6, per_group=3):
    data = grouped_data(rng, K, per_group)
    N = len(data["y"])
    if extra.get("plain"):
        return {"y": data["y"]}
    if extra.get("pairs"):
        return {"w": rng.integers(1, K + 1, N).tolist(), "l": rng.integers(1, K + 1, N).tolist(), "K": K,
                "y": rng.integers(0, 2, N).tolist()}
    if extra.get("X") == "matrix":
        data = {"y": data["y"], "g": data["g"], "K": K, "X": rng.normal(size=(N, 2)).tolist()}
        return data
    data.update(extra)
    return data


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_other_models_are_correct(name):
    text, extra = OTHERS[name]
    # (a count latent lined up with its factors is summed over a window: the score path is asked for)
    model, p, lj = build(text, _other_data(name, extra, np.random.default_rng(3)),
                         "score" if name.startswith("score_path") else "auto")
    s = structure(model, p, lj.blocks, lj.dim)
    well_formed(s, lj.dim)
    assert bool(lj.score) == name.startswith("score_path")
    if lj.score:                         # score-path discrete latents: their values are given
        z = {n: torch.ones((1,) + tuple(model.nodes[n].shape), dtype=torch.float64) * 100 for n in lj.score}
        idx = np.arange(lj.dim)
        allowed = s.allowed(idx[:, None], idx[None, :])
        theta = torch.randn(lj.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5
        H = torch.autograd.functional.hessian(lambda t: lj.log_prob(t[None], z)[0], theta).numpy()
        assert not np.argwhere((np.abs(H) > 1e-10) & ~allowed).tolist()
        return
    assert forbidden(lj, s) == []


def test_nested_levels_keep_counties_local():
    """a[K] ~ normal(s[state], t): each state with its counties is one small group."""
    text, extra = OTHERS["nested"]
    model, p, lj = build(text, _other_data("nested", extra, np.random.default_rng(3)))
    s = structure(model, p, lj.blocks, lj.dim)
    assert s.groups.shape == (3, 3)            # s[j] with its two counties a[k]
    assert forbidden(lj, s) == []


def test_enumerated_latents_couple_what_they_sum_over():
    """A vector latent summed out row by row keeps the groups; a scalar one joins everything it
    touches (one group while small, globals when too large)."""
    rng = np.random.default_rng(5)
    model, p, lj = build(OTHERS["enumerated_local"][0], grouped_data(rng, 6, 3))
    assert p["z"].estimator == "enumerate"
    s = structure(model, p, lj.blocks, lj.dim)
    assert s.groups.shape == (6, 1) and s.globals.size == 2
    model, p, lj = build(OTHERS["enumerated_scalar"][0], grouped_data(rng, 6, 3))
    assert p["z"].estimator == "enumerate"
    s = structure(model, p, lj.blocks, lj.dim)
    assert s.groups.shape == (1, 6)
    assert forbidden(lj, s) == []
    s = structure(model, p, lj.blocks, lj.dim, max_group=4)
    assert s.groups.shape[0] == 0 and s.globals.size == 6


def test_a_component_of_one_block_too_large_goes_global():
    """Paired comparisons a[w] - a[l]: one block coupled every which way."""
    text, extra = OTHERS["pairs"]
    model, p, lj = build(text, _other_data("pairs", extra, np.random.default_rng(3), K=12, per_group=4))
    s = structure(model, p, lj.blocks, lj.dim, max_group=6)
    well_formed(s, lj.dim)
    assert forbidden(lj, s, points=1) == []
    assert s.groups.shape[0] == 0 and s.globals.size == 12
    s = structure(model, p, lj.blocks, lj.dim)
    assert s.groups.shape == (1, 12) and s.globals.size == 0
    assert forbidden(lj, s, points=1) == []
    with pytest.raises(ValueError):
        structure(model, p, lj.blocks, lj.dim, max_group=0)


# ---- the shipped models and the reference posteriors -------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shipped_models_are_correct(name):
    path, csv = model_paths(name)
    model = ppl.load(path).check(csv)
    p = make_plan(model)
    lj = LogJoint(model, p)
    s = structure(model, p, lj.blocks, lj.dim)
    well_formed(s, lj.dim)
    assert forbidden(lj, s, points=2) == []
    if name == "radon":
        K = model.dims["K"]
        assert s.groups.shape == (K, 1) and s.globals.size == 4
    if name == "eight_schools":
        assert s.groups.shape == (8, 1) and s.globals.size == 2


@pytest.mark.skipif(not reference_names(), reason=f"no reference posteriors at {REFERENCE}")
@pytest.mark.parametrize("name", reference_names())
def test_reference_models_are_correct(name):
    d = REFERENCE / name
    model = ppl.load(str(d / "model.ppl")).check([str(d / "data.csv"), str(d / "scalars.json")])
    p = make_plan(model)
    lj = LogJoint(model, p)
    s = structure(model, p, lj.blocks, lj.dim)
    well_formed(s, lj.dim)
    assert forbidden(lj, s, points=2, scale=0.1) == []


# ---- scale -----------------------------------------------------------------------------------
def test_ten_thousand_groups_fast_and_small():
    rng = np.random.default_rng(11)
    K, N = 10_000, 200_000
    g = np.concatenate([np.arange(1, K + 1), rng.integers(1, K + 1, N - K)])
    data = {"g": g, "x": rng.normal(size=N), "y": rng.normal(size=N), "K": K}
    model = ppl.loads(NONCENTRED, "m.ppl").check(data)
    p = make_plan(model)
    lj = LogJoint(model, p)
    structure(model, p, lj.blocks, lj.dim)               # warm (imports)
    t0 = time.perf_counter()
    s = structure(model, p, lj.blocks, lj.dim)
    elapsed = time.perf_counter() - t0
    assert s.groups.shape == (K, 1) and s.globals.size == 4
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    tracemalloc.start()
    try:
        structure(model, p, lj.blocks, lj.dim)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < lj.dim ** 2 * 8 / 50, f"peak {peak / 1e6:.1f} MB for dim {lj.dim}"
