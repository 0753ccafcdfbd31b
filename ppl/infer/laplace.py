"""Initialisation: the mode of the unconstrained log density (L-BFGS) and its
Hessian -> the Laplace approximation N(mode, (-H)^-1), used as the starting
point and preconditioner of the variational fit.

Stage: `LogJoint` -> `Start(mu0, A, cold, note)` with A a Cholesky factor of
the covariance (or a vector of sds above `FULL_HESSIAN_MAX` dims).  Models
without a usable mode (funnels, improper directions) fall back to a cold
start: mu0 = 0, A = COLD_SCALE * I, `cold = True`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from typing import TYPE_CHECKING

from . import improper
from .optim import lbfgs

if TYPE_CHECKING:
    from .families import Preconditioner

FULL_HESSIAN_MAX = 400
MODE_EVALS = 300      # mode search budget: MODE_EVALS + 2 D evaluations
MODE_ITERS = 500      # and at most this many L-BFGS iterations
MAX_SD = 1e3          # clamp on any direction's sd from the Hessian
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


def find_mode(lj, on_eval=None):
    # models with a mode get there in < 100 evaluations (the bench and reference models: 8-74); a centred
    # hierarchy's density is unbounded (scale -> 0), and the search would creep down the funnel for
    # thousands (radon-like K=85: 3935 evaluations, 1.7 s)
    return lbfgs(_negative_log_density(lj), torch.zeros(lj.dim, dtype=lj.dtype, device=lj.device),
                 max_iter=MODE_ITERS, max_evals=MODE_EVALS + 2 * lj.dim, on_eval=on_eval)


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
    if mode is None:
        mode, evals_joint = find_mode(lj, on_eval)
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
            P = (arrow.dense(D, structure.buckets, structure.globals).to(device) if marginal
                 else torch.autograd.functional.hessian(f, mode))    # precision: -H of log p
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
    bad = int((lam <= floor).sum())
    # flat or non-convex directions (a kink like laplace's, a ridge): unit scale, not the widest allowed
    lam_c = torch.where(lam > floor, lam, torch.ones_like(lam))
    # stationarity: the Newton decrement in the (clamped) metric
    th = mode.clone().requires_grad_(True)
    grad = torch.autograd.grad(f(th), th)[0]
    cond_sd = None
    if V is not None:
        dP = torch.diagonal(P)
        cond_sd = 1.0 / torch.sqrt(torch.where(dP > floor, dP, torch.ones_like(dP)))
        gw = (V.T @ grad) / torch.sqrt(lam_c)
        cov = (V / lam_c) @ V.T
        cov = 0.5 * (cov + cov.T)
        A = torch.linalg.cholesky(cov + 1e-12 * torch.eye(D, dtype=dtype, device=device) * cov.diagonal().max())
    else:
        gw = grad / torch.sqrt(lam_c)
        A = 1.0 / torch.sqrt(lam_c)
        cond_sd = A
    decrement = float((gw * gw).sum())
    if decrement > 1.0 and not marginal:      # the marginal mode is not the joint density's stationary point
        cold.note = f"cold start (mode search did not settle: Newton decrement {decrement:.2g})"
        return cold
    note = (f"Laplace-marginal mode of the {len(structure.globals)} globals" if marginal
            else "Laplace at the mode") + (f" ({bad} flat or non-convex direction{'s' if bad > 1 else ''} clamped)"
                                    if bad else "")
    flat = improper.clamped_directions(lam, V, floor) if bad else None   # for improper.after_laplace
    return Start(mode, A, False, note, evals, cond_sd, flat, arrow)


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
