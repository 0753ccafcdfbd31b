"""Unconstraining: a latent's constraint -> a torch bijection from R^n.

Every constraint maps to a `torch.distributions.constraints` object and goes
through `biject_to`; the one set torch lacks, ordered vectors, is defined here
with its transform and registered with `biject_to`.  The registry
`CONSTRAINTS` is keyed by the constraint kind of the checked IR (declared
types) and by the distributions' support names (both from `ppl.supports`).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import AffineTransform, ComposeTransform, Transform

from ..supports import SUPPORTS


class _Ordered(constraints.Constraint):
    """Vectors with strictly increasing elements."""
    event_dim = 1

    def check(self, value):
        return (value[..., 1:] > value[..., :-1]).all(-1)


ordered_vector = _Ordered()


class OrderedTransform(Transform):
    """R^K -> ordered vectors: y_1 = x_1, y_k = y_{k-1} + exp(x_k)."""
    domain = constraints.independent(constraints.real, 1)
    codomain = ordered_vector
    bijective = True

    def __eq__(self, other):
        return isinstance(other, OrderedTransform)

    def _call(self, x):
        return torch.cumsum(torch.cat([x[..., :1], torch.exp(x[..., 1:])], -1), -1)

    def _inverse(self, y):
        return torch.cat([y[..., :1], torch.log(y[..., 1:] - y[..., :-1])], -1)

    def log_abs_det_jacobian(self, x, y):
        return x[..., 1:].sum(-1)


@biject_to.register(_Ordered)
def _biject_ordered(constraint):
    return OrderedTransform()


# constraint kind -> (bounds -> torch constraint); bounds are (lower, upper) tensors or None.
# Derived from the supports registry (ppl.supports), where each continuous support says its set.
CONSTRAINTS: Dict[str, Callable] = {
    name: (lambda s: lambda lo, hi: s.constraint(constraints, lo, hi))(s)
    for name, s in SUPPORTS.items() if s.constraint is not None}


def bijection(kind: str, lo=None, hi=None) -> Transform:
    """The map from unconstrained space onto the set `kind` (with bounds)."""
    return _simplify(biject_to(CONSTRAINTS[kind](lo, hi)))


def _is_zero(v) -> bool:
    return bool((v == 0).all()) if torch.is_tensor(v) else v == 0


def _simplify(t: Transform) -> Transform:
    """biject_to(positive) is exp followed by the identity affine map x + 0 (torch registers `positive`
    as greater_than(0)); that costs six tensor ops per evaluation instead of one.  Drop the identity."""
    if isinstance(t, ComposeTransform) and len(t.parts) == 2 and isinstance(t.parts[1], AffineTransform):
        aff = t.parts[1]
        if not torch.is_tensor(aff.scale) and aff.scale == 1 and _is_zero(aff.loc) and \
                (not torch.is_tensor(aff.loc) or not aff.loc.requires_grad):
            return t.parts[0]
    return t


def unconstrained_shape(kind: str, shape) -> tuple:
    """Shape of the unconstrained block for a value of `shape` in set `kind`.
    (Computed here: torch's Transform.inverse_shape imports sympy, ~0.5 s.)"""
    shape = tuple(shape)
    if kind == "simplex":
        return shape[:-1] + (shape[-1] - 1,)
    if kind == "corr_cholesky":
        k = shape[-1]
        return shape[:-2] + (k * (k - 1) // 2,)
    return shape


def sum_event(x: torch.Tensor) -> torch.Tensor:
    """Sum every dimension but the leading (sample) one."""
    if x.dim() == 2:
        return x.sum(-1)
    return x.reshape(x.shape[0], -1).sum(-1) if x.dim() > 1 else x
