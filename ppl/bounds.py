"""Supports from the graph: checked IR -> per-element bounds of each discrete
latent (torch-free: the plan, `ppl graph` and the discrete q's use it).

A discrete latent's own distribution gives its support ({0, 1, ...} for a
count, {1, ..., K} for a categorical, {0, ..., n} for a binomial with known
trials).  The nodes that use it can narrow it further, element by element:
a latent that is the number of trials of a binomial is at least that
binomial's value (`y ~ binomial(n, p)` with y observed: n[i] >= y[i]); a
latent used as an index into a vector of K values lies in 1..K.  A bound
between two latents (`k ~ binomial(n, p)` with both latent: k <= n) is
recorded as a relation, not as numbers.  A use shifted by a constant
(`binomial(n + 1, p)`) shifts the bound.

Registry `BOUND_RULES`: (distribution, argument index) -> the rule for a
latent that is that argument exactly (`binomial(n, p)`: argument 0).  A new
rule is one entry.  Input: `Model`, a latent's name.  Output: `Bounds`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import distributions as DS
from .frontend import ast as A
from .supports import const_value

INF = math.inf


@dataclass
class Bounds:
    lo: np.ndarray                       # per element of the latent, float (-inf: none)
    hi: np.ndarray                       # per element (inf: none)
    why: List[str] = field(default_factory=list)       # what narrowed it, readable
    relations: List[str] = field(default_factory=list)  # bounds by other latents ("n >= k")

    def text(self) -> str:
        """The set, readable: '{0, 1, ...}', '{y[i], y[i] + 1, ...}' (per element), '{1, ..., 4}'."""
        lo = _one(self.lo)
        hi = _one(self.hi)
        lo_t = "lo[i]" if lo is None else f"{lo:g}"
        hi_t = "hi[i]" if hi is None else f"{hi:g}"
        if hi is not None and hi == INF:
            return f"{{{lo_t}, {lo_t} + 1, ...}}" if lo is None else f"{{{lo:g}, {lo + 1:g}, ...}}"
        return f"{{{lo_t}, ..., {hi_t}}}"


def _one(a: np.ndarray) -> Optional[float]:
    return float(a.reshape(-1)[0]) if a.size and np.all(a == a.reshape(-1)[0]) else None


@dataclass(frozen=True)
class Rule:
    relation: str                        # ">=" : the latent is at least the user's value; "<=": at most
    what: str                            # for the message: "binomial trials"


BOUND_RULES: Dict[Tuple[str, int], Rule] = {
    ("binomial", 0): Rule(">=", "binomial trials"),
    ("binomial_logit", 0): Rule(">=", "binomial trials"),
}


def _support_bounds(model, node) -> Tuple[np.ndarray, np.ndarray]:
    spec = DS.REGISTRY[node.dist.spec]
    shape = tuple(int(d) for d in node.shape)
    lo = np.full(shape, -INF)
    hi = np.full(shape, INF)
    if spec.support == "nonneg_int":
        lo[...] = 0
    elif spec.support == "boolean":
        lo[...], hi[...] = 0, 1
    elif spec.support == "categorical":
        k = model.shapes.get(id(node.dist.args[0]), (None,))[-1]
        lo[...] = 1
        if isinstance(k, int):
            hi[...] = k
    elif spec.support == "binomial":
        lo[...] = 0
        n = const_value(model, node.dist.args[0])
        if n is not None:
            hi = np.broadcast_to(_fit_to(np.asarray(n, dtype=float), shape, np.max), shape).copy()
    return lo, hi


def _fit_to(v: np.ndarray, shape, reduce: Callable) -> np.ndarray:
    """A value of a user of the latent (broadcast against it) -> one per element of the latent:
    the axes the latent lacks are reduced (a scalar n with a vector y: the largest y)."""
    extra = v.ndim - len(shape)
    if extra > 0:
        v = reduce(v.reshape((-1,) + v.shape[extra:]), axis=0)
    out = np.empty(shape)
    try:
        out[...] = np.broadcast_to(v, shape) if v.shape != shape else v
    except ValueError:
        out[...] = reduce(v)
    return out


def _offset(e, name: str) -> Optional[float]:
    """c when `e` is `name + c` (`name`, `name + 2`, `3 + name`, `name - 1`), else None."""
    if isinstance(e, A.Name):
        return 0.0 if e.id == name else None
    if isinstance(e, A.BinOp) and e.op in ("+", "-"):
        if isinstance(e.left, A.Name) and e.left.id == name and isinstance(e.right, A.Num):
            return e.right.value if e.op == "+" else -e.right.value
        if e.op == "+" and isinstance(e.right, A.Name) and e.right.id == name and isinstance(e.left, A.Num):
            return e.left.value
    return None


def bounds(model, name: str) -> Bounds:
    """Per-element bounds of the discrete latent `name`: its support, narrowed by its users."""
    node = model.nodes[name]
    shape = tuple(int(d) for d in node.shape)
    lo, hi = _support_bounds(model, node)
    out = Bounds(lo, hi)
    for other in model.order:
        user = model.nodes[other]
        if user.dist is None or other == name:
            continue
        for i, arg in enumerate(user.dist.args):
            rule = BOUND_RULES.get((user.dist.spec, i))
            c = None if rule is None else _offset(arg, name)
            if c is None:
                continue
            if user.kind == "latent":
                out.relations.append(f"{name} {rule.relation} {other} ({rule.what})")
                continue
            v = model.values.get(other)
            if v is None:
                continue
            v = np.asarray(v, dtype=float) - c
            if rule.relation == ">=":
                out.lo = np.maximum(out.lo, _fit_to(v, shape, np.max))
            else:
                out.hi = np.minimum(out.hi, _fit_to(v, shape, np.min))
            shift = "" if c == 0 else f" {'-' if c > 0 else '+'} {abs(c):g}"
            out.why.append(f"{name} {rule.relation} {other}{shift} ({rule.what})")
    for other in model.order:
        user = model.nodes[other]
        exprs = list(user.dist.args) if user.dist is not None else []
        if user.expr is not None:
            exprs.append(user.expr)
        for e in exprs:
            for x in A.walk(e):
                if not isinstance(x, A.Index) or len(x.indices) != 1:
                    continue
                idx = x.indices[0]
                if not (isinstance(idx, A.Name) and idx.id == name):
                    continue
                k = model.shapes.get(id(x.base), (None,))
                k = k[0] if k else None
                if isinstance(k, int):
                    out.lo = np.maximum(out.lo, 1)
                    out.hi = np.minimum(out.hi, k)
                    why = f"{name} indexes {k} values"
                    if why not in out.why:
                        out.why.append(why)
    return out
