"""Extension points: a new family, a new objective and a new gradient estimator, each added in
this file through its registry alone, fit a conjugate model and recover its exact posterior."""
from __future__ import annotations

import math

import pytest
import torch

import ppl
from ppl.errors import UsageError
from ppl.infer.estimators import GRADIENTS, GradientEstimator, Surrogate, register_gradient
from ppl.infer.families import FAMILIES, Family, register_family
from ppl.infer.objectives import OBJECTIVES, Objective, logmeanexp, register_objective

MODEL = """
data y: real[N]
mu ~ normal(0, 2)
y ~ normal(mu, 1)
"""
Y = [1.2, 0.4, 2.1, 1.7, 0.9, 1.5]


def exact():
    prec = 1 / 4 + len(Y)
    return sum(Y) / prec, math.sqrt(1 / prec)


@pytest.fixture
def registries():
    """Registry entries added by a test are removed after it."""
    saved = dict(FAMILIES), dict(OBJECTIVES), dict(GRADIENTS)
    yield
    for reg, old in zip((FAMILIES, OBJECTIVES, GRADIENTS), saved):
        reg.clear()
        reg.update(old)


def fit(**options):
    return ppl.loads(MODEL, "m.ppl").fit({"y": Y}, seed=3, draws=4000, **options)


def test_a_new_family(registries):
    @register_family
    class DiagonalStudentT(Family):
        """A diagonal Student-t (5 degrees of freedom): not Gaussian, so the engine must use the
        generic protocol (autograd through rsample_with_log_q)."""
        name = "student"

        def __init__(self, pre, generator, config=None):
            super().__init__(pre, generator, config)
            self._allocate({"m": self._zeros(self.dim), "log_s": self._zeros(self.dim)})

        def _dist(self):
            p = self._params
            return torch.distributions.StudentT(torch.tensor(5.0, dtype=self.dtype), p["m"], torch.exp(p["log_s"]))

        def rsample_u(self, S):
            return self._dist().rsample((S,))

        def log_q_u(self, u):
            return self._dist().log_prob(u).sum(-1)

    f = fit(method="student")
    assert f.method == "student" and f.optimizer == "adam"        # not closed form: no fixed draws
    m, sd = exact()
    s = f.summary()["mu"]
    assert abs(s["mean"] - m) < 0.1 * sd
    assert 0.8 < s["sd"] / sd < 1.25          # a t with 5 df can only roughly match a Gaussian's sd
    with pytest.raises(UsageError, match="applies to method="):
        fit(method="meanfield", rank=2)


def test_a_new_objective(registries):
    @register_objective
    class PairedIWAE(Objective):
        """The K=2 importance-weighted bound, averaged over S/2 pairs of draws."""
        name, label = "iwae2", "IWAE-2 bound"

        def __call__(self, log_w):
            return logmeanexp(log_w.reshape(-1, 2).T).mean()

    f = fit(method="meanfield", objective="iwae2", mc_samples=16, steps=2000)
    assert f.objective == "iwae2" and f.optimizer == "adam"
    m, sd = exact()
    s = f.summary()["mu"]
    assert abs(s["mean"] - m) < 0.1 * sd and abs(s["sd"] / sd - 1) < 0.15
    with pytest.raises(UsageError, match="needs method='meanfield' or fullrank or graph or mixture, objective='elbo'"):
        fit(objective="iwae2", optimizer="dadvi")


def test_a_new_gradient_estimator(registries):
    calls = []

    @register_gradient
    class StickingTheLanding(GradientEstimator):
        """Roeder et al. (2017): the pathwise gradient with the score term of log q dropped (q's
        parameters held fixed inside log q) — zero variance at the exact posterior."""
        name = "stl"

        @classmethod
        def applies(cls, vi):
            return vi.family.name == "meanfield" and vi.objective.linear and not vi.discrete

        def surrogate_loss(self, S, batch=None):
            fam = self.vi.family
            calls.append(S)
            theta = fam.rsample(S)
            raw = fam._raw                                     # q's parameters, without autograd
            u = fam.pre.to_u(theta)
            log_q = (-0.5 * ((u - raw["m"]) * torch.exp(-raw["log_s"])) ** 2 - raw["log_s"]).sum(-1) \
                - fam.pre.logdet - 0.5 * fam.dim * math.log(2 * math.pi)
            log_w = self.vi.program.evaluate(theta, batch=batch).total - log_q
            return Surrogate(-log_w.mean(), float(log_w.mean().detach()))

    f = fit(method="meanfield", gradient="stl", steps=600)
    assert calls and f.optimizer == "adam"
    m, sd = exact()
    s = f.summary()["mu"]
    assert abs(s["mean"] - m) < 0.1 * sd and abs(s["sd"] / sd - 1) < 0.1
    with pytest.raises(UsageError, match="does not apply"):
        fit(method="fullrank", gradient="stl")
    with pytest.raises(UsageError, match="unknown gradient 'nope' for gradient="):
        fit(gradient="nope")
