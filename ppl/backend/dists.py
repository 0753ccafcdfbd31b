"""Distribution namespace handed to `DistSpec.build`: torch.distributions plus
the few distributions torch lacks (or parameterises differently from Stan).

A model's distributions need `log_prob` (scoring) and `sample` (forward
simulation: prior and posterior predictive draws).
"""
from __future__ import annotations

import math

import torch
from torch.distributions import (Bernoulli, Beta, Binomial, Cauchy, Dirichlet, Exponential, Gamma,  # noqa: F401
                                 HalfCauchy, HalfNormal, InverseGamma, Laplace, LKJCholesky, LogNormal,
                                 MultivariateNormal, Normal, Poisson, StudentT, Uniform, Weibull, constraints)
from torch.distributions import Distribution

from .transforms import sum_event

Distribution.set_default_validate_args(False)   # data are checked at load; latents live in the support


class _LogProbOnly(Distribution):
    arg_constraints = {}

    def __init__(self, batch_shape):
        super().__init__(batch_shape=batch_shape, validate_args=False)


class HalfStudentT(_LogProbOnly):
    support = constraints.positive

    def __init__(self, nu, sigma):
        self.nu, self.sigma = torch.broadcast_tensors(torch.as_tensor(nu), torch.as_tensor(sigma))
        super().__init__(self.nu.shape)

    def log_prob(self, x):
        return math.log(2.0) + StudentT(self.nu, torch.zeros_like(self.sigma), self.sigma).log_prob(x)

    def sample(self, sample_shape=torch.Size()):
        return StudentT(self.nu, torch.zeros_like(self.sigma), self.sigma).sample(sample_shape).abs()


class Logistic(_LogProbOnly):
    support = constraints.real

    def __init__(self, mu, s):
        self.mu, self.s = torch.broadcast_tensors(torch.as_tensor(mu), torch.as_tensor(s))
        super().__init__(self.mu.shape)

    def log_prob(self, x):
        z = (x - self.mu) / self.s
        return -z - 2.0 * torch.nn.functional.softplus(-z) - torch.log(self.s)

    def sample(self, sample_shape=torch.Size()):
        u = torch.rand(torch.Size(sample_shape) + self.mu.shape, dtype=self.mu.dtype, device=self.mu.device)
        u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
        return self.mu + self.s * (torch.log(u) - torch.log1p(-u))


class PoissonLog(_LogProbOnly):
    """Poisson with log-rate `a` (Stan's poisson_log), stable for large |a|."""
    support = constraints.nonnegative_integer

    def __init__(self, a):
        self.a = torch.as_tensor(a)
        super().__init__(self.a.shape)

    def log_prob(self, k):
        return k * self.a - torch.exp(self.a) - torch.lgamma(k + 1.0)

    def sample(self, sample_shape=torch.Size()):
        return torch.poisson(torch.exp(self.a).expand(torch.Size(sample_shape) + self.a.shape))


class NegBinomial2(_LogProbOnly):
    """Stan's neg_binomial_2(mu, phi): mean mu, variance mu + mu^2 / phi."""
    support = constraints.nonnegative_integer

    def __init__(self, mu, phi):
        self.mu, self.phi = torch.broadcast_tensors(torch.as_tensor(mu), torch.as_tensor(phi))
        super().__init__(self.mu.shape)

    def log_prob(self, k):
        mu, phi = self.mu, self.phi
        log_mp = torch.log(mu + phi)
        return (torch.lgamma(k + phi) - torch.lgamma(k + 1.0) - torch.lgamma(phi)
                + phi * (torch.log(phi) - log_mp) + k * (torch.log(mu) - log_mp))

    def sample(self, sample_shape=torch.Size()):
        """A gamma-Poisson mixture: rate ~ gamma(phi, phi / mu)."""
        rate = Gamma(self.phi, self.phi / self.mu).sample(sample_shape)
        return torch.poisson(rate)


class Categorical1(_LogProbOnly):
    """Categorical over 1..K (Stan's numbering), from probabilities or logits."""
    support = constraints.positive_integer

    def __init__(self, probs=None, logits=None):
        if probs is not None:
            self.logits = torch.log(probs) - torch.log(probs.sum(-1, keepdim=True))
        else:
            self.logits = logits - torch.logsumexp(logits, -1, keepdim=True)
        super().__init__(self.logits.shape[:-1])

    def log_prob(self, value):
        idx = (value.long() - 1).unsqueeze(-1)
        idx, logp = torch.broadcast_tensors(idx, self.logits)
        return logp.gather(-1, idx[..., :1]).squeeze(-1)

    def sample(self, sample_shape=torch.Size()):
        from torch.distributions import Categorical
        return (Categorical(logits=self.logits).sample(sample_shape) + 1).to(self.logits.dtype)


# ---- fused elementwise log densities (fast paths named by DistSpec.lpdf) ----------------
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_PI = math.log(math.pi)
_LOG2 = math.log(2.0)


def _log(v):
    """log of a tensor, or of a Python float (constant parameters arrive as floats)."""
    return torch.log(v) if torch.is_tensor(v) else math.log(v)


def _lgamma(v):
    return torch.lgamma(v) if torch.is_tensor(v) else math.lgamma(v)


_CONSTS: dict = {}


