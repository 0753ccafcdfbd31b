"""Semantic check: AST (+ optional data) -> checked IR (`Model`).

Resolves names, functions and distributions, finds redefinitions and cycles,
binds data, infers every expression's shape and integer-ness, computes
constants (numpy, at load), and checks distribution arguments, constraints,
literal indexes and broadcasts.  All errors are collected and reported
together, in source order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import networkx as nx
import numpy as np

from .. import distributions as DS
from .. import functions as FN
from ..supports import SUPPORTS
from ..errors import Diagnostic, PplError, Source, Span, did_you_mean, one_of
from ..expr import NumpyOps, compile_expr
from ..functions import Shape, ShapeError, fmt
from . import ast as A
from .encoders import check_encoders
from .rows import NO_ROWS, RowAxis, row_axis

# declared constraint types for latents -> the set they denote
MAX_SIZE = 10_000_000             # largest size a constant may give (ones(n), rep(x, n))
LATENT_TYPES = {"real", "positive", "ordered", "simplex", "cholesky_factor_corr"}
DATA_TYPES = {"real", "int", "level"}


@dataclass(frozen=True)
class Constraint:
    kind: str                       # real lower upper interval positive ordered simplex corr_cholesky
    lower: Optional[A.Expr] = None
    upper: Optional[A.Expr] = None
    span: Optional[Span] = None

    def text(self) -> str:
        lo = A_text(self.lower) if self.lower is not None else None
        hi = A_text(self.upper) if self.upper is not None else None
        if self.kind == "lower":
            return f"({lo}, inf)"
        if self.kind == "upper":
            return f"(-inf, {hi})"
        if self.kind == "interval":
            return f"({lo}, {hi})"
        return {"positive": "(0, inf)", "corr_cholesky": "Cholesky factor of a correlation matrix"}.get(self.kind, self.kind)


@dataclass(frozen=True)
class DistUse:
    spec: str
    args: Tuple[A.Expr, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Node:
    name: str
    kind: str
    span: Span
    name_span: Span
    shape: Shape
    is_int: bool
    dist: Optional[DistUse] = None
    expr: Optional[A.Expr] = None
    constraint: Optional[Constraint] = None   # declared (latents) or the distribution's support
    declared: bool = False                    # constraint came from a type declaration
    discrete: bool = False
    deps: Tuple[str, ...] = ()
    decl: Optional[A.TypeSpec] = None

    @property
    def support(self) -> str:
        if self.kind in ("data", "observed", "constant") and self.dist is None:
            return "data"
        if self.constraint is not None:
            return self.constraint.text()
        if self.dist is not None:
            spec = DS.REGISTRY[self.dist.spec]
            if spec.support == "interval":
                return f"({A_text(self.dist.args[0])}, {A_text(self.dist.args[1])})"
            return SUPPORTS[spec.support].text
        return "real"


@dataclass
class Model:
    source: Source
    program: A.Program
    nodes: Dict[str, Node]                     # source order
    order: Tuple[str, ...]                     # topological
    dims: Dict[str, int]
    values: Dict[str, np.ndarray]              # data and constants (unbatched)
    shapes: Dict[int, Shape]                   # id(expr) -> shape
    has_data: bool
    levels: Dict[str, List[str]] = field(default_factory=dict)
    rows: RowAxis = NO_ROWS                    # the row axis (plate): which nodes are per data row
    encoders: tuple = ()                       # `amortize` declarations, checked (frontend.encoders.EncoderSpec)
    row_share: Optional[Any] = None            # ppl.data.RowShare: this process read only its own rows (ppl.dist)

    def rank(self, e: A.Expr) -> int:
        return len(self.shapes[id(e)])

    def latents(self) -> List[Node]:
        return [self.nodes[n] for n in self.order if self.nodes[n].kind == "latent"]

    def params(self) -> List[Node]:
        """The `param` declarations (point estimates), in source order."""
        return [n for n in self.nodes.values() if n.kind == "param"]


def A_text(e: Optional[A.Expr]) -> str:
    """Unparse an expression (for graph labels and messages)."""
    if e is None:
        return ""
    prec = {"==": 1, "!=": 1, "<": 1, "<=": 1, ">": 1, ">=": 1, "+": 2, "-": 2, "*": 3, "/": 3, "@": 3, "^": 5}

    def p(e, outer=0):
        if isinstance(e, A.Num):
            return str(e.value)
        if isinstance(e, A.Name):
            return e.id
        if isinstance(e, A.Neg):
            s = "-" + p(e.operand, 4)
            return f"({s})" if outer > 4 else s
        if isinstance(e, A.BinOp):
            q = prec[e.op]
            right_q = q + (0 if e.op == "^" else 1)
            s = f"{p(e.left, q + (1 if e.op == '^' else 0))} {e.op} {p(e.right, right_q)}"
            return f"({s})" if q < outer else s
        if isinstance(e, A.Call):
            return f"{e.func}({', '.join(p(a) for a in e.args)})"
        if isinstance(e, A.Index):
            return f"{p(e.base, 6)}[{', '.join(p(a) for a in e.indices)}]"
        if isinstance(e, A.Vector):
            return "[" + ", ".join(p(a) for a in e.items) + "]"
        return "?"
    return p(e)


class _Errors:
    def __init__(self):
        self.items: List[Diagnostic] = []

    def add(self, span: Span, msg: str):
        self.items.append(Diagnostic(span, msg))

    def raise_if_any(self):
        if self.items:
            seen, uniq = set(), []
            for d in self.items:
                key = (d.span.line, d.span.col, d.message) if d.span else (0, 0, d.message)
                if key not in seen:
                    seen.add(key)
                    uniq.append(d)
            raise PplError(uniq)


def dim_symbols(program: A.Program) -> List[str]:
    """Every name used as a dimension, in source order."""
    out: List[str] = []

    def add(dims):
        for d in dims:
            if isinstance(d.value, str) and d.value not in out:
                out.append(d.value)
    for s in program.statements:
        t = getattr(s, "type", None)
        if t is not None:
            add(t.dims)
            if t.levels is not None:
                add((t.levels,))
        if isinstance(s, A.Sample):
            add(s.dims)
    return out


def _all_exprs(s: A.Stmt) -> List[A.Expr]:
    out: List[A.Expr] = []
    t = getattr(s, "type", None)
    if t is not None:
        out += [b.value for b in t.bounds]
    if isinstance(s, A.Sample):
        out += list(s.dist.args)
    if isinstance(s, A.Assign):
        out.append(s.expr)
    return out


def check(program: A.Program, source: Source, data=None) -> Model:
    """Check `program`; `data` is a loader `(decls, dim_symbols) -> DataSet` or None."""
    return _Checker(program, source).run(data)


class _Checker:
    def __init__(self, program: A.Program, source: Source):
        self.p = program
        self.src = source
        self.err = _Errors()
        self.defs: Dict[str, A.Stmt] = {}
        self.obs: Dict[str, A.Sample] = {}
        self.shapes: Dict[int, Shape] = {}
        self.values: Dict[str, np.ndarray] = {}
        self.node_shape: Dict[str, Optional[Shape]] = {}
        self.node_int: Dict[str, bool] = {}
        self.dims: Dict[str, int] = {}
        self.ops = NumpyOps()
        self.kinds: Dict[str, str] = {}
        self.row_share = None           # ppl.data.RowShare: this process read only its own rows

    # ---- phase 1: definitions ----------------------------------------------
    def definitions(self):
        first_line = {}
        for s in self.p.statements:
            if isinstance(s, A.Sample):
                continue
            if s.name in self.defs:
                self.err.add(s.name_span, f"'{s.name}' is already defined at line {first_line[s.name]}")
                continue
            self.defs[s.name] = s
            first_line[s.name] = s.span.line
        for s in self.p.statements:
            if not isinstance(s, A.Sample):
                continue
            prev = self.defs.get(s.name)
            if prev is None:
                self.defs[s.name] = s
                first_line[s.name] = s.span.line
            elif isinstance(prev, A.ParamDecl):
                self.err.add(s.name_span, f"'{s.name}' is declared `param` at line {first_line[s.name]} (a point "
                             f"estimate, with no prior); give it either `param {s.name}: ...` or `{s.name} ~ ...` "
                             f"(a latent with a prior), not both")
            elif isinstance(prev, (A.DataDecl, A.Assign)) and s.name not in self.obs:
                if s.type is not None:
                    self.err.add(s.type.span, f"'{s.name}' is data; its type is given by its declaration at line "
                                 f"{first_line[s.name]}, not here")
                self.obs[s.name] = s
            elif s.name in self.obs:
                self.err.add(s.name_span, f"'{s.name}' already has a distribution at line {self.obs[s.name].span.line}")
            else:
                what = "already has a distribution" if isinstance(prev, A.Sample) else "is already defined"
                self.err.add(s.name_span, f"'{s.name}' {what} at line {first_line[s.name]}")

    # ---- phase 2: names, functions, distributions ---------------------------------
    def resolve(self):
        syms = dim_symbols(self.p)
        self.syms = syms
        known = set(self.defs) | set(syms)
        params = {n: d for n, d in self.defs.items() if isinstance(d, A.ParamDecl)}
        for s in self.p.statements:
            for e in _all_exprs(s):
                for n in A.walk(e):
                    if isinstance(n, A.Name) and n.id not in known:
                        hint = did_you_mean(n.id, known)
                        self.err.add(n.span, f"unknown name '{n.id}'{hint}")
                    elif isinstance(n, A.Name) and n.id in params and \
                            (n.span.line, n.span.col) < (params[n.id].span.line, params[n.id].span.col):
                        self.err.add(n.span, f"'{n.id}' is used before its `param` declaration at line "
                                     f"{params[n.id].span.line}; declare a param before the statements that use it")
                    elif isinstance(n, A.Call):
                        self.check_function(n)
            if isinstance(s, A.Sample):
                self.check_dist(s.dist)
            t = getattr(s, "type", None)
            if t is not None:
                self.check_type(s, t)
        for sym in syms:
            d = self.defs.get(sym)
            if d is None:
                continue
            ok = (isinstance(d, A.Assign) or (isinstance(d, A.DataDecl) and not d.type.dims and d.type.base == "int"))
            if not ok:
                span = next(dm.span for s in self.p.statements for dm in self._dims_of(s) if dm.value == sym)
                self.err.add(span, f"'{sym}' is used as a size, but it is "
                             f"{'a latent' if isinstance(d, (A.Sample, A.FlatDecl)) else 'a param' if isinstance(d, A.ParamDecl) else 'not an integer scalar'} "
                             f"(defined at line {d.span.line})")

    @staticmethod
    def _dims_of(s):
        out = list(getattr(s, "dims", ()) or ())
        t = getattr(s, "type", None)
        if t is not None:
            out += list(t.dims) + ([t.levels] if t.levels else [])
        return out

    def check_function(self, c: A.Call):
        f = FN.REGISTRY.get(c.func)
        if f is None:
            if c.func in DS.REGISTRY:
                self.err.add(c.func_span, f"'{c.func}' is a distribution, not a function; use it after '~'")
            else:
                hint = did_you_mean(c.func, FN.REGISTRY)
                self.err.add(c.func_span, f"unknown function '{c.func}'{hint}" +
                             ("" if hint else f" (functions: {one_of(FN.REGISTRY)})"))
            return
        if len(c.args) != len(f.params):
            self.err.add(c.span, _arity_msg(c.func, f.params, len(c.args)))

    def check_dist(self, c: A.Call):
        spec = DS.REGISTRY.get(c.func)
        if spec is None:
            if c.func in FN.REGISTRY:
                self.err.add(c.func_span, f"'{c.func}' is a function, not a distribution")
            else:
                hint = did_you_mean(c.func, DS.REGISTRY)
                self.err.add(c.func_span, f"unknown distribution '{c.func}'{hint}" +
                             ("" if hint else f" (distributions: {one_of(DS.REGISTRY)})"))
            return
        if len(c.args) != spec.arity:
            self.err.add(c.span, _arity_msg(c.func, tuple(p for p, _ in spec.params), len(c.args)))

    def check_type(self, s: A.Stmt, t: A.TypeSpec):
        allowed = DATA_TYPES if isinstance(s, A.DataDecl) else LATENT_TYPES
        if t.base not in allowed:
            if isinstance(s, A.DataDecl) or t.base not in DATA_TYPES:
                hint = did_you_mean(t.base, allowed)
                self.err.add(t.span, f"unknown type '{t.base}'{hint}" + ("" if hint else f" (types: {one_of(allowed)})"))
            elif isinstance(s, A.ParamDecl):
                self.err.add(t.span, f"a param declared '{t.base}' would be discrete; a param is a continuous point "
                             f"estimate, optimised by gradient (declare it real)")
            elif isinstance(s, A.FlatDecl):
                self.err.add(t.span, f"a latent declared '{t.base}' would be discrete; a flat latent must be continuous "
                             f"(declare it real, or give it a discrete distribution with '~')")
            else:
                self.err.add(t.span, f"'{t.base}' is a data type; a latent's type is one of {one_of(LATENT_TYPES)}")
        keys = [b.key for b in t.bounds]
        for b in t.bounds:
            if b.key not in ("lower", "upper"):
                self.err.add(b.span, f"unknown bound '{b.key}'{did_you_mean(b.key, ['lower', 'upper'])} "
                             f"(bounds: lower, upper)")
            elif keys.count(b.key) > 1 and keys.index(b.key) != t.bounds.index(b):
                self.err.add(b.span, f"bound '{b.key}' is given twice")
        if t.bounds and t.base not in ("real", "int") and t.base in DATA_TYPES | LATENT_TYPES:
            self.err.add(t.bounds[0].span, f"bounds apply to real or int, not to '{t.base}'")
        if isinstance(s, A.DataDecl):
            for b in t.bounds:
                from ..data import _literal
                if b.key in ("lower", "upper") and _literal(b.value) is None:
                    self.err.add(b.value.span, "a data bound must be a number")
            if t.base == "level" and len(t.dims) != 1:
                self.err.add(t.span, "a level column has one dimension: level[N] of K")
            if s.pattern is not None and len(t.dims) != 2:
                self.err.add(t.span, f"`from \"{s.pattern}\"` gathers columns into a matrix; declare two dimensions, "
                             "like real[N, D]")

    # ---- phase 3: dependencies and cycles -------------------------------------
    def dependencies(self) -> nx.DiGraph:
        g = nx.DiGraph()
        for name in self.defs:
            g.add_node(name)
        for name, s in self.defs.items():
            stmts = [s] + ([self.obs[name]] if name in self.obs else [])
            for st in stmts:
                for e in _all_exprs(st):
                    for n in A.names_in(e):
                        if n.id in self.defs:
                            g.add_edge(n.id, name)
                for dm in self._dims_of(st):
                    if isinstance(dm.value, str) and dm.value in self.defs and dm.value != name:
                        g.add_edge(dm.value, name)
        order = {n: (self.defs[n].span.line, self.defs[n].span.col) for n in self.defs}   # source order
        for comp in sorted(nx.strongly_connected_components(g), key=lambda c: min(order[n] for n in c)):
            if len(comp) == 1:
                (n,) = comp
                if not g.has_edge(n, n):
                    continue
                loop = [n, n]
            else:
                start = min(comp, key=order.get)
                cyc = nx.find_cycle(g.subgraph(comp), source=start)
                loop = [u for u, _ in cyc] + [start]
            s = self.obs.get(loop[0]) or self.defs[loop[0]]
            self.err.add(s.name_span, f"'{loop[0]}' depends on itself: " + " -> ".join(
                reversed(loop)) if len(loop) > 2 else f"'{loop[0]}' depends on itself")
        return g

    # ---- phase 5: shapes and values ----------------------------------------------
    def resolve_dim(self, d: A.Dim) -> Union[int, str, None]:
        if isinstance(d.value, int):
            return d.value
        if d.value in self.dims:
            return self.dims[d.value]
        v = self.values.get(d.value)
        if v is not None and v.size == 1:
            f = float(v.reshape(-1)[0])
            if not np.isfinite(f) or f != int(f) or f < 0:
                self.err.add(d.span, f"the size {d.value} must be a non-negative whole number, got {f:g}")
                return None
            return int(f)
        if self.has_data:
            self.err.add(d.span, f"the size {d.value} is not given by any data "
                         f"(add \"{d.value}\": ... to a JSON file, or --set {d.value}=...)")
            return None
        return d.value

    def resolve_dims(self, dims) -> Optional[Shape]:
        out = tuple(self.resolve_dim(d) for d in dims)
        return None if any(x is None for x in out) else out

    def broadcast(self, a: Shape, b: Shape) -> Shape:
        n = max(len(a), len(b))
        pa, pb = (None,) * (n - len(a)) + tuple(a), (None,) * (n - len(b)) + tuple(b)
        out = []
        grew_a = grew_b = False
        for x, y in zip(pa, pb):
            if x is None or x == 1:
                r = 1 if y is None else y
                grew_a |= r != 1 and (x is not None or len(a) > 0)
            elif y is None or y == 1:
                r = x
                grew_b |= r != 1 and (y is not None or len(b) > 0)
            elif x == y:
                r = x
            elif isinstance(x, int) and isinstance(y, int):
                raise ShapeError(f"shapes {fmt(a)} and {fmt(b)} do not match")
            elif isinstance(x, str) and isinstance(y, str):
                raise ShapeError(f"shapes {fmt(a)} and {fmt(b)} do not match ({x} vs {y})")
            else:
                r = x if isinstance(x, int) else y
            out.append(r)
        if grew_a and grew_b:
            raise ShapeError(f"broadcasting {fmt(a)} with {fmt(b)} would give {fmt(tuple(out))}, which is surely "
                             f"not meant; make the shapes agree")
        return tuple(out)

    def infer(self, e: A.Expr) -> Optional[Tuple[Shape, bool]]:
        """-> (shape, is_int), or None after reporting an error."""
        r = self._infer(e)
        if r is not None:
            self.shapes[id(e)] = r[0]
        return r

    def _infer(self, e: A.Expr):
        if isinstance(e, A.Num):
            return (), e.is_int
        if isinstance(e, A.Name):
            if e.id in self.node_shape:
                shp = self.node_shape[e.id]
                return None if shp is None else (shp, self.node_int[e.id])
            if e.id in self.dims or e.id in self.syms:
                return (), True
            return None
        if isinstance(e, A.Neg):
            return self.infer(e.operand)
        if isinstance(e, A.BinOp):
            a, b = self.infer(e.left), self.infer(e.right)
            if a is None or b is None:
                return None
            try:
                if e.op == "@":
                    return self._matmul(a[0], b[0]), a[1] and b[1]
                shp = self.broadcast(a[0], b[0])
            except ShapeError as x:
                self.err.add(e.span, f"in '{e.op}': {x}")
                return None
            is_int = (a[1] and b[1] and e.op in "+-*") or e.op in A.COMPARISONS
            return shp, is_int
        if isinstance(e, A.Call):
            f = FN.REGISTRY.get(e.func)
            args = [self.infer(a) for a in e.args]
            if f is None or len(args) != len(f.params) or any(a is None for a in args):
                return None
            vals = []
            for i, a in enumerate(e.args):
                vals.append(None)
                if FN.SIZE_ARGS.get(e.func) == i:
                    vals[i] = self.size_value(a)
                    if vals[i] is None:
                        return None
            try:
                shp = f.shape(*[a[0] for a in args], values=vals)
            except ShapeError as x:
                self.err.add(e.span, f"{e.func}: {x}")
                return None
            return shp, f.int_result and all(a[1] for a in args)
        if isinstance(e, A.Index):
            base = self.infer(e.base)
            idx = [self.infer(i) for i in e.indices]
            if base is None or any(i is None for i in idx):
                return None
            shape = list(base[0])
            out: List = []
            pos = 0
            for ie, (ishape, iint) in zip(e.indices, idx):
                if pos >= len(shape):
                    self.err.add(ie.span, f"too many indexes: '{A_text(e.base)}' has shape {fmt(base[0])}")
                    return None
                if not iint:
                    self.err.add(ie.span, "an index must be an integer (int or level data, an integer literal "
                                 "or a discrete latent), not a real value")
                    return None
                n = shape[pos]
                self.check_index_range(ie, n, e.base)
                out.extend(ishape)
                pos += 1
            return tuple(out) + tuple(shape[pos:]), base[1]
        if isinstance(e, A.Vector):
            items = [self.infer(i) for i in e.items]
            if any(i is None for i in items):
                return None
            shp: Shape = ()
            try:
                for it in items:
                    shp = self.broadcast(shp, it[0])
            except ShapeError as x:
                self.err.add(e.span, f"vector elements: {x}")
                return None
            return (len(items),) + shp, all(i[1] for i in items)
        return None

    def _matmul(self, a: Shape, b: Shape) -> Shape:
        if len(a) not in (1, 2) or len(b) not in (1, 2):
            raise ShapeError(f"'@' needs matrices or vectors, got {fmt(a)} and {fmt(b)}")
        k1, k2 = a[-1], b[0]
        if k1 != k2 and not (isinstance(k1, str) or isinstance(k2, str)) or (isinstance(k1, str) and isinstance(k2, str) and k1 != k2):
            raise ShapeError(f"inner sizes differ: {fmt(a)} @ {fmt(b)}")
        return tuple(a[:-1]) + tuple(b[1:])

    def check_index_range(self, ie: A.Expr, n, base: A.Expr):
        v = self.const_value(ie)
        if v is None:
            return
        v = np.asarray(v)
        if v.size == 0:
            return
        lo, hi = v.min(), v.max()
        if lo < 1:
            self.err.add(ie.span, f"index {lo:g} is out of range: indexes start at 1")
        elif isinstance(n, int) and hi > n:
            what = f"index {hi:g}" if v.size == 1 else f"index values up to {hi:g}"
            self.err.add(ie.span, f"{what} out of range: '{A_text(base)}' has {n} element{'s' if n != 1 else ''}")

    def size_value(self, e: A.Expr):
        v = self.const_value(e)
        if v is None:
            if isinstance(e, A.Name) and (e.id in self.syms) and not self.has_data:
                return e.id
            if isinstance(e, A.Name) and e.id in self.syms:
                return None  # reported as an unbound size elsewhere
            self.err.add(e.span, "a size must be known when the data are loaded (a number, a size name or a constant)")
            return None
        v = np.asarray(v).reshape(-1)
        if v.size != 1 or not np.isfinite(v[0]) or v[0] != int(v[0]) or v[0] < 0:
            self.err.add(e.span, "a size must be a non-negative whole number")
            return None
        if v[0] > MAX_SIZE:
            self.err.add(e.span, f"a size of {v[0]:g} is too large (at most {MAX_SIZE:,})")
            return None
        return int(v[0])

    def const_value(self, e: A.Expr):
        """Value of an expression that uses only data/constants/sizes, else None."""
        names = A.names_in(e)
        for n in names:
            if n.id not in self.values and n.id not in self.dims:
                return None
        if id(e) not in self.shapes:
            return None
        known = {k: v[None, ...] for k, v in self.values.items()}
        known.update({k: np.asarray([v], dtype=np.int64) for k, v in self.dims.items() if k not in known})
        try:
            with np.errstate(all="ignore"):
                out = compile_expr(e, lambda x: len(self.shapes[id(x)]), known, self.ops).fn({})
        except (ValueError, IndexError, TypeError, KeyError, OverflowError):
            return None
        return np.asarray(out)[0]

    # ---- the whole check --------------------------------------------------------
    def run(self, data) -> Model:
        if not self.p.statements:
            self.err.add(self.p.span, "the model is empty: nothing to infer")
            self.err.raise_if_any()
        self.definitions()
        self.resolve()
        g = self.dependencies()
        if not nx.is_directed_acyclic_graph(g):
            self.err.raise_if_any()

        # after errors so far, the later phases go on (all errors are reported) without data
        decls = [s for s in self.defs.values() if isinstance(s, A.DataDecl)]
        self.has_data = data is not None and not self.err.items
        levels = {}
        if self.has_data:
            ds = data(decls, self.syms)
            self.values.update(ds.values)
            self.dims.update(ds.dims)
            levels = ds.levels
            self.row_share = getattr(ds, "rows", None)

        order_index = {n: i for i, n in enumerate(self.defs)}
        topo = list(nx.lexicographical_topological_sort(g, key=lambda n: order_index[n]))
        kinds: Dict[str, str] = {}
        for name in topo:
            s = self.defs[name]
            if isinstance(s, A.DataDecl):
                kinds[name] = "observed" if name in self.obs else "data"
            elif isinstance(s, A.Assign):
                own = {n.id for n in A.names_in(s.expr) if n.id in self.defs}
                const = all(kinds[p] in ("data", "constant") or (kinds[p] == "observed" and
                            not isinstance(self.defs[p], A.Sample)) for p in own)
                if name in self.obs:
                    if not const:
                        lat = sorted(p for p in own if kinds[p] not in ("data", "constant", "observed"))
                        self.err.add(self.obs[name].name_span,
                                     f"'{name}' depends on the latent '{lat[0]}', so it cannot be observed with '~'; "
                                     f"observe data, or data-only expressions")
                    kinds[name] = "observed"
                else:
                    kinds[name] = "constant" if const else "deterministic"
            elif isinstance(s, A.ParamDecl):
                kinds[name] = "param"
            else:
                kinds[name] = "latent"

        self.kinds = kinds
        nodes: Dict[str, Node] = {}
        for name in topo:
            node = self.check_node(name, kinds[name], tuple(g.predecessors(name)))
            if node is not None:
                nodes[name] = node
        if not any(k in ("latent", "param") for k in kinds.values()):
            first = self.p.statements[0]
            self.err.add(first.span, "nothing to infer: the model has no latent variable "
                         "(a '~' on a name that is not data, a 'NAME: TYPE' declaration, or a 'param')")
        if not self.err.items:          # on a model otherwise sound (no cascades from earlier errors)
            for node, msg in improper_flat_latents(nodes, self.const_value):
                self.err.add(node.name_span, msg)
        self.err.raise_if_any()
        # source order of the defining statements (self.defs lists `~` statements last)
        ordered = {n: nodes[n] for n in sorted(self.defs, key=lambda n: (self.defs[n].span.line,
                                                                         self.defs[n].span.col))}
        model = Model(self.src, self.p, ordered, tuple(topo), dict(self.dims),
                      {k: v for k, v in self.values.items()}, self.shapes, self.has_data, levels)
        model.rows = row_axis(model)
        model.row_share = self.row_share
        model.encoders = check_encoders(model)
        return model

    def check_node(self, name: str, kind: str, deps: Tuple[str, ...]) -> Optional[Node]:
        s = self.defs[name]
        obs = self.obs.get(name)
        shape: Optional[Shape] = None
        is_int = False
        dist = None
        constraint = None
        declared = False
        discrete = False
        expr = None
        decl = None
        if isinstance(s, A.DataDecl):
            decl = s.type
            shape = self.resolve_dims(s.type.dims)
            is_int = s.type.base in ("int", "level")
            if s.type.base == "level" and s.type.levels is not None:
                self.resolve_dim(s.type.levels)
        elif isinstance(s, A.Assign):
            r = self.infer(s.expr)
            expr = s.expr
            if r is not None:
                shape, is_int = r
                if kind in ("constant", "observed") and self.has_data or (kind == "constant" and
                                                                          not A.names_in(s.expr)):
                    v = self.const_value(s.expr)
                    if v is not None:
                        if not np.all(np.isfinite(v)):
                            bad = "NaN" if np.any(np.isnan(v)) else "infinite"
                            self.err.add(s.expr.span, f"the constant '{name}' has {bad} values "
                                         f"(for example, log of a non-positive number)")
                        else:
                            self.values[name] = np.asarray(v)
        elif isinstance(s, (A.FlatDecl, A.ParamDecl)):
            decl = s.type
            shape = self.resolve_dims(s.type.dims)
            constraint = self.constraint_of(s.type)
            declared = True
            if isinstance(s, A.ParamDecl):
                for b in s.type.bounds:
                    if any(self.kinds.get(n.id) not in (None, "data", "constant") and
                           not isinstance(self.defs.get(n.id), A.DataDecl) for n in A.names_in(b.value)):
                        self.err.add(b.value.span, "a param's bound must be a constant (numbers, data or "
                                     "constants), not a latent or another param")
        elif isinstance(s, A.Sample):
            decl = s.type
            dims = s.dims if s.dims else (s.type.dims if s.type is not None else ())
            declared_shape = self.resolve_dims(dims) if dims else None
            dist, shape, discrete = self.check_sample(s, declared_shape, bool(dims))
            is_int = discrete
            if s.type is not None:
                constraint = self.constraint_of(s.type)
                declared = True
                if discrete:
                    self.err.add(s.type.span, f"'{name}' has a discrete distribution; it cannot take a declared "
                                 f"constraint")
                elif dist is not None:
                    self.check_constraint_fits(s, constraint)
        if obs is not None:
            data_shape = shape
            d, _, disc = self.check_sample(obs, data_shape, data_shape is not None, observed=name)
            dist = d
            if disc and not is_int and d is not None:
                self.err.add(obs.dist.func_span, f"'{obs.dist.func}' is a discrete distribution, but '{name}' is "
                             f"{'declared real' if isinstance(s, A.DataDecl) else 'real-valued'}"
                             + ("; declare it int" if isinstance(s, A.DataDecl) else ""))
            elif d is not None and name in self.values:
                self.check_support(obs, name, DS.REGISTRY[d.spec])
        self.node_shape[name] = shape
        self.node_int[name] = is_int
        if shape is None:
            return None
        return Node(name, kind, s.span, s.name_span, shape, is_int, dist, expr, constraint, declared, discrete,
                    deps, decl)

    def check_sample(self, s: A.Sample, target: Optional[Shape], has_target: bool, observed: str = ""):
        spec = DS.REGISTRY.get(s.dist.func)
        if spec is None or len(s.dist.args) != spec.arity:      # reported by resolve()
            for a in s.dist.args:
                self.infer(a)
            return None, (target if has_target else None), False
        args = [self.infer(a) for a in s.dist.args]
        use = DistUse(spec.name, s.dist.args, s.dist.span, s.dist.func_span)
        if any(a is None for a in args) or (has_target and target is None):
            return use, target, spec.discrete
        try:
            batch, event = spec.value_shape([a[0] for a in args], self.broadcast)
        except ShapeError as x:
            self.err.add(s.dist.span, f"{spec.name}: {x}")
            return use, target, spec.discrete
        if event is None:
            if not has_target or len(target) < spec.event_rank:
                self.err.add(s.name_span, f"'{s.name}' needs its shape declared for {spec.name}, "
                             f"like {s.name}[K, K]")
                return use, None, spec.discrete
            event = tuple(target[len(target) - spec.event_rank:])
            if spec.event_rank == 2 and isinstance(event[0], int) and isinstance(event[1], int) and event[0] != event[1]:
                self.err.add(s.name_span, f"{spec.name} needs a square matrix, got {fmt(event)}")
        natural = tuple(batch) + tuple(event)
        if not has_target:
            shape = natural
        else:
            shape = target
            try:
                b = self.broadcast(natural, target)
                if b != tuple(target) or len(natural) > len(target):
                    raise ShapeError("")
                if event and tuple(target[len(target) - len(event):]) != tuple(event) and all(
                        isinstance(x, int) for x in tuple(event) + tuple(target)):
                    raise ShapeError("")
            except ShapeError:
                who = f"data '{observed}'" if observed else f"'{s.name}'"
                self.err.add(s.dist.span, f"{spec.name}(...) has shape {fmt(natural)}, which does not fit "
                             f"{who} of shape {fmt(target)}")
        self.check_args(s.dist, spec)
        return use, shape, spec.discrete

    def check_args(self, call: A.Call, spec: DS.DistSpec):
        for (pname, kind), a in zip(spec.params, call.args):
            v = self.const_value(a)
            if v is None:
                continue
            v = np.asarray(v, dtype=float)
            label, test = DS.PARAM_CHECKS.get(kind, ("", None))
            if kind == "simplex":
                ok = np.all(v >= 0) and np.allclose(v.sum(-1), 1.0, atol=1e-6)
                if not ok:
                    self.err.add(a.span, f"{spec.name}'s {pname} must be {label}")
                continue
            if test is None:
                continue
            with np.errstate(all="ignore"):
                bad = ~test(v)
            if np.any(bad):
                first = v.reshape(-1)[np.argmax(bad.reshape(-1))]
                self.err.add(a.span, f"{spec.name}'s {pname} must be {label}, got {first:g}")

    def check_support(self, obs: A.Sample, name: str, spec: DS.DistSpec):
        """Observed values must lie in the distribution's support."""
        v = np.asarray(self.values[name], dtype=float)
        t = SUPPORTS[spec.support].contains
        if t is None or v.size == 0:
            return
        bad = ~t[0](v)
        if np.any(bad):
            i = int(np.argmax(bad.reshape(-1)))
            self.err.add(obs.name_span, f"{spec.name} needs '{name}' to be {t[1]}, but element "
                         f"{self.elements_before(v) + i + 1} is {v.reshape(-1)[i]:g}")

    def elements_before(self, v: np.ndarray) -> int:
        """Elements of a row-axis value on the rows before this process's own (each process reads its own
        rows under --procs), so that messages number elements as one process reading all rows would."""
        share = self.row_share
        if share is None or share.lo == 0 or v.ndim == 0 or v.shape[0] != share.hi - share.lo:
            return 0
        return share.lo * (v.size // v.shape[0])

    def constraint_of(self, t: A.TypeSpec) -> Optional[Constraint]:
        lo = next((b.value for b in t.bounds if b.key == "lower"), None)
        hi = next((b.value for b in t.bounds if b.key == "upper"), None)
        for b in (lo, hi):
            if b is not None:
                r = self.infer(b)
                if r is not None and r[0] != ():
                    self.err.add(b.span, "a bound must be a scalar")
        if t.base == "real":
            kind = "interval" if lo is not None and hi is not None else "lower" if lo is not None else \
                "upper" if hi is not None else "real"
            if kind == "interval":
                a, b = _scalar_or_none(self.const_value(lo)), _scalar_or_none(self.const_value(hi))
                if a is not None and b is not None and not float(a) < float(b):
                    self.err.add(t.span, f"the lower bound {float(a):g} must be below the upper bound {float(b):g}")
            return Constraint(kind, lo, hi, t.span)
        mapping = {"positive": "positive", "ordered": "ordered", "simplex": "simplex",
                   "cholesky_factor_corr": "corr_cholesky"}
        if t.base in mapping:
            if t.base in ("ordered", "simplex") and len(t.dims) != 1:
                self.err.add(t.span, f"{t.base} is a vector type: {t.base}[K]")
            if t.base == "cholesky_factor_corr" and len(t.dims) != 2:
                self.err.add(t.span, "cholesky_factor_corr is a matrix type: cholesky_factor_corr[K, K]")
            return Constraint(mapping[t.base], span=t.span)
        return None

    def check_constraint_fits(self, s: A.Sample, c: Optional[Constraint]):
        if c is None:
            return
        spec = DS.REGISTRY[s.dist.func]
        sup = spec.support
        if c.kind not in SUPPORTS[sup].fits:
            self.err.add(s.type.span, f"'{s.name}' is declared {c.text()}, but {spec.name}'s support is "
                         f"{SUPPORTS[sup].text}; declare a set inside the support, or drop the type")
            return
        lo = _scalar_or_none(self.const_value(c.lower)) if c.lower is not None else None
        hi = _scalar_or_none(self.const_value(c.upper)) if c.upper is not None else None
        if sup == "positive" and c.kind in ("lower", "interval") and lo is not None and float(lo) < 0:
            self.err.add(s.type.span, f"'{s.name}' may be negative, but {spec.name}'s support is (0, inf)")
        if sup == "unit_interval" and ((lo is not None and float(lo) < 0) or (hi is not None and float(hi) > 1)
                                       or c.kind != "interval"):
            self.err.add(s.type.span, f"'{s.name}' must lie in (0, 1) for {spec.name}; declare real<lower=0, upper=1>")


# flat (no `~`) latents on these sets have infinite prior mass; on an interval, a simplex or a
# correlation matrix a flat prior is proper
UNBOUNDED_FLAT = {"real", "lower", "upper", "positive", "ordered"}


def improper_flat_latents(nodes: Dict[str, Node], const_value) -> List[Tuple[Node, str]]:
    """Flat latents whose posterior is surely improper: no likelihood term reaches them.

    A flat latent x on an unbounded set has a proper posterior only if some factor of the joint
    that involves x is informative.  The factors below x in the DAG are the densities of its
    descendants.  A latent's own distribution integrates to 1 over that latent whatever its
    parents, so if no descendant of x is observed (a `~` on data), integrating out the descendant
    latents from the leaves up leaves a factor constant in x: improper.  Exceptions, kept as
    informative (never flagged): a descendant latent whose declared set truncates its
    distribution's support, or whose bounds vary with latents (its normaliser then depends on x).
    Being reached by data is necessary, not sufficient (a flat ridge `y ~ normal(a + b, 1)` is
    reached and still improper): the fit's detector (ppl/infer/improper.py) handles those.
    -> [(node, message)] in source order."""
    children: Dict[str, List[str]] = {n: [] for n in nodes}
    for name, node in nodes.items():
        for d in node.deps:
            if d in children:
                children[d].append(name)

    def informative(n: str) -> bool:
        node = nodes[n]
        if node.kind == "observed":
            return node.dist is not None
        return node.kind == "latent" and _informs_parents(node, nodes, const_value)

    out = []
    for x in sorted(nodes.values(), key=lambda n: (n.span.line, n.span.col)):
        if x.kind != "latent" or x.dist is not None or x.constraint is None or \
                x.constraint.kind not in UNBOUNDED_FLAT:
            continue
        below, stack = set(), list(children[x.name])
        while stack:
            n = stack.pop()
            if n not in below:
                below.add(n)
                stack.extend(children[n])
        if any(informative(n) for n in below):
            continue
        # the latents whose distributions use x directly (through deterministic nodes only)
        users, seen, stack = [], set(), list(children[x.name])
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if nodes[n].kind == "deterministic":
                stack.extend(children[n])
            elif nodes[n].dist is not None:
                users.append(nodes[n])
        dims = x.decl.dims if x.decl is not None else ()
        sample = x.name + (f"[{', '.join(str(d.value) for d in dims)}]" if dims else "")
        fix = f"so its posterior is improper; give it a prior ({sample} ~ ...) or use it in the model"
        if not users:
            msg = f"'{x.name}' has a flat prior and no likelihood term uses it, {fix}"
        else:
            users.sort(key=lambda n: (n.span.line, n.span.col))
            names = ", ".join(f"'{u.name}'" for u in users)
            msg = (f"'{x.name}' has a flat prior and no likelihood term depends on it (only the "
                   f"prior{'s' if len(users) > 1 else ''} of {names}, which no data depend on), {fix}")
        out.append((x, msg))
    return out


def _informs_parents(node: Node, nodes: Dict[str, Node], const_value) -> bool:
    """A latent whose normalising constant can depend on its parents: bounds that vary with
    latents, or a declared set narrower than its distribution's support (a truncation)."""
    c = node.constraint
    if c is None or not node.declared:
        return False
    for b in (c.lower, c.upper):
        if b is not None and any(n.id in nodes and nodes[n.id].kind in ("latent", "deterministic")
                                 for n in A.names_in(b)):
            return True
    if node.dist is None:
        return False
    sup = DS.REGISTRY[node.dist.spec].support
    lo = _scalar_or_none(const_value(c.lower)) if c.lower is not None else None
    hi = _scalar_or_none(const_value(c.upper)) if c.upper is not None else None
    same = (c.kind == sup or (sup == "positive" and c.kind == "lower" and lo == 0)
            or (sup == "unit_interval" and c.kind == "interval" and lo == 0 and hi == 1))
    return not same


def _scalar_or_none(v) -> Optional[float]:
    """A constant bound as a float; None when unknown or not a scalar (reported elsewhere)."""
    return None if v is None or np.size(v) != 1 else float(np.asarray(v, dtype=float).reshape(-1)[0])


def _arity_msg(name: str, params: Sequence[str], got: int) -> str:
    n = len(params)
    return (f"{name} takes {n} argument{'s' if n != 1 else ''} ({', '.join(params)}), "
            f"got {got}")
