"""Pareto-smoothed importance sampling (Vehtari, Simpson, Gelman, Yao, Gabry
2015/2024) and the diagnostics of Yao et al. (2018) for a VI fit.

Stage: log importance ratios log p(theta) - log q(theta) of draws from q ->
`PsisResult` (k-hat, smoothed normalised weights, relative ESS, sd of the log
weights).  numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Callable, Sequence

import numpy as np

from ..config import python_opt
from .draw_stats import spread


UNIFORM_SPREAD = 1e-6   # log weights within this of each other are uniform (an exact q: rounding only)
UNIFORM_SD = 0.1        # sd(log w) below this: weights within ~10% of each other


@dataclass
class PsisResult:
    khat: float
    weights: np.ndarray          # normalised, smoothed
    ess: float                   # relative effective sample size, 0..1
    sd_log_w: float
    ess_raw: float = 1.0         # the same for the raw (unsmoothed) weights


def gpd_fit(x: np.ndarray):
    """Generalised Pareto fit to exceedances x > 0 (Zhang & Stephens 2009 with the
    weakly informative prior on k of Vehtari et al.). Returns (k, sigma)."""
    x = np.sort(np.asarray(x, dtype=float))
    n = len(x)
    prior_bs, prior_k = 3, 10
    m = 30 + int(np.sqrt(n))
    bs = 1 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))
    bs /= prior_bs * x[int(n / 4 + 0.5) - 1]
    bs += 1 / x[-1]
    ks = np.log1p(-bs[:, None] * x).mean(axis=1)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        L = n * (np.log(-bs / ks) - ks - 1)
        w = 1 / np.exp(L - L[:, None]).sum(axis=1)
    keep = w >= 10 * np.finfo(float).eps
    w, bs = w[keep], bs[keep]
    w /= w.sum()
    b = (bs * w).sum()
    k = np.log1p(-b * x).mean()
    sigma = -k / b
    k = (n * k + prior_k * 0.5) / (n + prior_k)
    return k, sigma


def _gpd_quantile(p, k, sigma):
    return sigma * np.expm1(-k * np.log1p(-p)) / k if abs(k) > 1e-12 else -sigma * np.log1p(-p)


def psis(log_ratios: np.ndarray) -> PsisResult:
    # extreme log ratios (1e300 apart: a q far off in a tail) make k-hat inf and the ESS ~0, which
    # is the answer; the overflows on the way there are not the user's business (no NumPy warning)
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        return _psis(log_ratios)


def _psis(log_ratios: np.ndarray) -> PsisResult:
    lw = np.asarray(log_ratios, dtype=float).copy()
    S = lw.size
    finite = np.isfinite(lw)
    if not finite.all():
        lw[~finite] = -np.inf if (~finite).all() else np.min(lw[finite]) - 1e3
    if not np.isfinite(lw).any():
        return PsisResult(float("inf"), np.full(S, 1.0 / S), 0.0, float("inf"))
    sd = spread(lw[np.isfinite(lw)])
    lw = lw - lw.max()
    raw = lw.copy()
    M = int(min(0.2 * S, 3 * np.sqrt(S)))
    order = np.argsort(lw)
    khat = float("inf")
    if M >= 5:
        tail_idx = order[-M:]
        cutoff = lw[order[-M - 1]]
        tail = lw[tail_idx]
        exceed = np.exp(tail) - np.exp(cutoff)
        positive = exceed[exceed > 0]
        if (np.all(exceed <= 0) or np.ptp(lw) < UNIFORM_SPREAD) and np.isfinite(cutoff):
            khat = 0.0                     # the tail ties with the bulk (or q is exact): no tail at all
        elif positive.size < 5 or not np.isfinite(cutoff):
            khat = float("inf")            # a handful of draws carry the weight: no tail to fit
        else:
            k, sigma = gpd_fit(exceed)
            khat = float(k)
            if np.isfinite(k) and sigma > 0:
                p = (np.arange(1, M + 1) - 0.5) / M
                smoothed = np.log(_gpd_quantile(p, k, sigma) + np.exp(cutoff))
                lw[tail_idx] = np.minimum(smoothed, 0.0)       # cap at the largest raw weight
    w, ess = _weights_ess(lw)
    return PsisResult(khat, w, ess, sd, _weights_ess(raw)[1])


def _weights_ess(lw: np.ndarray):
    """Log weights -> (normalised weights, relative effective sample size)."""
    w = np.exp(lw - lw.max())
    w /= w.sum()
    return w, float(1.0 / np.sum(w * w) / lw.size)


def verdict(khat: float, ess: float, family, converged: bool, ess_raw: float = None,
            sd_log_w: float = None, centred: Sequence[str] = (), opt: Callable = python_opt,
            tried: Sequence[str] = ()):
    """(label, plain-words verdict with what to try next).

    k-hat alone misleads on nearly exact fits (it swings between 0.2 and 0.9
    when the weights are almost uniform), so the verdict weighs it with the
    relative ESS of the importance weights.  The advice fits the model: a
    richer family only where one exists, non-centring only for the latents of a
    centred hierarchy (`centred`), more steps only when the fit had not
    converged.  `opt` spells an option as the caller does; `tried`: the families `auto` fitted
    already (not suggested again)."""
    notes = []
    # the "nearly uniform weights" override must hold for the raw weights too: smoothing can hide
    # one draw that carries all the weight; and it overrides a k-hat of 1 or more only when the log
    # weights barely vary (sd < 0.1): the exact KL optimum of a Gaussian q for a posterior with
    # exponential tails (a gamma in log space) has weights with a Pareto tail of index ~1 far out,
    # and 1000 draws then give k-hat 2 from one or two draws 1.4x the mean weight
    tight = sd_log_w is not None and sd_log_w < UNIFORM_SD
    uniform = min(ess, ess if ess_raw is None else ess_raw) >= 0.9 and (khat < 1.0 or tight)
    if khat < 0.7 and ess >= 0.3 or uniform:
        label = "good"
        text = "good: the approximation agrees with the model " + (
            f"(k-hat {khat:.2f}, ESS {100 * ess:.0f}%)" if khat < 0.7 else
            f"(k-hat {khat:.2f} is high, but the importance weights are nearly uniform: ESS {100 * ess:.0f}%)")
    elif (khat >= 0.7 and ess < 0.6) or ess < 0.1:
        label = "unreliable"
        text = (f"unreliable: the approximation misses the posterior (k-hat {khat:.2f}, ESS {100 * ess:.0f}%); "
                f"means may be off and sds are likely too small")
    else:
        label = "fair"
        text = (f"fair: use with care (k-hat {khat:.2f}, ESS {100 * ess:.0f}%); tails and sds may be off")
    if label != "good":
        tries = []
        if getattr(family, "richer", None) and family.richer not in tried:
            tries.append(f"{opt('method', family.richer)} ({family.name} cannot show every correlation)")
        if centred:
            names = ", ".join(f"'{n}'" for n in centred)
            tries.append(f"non-centring {names} (x = loc + scale * x_raw with x_raw ~ normal(0, 1))")
        if not converged:
            tries.append(f"more {opt('steps')}")
        if tries:
            notes.append("try " + ", ".join(tries))
        elif len(tried) > 1:
            notes.append(f"auto tried {', '.join(tried)}: none fits this posterior better; read the sds as "
                         f"approximate")
        else:
            notes.append("no family here fits this posterior better than this one: it is far from Gaussian "
                         "(skewed, heavy-tailed or bounded); read the sds as approximate")
    elif getattr(family, "caveat", None):
        notes.append(family.caveat)
    if not converged:
        notes.append("the ELBO had not settled when the step cap was reached")
    return label, text + ("; " + "; ".join(notes) if notes else "")
