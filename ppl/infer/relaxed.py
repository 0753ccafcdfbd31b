"""The relaxed gradient estimator for discrete latents (Gumbel-softmax /
concrete: Jang et al. 2017, Maddison et al. 2017): (the VI problem, with its
discrete latents planned `relaxed`) -> reparameterised gradients of the
relaxed objective, and the value of the discrete model's ELBO.

Registered in `GRADIENTS` as `relaxed` (it serves the plan's `relaxed`
latents; the continuous block is reparameterised as on the pathwise path).
q(z) stays the categorical (bernoulli) q of `ppl.infer.discrete` with its
logits l: each step draws z relaxed, x = log_softmax((l + g) / T) (the
relaxations: `ppl.backend.relax`), the factors that use z are evaluated at
the relaxed one-hot (`mu[z]` = w @ mu), and z's own terms, E_q[log p(z)] and
E_q[log q(z)], are summed over its values in closed form, so the step ascends
E[log p(data | relaxed z)] + E_q[log p(z)] - E_q[log q(z)] + (the continuous
part), which tends to the discrete ELBO as T -> 0 (the KL of Jang et al.'s
categorical VAE; not the straight-through variant).  `Z_TERMS = "concrete"`
uses Maddison et al.'s concrete densities at the relaxed draw instead; on a
3-component mixture that relaxed KL pulled q far from the exact conditionals
(see ppl.backend.relax).  The fitted q is the categorical with the learned
logits: draws, summaries and PSIS use it unrelaxed.  The ELBO only: a
multi-sample bound needs a log weight per draw, which the exact z-terms are
not, and with the concrete ones IWAE's fit of a two-component mixture put a
mean 3 sds off (2.34 against 3.09).

Temperature: T_t = T0 (T_END / T0)^min(1, t / H), exponential from 1 to T_END
over H = ANNEAL_STEPS steps (half of `steps` when fewer are given); the fit
tests convergence only after 2H steps (`min_steps`), so the iterate average
(over the run's second half) is over steps at T_END.

Value: each step also evaluates the model at the discrete draws the relaxed
ones round to (argmax of l + g: exact draws of q, the Gumbel-max trick), so
the trace, the convergence test and the reported ELBO are the discrete
model's ELBO under q, not the relaxed objective.

Automatic choice (`--estimator auto`, `choose`): where the plan leaves
categorical or bernoulli latents on the score path (they cannot be summed
out) and every one of them can be relaxed (`ppl.plan.relax_refusal`), the
gradient of q's logits is measured at the start, REPS times with each
estimator at the fit's Monte Carlo samples: when the score path's total
variance exceeds AUTO_RATIO times the relaxed estimator's (at T0), the fit
takes `relaxed`.  The header says which and by how much.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from .estimators import GradientEstimator, Surrogate, register_gradient

T0 = 1.0                 # the temperature at the start
T_END = 0.1              # ... and after the annealing
ANNEAL_STEPS = 500
ANNEAL_FRACTION = 0.5    # of `steps`, when fewer than ANNEAL_STEPS / ANNEAL_FRACTION are given
Z_TERMS = "exact"        # z's prior and q terms: "exact" (summed over its values) or "concrete" (ppl.backend.relax)
AUTO_RATIO = 10.0        # auto: relaxed when the score path's gradient variance is this many times the relaxed's
REPS = 16                # gradients per estimator for that measurement ...
WARM = 4                 # ... after this many unrecorded ones (the score path's control variate learns)


@register_gradient
class Relaxed(GradientEstimator):
    """Gumbel-softmax / concrete gradients for the discrete latents, pathwise for the continuous block."""
    name = "relaxed"
    serves = "relaxed"
    # the logits' step size against the continuous block's (the score path's 4 is for its small, noisy
    # gradients; on a 3-component mixture 2 left q's responsibilities within 0.06 of the exact, 4 within 0.1)
    discrete_lr_scale = 2.0

    def __init__(self, vi):
        super().__init__(vi)
        self.t = 0
        steps = getattr(vi.config, "steps", None)
        self.horizon = ANNEAL_STEPS if steps is None else max(1, min(ANNEAL_STEPS, int(ANNEAL_FRACTION * steps)))
        # no convergence test while the temperature falls, and the iterate average (over the second half
        # of the run) only over steps at T_END
        self.min_steps = 2 * self.horizon

    @classmethod
    def applies(cls, vi) -> bool:
        return bool(vi.discrete) and vi.objective.linear and all(vi.plan[n].estimator == "relaxed" and n in vi.program.relaxed
                                         for n in vi.discrete)

    def temperature(self, t: Optional[int] = None) -> float:
        t = self.t if t is None else t
        return T0 * (T_END / T0) ** min(1.0, t / self.horizon)

    def noise(self, S: int) -> Dict[str, torch.Tensor]:
        prog = self.vi.program
        return {n: prog.relaxed[n][0].noise(q.param.shape, S, q.gen, prog.dtype, prog.device)
                for n, q in self.vi.discrete.items()}

    def surrogate_loss(self, S: int, batch=None) -> Surrogate:
        T = self.temperature()
        self.t += 1
        return self.surrogate_at(T, self.noise(S), batch=batch)

    def relaxed_draws(self, T: float, noise: Dict[str, torch.Tensor]):
        """-> (relaxed draws by name, sum of q's relaxed log densities per sample)."""
        prog = self.vi.program
        draws, lq = {}, 0.0
        for n, q in self.vi.discrete.items():
            relaxation = prog.relaxed[n][0]
            d = relaxation.draw(q.param, noise[n], T)
            draws[n] = d
            S = d.x.shape[0]
            if Z_TERMS == "exact":
                d.q_logits = q.param
                lq = lq + relaxation.cross_entropy(q.param, q.param).sum()
            else:
                lq = lq + relaxation.log_density(q.param, d.x, T).reshape(S, -1).sum(-1)
        return draws, lq

    def surrogate_at(self, T: float, noise: Dict[str, torch.Tensor], batch=None, theta=None,
                     value: bool = True) -> Surrogate:
        """The relaxed objective at temperature T on the given uniform noise (and continuous draws
        `theta`, else fresh ones): its negative as the loss; the value, the discrete model's ELBO at
        the rounded draws (value=False: the relaxed objective's)."""
        vi = self.vi
        fam = vi.family
        S = next(iter(noise.values())).shape[0]
        gaussian = fam.gaussian and vi.objective.linear
        if theta is not None:
            log_q_theta = None if gaussian else fam.log_q(theta)
        elif gaussian:
            theta, log_q_theta = fam.rsample(S), None
        else:
            theta, log_q_theta = fam.rsample_with_log_q(S)
        draws, lq = self.relaxed_draws(T, noise)
        ev = vi.program.evaluate(theta, draws, batch=batch)
        if gaussian:
            entropy = fam.entropy()
            obj = (ev.total - lq).mean() + entropy
        else:
            obj = vi.objective(ev.total - log_q_theta - lq)
        if not value:
            return Surrogate(-obj, float(obj.detach()))
        with torch.no_grad():
            hard = {n: d.hard for n, d in draws.items()}
            evh = vi.program.evaluate(theta.detach(), hard, batch=batch)
            lqh = sum(q.log_q(hard[n]).reshape(S, -1).sum(-1) for n, q in vi.discrete.items())
            lw = evh.total - lqh
            keep = torch.isfinite(lw)
            if not bool(keep.all()):             # a draw of probability zero: counted, left out of the value
                vi.zero_draws = getattr(vi, "zero_draws", 0) + int((~keep).sum())
            if not bool(keep.any()):
                v = math.nan
            elif gaussian:
                v = float(lw[keep].mean() + entropy.detach())
            else:
                v = float(vi.objective(lw[keep] - log_q_theta.detach()[keep]))
        return Surrogate(-obj, v)


# ---- the automatic choice --------------------------------------------------------------------------
def candidates(model, node_plans) -> Tuple[str, ...]:
    """The latents `auto` could relax: every latent left on the score path, when all of them can be."""
    from ..plan import relaxable
    score = tuple(n for n, p in node_plans.items() if p.estimator == "score" and model.nodes[n].discrete)
    if not score or any(p.estimator == "score" and not model.nodes[n].discrete for n, p in node_plans.items()):
        return ()
    return score if all(relaxable(model, n) for n in score) else ()


def logit_gradient_variance(estimator: GradientEstimator, S: int, reps: int = REPS, warm: int = 0) -> float:
    """The total variance (summed over q's logits) of `estimator`'s gradient of the discrete q's logits,
    over `reps` independent gradients of S samples each (after `warm` unrecorded ones)."""
    vi = estimator.vi
    params = vi.parameters()
    logits = [q.param for q in vi.discrete.values()]
    out = []
    for r in range(warm + reps):
        for p in params:
            p.grad = None
        v = estimator.gradient(S)
        if r < warm or not math.isfinite(v):
            continue
        out.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in logits]).detach())
    for p in params:
        p.grad = None
    if len(out) < 2:
        return math.inf
    g = torch.stack(out)
    return float(g.var(0, unbiased=True).sum())


def choose(vi_score, vi_relaxed, S: int) -> Tuple[bool, str]:
    """-> (relax?, the header's note): relaxed when the score path's logit-gradient variance at the start
    is more than AUTO_RATIO times the relaxed estimator's (at T0)."""
    state = [p.detach().clone() for p in vi_score.parameters()]
    v_score = logit_gradient_variance(vi_score.estimator, S, REPS, WARM)
    v_relax = logit_gradient_variance(Relaxed(vi_relaxed), S, REPS)
    with torch.no_grad():                       # (gradients only: nothing moved, but be sure)
        for p, s in zip(vi_score.parameters(), state):
            p.copy_(s)
    ratio = v_score / v_relax if v_relax > 0 else math.inf
    relax = ratio > AUTO_RATIO
    note = (f"auto: the score path's gradient variance at the start {ratio:.3g}x the relaxed estimator's "
            f"({'above' if relax else 'within'} {AUTO_RATIO:g}x)")
    return relax, note
