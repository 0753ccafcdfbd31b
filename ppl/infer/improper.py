"""Improper posteriors at run time: stop with exit 3, naming the latents, instead of a fit
whose scale runs off to 1e300 and ends with exit 0.

The check (ppl/frontend/check.py, `improper_flat_latents`) refuses flat latents that no
likelihood term reaches.  What it cannot see is a likelihood that reaches a latent without
identifying it: a flat ridge (`y ~ normal(mu1 + mu2, 1)` with both flat), a flat scale with one
data row, a flat coefficient on separable binary data, a flat vector with an unused element.
There the log density stays flat (or creeps up to a bound) along some ray in the unconstrained
space, and the fit's scale or location grows for as long as it runs.

One test, two places.  The test: from a point x0, along a unit direction v, evaluate log p at
x0 +- t v for a ladder of distances t; one side is *flat* when every finite probe is within
FLAT_DROP below and FLAT_RISE above log p(x0), and the nearest NEED probes are finite.  A proper
density must fall off along every ray; a direction flat over the whole ladder is improper (or so
wide, sd > ~1e5 in unconstrained units, that no fit means anything).  Non-finite far probes (a
log-scale coordinate overflowing exp) are skipped, not counted as a fall.  Proper heavy tails
fall (a half-Cauchy scale falls linearly in log space, a Cauchy location logarithmically: both
lose far more than FLAT_DROP over the ladder); a funnel's density rises steeply towards the
neck (more than FLAT_RISE), so it is never flat either.

1. `after_laplace(lj, lap)`: the directions the Laplace start clamped (Hessian eigenvalue below
   1/MAX_SD^2: flat or non-convex), probed from the mode at t = 10 ... 1e5 (unconstrained units).
   Catches the ridge, the one-row scale, separation, unused elements: before any fitting.
2. `check_q(lj, fam)`: the fitted q.  The coordinates where q has grown (sd GROWN times its
   start's) or drifted (mean moved GROWN sds) are where an improper direction shows; the Hessian
   of log p over just those coordinates, at q's mean, gives the candidate directions (its clamped
   eigenvectors), probed like the Laplace ones.  (q's own widest axis is not exact enough: its
   small leak into well-determined coordinates, times distances of 1e5, makes any ridge fall;
   and the full Hessian away from a mode can be dominated by a funnel's 1e13 curvatures, which
   make its near-zero eigenvectors noise.)  A q whose moments are no longer finite in some block
   is reported for that block.  Run by `watch` every WATCH_EVERY Adam steps and at the last step
   of each Adam run (so after the dadvi warm-up, before the fixed-draw L-BFGS), and once after
   the fit.  Catches what a cold start hides: a ridge beside a funnel.

Inputs: a `LogJoint` (`log_prob`, `blocks`: name, offset, size, shape, ushape; `model` for
names and the source path), the `Laplace` result (`mu0`, `flat`: the clamped unit directions),
and the family (`pre`: mu0, A, diag; `mean_scale_u()`, or LowRank's raw m/log_d/W, or draws).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import EXIT_NUMERIC, Diagnostic, PplError

LAPLACE_PROBES = (10.0, 100.0, 1e3, 1e4, 1e5)   # distances (unconstrained units) from the mode or q's mean
SD_PROBES = (3.0, 10.0, 100.0)                   # ... and in sds of the start along the direction
NEED = 2                  # the nearest probes that must be finite for a side to count as flat
FLAT_DROP = 0.01          # log p may fall at most this much along a flat ray ...
FLAT_RISE = 1.0           # ... and rise at most this much (more: the start was not a mode; a funnel)
MAX_DIRECTIONS = 64       # probed per call (the flattest first)
GROWN = 10.0              # check_q looks at coordinates whose sd grew this many times over the start's,
                          # or whose mean moved this many of their sds (start's or current, the larger)
WATCH_EVERY = 500         # Adam steps between checks of q
TRIM = 0.05               # components below this fraction of a direction's largest are leaks (zeroed)
MAX_SD = 1e3              # as laplace.py: curvature below 1/MAX_SD^2 is flat (clamped)
MIN_SHARE = 0.1           # a block (element) is named when it carries this share of a direction
FULL_MOMENTS_MAX = 400    # at most this many coordinates in the sub-Hessian of check_q
FLAT_COORDS_MAX = 100     # at most this many flat-latent coordinates in a sub-Hessian (big models)


# ---- the test ------------------------------------------------------------------------------
def flat_rays(lj, x0: torch.Tensor, dirs: torch.Tensor, dist: torch.Tensor) -> List[bool]:
    """dirs (k, D) unit directions, dist (k, P) increasing distances -> per direction: is log p
    flat from x0 along +dir or -dir over all of them?  Never raises: an evaluation that fails
    counts as not flat."""
    k, P = dist.shape
    if k == 0 or lj.score:            # score-path discrete latents: no density without their draws
        return [False] * k
    # each direction also with its small components zeroed: an estimated direction (a Hessian
    # eigenvector) leaks a little into the well-determined coordinates, and far out along the
    # ray that leak alone would make the density fall
    big = dirs.abs() >= TRIM * dirs.abs().max(1, keepdim=True).values
    trimmed = torch.where(big, dirs, torch.zeros_like(dirs))
    trimmed = trimmed / trimmed.norm(dim=1, keepdim=True)
    leaky = [i for i in range(k) if not bool(big[i].all())]
    flags = _flat_rays(lj, x0, torch.cat([dirs, trimmed[leaky]]), torch.cat([dist, dist[leaky]]))
    for j, i in enumerate(leaky):
        flags[i] = flags[i] or flags[k + j]
    return flags[:k]


def _flat_rays(lj, x0, dirs, dist):
    k, P = dist.shape
    lp0 = _log_p(lj, x0[None])
    if lp0 is None or not np.isfinite(float(lp0[0])):
        return [False] * k
    lp0 = float(lp0[0])
    alive = {(i, s) for i in range(k) for s in (1.0, -1.0)}
    # the nearest probes first: a proper direction fails there, and the far ones are not needed
    for probes in (range(min(NEED, P)), range(min(NEED, P), P)):
        todo = sorted(alive)
        if not todo or not len(probes):
            continue
        pts = torch.stack([x0 + s * dist[i, p] * dirs[i] for i, s in todo for p in probes])
        lp = _log_p(lj, pts)
        if lp is None:
            return [False] * k
        lp = lp.reshape(len(todo), len(probes))
        for (i, s), v in zip(todo, lp):
            fin = torch.isfinite(v)
            d = v[fin] - lp0
            first = probes.start == 0
            if (first and not bool(fin.all())) or not (bool((d >= -FLAT_DROP).all()) and
                                                      bool((d <= FLAT_RISE).all())):
                alive.discard((i, s))
    return [(i, 1.0) in alive or (i, -1.0) in alive for i in range(k)]


def _log_p(lj, pts: torch.Tensor) -> Optional[torch.Tensor]:
    try:
        with torch.no_grad():
            step = lj.chunk_size()
            return torch.cat([lj.log_prob(pts[i:i + step]) for i in range(0, pts.shape[0], step)])
    except (ValueError, RuntimeError, IndexError, TypeError, KeyError):
        return None


# ---- 1. at the Laplace start ---------------------------------------------------------------
def clamped_directions(lam: torch.Tensor, V: Optional[torch.Tensor], floor: float,
                       exclude: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The Laplace start's clamped directions as (k, D) unit rows (eigenvectors of the Hessian, or
    coordinate axes when only its diagonal is known), flattest first, at most MAX_DIRECTIONS.
    `exclude`: (j, D) unit rows already taken; directions within them are left out."""
    idx = torch.nonzero(lam <= floor).reshape(-1)
    if idx.numel() == 0:
        return None
    idx = idx[torch.argsort(lam[idx])][:MAX_DIRECTIONS]
    if V is not None:
        rows = V[:, idx].T.contiguous()
        if exclude is not None:
            # the part outside the span of the excluded rows: nothing much left means already taken
            Q = torch.linalg.qr(exclude.T).Q
            rest = rows - (rows @ Q) @ Q.T
            keep = rest.norm(dim=1) > 0.5
            rows = rows[keep]
        return rows if rows.shape[0] else None
    rows = torch.zeros((idx.numel(), lam.shape[0]), dtype=lam.dtype)
    rows[torch.arange(idx.numel()), idx] = 1.0
    return rows


