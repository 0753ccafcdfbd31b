"""Variational families over the unconstrained vector theta (`dim` dimensions).

Every family lives in whitened coordinates u, with an affine preconditioner
theta = mu0 + A u taken from the start (the Laplace approximation, or the
cold start's N(0, 0.1^2 I); A is lower-triangular, or a vector for a diagonal
map), so one step size suits every model: in u the posterior has roughly unit
scale.  `rewhiten()` moves it to the current q (the fixed-draw optimiser does).  The preconditioner's
log|det A| is added to entropies and log densities.

Registry `FAMILIES` (name -> class): meanfield, fullrank, lowrank, graph
(graph_family.py), flow (flows.py), mixture (mixture.py).  Two
declared protocols:
- `Family` (every family): `parameters()`, `rsample(S)` (reparameterised),
  `log_q(theta)`, `rsample_with_log_q(S)`, `entropy()` (None: not analytic),
  and class facts the engine reads instead of names: `options` (config
  options it takes, e.g. `rank`), `preconditioner` ("full" or "diagonal":
  which Laplace whitening it starts from), `gaussian` (analytic entropy),
  `closed_form` (it implements `GaussianFamily`'s closed-form chain rule),
  `richer` (the family the verdict suggests when this one misses),
  `caveat` (what even a good fit of it cannot show), `base_family` (a family
  fitted first, this one built from it by `from_base`), `optimizer`,
  `gradient`, `mc_samples`, `mc_budget` and `lr` (its defaults for `auto`),
  `lr_follows_draws` (whether the default step size shrinks with fewer MC samples),
  `objectives` (those it can be fitted by); after the optimiser,
  `settle(program, generator)` may revise the fit and returns a note for the
  verdict and the ELBO of the q kept.
  The defaults are the safe ones: a new family that declares nothing is
  fitted by autograd through `rsample_with_log_q`.
- `GaussianFamily(Family)`: theta = mu0 + A u(eps) with u affine in standard
  normal eps: `u_of(eps)`, `u_grad(eps, g_u)`, `mean_scale_u()`,
  `entropy_value()`; the closed-form gradient and the fixed-draw optimiser
  need exactly these.
A new family is one class and one `register_family` (a test does it).  A
flow is a `Family` with `rsample_with_log_q` (flows.py).  An amortised encoder (still to
come) will be a family whose parameters map a data batch to q's parameters:
`rsample`/`log_q` will then take the `Batch` the gradient estimators already
receive.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from ..registry import Registry

_LOG2PI = math.log(2 * math.pi)


def _tril_exp(L: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor a full-rank family is parameterised by: L's strict lower triangle, exp of its diagonal."""
    return torch.tril(L, -1) + torch.diag_embed(torch.exp(torch.diagonal(L)))


class Preconditioner:
    def __init__(self, mu0: torch.Tensor, A: torch.Tensor):
        self.mu0, self.A = mu0, A
        self.diag = A.dim() == 1
        self.logdet = torch.log(A.abs()).sum() if self.diag else torch.log(torch.diagonal(A).abs()).sum()
        self.logdet_value = float(self.logdet)
        self.A_T = None if self.diag else A.T.contiguous()

    def to_theta(self, u: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.mu0, u, self.A) if self.diag else torch.addmm(self.mu0, u, self.A_T)

    def to_u(self, theta: torch.Tensor) -> torch.Tensor:
        d = theta - self.mu0
        if self.diag:
            return d / self.A
        return torch.linalg.solve_triangular(self.A, d.T, upper=False).T


