"""The memory budget of a fit, checked before the first allocation that scales
with the model.

Stage: (checked model, compiled model, family, config) -> an estimate of the
fit's peak memory by part, and a refusal when it does not fit.

Every size is known before fitting: the unconstrained dimension, the largest
modelled variable (one Monte Carlo sample's intermediates), the family's
parameter count, the draws.  The estimate adds the parts that live at the
same time, in bytes of the fit's dtype, with the factors measured on this
code (the mode search keeps ~30 vectors of the dimension; a step keeps ~10
intermediates per sample and data element; Adam keeps 4 copies of the
parameters plus up to 50 window averages).  It is meant to be right within a
factor of about two: it refuses a fit that cannot fit, not a tight one.

When the estimate exceeds the memory available (or `max_memory`), the fit is
refused at once: a model error (exit 1) when a latent's size drives it,
naming the latent; a usage error (exit 2) when an option drives it, naming
the option; both say what would fit.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple  # noqa: F401

import numpy as np

from ..errors import Diagnostic, PplError, UsageError

MODE_VECTORS = 30            # vectors of the dimension alive during the mode search (L-BFGS history 10)
STEP_FACTOR = 10             # intermediates per sample and element of the largest variable in one step
ADAM_COPIES = 4              # parameters, gradient, Adam's two moments (+ the last good copy)
MAX_WINDOWS = 50             # window averages kept for the final iterate average
FULL_HESSIAN_MAX = 400
SAFETY = 0.8                 # of the available memory


@dataclass
class Estimate:
    parts: Dict[str, float]  # bytes by part
    total: float

    def largest(self) -> Tuple[str, float]:
        return max(self.parts.items(), key=lambda kv: kv[1])


def available_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux), else physical pages; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def family_parameters(method: str, dim: int, rank: Optional[int], structure=None, config=None) -> int:
    from .families import FAMILIES
    count = getattr(FAMILIES.get(method), "parameter_count", None)     # a family that says it
    if count is not None:
        return count(dim, config)
    if method == "meanfield":
        return 2 * dim
    if method in ("fullrank",):
        return dim + dim * dim
    if method == "lowrank":
        r = min(rank or max(1, min(10, dim // 4)), max(dim, 1))
        return dim * (2 + r)
    if method == "graph":
        if structure is None:           # before the structure is known: a few numbers per coordinate
            return 8 * dim
        G = len(structure.globals)
        return dim + sum(int(b.shape[0]) * (int(b.shape[1]) ** 2 + G * int(b.shape[1])) for b in structure.buckets) \
            + G * G
    return 2 * dim + dim * dim          # an unknown family: assume dense


def estimate(model, program, method: str, config, S: int, n_psis: int, structure=None) -> Estimate:
    bytes_per = 4 if config.dtype == "float32" else 8
    dim = program.dim
    largest = program.largest_node()
    n_params = family_parameters(method, dim, config.rank, structure, config)
    reported = sum(int(np.prod(n.shape)) for n in model.nodes.values() if n.kind in ("latent", "deterministic"))
    steps = config.steps or 10000
    parts = {
        "mode search": MODE_VECTORS * dim,
        "Hessian": 4 * dim * dim if dim <= FULL_HESSIAN_MAX else 40 * dim,
        "family": n_params * (ADAM_COPIES + 1 + min(MAX_WINDOWS, math.ceil(steps / 100))),
        "one step": STEP_FACTOR * S * largest + 4 * S * dim,
        "draws": n_psis * dim + STEP_FACTOR * min(n_psis, max(1, 4_000_000 // max(1, largest))) * largest
        + 2 * config.draws * reported,
    }
    parts = {k: float(v) * bytes_per for k, v in parts.items()}
    return Estimate(parts, sum(parts.values()))


def check(model, program, method: str, config, S: int, n_psis: int, structure=None) -> Estimate:
    """Refuse a fit whose estimated peak memory exceeds what is available (see the module docstring)."""
    est = estimate(model, program, method, config, S, n_psis, structure)
    limit = config_limit(config)
    if limit is None or est.total <= limit:
        return est
    part, size = est.largest()
    need, have = _gb(est.total), _gb(limit)
    where = "--max-memory" if config.max_memory is not None else "this machine's available memory"
    opt = config.opt
    block = max(program.blocks, key=lambda b: b.size, default=None)
    biggest = max((n for n in model.nodes.values() if n.kind == "latent"),
                  key=lambda n: int(np.prod(n.shape)), default=None)
    head = f"this fit needs about {need} of memory ({part}: {_gb(size)}), more than {have} ({where})"
    if part == "family" and method in ("fullrank", "flow") and config.method != "auto":
        raise UsageError(f"{head}; {opt('method', method)} keeps {program.dim}^2 numbers: use "
                         f"{opt('method', 'meanfield')} or lowrank")
    if part == "one step" and config.mc_samples:
        raise UsageError(f"{head}; {opt('mc_samples', config.mc_samples)} samples of the largest variable "
                         f"({program.largest_node():,} elements) do not fit: use fewer {opt('mc_samples')}")
    if part == "draws" and config.draws > 1000:
        raise UsageError(f"{head}; {opt('draws', config.draws)} draws of every latent do not fit: use fewer "
                         f"{opt('draws')}")
    node = biggest
    if node is not None and block is not None and int(np.prod(node.shape)) >= 0.5 * program.dim:
        n = int(np.prod(node.shape))
        hint = f", or use {opt('method', 'meanfield')}" if part == "family" and method != "meanfield" else ""
        raise PplError([Diagnostic(node.name_span, f"{head}: '{node.name}' has {n:,} elements; make it "
                                   f"smaller{hint}")])
    if part == "one step":
        raise PplError([Diagnostic(None, f"{head}: one step over the data ({program.largest_node():,} elements "
                                   f"per sample) does not fit; use smaller data or fewer {opt('mc_samples')}",
                                   model.source.path)])
    raise PplError([Diagnostic(None, f"{head}", model.source.path)])


def seconds_per_evaluation(program, S: int = 1) -> float:
    """One evaluation of the log joint and its gradient at S draws, timed (the second of two runs)."""
    import time
    import torch
    theta = torch.zeros((S, program.dim), dtype=program.dtype, device=program.device, requires_grad=True)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        total = program.log_prob(theta).sum()
        if total.requires_grad:
            torch.autograd.grad(total, theta, allow_unused=True)
        best = min(best, time.perf_counter() - t0)
    return best


def time_estimate(program, method: str, config, S: int, n_psis: int, fixed_draws: int) -> Dict[str, float]:
    """A rough duration of each phase from one timed evaluation: the mode search (~100 evaluations),
    the optimisation (the family's typical count of fixed-draw evaluations, or a share of the Adam
    steps' cap) and the draws.  Meant to say
    "this will take minutes", not to the second."""
    per_draw = seconds_per_evaluation(program)
    dense = program.dim * program.dim * 1e-9 if method in ("fullrank", "flow") else 0.0
    if config.optimizer != "adam" and config.steps is None:
        from .families import FAMILIES
        evals = getattr(FAMILIES.get(method), "typical_fixed_draw_evals", 50)
        optimise = evals * (fixed_draws * per_draw + dense)
    else:
        optimise = (config.steps or 10000) * (S * per_draw + dense) * 0.3     # convergence usually stops sooner
    return {"mode search": 100 * per_draw + (dense * program.dim if program.dim <= FULL_HESSIAN_MAX else 0.0),
            "optimisation": optimise, "draws": max(n_psis, config.draws) * per_draw}


def config_limit(config) -> Optional[float]:
    if config.max_memory is not None:
        return float(config.max_memory)
    avail = available_memory()
    return None if avail is None else SAFETY * avail


def _gb(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GB', '2000000' -> bytes; a UsageError names the option on a bad value."""
    t = str(text).strip().upper().rstrip("B")
    mult = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        raise UsageError(f"a memory size like 4G or 512M, got {text!r}") from None