def after_laplace(lj, lap) -> None:
    """Raise (exit 3) when a direction the Laplace start clamped is flat: the posterior is improper.
    Above FULL_HESSIAN_MAX dims the start knows only the Hessian's diagonal, which cannot see a
    ridge between coordinates: there the Hessian over the flat latents' coordinates is added."""
    dirs = getattr(lap, "flat", None)
    if not lap.cold and lap.A.dim() == 1:
        extra = _flat_subspace(lj, lap.mu0, _flat_coordinates(lj))
        if extra is not None:
            dirs = extra if dirs is None else torch.cat([dirs, extra])
    _raise_if_flat(lj, lap.mu0, dirs, None, getattr(lap, "flat_sd", None))


def check_q(lj, fam, cold: bool = False) -> None:
    """Raise (exit 3) when q's moments are no longer finite in some block, or when q has grown or
    drifted in some coordinates and the log density over those coordinates, at q's mean, is flat
    along a direction (clamped eigenvectors of that sub-Hessian, probed at LAPLACE_PROBES).
    `cold`: the fit started cold (no Laplace test ran): also test the clamped directions of the
    whole Hessian at q's mean (over the flat latents' coordinates above FULL_MOMENTS_MAX dims) -
    a mean-field q cannot grow along a diagonal ridge, it stays put across it."""
    mom = q_moments(fam)
    if mom is None:
        return
    mean, var = mom
    gone = [b.name for b in lj.blocks
            if not (torch.isfinite(mean[b.offset:b.offset + b.size]).all()
                    and torch.isfinite(var[b.offset:b.offset + b.size]).all())]
    if gone:
        raise _failure(lj, gone, ("their" if len(gone) > 1 else "its") + " scale grew without bound until it "
                       "overflowed")
    pre = fam.pre
    sd0 = pre.A.abs() if pre.diag else pre.A.pow(2).sum(1).sqrt()     # q's sds at the start
    sd, moved = var.clamp(min=0).sqrt(), (mean - pre.mu0).abs()
    grown = (sd >= GROWN * sd0) | (moved >= GROWN * torch.maximum(sd0, sd))
    if bool(grown.any()):
        G = torch.nonzero(grown).reshape(-1)
        G = G[torch.argsort(torch.maximum(sd[G] / sd0[G], moved[G] / sd0[G]), descending=True)][:FULL_MOMENTS_MAX]
        _raise_if_flat(lj, mean, _flat_subspace(lj, mean, G), (sd >= GROWN * sd0))
    if cold:
        D = mean.shape[0]
        G = torch.arange(D) if D <= FULL_MOMENTS_MAX else _flat_coordinates(lj)
        _raise_if_flat(lj, mean, _flat_subspace(lj, mean, G), None)