class Family:
    """Parameters live in one flat leaf tensor `flat` (one Adam update, one finiteness check per step);
    `_params` gives named autograd views of it, `_raw` detached views (for the closed-form gradients)."""
    name = "family"
    options: tuple = ()
    preconditioner = "diagonal"
    gaussian = False
    closed_form = False
    fixed_draws = False                  # `optimizer=dadvi` can fit it (its gradient serves fixed draws)
    richer: Optional[str] = None         # the family to suggest when this one misses
    escalates_to: tuple = ()             # what `auto` fits next when this one misses (ppl/infer/escalate.py)
    caveat: Optional[str] = None         # what a good fit of this family still cannot show
    needs_structure = False              # built with the model's coupling structure (ppl.structure)
    frozen: Optional[torch.Tensor] = None  # bool mask over `flat`: entries every optimiser keeps fixed
    base_family: Optional[str] = None    # a family fitted first, this one started from its q (`from_base`)
    optimizer: Optional[str] = None      # the optimiser `auto` picks for it (None: the engine's choice)
    gradient: Optional[str] = None       # the gradient estimator `auto` tries first (registry GRADIENTS)
    objectives: Optional[tuple] = None   # the objectives it can be fitted by (None: any)
    mc_samples: Optional[int] = None     # MC samples per Adam step by default (None: the engine's)
    mc_budget: Optional[int] = None      # ... at most this many elements of the largest variable per step
    lr: Optional[float] = None           # Adam's step size by default, whitened units (None: the engine's)
    lr_follows_draws = True              # the default step size shrinks by sqrt(S / 16) with fewer MC samples

    def __init__(self, pre: Preconditioner, generator: torch.Generator, config=None):
        self.pre, self.gen, self.config = pre, generator, config
        self.dim = pre.mu0.shape[0]
        self.dtype = pre.mu0.dtype
        self.device = pre.mu0.device

    def _zeros(self, *shape) -> torch.Tensor:
        return torch.zeros(*shape, dtype=self.dtype, device=self.device)

    def _allocate(self, init: Dict[str, torch.Tensor]) -> None:
        self._layout, n = {}, 0
        for k, v in init.items():
            self._layout[k] = (n, n + v.numel(), tuple(v.shape))
            n += v.numel()
        self.flat = torch.cat([v.reshape(-1) for v in init.values()] + [self._zeros(0)]
                              ).detach().requires_grad_(True)
        raw = self.flat.detach()
        self._raw = {k: raw[a:b].view(shape) for k, (a, b, shape) in self._layout.items()}

    @property
    def _params(self) -> Dict[str, torch.Tensor]:
        return {k: self.flat[a:b].view(shape) for k, (a, b, shape) in self._layout.items()}

    def _eps(self, S: int, d: Optional[int] = None) -> torch.Tensor:
        return torch.randn((S, d or self.dim), generator=self.gen, dtype=self.dtype, device=self.device)

    def parameters(self) -> List[torch.Tensor]:
        return [self.flat]

    def hold(self) -> None:
        """Zero the gradient of the frozen entries (after every gradient, by the engine)."""
        if self.frozen is not None and self.flat.grad is not None:
            self.flat.grad.masked_fill_(self.frozen, 0.0)

    def rsample(self, S: int) -> torch.Tensor:
        return self.pre.to_theta(self.rsample_u(S))

    def log_q(self, theta: torch.Tensor) -> torch.Tensor:
        return self.log_q_u(self.pre.to_u(theta)) - self.pre.logdet

    def rsample_with_log_q(self, S: int):
        theta = self.rsample(S)
        return theta, self.log_q(theta)

    def entropy(self) -> Optional[torch.Tensor]:
        return None

    # ---- fixed draws (dadvi): families with `reparam(eps)` and an analytic entropy -----------------
    def fixed_eps(self, M: int, gen: torch.Generator) -> torch.Tensor:
        """M standard-normal draws for the fixed-draw objective, moment-matched: mean 0 and sample
        covariance I exactly (per coordinate when M <= dim)."""
        eps = torch.randn((M, self.dim), generator=gen, dtype=self.dtype, device=self.device)
        eps = eps - eps.mean(0)
        if M > self.dim:
            chol = torch.linalg.cholesky(eps.T @ eps / M)
            return torch.linalg.solve_triangular(chol, eps.T, upper=False).T
        return eps / eps.std(0, correction=0)

    def min_fixed_draws(self) -> int:
        return 32

    max_fixed_draws = 16384       # more draws than this buy nothing for this family
    prefers_fixed_draws = False   # fixed draws even on large data (auto otherwise takes Adam there)
    typical_fixed_draw_evals = 50  # L-BFGS evaluations it usually needs (for the time estimate)

    def rewhiten(self) -> None:
        """Move the preconditioner to the current q (families that can; others keep theirs)."""

    @classmethod
    def from_base(cls, base: "Family", program, generator: torch.Generator, config=None) -> "Family":
        """This family started from the fitted `base` (an instance of `base_family`) of the compiled
        model `program`."""
        raise NotImplementedError

    def settle(self, program, generator: torch.Generator) -> Optional[Tuple[str, float]]:
        """After the optimiser: a last look at the fit against the model (the flow keeps its start when
        training did not raise the ELBO).  -> (a note for the verdict, the ELBO of the q kept,
        estimated on fresh draws), or None."""
        return None


