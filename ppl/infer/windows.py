"""Truncated enumeration: the compiled model and draws of its continuous latents
-> for each count latent summed over a window (`NodePlan.window`), the values
lo[i]..hi[i] of each element i outside which its conditional posterior (given
the draw and its Markov blanket, the rest of its group summed out) has less
than TOL of its mass at every draw, and the mass measured outside.

Stage: around the fit (ppl/infer/fit.py): `initial` before the mode search
(from prior draws), `refine` after it (from draws of the Laplace
approximation, widened 1.5x), `recheck` after the fit (from q's draws; a
window that misses more than TOL is widened and the fit resumed).

The search, per draw and element, all at once: the values lo0 + 0, 1, 2, 4,
..., 2^50 (lo0 the element's bound from the graph, `ppl.bounds`) locate the
mass; an integer ternary search finds the mode near the best of them; a
window around the mode doubles on each side until the mass beyond it is
below TOL / 4.  The mass beyond a window's edge is bounded by the geometric
series of the last ratio p(edge) / p(edge - 1) (exact for a geometric tail,
an upper bound where the tail is log-concave: Poisson and negative binomial
priors times binomial, Poisson or normal likelihoods are); a value of the
sparse probe beyond the window with more than TOL / 4 of the mass (a second
mode) widens it to there.  The window is then trimmed to where the mass is
and united over the draws.  A window wider than MAX_WIDTH values (or a group
with more than MAX_VALUES joint values) is too wide: that latent goes to the
score path (`ppl.plan.plan(too_wide=...)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..backend.log_joint import LogJoint
from ..bounds import bounds

TOL = 1e-10            # mass left outside a window, relative to the whole, at every draw
MAX_WIDTH = 1024       # values per element of one window
MAX_VALUES = 4096      # joint values per element of a group
START_HALF = 8         # the first window: the mode +- this
DRAWS = 32             # prior draws of the continuous latents the first windows are found at
LAPLACE_DRAWS = 16     # random draws of the Laplace approximation (besides its mode and sigma points)
SIGMA_POINTS_MAX = 32  # dimensions up to which the Laplace sigma points (mode +- 3 widened sds) are used
PREVIEW_DRAWS = 8      # prior draws for `ppl graph` (a quick look; the fit searches at DRAWS)
RECHECK_DRAWS = 96     # q's draws the windows are re-checked at after the fit
LAPLACE_WIDEN = 1.5    # the Laplace draws' spread, times this (q is often wider than the Laplace fit)
CHUNK = 4_000_000      # elements per evaluation (draws are taken in chunks below it)
BIG = 1e15             # an unbounded side


@dataclass
class Window:
    name: str
    lo: np.ndarray
    hi: np.ndarray
    outside: float = 0.0          # the largest conditional mass outside, relative, at `where`'s draws
    where: str = "prior draws"

    def text(self) -> str:
        w = self.hi - self.lo + 1
        widths = f"{int(w.min())}" if w.min() == w.max() else f"{int(w.min())}-{int(w.max())}"
        span = f"{self.lo.min():.0f}..{self.hi.max():.0f}"
        return (f"{span}, {widths} values{' per element' if self.lo.size > 1 else ''}, "
                f"mass outside {_sci(self.outside)}" + (f" at {self.where}" if self.where else ""))


def _sci(x: float) -> str:
    return "< 1e-16" if x < 1e-16 else f"{x:.0e}"


@dataclass
class Windows:
    """The windows of a compiled model's count latents, and what was measured about them."""
    program: LogJoint
    found: Dict[str, Window] = field(default_factory=dict)
    too_wide: List[str] = field(default_factory=list)
    refits: int = 0

    def text(self) -> Dict[str, str]:
        return {n: w.text() for n, w in self.found.items()}


def windowed(program: LogJoint) -> List[Tuple[object, object]]:
    return [(g, m) for g in program.enum for m in g.members if m.window]


