"""Readable summaries: a fit's draws + the checked model -> the rows of the
printed table and of summary.csv.

- Names are Stan-style and 1-based (`a[3]`); where an axis is a dimension
  symbol bound by a `level[N] of K` column, its labels name the elements
  (`a[Carver]`, shown beside the index name).
- Discrete latents are summarised by the probability of each value they take
  (when they take at most MAX_VALUES values), not by a mean of category
  numbers; a discrete latent with more than MANY elements is left out of the
  default table, and the table says how many rows were left out.
- `vars` chooses what is shown: node names, globs over node names (`sigma*`),
  or element names (`a[3]`, `a[Carver]`); `quantiles` the probabilities of
  the quantile columns; `hdi` adds the highest-density interval of that mass.

Stage: draws (name -> (S, *shape)) + `Model` -> `Summary`.  numpy only.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import UsageError
from .frontend import ast as A
from .infer.draw_stats import column_stats

DEFAULT_QUANTILES = (0.05, 0.5, 0.95)
MANY = 20           # a discrete latent with more elements is hidden from the default table
MAX_VALUES = 10     # a discrete latent taking more distinct values is summarised like a continuous one


# ---- names: dimension symbols, level labels, flattened names ---------------------------------------------
def dim_symbols(model, name: str, shape: Sequence[int]) -> List[Optional[str]]:
    """The dimension symbol of each axis of node `name` (None where there is none): from its declaration
    (`a[K] ~ ...`, `data y: real[N]`, `mu: ordered[K] ~ ...`), else, for a computed node, the one symbol
    whose size is the axis's length."""
    declared = _declared_dims(model, name)
    if declared is not None and len(declared) == len(shape):
        return [d.value if isinstance(d.value, str) else None for d in declared]
    out = []
    for n in shape:
        same = [s for s, v in model.dims.items() if v == n]
        out.append(same[0] if len(same) == 1 else None)
    return out


def _declared_dims(model, name: str):
    for st in model.program.statements:
        if getattr(st, "name", None) != name:
            continue
        if isinstance(st, A.Sample):
            return st.dims or (st.type.dims if st.type is not None else ())
        if isinstance(st, (A.DataDecl, A.FlatDecl)):
            return st.type.dims
    return None


def level_labels(model) -> Dict[str, List[str]]:
    """Dimension symbol -> the labels of its levels (from a `level[N] of K` column whose labels were not
    the numbers 1..K already)."""
    out: Dict[str, List[str]] = {}
    for st in model.program.statements:
        if isinstance(st, A.DataDecl) and st.type.base == "level" and st.type.levels is not None:
            labels = model.levels.get(st.name)
            sym = st.type.levels.value
            if labels and isinstance(sym, str) and labels != [str(i + 1) for i in range(len(labels))]:
                out.setdefault(sym, list(labels))
    return out


def coordinates(model, name: str, shape: Sequence[int]) -> List[Optional[List[str]]]:
    """Per axis of node `name`: the labels of its elements, or None (plain 1-based indexes)."""
    labels = level_labels(model)
    out = []
    for sym, n in zip(dim_symbols(model, name, shape), shape):
        lab = labels.get(sym) if sym is not None else None
        out.append(lab if lab is not None and len(lab) == n else None)
    return out


def flat_names(name: str, shape: Sequence[int]) -> List[str]:
    """`theta[1]`, ..., `L[2,1]`: Stan-style, 1-based, row-major."""
    if not shape:
        return [name]
    return [f"{name}[{','.join(str(i + 1) for i in idx)}]" for idx in np.ndindex(*shape)]


def flat_labels(model, name: str, shape: Sequence[int]) -> List[str]:
    """As `flat_names`, with level labels where an axis has them (`a[Carver]`, `b[Carver,2]`)."""
    coords = coordinates(model, name, shape)
    if not shape or all(c is None for c in coords):
        return flat_names(name, shape)
    return [f"{name}[{','.join(str(i + 1) if c is None else c[i] for i, c in zip(idx, coords))}]"
            for idx in np.ndindex(*shape)]


# ---- choosing variables ------------------------------------------------------------------------------------
def parse_vars(text: Optional[str]) -> Optional[List[str]]:
    """`--vars` as given (a comma-separated list; brackets may hold commas) -> items, or None."""
    if text is None:
        return None
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    items.append(cur.strip())
    items = [i for i in items if i]
    if not items:
        raise UsageError("--vars needs at least one name")
    return items


def parse_quantiles(text) -> Tuple[float, ...]:
    """`--quantiles 0.025,0.5,0.975` (or a sequence of numbers) -> probabilities in (0, 1), sorted."""
    if text is None:
        return DEFAULT_QUANTILES
    parts = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for p in parts:
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise UsageError(f"--quantiles takes probabilities between 0 and 1, got {str(p).strip()!r}") from None
        if not 0 < v < 1:
            raise UsageError(f"--quantiles takes probabilities between 0 and 1 (exclusive), got {v:g}")
        out.append(v)
    if not out:
        raise UsageError("--quantiles needs at least one probability")
    return tuple(sorted(set(out)))


