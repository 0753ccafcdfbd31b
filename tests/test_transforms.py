"""Unconstraining transforms (ppl.backend.transforms): for every constraint kind
in the registry and every continuous distribution support, log|det J| equals
log|det| of autograd's Jacobian (in reduced coordinates for the
dimension-changing maps), inverse(forward(x)) == x, and the image lies in the
set (ordered vectors increase, simplexes sum to one, ...)."""
from __future__ import annotations

import math

import pytest
import torch

from ppl import distributions as DS
from ppl.backend import dists as D
from ppl.backend.transforms import CONSTRAINTS, OrderedTransform, bijection, sum_event, unconstrained_shape

DT = torch.float64

# bounds for the kinds that need them: (lo, hi), scalars and per-element vectors
LO_VEC = torch.tensor([-1.0, 0.5, 2.0, -3.0], dtype=DT)
HI_VEC = torch.tensor([0.0, 4.0, 2.5, 7.0], dtype=DT)
BOUNDS = {
    "lower": [(torch.tensor(1.5, dtype=DT), None), (LO_VEC, None)],
    "upper": [(None, torch.tensor(-2.0, dtype=DT)), (None, HI_VEC)],
    "interval": [(torch.tensor(-1.0, dtype=DT), torch.tensor(3.0, dtype=DT)), (LO_VEC, HI_VEC)],
}
# constrained value shape per kind (one draw)
SHAPES = {"simplex": (4,), "corr_cholesky": (4, 4), "ordered": (5,)}
DEFAULT_SHAPE = (4,)


def _cases():
    for kind in CONSTRAINTS:
        for lo, hi in BOUNDS.get(kind, [(None, None)]):
            tag = kind if lo is None and hi is None else \
                f"{kind}-{'vec' if (lo if lo is not None else hi).dim() else 'scalar'}"
            yield pytest.param(kind, lo, hi, id=tag)


CASES = list(_cases())


def _reduce(kind: str, y: torch.Tensor) -> torch.Tensor:
    """Constrained value (one draw) -> its free coordinates."""
    if kind == "simplex":
        return y[..., :-1]                                 # the last coordinate is 1 - sum of the rest
    if kind == "corr_cholesky":
        K = y.shape[-1]
        i, j = torch.tril_indices(K, K, offset=-1)
        return y[..., i, j]                                # the strictly lower triangle
    return y.reshape(-1)


def _unconstrained(kind, lo, hi, S=3, seed=0):
    t = bijection(kind, lo, hi)
    shape = SHAPES.get(kind, DEFAULT_SHAPE)
    ushape = tuple(t.inverse_shape(torch.Size(shape)))
    g = torch.Generator().manual_seed(seed)
    x = 0.8 * torch.randn((S,) + ushape, generator=g, dtype=DT)
    return t, x, shape


def test_registry_covers_every_continuous_support():
    """log_joint maps a distribution's support straight to a CONSTRAINTS kind."""
    for spec in DS.REGISTRY.values():
        if not spec.discrete:
            assert spec.support in CONSTRAINTS, spec.name


def test_registry_covers_declared_kinds():
    for kind in ("real", "lower", "upper", "interval", "positive", "ordered", "simplex", "corr_cholesky"):
        assert kind in CONSTRAINTS


@pytest.mark.parametrize("kind,lo,hi", CASES)
def test_log_det_matches_autograd(kind, lo, hi):
    t, x, shape = _unconstrained(kind, lo, hi)
    y = t(x)
    ld = sum_event(t.log_abs_det_jacobian(x, y))
    assert ld.shape == (x.shape[0],)
    for s in range(x.shape[0]):
        xs = x[s].reshape(-1)

        def f(v):
            return _reduce(kind, t(v.reshape((1,) + x.shape[1:]))[0])
        J = torch.autograd.functional.jacobian(f, xs)
        assert J.shape[0] == J.shape[1] == xs.numel(), f"reduced Jacobian is not square: {tuple(J.shape)}"
        expected = torch.linalg.slogdet(J).logabsdet
        assert torch.allclose(ld[s], expected, atol=1e-8, rtol=1e-8), (kind, float(ld[s]), float(expected))


@pytest.mark.parametrize("kind,lo,hi", CASES)
def test_round_trip(kind, lo, hi):
    t, x, shape = _unconstrained(kind, lo, hi, S=5, seed=1)
    y = t(x)
    assert tuple(y.shape[1:]) == shape
    assert torch.allclose(t.inv(y), x, atol=1e-8)
    # and the other way round, from a point of the set
    assert torch.allclose(t(t.inv(y)), y, atol=1e-10)


@pytest.mark.parametrize("kind,lo,hi", CASES)
def test_image_in_set(kind, lo, hi):
    t, x, shape = _unconstrained(kind, lo, hi, S=50, seed=2)
    x = 3.0 * x                                            # spread out, but not into float saturation
    y = t(x)
    assert torch.isfinite(y).all()
    assert bool(t.codomain.check(y).all())
    if kind == "lower":
        assert (y > torch.as_tensor(lo)).all()
    if kind == "upper":
        assert (y < torch.as_tensor(hi)).all()
    if kind == "interval":
        assert ((y > torch.as_tensor(lo)) & (y < torch.as_tensor(hi))).all()
    if kind in ("positive",):
        assert (y > 0).all()
    if kind == "unit_interval":
        assert ((y > 0) & (y < 1)).all()
    if kind == "simplex":
        assert (y > 0).all() and torch.allclose(y.sum(-1), torch.ones(y.shape[0], dtype=DT))
    if kind == "corr_cholesky":
        C = y @ y.transpose(-1, -2)
        assert torch.allclose(torch.diagonal(C, dim1=-2, dim2=-1), torch.ones(y.shape[0], shape[0], dtype=DT))
        assert torch.allclose(y, torch.tril(y))
        assert (torch.diagonal(y, dim1=-2, dim2=-1) > 0).all()