def _raise_if_flat(lj, x0: torch.Tensor, dirs: Optional[torch.Tensor], wide: Optional[torch.Tensor],
                   sd: Optional[torch.Tensor] = None) -> None:
    """Probe `dirs` from x0; raise naming the latents of the flat ones.  `wide`: the coordinates
    whose q scale grew (for the message), None when the directions come from a Hessian alone.
    `sd`: (k,) the start's sd along each direction (inf where it was clamped): a direction with a
    finite sd is also probed at SD_PROBES of it, so a proper direction wider than LAPLACE_PROBES
    reach (a coefficient in dollars, sd 1e6) falls there, while an improper one stays flat."""
    if dirs is None or dirs.shape[0] == 0:
        return
    dist = torch.tensor(LAPLACE_PROBES, dtype=x0.dtype).expand(dirs.shape[0], -1)
    if sd is not None:
        rel = torch.where(torch.isfinite(sd), sd, torch.zeros_like(sd))[:, None] * \
            torch.tensor(SD_PROBES, dtype=x0.dtype)
        dist = torch.sort(torch.cat([dist, torch.where(rel > 0, rel, dist[:, -1:])], 1), 1).values
    hit = [dirs[i] for i, f in enumerate(flat_rays(lj, x0, dirs, dist)) if f]
    if not hit:
        return
    names = _names(lj, hit)
    they = len(names) > 1
    if wide is None:
        how = f"the log density stays flat as {'they move' if they else 'it moves'} without bound along one direction"
    else:
        scale = any(bool(wide[i]) for v in hit for i in torch.nonzero(v.abs() > TRIM).reshape(-1))
        how = (f"{'their' if they else 'its'} {'scale grew' if scale else 'location ran off'} without bound, "
               f"and the log density stays flat that way")
    raise _failure(lj, names, how)


