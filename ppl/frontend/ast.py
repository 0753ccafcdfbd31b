"""AST: frozen dataclasses for a parsed model, each node carrying its `Span`.

Stage: parse tree (Lark, inside parse.py only) -> these nodes -> checker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

from ..errors import Span


# ---- expressions -----------------------------------------------------------
@dataclass(frozen=True)
class Num:
    value: float
    is_int: bool
    span: Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str                 # + - * / ^ @ == != < <= > >=
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span


@dataclass(frozen=True)
class Call:
    func: str
    args: Tuple["Expr", ...]
    span: Span
    func_span: Span


@dataclass(frozen=True)
class Index:
    base: "Expr"
    indices: Tuple["Expr", ...]
    span: Span


@dataclass(frozen=True)
class Vector:
    items: Tuple["Expr", ...]
    span: Span


Expr = Union[Num, Name, BinOp, Neg, Call, Index, Vector]
COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")


def children(e: Expr) -> Tuple[Expr, ...]:
    if isinstance(e, BinOp):
        return (e.left, e.right)
    if isinstance(e, Neg):
        return (e.operand,)
    if isinstance(e, Call):
        return e.args
    if isinstance(e, Index):
        return (e.base,) + e.indices
    if isinstance(e, Vector):
        return e.items
    return ()


def walk(e: Expr):
    yield e
    for c in children(e):
        yield from walk(c)


def names_in(e: Optional[Expr]) -> Tuple[Name, ...]:
    if e is None:
        return ()
    return tuple(n for n in walk(e) if isinstance(n, Name))


# ---- types -----------------------------------------------------------------
@dataclass(frozen=True)
class Dim:
    value: Union[str, int]    # a dimension symbol or a literal size
    span: Span


@dataclass(frozen=True)
class Bound:
    key: str                  # lower | upper
    value: Expr
    span: Span


@dataclass(frozen=True)
class TypeSpec:
    base: str                 # real int level ordered simplex positive ...
    bounds: Tuple[Bound, ...]
    dims: Tuple[Dim, ...]
    span: Span
    levels: Optional[Dim] = None   # K in `level[N] of K`


# ---- statements ------------------------------------------------------------
@dataclass(frozen=True)
class DataDecl:
    name: str
    type: TypeSpec
    pattern: Optional[str]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Sample:
    name: str
    dims: Tuple[Dim, ...]
    type: Optional[TypeSpec]
    dist: Call
    span: Span
    name_span: Span


@dataclass(frozen=True)
class FlatDecl:
    name: str
    type: TypeSpec
    span: Span
    name_span: Span


@dataclass(frozen=True)
class ParamDecl:
    """`param NAME: TYPE`: a point-estimated quantity (no prior, no draws)."""
    name: str
    type: TypeSpec
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Assign:
    name: str
    expr: Expr
    span: Span
    name_span: Span


Stmt = Union[DataDecl, ParamDecl, Sample, FlatDecl, Assign]


@dataclass(frozen=True)
class Amortize:
    """`amortize LATENT from DATA[, DATA...] (hidden [sizes] [activation NAME] | linear) [iaf K]`:
    q(LATENT_n | DATA_n) comes from an encoder of row n's data.  Not a node of the model (it names
    none): it says how q is built, so it is kept apart from `statements`."""
    latent: Name
    inputs: Tuple[Name, ...]
    hidden: Tuple[Num, ...]            # hidden layer sizes (empty with `linear`)
    activation: Optional[Name]         # None: the default (relu) or `linear`
    linear: bool
    iaf: Optional[Num]                 # IAF steps after the Gaussian (None: none)
    span: Span


@dataclass(frozen=True)
class Program:
    statements: Tuple[Stmt, ...]
    path: str
    span: Span
    encoders: Tuple[Amortize, ...] = ()


def dump(node, indent: int = 0) -> str:
    """A readable, stable dump of an AST (for `ppl check --dump ast`)."""
    pad = "  " * indent
    if isinstance(node, (list, tuple)):
        return "\n".join(dump(n, indent) for n in node)
    if not hasattr(node, "__dataclass_fields__"):
        return pad + repr(node)
    parts = []
    for k in node.__dataclass_fields__:
        v = getattr(node, k)
        if k in ("span", "name_span", "func_span") or v in ((), None):
            continue
        if hasattr(v, "__dataclass_fields__") or (isinstance(v, tuple) and v and hasattr(v[0], "__dataclass_fields__")):
            parts.append(f"{pad}  {k}:\n{dump(v, indent + 2)}")
        else:
            parts.append(f"{pad}  {k}: {v!r}")
    return f"{pad}{type(node).__name__} @{node.span!r}" + ("\n" + "\n".join(parts) if parts else "")
