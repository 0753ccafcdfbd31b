"""The `graph` family: a Gaussian whose precision has the sparsity the model
graph implies (structured VI derived from the model, as Pyro's AutoGaussian).

Stage: (preconditioner, `ppl.structure.Structure`) -> a family over theta.

The structure splits the unconstrained coordinates into local groups (a
group effect z[k]; with varying slopes, the pair (a[k], c[k])), which the
posterior couples only with the global coordinates, and the globals.  In the
order (groups..., globals) the precision is an arrow, and so is its Cholesky
factor L (Lambda = L L^T, no fill-in):

    L = [[L_loc (block diagonal: one b x b lower triangle per group), 0    ],
         [L_cpl (G x b per group),                                  L_glob]]

q(u) = N(m, (L L^T)^-1) in whitened coordinates u (theta = mu0 + A u, A a
vector); started at the Laplace precision's factor when the start has one.
(Parameterising L = L0 M with the start's factor L0 fixed, as the dense
families whiten by the Laplace covariance, made L-BFGS slower here: 1,217
evaluations without converging against 286 at K = 200.)  Sampling solves L^T (u - m) = eps (globals first, then each group
given the globals); log q and the entropy need L's diagonal and one product
with L^T.  Everything costs O(J b^2 + J G b + G^2) per draw for J groups of
size b and G globals: never O(dim^2).  Groups of one size form a bucket;
buckets are batched tensors.

Fixed draws (`fixed_eps`): globals are whitened to mean 0 and covariance I
exactly; each group's draws are made uncorrelated with the globals' and
whitened within the group.  The expected log density of a posterior with
this sparsity depends only on those blocks' moments, so for a Gaussian
posterior the fixed-draw optimum is the exact one, with far fewer draws
than dimensions.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .families import GaussianFamily, Preconditioner, register_family

_LOG2PI = math.log(2 * math.pi)


def _tril_exp(raw: torch.Tensor) -> torch.Tensor:
    """Batched lower triangle with exp on the diagonal."""
    return torch.tril(raw, -1) + torch.diag_embed(torch.exp(torch.diagonal(raw, dim1=-2, dim2=-1)))


@register_family
class GraphGaussian(GaussianFamily):
    name = "graph"
    richer = None
    needs_structure = True

    def __init__(self, pre: Preconditioner, generator: torch.Generator, config=None, structure=None,
                 precision=None):
        super().__init__(pre, generator, config)
        if structure is None:
            raise ValueError("the graph family needs the model's structure")
        dev = self.device
        self.buckets = [torch.as_tensor(b, dtype=torch.long, device=dev) for b in structure.buckets if len(b)]
        self.glob = torch.as_tensor(structure.globals, dtype=torch.long, device=dev)
        G = int(self.glob.shape[0])
        init = {"m": self._zeros(self.dim)}
        for i, idx in enumerate(self.buckets):
            J, b = idx.shape
            init[f"loc{i}"] = self._zeros(J, b, b)
            init[f"cpl{i}"] = self._zeros(J, G, b)
        init["glob"] = self._zeros(G, G)
        if precision is not None:
            init.update({k: (v if k.startswith("cpl") else _log_diag_tril(v))
                         for k, v in self._from_precision(precision).items()})
        self._allocate(init)

    # ---- the factor ------------------------------------------------------------------------------
    def _parts(self, views):
        """The blocks of L: per group (J, b, b), coupling (J, G, b), globals (G, G)."""
        return ([_tril_exp(views[f"loc{i}"]) for i in range(len(self.buckets))],
                [views[f"cpl{i}"] for i in range(len(self.buckets))], _tril_exp(views["glob"]))

    def _log_diag(self, views) -> torch.Tensor:
        """log det L (triangular: the sum of its diagonal's logs, which are raw parameters)."""
        total = torch.diagonal(views["glob"]).sum()
        for i in range(len(self.buckets)):
            total = total + torch.diagonal(views[f"loc{i}"], dim1=-2, dim2=-1).sum()
        return total

    def _solve(self, views, eps: torch.Tensor) -> torch.Tensor:
        """x with L^T x = eps, for eps (S, dim) in theta's coordinate order."""
        locs, cpls, Lg = self._parts(views)
        x = torch.zeros_like(eps)
        if self.glob.numel():
            xg = torch.linalg.solve_triangular(Lg.T, eps[:, self.glob].T, upper=True).T      # (S, G)
            x = x.index_copy(1, self.glob, xg)
        else:
            xg = eps[:, :0]
        for idx, Ll, Lc in zip(self.buckets, locs, cpls):
            J, b = idx.shape
            rhs = eps[:, idx.reshape(-1)].reshape(-1, J, b)                                   # (S, J, b)
            if xg.shape[1]:
                rhs = rhs - torch.einsum("jgb,sg->sjb", Lc, xg)
            if b == 1:
                xl = rhs / Ll[:, 0, :]
            else:
                xl = torch.linalg.solve_triangular(Ll.transpose(-1, -2).unsqueeze(0), rhs.unsqueeze(-1),
                                                   upper=True).squeeze(-1)
            x = x.index_copy(1, idx.reshape(-1), xl.reshape(-1, J * b))
        return x

    def _lt_times(self, views, d: torch.Tensor) -> torch.Tensor:
        """L^T d for d (S, dim)."""
        locs, cpls, Lg = self._parts(views)
        out = torch.zeros_like(d)
        dg = d[:, self.glob]
        if self.glob.numel():
            out = out.index_copy(1, self.glob, dg @ Lg)
        for idx, Ll, Lc in zip(self.buckets, locs, cpls):
            J, b = idx.shape
            dl = d[:, idx.reshape(-1)].reshape(-1, J, b)
            w = torch.einsum("jcb,sjc->sjb", Ll, dl)
            if dg.shape[1]:
                w = w + torch.einsum("jgb,sg->sjb", Lc, dg)
            out = out.index_copy(1, idx.reshape(-1), w.reshape(-1, J * b))
        return out

    # ---- the family protocol -------------------------------------------------------------------
    def rsample_u(self, S: int) -> torch.Tensor:
        return self.u_from_eps(self._eps(S))

    def u_from_eps(self, eps: torch.Tensor) -> torch.Tensor:
        views = self._params
        return views["m"] + self._solve(views, eps)

    def reparam(self, eps: torch.Tensor) -> torch.Tensor:
        """theta(eps), differentiable in the parameters (fixed draws)."""
        return self.pre.to_theta(self.u_from_eps(eps))

    def log_q_u(self, u: torch.Tensor) -> torch.Tensor:
        views = self._params
        w = self._lt_times(views, u - views["m"])
        return -0.5 * (w * w).sum(-1) + self._log_diag(views) - 0.5 * self.dim * _LOG2PI

    def entropy_u(self) -> torch.Tensor:
        return -self._log_diag(self._params) + 0.5 * self.dim * (1 + _LOG2PI)

    def mean_scale_u(self):
        """q's mean and marginal sds in u (for checks and rewhitening: the sds by one solve per unit
        vector would be O(dim^2); instead the exact marginal variances from the arrow structure)."""
        views = self._raw
        locs, cpls, Lg = self._parts(views)
        var = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        if self.glob.numel():
            Lg_inv = torch.linalg.solve_triangular(Lg, torch.eye(Lg.shape[0], dtype=self.dtype, device=self.device),
                                                   upper=False)
            cov_g = Lg_inv.T @ Lg_inv                                   # (L_g L_g^T)^-1 ... of the Schur part
            var[self.glob] = torch.diagonal(cov_g)
        else:
            cov_g = None
        for idx, Ll, Lc in zip(self.buckets, locs, cpls):
            J, b = idx.shape
            Ll_inv = torch.linalg.solve_triangular(Ll, torch.eye(b, dtype=self.dtype, device=self.device).expand(J, b, b),
                                                   upper=False)          # (J, b, b)
            own = torch.einsum("jcb,jcd->jbd", Ll_inv, Ll_inv)         # L_jj^-T L_jj^-1: (J, b, b)
            v = torch.diagonal(own, dim1=-2, dim2=-1)
            if cov_g is not None:
                # x_j = L_jj^-T (eps_j - Lc_j^T x_g): the part through x_g adds B cov_g B^T, B = L_jj^-T Lc_j^T
                B = torch.einsum("jcb,jgc->jbg", Ll_inv, Lc)           # (J, b, G)
                v = v + torch.einsum("jbg,gh,jbh->jb", B, cov_g, B)
            var[idx.reshape(-1)] = v.reshape(-1)
        return views["m"], torch.sqrt(var)

    def fixed_eps(self, M: int, gen: torch.Generator) -> torch.Tensor:
        """M standard-normal draws, moment-matched block by block (see the module docstring)."""
        eps = torch.randn((M, self.dim), generator=gen, dtype=self.dtype, device=self.device)
        eps = eps - eps.mean(0)
        G = int(self.glob.numel())
        if G:
            eg = _whiten(eps[:, self.glob])
            eps[:, self.glob] = eg
        for idx in self.buckets:
            J, b = idx.shape
            el = eps[:, idx.reshape(-1)].reshape(M, J, b)
            if G:
                coef = torch.einsum("mg,mjb->gjb", eg, el) / M          # regression on the whitened globals
                el = el - torch.einsum("mg,gjb->mjb", eg, coef)
            cov = torch.einsum("mjb,mjc->jbc", el, el) / M
            chol = torch.linalg.cholesky(cov)
            el = torch.linalg.solve_triangular(chol.unsqueeze(0), el.unsqueeze(-1), upper=False).squeeze(-1)
            eps[:, idx.reshape(-1)] = el.reshape(M, J * b)
        return eps

    # block moment matching makes the fixed-draw optimum exact for a Gaussian posterior with any number
    # of draws above a group's size plus the globals; more draws only tighten non-Gaussian corrections
    max_fixed_draws = 64
    prefers_fixed_draws = True
    typical_fixed_draw_evals = 500      # K = 1,000 hierarchies took 290-830
    # L-BFGS creeps along a hierarchy's long valleys: at K = 200 it was within 0.09 nats of the optimum
    # after 150 of 283 evaluations; stop when 20 iterations gain less than 0.01 nats
    fixed_draw_plateau = (20, 0.01)

    fixed_draw_chunk = 2_000_000     # elements per chunk of draws (~160 MB of intermediates)

    def min_fixed_draws(self) -> int:
        """64 whatever the data size: with fewer, every group's coupling to the globals fits the draws'
        noise, and over thousands of groups the globals' q collapses (K = 10,000 with 13 draws: the sds
        of mu and tau went to 1e-16)."""
        b = max([int(idx.shape[1]) for idx in self.buckets] + [0])
        return max(64, 2 * (int(self.glob.numel()) + b) + 8)

    # ---- the start: the Laplace precision, as the arrow's Cholesky factor ------------------------------
    def _from_precision(self, P) -> dict:
        """The arrow factor L0 of a precision given by blocks (`P.loc[i]` (J, b, b), `P.cpl[i]`
        (J, G, b): rows the globals, `P.glob` (G, G)), by the arrow's block Cholesky."""
        out = {}
        schur = P.glob.clone()
        for i, idx in enumerate(self.buckets):
            Ll = torch.linalg.cholesky(P.loc[i])                         # (J, b, b)
            # L_cpl L_loc^T = P_cpl  ->  L_cpl = P_cpl L_loc^-T
            Lc = torch.linalg.solve_triangular(Ll, P.cpl[i].transpose(-1, -2), upper=False).transpose(-1, -2)
            schur = schur - torch.einsum("jgb,jhb->gh", Lc, Lc)
            out[f"loc{i}"] = Ll
            out[f"cpl{i}"] = Lc
        if schur.numel():
            out["glob"] = torch.linalg.cholesky(0.5 * (schur + schur.T))
        return out


def _log_diag_tril(L: torch.Tensor) -> torch.Tensor:
    """The raw parameter of a lower-triangular factor: log of the diagonal, the strict lower triangle as is."""
    return torch.tril(L, -1) + torch.diag_embed(torch.log(torch.diagonal(L, dim1=-2, dim2=-1)))


def _whiten(x: torch.Tensor) -> torch.Tensor:
    """Rows of x (M, k), mean 0 already, to sample covariance I exactly."""
    M = x.shape[0]
    chol = torch.linalg.cholesky(x.T @ x / M)
    return torch.linalg.solve_triangular(chol, x.T, upper=False).T


class ArrowPrecision:
    """A precision matrix with the arrow sparsity of a structure, by blocks (see `_from_precision`)."""

    def __init__(self, loc: List[torch.Tensor], cpl: List[torch.Tensor], glob: torch.Tensor):
        self.loc, self.cpl, self.glob = loc, cpl, glob

    def diagonal(self, dim: int, buckets, glob_idx) -> torch.Tensor:
        d = torch.zeros(dim, dtype=self.glob.dtype, device=self.glob.device)
        d[torch.as_tensor(glob_idx, dtype=torch.long, device=d.device)] = torch.diagonal(self.glob)
        for idx, Pl in zip(buckets, self.loc):
            d[torch.as_tensor(idx, dtype=torch.long, device=d.device).reshape(-1)] = \
                torch.diagonal(Pl, dim1=-2, dim2=-1).reshape(-1)
        return d

    def scaled(self, a: torch.Tensor, buckets, glob_idx) -> "ArrowPrecision":
        """The precision of u = theta / a (a diagonal map): every entry P_ij a_i a_j."""
        g = torch.as_tensor(glob_idx, dtype=torch.long, device=a.device)
        ag = a[g]
        loc, cpl = [], []
        for idx, Pl, Pc in zip(buckets, self.loc, self.cpl):
            al = a[torch.as_tensor(idx, dtype=torch.long, device=a.device)]          # (J, b)
            loc.append(Pl * al[:, :, None] * al[:, None, :])
            cpl.append(Pc * ag[None, :, None] * al[:, None, :])
        return ArrowPrecision(loc, cpl, self.glob * ag[:, None] * ag[None, :])

    def dense(self, dim: int, buckets, glob_idx) -> torch.Tensor:
        """For tests: the full matrix (dim x dim)."""
        P = torch.zeros(dim, dim, dtype=self.glob.dtype)
        g = torch.as_tensor(glob_idx)
        P[g[:, None], g[None, :]] = self.glob
        for idx, Pl, Pc in zip(buckets, self.loc, self.cpl):
            idx = torch.as_tensor(idx)
            for j in range(idx.shape[0]):
                P[idx[j][:, None], idx[j][None, :]] = Pl[j]
                P[g[:, None], idx[j][None, :]] = Pc[j]
                P[idx[j][:, None], g[None, :]] = Pc[j].T
        return P


def arrow_hessian(f_grad, x: torch.Tensor, buckets, glob_idx) -> Optional[ArrowPrecision]:
    """Minus the Hessian of a log density at x in the arrow's blocks, from b_max + G Hessian-vector
    products (a colouring: one probe per slot of every group at once, one per global).
    `f_grad(x, v)` -> H v for the log density's Hessian H."""
    dim = x.shape[0]
    dt, dev = x.dtype, x.device
    glob = torch.as_tensor(glob_idx, dtype=torch.long, device=dev)
    G = int(glob.numel())
    cols = []
    for k in range(G):
        v = torch.zeros(dim, dtype=dt, device=dev)
        v[glob[k]] = 1.0
        cols.append(-f_grad(x, v))                                 # column of -H for global k
    P_glob = torch.stack([c[glob] for c in cols], 1) if G else torch.zeros(0, 0, dtype=dt, device=dev)
    locs, cpls = [], []
    for idx in buckets:
        idx = torch.as_tensor(idx, dtype=torch.long, device=dev)
        J, b = idx.shape
        Pl = torch.zeros(J, b, b, dtype=dt, device=dev)
        for k in range(b):
            v = torch.zeros(dim, dtype=dt, device=dev)
            v[idx[:, k]] = 1.0
            hv = -f_grad(x, v)                                     # each group sees only its own slot k
            Pl[:, :, k] = hv[idx]
        Pl = 0.5 * (Pl + Pl.transpose(-1, -2))
        Pc = torch.stack([c[idx] for c in cols], 1) if G else torch.zeros(J, 0, b, dtype=dt, device=dev)
        locs.append(Pl)
        cpls.append(Pc)                                            # (J, G, b)
    return ArrowPrecision(locs, cpls, 0.5 * (P_glob + P_glob.T))
