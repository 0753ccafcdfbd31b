"""The `flow` family: an inverse autoregressive flow (Kingma et al. 2016) on top of a Gaussian.

Stage: (preconditioner: the fitted full-rank q) -> a family over theta.

In the coordinates u whitened by the full-rank fit (theta = mu0 + A u),
q is x0 = m + C eps (C lower-triangular), followed by K gated autoregressive
layers, the variable order reversed between layers:

    [mu_t, s_t] = MADE(x_{<t}),   sigma = sigmoid(s),   x' = sigma * x + (1 - sigma) * mu,
    log|det dx'/dx| = sum_t log sigma_t.

MADE (Germain et al. 2015): two masked hidden layers (ELU), so output t sees
only inputs before t.  The output weights start at zero and the gate's bias
at GATE_BIAS (sigma = 0.82), so each layer starts as x' = sigma0 x; the base
starts at scale sigma0^-K, and the flow at init is exactly the standard
normal in u: the full-rank fit it starts from.  Sampling (and its log q) is
one pass per layer; the density of an arbitrary point is sequential (D
passes per layer).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from .engine import Optimizer, OptimResult, register_optimizer
from .families import Family, Preconditioner, register_family, _tril_exp

_LOG2PI = math.log(2 * math.pi)
_elu = torch.nn.functional.elu
WARMUP = 50                 # steps of a linear warm-up of the step size (Adam's first steps are lr-sized
                            # in every weight at once: the gates of a wide MADE collapsed without it)
SETTLE_DRAWS = 4000         # common draws on which the trained flow is compared with its start
SETTLE_BUDGET = 50_000_000  # elements: fewer draws when one pass over the data is large
CHECKS = (0.25, 0.5)        # shares of the steps at which the flow's gain is measured:
EARLY_GAIN = 0.01           # at the first, it must have gained this many nats over its start (and 2
                            # standard errors), else it stops and is set back to its start; at the
                            # second, as much since the first, else its schedule ends early
FINISH = 0.1                # (over this share of the steps, the step size decaying to zero)
EARLY_DRAWS = 1000
MODE_STARTS = 4             # L-BFGS starts of the mode census (mixture.find_modes): the full-rank
MODE_EVALS = 80             # mean, its mirror image and two spread points, 80 evaluations each (models
                            # with a mode settle in 8-74; a funnel never does, and costs 4 x 80)
MODE_GAP = 5.0              # modes within this many nats of the best's Laplace evidence count


def made_masks(order: torch.Tensor, H: int):
    """Connectivity of a MADE with two hidden layers of H units, for the variable order `order`
    (order[i] = the position of coordinate i): output i depends only on inputs that come before it.
    -> (input->hidden, hidden->hidden, hidden->outputs [mu | s]) as (D, H), (H, H), (H, 2D) 0/1
    tensors for weights of shape (in, out)."""
    D = order.shape[0]
    deg_h = torch.arange(H) % max(1, D - 1)                     # hidden degrees 0..D-2
    m1 = order[:, None] <= deg_h[None, :]
    m2 = deg_h[:, None] <= deg_h[None, :]
    m3 = deg_h[:, None] < order[None, :]
    if D == 1:
        m1, m2, m3 = torch.zeros_like(m1), torch.zeros_like(m2), torch.zeros_like(m3)
    return m1, m2, torch.cat([m3, m3], 1)


@register_family
class IAF(Family):
    name = "flow"
    preconditioner = "full"
    base_family = "fullrank"        # fitted first; this family starts at its q (ppl/infer/fit.py)
    optimizer = "anneal"
    mc_samples = 256                # many draws per step cost little more than 16 on small models,
    mc_budget = 50_000              # but on data the cost grows with draws x rows
    lr = 0.03
    anneal_steps = 800              # Adam steps by default (`steps`)
    LAYERS = 4
    GATE_BIAS = 1.5
    HIDDEN_MIN = 20                 # hidden units per MADE layer: 2 D, within [HIDDEN_MIN, HIDDEN_MAX]
    HIDDEN_MAX = 256
    BASE_MAX = 200                  # a full-rank base up to this many dimensions, mean-field above

    def __init__(self, pre: Preconditioner, generator: torch.Generator, config=None):
        super().__init__(pre, generator, config)
        D = self.dim
        self.H = H = self.hidden(D)
        c0 = 1.0 / (1.0 + math.exp(-self.GATE_BIAS))
        init: Dict[str, torch.Tensor] = {"m": self._zeros(D),
                                         "L": torch.diag(self._zeros(D) - self.LAYERS * math.log(c0))}
        mask: Dict[str, torch.Tensor] = {"m": self._ones(D), "L": torch.tril(self._ones(D, D))}
        for k in range(self.LAYERS):
            order = torch.arange(D) if k % 2 == 0 else torch.arange(D - 1, -1, -1)
            m1, m2, m3 = (m.to(self.dtype).to(self.device) for m in made_masks(order, H))
            init[f"W1_{k}"] = m1 * self._randn(D, H) / math.sqrt(max(1, D))
            init[f"b1_{k}"] = self._zeros(H)
            init[f"W2_{k}"] = m2 * self._randn(H, H) / math.sqrt(H)
            init[f"b2_{k}"] = self._zeros(H)
            init[f"W3_{k}"] = self._zeros(H, 2 * D)          # each layer starts as x' = sigmoid(bias) x
            init[f"b3_{k}"] = torch.cat([self._zeros(D), self._zeros(D) + self.GATE_BIAS])
            mask.update({f"W1_{k}": m1, f"b1_{k}": self._ones(H), f"W2_{k}": m2, f"b2_{k}": self._ones(H),
                         f"W3_{k}": m3, f"b3_{k}": self._ones(2 * D)})
        self._allocate(init)
        # the masked weights start at zero and never move: their gradient is masked out
        self.mask = torch.cat([mask[k].reshape(-1) for k in init])
        self.flat.register_hook(lambda g: g * self.mask)

    @property
    def _params(self) -> Dict[str, torch.Tensor]:
        # one split (one backward node) instead of a slice per tensor: half the flow's per-step time
        sizes = [b - a for a, b, _ in self._layout.values()]
        return {k: v.view(shape) for (k, (_, _, shape)), v in
                zip(self._layout.items(), torch.split(self.flat, sizes))}

    @classmethod
    def hidden(cls, dim: int) -> int:
        return max(cls.HIDDEN_MIN, min(2 * dim, cls.HIDDEN_MAX))

    @classmethod
    def parameter_count(cls, dim: int, config=None) -> int:
        """Numbers it keeps (for the memory budget): its base and K layers, and the fitted base's."""
        H = cls.hidden(dim)
        dense = dim + dim * dim if cls.base_for(dim) == "fullrank" else 2 * dim
        return 2 * dense + cls.LAYERS * (dim * H + H + H * H + H + H * 2 * dim + 2 * dim)

    @classmethod
    def base_for(cls, dim: int) -> str:
        return "fullrank" if dim <= cls.BASE_MAX else "meanfield"

    @classmethod
    def from_base(cls, base: Family, program, generator: torch.Generator, config=None) -> "IAF":
        """The flow in the coordinates of the fitted Gaussian `base`: at its start the flow is that q."""
        base.rewhiten()
        pre = Preconditioner(base.pre.mu0, base.pre.A)
        # a census of the posterior's modes: a flow started at one mode stays there, and PSIS cannot
        # see a mode that q never visits, so the verdict must say so
        from .mixture import find_modes
        modes = [] if program is None or program.score else \
            find_modes(program, pre, MODE_STARTS, generator, MODE_EVALS)
        flow = cls(pre, generator, config)
        flow.base_name = base.name
        flow.start = flow.flat.detach().clone()
        flow.modes = sum(1 for m in modes if m[2] >= -MODE_GAP)
        return flow

    def terms(self, program, eps: torch.Tensor, at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p - log q at the draws of standard normal `eps` (with the parameters `at`, else the current)."""
        now = self.flat.detach().clone()
        with torch.no_grad():
            if at is not None:
                self.flat.copy_(at)
            out = self._elbo_terms(program, eps)
            self.flat.copy_(now)
        return out

    def gain(self, program, n: int, generator: torch.Generator):
        """The ELBO now against at the start, on n common draws -> (gain, its standard error, ELBO now,
        ELBO at the start)."""
        eps = torch.randn((n, self.dim), generator=generator, dtype=self.dtype, device=self.device)
        new, old = self.terms(program, eps), self.terms(program, eps, self.start)
        return _mean_se(new - old) + (float(new.mean()), float(old.mean()))

    def _comparable(self, program) -> bool:
        return getattr(self, "start", None) is not None and not program.score   # (score-path latents:
        # log p needs their draws too)

    def keep_training(self, program, generator: torch.Generator) -> str:
        """Part-way through (Anneal's CHECKS): "go" on while the flow keeps raising the ELBO; "stop" when it
        has not raised it over its start by EARLY_GAIN nats and 2 standard errors (it is set back to its
        start: a near-Gaussian posterior, where the full-rank fit is as good); "finish" soon when it
        gained less than that since the last check."""
        if not self._comparable(program):
            return "go"
        last = getattr(self, "_checked", None)           # (draws, terms at the last check): common draws
        if last is None:
            n = min(EARLY_DRAWS, max(100, SETTLE_BUDGET // program.largest_node()))
            eps = torch.randn((n, self.dim), generator=generator, dtype=self.dtype, device=self.device)
            before = self.terms(program, eps, self.start)
        else:
            eps, before = last
        now = self.terms(program, eps)
        self._checked = (eps, now)
        d, se = _mean_se(now - before)
        if math.isfinite(d) and d > max(EARLY_GAIN, 2 * se):
            return "go"
        if last is not None:
            return "finish"
        with torch.no_grad():
            self.flat.copy_(self.start)
        self.stopped = (d, se)
        return "stop"

    def settle(self, program, generator: torch.Generator) -> Optional[Tuple[str, float]]:
        """Keep the trained flow only where it raised the ELBO over its start (the base's q), judged on
        common draws: otherwise the flow's answer is its start, and the note says so."""
        if not self._comparable(program):
            return None
        n = min(SETTLE_DRAWS, max(100, SETTLE_BUDGET // program.largest_node()))
        d, se, new, old = self.gain(program, n, generator)
        modes = getattr(self, "modes", 0)
        several = (f"; the posterior has {modes} separate modes of comparable mass (L-BFGS from {MODE_STARTS} "
                   f"starts) and the flow covers the one it started at, which k-hat cannot see: try "
                   f"{self.config.opt('method', 'mixture') if self.config is not None else 'method mixture'}"
                   ) if modes > 1 else ""
        if getattr(self, "stopped", None) is not None:
            d0, se0 = self.stopped
            return (f"the flow did not raise the ELBO over its start by {EARLY_GAIN} nats part-way "
                    f"({d0:+.2g} ± {se0:.2g}); it stopped there: this is the {self.base_name} fit{several}"), old
        if math.isfinite(d) and d > 2 * se:
            return (f"the flow raised the ELBO by {d:.3g} ± {se:.2g} nats over its start, the "
                    f"{self.base_name} fit{several}"), new
        with torch.no_grad():
            self.flat.copy_(self.start)
        return (f"the flow did not raise the ELBO over its start ({d:+.2g} ± {se:.2g} nats): "
                f"this is the {self.base_name} fit{several}"), old

    def _elbo_terms(self, program, eps: torch.Tensor) -> torch.Tensor:
        u, log_q = self.forward(eps)
        return program.log_prob(self.pre.to_theta(u)) - log_q + self.pre.logdet

    def _ones(self, *shape):
        return torch.ones(*shape, dtype=self.dtype, device=self.device)

    def _randn(self, *shape):
        return torch.randn(shape, generator=self.gen, dtype=self.dtype, device=self.device)

    # ---- the layers -----------------------------------------------------------------------------
    def _made(self, p, k: int, x: torch.Tensor):
        """-> (mu, s) of layer k at x: output i sees only the inputs before i in the layer's order."""
        h = _elu(torch.addmm(p[f"b1_{k}"], x, p[f"W1_{k}"]))
        h = _elu(torch.addmm(p[f"b2_{k}"], h, p[f"W2_{k}"]))
        out = torch.addmm(p[f"b3_{k}"], h, p[f"W3_{k}"])
        return out[:, :self.dim], out[:, self.dim:]

    def forward(self, eps: torch.Tensor):
        """eps (S, D) standard normal -> (u, log q(u)): one pass per layer."""
        p = self._params
        x = torch.addmm(p["m"], eps, _tril_exp(p["L"]).T)
        s_all = []
        for k in range(self.LAYERS):
            mu, s = self._made(p, k, x)
            x = torch.addcmul(mu, torch.sigmoid(s), x - mu)          # sigma x + (1 - sigma) mu
            s_all.append(s)
        log_q = -0.5 * (eps * eps).sum(-1) - (0.5 * self.dim * _LOG2PI) - torch.diagonal(p["L"]).sum()
        if s_all:
            log_q = log_q - torch.nn.functional.logsigmoid(torch.cat(s_all, -1)).sum(-1)
        return x, log_q

    # ---- the protocol -----------------------------------------------------------------------------
    def rsample_u(self, S: int) -> torch.Tensor:
        return self.forward(self._eps(S))[0]

    def rsample_with_log_q(self, S: int):
        u, log_q = self.forward(self._eps(S))
        return self.pre.to_theta(u), log_q - self.pre.logdet

    def log_q_u(self, u: torch.Tensor) -> torch.Tensor:
        """Inverts each layer coordinate by coordinate in its order (D passes of its MADE)."""
        p = self._params
        x = u.reshape(-1, self.dim)
        log_det = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for k in reversed(range(self.LAYERS)):
            order = range(self.dim) if k % 2 == 0 else range(self.dim - 1, -1, -1)
            z = torch.zeros_like(x)
            for i in order:                           # mu_i, s_i depend on the coordinates before i only
                mu, s = self._made(p, k, z)
                sigma = torch.sigmoid(s[:, i])
                zi = (x[:, i] - (1 - sigma) * mu[:, i]) / sigma
                z = torch.cat([z[:, :i], zi.unsqueeze(-1), z[:, i + 1:]], -1)
            mu, s = self._made(p, k, z)
            log_det = log_det + torch.nn.functional.logsigmoid(s).sum(-1)
            x = z
        C = _tril_exp(p["L"])
        eps = torch.linalg.solve_triangular(C, (x - p["m"]).T, upper=False).T
        log_q = (-0.5 * (eps * eps).sum(-1) - 0.5 * self.dim * _LOG2PI - torch.diagonal(p["L"]).sum()
                 - log_det)
        return log_q.reshape(u.shape[:-1])


@register_optimizer
class Anneal(Optimizer):
    """Adam for a fixed number of steps (`steps`, default the family's `anneal_steps`) with the step
    size decaying linearly to zero, the result the average of the last half's iterates (of the last
    stretch after a check).  A family with `keep_training` is asked at CHECKS whether to go on,
    stop, or finish early (the step size then decays to zero over FINISH of the steps).  For a
    family that starts near its optimum (the flow, at the full-rank fit): measured on centred eight
    schools, 400 steps of 256 draws reach the ELBO of 3,000 steps of 16 under the engine's
    1/sqrt(t) decay in a seventh of the time.  Converged: Stan's relative tolerance (`tol`) between
    the mean ELBO of the last tenth of the steps and of the tenth before."""
    name = "anneal"

    @staticmethod
    def run(vi, S: int, lr: float, max_steps: int, tol: float, min_steps: int, progress=None, gen=None, **_):
        steps = vi.config.steps or getattr(vi.family, "anneal_steps", 400)
        plan = {"end": steps, "from": None}            # "from": (step, factor) of an early finish

        def schedule(t):
            if plan["from"] is None:
                return min(1.0, (t + 1) / WARMUP) * max(0.0, 1.0 - t / steps)
            t0, f0 = plan["from"]
            return f0 * max(0.0, 1.0 - (t - t0) / (plan["end"] - t0))
        state = vi.init(lr, S, schedule=schedule)
        check = getattr(vi.family, "keep_training", None)
        marks = [int(c * steps) for c in CHECKS] if check is not None and steps >= 4 * WARMUP else []
        trace = []
        for mark in marks:
            trace += vi.run(state, mark, 0.0, mark, progress).trace
            say = check(vi.program, gen if gen is not None else vi.family.gen)
            if say == "stop":
                return OptimResult(trace, True, state.t)
            if say == "finish":
                plan["from"] = (state.t, schedule(state.t))
                plan["end"] = state.t + max(1, int(FINISH * steps))
                break
        trace += vi.run(state, plan["end"], 0.0, plan["end"], progress).trace
        return OptimResult(trace, _settled(trace, tol), state.t)


def _mean_se(x: torch.Tensor):
    n = x.shape[0]
    return float(x.mean()), (float(x.std()) / math.sqrt(n) if n > 1 else math.inf)


def _settled(trace, tol: float) -> bool:
    """Stan's test on the last two tenths of the run: the relative change of the mean ELBO (absolute
    when |ELBO| < 1) below `tol`."""
    n = len(trace) // 10
    if n < 5 or tol <= 0:
        return False
    last, before = sum(trace[-n:]) / n, sum(trace[-2 * n:-n]) / n
    return abs(last - before) / max(abs(last), 1.0) < tol
