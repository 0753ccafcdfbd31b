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

from ..config import INITS, FitConfig, resolved_device
from ..frontend.check import Model
from ..posterior import PosteriorMethods, QDraws
from ..structure import structure as structure_of
from ..plan import centred_latents, describe, plan as make_plan
from ..backend.log_joint import Evaluation, LogJoint
from ..backend.runtime import Runtime, to_numpy
from .engine import OPTIMIZERS, VI, OptimResult
from . import amortized, budget, improper, minibatch, relaxed, relaxed_rows, windows
from .discrete import discrete_families
from .draw_stats import column_stats, weighted_column_stats
from .families import FAMILIES
from .laplace import FULL_HESSIAN_MAX, Start, cold_start, laplace
from .objectives import OBJECTIVES, log_evidence
from .psis import psis, verdict
from ..posterior import Approximation

AUTO_FULLRANK_MAX = 200
GRAPH_MAX_GLOBALS = 200    # auto takes the graph family when the structure has at most this many globals
# (validated against NUTS on five hierarchies at K = 1,000 and the non-centred one at K = 10,000; its
# start, the globals' Laplace-marginal mode, does not degrade with K as the joint mode does)
COLD_MIN_STEPS = 1500      # no convergence check before this many steps after a cold start
MAX_STEPS = 10000          # Adam's step cap when `steps` is not given
MC_BUDGET = 200_000        # elements per step: S = min(16, MC_BUDGET / size of the largest variable)
PSIS_BUDGET = 200_000_000  # elements: the draws for k-hat cost at most about this many element-evaluations
SAMPLE_BUDGET = 2_000_000 # elements: q's draws for the summary and PSIS are made in chunks above this
SMALL_DATA = 1_000_000     # elements: below this, one thread beats two (thread wake-ups dominate)
PSIS_CORRECT_KHAT = 0.7    # below this k-hat the summaries are importance-weighted (Yao et al. 2018) ...
PSIS_CORRECT_ESS = 500     # ... when the weights leave this many effective draws (a mean's Monte Carlo error
                           # <= 0.045 sd; hier_slopes_k1000 with 1000 draws at ESS < 30%: one of 2,005
                           # corrected means 0.28 sd off NUTS, q's own all within 0.13)


@dataclass(kw_only=True, repr=False)
class Fit(PosteriorMethods):
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
    q: Optional[object] = None                # the fitted approximation (ppl.posterior.Approximation)
    q_draws: Optional[QDraws] = None          # the reported draws' theta, z, log p, log q
    # enumerated latents: mean and sd of their exact conditionals averaged over q's draws (Rao-Blackwellised;
    # the summary's mean and sd, with quantiles from the draws)
    moments: Dict[str, tuple] = field(default_factory=dict)
    weights: Optional[np.ndarray] = None      # PSIS-smoothed normalised importance weights of the first
                                              # len(weights) draws (None: not computed)
    log_weights: Optional[np.ndarray] = None  # raw log p(y, theta) - log q(theta) of those draws
    objective_note: str = ""                  # what the objective is (with K or alpha), for the header
    objective_value: float = float("nan")     # the objective at the fitted q, from fresh draws ...
    objective_se: float = float("nan")        # ... and its Monte Carlo error
    log_evidence: float = float("nan")        # log p(y) by importance sampling over the draws of q ...
    log_evidence_se: float = float("nan")     # ... and its Monte Carlo error (nan where k-hat >= 0.7)
    amortization: Dict[str, float] = field(default_factory=dict)   # encoders: refine_local's gap (amortized.py)
    holdout: Dict[str, float] = field(default_factory=dict)        # encoders: the held-out rows' ELBO per row
    params: Dict[str, np.ndarray] = field(default_factory=dict)   # `param` point estimates: name -> value

    @property
    def weights_ess(self) -> float:
        """The effective number of the weighted draws, 1 / sum w^2 (0 without weights)."""
        return 0.0 if self.weights is None else float(1.0 / np.sum(self.weights ** 2))

    @property
    def corrected(self) -> bool:
        """Whether `summary()` is PSIS-corrected: k-hat < PSIS_CORRECT_KHAT, and the weights leave at
        least PSIS_CORRECT_ESS effective draws (else the weighting's Monte Carlo error, over
        hundreds of parameters, outweighs what it corrects)."""
        return self.weights is not None and self.khat < PSIS_CORRECT_KHAT and \
            self.weights_ess >= PSIS_CORRECT_ESS

    def summary(self, corrected: Optional[bool] = None) -> Dict[str, Dict[str, float]]:
        """Stan-style flattened names (1-based) -> mean, sd, q5, q50, q95.  `corrected` (default: where
        k-hat < 0.7, `self.corrected`): the draws of q weighted by their PSIS-smoothed importance
        weights (Yao et al. 2018), which moves q's answers towards the posterior's; False: q's own."""
        use = self.corrected if corrected is None else (corrected and self.weights is not None)
        out = {}
        for name, arr in self.draws.items():
            flat = arr.reshape(arr.shape[0], -1)
            if use:
                n = min(len(self.weights), flat.shape[0])
                q, mean, sd = weighted_column_stats(flat[:n], self.weights[:n])
            else:
                q, mean, sd = column_stats(flat)     # inf or huge draws without NumPy warnings
            if name in self.moments:            # enumerated latents: their exact conditionals' moments
                mean, sd = (np.asarray(a).reshape(-1) for a in self.moments[name])
            for j, key in enumerate(_flat_names(name, arr.shape[1:])):
                out[key] = {"mean": float(mean[j]), "sd": float(sd[j]), "q5": float(q[0, j]),
                            "q50": float(q[1, j]), "q95": float(q[2, j])}
        return out

    def gather_data(self) -> None:
        """Each process of a data-parallel fit read its own rows of the data (ppl.dist): join them on
        the first process, whose fit then holds the model checked on the whole data, as one process
        reading it checks it -- what `save` (data.json, fit.nc's data and predictive groups) and
        `predict` need.  A collective: every process calls it, once (`ppl fit --out` does, before the
        first process writes).  The first then holds the whole data, as one process does.  Nothing to
        do where the fit holds every row (one process, or each read the whole data)."""
        if self.model.row_share is None:
            return
        whole = _whole_data_model(self.model)
        if whole is not None:
            self.model = whole

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


