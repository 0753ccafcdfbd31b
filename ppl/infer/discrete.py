"""Variational families for discrete latents on the score path: checked IR +
estimator plan -> one independent q per element of each such latent.

Registry `DISCRETE_QS` (name -> class), named by the supports registry
(`ppl.supports.SUPPORTS[kind].q`): categorical (values 1..K), bernoulli,
binomial (n trials, a known constant), count (a discretised logistic with a
free location and scale per element, restricted to the element's bounds
from the graph, `ppl.bounds`), poisson (a free rate; not the default: its
variance is tied to its mean).  Each gives `sample(S, theta)`, `log_q(z,
theta)` and its parameter `param`; a q whose support can be listed gives
`grid(theta)`, its values and log probabilities (differentiable), for the
learned control variate.  `theta` (S, dim): the draws of the continuous
latents; a q may condition on them (the count q's location moves linearly with
the continuous latents of its Markov blanket), others ignore it.
"""
from __future__ import annotations

import math
from typing import Dict

import numpy as np
import torch

from .. import distributions as DS
from ..errors import UsageError
from ..frontend.check import Model
from ..registry import Registry
from ..supports import SUPPORTS, const_value


class DiscreteQ:
    name = "discrete"

    def __init__(self, name: str, shape, size: int, program, gen: torch.Generator, model: Model, node):
        self.latent, self.shape, self.gen = name, tuple(shape), gen
        self.dtype, self.device = program.dtype, program.device
        self.param = torch.zeros(self._param_shape(size), dtype=self.dtype, device=self.device, requires_grad=True)

    def _param_shape(self, size: int):
        return self.shape

    def dist(self) -> torch.distributions.Distribution:
        raise NotImplementedError

    def sample(self, S: int, theta=None) -> torch.Tensor:
        raise NotImplementedError

    def log_q(self, z: torch.Tensor, theta=None) -> torch.Tensor:
        return self.dist().log_prob(z)

    def center(self, mu0: torch.Tensor, sd: torch.Tensor) -> None:
        """Where the continuous latents' q starts and its scale (a conditional q whitens by them)."""

    def match(self, mean: torch.Tensor, sd: torch.Tensor) -> None:
        """Start at (about) this mean and sd per element (the exact conditional at the start point);
        a q that cannot is left where it is."""

    def _rand(self, shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen, dtype=self.dtype, device=self.device)

    def grid(self, theta=None):
        """(values (G, [S,] *shape), log q (G, [S,] *shape), covered ([S,] *shape) bool): every value q can
        take, with its log probability (differentiable in `param`; per draw of `theta` for a conditional
        q), where `covered` (else None: no grid)."""
        return None


DISCRETE_QS = Registry()
register_discrete = DISCRETE_QS.register


@register_discrete
class CategoricalQ(DiscreteQ):
    name = "categorical"
    """Values 1..K, softmax logits per element."""

    def _param_shape(self, size):
        return self.shape + (size,)

    def dist(self):
        return torch.distributions.Categorical(logits=self.param)

    def sample(self, S, theta=None):
        with torch.no_grad():
            p = torch.softmax(self.param, -1).reshape(-1, self.param.shape[-1])
            z = torch.multinomial(p, S, replacement=True, generator=self.gen).T.reshape((S,) + self.shape) + 1
            return z.to(self.dtype)

    def log_q(self, z, theta=None):
        return self.dist().log_prob(z.long() - 1)

    def grid(self, theta=None):
        K = self.param.shape[-1]
        v = (torch.arange(K, dtype=self.dtype, device=self.device) + 1).reshape((K,) + (1,) * len(self.shape))
        lq = torch.log_softmax(self.param, -1).movedim(-1, 0)
        return v.expand(lq.shape), lq, torch.ones(self.shape, dtype=torch.bool, device=self.device)


@register_discrete
class BernoulliQ(DiscreteQ):
    name = "bernoulli"
    def dist(self):
        return torch.distributions.Bernoulli(logits=self.param)

    def sample(self, S, theta=None):
        with torch.no_grad():
            probs = torch.sigmoid(self.param).expand((S,) + self.shape)
            return (self._rand(probs.shape) < probs).to(self.dtype)

    def match(self, mean, sd):
        with torch.no_grad():
            self.param.copy_(torch.logit(mean.clamp(1e-4, 1 - 1e-4)).to(self.dtype).expand(self.shape))

    def grid(self, theta=None):
        v = torch.tensor([0.0, 1.0], dtype=self.dtype, device=self.device).reshape((2,) + (1,) * len(self.shape))
        lq = torch.stack([torch.nn.functional.logsigmoid(-self.param), torch.nn.functional.logsigmoid(self.param)])
        return v.expand(lq.shape), lq, torch.ones(self.shape, dtype=torch.bool, device=self.device)


