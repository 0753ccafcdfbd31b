"""The start of a structured fit: the mode of the globals' Laplace-marginal posterior, with every
group's locals at their conditional mode (as TMB and INLA do for latent Gaussian models).

Stage: (negative log density f of theta, `ppl.structure.Structure`, a first point) -> theta*.

The joint mode is a poor start for a hierarchy with many groups.  Non-centred, the group scale tau
trades against the K effects z (tau z fixed): the joint mode maximises the prior of z by shrinking
it, tau^4 ~ 4 K s^2 for group effects of sd s (K = 10,000, s = 0.5: tau = 10 where the posterior says
0.5).  Centred, the joint density is unbounded (tau -> 0).  The Laplace-marginal density of the
globals g,

    psi(g) = f(g, z*(g)) + 1/2 sum_j log det H_jj(g, z*(g)),   z*(g) = argmin_z f(g, z),

(H = the Hessian of f; H_jj is group j's block) has neither problem: the log-determinant is the
volume each group's effects occupy, which the joint mode ignores.

Inner problem: given g, f is a sum of independent terms, one per group (the structure's invariant: no
factor couples two groups except through the globals), so Newton's method with the block-diagonal
Hessian solves all groups at once; the blocks come from b Hessian-vector products (one probe per
slot of every group at once: a colouring).  Outer problem: L-BFGS on g with the exact gradient by
implicit differentiation (dz*/dg = -H_ll^-1 H_lg):

    dpsi/dg = df/dg + 1/2 (dD/dg - H_gl H_ll^-1 dD/dz),   D = sum_j log det H_jj,

where dD comes from differentiating the Hessian-vector products once more.  Cost per outer step: a
few Newton steps of (1 gradient + b Hessian-vector products) and one third-order pass: O(data).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from .optim import lbfgs_vg

INNER_ITERS = 50          # Newton iterations of the locals per outer evaluation (warm: 1-4)
INNER_TOL = 1e-9          # on the largest group's Newton decrement
OUTER_ITERS = 200
MAX_STEP = 5.0            # a group's Newton step is cut to this length (unconstrained units)


class _Blocks:
    """The local coordinates by group: `idx[i]` (J_i, b_i) per bucket of the structure."""

    def __init__(self, structure, device):
        self.idx = [torch.as_tensor(b, dtype=torch.long, device=device) for b in structure.buckets if len(b)]
        self.glob = torch.as_tensor(structure.globals, dtype=torch.long, device=device)
        self.width = max([int(i.shape[1]) for i in self.idx] + [0])

    def probes(self, dim: int, dtype, device) -> List[torch.Tensor]:
        """Slot k of every group at once, for k < the widest group."""
        out = []
        for k in range(self.width):
            v = torch.zeros(dim, dtype=dtype, device=device)
            for idx in self.idx:
                if k < idx.shape[1]:
                    v[idx[:, k]] = 1.0
            out.append(v)
        return out

    def gather(self, hvps: List[torch.Tensor]) -> List[torch.Tensor]:
        """The diagonal blocks (J, b, b) from the probes' Hessian-vector products (symmetrised)."""
        blocks = []
        for idx in self.idx:
            b = idx.shape[1]
            H = torch.stack([hvps[k][idx] for k in range(b)], -1)             # (J, b, b): column k
            blocks.append(0.5 * (H + H.transpose(-1, -2)))
        return blocks


def _grad_and_blocks(f, x: torch.Tensor, blk: _Blocks, probes, create_graph: bool):
    """(f(x), gradient, diagonal blocks of the Hessian, and the graph if asked for)."""
    v = f(x)
    g, = torch.autograd.grad(v, x, create_graph=True)
    hvps = [torch.autograd.grad(g, x, p, retain_graph=True, create_graph=create_graph)[0] for p in probes]
    return v, g, blk.gather(hvps)


def _block_solve(blocks: List[torch.Tensor], blk: _Blocks, r: torch.Tensor) -> Optional[torch.Tensor]:
    """H_ll^-1 r on the locals (zeros elsewhere); None where a block is not positive definite."""
    out = torch.zeros_like(r)
    for H, idx in zip(blocks, blk.idx):
        L, info = torch.linalg.cholesky_ex(H)
        if bool((info != 0).any()):
            return None
        out[idx] = torch.cholesky_solve(r[idx].unsqueeze(-1), L).squeeze(-1)
    return out


