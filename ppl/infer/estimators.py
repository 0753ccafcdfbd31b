"""Gradient estimators: (family, log joint, discrete q) -> a surrogate loss
whose gradient is an unbiased estimate of minus the objective's gradient, and
the objective's value.

- `reparam` (pathwise) for the continuous block;
- `score` (BBVI) for the continuous block when asked, and always for discrete
  latents on the score path: each is Rao-Blackwellised with its Markov blanket
  (its own density and the factors that use it, elementwise when they line up
  with it) and uses a leave-one-out baseline over the S samples;
- enumerated latents need no estimator: the log joint sums them out.

Objectives (registry `OBJECTIVES`): elbo, iwae, renyi (alpha).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .. import distributions as DS
from ..errors import UsageError
from ..frontend.check import Model


# ---- variational distributions for discrete latents on the score path --------------
class DiscreteQ:
    """Independent q per element: categorical (1..K), Bernoulli, or Poisson for counts."""

    def __init__(self, name: str, support: str, shape, size: int, dtype, gen: torch.Generator, n=None):
        self.name, self.support, self.shape, self.gen, self.dtype = name, support, tuple(shape), gen, dtype
        if support == "categorical":
            self.param = torch.zeros(self.shape + (size,), dtype=dtype, requires_grad=True)
        elif support in ("boolean", "nonneg_int"):
            self.param = torch.zeros(self.shape, dtype=dtype, requires_grad=True)
        elif support == "binomial" and n is not None:
            self.n = n
            self.param = torch.zeros(self.shape, dtype=dtype, requires_grad=True)
        else:
            raise UsageError(f"no variational family for the discrete latent '{name}' (support {support})")

    def dist(self):
        D = torch.distributions
        if self.support == "categorical":
            return D.Categorical(logits=self.param)
        if self.support == "boolean":
            return D.Bernoulli(logits=self.param)
        if self.support == "binomial":
            return D.Binomial(self.n, logits=self.param)
        return D.Poisson(torch.exp(self.param))

    def sample(self, S: int) -> torch.Tensor:
        with torch.no_grad():
            if self.support == "categorical":
                p = torch.softmax(self.param, -1).reshape(-1, self.param.shape[-1])
                z = torch.multinomial(p, S, replacement=True, generator=self.gen).T.reshape((S,) + self.shape) + 1
                return z.to(self.dtype)
            if self.support in ("boolean", "binomial"):
                probs = torch.sigmoid(self.param).expand((S,) + self.shape)
                if self.support == "boolean":
                    return (torch.rand(probs.shape, generator=self.gen, dtype=self.dtype) < probs).to(self.dtype)
                u = torch.rand((S,) + self.shape + (int(self.n.max()),), generator=self.gen, dtype=self.dtype)
                return (u < probs.unsqueeze(-1)).sum(-1).clamp(max=self.n).to(self.dtype)
            return torch.poisson(torch.exp(self.param).expand((S,) + self.shape), generator=self.gen)

    def log_q(self, z: torch.Tensor) -> torch.Tensor:
        d = self.dist()
        if self.support == "categorical":
            return d.log_prob(z.long() - 1)
        return d.log_prob(z)


@dataclass
class Terms:
    loss: torch.Tensor               # surrogate; its gradient estimates minus the objective's
    objective: float                 # value of the objective (an ELBO estimate for 'elbo')
    log_w: Optional[torch.Tensor]    # log p - log q per sample, when computed


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


class Estimator:
    def __init__(self, model: Model, lj, family, plan, continuous: str, objective: str, alpha: float,
                 dq: Dict[str, DiscreteQ]):
        self.model, self.lj, self.family, self.plan = model, lj, family, plan
        self.continuous, self.objective, self.alpha, self.dq = continuous, objective, alpha, dq
        if objective != "elbo" and (continuous == "score" or dq):
            raise UsageError(f"--objective {objective} needs reparameterised gradients for every latent; "
                             f"use --objective elbo with score-function estimators")
        if objective not in OBJECTIVES:
            raise UsageError(f"unknown objective '{objective}' (objectives: {', '.join(OBJECTIVES)})")

    def parameters(self) -> List[torch.Tensor]:
        return self.family.parameters() + [q.param for q in self.dq.values()]

    @property
    def closed_form(self) -> bool:
        """The default path (Gaussian family, ELBO, pathwise, no discrete q): autograd runs through
        the log joint only, and the family's part of the chain rule is done in closed form."""
        return self.family.closed_form and self.objective == "elbo" and self.continuous == "reparam" \
            and not self.dq

    def gradient(self, S: int) -> float:
        """Set `.grad` of every parameter to an estimate of minus the objective's gradient;
        return the objective's value (not finite: the gradients are not to be used)."""
        if not self.closed_form:
            terms = self(S)
            if not (math.isfinite(terms.objective) and bool(torch.isfinite(terms.loss))):
                return math.nan
            terms.loss.backward()
            return terms.objective
        eps, theta = self.family.draw(S)
        return self._closed_form_gradient(eps, theta)

    def gradient_at(self, eps: torch.Tensor) -> float:
        """`gradient` on given standard-normal draws (fixed draws: a deterministic objective)."""
        return self._closed_form_gradient(eps, self.family.theta_of(eps))

    def _closed_form_gradient(self, eps: torch.Tensor, theta: torch.Tensor) -> float:
        fam, lj = self.family, self.lj
        S = eps.shape[0]
        with torch.no_grad():
            us = [u.requires_grad_(True) for u in lj.split(theta)]
        mean_lp = lj.evaluate(None, blocks=us).total.sum() * (1.0 / S)
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

    def __call__(self, S: int) -> Terms:
        fam = self.family
        z = {n: q.sample(S) for n, q in self.dq.items()}
        if self.continuous == "score":
            with torch.no_grad():
                theta = fam.rsample(S)
            log_q = fam.log_q(theta)
            ev = self.lj.evaluate(theta, z, keep_factors=bool(z))
            f = (ev.total - log_q).detach()
            loss = -((f - _loo_baseline(f)) * log_q).mean()
            loss = loss + self._discrete(ev, z, S)
            return Terms(loss, float(f.mean()), f)
        if fam.gaussian and self.objective == "elbo":
            theta = fam.rsample(S)
            ev = self.lj.evaluate(theta, z, keep_factors=bool(z))
            H = fam.entropy()
            elbo = ev.total.mean() + H
            loss = -elbo + self._discrete(ev, z, S)
            return Terms(loss, float(elbo.detach()) - self._discrete_log_q(z), None)
        if isinstance(getattr(fam, "rsample_with_log_q", None), Callable):
            theta, log_q = fam.rsample_with_log_q(S)
        else:
            theta = fam.rsample(S)
            log_q = fam.log_q(theta)
        ev = self.lj.evaluate(theta, z, keep_factors=bool(z))
        log_w = ev.total - log_q
        obj = OBJECTIVES[self.objective](log_w, self.alpha)
        loss = -obj + self._discrete(ev, z, S)
        return Terms(loss, float(obj.detach()) - self._discrete_log_q(z), log_w.detach())

    def _discrete_log_q(self, z) -> float:
        return float(sum(q.log_q(z[n]).detach().reshape(next(iter(z.values())).shape[0], -1).sum(-1).mean()
                         for n, q in self.dq.items())) if z else 0.0

    def _discrete(self, ev, z, S) -> torch.Tensor:
        """Score-function surrogate for discrete latents, Rao-Blackwellised by Markov blanket."""
        out = torch.zeros((), dtype=self.lj.dtype)
        for name, q in self.dq.items():
            p = self.plan[name]
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


def _logmeanexp(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, 0) - torch.log(torch.tensor(float(x.shape[0]), dtype=x.dtype))


def _renyi(log_w: torch.Tensor, alpha: float) -> torch.Tensor:
    if abs(1 - alpha) < 1e-9:
        return log_w.mean()
    return _logmeanexp((1 - alpha) * log_w) / (1 - alpha)


OBJECTIVES: Dict[str, Callable] = {
    "elbo": lambda log_w, alpha: log_w.mean(),
    "iwae": lambda log_w, alpha: _logmeanexp(log_w),
    "renyi": _renyi,
}


def discrete_families(model: Model, lj, plan, dtype, gen) -> Dict[str, DiscreteQ]:
    out = {}
    for name in lj.score:
        node = model.nodes[name]
        spec = DS.REGISTRY[node.dist.spec]
        size = plan[name].size
        n = None
        if spec.support == "binomial":
            v = lj.known.get(getattr(node.dist.args[0], "id", None))
            n = None if v is None else v[0]
        out[name] = DiscreteQ(name, spec.support, node.shape, size, dtype, gen, n)
    return out
