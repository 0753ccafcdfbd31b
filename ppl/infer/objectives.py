"""Variational objectives: log importance weights log p(theta, y) - log q(theta)
over S draws -> the bound to maximise.

Registry `OBJECTIVES` (name -> class).  An objective is a class with
- `name`, `options` (the config options it takes, e.g. `("alpha",)`),
- `linear`: True when the objective is the mean of the log weights (the
  ELBO): it then splits into E_q[log p] + entropy, so a family's analytic
  entropy, the closed-form Gaussian gradient, the fixed-draw optimiser and
  score-function gradients all apply;
- `__call__(log_w) -> scalar tensor` (differentiable).
A new objective is one class here (or anywhere) and one `register_objective`.
"""
from __future__ import annotations

import math

import torch

from ..registry import Registry


class Objective:
    name = "objective"
    options: tuple = ()
    linear = False
    label = ""            # what its value is, for the header ("ELBO", "IWAE bound", ...)

    def __init__(self, config):
        self.config = config

    def __call__(self, log_w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


OBJECTIVES = Registry()
register_objective = OBJECTIVES.register


def logmeanexp(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, 0) - math.log(x.shape[0])


@register_objective
class ELBO(Objective):
    name, linear, label = "elbo", True, "ELBO"

    def __call__(self, log_w):
        return log_w.mean()


@register_objective
class IWAE(Objective):
    """The importance-weighted bound of Burda et al. (2016) over the S draws of a step."""
    name, label = "iwae", "IWAE bound"

    def __call__(self, log_w):
        return logmeanexp(log_w)


@register_objective
class Renyi(Objective):
    """The Rényi alpha bound of Li & Turner (2016); alpha -> 1 is the ELBO."""
    name, options, label = "renyi", ("alpha",), "Renyi bound"
    DEFAULT_ALPHA = 0.5

    def __init__(self, config):
        super().__init__(config)
        self.alpha = self.DEFAULT_ALPHA if config.alpha is None else config.alpha

    def __call__(self, log_w):
        if abs(1 - self.alpha) < 1e-9:
            return log_w.mean()
        return logmeanexp((1 - self.alpha) * log_w) / (1 - self.alpha)


@register_objective
class VIMCO(Objective):
    """The multi-sample bound over the S draws of a step (as IWAE), with the gradient estimator of Mnih &
    Rezende (2016) for discrete latents on the score path: each draw's learning signal is the bound minus
    the bound with that draw's log weight replaced by the mean of the others' (`estimators.VIMCOGradient`)."""
    name, label = "vimco", "VIMCO bound"
    gradient = "vimco"            # the gradient estimator this objective asks for

    def __call__(self, log_w):
        return logmeanexp(log_w)
