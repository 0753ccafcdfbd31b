"""Registry of distributions (torch-free: the checker and `ppl graph` use it
without importing torch).

One `DistSpec` per distribution, in Stan's names and parameterisations:
parameter names and their constraints, the support, whether it is discrete,
how its value shape follows from its parameters' shapes, and `build`, the
torch constructor (and optionally `lpdf`, a fused log density: a fast path).  `build` receives the namespace `ppl.backend.dists`
(torch.distributions plus the few distributions written here), so this module
never imports torch.  Adding a distribution is one entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

from .functions import Shape, ShapeError, fmt

# parameter constraints, checked on known (data/constant) arguments
PARAM_CHECKS: Dict[str, Tuple[str, Callable]] = {
    "real": ("finite", lambda v: (v == v) & (abs(v) != float("inf"))),
    "positive": ("positive", lambda v: v > 0),
    "nonneg": ("non-negative", lambda v: v >= 0),
    "unit": ("in [0, 1]", lambda v: (v >= 0) & (v <= 1)),
    "nonneg_int": ("a non-negative integer", lambda v: (v >= 0) & (v == v.round())),
    "simplex": ("a simplex (non-negative, summing to 1)", None),
    "matrix": ("a matrix", None),
}


@dataclass(frozen=True)
class DistSpec:
    name: str
    params: Tuple[Tuple[str, str], ...]          # (name, constraint kind)
    support: str                                 # real positive unit_interval simplex corr_cholesky
                                                 # interval boolean nonneg_int categorical binomial
    build: Callable                              # (D, *args) -> torch Distribution
    discrete: bool = False
    param_event_ranks: Tuple[int, ...] = ()      # per parameter; default all 0
    event_rank: int = 0                          # rank of one draw (0 scalar, 1 vector, 2 matrix)
    event_shape: Optional[Callable] = None       # (param shapes) -> event shape; None: from the declaration
    lpdf: Optional[Callable] = None              # D -> fused elementwise log density (value, *args); optional
    lpdf_sum: Optional[Callable] = None          # D -> the same summed per sample, (value, *args) -> (S,); optional
    scale: Optional[int] = None                  # a location-scale family: the index of its scale parameter

    @property
    def arity(self) -> int:
        return len(self.params)

    def value_shape(self, param_shapes: Sequence[Shape], broadcast) -> Tuple[Shape, Optional[Shape]]:
        """-> (batch shape, event shape or None when the declaration must give it)."""
        ranks = self.param_event_ranks or (0,) * self.arity
        batch: Shape = ()
        for (pname, _), shp, r in zip(self.params, param_shapes, ranks):
            if len(shp) < r:
                raise ShapeError(f"{self.name}'s {pname} must have at least {r} dimension{'s' if r > 1 else ''}, got {fmt(shp)}")
            batch = broadcast(batch, tuple(shp[: len(shp) - r]))
        event = self.event_shape(param_shapes) if self.event_shape else (() if self.event_rank == 0 else None)
        return batch, event


def _last(i: int):
    return lambda shapes: tuple(shapes[i][-1:])


def _mvn_event(shapes):
    mu, sig = shapes
    if len(sig) >= 2 and isinstance(sig[-1], int) and isinstance(sig[-2], int) and sig[-1] != sig[-2]:
        raise ShapeError(f"the covariance must be square, got {fmt(sig)}")
    if mu and sig and isinstance(mu[-1], int) and isinstance(sig[-1], int) and mu[-1] != sig[-1]:
        raise ShapeError(f"mean has length {mu[-1]} but the covariance is {fmt(sig)}")
    return tuple(mu[-1:])


_C = [
    # ---- continuous -----------------------------------------------------
    DistSpec("normal", (("mu", "real"), ("sigma", "positive")), "real", lambda D, m, s: D.Normal(m, s),
             lpdf=lambda D: D.normal_lpdf, lpdf_sum=lambda D: D.normal_lpdf_sum, scale=1),
    DistSpec("student_t", (("nu", "positive"), ("mu", "real"), ("sigma", "positive")), "real",
             lambda D, nu, m, s: D.StudentT(nu, m, s), lpdf=lambda D: D.student_t_lpdf, scale=2),
    DistSpec("cauchy", (("mu", "real"), ("sigma", "positive")), "real", lambda D, m, s: D.Cauchy(m, s),
             lpdf=lambda D: D.cauchy_lpdf, scale=1),
    DistSpec("half_normal", (("sigma", "positive"),), "positive", lambda D, s: D.HalfNormal(s),
             lpdf=lambda D: D.half_normal_lpdf),
    DistSpec("half_cauchy", (("sigma", "positive"),), "positive", lambda D, s: D.HalfCauchy(s),
             lpdf=lambda D: D.half_cauchy_lpdf),
    DistSpec("half_student_t", (("nu", "positive"), ("sigma", "positive")), "positive",
             lambda D, nu, s: D.HalfStudentT(nu, s)),
    DistSpec("exponential", (("rate", "positive"),), "positive", lambda D, r: D.Exponential(r),
             lpdf=lambda D: D.exponential_lpdf),
    DistSpec("gamma", (("alpha", "positive"), ("beta", "positive")), "positive", lambda D, a, b: D.Gamma(a, b),
             lpdf=lambda D: D.gamma_lpdf),
    DistSpec("inv_gamma", (("alpha", "positive"), ("beta", "positive")), "positive",
             lambda D, a, b: D.InverseGamma(a, b)),
    DistSpec("lognormal", (("mu", "real"), ("sigma", "positive")), "positive", lambda D, m, s: D.LogNormal(m, s),
             lpdf=lambda D: D.lognormal_lpdf),
    DistSpec("beta", (("a", "positive"), ("b", "positive")), "unit_interval", lambda D, a, b: D.Beta(a, b)),
    DistSpec("uniform", (("lo", "real"), ("hi", "real")), "interval", lambda D, lo, hi: D.Uniform(lo, hi)),
    DistSpec("laplace", (("mu", "real"), ("b", "positive")), "real", lambda D, m, b: D.Laplace(m, b), scale=1),
    DistSpec("logistic", (("mu", "real"), ("s", "positive")), "real", lambda D, m, s: D.Logistic(m, s), scale=1),
    DistSpec("weibull", (("k", "positive"), ("lambda", "positive")), "positive",
             lambda D, k, lam: D.Weibull(lam, k)),
    DistSpec("dirichlet", (("alpha", "positive"),), "simplex", lambda D, a: D.Dirichlet(a),
             param_event_ranks=(1,), event_rank=1, event_shape=_last(0)),
    DistSpec("multi_normal", (("mu", "real"), ("Sigma", "matrix")), "real",
             lambda D, m, S: D.MultivariateNormal(m, covariance_matrix=S),
             param_event_ranks=(1, 2), event_rank=1, event_shape=_mvn_event),
    DistSpec("multi_normal_cholesky", (("mu", "real"), ("L", "matrix")), "real",
             lambda D, m, L: D.MultivariateNormal(m, scale_tril=L),
             param_event_ranks=(1, 2), event_rank=1, event_shape=_mvn_event),
    DistSpec("lkj_corr_cholesky", (("eta", "positive"),), "corr_cholesky",
             lambda D, eta, *, event: D.LKJCholesky(event[-1], eta), event_rank=2),
    # ---- discrete -----------------------------------------------------
    DistSpec("bernoulli", (("p", "unit"),), "boolean", lambda D, p: D.Bernoulli(probs=p), discrete=True),
    DistSpec("bernoulli_logit", (("a", "real"),), "boolean", lambda D, a: D.Bernoulli(logits=a), discrete=True,
             lpdf=lambda D: D.bernoulli_logit_lpmf),
    DistSpec("binomial", (("n", "nonneg_int"), ("p", "unit")), "binomial",
             lambda D, n, p: D.Binomial(n, probs=p), discrete=True, lpdf=lambda D: D.binomial_lpmf),
    DistSpec("binomial_logit", (("n", "nonneg_int"), ("a", "real")), "binomial",
             lambda D, n, a: D.Binomial(n, logits=a), discrete=True, lpdf=lambda D: D.binomial_logit_lpmf),
    DistSpec("poisson", (("lambda", "positive"),), "nonneg_int", lambda D, lam: D.Poisson(lam), discrete=True,
             lpdf=lambda D: D.poisson_lpmf),
    DistSpec("poisson_log", (("a", "real"),), "nonneg_int", lambda D, a: D.PoissonLog(a), discrete=True,
             lpdf=lambda D: D.poisson_log_lpmf, lpdf_sum=lambda D: D.poisson_log_lpmf_sum),
    DistSpec("neg_binomial_2", (("mu", "positive"), ("phi", "positive")), "nonneg_int",
             lambda D, mu, phi: D.NegBinomial2(mu, phi), discrete=True),
    DistSpec("categorical", (("p", "simplex"),), "categorical", lambda D, p: D.Categorical1(probs=p),
             discrete=True, param_event_ranks=(1,)),
    DistSpec("categorical_logit", (("a", "real"),), "categorical", lambda D, a: D.Categorical1(logits=a),
             discrete=True, param_event_ranks=(1,)),
]

REGISTRY: Dict[str, DistSpec] = {d.name: d for d in _C}

# A link function applied to a parameter, folded into the distribution that takes the linear predictor:
# (distribution, parameter index, function) -> distribution.  The same density, evaluated without the
# round trip (log(exp(a)) = a): fewer tensor ops per step, and no overflow for large a.
LINK_FOLDS: Dict[Tuple[str, int, str], str] = {
    ("poisson", 0, "exp"): "poisson_log",
    ("bernoulli", 0, "inv_logit"): "bernoulli_logit",
    ("binomial", 1, "inv_logit"): "binomial_logit",
    ("bernoulli", 0, "sigmoid"): "bernoulli_logit",
    ("binomial", 1, "sigmoid"): "binomial_logit",
}


def fold_link(spec: str, args: tuple) -> Tuple[str, tuple]:
    """`poisson(exp(e))` -> ("poisson_log", (e,)); anything else unchanged."""
    for i, a in enumerate(args):
        target = LINK_FOLDS.get((spec, i, getattr(a, "func", None)))
        if target is not None and len(a.args) == 1:
            return target, args[:i] + (a.args[0],) + args[i + 1:]
    return spec, args
