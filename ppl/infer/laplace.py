"""Initialisation: the mode of the unconstrained log density and its Hessian ->
the Laplace approximation N(mode, (-H)^-1), used as the starting point and
preconditioner of the variational fit.

The mode search: Newton steps with the exact Hessian up to NEWTON_MAX
dimensions (`optim.newton`: scaled by the Hessian's diagonal, non-convex and
flat directions modified, a backtracking line search), the whole Hessian
from one batched pass (`value_grad_hess`: D copies of theta, one
double-backward); L-BFGS above.  Newton is what makes an ill-conditioned
posterior safe: a regression on an uncentred predictor (years ~2000,
earnings ~1e4) has an intercept-slope correlation of -0.9999 and a log
scale whose curvature changes by e^20 on the way from the start to the
mode, which L-BFGS's ten pairs of history cannot follow (it stopped 5
posterior sds off); Newton gets there in 10-30 steps.

Stage: `LogJoint` -> `Start(mu0, A, cold, note)` with A a Cholesky factor of
the covariance (or a vector of sds above `FULL_HESSIAN_MAX` dims).  Models
without a usable mode (funnels, improper directions) fall back to a cold
start: mu0 = 0, A = COLD_SCALE * I, `cold = True`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from typing import TYPE_CHECKING

from . import improper
from .optim import lbfgs, newton

if TYPE_CHECKING:
    from .families import Preconditioner

FULL_HESSIAN_MAX = 400
NEWTON_MAX = 400      # Newton with the exact Hessian up to this many dimensions; L-BFGS above
NEWTON_ITERS = 100    # a model with a mode needs 5-40 Newton steps; a funnel's would go on for ever
NEWTON_EVALS = 100    # evaluations (Hessians and line-search values) per Newton run: the ill-conditioned
                      # regressions of bench/modes.py needed 20-55 from 0
LBFGS_FIRST = 60      # L-BFGS evaluations before the first Newton run (well-conditioned models: 8-74)
MODE_EVALS = 300      # mode search budget: MODE_EVALS + 2 D evaluations
MODE_ITERS = 500      # and at most this many L-BFGS iterations
MAX_SD = 1e3          # clamp on any direction's sd from a diagonal Hessian (above FULL_HESSIAN_MAX)
FLAT_REL = 1e-10      # scaled eigenvalues below this times the largest are flat (clamped to unit scale)
DIAG_REL = 1e-14      # a coordinate whose curvature is below this times the largest has none
COLD_SCALE = 0.1     # cold start: q = N(0, 0.1^2 I) in unconstrained space (sd 1 blew up centred hierarchies)


@dataclass
class Start:
    mu0: torch.Tensor
    A: torch.Tensor
    cold: bool                        # no mode was used: q starts at N(0, COLD_SCALE^2 I)
    note: str                         # for the fit header
    evals: int = 0
    cond_sd: torch.Tensor = None      # 1/sqrt(diag(-H)): the mean-field optimum for a Gaussian
    flat: torch.Tensor = None         # (k, D) clamped directions, for ppl/infer/improper.py (after_laplace)
    arrow: object = None              # the precision's arrow blocks (graph_family.ArrowPrecision), in theta
    flat_sd: torch.Tensor = None      # (k,) q's sd along each of `flat` (inf: clamped); None: all clamped

    def diagonal(self) -> torch.Tensor:
        """Scale vector for diagonal families (mean-field, low-rank)."""
        if self.cond_sd is not None:
            return self.cond_sd
        return self.A if self.A.dim() == 1 else torch.sqrt((self.A * self.A).sum(1))

    def preconditioner(self, kind: str) -> "Preconditioner":
        """The whitening a family asks for: "full" (a Cholesky factor, diagonal when only a diagonal
        is known) or "diagonal" (a vector of sds)."""
        from .families import Preconditioner
        A = self.A
        if kind != "full" or A.dim() == 1:
            A = self.diagonal()
            if kind == "full":
                A = torch.diag(A)
        return Preconditioner(self.mu0, A)


def cold_start(D: int, dtype, full: bool, note: str, device=None) -> Start:
    """No mode to start from: q = N(0, COLD_SCALE^2 I), a full or diagonal preconditioner."""
    eye = torch.eye(D, dtype=dtype, device=device) if full else torch.ones(D, dtype=dtype, device=device)
    return Start(torch.zeros(D, dtype=dtype, device=device), COLD_SCALE * eye, True, note)


def _negative_log_density(lj):
    def f(theta):
        return -lj.log_prob(theta.unsqueeze(0))[0]
    return f


def value_grad_hess(lj, x: torch.Tensor):
    """-> (-log p(x), its gradient, its Hessian), the Hessian from D copies of x in one batched pass
    (chunked as the log joint's chunk size says): row s of the Hessian is the gradient of the s-th
    copy's s-th partial derivative.  (inf, None, None) where log p is not finite or fails."""
    D = x.shape[0]
    H = torch.empty((D, D), dtype=x.dtype, device=x.device)
    step = max(1, min(D, lj.chunk_size()))
    value, grad = None, None
    try:
        for i in range(0, D, step):
            rows = min(step, D - i)
            X = x.detach().expand(rows, D).clone().requires_grad_(True)
            lp = lj.log_prob(X)
            g, = torch.autograd.grad(lp.sum(), X, create_graph=True)
            if value is None:
                value, grad = -float(lp[0].detach()), -g[0].detach()
                if not math.isfinite(value):
                    return math.inf, None, None
            sel = g[torch.arange(rows), torch.arange(i, i + rows)].sum()
            if sel.requires_grad:
                Hi, = torch.autograd.grad(sel, X, allow_unused=True)
                H[i:i + rows] = 0.0 if Hi is None else -Hi
            else:                                   # log p linear in every coordinate
                H[i:i + rows] = 0.0
    except (RuntimeError, ValueError):
        return math.inf, None, None
    return value, grad, 0.5 * (H + H.T)


def find_mode(lj, on_eval=None):
    """-> (mode, evaluations, the precision -H at the mode or None, settled).

    Up to NEWTON_MAX dimensions: LBFGS_FIRST evaluations of L-BFGS from 0, then Newton from there
    (a mode L-BFGS reached: one or two Hessians to confirm it and to polish); where Newton does not
    settle, the rest of L-BFGS's budget and Newton again.  L-BFGS first because its short first
    steps keep out of a funnel that Newton would dive into (at the start of a centred hierarchy every
    group effect equals the mean, so the density rises as the group scale falls: a full Newton step
    from 0 takes the bundled radon's log tau to -4 before the group effects have moved, and it ends
    at tau ~ 1e-16; L-BFGS finds the local mode at tau ~ 0.35 in 40 evaluations), and because a
    Hessian costs about 14 gradients at N = 1e4, D = 22.  Newton because L-BFGS cannot follow an
    ill-conditioned posterior (bench/modes.py: uncentred flat-prior regressions, where it stopped 5
    posterior sds off or not at all).  A funnel with no mode defeats both, and the start is cold."""
    x0 = torch.zeros(lj.dim, dtype=lj.dtype, device=lj.device)
    f = _negative_log_density(lj)
    budget = MODE_EVALS + 2 * lj.dim
    # models with a mode get there in < 100 evaluations (the bench and reference models: 8-74); a centred
    # hierarchy's density is unbounded (scale -> 0), and the search would creep down the funnel for
    # thousands (radon-like K=85: 3935 evaluations, 1.7 s)
    if lj.dim > NEWTON_MAX:
        mode, evals = lbfgs(f, x0, max_iter=MODE_ITERS, max_evals=budget, on_eval=on_eval)
        return mode, evals, None, None

    def value(x):
        with torch.no_grad():
            try:
                return float(f(x))
            except (RuntimeError, ValueError):
                return math.inf

    def run_newton(x, max_evals):
        return newton(value, lambda z: value_grad_hess(lj, z), x, max_iter=NEWTON_ITERS, max_evals=max_evals,
                      on_eval=on_eval)
    x1, evals, settled = lbfgs(f, x0, max_iter=MODE_ITERS, max_evals=LBFGS_FIRST, on_eval=on_eval, converged=True)
    res = run_newton(x1, NEWTON_EVALS)
    evals += res.evals
    if not res.converged and not settled:
        x2, ev, settled = lbfgs(f, x1, max_iter=MODE_ITERS, max_evals=max(1, budget - evals), on_eval=on_eval,
                                converged=True)
        # where L-BFGS did not settle either (a funnel, most likely), Newton gets a few steps only
        res = run_newton(x2, NEWTON_EVALS if settled else NEWTON_EVALS // 5)
        evals += ev + res.evals
    return res.x, evals, res.hess, res.converged


def laplace(lj, full: bool = True, structure=None, on_eval=None) -> Start:
    """`full`: compute the exact Hessian when D <= FULL_HESSIAN_MAX (else a diagonal estimate).
    `structure` (ppl.structure.Structure): also the precision's arrow blocks, exactly, from a few
    Hessian-vector products; above FULL_HESSIAN_MAX their diagonal replaces the estimate."""
    D, dtype, device = lj.dim, lj.dtype, lj.device
    cold = cold_start(D, dtype, full, "cold start (no usable mode)", device)
    if D == 0:
        return cold
    f = _negative_log_density(lj)
    mode, arrow, evals = _marginal(f, D, dtype, device, structure, on_eval)
    P = None
    if mode is None:
        mode, evals_joint, P, settled = find_mode(lj, on_eval)
        evals += evals_joint
    marginal = arrow is not None
    cold.evals = evals
    if not torch.isfinite(mode).all():
        return cold
    try:
        val = f(mode)
        if not torch.isfinite(val):
            return cold
        if structure is not None and arrow is None:
            arrow = _arrow(f, mode, structure)
        if full and D <= FULL_HESSIAN_MAX:
            if marginal:
                P = arrow.dense(D, structure.buckets, structure.globals).to(device)
            elif P is None:
                P = torch.autograd.functional.hessian(f, mode)      # precision: -H of log p
            P = 0.5 * (P + P.T)
            lam, V = torch.linalg.eigh(P)
        elif arrow is not None:
            lam = arrow.diagonal(D, structure.buckets, structure.globals)
            V = None
        else:
            lam = _diag_hessian(f, mode, dtype)
            V = None
    except (RuntimeError, ValueError):
        return cold
    if not torch.isfinite(lam).all():
        return cold
    floor = 1.0 / MAX_SD ** 2
    # stationarity: the Newton decrement in the (clamped) metric
    th = mode.clone().requires_grad_(True)
    grad = torch.autograd.grad(f(th), th)[0]
    if V is not None:
        A, cond_sd, gw, lam, Vn, floor = _scaled_laplace(P, grad)
    else:
        # flat or non-convex directions (a kink like laplace's, a ridge): unit scale, not the widest allowed
        Vn = None
        lam_c = torch.where(lam > floor, lam, torch.ones_like(lam))
        gw = grad / torch.sqrt(lam_c)
        A = 1.0 / torch.sqrt(lam_c)
        cond_sd = A
    bad = int((lam <= floor).sum())
    decrement = float((gw * gw).sum())
    if decrement > 1.0 and not marginal:      # the marginal mode is not the joint density's stationary point
        cold.note = f"cold start (mode search did not settle: Newton decrement {decrement:.2g})"
        return cold
    note = (f"Laplace-marginal mode of the {len(structure.globals)} globals" if marginal
            else "Laplace at the mode") + (f" ({bad} flat or non-convex direction{'s' if bad > 1 else ''} clamped)"
                                    if bad else "")
    flat = improper.clamped_directions(lam, Vn, floor) if bad else None   # for improper.after_laplace
    flat_sd = None
    if V is not None:
        # wide directions (sd above MAX_SD) keep their width but are probed too: where the mode search
        # walked out along an improper ray (a flat scale, separation) the curvature there is tiny
        # but not zero
        lam_raw, V_raw = torch.linalg.eigh(P)
        wide = improper.clamped_directions(lam_raw, V_raw, 1.0 / MAX_SD ** 2, exclude=flat)
        if wide is not None:
            sd_w = (wide @ (A @ A.T) @ wide.T).diagonal().sqrt()
            inf = torch.full((0 if flat is None else flat.shape[0],), math.inf, dtype=dtype)
            flat_sd = torch.cat([inf, sd_w])
            flat = wide if flat is None else torch.cat([flat, wide])
    return Start(mode, A, False, note, evals, cond_sd, flat, arrow, flat_sd)


def _scaled_laplace(P: torch.Tensor, grad: torch.Tensor):
    """The Laplace covariance from the precision P, in coordinates scaled by P's diagonal (each
    coordinate's conditional sd: a coefficient in dollars with sd 2e4 beside a log scale with sd 0.02
    are both unit there).  Flat or non-convex directions are judged there, relative to the largest
    eigenvalue (below FLAT_REL: a ridge, a kink, an unused element), and get unit scaled variance; no
    absolute clamp, so a wide but well-determined direction keeps its width.
    -> (Cholesky factor A of the covariance, conditional sds, the whitened gradient, the scaled
    eigenvalues, their directions in theta as unit columns, the flatness threshold)."""
    D, dtype, device = P.shape[0], P.dtype, P.device
    dP = torch.diagonal(P)
    tiny = torch.finfo(dtype).eps
    pos = dP > DIAG_REL * max(float(dP.max()), tiny)
    s = torch.where(pos, dP, torch.ones_like(dP)).rsqrt()
    lam, W = torch.linalg.eigh(0.5 * (s[:, None] * P * s[None, :] + (s[:, None] * P * s[None, :]).T))
    floor = max(FLAT_REL, 100 * tiny) * max(float(lam.max()), tiny)
    lam_c = torch.where(lam > floor, lam, torch.ones_like(lam))
    gw = (W.T @ (s * grad)) / torch.sqrt(lam_c)
    cov_s = (W / lam_c) @ W.T
    cov_s = 0.5 * (cov_s + cov_s.T)
    L = torch.linalg.cholesky(cov_s + 1e-12 * torch.eye(D, dtype=dtype, device=device) * cov_s.diagonal().max())
    A = s[:, None] * L                                              # still lower-triangular
    V = s[:, None] * W
    V = V / V.norm(dim=0, keepdim=True)
    return A, s, gw, lam, V, floor


def _marginal(f, D, dtype, device, structure, on_eval):
    """With a hierarchy's structure: the globals' Laplace-marginal mode and its precision
    (ppl/infer/marginal.py) -> (theta, arrow, evaluations); (None, None, evaluations) without one."""
    if structure is None or not structure.n_groups or not len(structure.globals):
        return None, None, 0
    from .marginal import marginal_laplace
    try:
        return marginal_laplace(f, torch.zeros(D, dtype=dtype, device=device), structure, on_eval)
    except (RuntimeError, ValueError, torch.linalg.LinAlgError):
        return None, None, 0


def _arrow(f, mode, structure):
    """The precision (-H of log p) at the mode in the structure's arrow blocks."""
    from .graph_family import arrow_hessian
    th = mode.clone().requires_grad_(True)
    g = torch.autograd.grad(f(th), th, create_graph=True)[0]         # gradient of -log p

    def hess_vec(x, v):                                               # H v of log p
        return -torch.autograd.grad(g, th, v, retain_graph=True)[0].detach()
    return arrow_hessian(hess_vec, mode, structure.buckets, structure.globals)


def _diag_hessian(f, mode, dtype, probes: int = 32):
    """Hutchinson estimate of diag(H) from Hessian-vector products."""
    gen = torch.Generator(device=mode.device).manual_seed(0)
    th = mode.clone().requires_grad_(True)
    g = torch.autograd.grad(f(th), th, create_graph=True)[0]
    acc = torch.zeros_like(mode)
    for _ in range(probes):
        v = (torch.randint(0, 2, mode.shape, generator=gen, device=mode.device) * 2 - 1).to(dtype)
        hv = torch.autograd.grad(g, th, v, retain_graph=True)[0]
        acc += v * hv
    return (acc / probes).detach()