class GaussianFamily(Family):
    """A Gaussian q: analytic entropy; with `closed_form`, the closed-form pathwise gradient."""
    gaussian = True
    fixed_draws = True

    def entropy(self) -> Optional[torch.Tensor]:
        return self.entropy_u() + self.pre.logdet

    def draw(self, S: int):
        """-> (eps, theta): S reparameterised draws, without autograd."""
        eps = self._eps(S)
        return eps, self.theta_of(eps)

    def theta_of(self, eps: torch.Tensor):
        with torch.no_grad():
            return self.pre.to_theta(self.u_of(eps))

    def rewhiten(self) -> None:
        """Move the preconditioner to the current q (its mean and scale, in theta) and restart at the
        standard normal in the new coordinates: the same q, with unit scale again (closed-form
        families: their q is an affine map of a standard normal)."""
        with torch.no_grad():
            m, scale = self.mean_scale_u()
            mu0 = self.pre.to_theta(m.unsqueeze(0))[0]
            A = self.pre.A * scale if self.pre.diag else self.pre.A @ scale
            self.pre = Preconditioner(mu0, A)
            self.flat.zero_()

    def loss_grad(self, eps: torch.Tensor, g_theta: torch.Tensor) -> torch.Tensor:
        """Gradient in `flat` of -(mean_s log p(theta_s) + entropy), given g_theta = d/dtheta of
        mean_s log p(theta_s) at theta = draw(eps): the chain rule through theta = mu0 + A u(eps)."""
        with torch.no_grad():
            g_u = g_theta * self.pre.A if self.pre.diag else g_theta @ self.pre.A
            return self.u_grad(eps, g_u)


FAMILIES = Registry()
register_family = FAMILIES.register


@register_family
class MeanField(GaussianFamily):
    name = "meanfield"
    escalates_to = ("fullrank",)
    closed_form = True
    richer = "fullrank"
    caveat = "mean-field ignores correlations: where parameters correlate its sds are too small"

    def __init__(self, pre, generator, config=None):
        super().__init__(pre, generator, config)
        self._allocate({"m": self._zeros(self.dim), "log_s": self._zeros(self.dim)})

    def u_of(self, eps):
        m, s = self.mean_scale_u()
        return torch.addcmul(m, eps, s)

    def u_grad(self, eps, g_u):
        s = torch.exp(self._raw["log_s"])
        return -torch.cat([g_u.sum(0), torch.addcmul(torch.ones_like(s), (g_u * eps).sum(0), s)])

    def rsample_u(self, S):
        p = self._params
        return p["m"] + self._eps(S) * torch.exp(p["log_s"])

    def log_q_u(self, u):
        p = self._params
        z = (u - p["m"]) * torch.exp(-p["log_s"])
        return -0.5 * (z * z).sum(-1) - p["log_s"].sum() - 0.5 * self.dim * _LOG2PI

    def entropy_u(self):
        return self._params["log_s"].sum() + 0.5 * self.dim * (1 + _LOG2PI)

    def mean_scale_u(self):
        return self._raw["m"], torch.exp(self._raw["log_s"])

    def entropy_value(self):
        return float(self._raw["log_s"].sum()) + 0.5 * self.dim * (1 + _LOG2PI) + self.pre.logdet_value


