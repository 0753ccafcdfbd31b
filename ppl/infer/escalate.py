"""Escalation for `method=auto`: the first family's diagnosed fit -> the fit to report.

Stage: (the prepared model, the first `Attempt`) -> the best `Attempt` of a
ladder of richer families, each fitted only while the diagnostics say the
fits so far miss, within a time bound.

The ladder comes from the family registry: each family names the families
worth trying when it misses (`escalates_to`: full-rank -> the flow, then the
mixture; mean-field and low-rank -> full-rank), so a new family joins the
ladder by one attribute.  A family built on another's fit (the flow and the
mixture start from full-rank's q) starts from the attempt already made, not
from a second fit of it.

Which fit is best: the verdict's grade first (good, fair, unreliable: k-hat
and the PSIS ESS), then the ELBO -- the gap between log p(y) and the ELBO is
KL(q || p), so on one model the higher ELBO is the closer q -- where it is
higher by more than twice the two estimates' Monte Carlo errors; a tie keeps
the cheaper fit.  The header says what was tried, each one's grade and ELBO,
and which was kept.

The bound is on work, not on the clock, so that one seed gives one answer on
any machine (and on every process of a data-parallel fit): the escalation
may evaluate the log density at ESCALATE_FACTOR times as many draws as the
first fit did (`LogJoint.work`: draws evaluated, each a pass over the data).
An attempt that reaches the bound is stopped (`Deadline`, checked at every
optimiser step and evaluation) and dropped; one that would start past it is
not tried; the header says which.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np

from ..errors import PplError, UsageError
from .families import FAMILIES

ESCALATE_FACTOR = 10.0       # the escalation's draws of the log density: this many times the first fit's
GRADE = {"good": 0, "fair": 1, "unreliable": 2}


class OutOfTime(Exception):
    """An escalation attempt reached the work bound."""


class Deadline:
    """A progress callback that passes everything on to `inner` and stops the fit (OutOfTime) once
    `program` has evaluated more than `limit` draws: Adam's steps call it, and so do the fixed-draw
    optimiser's evaluations."""

    def __init__(self, inner, program, limit: int):
        self.inner, self.program, self.limit = inner, program, limit

    def _check(self) -> None:
        if self.program.work > self.limit:
            raise OutOfTime

    def __call__(self, *args):
        self._check()
        if self.inner is not None:
            self.inner(*args)

    def tick(self, *args):
        self._check()
        if hasattr(self.inner, "tick"):
            self.inner.tick(*args)

    def phase(self, name: str) -> None:
        if hasattr(self.inner, "phase"):
            self.inner.phase(name)


def _elbo_se(a) -> float:
    """The Monte Carlo error of an attempt's ELBO, from its PSIS draws' log weights."""
    log_w = np.asarray(a.diagnosed[6], dtype=float)
    log_w = log_w[np.isfinite(log_w)]
    return float(np.std(log_w) / math.sqrt(len(log_w))) if len(log_w) > 1 else float("inf")


def better(a, b) -> bool:
    """Whether attempt `a` fits the posterior better than `b` (see the module's docstring)."""
    if GRADE[a.label] != GRADE[b.label]:
        return GRADE[a.label] < GRADE[b.label]
    if not (math.isfinite(a.elbo) and math.isfinite(b.elbo)):
        return math.isfinite(a.elbo) and not math.isfinite(b.elbo)
    return a.elbo - b.elbo > 2.0 * math.hypot(_elbo_se(a), _elbo_se(b))


def _ladder(method: str) -> List[str]:
    return list(getattr(FAMILIES.get(method), "escalates_to", ()) or ())


def _short(a) -> str:
    return f"{a.method} {a.label} (k-hat {a.diagnosed[1].khat:.2f}, ELBO {a.elbo:.4g})"


def escalate(prep, first, progress=None):
    """-> the attempt to report: `first` when it is good or nothing richer applies; else the best of
    the ladder's attempts made within the bound (its header note says what was tried)."""
    from .fit import fit_family, judge
    if first.label == "good" or not _ladder(first.method):
        return first
    program = prep.program
    limit = program.work + int(ESCALATE_FACTOR * first.work)
    bound = f"{ESCALATE_FACTOR:g}x the first fit's {_count(first.work)} draws of the log density"
    attempts, notes, queue, best = [first], [], _ladder(first.method), first
    while queue and best.label != "good":
        name = queue.pop(0)
        if program.work >= limit:
            notes.append(f"{name} not tried (bound: {bound})")
            continue
        base = next((a for a in reversed(attempts) if a.method == FAMILIES[name].base_family), None)
        try:
            a = fit_family(prep, name, "", Deadline(progress, program, limit), base=base)
        except OutOfTime:
            notes.append(f"{name} stopped at the bound ({bound})")
            continue
        except (PplError, UsageError) as e:
            notes.append(f"{name} not applicable ({_first_line(e)})")
            continue
        attempts.append(a)
        if better(a, best):
            best = a
        queue += [m for m in _ladder(name) if m not in queue and all(m != x.method for x in attempts)]
    tried = [a.method for a in attempts]
    why = (f"auto: {_short(first)}; tried " + ", ".join([_short(a) for a in attempts[1:]] + notes) +
           f"; kept {best.method}")
    if best is not first or len(attempts) > 1:
        best.label, best.text = judge(prep.model, prep.config, best.method, best.result, best.diagnosed[1],
                                      best.settled, tried)
    best.why = "; ".join(x for x in (first.why, why) if x)
    best.timings = dict(best.timings, escalation=sum(a.seconds for a in attempts if a is not first))
    return best


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def _first_line(e: Exception) -> str:
    diags = getattr(e, "diagnostics", None)
    text = diags[0].message if diags else str(e)
    return text.splitlines()[0] if text else type(e).__name__