def _newton_locals(f, x: torch.Tensor, blk: _Blocks, probes) -> Tuple[torch.Tensor, bool]:
    """Minimise f over the locals with the globals held: block Newton with a backtracking line
    search, each group's step regularised where its block is not positive definite."""
    x = x.detach().clone()
    for _ in range(INNER_ITERS):
        xr = x.requires_grad_(True)
        v, g, blocks = _grad_and_blocks(f, xr, blk, probes, False)
        v, g = float(v.detach()), g.detach()
        if not math.isfinite(v) or not torch.isfinite(g).all():
            return x.detach(), False
        step = torch.zeros_like(x)
        worst = 0.0
        for H, idx in zip(blocks, blk.idx):
            H = H.detach()
            lam_min = torch.linalg.eigvalsh(H)[:, :1]                               # (J, 1)
            shift = torch.clamp(1e-8 - lam_min, min=0.0)                            # Levenberg where needed
            Hs = H + shift.unsqueeze(-1) * torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
            d = -torch.linalg.solve(Hs, g[idx].unsqueeze(-1)).squeeze(-1)           # (J, b)
            worst = max(worst, float((-(d * g[idx]).sum(-1)).max()))
            norm = d.norm(dim=-1, keepdim=True)
            step[idx] = d * torch.clamp(MAX_STEP / norm.clamp_min(1e-300), max=1.0)
        x = x.detach()
        if worst < INNER_TOL:
            return x, True
        t = 1.0
        for _ in range(30):
            trial = x + t * step
            with torch.no_grad():
                fv = float(f(trial))
            if math.isfinite(fv) and fv <= v + 1e-4 * t * float((g * step).sum()):
                break
            t *= 0.5
        else:
            return x, False
        x = trial
    return x, False


class _Psi:
    """psi(g) and its gradient, the locals warm-started from the last evaluation."""

    def __init__(self, f, x0: torch.Tensor, structure):
        self.f = f
        self.blk = _Blocks(structure, x0.device)
        self.probes = self.blk.probes(x0.shape[0], x0.dtype, x0.device)
        self.x = x0.detach().clone()

    def value_grad(self, gvals: torch.Tensor):
        f, blk = self.f, self.blk
        x = self.x.clone()
        x[blk.glob] = gvals
        x, ok = _newton_locals(f, x, blk, self.probes)
        if not ok:
            return math.inf, None
        self.x = x
        xr = x.clone().requires_grad_(True)
        v, g, blocks = _grad_and_blocks(f, xr, blk, self.probes, True)
        logdet = 0.0
        for H in blocks:
            L, info = torch.linalg.cholesky_ex(H)
            if bool((info != 0).any()):
                return math.inf, None
            logdet = logdet + 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum()
        dD, = torch.autograd.grad(logdet, xr, retain_graph=True)
        w = _block_solve([H.detach() for H in blocks], blk, dD.detach())
        if w is None:
            return math.inf, None
        u, = torch.autograd.grad(g, xr, w)                                          # H [0; w]
        grad = g.detach()[blk.glob] + 0.5 * (dD[blk.glob] - u[blk.glob])
        value = float(v.detach()) + 0.5 * float(logdet.detach())
        if not math.isfinite(value) or not torch.isfinite(grad).all():
            return math.inf, None
        return value, grad.detach()

    def hessian(self, gstar: torch.Tensor, scale: torch.Tensor) -> Optional[torch.Tensor]:
        """psi's Hessian at g* by central differences of the exact gradient (steps of 1e-3 of `scale`)."""
        G = gstar.shape[0]
        x_keep = self.x.clone()
        cols = []
        for k in range(G):
            h = 1e-3 * float(scale[k])
            e = torch.zeros_like(gstar)
            e[k] = h
            _, gp = self.value_grad(gstar + e)
            _, gm = self.value_grad(gstar - e)
            self.x = x_keep.clone()
            if gp is None or gm is None:
                return None
            cols.append((gp - gm) / (2 * h))
        Hp = torch.stack(cols, 1)
        return 0.5 * (Hp + Hp.T)


