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
with it) and a leave-one-out baseline over the S samples.  Enumerated latents
need no estimator: the log joint sums them out.

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
    preferred = GRADIENTS.get(getattr(vi.family, "gradient", None) or "")     # the family's own, if it has one
    for cls in ([preferred] if preferred else []) + list(GRADIENTS.values()):
        if cls.serves == serves and cls.applies(vi):
            return cls(vi)
    raise UsageError(f"{opt('objective', vi.config.objective)} needs reparameterised gradients for every latent; "
                     f"use {opt('objective', 'elbo')} with score-function estimators")


def discrete_surrogate(vi, ev, z, S) -> torch.Tensor:
    """Score-function surrogate for discrete latents on the score path, Rao-Blackwellised by Markov blanket."""
    out = torch.zeros((), dtype=vi.program.dtype, device=vi.program.device)
    for name, q in vi.discrete.items():
        p = vi.plan[name]
        lq = q.log_q(z[name])                                   # (S, *shape)
        signal = _reduce_to(ev.factors[name].expand(lq.shape), q.shape, p.local)
        for fac in p.factors:
            if fac in ev.factors:
                signal = signal + _reduce_to(ev.factors[fac], q.shape, p.local)
        signal = signal - (lq if p.local else lq.reshape(S, -1).sum(-1))
        signal = signal.detach()
        adv = signal - _loo_baseline(signal)
        if not p.local:
            lq_s = lq.reshape(S, -1).sum(-1)
            out = out - (adv * lq_s).mean()
        else:
            out = out - (adv * lq).reshape(S, -1).sum(-1).mean()
    return out


def discrete_log_q(vi, z) -> float:
    return float(sum(q.log_q(z[n]).detach().reshape(next(iter(z.values())).shape[0], -1).sum(-1).mean()
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
        mean_lp = lj.evaluate(None, blocks=us, batch=batch).total.sum() * (1.0 / S)
        value = float(mean_lp.detach()) + fam.entropy_value()
        if not math.isfinite(value):
            return math.nan
        # (a scalar, not grad_outputs=: torch then imports sympy, 0.3 s, for a shape check)
        gs = torch.autograd.grad(mean_lp, us, allow_unused=True)
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
        for p in fam.parameters():
            p.grad = None
        (-value).backward()
        return v

    def surrogate_loss(self, S: int, batch=None) -> Surrogate:
        vi = self.vi
        fam = vi.family
        z = {n: q.sample(S) for n, q in vi.discrete.items()}
        if fam.gaussian and vi.objective.linear:
            theta = fam.rsample(S)
            ev = vi.program.evaluate(theta, z, keep_factors=bool(z), batch=batch)
            elbo = ev.total.mean() + fam.entropy()
            loss = -elbo + discrete_surrogate(vi, ev, z, S)
            return Surrogate(loss, float(elbo.detach()) - discrete_log_q(vi, z))
        theta, log_q = fam.rsample_with_log_q(S)
        ev = vi.program.evaluate(theta, z, keep_factors=bool(z), batch=batch)
        obj = vi.objective(ev.total - log_q)
        loss = -obj + discrete_surrogate(vi, ev, z, S)
        return Surrogate(loss, float(obj.detach()) - discrete_log_q(vi, z))


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
        z = {n: q.sample(S) for n, q in vi.discrete.items()}
        with torch.no_grad():
            theta = fam.rsample(S)
        log_q = fam.log_q(theta)
        ev = vi.program.evaluate(theta, z, keep_factors=bool(z), batch=batch)
        f = (ev.total - log_q).detach()
        loss = -((f - _loo_baseline(f)) * log_q).mean()
        loss = loss + discrete_surrogate(vi, ev, z, S)
        return Surrogate(loss, float(f.mean()))
