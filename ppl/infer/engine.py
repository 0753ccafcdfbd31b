"""The steppable fit: (compiled model, family, objective, discrete q, gradient
estimator) -> `VI`, with `init` -> state, `update(state, batch)` -> one step,
and `run` -> loop, converge, average (NumPyro's SVI shape).

Stage: the parts of a fit -> optimised variational parameters.

Registry `OPTIMIZERS` (name -> class): `adam` (stochastic steps) and `dadvi`
(fixed draws and L-BFGS).  An optimiser declares `check_config(config)` (the
combinations it refuses before the fit, as usage errors), `applies(vi)` and
`refuse(config)` (the usage error when it was asked for and does not apply),
and `run(...)`, which returns an `OptimResult`, or None when it cannot start
(the fit then runs Adam).

Adam: lr_t = lr / sqrt(1 + t / 100) in whitened coordinates (families.py);
convergence as Stan's (relative ELBO change checked every 100 steps, mean
or median of the recent changes below `tol`), on window means of the
per-step estimates, never before `min_steps`, and only once the last change
is within 3 standard errors of the per-step noise (no trend left).  The
result is the average iterate over the second half of the run.  A
non-finite value or gradient restores the last good parameters and halves
the step; after 8 failures the fit stops with exit 3, naming the latents
that went non-finite.

dadvi (Giordano, Ingram & Broderick 2024): fix n_fixed moment-matched standard
normal draws and minimise the deterministic negative ELBO with L-BFGS in
coordinates whitened by the current q.

How later features plug in (each a change in one place):
- minibatches: `run(..., batches=iterator of Batch)` hands each step its
  batch; the gradient estimators pass it to the log joint, which scales the
  per-row terms;
- several processes: wrap `VI.gradient` (all-reduce `.grad` of the flat
  parameters and the value) — `update` and `run` do not change;
- a device: the runtime of the compiled model; nothing here makes tensors
  except through the parameters' own device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch

from ..errors import EXIT_NUMERIC, Diagnostic, PplError, UsageError
from .estimators import choose_gradient
from ..registry import Registry
from .optim import Adam, lbfgs_vg, plateau

DISCRETE_LR_SCALE = 4.0  # discrete q's logits take larger steps: small score gradients, far-off start
PARAM_LR_SCALE = 0.1     # `param`s take smaller steps: raw units, not whitened (a relu layer's units die at 0.2)
MAX_FAILURES = 8
WINDOW = 100             # steps per convergence window
MAX_WINDOWS = 50         # window averages kept for the final iterate average


class VI:
    """The variational problem: `gradient(S, batch)` sets `.grad` of `parameters()`."""

    def __init__(self, program, family, objective, discrete: Dict, plan, config, serves: str = "reparam"):
        self.program, self.family, self.objective = program, family, objective
        self.discrete, self.plan, self.config = discrete, plan, config
        self.estimator = choose_gradient(self, serves, getattr(config, "gradient", "auto"))

    def parameters(self) -> List[torch.Tensor]:
        """Everything the optimisers step: q's parameters (the family's, then the discrete q's) and the
        model's `param` point estimates (`program.params`, ppl/backend/params.py), last."""
        return self.family.parameters() + [q.param for q in self.discrete.values()] + \
            self.program.params.tensors()

    def gradient(self, S: int, batch=None) -> float:
        value = self.estimator.gradient(S, batch)
        self.family.hold()
        return value

    def surrogate_loss(self, S: int, batch=None):
        return self.estimator.surrogate_loss(S, batch)

    # ---- the steppable fit -------------------------------------------------------------
    def init(self, lr: float, S: int, schedule: Optional[Callable[[int], float]] = None) -> "AdamState":
        """`schedule(t)`: the step size's factor at step t (default 1 / sqrt(1 + t / 100))."""
        params = self.parameters()
        n_cont, n_disc = len(self.family.parameters()), len(self.discrete)
        own = getattr(self.family, "lr_scales", None)         # a family whose parameters differ in scale
        d_scale = getattr(self.estimator, "discrete_lr_scale", DISCRETE_LR_SCALE)
        scales = (own() if own is not None else [1.0] * n_cont) + [d_scale] * n_disc + \
            [PARAM_LR_SCALE] * (len(params) - n_cont - n_disc)
        return AdamState(params, lr, scales, S, schedule=schedule or sqrt_decay)

    def update(self, state: "AdamState", batch=None) -> Optional[float]:
        """One Adam step on `batch` -> the objective's value, or None when the step failed (the last
        good parameters are restored and the step size halved)."""
        params = state.params
        decay = state.lr_scale * state.schedule(state.t)
        state.opt.zero_grad()
        try:
            value = self.gradient(state.S, batch)
            ok = math.isfinite(value) and grads_finite(params)
        except (ValueError, RuntimeError, torch.linalg.LinAlgError):
            ok = False
        if not ok:
            state.failures += 1
            with torch.no_grad():
                for p, g in zip(params, state.good):
                    p.copy_(g)
            state.lr_scale *= 0.5
            state.restart()
            if state.failures >= MAX_FAILURES:
                numeric_failure(self, state.S)
            return None
        state.opt.step(decay)
        state.t += 1
        if state.t % 50 == 0:
            state.failures = max(0, state.failures - 1)
        if state.t % 10 == 0:
            with torch.no_grad():
                torch._foreach_copy_(state.good, params)
        return value

    def run(self, state: "AdamState", max_steps: int, tol: float, min_steps: int,
            progress: Optional[Callable] = None, batches: Optional[Iterator] = None) -> "OptimResult":
        """Adam steps until convergence or `max_steps`; the parameters end at the average iterate."""
        if not state.params or max_steps == 0:
            return OptimResult([], False, 0)
        avg = Averager(state.params)
        trace: List[float] = []
        conv = Convergence(tol, min_steps, max_steps, noisy=self.estimator.noisy or bool(self.discrete))
        drift = ParamDrift(self.program.params.tensors()) if self.program.params else None
        while state.t < max_steps:
            value = self.update(state, None if batches is None else next(batches))
            if value is None:
                continue
            record_step(value, trace, avg, drift, progress, state.t, max_steps)
            if state.t % WINDOW == 0:
                if conv.check(trace, state.t):
                    if drift is None or drift.settled():
                        break
                    conv.converged = False          # the params still move: the ELBO's test is not enough
                if drift is not None:
                    drift.reset()
                avg.close_window()
        if state.t >= 2:
            avg.assign()
        return OptimResult(trace, conv.converged, state.t)


