"""fit: checked IR + `FitConfig` -> `Fit` (draws, summary, ELBO trace, PSIS
diagnostics, verdict).

Pipeline, one function per stage:

    plan estimators -> compile the log joint (runtime: device, dtype, seed)
    -> start (Laplace at the mode, or cold) -> family (registry FAMILIES)
    -> VI problem (objective, gradient estimator: registries OBJECTIVES,
       GRADIENTS) -> optimiser (registry OPTIMIZERS: dadvi or adam, engine.py)
    -> draws in constrained space -> PSIS k-hat / ESS -> verdict -> Fit

Choices made here from the model's size and structure (each said in the
header): the family for `method=auto` (full-rank up to AUTO_FULLRANK_MAX
unconstrained dimensions, low-rank above), the Monte Carlo samples per step,
the step size, and the optimiser for `optimizer=auto` (fixed draws where
the gradient estimator supports them and 16 samples per step fit the budget,
unless the user tunes the stochastic steps).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import numpy as np
import torch

from ..config import FitConfig, resolved_device
from ..frontend.check import Model
from ..structure import structure as structure_of
from ..plan import centred_latents, describe, plan as make_plan
from ..backend.log_joint import LogJoint
from ..backend.runtime import Runtime, to_numpy
from .engine import OPTIMIZERS, VI, OptimResult
from . import budget, improper
from .discrete import discrete_families
from .draw_stats import column_stats
from .families import FAMILIES
from .laplace import FULL_HESSIAN_MAX, Start, cold_start, laplace
from .objectives import OBJECTIVES
from .psis import psis, verdict

AUTO_FULLRANK_MAX = 200
GRAPH_MAX_GLOBALS = 200    # auto takes the graph family when the structure has at most this many globals
# ... and at most this many dimensions: validated against NUTS at K = 200 and 1,000 (five hierarchies);
# at K = 10,000 its start (the joint mode of a non-centred hierarchy: tau ~ 10 against 0.5) is too far
# for the fixed-draw optimiser, and the fit ends unreliable
GRAPH_AUTO_MAX = 5000
COLD_MIN_STEPS = 1500      # no convergence check before this many steps after a cold start
MAX_STEPS = 10000          # Adam's step cap when `steps` is not given
MC_BUDGET = 200_000        # elements per step: S = min(16, MC_BUDGET / size of the largest variable)
PSIS_BUDGET = 200_000_000  # elements: the draws for k-hat cost at most about this many element-evaluations
SMALL_DATA = 1_000_000     # elements: below this, one thread beats two (thread wake-ups dominate)


@dataclass(kw_only=True)
class Fit:
    model: Model
    config: FitConfig
    method: str                               # the family used
    method_note: str = ""                     # why `auto` chose it
    estimator: str                            # per-node estimators, as the header shows them
    objective: str
    draws: Dict[str, np.ndarray]              # name -> (draws, *shape), constrained
    elbo_trace: List[float]
    elbo: float
    steps: int
    converged: bool
    khat: float
    ess: float
    sd_log_w: float
    verdict: str
    verdict_label: str
    init: str                                 # how the fit started (the header's note)
    seconds: float                            # the fit's own time (not the process's)
    timings: Dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    mc_samples: int = 0
    optimizer: str = "adam"
    evals: int = 0                            # L-BFGS evaluations of the fixed-draw objective (dadvi)
    fixed_draws: int = 0
    device: str = "cpu"                       # where it ran (with how `auto` chose)

    def __repr__(self) -> str:
        return (f"<Fit {self.model.source.path}: {self.method}, ELBO {self.elbo:.4g}, k-hat {self.khat:.2f}, "
                f"{self.verdict_label}>")

    def summary(self) -> Dict[str, Dict[str, float]]:
        """Stan-style flattened names (1-based) -> mean, sd, q5, q50, q95."""
        out = {}
        for name, arr in self.draws.items():
            flat = arr.reshape(arr.shape[0], -1)
            q, mean, sd = column_stats(flat)     # inf or huge draws without NumPy warnings
            for j, key in enumerate(_flat_names(name, arr.shape[1:])):
                out[key] = {"mean": float(mean[j]), "sd": float(sd[j]), "q5": float(q[0, j]),
                            "q50": float(q[1, j]), "q95": float(q[2, j])}
        return out

    def draws_table(self):
        """(flattened names, (draws, columns) matrix)."""
        names, cols = [], []
        for name, arr in self.draws.items():
            names += _flat_names(name, arr.shape[1:])
            cols.append(arr.reshape(arr.shape[0], -1))
        return names, (np.concatenate(cols, 1) if cols else np.zeros((0, 0)))


def _flat_names(name: str, shape) -> List[str]:
    """`theta[1]`, ..., `L[2,1]`: Stan-style, 1-based, row-major."""
    if not shape:
        return [name]
    return [f"{name}[{','.join(str(i + 1) for i in idx)}]" for idx in np.ndindex(*shape)]


def fit(model: Model, config: FitConfig, progress=None) -> Fit:
    """Fit `model` as `config` says (`progress(step, max_steps, value)` is called after each Adam step)."""
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    device, device_note = resolved_device(config)
    rt = Runtime.make(device, config.dtype, config.seed)
    set_threads(model)

    t0 = time.perf_counter()
    node_plans = make_plan(model, config.estimator, config.opt)
    program = LogJoint(model, node_plans, rt)
    largest = program.largest_node()
    # the budget before anything that scales with the model (the structure's maps included)
    budget.check(model, program, choose_method(config.method, program.dim)[0], config,
                 config.mc_samples or max(1, min(64, MC_BUDGET // largest)), psis_draws(largest))
    structure = model_structure(model, node_plans, program, config.method)
    method, why = choose_method(config.method, program.dim, structure)
    announce(progress, program, method, config, largest)
    timings["compile"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _phase(progress, "mode search")
    fam_cls = FAMILIES[method]
    start, start_program = find_start(model, program, config, fam_cls.preconditioner == "full",
                                      structure if fam_cls.needs_structure else None, _ticker(progress))
    improper.after_laplace(start_program, start)      # a clamped direction that stays flat: exit 3
    timings["init"] = time.perf_counter() - t0

    gen = rt.generator()
    discrete = discrete_families(model, program, node_plans, gen)
    serves = "score" if any(node_plans[n.name].estimator == "score" for n in model.latents()
                            if not n.discrete) else "reparam"
    if fam_cls.base_family:              # fitted on top of another family's fit (the flow: full-rank)
        t0 = time.perf_counter()
        family, init_note = fit_base(fam_cls, start, gen, config, structure, program, discrete, node_plans,
                                     serves, progress)
        timings["base fit"] = time.perf_counter() - t0
    else:
        family, init_note = make_family(fam_cls, start, gen, config, structure), start.note
    vi = VI(program, family, OBJECTIVES[config.objective](config), discrete, node_plans, config, serves)

    t0 = time.perf_counter()
    S = mc_samples(config, vi)
    cold = start.cold and not fam_cls.base_family       # (a family built on a fit starts warm)
    lr = step_size(config, vi, S, cold)
    watched = improper.watch(start_program, family, progress)     # checks q every 500 Adam steps
    _phase(progress, "optimise")
    result, optimizer = optimise(vi, config, S, lr, cold, watched, gen)
    improper.check_q(start_program, family, start.cold)           # q grew along a flat direction: exit 3
    timings["optimise"] = time.perf_counter() - t0

    settled = family.settle(program, gen)                         # e.g. the flow against its start

    _phase(progress, "draws")
    draws, ps, t_draws, t_khat = draw_and_diagnose(vi, config.draws, gen, _ticker(progress))
    timings["draws"], timings["khat"] = t_draws, t_khat
    label, text = verdict(ps.khat, ps.ess, FAMILIES[method], result.converged, ps.ess_raw, ps.sd_log_w,
                          centred_latents(model), config.opt)
    if settled:
        text += "; " + settled[0]
    # the ELBO: the fixed-draw optimum's value, or the mean of Adam's last 100 estimates
    tail = result.trace[-1:] if result.evals else result.trace[-100:] if result.trace else [float("nan")]
    return Fit(model=model, config=config, method=method, method_note=why, estimator=describe(node_plans),
               objective=config.objective,
               draws=draws, elbo_trace=result.trace, elbo=settled[1] if settled else float(np.mean(tail)),
               steps=result.steps,
               converged=result.converged, khat=float(ps.khat), ess=float(ps.ess), sd_log_w=float(ps.sd_log_w),
               verdict=text, verdict_label=label, init=init_note, seconds=time.perf_counter() - t_start,
               timings=timings, lr=lr, mc_samples=S, optimizer=optimizer, evals=result.evals,
               fixed_draws=result.fixed_draws,
               device=str(rt.device) + (f" ({device_note})" if device_note else ""))


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _mallopt(*settings) -> None:
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        for param, value in settings:
            libc.mallopt(param, value)
    except (OSError, AttributeError):
        pass


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold after big frees, so tensors of tens of MB are then
    carved from the heap and never returned: peak RSS on large data doubled.  Pin it at 1 MB."""
    _mallopt((_M_MMAP_THRESHOLD, 1 << 20))