def _c(v: float) -> torch.Tensor:
    """A 0-dim float64 constant, made once: the `input` of a fused addcmul."""
    t = _CONSTS.get(v)
    if t is None:
        t = _CONSTS[v] = torch.tensor(v, dtype=torch.float64)
    return t


def _centre(x, mu):
    return x if isinstance(mu, float) and mu == 0.0 else x - mu


# With a constant (Python float) scale these take one or two tensor ops instead of five or six:
# -0.5 ((x - mu) / sigma)^2 - log(sigma) - c  ==  addcmul(-log(sigma) - c, d, d, -0.5 / sigma^2).
def normal_lpdf(x, mu, sigma):
    return _normal_centred(_centre(x, mu), sigma)


def _normal_centred(d, sigma):
    if isinstance(sigma, float):
        return torch.addcmul(_c(-math.log(sigma) - _HALF_LOG_2PI), d, d, value=-0.5 / (sigma * sigma))
    z = d / sigma
    return torch.addcmul(-_HALF_LOG_2PI - torch.log(sigma), z, z, value=-0.5)


def normal_lpdf_sum(x, mu, sigma):
    """normal_lpdf summed over every dimension but the sample one.  With one scale per sample (a
    latent sigma) the division moves after the sum: two passes over the data instead of four, both
    ways; otherwise the elementwise form is one fused pass already."""
    d = _centre(x, mu)
    if d.dim() < 2 or not torch.is_tensor(sigma) or sigma[0].numel() != 1:
        return sum_event(_normal_centred(d, sigma))
    ss = (d * d).reshape(d.shape[0], -1).sum(-1)
    s = sigma.reshape(sigma.shape[0])
    return ss.div(s * s).mul_(-0.5) - d[0].numel() * (torch.log(s) + _HALF_LOG_2PI)


def half_normal_lpdf(x, sigma):
    if isinstance(sigma, float):
        return torch.addcmul(_c(_LOG2 - math.log(sigma) - _HALF_LOG_2PI), x, x, value=-0.5 / (sigma * sigma))
    z = x / sigma
    return torch.addcmul((_LOG2 - _HALF_LOG_2PI) - torch.log(sigma), z, z, value=-0.5)


def _cauchy(d, sigma, c):
    if isinstance(sigma, float):
        return (c - math.log(sigma)) - torch.log(torch.addcmul(_c(1.0), d, d, value=1.0 / (sigma * sigma)))
    z = d / sigma
    return (c - torch.log(sigma)) - torch.log1p(z * z)


def cauchy_lpdf(x, mu, sigma):
    return _cauchy(_centre(x, mu), sigma, -_LOG_PI)


def half_cauchy_lpdf(x, sigma):
    return _cauchy(x, sigma, _LOG2 - _LOG_PI)


def exponential_lpdf(x, rate):
    return _log(rate) - rate * x


def lognormal_lpdf(x, mu, sigma):
    lx = torch.log(x)
    z = (lx - mu) / sigma
    return -0.5 * z * z - _log(sigma) - _HALF_LOG_2PI - lx


def student_t_lpdf(x, nu, mu, sigma):
    z = (x - mu) / sigma
    half = 0.5 * (nu + 1.0)
    return (_lgamma(half) - _lgamma(0.5 * nu) - 0.5 * _log(nu) - 0.5 * _LOG_PI
            - _log(sigma) - half * torch.log1p(z * z / nu))


def gamma_lpdf(x, alpha, beta):
    return alpha * _log(beta) - _lgamma(alpha) + (alpha - 1.0) * torch.log(x) - beta * x


def _softplus(v):
    return torch.nn.functional.softplus(v) if torch.is_tensor(v) else max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _exp(v):
    return torch.exp(v) if torch.is_tensor(v) else math.exp(v)


def bernoulli_logit_lpmf(y, a):
    # y*a - log(1 + exp(a)), stable
    return y * a - _softplus(a)


def poisson_log_lpmf(k, a):
    return k * a - _exp(a) - torch.lgamma(k + 1.0)


def poisson_log_lpmf_sum(k, a):
    # the counts' log k! summed apart: with data counts it is N values, not S x N
    return sum_event(k * a - _exp(a)) - sum_event(torch.lgamma(k + 1.0))


def _log_choose(n, k):
    """log C(n, k) and where k > n (probability zero: -inf there, never NaN)."""
    m = n - k
    out = _lgamma(n + 1.0) - torch.lgamma(k + 1.0) - torch.lgamma(torch.clamp(m, min=0.0) + 1.0)
    return out, m < 0


def binomial_lpmf(k, n, p):
    lc, beyond = _log_choose(n, k)
    pt = p if torch.is_tensor(p) else torch.as_tensor(p, dtype=k.dtype, device=k.device)
    out = lc + torch.xlogy(k, pt) + torch.xlogy(torch.clamp(n - k, min=0.0), 1.0 - pt)
    return torch.where(beyond, torch.full_like(out, -math.inf), out)


def binomial_logit_lpmf(k, n, a):
    lc, beyond = _log_choose(n, k)
    out = lc + k * a - n * _softplus(a)
    return torch.where(beyond, torch.full_like(out, -math.inf), out)


def poisson_lpmf(k, lam):
    k_log_lam = torch.xlogy(k, lam) if torch.is_tensor(lam) else k * math.log(lam)
    return k_log_lam - lam - torch.lgamma(k + 1.0)