def record_step(value: float, trace: List[float], avg: "Averager", drift: Optional["ParamDrift"],
                progress: Optional[Callable], t: int, total: int) -> None:
    """A finished step's bookkeeping: its ELBO in the trace, the iterate average, the params' drift,
    the progress line."""
    trace.append(value)
    avg.add()
    if drift is not None:
        drift.add()
    if progress is not None:
        progress(t, total, value)


def grads_finite(params: List[torch.Tensor]) -> bool:
    """Every gradient finite: one multi-tensor pass and one sync, not one per parameter (torch's fused
    non-finite check of mixed precision, scaling by 1; where it does not serve: the gradients' norms)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    try:
        found = torch.zeros(1, device=grads[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=grads[0].device))
        return not bool(found)
    except (RuntimeError, AttributeError, TypeError):
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, 1))).all())


def sqrt_decay(t: int) -> float:
    return 1.0 / math.sqrt(1.0 + t / 100.0)


@dataclass
class AdamState:
    params: List[torch.Tensor]
    lr: float
    scales: List[float]
    S: int                                   # Monte Carlo samples per step
    t: int = 0
    failures: int = 0
    lr_scale: float = 1.0
    schedule: Callable[[int], float] = sqrt_decay     # the step size factor at step t
    opt: Adam = None
    good: List[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        self.good = [p.detach().clone() for p in self.params]
        self.restart()

    def restart(self):
        self.opt = Adam(self.params, [self.lr * s for s in self.scales])


@dataclass
class OptimResult:
    trace: List[float]            # objective values (Adam: per step; dadvi: per L-BFGS evaluation)
    converged: bool
    steps: int                    # Adam steps
    evals: int = 0                # L-BFGS evaluations (dadvi)
    fixed_draws: int = 0


class Averager:
    """The average of the iterates over the second half of the run (whole windows plus the open one)."""

    def __init__(self, params: List[torch.Tensor], window: int = WINDOW):
        self.params, self.window = params, window
        self.values = [p.detach() for p in params]        # aliases (no autograd)
        self.avg = [torch.zeros_like(p) for p in params]
        self.n = 0
        self.windows: List[List[torch.Tensor]] = []

    def add(self):
        with torch.no_grad():
            self.n += 1
            torch._foreach_lerp_(self.avg, self.values, 1.0 / self.n)

    def close_window(self):
        self.windows.append([a.clone() for a in self.avg])
        del self.windows[:-MAX_WINDOWS]
        self.n = 0

    def assign(self):
        keep = self.windows[-max(1, len(self.windows) // 2):] if self.windows else []
        parts = [(w, self.window) for w in keep] + ([(self.avg, self.n)] if self.n else [])
        total = sum(n for _, n in parts)
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(sum(w[i] * (n / total) for w, n in parts))


class ParamDrift:
    """Whether the `param`s have stopped moving: over a window of steps, their gradient's mean is
    indistinguishable from zero.  Per element, z = mean / (its standard error + PARAM_GTOL / 3); settled
    when the mean of z^2 over all elements is below DRIFT_Z2 (about 1 in pure noise; a param still
    climbing has a mean gradient that stands out of its noise).  The ELBO's relative change alone
    stops too early: a slowly moving param changes the ELBO little per window."""
    DRIFT_Z2 = 1.5
    PARAM_GTOL = 1e-3             # |mean gradient| below this counts as zero (a deterministic gradient)

    def __init__(self, params: List[torch.Tensor]):
        self.params = params
        self.reset()

    def reset(self):
        self.n = 0
        self.s1 = [torch.zeros_like(p) for p in self.params]
        self.s2 = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def add(self):
        self.n += 1
        live = [(p.grad, a, b) for p, a, b in zip(self.params, self.s1, self.s2) if p.grad is not None]
        if live:
            g, a, b = (list(x) for x in zip(*live))
            torch._foreach_add_(a, g)
            torch._foreach_addcmul_(b, g, g)

    @torch.no_grad()
    def settled(self) -> bool:
        if self.n < 2:
            return True
        z2, count = 0.0, 0
        for a, b in zip(self.s1, self.s2):
            mean = a / self.n
            var = (b / self.n - mean * mean).clamp(min=0) * (self.n / (self.n - 1))
            se = torch.sqrt(var / self.n) + self.PARAM_GTOL / 3
            z2 += float(((mean / se) ** 2).sum())
            count += mean.numel()
        return not count or z2 / count < self.DRIFT_Z2


class Convergence:
    """Stan's relative-ELBO test on window means, plus 'no trend beyond 3 standard errors'.  With `noisy`
    gradients (the score path), also: the ELBO's rise per window, from a straight line through the last
    TREND_WINDOWS windows' estimates, is below the tolerance even at the top of its 95% interval (so a
    rise hidden in the noise of two window means does not count as converged)."""
    TREND_WINDOWS = 3

    def __init__(self, tol: float, min_steps: int, max_steps: int, window: int = WINDOW, noisy: bool = False):
        self.tol, self.min_steps, self.max_steps = tol, min_steps, max_steps
        self.noisy, self.window = noisy, window
        self.prev: Optional[float] = None
        self.rel_changes: List[float] = []
        self.converged = False

    def check(self, trace: List[float], t: int) -> bool:
        W = self.window
        cur = float(np.mean(trace[-W:]))
        settled = False
        if self.prev is not None:
            self.rel_changes.append(abs(cur - self.prev) / max(abs(cur), 1.0))   # absolute when |ELBO| < 1
            se = math.sqrt((np.var(trace[-W:]) + np.var(trace[-2 * W:-W])) / W)
            settled = abs(cur - self.prev) <= 3 * se
        self.prev = cur
        if self.tol > 0 and t >= self.min_steps and self.rel_changes and settled:
            recent = self.rel_changes[-max(2, int(0.1 * self.max_steps / W)):]
            if (np.mean(recent) < self.tol or np.median(recent) < self.tol) and \
                    (not self.noisy or self.flat(trace, cur)):
                self.converged = True
        return self.converged

    def flat(self, trace: List[float], cur: float) -> bool:
        n = self.TREND_WINDOWS * self.window
        if len(trace) < n:
            return False
        y = np.asarray(trace[-n:], dtype=float)
        x = np.arange(n, dtype=float) - (n - 1) / 2
        slope = float((x * (y - y.mean())).sum() / (x * x).sum())
        resid = y - y.mean() - slope * x
        se = math.sqrt(float((resid * resid).sum()) / (n - 2) / float((x * x).sum()))
        return (slope + 2 * se) * self.window < self.tol * max(abs(cur), 1.0)


def numeric_failure(vi: VI, S: int):
    with torch.no_grad():
        try:
            theta = vi.family.rsample(S)
            z = {n: q.sample(S, theta) for n, q in vi.discrete.items()}
            bad = vi.program.nonfinite_latents(theta, z)
        except (ValueError, RuntimeError):
            bad = []
    what = ", ".join(f"'{b}'" for b in bad) if bad else "the log density"
    raise PplError([Diagnostic(None, f"inference failed: {what} became non-finite (NaN or inf) repeatedly, "
                               f"even after reducing the step size; check the priors and the scale of the data, "
                               f"or try {vi.config.opt('lr')} smaller", vi.program.model.source.path)], EXIT_NUMERIC)


# ---- optimisers -----------------------------------------------------------------------------------
class Optimizer:
    name = "optimizer"

    @staticmethod
    def check_config(config) -> None:
        """Refuse, as a usage error, the options this optimiser cannot serve."""

    @staticmethod
    def applies(vi: VI) -> bool:
        return True

    @staticmethod
    def refuse(config):
        raise UsageError(f"{config.opt('optimizer', config.optimizer)} does not apply to this model and these "
                         f"options")


OPTIMIZERS = Registry()
register_optimizer = OPTIMIZERS.register


@register_optimizer
class AdamOptimizer(Optimizer):
    name = "adam"

    @staticmethod
    def run(vi: VI, S: int, lr: float, max_steps: int, tol: float, min_steps: int, progress=None, **_):
        return vi.run(vi.init(lr, S), max_steps, tol, min_steps, progress)


FIXED_DRAW_MAX = 16384
FIXED_DRAW_START = 256          # draws of the first fixed-draw stage (at least the family's least)
FIXED_DRAW_SETTLE = 0.02        # q moved less than this many of its sds when the draws doubled: enough
FIXED_DRAW_BUDGET = 1_000_000   # elements per evaluation of the fixed-draw objective
FIXED_DRAW_CHUNK = 250_000      # elements per chunk of draws (bounds the memory of one evaluation)
FIXED_DRAW_ITERS = 1000
FIXED_DRAW_GTOL = 1e-3          # largest |gradient| in whitened units: the optimum is then ~0.001 sd away
WARMUP_STEPS = 300              # Adam steps before the fixed draws after a cold start (none after Laplace)


@register_optimizer
class FixedDraws(Optimizer):
    name = "dadvi"

    @staticmethod
    def check_config(config) -> None:
        from .families import FAMILIES
        from .objectives import OBJECTIVES
        if getattr(config, "batch_size", None) is not None:
            raise UsageError(f"{config.opt('optimizer', 'dadvi')} fixes its draws over the full data and cannot "
                             f"run on minibatches; with {config.opt('batch_size')} the fit takes "
                             f"{config.opt('optimizer', 'adam')} (or {config.opt('optimizer', 'auto')})")
        fam = FAMILIES.get(config.method)
        own = fam is not None and config.objective in (fam.objectives or ())     # (the mixture's SIWAE)
        if (fam is not None and not fam.fixed_draws) or not (OBJECTIVES[config.objective].linear or own) \
                or config.estimator in ("score", "score-all", "relaxed"):
            FixedDraws.refuse(config)

    @staticmethod
    def refuse(config):
        from .families import FAMILIES
        o = config.opt
        closed = [n for n, f in FAMILIES.items() if f.fixed_draws]
        raise UsageError(f"{o('optimizer', 'dadvi')} needs {o('method', closed[0])}"
                         f"{''.join(' or ' + n for n in closed[1:])}, {o('objective', 'elbo')}, and no discrete "
                         f"latents on the score path")

    @staticmethod
    def applies(vi: VI) -> bool:
        return vi.estimator.can_fix_draws(vi)

    @staticmethod
    def draw_count(least: int, largest: int) -> int:
        """As many draws as FIXED_DRAW_BUDGET elements per evaluation allow (up to 16384: a heavy-tailed
        direction, eight schools' tau, needs thousands), never fewer than the family's least (a
        full-rank q: 2 dim + 2, since with fewer its covariance can grow where no draw looks)."""
        return int(max(least, min(FIXED_DRAW_MAX, FIXED_DRAW_BUDGET // max(1, largest))))

    @classmethod
    def run(cls, vi: VI, S: int, lr: float, max_steps: int, tol: float, min_steps: int, progress=None,
            cold: bool = False, gen: torch.Generator = None, on_eval=None, **_):
        # Adam only to get near (a Laplace start already is); fixed draws and L-BFGS do the rest
        warm = min(max_steps, WARMUP_STEPS if cold else 0)
        res = vi.run(vi.init(lr, S), warm, tol, warm, progress)
        largest = vi.program.largest_node()
        fam = vi.family
        least = fam.min_fixed_draws()
        n_max = min(cls.draw_count(least, largest), max(least, fam.max_fixed_draws))
        n_fixed = min(n_max, max(least, FIXED_DRAW_START)) if hasattr(fam, "mean_scale_u") else n_max
        evals, converged, values = cls.finish(vi, n_fixed, gen, largest, on_eval)
        if not values:   # the fixed-draw objective was not finite at the start: stochastic steps after all
            return None
        # as many draws as the posterior needs: doubled until q moves less than FIXED_DRAW_SETTLE of its
        # own sds when they double (a Gaussian posterior: at once; eight schools' heavy tau: thousands)
        while n_fixed < n_max:
            n_fixed = min(n_max, 2 * n_fixed)
            ev, conv, more = cls.finish(vi, n_fixed, gen, largest, on_eval)
            evals += ev
            if not more:             # not finite on the new draws: keep the last optimum
                break
            values += more
            converged = conv
            if cls.moved(fam) < FIXED_DRAW_SETTLE:
                break
        return OptimResult(res.trace + values, converged, res.steps, evals, n_fixed)

    @staticmethod
    def moved(fam) -> float:
        """How far the last `finish` moved q from where it started (the previous stage's q, which its
        whitening made the standard normal): the largest change of a mean in sds, or of a scale
        entry, relative."""
        m, C = fam.mean_scale_u()
        dev = (C - 1.0) if C.dim() == 1 else (C - torch.eye(C.shape[0], dtype=C.dtype, device=C.device))
        return float(torch.maximum(m.abs().max(), dev.abs().max())) if m.numel() else 0.0

    @staticmethod
    def finish(vi: VI, n_fixed: int, gen: torch.Generator, largest: int, on_eval=None):
        """Whiten by the current q, fix n_fixed moment-matched draws (mean 0, covariance I exactly: for a
        Gaussian posterior the fixed-draw optimum is the exact one), minimise with L-BFGS.
        -> (evaluations, converged, objective values; none when not finite at the start)."""
        fam = vi.family
        fam.rewhiten()
        eps = fam.fixed_eps(n_fixed, gen)

        values = []
        chunk_elements = getattr(fam, "fixed_draw_chunk", FIXED_DRAW_CHUNK)
        chunk = max(1, chunk_elements // max(1, largest))       # memory: like one step of 16 MC samples

        params = vi.program.params            # the model's point estimates: extra coordinates of x
        n_q = fam.flat.numel()

        def value_grad(x):
            with torch.no_grad():
                fam.flat.copy_(x[:n_q])
            params.assign(x[n_q:])
            v, g = 0.0, None
            try:
                for i in range(0, n_fixed, chunk):
                    part = eps[i:i + chunk]
                    weight = part.shape[0] / n_fixed
                    for p in params.tensors():      # (estimators that accumulate would add to the last chunk's)
                        p.grad = None
                    vc = vi.estimator.gradient_at(part)
                    fam.hold()
                    if not math.isfinite(vc):
                        return math.inf, None
                    v += weight * vc
                    gc = torch.cat([fam.flat.grad, params.grad()]) if params else fam.flat.grad
                    g = gc * weight if g is None else g.add_(gc, alpha=weight)
            except (ValueError, RuntimeError, torch.linalg.LinAlgError):
                return math.inf, None
            values.append(v)
            return -v, g

        x0 = torch.cat([fam.flat.detach(), params.flat()]) if params else fam.flat.detach().clone()
        plateau_rule = getattr(fam, "fixed_draw_plateau", None)     # (window, nats): stop on a plateau
        x, evals, converged = lbfgs_vg(value_grad, x0, max_iter=FIXED_DRAW_ITERS, history=20,
                                       gtol=FIXED_DRAW_GTOL, ftol=1e-10,
                                       stop=plateau(*plateau_rule) if plateau_rule else None,
                                       on_eval=None if on_eval is None else (lambda v: on_eval(-v)))
        with torch.no_grad():
            fam.flat.copy_(x[:n_q])
        params.assign(x[n_q:])
        fam.flat.grad = None
        for p in params.tensors():
            p.grad = None
        return evals, converged, values
