"""Continuous relaxations of discrete distributions (Gumbel-softmax / concrete:
Jang et al. 2017, Maddison et al. 2017): logits + temperature + uniform noise
-> a reparameterised relaxed draw, its density, and the exact discrete draw
it rounds to.

Stage: used by the compiled model (`ppl.backend.log_joint`: the density of a
latent at a relaxed value, `x[z]` at a relaxed one-hot) and by the relaxed
gradient estimator (`ppl.infer.relaxed`: q's relaxed draws).

Registry `RELAXATIONS` (name -> class), named by the supports registry
(`ppl.supports.Support.relaxation`):
- `concrete` (categorical, values 1..K): x = log_softmax((l + g) / T), g iid
  Gumbel(0, 1) per category: the ExpConcrete variable (the concrete one in
  log space, Maddison et al. 2017 appendix C: its density is stable at small
  T, and a KL between two of them equals the KL between the concrete
  variables, the Jacobian of exp cancelling).  The model reads the relaxed
  one-hot w = exp(x): `mu[z]` is then w @ mu (`ppl.expr`, soft index).
  log density: lgamma(K) + (K - 1) log T + sum_k (l_k - T x_k)
  - K logsumexp_k (l_k - T x_k).  It rounds to argmax_k (l_k + g_k) + 1, an
  exact draw of Categorical(softmax l) (the Gumbel-max trick).
- `binary-concrete` (bernoulli, values 0/1): y = (l + log u - log(1 - u)) / T
  (logit space); the model reads sigmoid(y); log density
  log T + (l - T y) - 2 softplus(l - T y); it rounds to y > 0, an exact
  Bernoulli(sigmoid l) draw.
Both densities are of the relaxed variable in its own (log / logit) space.

z's own terms, two ways (`RelaxedDraw.q_logits`):
- exact (the default, q_logits given): the prior's term is E_q[log p(z)]
  = sum_k q_k log p_k and q's is E_q[log q(z)], both summed over z's values in
  closed form (`cross_entropy`), so only the factors that use z see the
  relaxation and the objective tends to the discrete ELBO as T -> 0 (the
  KL term of Jang et al.'s categorical VAE);
- concrete (q_logits None): log p_T(x) - log q_T(x) at the relaxed draw
  (Maddison et al.'s relaxed ELBO).  Its KL does not tend to the discrete
  one as T -> 0 (a q peaked at a category pays ~ the log-odds of the others):
  on a 3-component mixture it pulled q far from the exact conditionals
  (ELBO -900 against the enumerated -703), so it is not the default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as Fnn

from ..registry import Registry


@dataclass
class RelaxedDraw:
    """S relaxed draws of one latent: what the compiled model reads in place of its values."""
    relaxation: "Relaxation"
    x: torch.Tensor                  # the draw in the relaxation's own space ((S, *shape, K) or (S, *shape))
    T: float                         # its temperature
    value: torch.Tensor              # the latent's relaxed value (S, *shape), as arithmetic sees it
    weights: Optional[torch.Tensor]  # relaxed one-hot (S, *shape, K), as an index sees it (None: no index)
    hard: torch.Tensor               # the exact discrete draw it rounds to (S, *shape), no gradient
    q_logits: Optional[torch.Tensor] = None   # q's logits: z's own terms exact (None: concrete densities)

    @property
    def shape(self):
        return self.hard.shape


class Relaxation:
    name = "relaxation"
    categories = True                # logits carry a trailing category axis

    @staticmethod
    def logits_of(dist) -> torch.Tensor:
        """The logits of the latent's (torch) distribution given its parents."""
        return dist.logits

    @classmethod
    def noise(cls, logits_shape, S: int, gen: torch.Generator, dtype, device) -> torch.Tensor:
        """Uniform(0, 1) noise for S draws, clamped off 0 and 1."""
        u = torch.rand((S,) + tuple(logits_shape), generator=gen, dtype=dtype, device=device)
        tiny = torch.finfo(dtype).tiny
        return u.clamp(tiny, 1.0 - torch.finfo(dtype).eps)

    @classmethod
    def draw(cls, logits: torch.Tensor, u: torch.Tensor, T: float) -> RelaxedDraw:
        raise NotImplementedError

    @staticmethod
    def log_density(logits: torch.Tensor, x: torch.Tensor, T: float) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def cross_entropy(q_logits: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
        """E_q[log p(z)] per element, summed over z's values (q = p: minus q's entropy)."""
        raise NotImplementedError


RELAXATIONS = Registry()
register_relaxation = RELAXATIONS.register


@register_relaxation
class Concrete(Relaxation):
    name = "concrete"

    @classmethod
    def draw(cls, logits, u, T):
        g = -torch.log(-torch.log(u))
        x = torch.log_softmax((logits + g) / T, -1)
        w = torch.exp(x)
        K = logits.shape[-1]
        k = torch.arange(1, K + 1, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            hard = (torch.argmax(logits + g, -1) + 1).to(w.dtype)
        return RelaxedDraw(cls, x, T, (w * k).sum(-1), w, hard)

    @staticmethod
    def cross_entropy(q_logits, p_logits):
        return (torch.softmax(q_logits, -1) * torch.log_softmax(p_logits, -1)).sum(-1)

    @staticmethod
    def log_density(logits, x, T):
        K = x.shape[-1]
        a = logits - T * x
        return math.lgamma(K) + (K - 1) * math.log(T) + a.sum(-1) - K * torch.logsumexp(a, -1)


@register_relaxation
class BinaryConcrete(Relaxation):
    name = "binary-concrete"
    categories = False

    @classmethod
    def draw(cls, logits, u, T):
        y = (logits + torch.log(u) - torch.log1p(-u)) / T
        with torch.no_grad():
            hard = (y > 0).to(y.dtype)
        return RelaxedDraw(cls, y, T, torch.sigmoid(y), None, hard)

    @staticmethod
    def cross_entropy(q_logits, p_logits):
        return torch.sigmoid(q_logits) * Fnn.logsigmoid(p_logits) + torch.sigmoid(-q_logits) * Fnn.logsigmoid(-p_logits)

    @staticmethod
    def log_density(logits, x, T):
        d = logits - T * x
        return math.log(T) + d - 2.0 * Fnn.softplus(d)
