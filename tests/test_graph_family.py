"""The `graph` family (ppl.infer.graph_family): a Gaussian with the arrow precision of a hierarchy.
Against the dense Gaussian with the same precision: log q, entropy, samples and marginal sds; its start
from an arrow Hessian computed by a few Hessian-vector products equals the dense Hessian's blocks; the
block moment matching of the fixed draws."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ppl.infer.families import FAMILIES, Preconditioner
from ppl.infer.graph_family import GraphGaussian, arrow_hessian

DT = torch.float64


def _structure(J=5, b=2, G=3, shuffle=True, seed=0):
    """J groups of b coordinates and G globals, scattered over theta's coordinates."""
    dim = J * b + G
    order = np.random.default_rng(seed).permutation(dim) if shuffle else np.arange(dim)
    groups = order[: J * b].reshape(J, b)
    return SimpleNamespace(dim=dim, groups=groups, buckets=(groups,), globals=order[J * b:])


def _random_family(st, seed=1):
    pre = Preconditioner(torch.randn(st.dim, dtype=DT, generator=torch.Generator().manual_seed(seed)),
                         0.5 + torch.rand(st.dim, dtype=DT, generator=torch.Generator().manual_seed(seed + 1)))
    fam = GraphGaussian(pre, torch.Generator().manual_seed(seed + 2), None, st)
    with torch.no_grad():
        fam.flat.copy_(0.4 * torch.randn(fam.flat.shape, dtype=DT, generator=torch.Generator().manual_seed(seed + 3)))
    return fam


def _dense_precision(fam, st) -> torch.Tensor:
    """L L^T assembled densely, in u coordinates (theta's order: L is triangular only in the arrow's)."""
    views = fam._raw
    locs, cpls, Lg = fam._parts(views)
    L = torch.zeros(st.dim, st.dim, dtype=DT)
    g = torch.as_tensor(st.globals)
    L[g[:, None], g[None, :]] = Lg
    for idx, Ll, Lc in zip(fam.buckets, locs, cpls):
        for j in range(idx.shape[0]):
            L[idx[j][:, None], idx[j][None, :]] = Ll[j]
            L[g[:, None], idx[j][None, :]] = Lc[j]
    return L @ L.T, L


def test_registered_and_needs_structure():
    assert FAMILIES["graph"] is GraphGaussian and GraphGaussian.needs_structure


def test_equals_the_dense_gaussian_with_the_same_precision():
    st = _structure()
    fam = _random_family(st)
    P, _ = _dense_precision(fam, st)
    cov = torch.linalg.inv(P)
    m = fam._raw["m"]
    dense = torch.distributions.MultivariateNormal(m, covariance_matrix=cov)
    u = dense.sample((50,))
    torch.testing.assert_close(fam.log_q_u(u).detach(), dense.log_prob(u), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fam.entropy_u().detach(), dense.entropy(), rtol=1e-12, atol=1e-12)
    mean, sd = fam.mean_scale_u()
    torch.testing.assert_close(sd, torch.sqrt(torch.diagonal(cov)), rtol=1e-10, atol=1e-12)
    # samples at a fixed seed: u = m + L^-T eps, the same as a dense solve
    eps = torch.randn(7, st.dim, dtype=DT, generator=torch.Generator().manual_seed(9))
    _, L = _dense_precision(fam, st)
    want = m + torch.linalg.solve(L.T, eps.T).T       # L is triangular in the arrow's order, not theta's
    torch.testing.assert_close(fam.u_from_eps(eps).detach(), want, rtol=1e-10, atol=1e-10)
    fam.gen.manual_seed(9)
    torch.testing.assert_close(fam.rsample_u(7).detach(), want, rtol=1e-10, atol=1e-10)
    # and theta's log density includes the preconditioner's Jacobian
    theta = fam.pre.to_theta(u)
    torch.testing.assert_close(fam.log_q(theta).detach(), dense.log_prob(u) - torch.log(fam.pre.A).sum())


def test_groups_of_size_one_and_no_globals():
    for J, b, G in ((6, 1, 2), (4, 3, 0), (0, 0, 4)):
        st = _structure(J, b, G) if J else SimpleNamespace(dim=G, groups=np.zeros((0, 0), int), buckets=(),
                                                           globals=np.arange(G))
        fam = _random_family(st, seed=J + b + G)
        P, _ = _dense_precision(fam, st)
        dense = torch.distributions.MultivariateNormal(fam._raw["m"], precision_matrix=P)
        u = dense.sample((20,))
        torch.testing.assert_close(fam.log_q_u(u).detach(), dense.log_prob(u), rtol=1e-10, atol=1e-10)
        _, L = _dense_precision(fam, st)
        eps = torch.randn(5, st.dim, dtype=DT, generator=torch.Generator().manual_seed(2))
        want = fam._raw["m"] + torch.linalg.solve(L.T, eps.T).T
        torch.testing.assert_close(fam.u_from_eps(eps).detach(), want, rtol=1e-10, atol=1e-10)
        _, sd = fam.mean_scale_u()
        torch.testing.assert_close(sd, torch.sqrt(torch.diagonal(torch.linalg.inv(P))), rtol=1e-10, atol=1e-12)