def _keep_freed_memory() -> None:
    """Below a million data elements, keep freed memory in the heap (tensors up to 64 MB from the heap,
    no trimming): a step's tensors of a few MB were otherwise mapped and unmapped every evaluation, and
    the page faults cost as much as the arithmetic (graph family, K = 200: 4.3 s of system time in 7.5 s)."""
    _mallopt((_M_MMAP_THRESHOLD, 64 << 20), (_M_TRIM_THRESHOLD, 512 << 20), (_M_TOP_PAD, 64 << 20))


def set_threads(model: Model) -> None:
    """Tiny tensors run fastest on one thread; large data sets use every core."""
    n = max([int(np.prod(np.shape(v))) for v in model.values.values()] + [1])
    want = 1 if n < SMALL_DATA else (os.cpu_count() or 1)
    if n >= SMALL_DATA:
        _return_freed_memory()
    else:
        _keep_freed_memory()
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


def model_structure(model: Model, node_plans, program: LogJoint, method: str):
    """The posterior's coupling structure (ppl/structure.py), for the families that use it and for
    `auto` above the full-rank limit."""
    if (method in FAMILIES and FAMILIES[method].needs_structure) or \
            (method == "auto" and program.dim > AUTO_FULLRANK_MAX):
        return structure_of(model, node_plans, program.blocks, program.dim)
    return None


