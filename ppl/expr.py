"""Expression compiler: AST expression -> closure over an environment of arrays.

Shared by the checker (numpy, to compute constants at load) and the torch
backend (the log joint).  Every value carries one leading batch dimension
(size 1 for data and constants, S for Monte Carlo samples); the static shapes
the checker inferred give each operand's rank, so operands of different rank
are aligned explicitly after the batch dimension.  Sub-expressions that use
only known values are folded to constants when compiled.  Names in `batch`
are data that arrive with each data batch (per-row data): a sub-expression
of batch data and constants only is computed once per batch and kept in the
batch's cache (`env[CACHE]`), so a full-data fit computes `log(exposure)`
once, as if it were folded, and a minibatch computes it once per batch.

Input: an `ast.Expr`, a rank function, the known values, the batch names and
an ops object.  Output: `Compiled(fn, const, data)`, where
`fn(env) -> batched array`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

import numpy as np

from . import functions as F
from .frontend import ast as A


CACHE = ("ppl", "batch cache")     # env key of the data batch's cache (not a name a model can use)


@dataclass
class Compiled:
    fn: Callable[[Mapping[str, Any]], Any]
    const: bool
    data: bool = False      # uses batch data and constants only (no latent): cached per batch


def _cached(key, fn):
    def get(env):
        cache = env[CACHE]
        v = cache.get(key)
        if v is None:
            v = cache[key] = fn(env)
        return v
    return get


def compile_expr(e: A.Expr, rank: Callable[[A.Expr], int], known: Mapping[str, Any], ops,
                 batch: Collection[str] = ()) -> Compiled:
    """Compile `e`; names in `known` are constants (already batched arrays), names in `batch`
    come with the data batch."""

    def c(e: A.Expr) -> Compiled:
        out = _compile(e)
        if out.const and not isinstance(e, (A.Name, A.Num)):
            value = out.fn({})
            return Compiled(lambda env, v=value: v, True)
        if out.data and not isinstance(e, A.Name):
            return Compiled(_cached(id(e), out.fn), False, True)
        return out

    def data_of(*parts: Compiled) -> bool:
        return all(p.const or p.data for p in parts) and not all(p.const for p in parts)

    def _compile(e: A.Expr) -> Compiled:
        if isinstance(e, A.Num):
            v = ops.const(e.value, e.is_int)
            return Compiled(lambda env: v, True)
        if isinstance(e, A.Name):
            if e.id in known:
                v = known[e.id]
                return Compiled(lambda env: v, True)
            name = e.id
            return Compiled(lambda env: env[name], False, name in batch)
        if isinstance(e, A.Neg):
            x = c(e.operand)
            return Compiled(lambda env: ops.neg(x.fn(env)), x.const, x.data)
        if isinstance(e, A.BinOp):
            a, b = c(e.left), c(e.right)
            ra, rb = rank(e.left), rank(e.right)
            const, data = a.const and b.const, data_of(a, b)
            if e.op == "@":
                return Compiled(lambda env: ops.matmul(a.fn(env), b.fn(env), ra, rb), const, data)
            r = max(ra, rb)
            op = ops.binary(e.op)
            fa, fb = a.fn, b.fn
            if ra == rb:
                return Compiled(lambda env: op(fa(env), fb(env)), const, data)
            return Compiled(lambda env: op(ops.align(fa(env), ra, r), ops.align(fb(env), rb, r)), const, data)
        if isinstance(e, A.Call):
            fun = F.REGISTRY[e.func]
            args = [c(x) for x in e.args]
            impl = fun.impl
            fns = [x.fn for x in args]
            return Compiled(lambda env: impl(ops, *[f(env) for f in fns]), all(x.const for x in args),
                            data_of(*args))
        if isinstance(e, A.Index):
            base = c(e.base)
            fn, const = base.fn, base.const
            parts = [base]
            axis = 1
            for ix in e.indices:
                ci = c(ix)
                parts.append(ci)
                ri = rank(ix)
                if ci.const:
                    idx = ops.as_index(ci.fn({}))
                    fn = (lambda f, idx, axis: lambda env: ops.index(f(env), idx, axis))(fn, idx, axis)
                else:
                    fi = ci.fn
                    if ci.data:      # a data index (a[county]): made 0-based once per batch
                        fi = _cached((id(ix), "index"), (lambda fi: lambda env: ops.as_index(fi(env)))(fi))
                    else:
                        fi = (lambda fi: lambda env: ops.as_index(fi(env)))(fi)
                    fn = (lambda f, fi, axis: lambda env: ops.index(f(env), fi(env), axis))(fn, fi, axis)
                const = const and ci.const
                axis += ri
            return Compiled(fn, const, data_of(*parts))
        if isinstance(e, A.Vector):
            items = [c(x) for x in e.items]
            ranks = [rank(x) for x in e.items]
            r = max(ranks)
            fns = [(x.fn, rk) for x, rk in zip(items, ranks)]
            return Compiled(lambda env: ops.stack([ops.align(f(env), rk, r) for f, rk in fns]),
                            all(x.const for x in items), data_of(*items))
        raise TypeError(f"not an expression: {e!r}")

    return c(e)


class NumpyOps:
    """Array primitives on numpy arrays with a leading batch dimension."""

    @staticmethod
    def const(value, is_int=False):
        return np.asarray([value], dtype=np.int64 if is_int else np.float64)

    @staticmethod
    def align(x, r_from, r_to):
        return x.reshape(x.shape[:1] + (1,) * (r_to - r_from) + x.shape[1:])

    _BIN = {
        "+": np.add, "-": np.subtract, "*": np.multiply,
        "/": lambda a, b: np.true_divide(a, b),
        "^": lambda a, b: np.power(np.asarray(a, float), b),
        "==": lambda a, b: (a == b).astype(np.int64), "!=": lambda a, b: (a != b).astype(np.int64),
        "<": lambda a, b: (a < b).astype(np.int64), "<=": lambda a, b: (a <= b).astype(np.int64),
        ">": lambda a, b: (a > b).astype(np.int64), ">=": lambda a, b: (a >= b).astype(np.int64),
    }

    def binary(self, op):
        return self._BIN[op]

    @staticmethod
    def neg(x):
        return -x

    @staticmethod
    def matmul(a, b, ra, rb):
        a2 = a if ra == 2 else a[:, None, :]
        b2 = b if rb == 2 else b[..., None]
        out = np.matmul(a2, b2)
        if rb == 1:
            out = out[..., 0]
        if ra == 1:
            out = out[:, 0] if rb == 2 else out[:, 0]
        return out

    @staticmethod
    def as_index(x):
        return np.asarray(x).astype(np.int64) - 1

    @staticmethod
    def index(x, idx, axis):
        if idx.shape[0] == 1:
            sl = (slice(None),) * axis + (idx[0],)
            return x[sl]
        raise ValueError("batched indexing is not used at load time")

    @staticmethod
    def stack(items):
        items = np.broadcast_arrays(*items)
        return np.stack(items, axis=1)

    @staticmethod
    def _flat(x):
        return x.reshape(x.shape[0], -1)

    exp, log, log1p, expm1, sqrt, abs, tanh = np.exp, np.log, np.log1p, np.expm1, np.sqrt, np.abs, np.tanh
    mul = staticmethod(np.multiply)

    @staticmethod
    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    @staticmethod
    def logit(x):
        return np.log(x) - np.log1p(-x)

    @staticmethod
    def relu(x):
        return np.maximum(x, 0.0)

    @staticmethod
    def softplus(x):
        return np.logaddexp(0.0, x)

    def sum(self, x):
        return self._flat(x).sum(-1)

    def mean(self, x):
        return self._flat(x).mean(-1)

    def sd(self, x):
        f = self._flat(x)
        return f.std(-1, ddof=1) if f.shape[-1] > 1 else np.zeros(f.shape[0])

    def log_sum_exp(self, x):
        f = self._flat(x).astype(float)
        m = f.max(-1, keepdims=True)
        return (m + np.log(np.exp(f - m).sum(-1, keepdims=True)))[..., 0]

    @staticmethod
    def cumsum(x):
        return np.cumsum(x, axis=-1)

    @staticmethod
    def softmax(x):
        z = np.exp(x - x.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    @staticmethod
    def full(n, v):
        return np.full((1, int(n.reshape(-1)[0])), v)

    @staticmethod
    def rep(x, n):
        k = int(n.reshape(-1)[0])
        return np.broadcast_to(x[:, None], (x.shape[0], k) + x.shape[1:]).copy()