def test_start_from_an_arrow_precision_is_exact():
    """arrow_hessian (b + G Hessian-vector products) gives the dense Hessian's blocks, and the family
    built from them has exactly that precision."""
    st = _structure(J=6, b=2, G=3, seed=4)
    rng = np.random.default_rng(5)
    P = np.zeros((st.dim, st.dim))
    g = st.globals
    A = rng.normal(size=(len(g), len(g)))
    P[np.ix_(g, g)] = A @ A.T + 10 * np.eye(len(g))
    for j in range(6):
        idx = st.groups[j]
        B = rng.normal(size=(2, 2))
        P[np.ix_(idx, idx)] = B @ B.T + 2 * np.eye(2)
        C = 0.3 * rng.normal(size=(2, len(g)))
        P[np.ix_(idx, g)] = C
        P[np.ix_(g, idx)] = C.T
    Pt = torch.as_tensor(P)

    def hvp(x, v):      # Hessian of log p = -0.5 x^T P x is -P
        return -(Pt @ v)
    arrow = arrow_hessian(hvp, torch.zeros(st.dim, dtype=DT), st.buckets, st.globals)
    torch.testing.assert_close(arrow.dense(st.dim, st.buckets, st.globals), Pt)
    pre = Preconditioner(torch.zeros(st.dim, dtype=DT), torch.ones(st.dim, dtype=DT))
    fam = GraphGaussian(pre, torch.Generator().manual_seed(0), None, st, precision=arrow)
    P_fam, _ = _dense_precision(fam, st)
    torch.testing.assert_close(P_fam, Pt, rtol=1e-10, atol=1e-10)


def test_fixed_draws_are_moment_matched_by_blocks():
    st = _structure(J=200, b=2, G=4, seed=6)
    fam = _random_family(st)
    eps = fam.fixed_eps(24, torch.Generator().manual_seed(3))
    assert eps.shape == (24, st.dim)
    g = torch.as_tensor(st.globals)
    for j in (0, 57, 199):
        idx = torch.as_tensor(np.concatenate([st.groups[j], st.globals]))
        e = eps[:, idx]
        torch.testing.assert_close(e.mean(0), torch.zeros(len(idx), dtype=DT), atol=1e-12, rtol=0)
        torch.testing.assert_close(e.T @ e / 24, torch.eye(len(idx), dtype=DT), atol=1e-10, rtol=0)
    assert eps[:, g].shape[1] == 4


HIER = """
data y: real[N]
data x: real[N]
data g: level[N] of K
mu ~ normal(0, 5)
tau ~ half_normal(2)
z[K] ~ normal(0, 1)
b ~ normal(0, 5)
sigma ~ half_normal(2)
y ~ normal(mu + tau * z[g] + b * x, sigma)
"""


def _hier_data(K=12, per=15, seed=0):
    rng = np.random.default_rng(seed)
    N = K * per
    g = rng.integers(0, K, N)
    x = rng.normal(size=N)
    y = 1.0 + rng.normal(0, 0.5, K)[g] + 0.7 * x + rng.normal(size=N)
    return {"y": y.tolist(), "x": x.tolist(), "g": [f"g{v:03d}" for v in g]}


# NumPyro 0.22 NUTS on _hier_data() (float64, 2,000 warm-up + 20,000 draws, target accept 0.95): mean, sd
NUTS_12 = {"mu": (0.9000, 0.2206), "tau": (0.6796, 0.1970), "b": (0.7407, 0.0747), "sigma": (0.9924, 0.0547),
           "z[1]": (-1.2134, 0.5108)}


def test_graph_fit_against_nuts_and_fullrank_on_a_small_hierarchy():
    """12 groups: tau's posterior is wide and skewed.  The graph family's globals' covariance is the
    Laplace-marginal one (ppl/infer/marginal.py), and its sd of tau is far closer to NUTS's than the
    full-rank Gaussian's ELBO optimum (0.107 against 0.197: a Gaussian VI shrinks it)."""
    import ppl
    m = ppl.loads(HIER, "hier.ppl")
    data = _hier_data()
    a = m.fit(data, method="graph", seed=1, draws=20000)
    b = m.fit(data, method="fullrank", seed=1, draws=20000)
    assert a.method == "graph" and a.optimizer == "dadvi"
    sa, sb = a.summary(corrected=False), b.summary(corrected=False)     # q's own, not PSIS-weighted
    for k, (mean, sd) in NUTS_12.items():
        assert abs(sa[k]["mean"] - mean) < 0.15 * sd, (k, sa[k])
        assert abs(sa[k]["sd"] / sd - 1) < 0.15, (k, sa[k])
    assert abs(sa["tau"]["sd"] / NUTS_12["tau"][1] - 1) < 0.5 * abs(sb["tau"]["sd"] / NUTS_12["tau"][1] - 1)
    assert a.elbo > b.elbo - 1.0          # and its ELBO is within a nat of the full-rank optimum