def choose_method(method: str, dim: int, structure=None):
    """-> (family name, why).  auto: full-rank while the dimension is small; above it the graph-structured
    Gaussian when the posterior couples most coordinates only within small groups and a few globals
    (a hierarchy: its precision is an arrow); low-rank plus diagonal otherwise."""
    if method != "auto":
        return method, ""
    if dim <= AUTO_FULLRANK_MAX:
        return "fullrank", ""
    if structure is not None and structure.n_groups and len(structure.globals) <= GRAPH_MAX_GLOBALS \
            and dim <= GRAPH_AUTO_MAX:
        sizes = sorted({int(b.shape[1]) for b in structure.buckets})
        return "graph", (f"auto: {dim} dimensions, {structure.n_groups} groups of "
                         f"{'/'.join(str(s) for s in sizes)} coupled only through {len(structure.globals)} "
                         f"globals")
    return "lowrank", (f"auto: {dim} dimensions, " + ("more than the graph family is validated for"
                                                     if dim > GRAPH_AUTO_MAX else "no sparse structure for the graph family"))


def make_family(fam_cls, start: Start, gen, config: FitConfig, structure):
    pre = start.preconditioner(fam_cls.preconditioner)
    if not fam_cls.needs_structure:
        return fam_cls(pre, gen, config)
    precision = None
    if start.arrow is not None and pre.diag:
        precision = start.arrow.scaled(pre.A, structure.buckets, structure.globals)
    try:
        return fam_cls(pre, gen, config, structure=structure, precision=precision)
    except (RuntimeError, torch.linalg.LinAlgError):      # the precision at the mode is not positive definite
        return fam_cls(pre, gen, config, structure=structure)