def quantile_column(p: float) -> str:
    """0.05 -> q5, 0.025 -> q2.5, 0.5 -> q50."""
    return "q" + f"{100 * p:.6g}"


def select(model, draws: Dict[str, np.ndarray], vars: Optional[Sequence[str]]) -> Dict[str, Optional[set]]:
    """-> node name -> the flat indexes chosen (None: every element), in the draws' order.  A name that
    matches nothing is a usage error naming what there is."""
    if vars is None:
        return {k: None for k in draws}
    chosen: Dict[str, Optional[set]] = {}
    for item in vars:
        hit = False
        if "[" in item:
            base = item.split("[", 1)[0]
            if base in draws:
                shape = draws[base].shape[1:]
                for names in (flat_names(base, shape), flat_labels(model, base, shape)):
                    if item.replace(" ", "") in [n.replace(" ", "") for n in names]:
                        j = [n.replace(" ", "") for n in names].index(item.replace(" ", ""))
                        if chosen.get(base, set()) is not None:
                            chosen.setdefault(base, set()).add(j)
                        hit = True
                        break
        else:
            for k in draws:
                if fnmatch.fnmatchcase(k, item):
                    chosen[k] = None
                    hit = True
        if not hit:
            raise UsageError(f"--vars: nothing is called {item!r} (variables: {', '.join(draws)})")
    return {k: chosen[k] for k in draws if k in chosen}


# ---- the summary ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str                    # a[3]
    label: str                   # a[Carver] (= name without labels)
    values: Dict[str, float]     # column -> value


@dataclass
class DiscreteRow:
    name: str
    label: str
    probs: Dict[int, float]      # value -> probability


@dataclass
class Summary:
    columns: List[str]
    rows: List[Row] = field(default_factory=list)
    discrete: List[DiscreteRow] = field(default_factory=list)
    hidden: List[Tuple[str, int]] = field(default_factory=list)     # (node, elements left out)


def hdi(col: np.ndarray, mass: float) -> Tuple[float, float]:
    """The narrowest interval holding `mass` of the draws (as ArviZ's `hdi` for one mode)."""
    x = np.sort(col[np.isfinite(col)])
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    k = max(1, int(np.floor(mass * n)))
    if k >= n:
        return float(x[0]), float(x[-1])
    widths = x[k:] - x[:n - k]
    i = int(np.argmin(widths))
    return float(x[i]), float(x[i + k])


def summarize(model, draws: Dict[str, np.ndarray], vars=None, quantiles=None, hdi_mass=None,
              discrete_names: Sequence[str] = (), moments=None) -> Summary:
    """`moments`: name -> (mean, sd) arrays that replace the draws' mean and sd (the Rao-Blackwellised
    moments of enumerated latents, `Fit.moments`)."""
    probs = parse_quantiles(quantiles)
    if hdi_mass is not None and not 0 < hdi_mass < 1:
        raise UsageError(f"--hdi takes a probability between 0 and 1 (exclusive), got {hdi_mass:g}")
    qcols = [quantile_column(p) for p in probs]
    columns = ["mean", "sd"] + qcols + ([f"hdi{100 * hdi_mass:.6g}_lo", f"hdi{100 * hdi_mass:.6g}_hi"]
                                        if hdi_mass is not None else [])
    out = Summary(columns)
    chosen = select(model, draws, vars)
    for name, idx in chosen.items():
        arr = draws[name]
        shape = arr.shape[1:]
        flat = arr.reshape(arr.shape[0], -1)
        names, labels = flat_names(name, shape), flat_labels(model, name, shape)
        cols = range(flat.shape[1]) if idx is None else sorted(idx)
        if name in discrete_names:
            values = np.unique(flat[np.isfinite(flat)])
            if len(values) <= MAX_VALUES:
                if idx is None and vars is None and flat.shape[1] > MANY:
                    out.hidden.append((name, flat.shape[1]))
                    continue
                for j in cols:
                    c = flat[:, j]
                    out.discrete.append(DiscreteRow(names[j], labels[j],
                                                    {int(v): float(np.mean(c == v)) for v in values}))
                continue
        sub = flat[:, list(cols)]
        q, mean, sd = column_stats(sub)
        if probs != DEFAULT_QUANTILES:
            with np.errstate(all="ignore"):
                q = np.quantile(sub, probs, axis=0)
        if moments and name in moments:
            mean, sd = (np.asarray(a).reshape(-1)[list(cols)] for a in moments[name])
        for c, j in enumerate(cols):
            v = {"mean": float(mean[c]), "sd": float(sd[c])}
            v.update({qc: float(q[i, c]) for i, qc in enumerate(qcols)})
            if hdi_mass is not None:
                v[columns[-2]], v[columns[-1]] = hdi(sub[:, c], hdi_mass)
            out.rows.append(Row(names[j], labels[j], v))
    return out