@register_family
class FullRank(GaussianFamily):
    name = "fullrank"
    preconditioner = "full"
    richer = "flow"
    escalates_to = ("flow", "mixture")
    closed_form = True

    def __init__(self, pre, generator, config=None):
        super().__init__(pre, generator, config)
        self._allocate({"m": self._zeros(self.dim), "L": self._zeros(self.dim, self.dim)})

    def min_fixed_draws(self) -> int:
        return 2 * self.dim + 2      # with fewer, the covariance can grow where no draw looks

    def scale_tril(self):
        return _tril_exp(self._params["L"])

    def u_of(self, eps):
        m, C = self.mean_scale_u()
        return torch.addmm(m, eps, C.T)

    def u_grad(self, eps, g_u):
        # u = m + C eps, C = tril(L, -1) + diag(exp(diag L)); entropy = sum(diag L) + const
        g = torch.empty_like(self.flat)
        dim = self.dim
        torch.sum(g_u, 0, out=g[:dim])
        gC = g[dim:].view(dim, dim)
        torch.mm(g_u.T, eps, out=gC)
        gC.tril_()
        d = gC.diagonal()
        d.mul_(torch.exp(self._raw["L"].diagonal())).add_(1.0)
        return g.neg_()

    def rsample_u(self, S):
        return self._params["m"] + self._eps(S) @ self.scale_tril().T

    def log_q_u(self, u):
        L = self.scale_tril()
        z = torch.linalg.solve_triangular(L, (u - self._params["m"]).T, upper=False).T
        return -0.5 * (z * z).sum(-1) - torch.diagonal(self._params["L"]).sum() - 0.5 * self.dim * _LOG2PI

    def entropy_u(self):
        return torch.diagonal(self._params["L"]).sum() + 0.5 * self.dim * (1 + _LOG2PI)

    def mean_scale_u(self):
        return self._raw["m"], _tril_exp(self._raw["L"])

    def entropy_value(self):
        return float(self._raw["L"].diagonal().sum()) + 0.5 * self.dim * (1 + _LOG2PI) + self.pre.logdet_value


@register_family
class LowRank(GaussianFamily):
    """Diagonal plus rank r: cov = W W^T + diag(d^2)."""
    name = "lowrank"
    options = ("rank",)
    richer = "fullrank"
    escalates_to = ("fullrank",)
    fixed_draws = False                  # (its gradient is Adam's only)

    def __init__(self, pre, generator, config=None):
        super().__init__(pre, generator, config)
        rank = getattr(config, "rank", None)
        r = rank or max(1, min(10, self.dim // 4))
        self.r = min(r, self.dim)
        W0 = 1e-2 * torch.randn((self.dim, self.r), generator=generator, dtype=self.dtype, device=self.device)
        self._allocate({"m": self._zeros(self.dim), "log_d": self._zeros(self.dim), "W": W0})

    def rsample_u(self, S):
        p = self._params
        return p["m"] + self._eps(S, self.r) @ p["W"].T + self._eps(S) * torch.exp(p["log_d"])

    def _capacitance(self):
        p = self._params
        Wd = p["W"] * torch.exp(-2 * p["log_d"])[:, None]
        return torch.eye(self.r, dtype=self.dtype, device=self.device) + p["W"].T @ Wd

    def log_q_u(self, u):
        p = self._params
        x = u - p["m"]
        dinv2 = torch.exp(-2 * p["log_d"])
        C = self._capacitance()
        Lc = torch.linalg.cholesky(C)
        a = (x * dinv2) @ p["W"]                                  # (S, r)
        b = torch.cholesky_solve(a.T, Lc).T
        maha = (x * x * dinv2).sum(-1) - (a * b).sum(-1)
        logdet = 2 * p["log_d"].sum() + 2 * torch.log(torch.diagonal(Lc)).sum()
        return -0.5 * (maha + logdet + self.dim * _LOG2PI)

    def entropy_u(self):
        p = self._params
        Lc = torch.linalg.cholesky(self._capacitance())
        logdet = 2 * p["log_d"].sum() + 2 * torch.log(torch.diagonal(Lc)).sum()
        return 0.5 * logdet + 0.5 * self.dim * (1 + _LOG2PI)


from . import flows  # noqa: E402,F401  (registers the `flow` family and the `anneal` optimiser)
from . import graph_family  # noqa: E402,F401  (registers the `graph` family)
from . import mixture  # noqa: E402,F401  (registers the `mixture` family and the `stratified` gradient)
