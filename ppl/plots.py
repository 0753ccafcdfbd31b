"""Plots of a fit, as PNG bytes (matplotlib: the `plot` extra).

Kinds (`ppl plot FIT_DIR --kind KIND`, registry KINDS):
- trace: the objective per Adam step / L-BFGS evaluation, the switch from
  Adam to the fixed-draw optimiser and the point where the fit stopped
  (converged or not);
- marginals: each chosen element's density as q's draws give it, and as the
  PSIS-reweighted draws give it (where they differ, q misses the posterior);
- forest: mean, 50% and 90% intervals of every element of the chosen
  variables, one row each, labelled with level labels (`a[Carver]`);
- ppc: the observed data's distribution against replicated data sets
  (posterior predictive), per observed node;
- pair: the draws of a few scalar elements against each other.

Stage: `Fit` -> PNG bytes.
"""
from __future__ import annotations

import io
from typing import Callable, Dict, Optional, Sequence

import numpy as np

MAX_PANELS = 16      # marginals: elements shown at most (the first ones of the chosen variables)
MAX_FOREST = 120     # forest: rows at most
MAX_PAIR = 4         # pair: elements at most
PPC_SETS = 50        # ppc: replicated data sets drawn


def _plt():
    try:
        import matplotlib
    except ImportError:
        from .errors import UsageError
        raise UsageError("plots need matplotlib: pip install 'ppl[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _continuous(fit) -> Dict[str, np.ndarray]:
    disc = {n for n, node in fit.model.nodes.items() if node.kind == "latent" and node.discrete}
    return {k: v for k, v in fit.draws.items() if k not in disc}


def _columns(fit, vars, limit: int):
    """-> [(label, column of draws)] of the chosen (default: continuous) elements, at most `limit`."""
    from .summary import flat_labels, select
    draws = _continuous(fit) if vars is None else fit.draws
    chosen = select(fit.model, draws, vars)
    out = []
    for name, idx in chosen.items():
        arr = draws[name]
        flat = arr.reshape(arr.shape[0], -1)
        labels = flat_labels(fit.model, name, arr.shape[1:])
        for j in (range(flat.shape[1]) if idx is None else sorted(idx)):
            out.append((labels[j], flat[:, j]))
    return out[:limit], len(out)


def kde(x: np.ndarray, grid: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """A Gaussian kernel density estimate on `grid` (Silverman's bandwidth; weighted when given),
    in chunks of the grid so memory stays small."""
    x = np.asarray(x, dtype=float)
    w = np.full(len(x), 1.0 / max(len(x), 1)) if weights is None else np.asarray(weights, float) / np.sum(weights)
    n_eff = 1.0 / np.sum(w * w)
    mean = np.sum(w * x)
    sd = np.sqrt(np.sum(w * (x - mean) ** 2))
    iqr = np.subtract(*np.quantile(x, [0.75, 0.25]))
    spread = min(sd, iqr / 1.34) if iqr > 0 else sd
    h = 0.9 * (spread if spread > 0 else 1.0) * n_eff ** -0.2
    out = np.empty(len(grid))
    for i in range(0, len(grid), 64):
        g = grid[i:i + 64, None]
        out[i:i + 64] = (w * np.exp(-0.5 * ((g - x) / h) ** 2)).sum(1)
    return out / (h * np.sqrt(2 * np.pi))


def trace(fit, vars=None) -> bytes:
    plt = _plt()
    y = np.asarray(fit.elbo_trace, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(1, len(y) + 1)
    ax.plot(x, y, lw=0.8, color="C0")
    finite = y[np.isfinite(y)]
    if len(finite) > 20:       # the first steps from far away would flatten the rest
        lo = np.quantile(finite, 0.02)
        ax.set_ylim(lo - 0.05 * (finite.max() - lo + 1e-12), finite.max() + 0.05 * (finite.max() - lo + 1e-12))
    if fit.optimizer == "dadvi" and fit.steps:
        ax.axvline(fit.steps + 0.5, color="0.5", ls=":", lw=1)
        ax.text(fit.steps + 0.5, 0.02, " Adam | L-BFGS on fixed draws", transform=ax.get_xaxis_transform(),
                fontsize=8, color="0.3")
    if len(y):
        ax.plot([x[-1]], [y[-1]], "o", color="C3" if not fit.converged else "C2")
        ax.annotate(("converged" if fit.converged else "stopped, not converged") + f" ({fit.elbo:.4g})",
                    (x[-1], y[-1]), textcoords="offset points", xytext=(-10, -14), ha="right", fontsize=8)
    ax.set_xlabel("L-BFGS evaluation" if fit.optimizer == "dadvi" and not fit.steps else
                  "step (Adam), then L-BFGS evaluation" if fit.optimizer == "dadvi" else "Adam step")
    ax.set_ylabel(fit.objective.upper() if fit.objective != "elbo" else "ELBO")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_title(f"{fit.model.source.path}: {fit.method}, {fit.verdict_label}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def marginals(fit, vars=None) -> bytes:
    from .infer.psis import psis
    plt = _plt()
    cols, total = _columns(fit, vars, MAX_PANELS)
    w = psis(fit.q_draws.log_weights).weights if fit.q_draws is not None else None
    n = max(1, len(cols))
    nc = min(4, n)
    nr = (n + nc - 1) // nc
    fig, axes = plt.subplots(nr, nc, figsize=(3.2 * nc, 2.4 * nr), squeeze=False)
    for ax, (label, col) in zip(axes.flat, cols):
        col = col[np.isfinite(col)] if w is None else col
        ok = np.isfinite(col)
        lo, hi = np.quantile(col[ok], [0.005, 0.995]) if ok.any() else (0, 1)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        grid = np.linspace(lo, hi, 200)
        ax.plot(grid, kde(col[ok], grid), color="C0", lw=1.3, label="q")
        if w is not None:          # the draws with weights (a minibatch fit: the final pass's, fewer)
            m = min(len(w), len(col))
            okw = np.isfinite(col[:m])
            ax.plot(grid, kde(col[:m][okw], grid, w[:m][okw]), color="C1", lw=1.3, ls="--", label="PSIS-reweighted")
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper right")
    more = f" (first {len(cols)} of {total} elements; --vars chooses)" if total > len(cols) else ""
    fig.suptitle(f"marginals: q's draws and the PSIS-reweighted ones{more}", fontsize=10)
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.35 / (2.4 * nr), top=1 - 0.6 / (2.4 * nr),
                        hspace=0.5, wspace=0.12)
    return _png(fig)


def forest(fit, vars=None) -> bytes:
    plt = _plt()
    cols, total = _columns(fit, vars, MAX_FOREST)
    n = max(1, len(cols))
    fig, ax = plt.subplots(figsize=(6.5, max(2.6, 1.0 + 0.22 * n)))
    ys = np.arange(n)[::-1]
    for y, (label, col) in zip(ys, cols):
        c = col[np.isfinite(col)]
        if not len(c):
            continue
        q5, q25, q50, q75, q95 = np.quantile(c, [0.05, 0.25, 0.5, 0.75, 0.95])
        ax.plot([q5, q95], [y, y], color="C0", lw=1)
        ax.plot([q25, q75], [y, y], color="C0", lw=3)
        ax.plot([c.mean()], [y], "o", color="C1", ms=3.5)
    ax.set_yticks(ys)
    ax.set_yticklabels([lab for lab, _ in cols], fontsize=7 if n > 30 else 9)
    ax.set_ylim(-1, n)
    ax.grid(axis="x", alpha=0.3)
    more = f" (first {len(cols)} of {total}; --vars chooses)" if total > len(cols) else ""
    ax.set_title(f"mean, 50% and 90% intervals{more}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def ppc(fit, vars=None) -> bytes:
    plt = _plt()
    model = fit.model
    observed = [k for k in model.order if model.nodes[k].kind == "observed" and k in model.values]
    if vars is not None:
        observed = [k for k in observed if k in set(vars)] or observed
    rep = fit.predict(draws=PPC_SETS, seed=fit.config.seed)
    observed = [k for k in observed if k in rep]
    if not observed:
        from .errors import UsageError
        raise UsageError("the model has no observed data to check")
    n = len(observed)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.5), squeeze=False)
    for ax, name in zip(axes.flat, observed):
        y = np.asarray(model.values[name], dtype=float).reshape(-1)
        r = rep[name].reshape(rep[name].shape[0], -1)
        if model.nodes[name].is_int or model.nodes[name].dist is not None and _discrete(model, name):
            vals = np.arange(int(min(y.min(), np.nanmin(r))), int(max(y.max(), np.nanmax(r))) + 1)
            if len(vals) <= 12:        # few values: the observed shares as bars, each replicate's as a dot
                share = np.array([[np.mean(r[s] == v) for v in vals] for s in range(r.shape[0])])
                jitter = np.random.default_rng(0).uniform(-0.2, 0.2, share.shape)
                ax.bar(vals, [np.mean(y == v) for v in vals], width=0.6, fill=False, edgecolor="k", lw=1.5,
                       label="observed")
                ax.plot((vals[None, :] + jitter).ravel(), share.ravel(), ".", color="C0", alpha=0.5, ms=4,
                        label="replicated")
                ax.set_xticks(vals)
                ax.set_ylabel("share")
                ax.set_title(f"{name}: observed and {r.shape[0]} replicated data sets", fontsize=10)
                ax.legend(fontsize=8)
                continue
            if len(vals) <= 60:
                for s in range(r.shape[0]):
                    ax.plot(vals, [np.mean(r[s] == v) for v in vals], color="C0", alpha=0.15, lw=0.8)
                ax.plot(vals, [np.mean(y == v) for v in vals], "o-", color="k", lw=1.5, ms=3, label="observed")
                ax.set_ylabel("share")
                ax.set_title(f"{name}: observed and {r.shape[0]} replicated data sets", fontsize=10)
                ax.legend(fontsize=8)
                continue
        lo, hi = np.quantile(np.concatenate([y, r[np.isfinite(r)]]), [0.005, 0.995])
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        grid = np.linspace(lo, hi, 200)
        for s in range(r.shape[0]):
            ax.plot(grid, kde(r[s][np.isfinite(r[s])], grid), color="C0", alpha=0.2, lw=0.8)
        ax.plot(grid, kde(y, grid), color="k", lw=1.8, label="observed")
        ax.plot([], [], color="C0", alpha=0.6, label="replicated")
        ax.set_yticks([])
        ax.legend(fontsize=8)
        ax.set_title(f"{name}: observed and {r.shape[0]} replicated data sets", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _discrete(model, name) -> bool:
    from . import distributions as DS
    node = model.nodes[name]
    return DS.REGISTRY[DS.fold_link(node.dist.spec, node.dist.args)[0]].discrete


def pair(fit, vars=None) -> bytes:
    plt = _plt()
    cols, total = _columns(fit, vars, MAX_PAIR)
    n = len(cols)
    fig, axes = plt.subplots(n, n, figsize=(1.9 * n + 0.6, 1.9 * n + 0.4), squeeze=False)
    for i, (li, ci) in enumerate(cols):
        for j, (lj, cj) in enumerate(cols):
            ax = axes[i, j]
            if i == j:
                ax.hist(ci[np.isfinite(ci)], bins=30, color="C0")
                ax.set_yticks([])
            elif i > j:
                ax.plot(cj, ci, ".", ms=1.5, alpha=0.4, color="C0")
            else:
                ax.axis("off")
                continue
            ax.tick_params(labelsize=6)
            if i == n - 1:
                ax.set_xlabel(lj, fontsize=8)
            if j == 0 and i > 0:
                ax.set_ylabel(li, fontsize=8)
    more = f" (first {n} of {total}; --vars chooses)" if total > n else ""
    fig.suptitle(f"pairs of q's draws{more}", fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.1, top=0.93, hspace=0.25, wspace=0.25)
    return _png(fig)


KINDS: Dict[str, Callable] = {"trace": trace, "marginals": marginals, "forest": forest, "ppc": ppc, "pair": pair}


def plot(fit, kind: str, vars: Optional[Sequence[str]] = None) -> bytes:
    return KINDS[kind](fit, vars)
