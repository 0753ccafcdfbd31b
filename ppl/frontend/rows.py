"""The row axis (the plate): which nodes are per data row and which are global.

Stage: checked IR (`Model`) -> `RowAxis` (torch-free).

The row axis is the leading dimension that the data declarations share
(`data y: real[N]`, `data X: real[N, D] from "x*"`: N; eight schools: J).
A node is *per-row* when its value's leading axis is that axis, row by row:
row data, a latent declared `z[N] ~ ...` (a local latent), and expressions
that keep the rows apart (elementwise arithmetic, `X @ beta`, `a[county]`,
functions that work along the last axis of a matrix).  A node that uses
per-row values but not row by row (`sum(y)`, `y[1]`, `cumsum(y)`,
`[y, x]`) *mixes rows*; its density term cannot be split by rows.

The compiled model passes per-row data through the data batch (a minibatch
takes some rows and scales per-row terms by N/B); everything else is
global and is folded at compile time where it is constant.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional

from .. import functions as FN
from . import ast as A

ROW, GLOBAL, MIXED = "row", "global", "mixed"


@dataclass(frozen=True)
class RowAxis:
    symbol: Optional[str]                 # the dimension symbol of the rows (None: no row axis)
    size: Optional[int]                   # its value once data are bound
    per_row: FrozenSet[str]               # nodes whose leading axis is the row axis
    mixes_rows: FrozenSet[str]            # nodes that depend on rows, but not row by row

    def is_row(self, name: str) -> bool:
        return name in self.per_row


NO_ROWS = RowAxis(None, None, frozenset(), frozenset())


def _declared_dims(s: A.Stmt):
    if isinstance(s, A.Sample):
        return s.dims if s.dims else (s.type.dims if s.type is not None else ())
    t = getattr(s, "type", None)
    return t.dims if t is not None else ()


def row_symbol(program: A.Program) -> Optional[str]:
    """The symbol that leads the most data declarations (the first such, on a tie)."""
    return lead_symbol([s for s in program.statements if isinstance(s, A.DataDecl)])


def lead_symbol(decls) -> Optional[str]:
    """Of these data declarations: the symbol that leads the most (the first such, on a tie)."""
    leads = [d.type.dims[0].value for d in decls if d.type.dims and isinstance(d.type.dims[0].value, str)]
    if not leads:
        return None
    counts = Counter(leads)
    return max(leads, key=lambda d: (counts[d], -leads.index(d)))


def row_axis(model) -> RowAxis:
    """Classify every node of a checked model (see the module docstring)."""
    sym = row_symbol(model.program)
    if sym is None:
        return NO_ROWS
    stmts: Dict[str, A.Stmt] = {}
    for s in model.program.statements:
        stmts.setdefault(s.name, s)
    kind: Dict[str, str] = {}

    def of(e: A.Expr) -> str:
        return _rowness(e, kind, model.rank)

    for name in model.order:
        node = model.nodes[name]
        s = stmts[name]
        if isinstance(s, A.Assign):
            k = of(s.expr)
        else:
            dims = _declared_dims(s)
            k = ROW if dims and dims[0].value == sym else GLOBAL
        if node.dist is not None and k == GLOBAL and any(of(a) != GLOBAL for a in node.dist.args):
            k = MIXED                     # a global term that reads rows
        kind[name] = k
    size = model.dims.get(sym)
    return RowAxis(sym, size if isinstance(size, int) else None,
                   frozenset(n for n, k in kind.items() if k == ROW),
                   frozenset(n for n, k in kind.items() if k == MIXED))


def _rowness(e: A.Expr, kind: Dict[str, str], rank) -> str:
    if isinstance(e, A.Num):
        return GLOBAL
    if isinstance(e, A.Name):
        return kind.get(e.id, GLOBAL)
    if isinstance(e, A.Neg):
        return _rowness(e.operand, kind, rank)
    if isinstance(e, A.BinOp):
        a, b = _rowness(e.left, kind, rank), _rowness(e.right, kind, rank)
        if MIXED in (a, b):
            return MIXED
        if e.op == "@":
            return ROW if (a, b) == (ROW, GLOBAL) and rank(e.left) == 2 else (GLOBAL if a == b == GLOBAL else MIXED)
        r = max(rank(e.left), rank(e.right))
        rows = [x for x, k in ((e.left, a), (e.right, b)) if k == ROW]
        if not rows:
            return GLOBAL
        return ROW if all(rank(x) == r for x in rows) else MIXED   # broadcasting right-aligns: rows must lead
    if isinstance(e, A.Call):
        ks = [_rowness(a, kind, rank) for a in e.args]
        if all(k == GLOBAL for k in ks):
            return GLOBAL
        if MIXED in ks:
            return MIXED
        axes = FN.REGISTRY[e.func].axes
        if axes == "elementwise":
            return ROW
        if axes == "last" and all(rank(a) >= 2 for a, k in zip(e.args, ks) if k == ROW):
            return ROW
        return MIXED
    if isinstance(e, A.Index):
        base = _rowness(e.base, kind, rank)
        ks = [_rowness(i, kind, rank) for i in e.indices]
        if base != GLOBAL or MIXED in ks:
            return MIXED                  # picks or reorders rows
        if all(k == GLOBAL for k in ks):
            return GLOBAL
        # the result's axes are the indexes' axes in order: rows lead when the first index with
        # axes is a per-row vector and no later index has axes
        ranked = [(i, k) for i, k in zip(e.indices, ks) if rank(i) > 0]
        if ranked and ranked[0][1] == ROW and rank(ranked[0][0]) == 1 and len(ranked) == 1:
            return ROW
        return MIXED
    if isinstance(e, A.Vector):
        return GLOBAL if all(_rowness(i, kind, rank) == GLOBAL for i in e.items) else MIXED
    return MIXED