@dataclass
class Prepared:
    """The compiled model and what every family's fit of it shares."""
    model: Model
    config: FitConfig
    rt: Runtime
    device_note: str
    node_plans: dict
    program: LogJoint
    wins: Optional[object]
    largest: int
    structure: Optional[object]
    mb_local: bool
    timings: Dict[str, float]
    t_start: float
    amortized: bool = False           # encoders declared in the model (amortized.py)
    mb_config: Optional[FitConfig] = None   # the config the minibatch path runs (encoders: all rows a batch)
    held_model: Optional[Model] = None      # the held-out rows (--holdout)


@dataclass
class Attempt:
    """One family's fit, diagnosed: what `Fit` is made of (escalation compares these)."""
    method: str
    why: str
    family: object
    vi: VI
    result: OptimResult
    optimizer: str
    init_note: str
    S: int
    lr: float
    settled: Optional[tuple]
    node_plans: dict
    program: LogJoint
    wins: Optional[object]
    diagnosed: tuple                  # draw_and_diagnose's result
    label: str
    text: str
    elbo: float
    seconds: float
    timings: Dict[str, float]
    work: int = 0                     # draws of the log density it evaluated (LogJoint.work)
    relax_note: str = ""              # why auto chose the relaxed estimator (or not)
    gap: dict = field(default_factory=dict)     # the amortisation gap (--refine-local)
    held: dict = field(default_factory=dict)    # held-out rows' ELBO per row (--holdout)


def fit(model: Model, config: FitConfig, progress=None) -> Fit:
    """Fit `model` as `config` says (`progress(step, max_steps, value)` is called after each Adam step).
    `method=auto` fits the family that suits the model's size and, where its diagnostics say it misses,
    richer ones within a time bound (ppl/infer/escalate.py), keeping the best."""
    prep = prepare(model, config, progress)
    method, why = first_method(prep)
    attempt = fit_family(prep, method, why, progress)
    if config.method == "auto" and not prep.mb_local and config.batch_size is None:
        from .escalate import escalate
        attempt = escalate(prep, attempt, progress)
    return make_fit(prep, attempt)