@register_discrete
class BinomialQ(DiscreteQ):
    name = "binomial"
    """n trials (the distribution's own, a known constant) with a free success logit per element."""

    def __init__(self, name, shape, size, program, gen, model, node):
        super().__init__(name, shape, size, program, gen, model, node)
        n = const_value(model, node.dist.args[0])
        if n is None:
            raise UsageError(f"no variational family for the discrete latent '{name}': its number of trials "
                             f"is not a known constant")
        self.n = torch.as_tensor(n, dtype=self.dtype, device=self.device)

    def dist(self):
        return torch.distributions.Binomial(self.n, logits=self.param)

    def sample(self, S, theta=None):
        with torch.no_grad():
            probs = torch.sigmoid(self.param).expand((S,) + self.shape)
            u = self._rand((S,) + self.shape + (int(self.n.max()),))
            return (u < probs.unsqueeze(-1)).sum(-1).clamp(max=self.n).to(self.dtype)


@register_discrete
class PoissonQ(DiscreteQ):
    name = "poisson"
    def dist(self):
        return torch.distributions.Poisson(torch.exp(self.param))

    def sample(self, S, theta=None):
        with torch.no_grad():
            return torch.poisson(torch.exp(self.param).expand((S,) + self.shape), generator=self.gen)


BIG = 1e15          # an unbounded side, finite (an infinite bound would make NaN gradients)
GRID_MAX = 512      # values listed per element for the control variate (a wider q: none there)
MATCH_MIN_SD = 0.3  # a count q started at a point mass keeps this sd (a draw off it must stay possible)
GRID_SDS = 40       # ... covering the location +- this many scales (the logistic's tails: exp(-40))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurately on both sides of -log 2."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_sigmoid_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(b) - sigmoid(a)) for a < b, in whichever tail keeps the digits."""
    flip = a > 0
    a2, b2 = torch.where(flip, -b, a), torch.where(flip, -a, b)
    lb = torch.nn.functional.logsigmoid(b2)
    return lb + _log1mexp(torch.clamp(torch.nn.functional.logsigmoid(a2) - lb, max=-1e-300))