# ---- evaluation of one member's conditional on given values --------------------------------------------
def _log_marginal(program: LogJoint, g, name: str, theta: torch.Tensor, discrete, values: torch.Tensor,
                  bad: torch.Tensor) -> torch.Tensor:
    """(K, S, *shape) log p(member = values[k] | draw s, rest of the group summed out), unnormalised;
    -inf where `bad`.  `values`, `bad`: (K, S or 1, *shape)."""
    S = theta.shape[0]
    shape = tuple(int(d) for d in g.shape)
    n_el = max(1, int(np.prod(shape)))
    others = 1
    for m in g.members:
        if m.name != name:
            others *= int(m.values.shape[0])
    K = int(values.shape[0])
    chunk = max(1, CHUNK // max(1, K * others * n_el))
    out = []
    j = [m.name for m in g.members].index(name)
    for i in range(0, S, chunk):
        th = theta[i:i + chunk]
        s = th.shape[0]
        z = None if discrete is None else {k: v[i:i + chunk] for k, v in discrete.items()}
        env = program.evaluate(th, z, densities=False).env
        v = values if values.shape[1] == 1 else values[:, i:i + chunk]
        b = bad if bad.shape[1] == 1 else bad[:, i:i + chunk]
        L = program._enumerate(g, env, s, program.batch, {name: (v, b)})
        Ks = [K if m.name == name else int(m.values.shape[0]) for m in g.members]
        L = L.reshape(Ks + [s] + list(L.shape[2:]))
        dims = [d for d in range(len(Ks)) if d != j]
        out.append(torch.logsumexp(L, dims) if dims else L)
    return torch.cat(out, 1)


class _Probe:
    """Evaluates a member's conditional at integer values per draw and element, inside its bounds."""

    def __init__(self, program, g, name, theta, discrete, lo0, hi0):
        self.args = (program, g, name, theta, discrete)
        self.lo0, self.hi0 = lo0, hi0          # (1, *shape)

    def __call__(self, vals: torch.Tensor) -> torch.Tensor:
        lo0, hi0 = self.lo0.unsqueeze(0), self.hi0.unsqueeze(0)
        bad = (vals < lo0) | (vals > hi0)
        v = torch.minimum(torch.maximum(vals, lo0), hi0)
        with torch.no_grad():
            L = _log_marginal(*self.args, v, bad)
        return torch.where(torch.isnan(L), torch.full_like(L, -math.inf), L)


def _mode(probe: _Probe, S: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (mode (S, *shape), the sparse probe's values (P, S, *shape) and log densities)."""
    lo0 = probe.lo0
    offsets = torch.tensor([0.0] + [2.0 ** k for k in range(51)], dtype=lo0.dtype, device=lo0.device)
    nd = lo0.dim() - 1
    sv = (lo0 + offsets.reshape((-1,) + (1,) * (nd + 1))).expand((len(offsets), S) + tuple(lo0.shape[1:]))
    sv = torch.minimum(sv, probe.hi0.unsqueeze(0).expand(sv.shape))
    Lp = probe(sv)
    j = Lp.argmax(0)
    P = len(offsets)
    a = sv.gather(0, (j - 1).clamp(min=0).unsqueeze(0)).squeeze(0)
    b = sv.gather(0, (j + 1).clamp(max=P - 1).unsqueeze(0)).squeeze(0)
    best_v = sv.gather(0, j.unsqueeze(0)).squeeze(0)
    best_L = Lp.gather(0, j.unsqueeze(0)).squeeze(0)
    for _ in range(200):                             # integer ternary search for the mode in [a, b]
        active = (b - a) > 2
        if not bool(active.any()):
            break
        m1 = a + torch.floor((b - a) / 3)
        m2 = b - torch.floor((b - a) / 3)
        L2 = probe(torch.stack([m1, m2]))
        right = L2[0] < L2[1]
        left = L2[0] > L2[1]
        a = torch.where(active & right, m1 + 1, torch.where(active & ~left, m1, a))
        b = torch.where(active & left, m2 - 1, torch.where(active & ~right, m2, b))
    cand = torch.stack([a, torch.minimum(a + 1, b), b])
    Lc = probe(cand)
    k = Lc.argmax(0)
    c = cand.gather(0, k.unsqueeze(0)).squeeze(0)
    c = torch.where(Lc.gather(0, k.unsqueeze(0)).squeeze(0) >= best_L, c, best_v)
    return c, sv, Lp


def _tail(p_edge: torch.Tensor, L_edge: torch.Tensor, L_in: torch.Tensor) -> torch.Tensor:
    """Mass beyond an edge: p(edge) r / (1 - r), r = p(edge) / p(next inside); inf when not falling."""
    r = torch.exp(L_edge - L_in)
    t = torch.where(r < 1, p_edge * r / (1 - r).clamp(min=1e-300), torch.full_like(r, math.inf))
    return torch.where(torch.isfinite(L_edge), t, torch.zeros_like(t))


def search(program: LogJoint, name: str, theta: torch.Tensor, discrete=None,
           old: Optional[Tuple[np.ndarray, np.ndarray]] = None):
    """-> (lo, hi per element, the largest mass outside them, the largest mass outside `old`), or None
    when the window would be wider than MAX_WIDTH (or the conditional is nowhere positive)."""
    g = program.group_of(name)
    node = program.model.nodes[name]
    shape = tuple(int(d) for d in node.shape)
    b = bounds(program.model, name)
    rt = program.rt
    lo0 = rt.tensor(np.clip(np.broadcast_to(b.lo, shape), -BIG, BIG)).reshape((1,) + shape)
    hi0 = rt.tensor(np.clip(np.broadcast_to(b.hi, shape), -BIG, BIG)).reshape((1,) + shape)
    S = theta.shape[0]
    probe = _Probe(program, g, name, theta, discrete, lo0, hi0)
    nd = len(shape)
    if old is None:
        c, sv, Lp = _mode(probe, S)
        dl = torch.full_like(c, START_HALF)
        du = torch.full_like(c, START_HALF)
    else:          # start from the window there is (the mode search is for a first window only)
        olo = rt.tensor(np.asarray(old[0], dtype=np.float64)).reshape((1,) + shape)
        ohi = rt.tensor(np.asarray(old[1], dtype=np.float64)).reshape((1,) + shape)
        c = torch.floor((olo + ohi) / 2).expand((S,) + shape).clone()
        dl, du = c - olo + 1, ohi - c + 1
        sv = torch.minimum(lo0 + torch.tensor([0.0] + [2.0 ** k for k in range(51)], dtype=lo0.dtype,
                                               device=lo0.device).reshape((-1, 1) + (1,) * nd), hi0.unsqueeze(0))
        sv = sv.expand((sv.shape[0], S) + shape)
        Lp = probe(sv)
    for _ in range(40):
        a = torch.maximum(c - dl, lo0)
        bb = torch.minimum(c + du, hi0)
        W = int((bb - a).max()) + 1
        if W > MAX_WIDTH * 2:
            return None
        vals = a.unsqueeze(0) + torch.arange(W, dtype=a.dtype, device=a.device).reshape((-1, 1) + (1,) * nd)
        inside = vals <= bb.unsqueeze(0)
        L = probe(torch.minimum(vals, bb.unsqueeze(0)))
        L = torch.where(inside, L, torch.full_like(L, -math.inf))
        logZ = torch.logsumexp(L, 0)
        if not bool(torch.isfinite(logZ).all()):
            return None
        p = torch.exp(L - logZ)
        top = (bb - a).long().unsqueeze(0)
        L_top = L.gather(0, top).squeeze(0)
        L_top1 = L.gather(0, (top - 1).clamp(min=0)).squeeze(0)
        t_up = torch.where(bb >= hi0, torch.zeros_like(c), _tail(torch.exp(L_top - logZ), L_top, L_top1))
        t_lo = torch.where(a <= lo0, torch.zeros_like(c), _tail(p[0], L[0], L[1] if W > 1 else L[0]))
        # a value of the sparse probe beyond the window with mass there (another mode)
        far = torch.exp(Lp - logZ.unsqueeze(0)) > TOL / 4
        above = far & (sv > bb.unsqueeze(0))
        below = far & (sv < a.unsqueeze(0))
        need_up = (t_up > TOL / 4) | above.any(0)
        need_lo = (t_lo > TOL / 4) | below.any(0)
        if not bool(need_up.any() or need_lo.any()):
            break
        reach_up = torch.where(above, sv, torch.full_like(sv, -BIG)).amax(0) - c + START_HALF
        reach_lo = c - torch.where(below, sv, torch.full_like(sv, BIG)).amin(0) + START_HALF
        du = torch.where(need_up, torch.maximum(du * 2, reach_up), du)
        dl = torch.where(need_lo, torch.maximum(dl * 2, reach_lo), dl)
    else:
        return None
    # trim to where the mass is: at most TOL / 4 dropped on each side (besides the tails beyond)
    cum = torch.cumsum(p, 0)
    keep_from = ((cum + t_lo.unsqueeze(0)) <= TOL / 4).sum(0)
    rcum = torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0])
    keep_to = W - 1 - ((rcum + t_up.unsqueeze(0)) <= TOL / 4).sum(0)
    keep_to = torch.maximum(keep_to, keep_from)
    a_s = a + keep_from.to(a.dtype)
    b_s = torch.minimum(a + keep_to.to(a.dtype), bb)
    dropped = (cum.gather(0, (keep_from - 1).clamp(min=0).unsqueeze(0)).squeeze(0) * (keep_from > 0)
               + t_lo + t_up
               + torch.where(keep_to < (bb - a).long(), rcum.gather(0, (keep_to + 1).clamp(max=W - 1).unsqueeze(0))
                             .squeeze(0), torch.zeros_like(c)))
    lo = a_s.amin(0).cpu().numpy().reshape(shape)
    hi = b_s.amax(0).cpu().numpy().reshape(shape)
    out_old = 0.0
    if old is not None:
        olo = rt.tensor(np.asarray(old[0], dtype=np.float64)).reshape(shape).unsqueeze(0)
        ohi = rt.tensor(np.asarray(old[1], dtype=np.float64)).reshape(shape).unsqueeze(0)
        outside = ((vals < olo.unsqueeze(0)) | (vals > ohi.unsqueeze(0))) & inside
        m = (p * outside).sum(0) + torch.where(a < olo, t_lo, torch.zeros_like(t_lo)) + \
            torch.where(bb > ohi, t_up, torch.zeros_like(t_up))
        out_old = float(m.max())
    if (hi - lo + 1).max() > MAX_WIDTH:
        return None
    return lo, hi, float(dropped.max()), out_old


# ---- draws to find the windows at ---------------------------------------------------------------------------
def prior_draws(program: LogJoint, gen: torch.Generator, S: int = DRAWS):
    """theta (S', dim) and score-path values from the prior (rows on a set's edge dropped)."""
    with torch.no_grad():
        sim = program.simulate({}, S, gen)
        theta = program.unconstrain({b.name: sim[b.name] for b in program.blocks})
        ok = torch.isfinite(theta).all(1)
        if not bool(ok.any()):
            theta, ok = torch.zeros((1, program.dim), dtype=program.dtype, device=program.device), \
                torch.ones(1, dtype=torch.bool, device=program.device)
            return theta, ({k: sim[k][:1] for k in program.score} or None)
        theta = theta[ok]
        disc = {k: sim[k][ok] for k in program.score} or None
    return theta, disc


def _set(program: LogJoint, name: str, lo, hi):
    program.set_window(name, lo, hi)


def _start(program: LogJoint):
    """Every window at its element's lower bound (a value of positive probability under the support)."""
    for g, m in windowed(program):
        b = bounds(program.model, m.name)
        lo = np.clip(np.broadcast_to(b.lo, b.lo.shape), -BIG, BIG)
        _set(program, m.name, lo, lo)


def find(program: LogJoint, theta: torch.Tensor, discrete, where: str, wins: Optional[Windows] = None,
         grow_only: bool = False, from_current: bool = False) -> Windows:
    """Search every window at the draws `theta`; -> the windows found (those too wide listed).
    `grow_only`: the windows only widen (united with the current ones); `from_current`: start from the
    compiled model's current windows (else from a mode search, for latents not yet in `wins`)."""
    wins = wins or Windows(program)
    groups = {}
    for g, m in windowed(program):
        groups.setdefault(g.name, []).append(m.name)
    for gname, names in groups.items():
        rounds = 3 if len(names) > 1 else 1
        for _ in range(rounds):
            for name in names:
                if name in wins.too_wide:
                    continue
                old = program.window(name) if name in wins.found or from_current else None
                res = search(program, name, theta, discrete, old)
                if res is None:
                    wins.too_wide.append(name)
                    continue
                lo, hi, outside, out_old = res
                if grow_only and old is not None:
                    lo, hi = np.minimum(lo, old[0]), np.maximum(hi, old[1])
                _set(program, name, lo, hi)
                wins.found[name] = Window(name, lo, hi, outside, where)
        if program.group_of(names[0]).size() > MAX_VALUES:
            wins.too_wide.extend(n for n in names if n not in wins.too_wide)
    return wins


def initial(program: LogJoint, gen: torch.Generator, draws: int = DRAWS) -> Windows:
    """Windows from prior draws of the continuous latents (before the mode search)."""
    _start(program)
    theta, disc = prior_draws(program, gen, draws if program.dim or program.score else 1)
    wins = Windows(program)
    if not windowed(program):
        return wins
    # the prior's range: the windows at each draw, united; under a vague prior the windows at its far draws
    # are too wide: then the draws whose windows fit are kept (the Laplace draws and q's re-check follow)
    where = "prior draws" if program.dim else ""
    found = find(program, theta, disc, where, wins)
    if found.too_wide and theta.shape[0] > 1:
        kept = _fitting_draws(program, theta, disc, where)
        if kept is not None:
            found = kept
    return found


def _fitting_draws(program: LogJoint, theta, disc, where: str) -> Optional[Windows]:
    """The windows at each prior draw alone; those that fit, united, narrowest first, while the union
    stays within MAX_WIDTH.  None when no draw's windows fit."""
    per = []
    for s in range(theta.shape[0]):
        _start(program)
        w = find(program, theta[s:s + 1], None if disc is None else {k: v[s:s + 1] for k, v in disc.items()},
                 where, Windows(program))
        if not w.too_wide:
            per.append({n: (x.lo, x.hi, x.outside) for n, x in w.found.items()})
    if not per:
        return None
    per.sort(key=lambda d: sum(float((hi - lo).max()) for lo, hi, _ in d.values()))
    union = dict(per[0])
    used = 1
    for d in per[1:]:
        cand = {n: (np.minimum(lo, union[n][0]), np.maximum(hi, union[n][1]), max(o, union[n][2]))
                for n, (lo, hi, o) in d.items()}
        if any((hi - lo + 1).max() > MAX_WIDTH for lo, hi, _ in cand.values()):
            continue
        union, used = cand, used + 1
    out = Windows(program)
    for n, (lo, hi, o) in union.items():
        _set(program, n, lo, hi)
        out.found[n] = Window(n, lo, hi, o, f"{used} of {theta.shape[0]} prior draws (the rest too wide)")
    return out


def laplace_draws(start, gen: torch.Generator, S: int = LAPLACE_DRAWS) -> torch.Tensor:
    """The mode, its sigma points mode +- 3 sds along each axis of the Laplace covariance (up to
    SIGMA_POINTS_MAX dimensions), and S random draws, all widened LAPLACE_WIDEN times."""
    D = start.mu0.shape[0]
    eps = torch.randn((S, D), generator=gen, dtype=start.mu0.dtype, device=start.mu0.device)
    if D <= SIGMA_POINTS_MAX:
        eye = torch.eye(D, dtype=start.mu0.dtype, device=start.mu0.device)
        eps = torch.cat([3 * eye, -3 * eye, eps])
    eps = eps * LAPLACE_WIDEN
    dev = eps * start.A if start.A.dim() == 1 else eps @ start.A.T
    return torch.cat([start.mu0.unsqueeze(0), start.mu0 + dev])


def refine(program: LogJoint, start, wins: Windows, gen: torch.Generator) -> str:
    """Windows from the Laplace approximation's draws; -> "grew" when they had to grow past the ones the
    mode was found with (the caller repeats the mode search), "too wide" when a window there is wider
    than MAX_WIDTH (`wins.too_wide` names them: the caller sends them to the score path), else "same"."""
    if not wins.found or start.cold:
        return "same"
    theta = laplace_draws(start, gen)
    before = {n: program.window(n) for n in wins.found}
    fresh = Windows(program)
    find(program, theta, None, "Laplace draws", fresh, from_current=True)
    if fresh.too_wide:
        wins.too_wide.extend(fresh.too_wide)
        return "too wide"
    wins.found.update(fresh.found)
    grew = False
    for n, (lo, hi) in before.items():
        if n in wins.found:
            w = wins.found[n]
            grew |= bool((w.lo < lo).any() or (w.hi > hi).any())
    return "grew" if grew else "same"


def recheck(program: LogJoint, family, wins: Windows) -> bool:
    """Measure the mass outside each window at q's draws; widen those that miss more than TOL.
    -> whether any was widened (the fit is then resumed)."""
    if not wins.found:
        return False
    with torch.no_grad():
        theta = family.rsample(RECHECK_DRAWS) if program.dim else \
            torch.zeros((1, 0), dtype=program.dtype, device=program.device)
    where = "q's draws" if program.dim else ""
    widened = False
    for name in list(wins.found):
        old = program.window(name)
        res = search(program, name, theta.detach(), None, old)
        if res is None:
            continue
        lo, hi, outside, out_old = res
        if out_old > TOL:
            lo, hi = np.minimum(lo, old[0]), np.maximum(hi, old[1])
            _set(program, name, lo, hi)
            wins.found[name] = Window(name, lo, hi, outside, where + " (widened)")
            widened = True
        else:
            wins.found[name] = Window(name, old[0], old[1], out_old, where)
    return widened


def preview(model, node_plans) -> Tuple[Dict[str, str], List[str]]:
    """For `ppl graph`: the windows at prior draws, as `ppl fit` first finds them (float64, CPU, seed 0).
    -> (latent -> text, the latents whose window is too wide)."""
    from ..backend.runtime import Runtime
    rt = Runtime.make("cpu", "float64", 0)
    program = LogJoint(model, node_plans, rt)
    wins = initial(program, rt.generator(), PREVIEW_DRAWS)
    texts = {n: f"{w.text()}" + ("; the fit re-checks it at q's draws" if program.dim else "")
             for n, w in wins.found.items() if n not in wins.too_wide}
    return texts, list(wins.too_wide)