def prepare(model: Model, config: FitConfig, progress=None) -> Prepared:
    """Plan the estimators, compile the log joint, check the budget and find the posterior's structure."""
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    held_model = None
    if config.holdout is not None:             # the fit sees the other rows (amortized.split_holdout)
        model, held_model = amortized.split_holdout(model, config)
    device, device_note = resolved_device(config)
    rt = Runtime.make(device, config.dtype, config.seed)
    set_threads(model)

    t0 = time.perf_counter()
    node_plans = make_plan(model, config.estimator, config.opt, relax=relaxed_rows.auto_relax(model, config))
    program = LogJoint(model, node_plans, rt)
    node_plans, program, wins = count_windows(model, node_plans, program, config, rt)
    largest = program.largest_node()
    # the budget before anything that scales with the model (the structure's maps included)
    budget.check(model, program, choose_method(config.method, program.dim)[0], config,
                 config.mc_samples or max(1, min(64, MC_BUDGET // largest)), psis_draws(largest))
    mb_local = False
    amortized_ = bool(model.encoders)             # encoders declared in the model (amortized.py)
    if config.batch_size is not None:
        minibatch.check(model, program, config)
        mb_local = bool(minibatch.local_blocks(program))
    if amortized_:
        amortized.check(program, config)
        mb_local = True
    elif config.refine_local is not None:
        from ..errors import UsageError
        raise UsageError(f"{config.opt('refine_local')} refines the rows of encoders; this model declares none "
                         f"(amortize LATENT from DATA ...)")
    mb_local = mb_local or relaxed_rows.active(model, program, config)
    mb_config = config if config.batch_size is not None or not amortized_ else \
        replace(config, batch_size=model.rows.size, epochs=config.epochs or config.steps)
    mb_config = minibatch.global_batch(mb_config, model.rows.size)
    structure = None if mb_local else model_structure(model, node_plans, program, config.method)
    shard(model, program, wins, config)
    timings["compile"] = time.perf_counter() - t0
    return Prepared(model, config, rt, device_note, node_plans, program, wins, largest, structure, mb_local,
                    timings, t_start, amortized_, mb_config, held_model)


def _procs(model: Model) -> str:
    from .. import dist
    g = dist.current()
    own = model.row_share
    return (f", {g.world} processes (torch.distributed, {dist.backend()})" +
            (f"; each read its own rows (process 0: rows {own.lo + 1}..{own.hi} of {own.n}, {own.how})"
             if own is not None else "")) if g is not None else ""


def shard(model: Model, program: LogJoint, wins, config: FitConfig) -> None:
    """In a data-parallel fit (ppl.dist), this process evaluates its share of the rows."""
    from .. import dist
    group = dist.current()
    if group is None:
        return
    from ..errors import UsageError
    o = config.opt
    why = ("encoders (amortize) with " + (o('holdout') if config.holdout is not None else o('refine_local'))
           if model.encoders and (config.holdout is not None or config.refine_local is not None) else
           "discrete latents on the score path" if program.score else
           "counts summed over windows" if wins is not None else
           "no row axis in the data" if model.rows.size is None else None)
    if why:
        raise UsageError(f"{config.opt('procs')} cannot split this fit over processes yet: {why}")
    own = model.row_share           # each process read its own rows (ppl.data.RowShare)
    if own is not None:
        diags = minibatch.mixing_diagnostics(model, f"{config.opt('procs')} with each process reading its own "
                                                    f"rows ({own.how})", "process")
        if diags:
            from ..errors import PplError
            raise PplError(diags)
        # byte ranges hold unequal rows: every pass over the rows makes as many chunks as the longest's
        longest = max(int(n) for n in dist.all_gather_object(own.hi - own.lo))
        program.use_shard(own.lo, own.hi, group.leader, group.world, local=True, longest=longest)
        return
    lo, hi = dist.share(model.rows.size, group.rank, group.world)
    program.use_shard(lo, hi, group.leader, group.world)


def first_method(prep: Prepared):
    """-> (family name, why): the user's, or auto's pick for the model's size and structure."""
    config, program = prep.config, prep.program
    if not prep.mb_local:
        return choose_method(config.method, program.dim, prep.structure)
    # the globals' family: chosen by their dimension; locals get their rows
    method, why = choose_method(config.method, program.dim - sum(b.size for b in
                                                                minibatch.local_blocks(program)))
    if FAMILIES[method].needs_structure:
        from ..errors import UsageError
        raise UsageError(f"{config.opt('method', method)} cannot serve the globals of a model with local "
                         f"latents under {config.opt('batch_size')} or with an encoder (amortize)")
    return method, why


def fit_family(prep: Prepared, method: str, why: str, progress=None, base=None) -> Attempt:
    """Fit the family `method` and diagnose it.  `base`: an earlier Attempt whose fitted family this one
    may start from (the flow and the mixture start from a full-rank fit)."""
    t_fit, work0 = time.perf_counter(), prep.program.work
    model, config, rt = prep.model, prep.config, prep.rt
    node_plans, program, wins, structure, mb_local = (prep.node_plans, prep.program, prep.wins,
                                                       prep.structure, prep.mb_local)
    amortized_, mb_config, held_model = prep.amortized, prep.mb_config, prep.held_model
    timings: Dict[str, float] = dict(prep.timings)
    announce(progress, program, method, config, prep.largest)

    fam_cls = FAMILIES[method]
    reuse = base is not None and fam_cls.base_family == base.method
    t0 = time.perf_counter()
    if reuse:
        node_plans, program, wins = base.node_plans, base.program, base.wins
        start, start_program = None, program
    else:
        _phase(progress, "mode search")
        # a minibatch fit's start: on a subsample of the rows (minibatch.start_program)
        sub = program if config.batch_size is None else minibatch.start_program(program, config)
        start, start_program = find_start(model, sub, config, fam_cls.preconditioner == "full",
                                          structure if fam_cls.needs_structure else None, _ticker(progress))
        for _ in range(2):   # windows from the Laplace draws; wider than the mode was found with: search again
            if wins is None or start_program is not sub:
                break
            status = windows.refine(program, start, wins, rt.generator())
            if status == "same":
                break
            if status == "too wide":     # those latents go to the score path
                node_plans, program, wins = count_windows(model, node_plans, program, config, rt,
                                                          frozenset(wins.too_wide))
            start, start_program = find_start(model, program, config, fam_cls.preconditioner == "full",
                                              structure if fam_cls.needs_structure else None, _ticker(progress))
        improper.after_laplace(start_program, start)      # a clamped direction that stays flat: exit 3
        if isinstance(start_program, minibatch.Subsample) and not start.cold:
            start.note += f" of {start_program.rows} random rows (scaled to {model.rows.size})"
    timings["init"] = time.perf_counter() - t0

    gen = rt.generator()
    if reuse:
        discrete = base.vi.discrete
    else:
        discrete = discrete_families(model, program, node_plans, gen)
        for q in discrete.values():          # a conditional q whitens the continuous latents by the start
            q.center(start.mu0, start.diagonal())
        score_start(model, config, program, start, start_program, discrete)
    serves = "score" if any(node_plans[n.name].estimator == "score" for n in model.latents()
                            if not n.discrete) else "relaxed" if any(p.estimator == "relaxed"
                                                                     for p in node_plans.values()) else "reparam"
    if mb_local:
        local_cls = relaxed_rows.RelaxedRows if relaxed_rows.active(model, program, config) else \
            amortized.Amortized if amortized_ else minibatch.RowLocal
        family, init_note = local_cls(fam_cls, start, program, gen, config), start.note
        discrete = getattr(family, "adopt", dict)(discrete)     # (a family that owns the discrete q's)
    elif reuse:                          # built on the fit already made
        family = fam_cls.from_base(base.family, program, gen, config)
        init_note = f"from the {base.method} fit above ({base.init_note})"
    elif fam_cls.base_family:            # fitted on top of another family's fit (the flow: full-rank)
        t0 = time.perf_counter()
        family, init_note = fit_base(fam_cls, start, gen, config, structure, program, discrete, node_plans,
                                     serves, progress)
        timings["base fit"] = time.perf_counter() - t0
    else:
        family, init_note = make_family(fam_cls, start, gen, config, structure), start.note
    vi = VI(program, family, OBJECTIVES[config.objective](config), discrete, node_plans, config,
            getattr(family, "serves", None) or ("amortized" if amortized_ else "row-local") if mb_local else serves)
    held = {}
    if held_model is not None:
        held = {"rows": held_model.rows.size, "fraction": config.holdout,
                "elbo_per_row_start": amortized.heldout_elbo(family, program, held_model, seed=config.seed)}

    S = mc_samples(config, vi) if mb_config.batch_size is None else minibatch.mc_samples(mb_config, program, family)
    relax_note = relaxed_rows.auto_note(model, config, node_plans)
    if config.estimator == "auto" and mb_config.batch_size is None and config.gradient == "auto" and \
            vi.objective.linear and relaxed.candidates(model, node_plans):   # score or relaxed, by gradient variance
        relaxed_plans = make_plan(model, "auto", config.opt, relax=frozenset(relaxed.candidates(model, node_plans)))
        vi_relaxed = VI(program, family, vi.objective, discrete, relaxed_plans, config, "relaxed")
        relax, relax_note = relaxed.choose(vi, vi_relaxed, S)
        if relax:
            node_plans, vi = relaxed_plans, vi_relaxed
            S = mc_samples(config, vi)

    t0 = time.perf_counter()
    cold = (start is not None and start.cold) and not fam_cls.base_family   # (a family built on a fit starts warm)
    lr = step_size(config, vi, S, cold)
    watched = improper.watch(start_program, family, progress)     # checks q every 500 Adam steps
    _phase(progress, "optimise")
    if mb_config.batch_size is None:
        result, optimizer = optimise(vi, config, S, lr, cold, watched, gen)
        for _ in range(2):   # a window that misses mass at q's draws: widened, and the fit resumed
            if wins is None or not windows.recheck(program, family, wins):
                break
            wins.refits += 1
            more, optimizer = optimise(vi, config, S, lr, cold, watched, gen)
            result = OptimResult(result.trace + more.trace, more.converged, result.steps + more.steps,
                                 result.evals + more.evals, more.fixed_draws)
    else:
        result, optimizer = minibatch.optimise(vi, mb_config, S, lr, watched), "adam"
        if hasattr(family, "finish"):          # its discrete q's, every row's logits, for the draws
            vi.discrete = family.finish()
        why = "; ".join(x for x in (why, family.describe() if mb_local else "",
                                    minibatch.describe(mb_config, result, model.rows.size)
                                    if config.batch_size is not None else f"{result.steps} steps on all rows")
                        if x)
    improper.check_q(start_program, family, start is not None and start.cold)   # q grew along a flat direction
    timings["optimise"] = time.perf_counter() - t0

    settled = family.settle(program, gen)                         # e.g. the flow against its start

    _phase(progress, "draws")
    diagnosed = draw_and_diagnose(vi, config.draws, gen, _ticker(progress))
    ps = diagnosed[1]
    timings["draws"], timings["khat"] = diagnosed[2], diagnosed[3]
    label, text = judge(model, config, method, result, ps, settled)
    # the ELBO: the fixed-draw optimum's value, or the mean of Adam's last 100 estimates
    tail = result.trace[-1:] if result.evals else result.trace[-100:] if result.trace else [float("nan")]
    if mb_config.batch_size is not None:         # minibatch estimates are noisy: one pass over all rows
        # (without local latents: the PSIS draws' pass, which k-hat needs anyway)
        tail = [minibatch.full_elbo(vi)] if mb_local else [float(np.mean(diagnosed[6]))]
    if held:
        held["elbo_per_row"] = amortized.heldout_elbo(family, program, held_model, seed=config.seed)
    gap = {}
    if config.refine_local is not None:
        t0 = time.perf_counter()
        _phase(progress, "refine rows")
        r = amortized.refine(family, program, config.refine_local, config.seed)
        gap = {k: v for k, v in r.items() if not k.startswith("rows_")}
        timings["refine"] = time.perf_counter() - t0
    elbo = settled[1] if settled else float(np.mean(tail))
    return Attempt(method, why, family, vi, result, optimizer, init_note, S, lr, settled, node_plans, program,
                   wins, diagnosed, label, text, elbo, time.perf_counter() - t_fit, timings,
                   prep.program.work - work0 + (program.work if program is not prep.program else 0), relax_note,
                   gap, held)


def judge(model: Model, config: FitConfig, method: str, result: OptimResult, ps, settled, tried=()):
    """-> (label, verdict text) of a fit from its PSIS diagnostics (and the family's note on how it
    settled); `tried`: the families auto has fitted (not advised again)."""
    label, text = verdict(ps.khat, ps.ess, FAMILIES[method], result.converged, ps.ess_raw, ps.sd_log_w,
                          centred_latents(model), config.opt, tried=tried)
    return label, text + ("; " + settled[0] if settled else "")


def make_fit(prep: Prepared, a: Attempt) -> Fit:
    """The chosen attempt as the user's `Fit`."""
    config = prep.config
    draws, ps, _, _, q_draws, moments, log_w, pw = a.diagnosed
    obj = a.vi.objective
    obj_value, obj_se = obj.estimate(log_w, a.S)
    evidence, evidence_se = log_evidence(log_w)
    if not ps.khat < PSIS_CORRECT_KHAT:
        evidence_se = float("nan")
    weights = pw.weights[:config.draws] / pw.weights[:config.draws].sum()    # the reported draws' own
    shard_batch = a.program.batch
    a.program.use_full_data()        # (a data-parallel fit: what follows is the first process's, alone)
    f = Fit(model=prep.model, config=config, method=a.method, method_note=a.why,
               estimator=describe(a.node_plans, a.wins.text() if a.wins else None) + _zero_draws(a.vi) +
               (f"; {a.relax_note}" if a.relax_note else ""),
               objective=config.objective,
               draws=draws, elbo_trace=a.result.trace, elbo=a.elbo, steps=a.result.steps,
               converged=a.result.converged, khat=float(ps.khat), ess=float(ps.ess), sd_log_w=float(ps.sd_log_w),
               verdict=a.text, verdict_label=a.label, init=a.init_note,
               seconds=time.perf_counter() - prep.t_start,
               timings=a.timings, lr=a.lr, mc_samples=a.S, optimizer=a.optimizer, evals=a.result.evals,
               fixed_draws=a.result.fixed_draws, moments=moments,
               device=str(prep.rt.device) + (f" ({prep.device_note})" if prep.device_note else "") + _procs(prep.model),
               q=Approximation(a.program, a.family, a.vi.discrete, a.node_plans, a.method, prep.structure, a.wins),
               q_draws=q_draws, weights=weights, log_weights=log_w, objective_note=obj.describe(a.S),
               objective_value=obj_value, objective_se=obj_se, log_evidence=evidence,
               log_evidence_se=evidence_se, amortization=a.gap, holdout=a.held, params=a.program.params.values())
    if a.program.local_rows and shard_batch.shard is not None:
        f._pointwise = _own_rows_pointwise(f, a.program, shard_batch)
    return f


def _own_rows_pointwise(f: Fit, program: LogJoint, shard_batch) -> Optional[Dict[str, np.ndarray]]:
    """Each process read its own rows (ppl.dist): the pointwise log-likelihood of the reported draws
    (fit.nc's log_likelihood group), each process's rows joined on the first process -- now, while
    every process is here (None where fit.nc would leave it out: too many numbers)."""
    from .. import netcdf
    from ..loo import pointwise_log_likelihood
    model = f.model
    S = 0 if f.q_draws is None else len(f.q_draws.log_p)
    n_obs = sum(int(np.prod(model.nodes[n].shape)) for n in model.order if model.nodes[n].kind == "observed")
    if S == 0 or S * n_obs > netcdf.MAX_ELEMENTS:
        return None
    program.batch = shard_batch
    try:
        local = pointwise_log_likelihood(f)
    finally:
        program.use_full_data()
    out = {}
    for k, v in local.items():
        t = _joined(model, k, torch.from_numpy(v), 1, shard_batch.global_terms)
        if t is not None:
            out[k] = t.numpy()
    return out


def _whole_data_model(model: Model) -> Optional[Model]:
    """Each process read its own rows (ppl.dist): the model checked with every process's rows of the
    data joined on the first process (None on the others; `Fit.gather_data`).  The other data (sizes,
    level labels, columns without the row axis) are the same on every process (ppl.data._own_rows)."""
    from .. import dist
    from ..data import DataSet
    from ..frontend import ast as A
    from ..frontend.check import check
    sym = model.rows.symbol
    values = {}
    for st in model.program.statements:            # in source order: the same collectives on every process
        if not isinstance(st, A.DataDecl) or st.name not in model.values:
            continue
        v = np.asarray(model.values[st.name])
        if st.type.dims and st.type.dims[0].value == sym:
            v = dist.gather_rows(torch.from_numpy(np.ascontiguousarray(v)), 0)
            v = None if v is None else v.numpy()
        values[st.name] = v
    if not dist.current().leader:
        return None
    ds = DataSet(values=values, dims=dict(model.dims), levels={k: list(v) for k, v in model.levels.items()})
    return check(model.program, model.source, lambda decls, syms: ds)


def _joined(model: Model, name: str, v: torch.Tensor, dim: int, first: bool) -> Optional[torch.Tensor]:
    """A value of this process's rows (each process read its own: ppl.dist) -> every row's, on the
    first process (None on the others); a global value as it is on the first (`first`: this is it)."""
    from .. import dist
    if model.rows.is_row(name):
        return dist.gather_rows(v, dim)
    return v if first else None


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


def _zero_draws(vi: VI) -> str:
    """'; 12 draws of probability zero dropped' when the score path drew values the model rules out."""
    n = getattr(vi, "zero_draws", 0)
    return f"; {n} draws of probability zero dropped (q puts mass where the model has none)" if n else ""


def count_windows(model: Model, node_plans, program: LogJoint, config: FitConfig, rt: Runtime,
                  too_wide: frozenset = frozenset()):
    """Windows of the count latents summed by truncated enumeration, from prior draws; a latent whose
    window is too wide (or listed in `too_wide`) goes to the score path (the plan and the compiled model
    are then remade).  -> (plan, compiled model, windows or None)."""
    if too_wide:
        node_plans = make_plan(model, config.estimator, config.opt, too_wide)
        program = LogJoint(model, node_plans, rt)
    if not any(p.window for p in node_plans.values()):
        return node_plans, program, None
    while True:
        wins = windows.initial(program, rt.generator())
        if not wins.too_wide:
            return node_plans, program, wins
        too_wide = too_wide | frozenset(wins.too_wide)
        node_plans = make_plan(model, config.estimator, config.opt, too_wide)
        program = LogJoint(model, node_plans, rt)
        if not any(p.window for p in node_plans.values()):
            return node_plans, program, None


def set_threads(model: Model) -> None:
    """Tiny tensors run fastest on one thread; large data sets use every core."""
    n = max([int(np.prod(np.shape(v))) for v in model.values.values()] + [1])
    want = 1 if n < SMALL_DATA else (os.cpu_count() or 1)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        want = min(want, int(os.environ["OMP_NUM_THREADS"]))      # the user's limit
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
    if structure is not None and structure.n_groups and len(structure.globals) <= GRAPH_MAX_GLOBALS:
        sizes = sorted({int(b.shape[1]) for b in structure.buckets})
        return "graph", (f"auto: {dim} dimensions, {structure.n_groups} groups of "
                         f"{'/'.join(str(s) for s in sizes)} coupled only through {len(structure.globals)} "
                         f"globals")
    return "lowrank", f"auto: {dim} dimensions, no sparse structure for the graph family"


def make_family(fam_cls, start: Start, gen, config: FitConfig, structure):
    pre = start.preconditioner(fam_cls.preconditioner)
    if not fam_cls.needs_structure:
        return fam_cls(pre, gen, config)
    precision = None
    if start.arrow is not None and pre.diag:
        precision = start.arrow.scaled(pre.A, structure.buckets, structure.globals)
    try:
        family = fam_cls(pre, gen, config, structure=structure, precision=precision)
        if precision is not None and start.arrow.marginal_globals:
            family.hold_global_marginal()      # the globals' Laplace-marginal: VI fits the groups given them
        return family
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
    if config.init not in INITS:                  # a saved fit's directory
        from ..posterior import warm_start
        return warm_start(program, config, full), program
    if config.init == "laplace" and dim > 0:
        if not program.score:
            return laplace(program, full=exact_hessian, structure=structure, on_eval=on_eval), program
        summed = make_plan(model, "auto", config.opt)
        summed_program = None
        if not any(np_.estimator == "score" for np_ in summed.values()):
            summed_program = LogJoint(model, summed, program.rt)
            if any(p.window for p in summed.values()) and \
                    windows.initial(summed_program, program.rt.generator()).too_wide:
                summed_program = None
        if summed_program is not None:
            return laplace(summed_program, full=exact_hessian, structure=structure, on_eval=on_eval), \
                summed_program
    note = "cold start" + (" (score-function latents)" if program.score else "")
    return cold_start(dim, program.dtype, full, note, program.device), program


def score_start(model: Model, config: FitConfig, program: LogJoint, start: Start, start_program: LogJoint,
                discrete) -> None:
    """Discrete q's on the score path start at the exact conditionals of their latents at the start point
    (the model with them summed out, where it can be: its mean and sd per element), not at the prior:
    draws that the data rule out jointly (a zero-inflated count: n = y unless z = 1) are then rare from
    the first step."""
    if not discrete or start.cold and program.dim:
        return
    summed = start_program if start_program is not program else None
    if summed is None:
        plan_s = make_plan(model, "auto", config.opt)
        if any(p.estimator == "score" for p in plan_s.values()):
            return
        summed = LogJoint(model, plan_s, program.rt)
        if any(p.window for p in plan_s.values()) and windows.initial(summed, program.rt.generator()).too_wide:
            return
    with torch.no_grad():
        ev = summed.evaluate(start.mu0.unsqueeze(0), keep_enum=True)
        moments = summed.enum_moments(ev)
    for name, q in discrete.items():
        if name in moments:
            m1, m2 = moments[name]
            q.match(m1[0], torch.sqrt(torch.clamp(m2[0] - m1[0] * m1[0], min=0.0)))


def mc_samples(config: FitConfig, vi: VI) -> int:
    """16 for small models; fewer for large data (the per-step cost grows with S x N, the noise does not);
    64 on the score path."""
    if config.mc_samples:
        return config.mc_samples
    default = vi.family.mc_samples or (64 if _noisy(vi) else 16)
    return max(1, min(default, (vi.family.mc_budget or MC_BUDGET) // vi.program.largest_node()))


def _noisy(vi: VI) -> bool:
    """Score-function gradients somewhere (the continuous block's estimator, or discrete q's not relaxed)."""
    return vi.estimator.noisy or (bool(vi.discrete) and vi.estimator.serves != "relaxed")


def step_size(config: FitConfig, vi: VI, S: int, cold: bool) -> float:
    """In whitened units; smaller with few MC samples (noisier gradients), larger from a cold start,
    halved on the score path."""
    if config.lr is not None:
        return config.lr
    lr = getattr(vi.family, "lr", None) or \
        (0.2 if cold else 0.1) * (min(1.0, math.sqrt(S / 16)) if vi.family.lr_follows_draws else 1.0)
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
    if not any(p.numel() for p in vi.parameters()):
        # nothing to fit (every latent summed out exactly): the value is log p(y)
        with torch.no_grad():
            value = float(vi.program.log_prob(torch.zeros((1, 0), dtype=vi.program.dtype,
                                                          device=vi.program.device))[0])
        return OptimResult([value], True, 0), "exact"
    name = choose_optimizer(config, vi, S)
    max_steps = MAX_STEPS if config.steps is None else config.steps
    # a cold start begins far from the optimum, where Stan's relative tolerance stops too early
    # (radon-like K=85: 600 steps left sigma_a 0.23 sd off the long run; 1600 steps: 0.03)
    min_steps = max(config.min_steps, COLD_MIN_STEPS) if cold else config.min_steps
    min_steps = max(min_steps, getattr(vi.estimator, "min_steps", 0))    # (relaxed: after the annealing)
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
    """-> (draws by name in constrained space, PSIS result, seconds for the draws, seconds for PSIS,
    the reported draws' theta, z, log p and log q, the Rao-Blackwellised moments of enumerated latents,
    the log importance ratios of all draws, the PSIS result whose weights correct the summaries).
    PSIS needs log p at each of its draws: 1000 of them, fewer when one pass over the data is large;
    the reported draws have theirs too (draws.csv, and the weights that correct the summaries).  The
    diagnostics (k-hat, ESS) come from the first `psis_draws` draws, as always.  A minibatch fit (each
    log p a pass over all rows) has log p at those draws only: its ELBO, k-hat and weights come from
    them, and its `q_draws` are those draws."""
    t0 = time.perf_counter()
    program, fam, dq = vi.program, vi.family, vi.discrete
    every = getattr(vi.config, "batch_size", None) is None          # log p at every draw
    with torch.no_grad():
        n_psis = psis_draws(program.largest_node()) if every else minibatch.pass_draws(program)
        if getattr(fam, "max_psis_draws", None):        # (a family whose joint is over every row: amortized.py)
            n_psis = min(n_psis, fam.max_psis_draws)
        n_all = max(n_psis, draws)
        chunk = program.chunk_size()
        # q's draws all at once, or chunk by chunk where they would be large (thousands of latents)
        at_once = n_all * fam.dim <= SAMPLE_BUDGET
        if not at_once:
            chunk = max(1, min(chunk, SAMPLE_BUDGET // max(1, fam.dim)))
        values: Dict[str, List[np.ndarray]] = {}
        sums: Dict[str, List[torch.Tensor]] = {}
        log_p, log_q, kept_theta, kept_z = [], [], [], {}
        values_gen = gen if program.batch.shard is None else \
            torch.Generator(device=program.device).manual_seed(program.rt.seed + 1)

        def sample(n):
            theta, lq = fam.rsample_with_log_q(n)
            z = {k: q.sample(n, theta) for k, q in dq.items()}
            lq = lq + sum((q.log_q(z[k], theta).reshape(n, -1).sum(-1) for k, q in dq.items()),
                          torch.zeros(n, dtype=program.dtype, device=program.device))
            return theta, z, lq

        # nothing continuous and nothing on the score path: every draw has the same exact conditionals,
        # evaluated once and drawn from chunk by chunk
        static = program.dim == 0 and not dq and bool(program.enum)
        if at_once:
            theta_all, z_all, lq_all = sample(n_all)
        ev0 = program.evaluate(theta_all[:1] if at_once else sample(1)[0], {}, keep_enum=True) if static else None
        # log p at the draws beyond PSIS's only where their weights may be used (a family that asks:
        # each of its log p is a pass over every row): k-hat of PSIS's draws first
        full_p, judged = every, not (every and getattr(fam, "rest_after_khat", False))
        if not judged:
            chunk = min(chunk, n_psis)
        for i in range(0, n_all, chunk):
            need_p, need_v = i < n_psis, i < draws
            if not need_p and not judged:
                judged = True
                full_p = psis(to_numpy(torch.cat(log_p)[:n_psis] - torch.cat(log_q)[:n_psis])).khat < PSIS_CORRECT_KHAT
            if at_once:
                theta, z, lq = (theta_all[i:i + chunk], {k: v[i:i + chunk] for k, v in z_all.items()},
                                lq_all[i:i + chunk])
            else:
                theta, z, lq = sample(min(chunk, n_all - i))
            if static:
                c = theta.shape[0]
                ev = Evaluation(ev0.total.expand(c), ev0.env, {},
                                {k: L.expand((L.shape[0], c) + tuple(L.shape[2:])) for k, L in ev0.enum_logits.items()})
            elif not every and not program.enum and not isinstance(fam, minibatch.RowLocal):
                # log p over chunks of rows: no (draws, N) tensors (local latents: their rows' blocks)
                ev = program.evaluate(theta, z, keep_enum=need_v, densities=False)
                if need_p:
                    ev.total = minibatch.log_p_rows(program, theta)
            else:
                ev = program.evaluate(theta, z, keep_enum=need_v,
                                      densities=need_p or (need_v and full_p) or bool(program.enum))
            if need_p or full_p:
                log_p.append(ev.total)
                log_q.append(lq)
            own_rows = program.local_rows and program.batch.shard is not None
            if need_v and own_rows:
                # each process read its own rows: the values of its rows, joined on the first process
                # (ppl.dist.gather_rows; the values' generator is not the shared one)
                ev = program.evaluate(theta, z, keep_enum=True, densities=bool(program.enum))
            elif need_v and program.batch.shard is not None:
                # a data-parallel fit: the values of every row, on the first process only (its own
                # generator: the shared one must advance alike on every process)
                ev = program.evaluate(theta, z, keep_enum=True, batch=program.full_batch,
                                      densities=bool(program.enum)) \
                    if program.batch.global_terms else Evaluation(ev.total, {}, {}, {})
            if need_v:
                kept_theta.append(theta[: draws - i])
                for k, v in z.items():
                    kept_z.setdefault(k, []).append(v[: draws - i])
                for k, v in (program.values(ev, values_gen) if ev.env else {}).items():
                    v = _joined(program.model, k, v, 1, program.batch.global_terms) if own_rows else v
                    if v is not None:
                        values.setdefault(k, []).append(to_numpy(v[: draws - i]).copy())
                for k, (m1, m2) in (program.enum_moments(ev) if ev.env else {}).items():
                    if own_rows:
                        first = program.batch.global_terms
                        m1, m2 = _joined(program.model, k, m1, 1, first), _joined(program.model, k, m2, 1, first)
                        if m1 is None:
                            continue
                    m1, m2 = m1[: draws - i], m2[: draws - i]
                    acc = sums.setdefault(k, [0.0, 0.0, 0])
                    acc[0], acc[1], acc[2] = acc[0] + m1.sum(0), acc[1] + m2.sum(0), acc[2] + m1.shape[0]
            if on_chunk is not None:
                on_chunk(None)
        log_p, log_q = torch.cat(log_p), torch.cat(log_q)
        if not full_p:                    # exactly the final pass's draws (a chunk may hold more)
            log_p, log_q = log_p[:n_psis], log_q[:n_psis]
    t_draws = time.perf_counter() - t0
    t0 = time.perf_counter()
    log_w = to_numpy(log_p - log_q)
    ps = psis(log_w[:n_psis])
    pw = ps if n_all == n_psis or not full_p else psis(log_w)
    out = {k: np.concatenate(v, 0)[:draws] for k, v in values.items()}
    kept = draws if full_p else min(draws, n_psis)
    q_draws = QDraws(torch.cat(kept_theta)[:kept], {k: torch.cat(v)[:kept] for k, v in kept_z.items()},
                     to_numpy(log_p[:kept]).copy(), to_numpy(log_q[:kept]).copy())
    moments = {}
    for k, (s1, s2, n) in sums.items():
        mean = s1 / n
        moments[k] = (to_numpy(mean), to_numpy(torch.sqrt(torch.clamp(s2 / n - mean * mean, min=0))))
    return out, ps, t_draws, time.perf_counter() - t0, q_draws, moments, log_w, pw