@register_discrete
class CountQ(DiscreteQ):
    """A count's q: a discretised logistic per element, P(k) proportional to
    F((k + 1/2 - m) / s) - F((k - 1/2 - m) / s) for k in lo..hi, F the logistic CDF, with a free
    location m and scale s (its variance is free, unlike a Poisson's), restricted to the element's
    bounds from the graph (`ppl.bounds`: n >= y for binomial trials): a value of zero probability is
    never drawn.  m and log s are whitened by the prior's mean and sd (from prior draws), so one
    step size serves counts of any size.  The location moves linearly with the continuous latents of
    the count's Markov blanket (whitened by their start; up to CONDITION_MAX coordinates): q(n | theta),
    so a count whose conditional follows a latent rate does not shrink the rate's sd (mean-field would)."""
    name = "count"
    CONDITION_MAX = 16

    def __init__(self, name, shape, size, program, gen, model, node):
        from ..bounds import bounds
        self.coords = _blanket_coordinates(model, program, name, self.CONDITION_MAX)
        super().__init__(name, shape, size, program, gen, model, node)
        b = bounds(model, name)
        t = lambda a: torch.as_tensor(np.broadcast_to(a, self.shape).copy(), dtype=self.dtype,  # noqa: E731
                                      device=self.device)
        self.lo = t(np.clip(b.lo, -BIG, BIG))
        self.hi = t(np.clip(b.hi, -BIG, BIG))
        with torch.no_grad():
            draws = program.simulate({}, 256, torch.Generator(device=self.device).manual_seed(0))[name]
            m = draws.mean(0)
            sd = draws.std(0).clamp(min=1.0)
        self.m0 = torch.minimum(torch.maximum(m, self.lo), self.hi)
        self.sd0 = sd
        self.log_s0 = torch.log(sd * math.sqrt(3.0) / math.pi)
        k = len(self.coords)
        self.c0 = torch.zeros(k, dtype=self.dtype, device=self.device)
        self.c_sd = torch.ones(k, dtype=self.dtype, device=self.device)

    def center(self, mu0, sd):
        if len(self.coords):
            self.c0 = mu0.detach()[self.coords].to(self.dtype)
            self.c_sd = sd.detach()[self.coords].to(self.dtype).clamp(min=1e-8)

    def _param_shape(self, size):
        return self.shape + (2 + len(self.coords),)

    def match(self, mean, sd):
        with torch.no_grad():
            m = torch.minimum(torch.maximum(mean.to(self.dtype), self.lo), self.hi)
            self.param[..., 0] = ((m - self.m0) / self.sd0).expand(self.shape)
            s = torch.clamp(sd.to(self.dtype), min=MATCH_MIN_SD) * math.sqrt(3.0) / math.pi
            self.param[..., 1] = (torch.log(s) - self.log_s0).expand(self.shape)

    def loc_scale(self, theta=None):
        loc = self.param[..., 0]
        if theta is not None and len(self.coords):
            u = (theta[:, self.coords] - self.c0) / self.c_sd                        # (S, k)
            u = u.reshape((u.shape[0],) + (1,) * len(self.shape) + (u.shape[1],))
            loc = loc + (u * self.param[..., 2:]).sum(-1)                           # (S, *shape)
        return self.m0 + self.sd0 * loc, torch.exp(self.log_s0 + self.param[..., 1])

    def _log_z(self, m, s):
        return log_sigmoid_diff((self.lo - 0.5 - m) / s, (self.hi + 0.5 - m) / s)

    def log_q(self, z, theta=None):
        m, s = self.loc_scale(theta)
        return log_sigmoid_diff((z - 0.5 - m) / s, (z + 0.5 - m) / s) - self._log_z(m, s)

    def sample(self, S, theta=None):
        """By the inverse CDF, within the element's bounds, in the tail (upper or lower) that keeps
        the digits."""
        with torch.no_grad():
            m, s = self.loc_scale(theta)
            a, b = (self.lo - 0.5 - m) / s, (self.hi + 0.5 - m) / s
            u = self._rand((S,) + self.shape)
            # lower side: x = m + s logit(F(a) + u (F(b) - F(a)));  upper: the same on -x
            fa, fb = torch.sigmoid(a), torch.sigmoid(b)
            lower = m + s * torch.logit(fa + u * (fb - fa), eps=1e-300)
            ga, gb = torch.sigmoid(-b), torch.sigmoid(-a)
            upper = m - s * torch.logit(ga + u * (gb - ga), eps=1e-300)
            x = torch.where(a > 0, upper, lower)
            return torch.minimum(torch.maximum(torch.floor(x + 0.5), self.lo), self.hi)

    def grid(self, theta=None):
        m, s = self.loc_scale(theta)
        md, sd = m.detach(), s.detach()
        G = int(min(GRID_MAX, max(16, math.ceil(2 * GRID_SDS * float(sd.max())) + 8)))
        lo, hi = self.lo, self.hi
        start = torch.maximum(torch.floor(md) - G // 2 + 1, lo)
        v = start.unsqueeze(0) + torch.arange(G, dtype=self.dtype, device=self.device).reshape(
            (-1,) + (1,) * start.dim())
        inside = v <= hi
        v = torch.minimum(v, hi)
        lq = log_sigmoid_diff((v - 0.5 - m) / s, (v + 0.5 - m) / s) - self._log_z(m, s)
        lq = torch.where(inside, lq, torch.full_like(lq, -math.inf))
        covered = torch.logsumexp(lq.detach(), 0) > -1e-6
        return v, lq, covered


def _blanket_coordinates(model: Model, program, name: str, most: int) -> torch.Tensor:
    """Coordinates of theta (the flat unconstrained vector) of the continuous latents in the Markov
    blanket of the discrete latent `name` (its parents and its factors' other parents, through
    deterministic nodes); none when there are more than `most`."""
    def latents_of(names, seen=None):
        seen = set() if seen is None else seen
        out = set()
        for n in names:
            if n in seen or n not in model.nodes:
                continue
            seen.add(n)
            node = model.nodes[n]
            if node.kind == "latent" and not node.discrete:
                out.add(n)
            elif node.kind == "deterministic":
                out |= latents_of(node.deps, seen)
        return out
    node = model.nodes[name]
    names = set(node.deps)
    from ..plan import factors_of
    for f in factors_of(model, name)[0]:
        names |= set(model.nodes[f].deps)
    blanket = latents_of(names - {name})
    idx = [i for b in program.blocks if b.name in blanket for i in range(b.offset, b.offset + b.size)]
    return torch.as_tensor(idx if len(idx) <= most else [], dtype=torch.long)


def discrete_families(model: Model, program, plan, gen) -> Dict[str, DiscreteQ]:
    out = {}
    for name in program.score:
        node = model.nodes[name]
        support = SUPPORTS[DS.REGISTRY[node.dist.spec].support]
        if support.q not in DISCRETE_QS:
            raise UsageError(f"no variational family for the discrete latent '{name}' (support {support.text})")
        out[name] = DISCRETE_QS[support.q](name, node.shape, plan[name].size, program, gen, model, node)
    return out
