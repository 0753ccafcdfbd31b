"""Registry of built-in functions (torch-free; used by the checker and both evaluators).

Each entry is one `Function`: its arity, a shape rule (argument shapes ->
result shape, or a message for a user error) and an implementation written
against an array-ops object (`ppl.expr.NumpyOps` at check time,
`ppl.backend.ops.TorchOps` at fit time).  Adding a function is one entry here
plus, if it needs a primitive the ops objects lack, one method on each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple, Union

Dim = Union[int, str]
Shape = Tuple[Dim, ...]


class ShapeError(Exception):
    """A shape rule's complaint; the checker turns it into a located error."""


@dataclass(frozen=True)
class Function:
    name: str
    params: Tuple[str, ...]
    shape: Callable[..., Shape]           # (arg shapes..., values=...) -> result shape
    impl: Callable                        # (ops, *args) -> value
    int_result: bool = False              # result is integer-valued when its inputs are
    axes: str = "reduce"                  # what it does to its argument's axes: "elementwise" (keeps every
                                          # axis, element by element), "last" (works along the last axis
                                          # only) or "reduce" (mixes elements across every axis)


def _same(x: Shape, **_) -> Shape:
    return x


def _scalar(x: Shape, **_) -> Shape:
    return ()


def _vector_op(x: Shape, **_) -> Shape:
    if len(x) < 1:
        raise ShapeError("needs a vector, got a scalar")
    return x


def _dot(a: Shape, b: Shape, **_) -> Shape:
    if len(a) != 1 or len(b) != 1:
        raise ShapeError(f"dot needs two vectors, got shapes {fmt(a)} and {fmt(b)}")
    if isinstance(a[0], int) and isinstance(b[0], int) and a[0] != b[0]:
        raise ShapeError(f"dot needs vectors of one length, got {a[0]} and {b[0]}")
    return ()


def _fill(n: Shape, *, values=(), **_) -> Shape:
    if n != ():
        raise ShapeError("the length must be a scalar")
    return (values[0],)


def _rep(x: Shape, n: Shape, *, values=(), **_) -> Shape:
    if n != ():
        raise ShapeError("the length must be a scalar")
    return (values[1],) + tuple(x)


def fmt(shape: Shape) -> str:
    return "scalar" if shape == () else "(" + ", ".join(str(d) for d in shape) + ")"


REGISTRY: Dict[str, Function] = {f.name: f for f in [
    Function("exp", ("x",), _same, lambda o, x: o.exp(x), axes="elementwise"),
    Function("log", ("x",), _same, lambda o, x: o.log(x), axes="elementwise"),
    Function("log1p", ("x",), _same, lambda o, x: o.log1p(x), axes="elementwise"),
    Function("expm1", ("x",), _same, lambda o, x: o.expm1(x), axes="elementwise"),
    Function("sqrt", ("x",), _same, lambda o, x: o.sqrt(x), axes="elementwise"),
    Function("square", ("x",), _same, lambda o, x: o.mul(x, x), int_result=True, axes="elementwise"),
    Function("abs", ("x",), _same, lambda o, x: o.abs(x), int_result=True, axes="elementwise"),
    Function("inv_logit", ("x",), _same, lambda o, x: o.sigmoid(x), axes="elementwise"),
    Function("logit", ("p",), _same, lambda o, x: o.logit(x), axes="elementwise"),
    Function("softplus", ("x",), _same, lambda o, x: o.softplus(x), axes="elementwise"),
    Function("tanh", ("x",), _same, lambda o, x: o.tanh(x), axes="elementwise"),
    Function("relu", ("x",), _same, lambda o, x: o.relu(x), axes="elementwise"),
    Function("sigmoid", ("x",), _same, lambda o, x: o.sigmoid(x), axes="elementwise"),
    Function("sum", ("x",), _scalar, lambda o, x: o.sum(x), int_result=True),
    Function("mean", ("x",), _scalar, lambda o, x: o.mean(x)),
    Function("sd", ("x",), _scalar, lambda o, x: o.sd(x)),
    Function("log_sum_exp", ("x",), _scalar, lambda o, x: o.log_sum_exp(x)),
    Function("dot", ("a", "b"), _dot, lambda o, a, b: o.sum(o.mul(a, b))),
    Function("cumsum", ("x",), _vector_op, lambda o, x: o.cumsum(x), int_result=True, axes="last"),
    Function("softmax", ("x",), _vector_op, lambda o, x: o.softmax(x), axes="last"),
    Function("ones", ("n",), _fill, lambda o, n: o.full(n, 1.0)),
    Function("zeros", ("n",), _fill, lambda o, n: o.full(n, 0.0)),
    Function("rep", ("x", "n"), _rep, lambda o, x, n: o.rep(x, n)),
]}

# functions whose arguments at these positions must be known integers at load time
SIZE_ARGS: Dict[str, int] = {"ones": 0, "zeros": 0, "rep": 1}
