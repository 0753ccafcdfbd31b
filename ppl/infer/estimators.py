"""Gradient estimators: (the VI problem: compiled model, family, objective,
discrete q) -> an estimate of minus the objective's gradient in every
variational parameter, and the objective's value.

Registry `GRADIENTS` (name -> class), tried in registration order; the first
that serves the requested kind (`reparam` or `score`, from the estimator
plan) and `applies` to the problem is used, unless the config names one
(`gradient=` from Python):
- `closed-form`: pathwise, for families that declare `closed_form`
  (meanfield, fullrank), the ELBO, no discrete q: autograd runs through the
  log joint only, the family's part of the chain rule is
  closed form (and `gradient_at(eps)` serves the fixed-draw optimiser);
- `pathwise`: reparameterised draws and autograd through a surrogate loss
  (analytic entropy for a Gaussian family and the ELBO, the objective of the
  log weights otherwise);
- `score`: the score-function estimator (BBVI) for the continuous block, with
  a leave-one-out baseline.
Discrete latents on the score path always add their own score-function term
(`discrete_surrogate`): Rao-Blackwellised with the latent's Markov blanket
(its own density and the factors that use it, elementwise when they line up
with it), a leave-one-out baseline over the S samples, and a learned control
variate (`ControlVariate`: a quadratic in the element's value, fitted to the
signal over past steps, whose expectation under q is summed exactly over
q's values); a draw of zero probability is counted and its signal clipped
to a finite penalty, never averaged as NaN.  Enumerated latents need no
estimator: the log joint sums them out.  `vimco`: the multi-sample
objective's estimator (Mnih & Rezende 2016), for `--objective vimco`.

A new estimator is one class with `surrogate_loss` (or `gradient`) and one
`register_gradient`.  Minibatches reach every estimator as the `batch`
argument (the log joint scales per-row terms by it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..registry import Registry


@dataclass
class Surrogate:
    loss: torch.Tensor               # its gradient estimates minus the objective's gradient
    value: float                     # the objective's value (an ELBO estimate for 'elbo')


def _loo_baseline(f: torch.Tensor) -> torch.Tensor:
    S = f.shape[0]
    if S < 2:
        return torch.zeros_like(f)
    return (f.sum(0, keepdim=True) - f) / (S - 1)


def _reduce_to(lp: torch.Tensor, shape, local: bool) -> torch.Tensor:
    """Elementwise factor log density -> per element of the latent (local) or per sample."""
    if local and tuple(lp.shape[1:]) == tuple(shape):
        return lp
    s = lp.reshape(lp.shape[0], -1).sum(-1)
    return s.reshape((s.shape[0],) + (1,) * len(shape)) if local else s


class GradientEstimator:
    name = "estimator"
    serves = "reparam"          # the plan's estimator for continuous latents that it implements
    noisy = False               # score-function gradients: more MC samples and a smaller step by default

    def __init__(self, vi):
        self.vi = vi

    @classmethod
    def applies(cls, vi) -> bool:
        return True

    @classmethod
    def can_fix_draws(cls, vi) -> bool:
        """Whether `gradient_at(eps)` serves the fixed-draw optimiser for this problem."""
        return False

    def surrogate_loss(self, S: int, batch=None) -> Surrogate:
        raise NotImplementedError

    def gradient(self, S: int, batch=None) -> float:
        """Set `.grad` of every parameter to an estimate of minus the objective's gradient; return the
        objective's value (not finite: the gradients are not to be used)."""
        sur = self.surrogate_loss(S, batch)
        if not (math.isfinite(sur.value) and bool(torch.isfinite(sur.loss))):
            return math.nan
        sur.loss.backward()
        return sur.value


GRADIENTS = Registry()
register_gradient = GRADIENTS.register