def fit_base(fam_cls, start: Start, gen, config: FitConfig, structure, program, discrete, node_plans, serves,
             progress):
    """Fit the family `fam_cls` starts from (its `base_family`, at the engine's defaults) and build
    `fam_cls` from it.  -> (the family, the start's note for the header)."""
    name = fam_cls.base_for(program.dim) if hasattr(fam_cls, "base_for") else fam_cls.base_family
    base_config = replace(config, method=name, steps=None, lr=None, mc_samples=None, optimizer="auto")
    base = make_family(FAMILIES[name], start, gen, base_config, structure)
    vi = VI(program, base, OBJECTIVES[config.objective](base_config), discrete, node_plans, base_config, serves)
    S = mc_samples(base_config, vi)
    result, optimizer = optimise(vi, base_config, S, step_size(base_config, vi, S, start.cold), start.cold,
                                 progress, gen)
    how = (f"{result.evals} L-BFGS evaluations" if result.evals else f"{result.steps} Adam steps")
    tail = result.trace[-1:] if result.evals else result.trace[-100:]
    elbo = f", ELBO {float(np.mean(tail)):.4g}" if tail else ""
    return fam_cls.from_base(base, program, gen, config), f"{start.note}, then the {name} fit ({how}{elbo})"


LONG_FIT = 10.0     # seconds: a fit estimated to take longer is announced before it starts


