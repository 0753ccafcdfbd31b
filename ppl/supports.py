"""Registry of supports: every fact about a set a variable lives in, in one
place (torch-free: the checker and `ppl graph` use it without torch).

One `Support` per kind, keyed by the names distributions give their support
(`DistSpec.support`) and the constraint kinds declared types give
(`real<lower=0>` -> `lower`, `ordered`, ...):
- `text`: the set, readable (for `ppl graph` and messages);
- `contains`: the checker's test of observed values (and what it says);
- `constraint`: the torch constraint that `biject_to` maps R^n onto, built
  from `torch.distributions.constraints` (handed in, so no torch import here)
  and the bounds; continuous supports only;
- `fits`: which declared constraint kinds lie inside it (a declared type
  must);
- `first`, `count`: for a finite discrete support, its smallest value and
  how many values it has for a given distribution use (None: unknown or
  unbounded) — the enumeration plan sums over first .. first + count - 1;
- `window`: an unbounded (or latent-bounded) discrete support whose values
  can be summed over a window of likely values (truncated enumeration:
  counts), found at fit time;
- `q`: the variational family of a discrete latent on the score path (the
  registry `ppl.infer.discrete.DISCRETE_QS`);
- `relaxation`: its continuous relaxation for `--estimator relaxed` (the
  registry `ppl.backend.relax.RELAXATIONS`; None: it has none);
- `transform`: the bijection's name, as `ppl graph` shows it.

A new support is one entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class Support:
    name: str
    text: str
    discrete: bool = False
    contains: Optional[Tuple[Callable, str]] = None    # (values -> bool array, "what they must be")
    constraint: Optional[Callable] = None              # (C, lo, hi) -> a torch constraint
    fits: FrozenSet[str] = frozenset()                 # declared constraint kinds inside this support
    first: int = 0
    count: Optional[Callable] = None                   # (model, dist use) -> number of values, or None
    q: Optional[str] = None
    window: bool = False
    transform: Optional[str] = None                    # the bijection's name, for `ppl graph`
    relaxation: Optional[str] = None                   # ppl.backend.relax.RELAXATIONS (Gumbel-softmax / concrete)


def _t(x):
    import torch
    return x if torch.is_tensor(x) else torch.as_tensor(float(x), dtype=torch.get_default_dtype())


def _categories(model, dist) -> Optional[int]:
    k = model.shapes.get(id(dist.args[0]), (None,))[-1]
    return k if isinstance(k, int) else None


def _trials(model, dist) -> Optional[int]:
    """1 + the largest number of trials, when the trials are a known constant (`binomial(10, p)`, data)."""
    n = const_value(model, dist.args[0])
    if n is None or n.size == 0:
        return None
    return int(np.max(n)) + 1


def const_value(model, e) -> Optional[np.ndarray]:
    """The value of an expression of data and constants (None when it uses a latent)."""
    from .expr import NumpyOps, compile_expr
    from .frontend import ast as A
    if any(n.id not in model.values and n.id not in model.dims for n in A.names_in(e)):
        return None
    known = {k: np.asarray(v)[None] for k, v in model.values.items()}
    known.update({k: np.asarray([v]) for k, v in model.dims.items() if k not in known})
    c = compile_expr(e, model.rank, known, NumpyOps())
    return np.asarray(c.fn({}))[0] if c.const else None


_REAL_INSIDE = frozenset({"real", "lower", "upper", "interval", "positive", "ordered", "simplex"})

_ALL = [
    # ---- continuous: supports of distributions, and declared constraint kinds ------------------
    Support("real", "real", constraint=lambda C, lo, hi: C.real, fits=_REAL_INSIDE, transform="identity"),
    Support("positive", "(0, inf)", contains=(lambda x: x > 0, "positive"),
            constraint=lambda C, lo, hi: C.positive, fits=frozenset({"positive", "lower", "interval"}), transform="exp"),
    Support("unit_interval", "(0, 1)", contains=(lambda x: (x > 0) & (x < 1), "in (0, 1)"),
            constraint=lambda C, lo, hi: C.unit_interval, fits=frozenset({"interval", "lower", "upper"}),
            transform="sigmoid"),
    Support("interval", "(lo, hi)", constraint=lambda C, lo, hi: C.interval(_t(lo), _t(hi)),
            fits=frozenset({"interval", "lower", "upper", "real"}), transform="sigmoid (affine)"),
    Support("lower", "(lo, inf)", constraint=lambda C, lo, hi: C.greater_than(_t(lo)),
            transform="exp + lower"),
    Support("upper", "(-inf, hi)", constraint=lambda C, lo, hi: C.less_than(_t(hi)),
            transform="upper - exp"),
    Support("ordered", "ordered", constraint=lambda C, lo, hi: _ordered(),
            transform="ordered (cumulative exp)"),
    Support("simplex", "simplex", constraint=lambda C, lo, hi: C.simplex, fits=frozenset({"simplex"}),
            transform="stick-breaking"),
    Support("corr_cholesky", "Cholesky factor of a correlation matrix",
            constraint=lambda C, lo, hi: C.corr_cholesky, fits=frozenset({"corr_cholesky"}),
            transform="corr-Cholesky"),
    # ---- discrete ---------------------------------------------------------------------------------
    Support("boolean", "{0, 1}", True, (lambda x: (x == 0) | (x == 1), "0 or 1"),
            count=lambda model, dist: 2, q="bernoulli", relaxation="binary-concrete"),
    Support("categorical", "{1, ..., K}", True, (lambda x: x >= 1, "1 or more (categories are numbered from 1)"),
            first=1, count=_categories, q="categorical", relaxation="concrete"),
    Support("binomial", "{0, ..., n}", True, (lambda x: x >= 0, "non-negative"), count=_trials, q="binomial",
            window=True),
    Support("nonneg_int", "{0, 1, 2, ...}", True, (lambda x: x >= 0, "non-negative"), q="count",
            window=True),
]

SUPPORTS: Dict[str, Support] = {s.name: s for s in _ALL}


def _ordered():
    from .backend.transforms import ordered_vector
    return ordered_vector