def choose_gradient(vi, serves: str, requested: str = "auto") -> GradientEstimator:
    opt = vi.config.opt
    if requested != "auto":
        cls = GRADIENTS.get(requested)
        if cls is None:
            raise UsageError(f"unknown gradient estimator {requested!r} for {opt('gradient')} "
                             f"(valid: auto, {', '.join(GRADIENTS)})")
        if not cls.applies(vi):
            raise UsageError(f"{opt('gradient', requested)} does not apply to this family, objective or model")
        return cls(vi)
    own = getattr(vi.objective, "gradient", None)       # an objective with its own estimator (vimco)
    if own is not None and GRADIENTS[own].applies(vi):
        return GRADIENTS[own](vi)
    preferred = GRADIENTS.get(getattr(vi.family, "gradient", None) or "")     # the family's own, if it has one
    for cls in ([preferred] if preferred else []) + list(GRADIENTS.values()):
        if cls.serves == serves and cls.applies(vi):
            return cls(vi)
    raise UsageError(f"{opt('objective', vi.config.objective)} needs reparameterised gradients for every latent; "
                     f"use {opt('objective', 'elbo')} with score-function estimators")


@dataclass(frozen=True)
class ScoreOptions:
    """The variance reductions of the discrete score-function term (all on by default; the gradient-variance
    test turns them off one by one)."""
    rao_blackwell: bool = True       # each element's signal: its Markov blanket only (else the whole log joint)
    baseline: bool = True            # leave-one-out over the S samples
    control_variate: bool = True     # learned, where q can list its values


PENALTY = 10.0      # nats below the worst finite signal: a zero-probability draw's signal


class ControlVariate:
    """h(z) = c1 d + c2 (d^2 - 1), d = (z - E_q z) / sd_q per element, with c fitted by least squares to the
    (baseline-corrected) signal, from sufficient statistics averaged over past steps (so h does not depend
    on this step's draws, and the estimator stays unbiased); E_q[h] is summed exactly over q's values."""
    DECAY = 0.9
    RIDGE = 1e-3

    def __init__(self, shape, dtype, device):
        self.xx = torch.zeros(tuple(shape) + (2, 2), dtype=dtype, device=device)
        self.xy = torch.zeros(tuple(shape) + (2,), dtype=dtype, device=device)
        self.steps = 0

    def coefficients(self) -> torch.Tensor:
        eye = torch.eye(2, dtype=self.xx.dtype, device=self.xx.device)
        scale = torch.diagonal(self.xx, dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1).clamp(min=1e-12)
        return torch.linalg.solve(self.xx + self.RIDGE * scale * eye, self.xy.unsqueeze(-1)).squeeze(-1)

    def update(self, feats: torch.Tensor, target: torch.Tensor):
        S = feats.shape[0]
        xx = torch.einsum("s...i,s...j->...ij", feats, feats) / S
        xy = torch.einsum("s...i,s...->...i", feats, target) / S
        self.xx.mul_(self.DECAY).add_(xx, alpha=1 - self.DECAY)
        self.xy.mul_(self.DECAY).add_(xy, alpha=1 - self.DECAY)
        self.steps += 1