def announce(progress, program: LogJoint, method: str, config: FitConfig, largest: int) -> None:
    """Say before it starts how long a long fit may take (to a progress display with `estimate`)."""
    if not hasattr(progress, "estimate"):
        return
    S = config.mc_samples or max(1, min(16, MC_BUDGET // largest))
    fam = FAMILIES.get(method)
    n_fixed = min(max(32, 1_000_000 // max(1, largest)), getattr(fam, "max_fixed_draws", 16384))
    parts = budget.time_estimate(program, method, config, S, psis_draws(largest), n_fixed)
    if sum(parts.values()) > LONG_FIT:
        progress.estimate(parts)


def _phase(progress, name: str) -> None:
    """Tell a progress display (one with `phase`) that a stage begins; plain callbacks are left alone."""
    if hasattr(progress, "phase"):
        progress.phase(name)


def _ticker(progress):
    """A progress display's per-evaluation `tick(value)`, or None."""
    return getattr(progress, "tick", None) if progress is not None else None


def find_start(model: Model, program: LogJoint, config: FitConfig, full: bool, structure=None, on_eval=None):
    """-> (the start, the compiled model it was found on).  The Laplace approximation at the mode, or
    a cold start.  Discrete latents on the score path have no mode: the start is then that of the
    model with them summed out, where that is possible."""
    dim = program.dim
    exact_hessian = dim <= FULL_HESSIAN_MAX
    if config.init == "laplace" and dim > 0:
        if not program.score:
            return laplace(program, full=exact_hessian, structure=structure, on_eval=on_eval), program
        summed = make_plan(model, "auto", config.opt)
        if not any(np_.estimator == "score" for np_ in summed.values()):
            summed_program = LogJoint(model, summed, program.rt)
            return laplace(summed_program, full=exact_hessian, structure=structure, on_eval=on_eval), \
                summed_program
    note = "cold start" + (" (score-function latents)" if program.score else "")
    return cold_start(dim, program.dtype, full, note, program.device), program


def mc_samples(config: FitConfig, vi: VI) -> int:
    """16 for small models; fewer for large data (the per-step cost grows with S x N, the noise does not);
    64 on the score path."""
    if config.mc_samples:
        return config.mc_samples
    default = vi.family.mc_samples or (64 if _noisy(vi) else 16)
    return max(1, min(default, (vi.family.mc_budget or MC_BUDGET) // vi.program.largest_node()))


def _noisy(vi: VI) -> bool:
    """Score-function gradients somewhere (the continuous block's estimator, or discrete q's)."""
    return vi.estimator.noisy or bool(vi.discrete)


def step_size(config: FitConfig, vi: VI, S: int, cold: bool) -> float:
    """In whitened units; smaller with few MC samples (noisier gradients), larger from a cold start,
    halved on the score path."""
    if config.lr is not None:
        return config.lr
    lr = vi.family.lr or (0.2 if cold else 0.1) * min(1.0, math.sqrt(S / 16))
    if _noisy(vi):
        lr = lr * 0.5
    return lr


def choose_optimizer(config: FitConfig, vi: VI, S: int) -> str:
    """auto: the fixed-draw finish (dadvi) where it applies and the data are small enough for 16 MC
    samples per step; Adam when the user tunes the stochastic steps (`steps`, `lr`, `mc_samples`)
    and for large data (per-step noise is small there, and each pass over the data is dear)."""
    fixed = OPTIMIZERS["dadvi"]
    if config.optimizer == "auto" and vi.family.optimizer:
        return vi.family.optimizer
    if config.optimizer == "auto":
        tuned = config.steps is not None or config.lr is not None or config.mc_samples is not None
        fits = S >= 16 or vi.family.prefers_fixed_draws      # (graph: few draws whatever the data size)
        return "dadvi" if fixed.applies(vi) and not tuned and fits else "adam"
    if not OPTIMIZERS[config.optimizer].applies(vi):
        OPTIMIZERS[config.optimizer].refuse(config)
    return config.optimizer


def optimise(vi: VI, config: FitConfig, S: int, lr: float, cold: bool, progress, gen):
    """-> (OptimResult, the optimiser used)."""
    name = choose_optimizer(config, vi, S)
    max_steps = MAX_STEPS if config.steps is None else config.steps
    # a cold start begins far from the optimum, where Stan's relative tolerance stops too early
    # (radon-like K=85: 600 steps left sigma_a 0.23 sd off the long run; 1600 steps: 0.03)
    min_steps = max(config.min_steps, COLD_MIN_STEPS) if cold else config.min_steps
    args = dict(S=S, lr=lr, max_steps=max_steps, tol=config.tol, min_steps=min_steps, progress=progress,
                cold=cold, gen=gen, on_eval=_ticker(progress))
    result: Optional[OptimResult] = OPTIMIZERS[name].run(vi, **args)
    if result is None:          # the optimiser could not start (dadvi: not finite at the start): Adam
        name = "adam"
        result = OPTIMIZERS[name].run(vi, **args)
    return result, name


def psis_draws(largest: int) -> int:
    """1000 draws of q for PSIS, fewer (down to 200) when one pass over the data is large."""
    return min(1000, max(200, PSIS_BUDGET // largest))


def draw_and_diagnose(vi: VI, draws: int, gen: torch.Generator, on_chunk=None):
    """-> (draws by name in constrained space, PSIS result, seconds for the draws, seconds for PSIS).
    PSIS needs log p at each of its draws: 1000 of them, fewer when one pass over the data is large;
    the reported draws need only values (no densities), except to draw enumerated latents."""
    t0 = time.perf_counter()
    program, fam, dq = vi.program, vi.family, vi.discrete
    with torch.no_grad():
        n_psis = psis_draws(program.largest_node())
        n_all = max(n_psis, draws)
        theta, log_q = fam.rsample_with_log_q(n_all)
        z = {k: q.sample(n_all) for k, q in dq.items()}
        log_q_z = sum((q.log_q(z[k]).reshape(n_all, -1).sum(-1) for k, q in dq.items()),
                      torch.zeros(n_all, dtype=program.dtype, device=program.device))
        chunk = program.chunk_size()
        values: Dict[str, List[np.ndarray]] = {}
        log_p = []
        for i in range(0, n_all, chunk):
            need_p, need_v = i < n_psis, i < draws
            ev = program.evaluate(theta[i:i + chunk], {k: v[i:i + chunk] for k, v in z.items()},
                                  keep_enum=need_v, densities=need_p or bool(program.enum))
            if need_p:
                log_p.append(ev.total[: n_psis - i])
            if need_v:
                for k, v in program.values(ev, gen).items():
                    values.setdefault(k, []).append(to_numpy(v[: draws - i]).copy())
            if on_chunk is not None:
                on_chunk(None)
        log_p = torch.cat(log_p)
    t_draws = time.perf_counter() - t0
    t0 = time.perf_counter()
    ps = psis(to_numpy(log_p - log_q[:n_psis] - log_q_z[:n_psis]))
    out = {k: np.concatenate(v, 0)[:draws] for k, v in values.items()}
    return out, ps, t_draws, time.perf_counter() - t0