def test_ordered_increasing():
    t = bijection("ordered")
    assert isinstance(t, OrderedTransform)
    g = torch.Generator().manual_seed(3)
    x = 4.0 * torch.randn(200, 6, generator=g, dtype=DT)
    y = t(x)
    assert (y[:, 1:] > y[:, :-1]).all()
    assert torch.equal(y[:, 0], x[:, 0])
    assert torch.allclose(y[:, 1:] - y[:, :-1], torch.exp(x[:, 1:]))
    # the constraint itself rejects a non-increasing vector
    assert not bool(t.codomain.check(torch.tensor([0.0, 1.0, 1.0], dtype=DT)))
    assert bool(t.codomain.check(torch.tensor([0.0, 1.0, 1.5], dtype=DT)))


def test_ordered_length_one():
    t = bijection("ordered")
    x = torch.tensor([[0.3], [-2.0]], dtype=DT)
    assert torch.equal(t(x), x)
    assert torch.equal(sum_event(t.log_abs_det_jacobian(x, t(x))), torch.zeros(2, dtype=DT))


@pytest.mark.parametrize("kind,lo,hi", CASES)
def test_unconstrained_shape_matches_torch(kind, lo, hi):
    """The engine's own block-shape rule (it avoids torch's inverse_shape) agrees with torch's."""
    t = bijection(kind, lo, hi)
    shapes = [SHAPES.get(kind, DEFAULT_SHAPE)]
    if kind in ("simplex", "ordered"):
        shapes += [(2, 3), (1,)]
    elif kind == "corr_cholesky":
        shapes += [(2, 3, 3), (2, 2)]
    elif lo is None and hi is None:
        shapes += [(), (2, 3)]
    for shape in shapes:
        assert tuple(unconstrained_shape(kind, shape)) == tuple(t.inverse_shape(torch.Size(shape))), (kind, shape)


def _support_cases():
    """(spec, bounds, shape, args) for every continuous distribution."""
    out = []
    for spec in DS.REGISTRY.values():
        if spec.discrete:
            continue
        lo = hi = None
        shape = ()
        if spec.support == "interval":
            lo, hi = torch.tensor(-1.5, dtype=DT), torch.tensor(2.0, dtype=DT)
        if spec.event_rank == 1:
            shape = (3,)
        if spec.support == "corr_cholesky":
            shape = (3, 3)
        out.append(pytest.param(spec.name, lo, hi, shape, id=spec.name))
    return out


EXAMPLE_ARGS = {
    "normal": (0.5, 2.0), "student_t": (4.0, 0.5, 2.0), "cauchy": (0.5, 2.0), "half_normal": (2.0,),
    "half_cauchy": (2.0,), "half_student_t": (3.0, 2.0), "exponential": (1.5,), "gamma": (2.0, 3.0),
    "inv_gamma": (2.0, 3.0), "lognormal": (0.2, 0.7), "beta": (2.0, 3.0), "uniform": (-1.5, 2.0),
    "laplace": (0.5, 2.0), "logistic": (0.5, 2.0), "weibull": (1.5, 2.0),
    "dirichlet": ([1.0, 2.0, 3.0],),
    "multi_normal": ([0.0, 1.0, 2.0], [[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 3.0]]),
    "multi_normal_cholesky": ([0.0, 1.0, 2.0], [[1.5, 0.0, 0.0], [0.3, 1.0, 0.0], [-0.2, 0.4, 2.0]]),
    "lkj_corr_cholesky": (2.0,),
}


@pytest.mark.parametrize("name,lo,hi,shape", _support_cases())
def test_every_support_maps_into_the_distribution(name, lo, hi, shape):
    spec = DS.REGISTRY[name]
    t = bijection(spec.support, lo, hi)
    ushape = tuple(t.inverse_shape(torch.Size(shape)))
    g = torch.Generator().manual_seed(4)
    x = torch.randn((20,) + ushape, generator=g, dtype=DT)
    y = t(x)
    assert tuple(y.shape[1:]) == shape
    args = [torch.as_tensor(a, dtype=torch.float64) for a in EXAMPLE_ARGS[name]]
    kw = {"event": shape} if spec.event_shape is None and spec.event_rank > 0 else {}
    d = spec.build(D, *args, **kw)
    lp = d.log_prob(y)
    assert torch.isfinite(lp).all(), name
    # the transform's set is the distribution's support (where torch declares one)
    sup = getattr(d, "support", None)
    if sup is not None and not isinstance(sup, torch.distributions.constraints._Dependent):
        assert bool(sup.check(y).all()), name
    # and the log|det J| agrees with autograd here too
    ld = sum_event(t.log_abs_det_jacobian(x, y))
    kind = spec.support if spec.support in ("simplex", "corr_cholesky") else "elementwise"
    for s in range(3):
        def f(v):
            return _reduce(kind, t(v.reshape((1,) + ushape))[0])
        J = torch.autograd.functional.jacobian(f, x[s].reshape(-1))
        assert math.isclose(float(ld[s]), float(torch.linalg.slogdet(J).logabsdet), rel_tol=1e-8, abs_tol=1e-8)