def _features(v: torch.Tensor, m: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    d = (v - m) / sd
    return torch.stack([d, d * d - 1], -1)


def _control_variate(q, z, target: torch.Tensor, theta=None):
    """-> (h(z) per sample and element, E_q[h] summed over elements (averaged over the draws of theta for a
    conditional q): differentiable in q's parameters), or None where q cannot list its values; updates the
    coefficients with this step's draws after use."""
    grid = q.grid(theta)
    if grid is None:
        return None
    vals, lq, covered = grid
    with torch.no_grad():
        w = torch.exp(lq)
        m = (w * vals).sum(0)
        sd = torch.sqrt(((w * (vals - m) ** 2).sum(0)).clamp(min=1e-12))
    cv = getattr(q, "control_variate", None)
    if cv is None:
        cv = q.control_variate = ControlVariate(q.shape, vals.dtype, vals.device)
    feats = _features(z, m, sd)                                     # (S, *shape, 2)
    h = None
    expect = None
    if cv.steps >= 2:
        c = cv.coefficients() * covered.unsqueeze(-1)
        h = (feats * c).sum(-1)
        hv = (_features(vals, m, sd) * c).sum(-1)                   # (G, *shape)
        expect = (torch.exp(lq) * torch.where(torch.isfinite(lq), hv, torch.zeros_like(hv))).sum()
        if lq.dim() > len(q.shape) + 1:              # per draw of theta
            expect = expect / lq.shape[1]
    cv.update(feats, target)
    return h, expect


def discrete_surrogate(vi, ev, z, S, options: ScoreOptions = None, theta=None) -> torch.Tensor:
    """Score-function surrogate for discrete latents on the score path, Rao-Blackwellised by Markov blanket,
    with a leave-one-out baseline and a learned control variate."""
    opts = options or getattr(vi, "score_options", None) or ScoreOptions()
    out = torch.zeros((), dtype=vi.program.dtype, device=vi.program.device)
    whole = None
    if not opts.rao_blackwell:                  # the plain estimator: every element sees the whole log joint
        whole = (ev.total - sum(q.log_q(z[n], theta).reshape(S, -1).sum(-1)
                                for n, q in vi.discrete.items())).detach()
    for name, q in vi.discrete.items():
        p = vi.plan[name]
        lq = q.log_q(z[name], theta)                            # (S, *shape)
        local = p.local and opts.rao_blackwell
        if whole is not None:
            signal = whole.reshape((S,) + (1,) * len(q.shape)).expand(lq.shape) if p.local else whole
            local = p.local
        else:
            signal = _reduce_to(ev.factors[name].expand(lq.shape), q.shape, local)
            for fac in p.factors:
                if fac in ev.factors:
                    signal = signal + _reduce_to(ev.factors[fac], q.shape, local)
            signal = signal - (lq if local else lq.reshape(S, -1).sum(-1))
        signal = _finite(q, signal.detach())
        adv = signal - _loo_baseline(signal) if opts.baseline else signal
        if local and opts.control_variate:
            got = _control_variate(q, z[name], adv, theta)
            if got is not None and got[0] is not None:
                h, expect = got
                adv = adv - (h - _loo_baseline(h) if opts.baseline else h)
                out = out - expect
        if not local:
            lq_s = lq.reshape(S, -1).sum(-1)
            out = out - (adv * lq_s).mean()
        else:
            out = out - (adv * lq).reshape(S, -1).sum(-1).mean()
    return out


def _finite(q, signal: torch.Tensor) -> torch.Tensor:
    """A draw of zero probability (signal -inf or NaN): counted on q (`zero_draws`), its signal set to
    PENALTY nats below the worst finite one, so the step moves q away from it."""
    bad = ~torch.isfinite(signal)
    if not bool(bad.any()):
        return signal
    q.zero_draws = getattr(q, "zero_draws", 0) + int(bad.sum())
    fin = signal[~bad]
    floor = (fin.min() if fin.numel() else torch.zeros((), dtype=signal.dtype)) - PENALTY
    return torch.where(bad, floor, signal)


def _possible(vi, ev, theta, z, batch):
    """The evaluation on the draws of positive probability: a discrete draw of probability zero
    (log p = -inf) is dropped from the continuous part and counted (`vi.zero_draws`); the discrete
    part sees it as a penalty (`_finite`)."""
    keep = torch.isfinite(ev.total)
    if not z or bool(keep.all()) or not bool(keep.any()):
        return ev
    vi.zero_draws = getattr(vi, "zero_draws", 0) + int((~keep).sum())
    return vi.program.evaluate(theta[keep], {k: v[keep] for k, v in z.items()}, batch=batch)


def discrete_log_q(vi, z, theta=None) -> float:
    return float(sum(q.log_q(z[n], theta).detach().reshape(next(iter(z.values())).shape[0], -1).sum(-1).mean()
                     for n, q in vi.discrete.items())) if z else 0.0


@register_gradient
class ClosedForm(GradientEstimator):
    """Pathwise with the Gaussian chain rule theta = mu0 + A u(eps) in closed form."""
    name = "closed-form"

    @classmethod
    def applies(cls, vi) -> bool:
        return vi.family.closed_form and vi.objective.linear and not vi.discrete

    @classmethod
    def can_fix_draws(cls, vi) -> bool:
        return True

    def gradient(self, S: int, batch=None) -> float:
        eps, theta = self.vi.family.draw(S)
        return self._gradient(eps, theta, batch)

    def gradient_at(self, eps: torch.Tensor, batch=None) -> float:
        """`gradient` on given standard-normal draws (fixed draws: a deterministic objective)."""
        return self._gradient(eps, self.vi.family.theta_of(eps), batch)

    def surrogate_loss(self, S: int, batch=None) -> Surrogate:
        return Pathwise(self.vi).surrogate_loss(S, batch)

    def _gradient(self, eps: torch.Tensor, theta: torch.Tensor, batch) -> float:
        fam, lj = self.vi.family, self.vi.program
        S = eps.shape[0]
        with torch.no_grad():
            us = [u.requires_grad_(True) for u in lj.split(theta)]
        # a data-parallel fit (ppl.dist): each process's part of log p and its gradient, summed in one
        # all-reduce of one flat buffer (the ELBO is linear in log p) -- one collective a step
        parts = (batch if batch is not None else lj.batch).shard is not None
        ev = lj.evaluate(None, blocks=us, batch=batch, collective=not parts) if us else \
            lj.evaluate(theta, batch=batch, collective=not parts)   # (S draws)
        mean_lp = ev.total.sum() * (1.0 / S)
        ps = lj.params.tensors()              # the model's point estimates: d/dparam of the mean log p
        if parts:
            from .. import dist
            gs = torch.autograd.grad(mean_lp, us + ps, allow_unused=True) if mean_lp.requires_grad else \
                [None] * len(us + ps)
            gs = [torch.zeros_like(x) if gi is None else gi for x, gi in zip(us + ps, gs)]
            summed = dist.all_reduce_flat([mean_lp.detach().reshape(1)] + gs)
            mean_lp, gs = summed[0][0], summed[1:]
        value = float(mean_lp.detach()) + fam.entropy_value()
        if not math.isfinite(value):
            return math.nan
        # (a scalar, not grad_outputs=: torch then imports sympy, 0.3 s, for a shape check)
        if not parts:
            gs = torch.autograd.grad(mean_lp, us + ps, allow_unused=True)
        gs, gp = gs[:len(us)], gs[len(us):]
        for p, gi in zip(ps, gp):
            p.grad = torch.zeros_like(p) if gi is None else -gi
        if not us:
            fam.flat.grad = torch.zeros_like(fam.flat)
            return value
        with torch.no_grad():
            g = torch.cat([torch.zeros_like(u).view(S, -1) if gi is None else gi.view(S, -1)
                           for u, gi in zip(us, gs)], 1) if len(us) > 1 else gs[0].view(S, -1)
        fam.flat.grad = fam.loss_grad(eps, g)
        return value


@register_gradient
class Pathwise(GradientEstimator):
    """Reparameterised draws, autograd through the whole surrogate."""
    name = "pathwise"

    @classmethod
    def can_fix_draws(cls, vi) -> bool:
        fam = vi.family
        return hasattr(fam, "reparam") and fam.gaussian and vi.objective.linear and not vi.discrete

    def gradient_at(self, eps: torch.Tensor, batch=None) -> float:
        """The ELBO on given draws and its gradient in the family's parameters, by autograd."""
        fam, lj = self.vi.family, self.vi.program
        value = lj.evaluate(fam.reparam(eps), batch=batch).total.mean() + fam.entropy()
        v = float(value.detach())
        if not math.isfinite(v):
            return math.nan
        for p in self.vi.parameters():
            p.grad = None
        (-value).backward()
        return v

    def surrogate_loss(self, S: int, batch=None) -> Surrogate:
        vi = self.vi
        fam = vi.family
        if fam.gaussian and vi.objective.linear:
            theta = fam.rsample(S)
            z = {n: q.sample(S, theta) for n, q in vi.discrete.items()}
            ev = vi.program.evaluate(theta, z, keep_factors=bool(z), batch=batch)
            ev_c = _possible(vi, ev, theta, z, batch)
            elbo = ev_c.total.mean() + fam.entropy()
            loss = -elbo + discrete_surrogate(vi, ev, z, S, theta=theta)
            return Surrogate(loss, float(elbo.detach()) - discrete_log_q(vi, z, theta))
        theta, log_q = fam.rsample_with_log_q(S)
        z = {n: q.sample(S, theta) for n, q in vi.discrete.items()}
        ev = vi.program.evaluate(theta, z, keep_factors=bool(z), batch=batch)
        obj = vi.objective(ev.total - log_q)
        loss = -obj + discrete_surrogate(vi, ev, z, S, theta=theta)
        return Surrogate(loss, float(obj.detach()) - discrete_log_q(vi, z, theta))


@register_gradient
class ScoreFunction(GradientEstimator):
    """The score-function (BBVI) estimator for the continuous block too, with a leave-one-out baseline."""
    name = "score"
    serves = "score"
    noisy = True

    @classmethod
    def applies(cls, vi) -> bool:
        return vi.objective.linear

    def surrogate_loss(self, S: int, batch=None) -> Surrogate:
        vi = self.vi
        fam = vi.family
        with torch.no_grad():
            theta = fam.rsample(S)
        z = {n: q.sample(S, theta) for n, q in vi.discrete.items()}
        log_q = fam.log_q(theta)
        ev = vi.program.evaluate(theta, z, keep_factors=bool(z), batch=batch)
        f = (ev.total - log_q).detach()
        loss = -((f - _loo_baseline(f)) * log_q).mean()
        if vi.program.params:             # the params' gradient: pathwise (theta is detached here)
            loss = loss - ev.total.mean()
        loss = loss + discrete_surrogate(vi, ev, z, S, theta=theta)
        return Surrogate(loss, float(f.mean()))


def _leave_one_out_bounds(lw: torch.Tensor) -> torch.Tensor:
    """(S,) log weights -> (S,): the multi-sample bound with draw k's log weight replaced by the mean of
    the others' (VIMCO's baselines; S >= 2)."""
    S = lw.shape[0]
    others = (lw.sum() - lw) / (S - 1)
    rep = lw.unsqueeze(0).expand(S, S).clone()
    rep[torch.arange(S), torch.arange(S)] = others
    return torch.logsumexp(rep, 1) - math.log(S)


@register_gradient
class VIMCOGradient(GradientEstimator):
    """VIMCO (Mnih & Rezende 2016): the multi-sample bound L = log mean_k w_k, reparameterised for the
    continuous block, and for discrete latents the score term sum_k (L - L_-k) grad log q(z_k), where
    L_-k replaces log w_k by the mean of the other draws' (a per-draw baseline with no learned part)."""
    name = "vimco"
    serves = "vimco"
    noisy = True

    @classmethod
    def applies(cls, vi) -> bool:
        return getattr(vi.objective, "gradient", None) == "vimco" and hasattr(vi.family, "rsample_with_log_q")

    def surrogate_loss(self, S: int, batch=None) -> Surrogate:
        vi = self.vi
        if S < 2:
            raise UsageError(f"{vi.config.opt('objective', 'vimco')} needs at least 2 {vi.config.opt('mc_samples')}")
        theta, log_q = vi.family.rsample_with_log_q(S)
        z = {n: q.sample(S, theta) for n, q in vi.discrete.items()}
        ev = vi.program.evaluate(theta, z, batch=batch)
        lqz = sum((q.log_q(z[n], theta).reshape(S, -1).sum(-1) for n, q in vi.discrete.items()),
                  torch.zeros(S, dtype=vi.program.dtype, device=vi.program.device))
        log_w = ev.total - log_q - lqz
        bound = torch.logsumexp(log_w, 0) - math.log(S)
        with torch.no_grad():
            lw = log_w.detach()
            fin = torch.isfinite(lw)
            if not bool(fin.all()) and bool(fin.any()):        # a draw of probability zero: counted, penalised
                vi.zero_draws = getattr(vi, "zero_draws", 0) + int((~fin).sum())
                lw = torch.where(fin, lw, lw[fin].min() - PENALTY)
            signal = (torch.logsumexp(lw, 0) - math.log(S)) - _leave_one_out_bounds(lw)
        loss = -(bound + (signal * lqz).sum()) if vi.discrete else -bound
        return Surrogate(loss, float(bound.detach()))

from . import relaxed as _relaxed  # noqa: E402,F401  (registers `relaxed`: Gumbel-softmax / concrete)
