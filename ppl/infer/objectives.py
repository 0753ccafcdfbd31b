"""Variational objectives: log importance weights log p(theta, y) - log q(theta)
over S draws -> the bound to maximise.

Registry `OBJECTIVES` (name -> class).  An objective is a class with
- `name`, `options` (the config options it takes, e.g. `("alpha",)`),
- `linear`: True when the objective is the mean of the log weights (the
  ELBO): it then splits into E_q[log p] + entropy, so a family's analytic
  entropy, the closed-form Gaussian gradient, the fixed-draw optimiser and
  score-function gradients all apply;
- `__call__(log_w) -> scalar tensor` (differentiable);
- `describe(K)`: what it is, for the fit's header ("iwae: importance-weighted
  bound, K = 16 draws per estimate");
- `estimate(log_w, K) -> (value, Monte Carlo error)`: its value at the fitted
  q from fresh draws' log weights (numpy), estimated as it was trained: from
  batches of K draws (K = the Monte Carlo samples per step).
A new objective is one class here (or anywhere) and one `register_objective`.

`log_evidence(log_w)`: the importance-sampling estimate of log p(y) from all
the draws (the IWAE bound with K = all of them), with its delta-method
Monte Carlo error; every bound here lies below it in expectation.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
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

    def describe(self, K: int) -> str:
        return self.name

    def estimate(self, log_w: np.ndarray, K: int) -> Tuple[float, float]:
        """The objective at q from draws' log weights, as trained: the mean over batches of K draws of
        the objective on each batch, and its Monte Carlo error (sd of the batch values / sqrt(batches))."""
        with torch.no_grad():
            vals = np.array([float(self(torch.as_tensor(b))) for b in _batches(log_w, K)])
        return _mean_se(vals)


def _batches(log_w: np.ndarray, K: int):
    lw = np.asarray(log_w, dtype=float)
    K = max(1, min(int(K), lw.size))
    n = lw.size // K
    return lw[: n * K].reshape(n, K)


def _mean_se(vals: np.ndarray) -> Tuple[float, float]:
    vals = vals[np.isfinite(vals)] if np.isfinite(vals).any() else vals
    if vals.size == 0:
        return float("nan"), float("nan")
    se = float(np.std(vals, ddof=1) / math.sqrt(vals.size)) if vals.size > 1 else float("nan")
    return float(np.mean(vals)), se


def log_evidence(log_w: np.ndarray) -> Tuple[float, float]:
    """log p(y) by importance sampling over all the draws: log mean w, and its Monte Carlo error by the
    delta method, sd(w) / (sqrt(n) mean(w)).  Trust it where PSIS k-hat < 0.7 (with larger k-hat the
    weights' variance is infinite or nearly so, and the error is understated)."""
    lw = np.asarray(log_w, dtype=float)
    lw = lw[np.isfinite(lw)]
    if lw.size < 2:
        return float("nan"), float("nan")
    m = lw.max()
    w = np.exp(lw - m)
    mean = w.mean()
    return float(m + math.log(mean)), float(w.std(ddof=1) / (math.sqrt(lw.size) * mean))


OBJECTIVES = Registry()
register_objective = OBJECTIVES.register


def logmeanexp(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, 0) - math.log(x.shape[0])


@register_objective
class ELBO(Objective):
    name, linear, label = "elbo", True, "ELBO"

    def __call__(self, log_w):
        return log_w.mean()

    def describe(self, K: int) -> str:
        return "elbo (evidence lower bound: E_q[log p(y, theta) - log q(theta)])"

    def estimate(self, log_w, K):
        lw = np.asarray(log_w, dtype=float)
        return _mean_se(lw)


@register_objective
class IWAE(Objective):
    """The importance-weighted bound of Burda et al. (2016) over the S draws of a step."""
    name, label = "iwae", "IWAE bound"

    def __call__(self, log_w):
        return logmeanexp(log_w)

    def describe(self, K: int) -> str:
        return f"iwae (importance-weighted bound, Burda et al. 2016: K = {K} draws per estimate)"


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

    def describe(self, K: int) -> str:
        return f"renyi (Renyi bound, Li & Turner 2016: alpha {self.alpha:g}, K = {K} draws per estimate)"


@register_objective
class VIMCO(Objective):
    """The multi-sample bound over the S draws of a step (as IWAE), with the gradient estimator of Mnih &
    Rezende (2016) for discrete latents on the score path: each draw's learning signal is the bound minus
    the bound with that draw's log weight replaced by the mean of the others' (`estimators.VIMCOGradient`)."""
    name, label = "vimco", "VIMCO bound"
    gradient = "vimco"            # the gradient estimator this objective asks for

    def __call__(self, log_w):
        return logmeanexp(log_w)
