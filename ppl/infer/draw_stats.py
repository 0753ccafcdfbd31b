"""Summaries of draws (mean, sd, quantiles) that stay quiet on extreme columns.

A deterministic node can overflow in some draws (`exp(exp(exp(x)))`: inf beyond x ~ 2) or take
huge finite values (`tau ^ 60` of a half-Cauchy tau: 1e155), and NumPy then warns on the user's
terminal ("invalid value encountered in subtract", "overflow encountered in square") and answers
NaN where the answer is known.  Here:

- a column with +-inf draws (no NaN): the mean is that infinity (NaN when both signs occur), the
  sd is inf, and a quantile whose two neighbouring order statistics are both +-inf is that
  infinity (NumPy's linear interpolation computes inf - inf);
- a finite column too large to square (max |x| > HUGE): mean and sd computed on x / max|x|,
  then scaled back;
- a column with NaN draws: NaN statistics, without a warning;
- every other column: exactly NumPy's numbers (the same calls, the same bits).

numpy only.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

PROBS = (0.05, 0.5, 0.95)
HUGE = 1e150       # beyond this, x * x overflows float64 (and sums of many x may)


def column_stats(flat: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, k) draws -> (quantiles (3, k) at 5/50/95%, means (k,), sds (k,), ddof 1; zeros for n = 1)."""
    flat = np.asarray(flat)
    n, k = flat.shape
    finite = np.isfinite(flat)
    with np.errstate(all="ignore"):           # the columns that warn are repaired below
        q = np.quantile(flat, PROBS, axis=0)
        mean = flat.mean(0)
        sd = flat.std(0, ddof=1) if n > 1 else np.zeros(k)
    if finite.all() and (k == 0 or float(np.abs(flat).max()) <= HUGE):
        return q, mean, sd
    for j in range(k):
        col = flat[:, j]
        if np.isnan(col).any():
            q[:, j], mean[j], sd[j] = np.nan, np.nan, np.nan
        elif not finite[:, j].all():
            q[:, j] = _quantiles_with_inf(col)
            pos, neg = (col == np.inf).any(), (col == -np.inf).any()
            mean[j] = np.nan if pos and neg else (np.inf if pos else -np.inf)
            sd[j] = np.inf if n > 1 else 0.0
        else:
            s = np.abs(col).max()
            if s > HUGE:
                x = col / s
                mean[j] = s * x.mean()
                sd[j] = s * x.std(ddof=1) if n > 1 else 0.0
    return q, mean, sd


def _quantiles_with_inf(col: np.ndarray) -> np.ndarray:
    """Linear-interpolation quantiles (NumPy's default) of a column with +-inf and no NaN."""
    x = np.sort(col)
    out = np.empty(len(PROBS))
    for i, p in enumerate(PROBS):
        pos = p * (len(x) - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, len(x) - 1)
        t = pos - lo
        a, b = x[lo], x[hi]
        if t == 0 or a == b:
            out[i] = a
        elif a == -np.inf and b == np.inf:
            out[i] = np.nan                  # between -inf and +inf: no value
        elif a == -np.inf or b == np.inf:
            out[i] = a if a == -np.inf else b  # any weight on an infinite neighbour
        else:
            out[i] = a + (b - a) * t
    return out


def spread(x: np.ndarray) -> float:
    """np.std of finite values, without overflow for huge ones."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return 0.0
    s = np.abs(x).max()
    if s > HUGE:
        return float(s * np.std(x / s))
    return float(np.std(x))


def weighted_column_stats(flat: np.ndarray, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, k) draws with normalised importance weights w (n,) -> (quantiles (3, k), means, sds), the
    weighted counterparts of `column_stats`: mean sum w x; variance sum w (x - mean)^2 / (1 - sum w^2)
    (unbiased for reliability weights: ddof 1 when the weights are equal); quantiles from the weighted
    empirical distribution, each draw's mass centred on it.  Columns that are not all finite keep
    `column_stats`'s unweighted answer."""
    flat = np.asarray(flat, dtype=float)
    w = np.asarray(w, dtype=float)
    w = w / w.sum()
    q, mean, sd = column_stats(flat)
    n, k = flat.shape
    if n < 2 or k == 0:
        return q, mean, sd
    finite = np.isfinite(flat).all(0) & (np.abs(flat).max(0, initial=0.0) <= HUGE)
    if not finite.any():
        return q, mean, sd
    x = flat[:, finite]
    m = w @ x
    denom = 1.0 - float(w @ w)
    var = (w @ (x - m) ** 2) / denom if denom > 0 else np.zeros_like(m)
    mean[finite], sd[finite] = m, np.sqrt(np.maximum(var, 0.0))
    order = np.argsort(x, axis=0, kind="stable")
    xs = np.take_along_axis(x, order, 0)
    ws = w[order]
    cum = np.cumsum(ws, 0) - 0.5 * ws                     # each draw's mass centred on it
    qs = np.empty((len(PROBS), x.shape[1]))
    for j in range(x.shape[1]):
        qs[:, j] = np.interp(PROBS, cum[:, j], xs[:, j])
    q[:, finite] = qs
    return q, mean, sd
