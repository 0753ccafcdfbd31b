"""Variational families for discrete latents on the score path: checked IR +
estimator plan -> one independent q per element of each such latent.

Registry `DISCRETE_QS` (name -> class), named by the supports registry
(`ppl.supports.SUPPORTS[kind].q`): categorical (values 1..K), bernoulli,
binomial (n trials, a known constant), poisson (counts).  Each gives
`sample(S)`, `log_q(z)` and its parameter `param` (logits or a log rate).
"""
from __future__ import annotations

from typing import Dict

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

    def sample(self, S: int) -> torch.Tensor:
        raise NotImplementedError

    def log_q(self, z: torch.Tensor) -> torch.Tensor:
        return self.dist().log_prob(z)

    def _rand(self, shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen, dtype=self.dtype, device=self.device)


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

    def sample(self, S):
        with torch.no_grad():
            p = torch.softmax(self.param, -1).reshape(-1, self.param.shape[-1])
            z = torch.multinomial(p, S, replacement=True, generator=self.gen).T.reshape((S,) + self.shape) + 1
            return z.to(self.dtype)

    def log_q(self, z):
        return self.dist().log_prob(z.long() - 1)


@register_discrete
class BernoulliQ(DiscreteQ):
    name = "bernoulli"
    def dist(self):
        return torch.distributions.Bernoulli(logits=self.param)

    def sample(self, S):
        with torch.no_grad():
            probs = torch.sigmoid(self.param).expand((S,) + self.shape)
            return (self._rand(probs.shape) < probs).to(self.dtype)


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

    def sample(self, S):
        with torch.no_grad():
            probs = torch.sigmoid(self.param).expand((S,) + self.shape)
            u = self._rand((S,) + self.shape + (int(self.n.max()),))
            return (u < probs.unsqueeze(-1)).sum(-1).clamp(max=self.n).to(self.dtype)


@register_discrete
class PoissonQ(DiscreteQ):
    name = "poisson"
    def dist(self):
        return torch.distributions.Poisson(torch.exp(self.param))

    def sample(self, S):
        with torch.no_grad():
            return torch.poisson(torch.exp(self.param).expand((S,) + self.shape), generator=self.gen)


def discrete_families(model: Model, program, plan, gen) -> Dict[str, DiscreteQ]:
    out = {}
    for name in program.score:
        node = model.nodes[name]
        support = SUPPORTS[DS.REGISTRY[node.dist.spec].support]
        if support.q not in DISCRETE_QS:
            raise UsageError(f"no variational family for the discrete latent '{name}' (support {support.text})")
        out[name] = DISCRETE_QS[support.q](name, node.shape, plan[name].size, program, gen, model, node)
    return out