MAX_FD_GLOBALS = 32       # psi's Hessian by differences up to this many globals (2 G evaluations)
NEWTON_ITERS = 8          # Newton steps on the globals after L-BFGS


def _newton_globals(psi: "_Psi", g: torch.Tensor):
    """Newton's method on psi with its Hessian by differences: L-BFGS stalls along a ridge of the
    globals (an intercept against the slope of an uncentred covariate, years around 2000: correlation
    -0.9999), Newton's step follows it.  -> (g, psi evaluations)."""
    evals = 0
    for _ in range(NEWTON_ITERS):
        v, grad = psi.value_grad(g)
        evals += 1
        if grad is None:
            break
        H = psi.hessian(g, 0.1 * torch.clamp(g.abs(), min=1.0))
        evals += 2 * g.shape[0]
        if H is None or not bool(torch.isfinite(H).all()):
            break
        lam, V = torch.linalg.eigh(H)
        if not bool((lam > 0).all()):
            break
        step = V @ ((V.T @ grad) / lam)
        dec = float(grad @ step)
        if dec < 1e-10:
            break
        t = 1.0
        while t > 1e-4:
            v2, _ = psi.value_grad(g - t * step)
            evals += 1
            if math.isfinite(v2) and v2 <= v - 1e-4 * t * dec:
                break
            t *= 0.5
        else:
            break
        g = g - t * step
    return g, evals


def marginal_laplace(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, structure,
                     on_eval: Optional[Callable[[float], None]] = None):
    """-> (theta*, the precision's arrow blocks, outer evaluations), or (None, None, evaluations) where
    it fails.  theta*: the globals at psi's mode, each group's locals at their conditional mode.  The
    precision is the Gaussian with the globals' marginal N(g*, psi''(g*)^-1) and each group given the
    globals N(z* + dz*/dg (g - g*), H_jj^-1): f's Hessian at theta*, with the globals' block replaced by
    psi'' + H_gl H_ll^-1 H_lg."""
    from .graph_family import arrow_hessian
    psi = _Psi(f, x0, structure)
    blk = psi.blk
    if not blk.idx or blk.glob.numel() == 0:
        return None, None, 0

    def counted(gvals):
        out = psi.value_grad(gvals)
        if on_eval is not None and math.isfinite(out[0]):
            on_eval(out[0])
        return out

    gstar, evals, _ = lbfgs_vg(counted, psi.x[blk.glob].clone(), max_iter=OUTER_ITERS, history=10,
                               gtol=1e-6, ftol=1e-10)
    if blk.glob.numel() <= MAX_FD_GLOBALS:
        gstar, more = _newton_globals(psi, gstar)
        evals += more
    value, _ = psi.value_grad(gstar)
    x = psi.x
    if not math.isfinite(value) or not torch.isfinite(x).all():
        return None, None, evals
    th = x.clone().requires_grad_(True)
    g = torch.autograd.grad(f(th), th, create_graph=True)[0]
    P = arrow_hessian(lambda _, v: -torch.autograd.grad(g, th, v, retain_graph=True)[0].detach(),
                      x, structure.buckets, structure.globals)
    if blk.glob.numel() <= MAX_FD_GLOBALS:
        schur = P.glob.clone()
        through = torch.zeros_like(schur)
        for Pl, Pc in zip(P.loc, P.cpl):
            sol = torch.linalg.solve(Pl, Pc.transpose(-1, -2))                    # (J, b, G)
            through = through + torch.einsum("jgb,jbh->gh", Pc, sol)
        schur = schur - through
        # steps of 1e-3 sd where the profile's curvature gives one (the joint density need not be
        # convex at g*: non-centred, it is not in tau), 1e-4 elsewhere
        d = torch.diagonal(schur)
        scale = torch.where(d > 1.0, 1.0 / torch.sqrt(d.clamp_min(1.0)), torch.full_like(d, 0.1))
        Hpsi = psi.hessian(gstar, scale)
        evals += 2 * int(blk.glob.numel())
        if Hpsi is not None and bool(torch.isfinite(Hpsi).all()) and \
                bool((torch.linalg.eigvalsh(Hpsi) > 0).all()):
            P.glob = Hpsi + through
            P.marginal_globals = True
    return x, P, evals