def _flat_coordinates(lj) -> torch.Tensor:
    """The coordinates of the flat (no `~`) latents, at most FLAT_COORDS_MAX.  Every improper ray
    moves some flat latent (the first latent it moves, in the DAG's order, has a prior whose
    arguments stay put, and a proper prior falls); the Hessian over these coordinates finds the rays
    that move only flat latents (a ridge between flat coefficients), not those that also carry
    proper latents along."""
    idx = [i for b in lj.blocks if lj.model.nodes[b.name].dist is None for i in range(b.offset, b.offset + b.size)]
    return torch.tensor(idx[:FLAT_COORDS_MAX], dtype=torch.long)


def _flat_subspace(lj, x0: torch.Tensor, G: torch.Tensor) -> Optional[torch.Tensor]:
    """Clamped directions (k, D) of the Hessian of log p over the coordinates G, at x0."""
    if lj.score or G.numel() == 0:
        return None
    x0 = x0.detach()

    def f(xg):
        return -lj.log_prob(x0.index_put((G,), xg).unsqueeze(0))[0]
    try:
        H = torch.autograd.functional.hessian(f, x0[G].clone())
        if not torch.isfinite(H).all():
            return None
        lam, V = torch.linalg.eigh(0.5 * (H + H.T))
    except (ValueError, RuntimeError, IndexError, TypeError, KeyError):
        return None
    sub = clamped_directions(lam, V, 1.0 / MAX_SD ** 2)
    if sub is None:
        return None
    dirs = torch.zeros((sub.shape[0], x0.shape[0]), dtype=x0.dtype)
    dirs[:, G] = sub
    return dirs


def q_moments(fam) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """q's mean and marginal variances in the unconstrained space (theta), or None when the family
    offers neither moments nor draws.  No D x D matrix beyond the family's own."""
    pre = getattr(fam, "pre", None)
    if pre is None:
        return None

    def var_of(B):                   # diag(A B B^T A^T) for a factor B (D, r), or a vector of sds
        AB = (pre.A[:, None] * B if pre.diag else pre.A @ B) if B.dim() == 2 else \
            (pre.A * B if pre.diag else pre.A * B[None, :])
        return AB.pow(2) if AB.dim() == 1 else AB.pow(2).sum(1)
    with torch.no_grad():
        if hasattr(fam, "mean_scale_u"):                                       # MeanField, FullRank
            m, s = fam.mean_scale_u()
            mean, var = pre.to_theta(m.unsqueeze(0))[0], var_of(s)
        elif hasattr(fam, "_raw") and {"m", "log_d", "W"} <= set(fam._raw):     # LowRank
            m = fam._raw["m"]
            mean = pre.to_theta(m.unsqueeze(0))[0]
            var = var_of(fam._raw["W"]) + var_of(torch.exp(fam._raw["log_d"]))
        else:                                                                  # Flow: from draws
            theta = pre.to_theta(_private_draws_u(fam))
            mean, var = theta.mean(0), theta.var(0)
        return mean, torch.where(torch.isnan(var), torch.full_like(var, float("inf")), var)


