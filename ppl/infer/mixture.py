"""The `mixture` family: K Gaussian components with learned weights (Guo et al. 2016, Miller et
al. 2017), for posteriors with several modes; and its gradient estimator, the stratified ELBO.

Stage: (preconditioner: the fitted full-rank q, the compiled model) -> a family over theta.

q(u) = sum_k w_k N(u; m_k, C_k C_k^T) in the coordinates u whitened by the full-rank fit
(theta = mu0 + A u); C_k lower-triangular (a diagonal above BASE_MAX dimensions), w = softmax of
K logits.  log q is exact: a logsumexp over the components.

Fitted by the stratified ELBO (Morningstar et al. 2021): the same standard normal draws eps_s
pushed through every component, theta_ks = mu0 + A (m_k + C_k eps_s), and

    ELBO = sum_k w_k mean_s [log p(theta_ks) - log q(theta_ks)],

which is the ELBO exactly (each component's expectation taken under its own draws), with
pathwise gradients for the weights too; `objective=iwae` takes the stratified importance-weighted
bound (SIWAE), mean_s log sum_k w_k p(theta_ks) / q(theta_ks).  Each is an average over s, so
fixed draws and L-BFGS (dadvi) serve it as they serve the full-rank family.

One Gaussian started at one mode stays there: the components start at distinct modes of the
posterior, found by L-BFGS from several starts (the full-rank fit's mean, its mirror image through
the origin, and draws spread over the unconstrained space), each with its Laplace covariance and
a weight from its Laplace evidence.  Where fewer modes than components turn up (one mode, or a
funnel with none), the rest start as shifted copies of the full-rank fit.  After the fit the
mixture is kept only where it raised the ELBO over the full-rank fit (on common draws); otherwise
its answer is that fit, and the verdict says so.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from ..errors import UsageError
from .estimators import GradientEstimator, Surrogate, register_gradient
from .families import Family, Preconditioner, register_family
from .optim import lbfgs

_LOG2PI = math.log(2 * math.pi)
DEFAULT_COMPONENTS = 4
STARTS_PER_COMPONENT = 3    # mode searches: this many per component (at least 4)
START_SPREAD = 2.0          # sd of the spread starts, in unconstrained units
MODE_EVALS = 200            # evaluations per mode search
DISTINCT = 1.0              # modes closer than this (in the better one's Laplace metric) are one
SHIFT = 0.5                 # copies of the full-rank fit start this far apart (in its sds)
SETTLE_DRAWS = 4000
SETTLE_BUDGET = 50_000_000
HESSIAN_MAX = 400
FIXED_BUDGET = 1_000_000    # elements of the largest variable per evaluation of the fixed-draw objective           # Laplace covariances at the modes up to this many dimensions


@register_family
class Mixture(Family):
    name = "mixture"
    options = ("components",)
    preconditioner = "full"
    base_family = "fullrank"
    gradient = "stratified"
    fixed_draws = True
    objectives = ("elbo", "iwae")   # the stratified ELBO and SIWAE
    caveat = None
    BASE_MAX = 200                  # full-rank components up to this many dimensions, diagonal above

    def __init__(self, pre: Preconditioner, generator: torch.Generator, config=None,
                 init: Optional[List[Tuple[torch.Tensor, Optional[torch.Tensor], float]]] = None):
        """`init`: (mean in u, Cholesky factor in u or None, log weight) per component."""
        super().__init__(pre, generator, config)
        K = getattr(config, "components", None) or DEFAULT_COMPONENTS
        self.K, D = K, self.dim
        self.diagonal = D > self.BASE_MAX
        init = list(init or [])[:K]
        while len(init) < K:                      # shifted copies of the full-rank fit
            shift = SHIFT * torch.randn(D, generator=generator, dtype=self.dtype, device=self.device) \
                if len(init) else self._zeros(D)
            init.append((shift, None, 0.0))
        m = torch.stack([c[0] for c in init])
        logits = torch.tensor([c[2] for c in init], dtype=self.dtype, device=self.device)
        if self.diagonal:
            log_s = torch.stack([self._zeros(D) if c[1] is None else torch.log(torch.diagonal(c[1]))
                                 for c in init])
            self._allocate({"logits": logits, "m": m, "log_s": log_s})
        else:
            L = torch.stack([self._zeros(D, D) if c[1] is None else _log_diag(c[1]) for c in init])
            self._allocate({"logits": logits, "m": m, "L": L})
        self.max_fixed_draws = max(2 * D + 2, 8192 // K)      # K log densities per draw (see from_base)
        self.fixed_draw_chunk = max(1, 250_000 // K)

    def min_fixed_draws(self) -> int:
        return 2 * self.dim + 2

    # ---- components -----------------------------------------------------------------------------
    def _log_diag_sum(self, p) -> torch.Tensor:
        """(K,): log det C_k."""
        return p["log_s"].sum(-1) if self.diagonal else torch.diagonal(p["L"], dim1=-2, dim2=-1).sum(-1)

    def _u_of(self, p, eps: torch.Tensor) -> torch.Tensor:
        """eps (S, D) -> (K, S, D): every component's draw for every eps."""
        if self.diagonal:
            return p["m"][:, None, :] + eps[None] * torch.exp(p["log_s"])[:, None, :]
        return p["m"][:, None, :] + eps @ _tril_exp(p["L"]).transpose(-1, -2)

    def _log_components(self, p, u: torch.Tensor) -> torch.Tensor:
        """u (N, D) -> (K, N): log w_k + log N(u; m_k, C_k C_k^T)."""
        x = u[None] - p["m"][:, None, :]                                          # (K, N, D)
        if self.diagonal:
            z = x * torch.exp(-p["log_s"])[:, None, :]
        else:
            z = torch.linalg.solve_triangular(_tril_exp(p["L"]), x.transpose(-1, -2), upper=False
                                              ).transpose(-1, -2)
        log_n = -0.5 * (z * z).sum(-1) - self._log_diag_sum(p)[:, None] - 0.5 * self.dim * _LOG2PI
        return torch.log_softmax(p["logits"], 0)[:, None] + log_n

    def log_q_u(self, u: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self._log_components(self._params, u), 0)

    def weights(self) -> torch.Tensor:
        return torch.softmax(self._raw["logits"], 0)

    def rsample_u(self, S: int) -> torch.Tensor:
        """Ancestral draws (the component, then its Gaussian): not differentiable in the weights,
        which the stratified estimator never needs."""
        p = self._params
        k = torch.multinomial(torch.softmax(p["logits"].detach(), 0), S, replacement=True, generator=self.gen)
        u = self._u_of(p, self._eps(S))                                           # (K, S, D)
        return u[k, torch.arange(S, device=self.device)]

    # ---- the stratified objective ---------------------------------------------------------------------
    def stratified_rows(self, program, eps: torch.Tensor, iwae: bool = False, batch=None) -> torch.Tensor:
        """(S,): for each eps_s, sum_k w_k [log p - log q](theta_ks) (the ELBO's terms), or
        log sum_k w_k p/q(theta_ks) (SIWAE's)."""
        p = self._params
        S = eps.shape[0]
        u = self._u_of(p, eps).reshape(self.K * S, self.dim)
        log_q = torch.logsumexp(self._log_components(p, u), 0) - self.pre.logdet
        log_p = program.evaluate(self.pre.to_theta(u), batch=batch).total
        f = (log_p - log_q).reshape(self.K, S)
        log_w = torch.log_softmax(p["logits"], 0)[:, None]
        if iwae:
            return torch.logsumexp(log_w + f, 0)
        return (torch.exp(log_w) * f).sum(0)

    # ---- started at the posterior's modes ------------------------------------------------------------
    @classmethod
    def parameter_count(cls, dim: int, config=None) -> int:
        K = getattr(config, "components", None) or DEFAULT_COMPONENTS
        per = dim + (dim if dim > cls.BASE_MAX else dim * dim)
        return K * (per + 1) + dim + dim * dim

    @classmethod
    def base_for(cls, dim: int) -> str:
        return "fullrank" if dim <= cls.BASE_MAX else "meanfield"

    @classmethod
    def from_base(cls, base: Family, program, generator: torch.Generator, config=None) -> "Mixture":
        if program.score:
            raise UsageError(f"{config.opt('method', 'mixture')} needs every discrete latent summed out "
                             f"(it has no score-function path)")
        base.rewhiten()
        pre = Preconditioner(base.pre.mu0, base.pre.A)
        K = getattr(config, "components", None) or DEFAULT_COMPONENTS
        modes = find_modes(program, pre, max(4, STARTS_PER_COMPONENT * K), generator) if K > 1 else []
        mix = cls(pre, generator, config, modes)
        # the fixed draws: K log densities each, within the full-rank family's budget per evaluation
        mix.max_fixed_draws = max(mix.min_fixed_draws(), min(8192 // mix.K,
                                                             FIXED_BUDGET // (mix.K * program.largest_node())))
        mix.base_name, mix.modes_found = base.name, len(modes)
        return mix

    def settle(self, program, generator: torch.Generator) -> Optional[Tuple[str, float]]:
        """Keep the mixture only where it raised the ELBO over the full-rank fit it started from
        (in these coordinates: N(0, I)), judged on common draws; else its answer is that fit."""
        if not hasattr(self, "base_name"):
            return None
        n = min(SETTLE_DRAWS, max(100, SETTLE_BUDGET // (self.K * program.largest_node())))
        eps = torch.randn((n, self.dim), generator=generator, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            mix = self.stratified_rows(program, eps)
            theta = self.pre.to_theta(eps)
            base = program.log_prob(theta) - (-0.5 * (eps * eps).sum(-1) - 0.5 * self.dim * _LOG2PI
                                               - self.pre.logdet)
            gain = mix - base
            d = float(gain.mean())
            se = float(gain.std()) / math.sqrt(n)
            found = f"{self.modes_found} mode{'s' if self.modes_found != 1 else ''} found"
            if math.isfinite(d) and d > 2 * se:
                w = self.weights()
                return (f"the mixture of {self.K} ({found}; weights {', '.join(f'{float(x):.2f}' for x in w)}) "
                        f"raised the ELBO by {d:.3g} ± {se:.2g} nats over its start, the {self.base_name} fit"), \
                    float(mix.mean())
            raw = self.flat.detach()
            raw.zero_()                                           # component 1 = the full-rank fit
            self._raw["logits"][1:] = -1e4                        # the others weightless
        return (f"the mixture of {self.K} ({found}) did not raise the ELBO over its start ({d:+.2g} ± "
                f"{se:.2g} nats): this is the {self.base_name} fit"), float(base.mean())


def _tril_exp(raw: torch.Tensor) -> torch.Tensor:
    """(K, D, D): lower triangles with exp on the diagonal."""
    return torch.tril(raw, -1) + torch.diag_embed(torch.exp(torch.diagonal(raw, dim1=-2, dim2=-1)))


def _log_diag(C: torch.Tensor) -> torch.Tensor:
    """A Cholesky factor -> the raw parameter of `_tril_exp` (log of its diagonal)."""
    return torch.tril(C, -1) + torch.diag_embed(torch.log(torch.diagonal(C)))


def find_modes(program, pre: Preconditioner, n_starts: int, generator: torch.Generator, evals: int = MODE_EVALS):
    """Local modes of log p by L-BFGS from `n_starts` starts, in the whitened coordinates u:
    -> [(mode, Cholesky factor of the Laplace covariance or None, log evidence)], the best first,
    one per mode (those within DISTINCT of a better one's Laplace metric dropped).  A search that
    does not settle (a funnel's unbounded density) or ends where the Hessian is not positive
    definite gives no mode."""
    D, dtype, dev = program.dim, pre.mu0.dtype, pre.mu0.device

    def f(u):
        return -program.log_prob(pre.to_theta(u.unsqueeze(0)))[0]
    starts = [torch.zeros(D, dtype=dtype, device=dev), pre.to_u(-pre.mu0.unsqueeze(0))[0]]
    while len(starts) < n_starts:
        theta = START_SPREAD * torch.randn(D, generator=generator, dtype=dtype, device=dev)
        starts.append(pre.to_u(theta.unsqueeze(0))[0])
    found = []
    for x0 in starts:
        try:
            x, _ = lbfgs(f, x0, max_iter=evals, max_evals=evals)
            if not torch.isfinite(x).all():
                continue
            value = f(x)
            if not torch.isfinite(value):
                continue
            xg = x.clone().requires_grad_(True)
            g = torch.autograd.grad(f(xg), xg)[0]
            if D > HESSIAN_MAX:
                found.append((x.detach(), None, -float(value), g))
                continue
            H = torch.autograd.functional.hessian(f, x)
            H = 0.5 * (H + H.T)
            lam = torch.linalg.eigvalsh(H)
            if not torch.isfinite(lam).all() or float(lam.min()) <= 1e-8:
                continue
            LH = torch.linalg.cholesky(H)
            step = torch.cholesky_solve(g.unsqueeze(-1), LH).squeeze(-1)
            if float(g @ step) > 1.0:                     # the Newton decrement: not settled
                continue
            cov_chol = torch.linalg.cholesky(torch.cholesky_inverse(LH))
            evidence = -float(value) - float(torch.log(torch.diagonal(LH)).sum())
            found.append((x.detach(), cov_chol.detach(), evidence, None))
        except (RuntimeError, ValueError, torch.linalg.LinAlgError):
            continue
    found.sort(key=lambda c: -c[2])
    modes = []
    for x, C, ev, _ in found:
        if all(_distance(x, y, Cy) > DISTINCT for y, Cy, _ in modes):
            modes.append((x, C, ev))
    if not modes:
        return []
    best = modes[0][2]
    return [(x, C, max(ev - best, -30.0)) for x, C, ev in modes]


def _distance(x, y, Cy) -> float:
    d = x - y
    if Cy is None:
        return float(d.norm())
    return float(torch.linalg.solve_triangular(Cy, d.unsqueeze(-1), upper=False).norm())


@register_gradient
class Stratified(GradientEstimator):
    """The mixture's stratified ELBO (or SIWAE under `objective=iwae`): pathwise, autograd through the
    components and the weights; per draw an average, so fixed draws serve it."""
    name = "stratified"

    @classmethod
    def applies(cls, vi) -> bool:
        return hasattr(vi.family, "stratified_rows") and vi.objective.name in ("elbo", "iwae") \
            and not vi.discrete

    @classmethod
    def can_fix_draws(cls, vi) -> bool:
        return cls.applies(vi)

    def _value(self, eps, batch):
        vi = self.vi
        return vi.family.stratified_rows(vi.program, eps, vi.objective.name == "iwae", batch).mean()

    def surrogate_loss(self, S: int, batch=None) -> Surrogate:
        v = self._value(self.vi.family._eps(S), batch)
        return Surrogate(-v, float(v.detach()))

    def gradient_at(self, eps: torch.Tensor, batch=None) -> float:
        fam = self.vi.family
        fam.flat.grad = None
        v = self._value(eps, batch)
        value = float(v.detach())
        if not math.isfinite(value):
            return math.nan
        (-v).backward()
        return value