def _private_draws_u(fam, n: int = 2000) -> torch.Tensor:
    """Draws of q in u with a private generator (the fit's random stream is left untouched)."""
    gens = [(o, o.gen) for o in (fam, getattr(fam, "base", None)) if o is not None and hasattr(o, "gen")]
    g = torch.Generator().manual_seed(12345)
    try:
        for o, _ in gens:
            o.gen = g
        return fam.rsample_u(n).detach()
    finally:
        for o, old in gens:
            o.gen = old


# ---- the Adam watch -----------------------------------------------------------------------------
def watch(lj, fam, progress: Optional[Callable] = None) -> Callable:
    """A progress callback (t, total, elbo) that also checks q every WATCH_EVERY steps and at the
    last step of the run (the end of the dadvi warm-up), then calls `progress` (whose other methods,
    such as a progress bar's `phase` and `tick`, it passes through)."""
    return _Watch(lj, fam, progress)


class _Watch:
    def __init__(self, lj, fam, progress):
        self.lj, self.fam, self.progress = lj, fam, progress

    def __call__(self, t, total, elbo):
        if t % WATCH_EVERY == 0 or t == total:
            check_q(self.lj, self.fam)
        if self.progress is not None:
            self.progress(t, total, elbo)

    def __getattr__(self, name):
        return getattr(self.progress, name)


# ---- messages ---------------------------------------------------------------------------------
def _names(lj, dirs: Sequence[torch.Tensor]) -> List[str]:
    """The latents (or elements, `beta[3]`) carrying at least MIN_SHARE of any direction, in block order."""
    picked = {}
    for v in dirs:
        w = (v * v) / float((v * v).sum())
        for bi, b in enumerate(lj.blocks):
            wb = w[b.offset:b.offset + b.size]
            share = float(wb.sum())
            if share < MIN_SHARE:
                continue
            names = [b.name]
            if b.size > 1 and tuple(b.ushape) == tuple(b.shape):
                big = [i for i in range(b.size) if float(wb[i]) >= MIN_SHARE]
                if big and len(big) < b.size and float(wb[big].sum()) >= 0.9 * share:
                    names = [f"{b.name}[{','.join(str(j + 1) for j in np.unravel_index(i, b.shape))}]"
                             for i in big]
            for i, n in enumerate(names):
                picked.setdefault(n, (bi, i))
    return sorted(picked, key=picked.get)


def _failure(lj, names: List[str], how: str) -> PplError:
    model = lj.model
    quoted = ", ".join(f"'{n}'" for n in names)
    bases = [n.split("[")[0] for n in names]
    flat = []
    for b in bases:
        node = model.nodes.get(b)
        if node is not None and node.dist is None and b not in flat:
            flat.append(b)
    they = len(names) > 1
    if flat and len(flat) == len(set(bases)):
        if len(flat) > 1:
            fix = "give them proper priors"
        else:
            dims = model.nodes[flat[0]].decl.dims if model.nodes[flat[0]].decl is not None else ()
            sample = flat[0] + (f"[{', '.join(str(d.value) for d in dims)}]" if dims else "")
            fix = f"give {'them' if they else 'it'} a proper prior ({sample} ~ ...)"
    elif flat:
        fix = "give " + ", ".join(f"'{f}'" for f in flat) + (" proper priors" if len(flat) > 1 else " a proper prior")
    else:
        fix = "check which of them the data inform"
    msg = (f"inference failed: the posterior of {quoted} looks improper: {how} (the data do not identify "
           f"{'them' if they else 'it'}); {fix}")
    return PplError([Diagnostic(None, msg, model.source.path)], EXIT_NUMERIC)
