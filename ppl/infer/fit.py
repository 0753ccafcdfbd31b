"""fit: checked IR -> `Fit` (draws, summary, ELBO trace, PSIS diagnostics, verdict).

Pipeline: plan estimators -> compile the log joint -> Laplace start ->
family -> estimator -> Adam with a decaying step (iterate averaging over the
last window) -> draws in constrained space -> PSIS k-hat / ESS -> verdict.

Optimiser: Adam in whitened coordinates (see families.py) with
lr_t = lr / sqrt(1 + t / 100); convergence as Stan's (relative ELBO change
checked every 100 steps, mean or median of the recent changes below `tol`),
here on window means of the per-step ELBO estimates, never before
`min_steps`, and only once the last change is within 3 standard errors of
the per-step noise (no trend left).  A non-finite ELBO or gradient restores the last good parameters
and halves the step; after repeated failures the fit stops with exit 3,
naming the latents that went non-finite.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from ..errors import EXIT_NUMERIC, Diagnostic, PplError, UsageError
from ..frontend.check import Model
from ..plan import describe, plan as make_plan
from ..backend.log_joint import LogJoint
from .estimators import Estimator, discrete_families
from .families import FAMILIES, Preconditioner
from . import improper
from .draw_stats import column_stats
from .laplace import FULL_HESSIAN_MAX, cold_start, laplace
from .optim import Adam, lbfgs_vg
from .psis import psis, verdict

METHODS = ("auto",) + tuple(FAMILIES)
AUTO_FULLRANK_MAX = 200
DISCRETE_LR_SCALE = 4.0
COLD_MIN_STEPS = 1500    # no convergence check before this many steps after a cold start
WARMUP_STEPS = 300       # Adam steps before the fixed-draw finish after a cold start (none after Laplace)
FIXED_DRAW_MAX = 16384
FIXED_DRAW_BUDGET = 1_000_000   # elements per evaluation of the fixed-draw objective
FIXED_DRAW_CHUNK = 250_000       # elements per chunk of draws (bounds the memory of one evaluation)
OPTIMIZERS = ("auto", "adam", "dadvi")
FIXED_DRAW_ITERS = 1000
FIXED_DRAW_GTOL = 1e-3   # largest |gradient| in whitened units: the optimum is then ~0.001 sd away
MAX_WINDOWS = 50         # window averages kept for the final iterate average
MC_BUDGET = 200_000        # elements per step: S = min(16, MC_BUDGET / size of the largest variable)
PSIS_BUDGET = 200_000_000  # elements: the draws for k-hat cost at most about this many element-evaluations


@dataclass
class Fit:
    model: Model
    method: str
    estimator: str
    draws: Dict[str, np.ndarray]              # name -> (D, *shape), constrained
    elbo_trace: List[float]
    elbo: float
    steps: int
    converged: bool
    khat: float
    ess: float
    sd_log_w: float
    verdict: str
    verdict_label: str
    init: str
    seconds: float
    timings: Dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    mc_samples: int = 0
    optimizer: str = "adam"
    evals: int = 0                  # L-BFGS evaluations of the fixed-draw objective (dadvi)
    fixed_draws: int = 0

    def summary(self) -> Dict[str, Dict[str, float]]:
        """Stan-style flattened names (1-based) -> mean, sd, q5, q50, q95."""
        out = {}
        for name, arr in self.draws.items():
            flat = arr.reshape(arr.shape[0], -1)
            shape = arr.shape[1:]
            q, mean, sd = column_stats(flat)     # draw_stats.py: inf or huge draws without NumPy warnings
            for j in range(flat.shape[1]):
                key = name if not shape else f"{name}[{','.join(str(i + 1) for i in np.unravel_index(j, shape))}]"
                out[key] = {"mean": float(mean[j]), "sd": float(sd[j]), "q5": float(q[0, j]),
                            "q50": float(q[1, j]), "q95": float(q[2, j])}
        return out

    def draws_table(self):
        names, cols = [], []
        for name, arr in self.draws.items():
            flat = arr.reshape(arr.shape[0], -1)
            shape = arr.shape[1:]
            for j in range(flat.shape[1]):
                names.append(name if not shape else
                             f"{name}[{','.join(str(i + 1) for i in np.unravel_index(j, shape))}]")
                cols.append(flat[:, j])
        return names, (np.stack(cols, 1) if cols else np.zeros((0, 0)))


SMALL_DATA = 1_000_000   # elements: below this, one thread beats two (thread wake-ups dominate)


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold after big frees, so tensors of tens of MB are then
    carved from the heap and never returned: peak RSS on large data doubled.  Pin it at 1 MB."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)     # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def set_threads(model: Model) -> None:
    """Tiny tensors run fastest on one thread; large data sets use every core."""
    n = max([int(np.prod(np.shape(v))) for v in model.values.values()] + [1])
    want = 1 if n < SMALL_DATA else (os.cpu_count() or 1)
    if n >= SMALL_DATA:
        _return_freed_memory()
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


def choose_method(method: str, dim: int) -> str:
    if method not in METHODS:
        raise UsageError(f"unknown method '{method}' (methods: {', '.join(METHODS)})")
    if method == "auto":
        return "fullrank" if dim <= AUTO_FULLRANK_MAX else "lowrank"
    return method


def fit(model: Model, method: str = "auto", estimator: str = "auto", steps: Optional[int] = None,
        tol: float = 0.01, lr: Optional[float] = None, mc_samples: Optional[int] = None, draws: int = 1000,
        seed: int = 0, rank: Optional[int] = None, objective: str = "elbo", alpha: float = 0.5,
        init: str = "laplace", progress=None, timings: Optional[Dict[str, float]] = None,
        min_steps: int = 300, optimizer: str = "auto") -> Fit:
    t_start = time.perf_counter()
    timings = dict(timings or {})
    if draws < 1:
        raise UsageError("--draws must be at least 1")
    if steps is not None and steps < 0:
        raise UsageError("--steps must be non-negative")
    if mc_samples is not None and mc_samples < 1:
        raise UsageError("--mc-samples must be at least 1")
    if tol < 0:
        raise UsageError("--tol must be non-negative")
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer '{optimizer}' (optimizers: {', '.join(OPTIMIZERS)})")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    set_threads(model)
    dtype = torch.float64

    t0 = time.perf_counter()
    p = make_plan(model, estimator)
    lj = LogJoint(model, p, dtype)
    method = choose_method(method, lj.dim)
    timings["compile"] = time.perf_counter() - t0

    # ---- start: Laplace at the mode (needs every discrete latent summed out) ----
    t0 = time.perf_counter()
    full = method in ("fullrank", "flow")
    # score-path discrete latents: start from the Laplace fit of the model with them summed out, where possible
    lj_init = lj if not lj.score else LogJoint(model, make_plan(model, "auto"), dtype)
    if init == "laplace" and not lj_init.score and lj.dim > 0:
        lap = laplace(lj_init, dtype, full=lj.dim <= FULL_HESSIAN_MAX)
    else:
        lap = cold_start(lj.dim, dtype, full, "cold start" + (" (score-function latents)" if lj.score else ""))
    improper.after_laplace(lj_init, lap)      # improper posterior: a clamped direction that is flat -> exit 3
    if not full or lap.A.dim() == 1:
        lap.A = lap.diagonal()                                 # diagonal preconditioner
        if full:
            lap.A = torch.diag(lap.A)
    timings["init"] = time.perf_counter() - t0

    pre = Preconditioner(lap.mu0, lap.A)
    fam = FAMILIES[method](pre, gen, rank=rank)
    dq = discrete_families(model, lj, p, dtype, gen)
    cont = "score" if estimator == "score-all" else "reparam"
    est = Estimator(model, lj, fam, p, cont, objective, alpha, dq)
    progress = improper.watch(lj_init, fam, progress)   # improper posterior: checks q during Adam -> exit 3

    # MC samples: 16 for small models; fewer for large data (per-step cost grows with S x N, the noise does not)
    S = mc_samples or max(1, min(16 if cont == "reparam" and not dq else 64, MC_BUDGET // lj.largest_node()))
    max_steps = 10000 if steps is None else steps
    optimizer = choose_optimizer(optimizer, est, steps, lr, mc_samples, S)
    cold = not lap.note.startswith("Laplace")
    if lr is None:
        # in whitened units; smaller with few MC samples (noisier gradients), larger from a cold start
        lr = (0.2 if cold else 0.1) * min(1.0, math.sqrt(S / 16))
        if cont == "score" or dq:
            lr = lr * 0.5
    t0 = time.perf_counter()
    if cold:
        # a cold start begins far from the optimum, where Stan's relative tolerance stops too early
        # (radon-like K=85: 600 steps left sigma_a 0.23 sd off the long run; 1600 steps: 0.03)
        min_steps = max(min_steps, COLD_MIN_STEPS)
    evals = n_fixed = 0
    if optimizer == "dadvi":
        # Adam only to get near (a Laplace start already is); fixed draws and L-BFGS do the rest
        warm = min(max_steps, WARMUP_STEPS if cold else 0)
        trace, converged, n_steps = _optimise(est, lj, S, warm, tol, lr, warm, progress)
        n_fixed = _fixed_draw_count(fam.D, lj.largest_node(), method)
        evals, converged, values = _fixed_draw_finish(est, n_fixed, gen, lj.largest_node())
        trace = trace + values
        if not values:   # the fixed-draw objective was not finite at the start: stochastic steps after all
            optimizer, evals, n_fixed = "adam", 0, 0
    if optimizer == "adam":
        trace, converged, n_steps = _optimise(est, lj, S, max_steps, tol, lr, min_steps, progress)
    timings["optimise"] = time.perf_counter() - t0
    improper.check_q(lj_init, fam, cold)      # improper posterior: the fitted q grew along a flat direction -> exit 3

    # ---- draws and diagnostics ---------------------------------------------------------
    t0 = time.perf_counter()
    with torch.no_grad():
        # PSIS needs log p at each of its draws: 1000 of them, fewer when one pass over the data is
        # large; the reported draws need only values (no densities), except to draw enumerated latents
        M = min(1000, max(200, PSIS_BUDGET // lj.largest_node()))
        n = max(M, draws)
        if hasattr(fam, "rsample_with_log_q"):
            theta, log_q = fam.rsample_with_log_q(n)
        else:
            theta = fam.rsample(n)
            log_q = fam.log_q(theta)
        z = {k: q.sample(n) for k, q in dq.items()}
        log_q_z = sum((q.log_q(z[k]).reshape(n, -1).sum(-1) for k, q in dq.items()), torch.zeros(n, dtype=dtype))
        chunk = lj.chunk_size()
        values: Dict[str, List[np.ndarray]] = {}
        log_p = []
        for i in range(0, n, chunk):
            need_p, need_v = i < M, i < draws
            ev = lj.evaluate(theta[i:i + chunk], {k: v[i:i + chunk] for k, v in z.items()},
                             keep_enum=need_v, densities=need_p or bool(lj.enum))
            if need_p:
                log_p.append(ev.total[: M - i])
            if need_v:
                for k, v in lj.values(ev, gen).items():
                    values.setdefault(k, []).append(v[: draws - i].numpy().copy())
        log_p = torch.cat(log_p)
    timings["draws"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    log_w = (log_p - log_q[:M] - log_q_z[:M]).numpy()
    ps = psis(log_w)
    timings["khat"] = time.perf_counter() - t0
    label, text = verdict(ps.khat, ps.ess, method, converged, ps.ess_raw, ps.sd_log_w)
    draws_np = {k: np.concatenate(v, 0)[:draws] for k, v in values.items()}
    # the ELBO: the fixed-draw optimum's value, or the mean of Adam's last 100 estimates
    tail = trace[-1:] if evals else trace[-100:] if trace else [float("nan")]
    fit_ = Fit(model, method, describe(p), draws_np, trace, float(np.mean(tail)), n_steps, converged,
               float(ps.khat), float(ps.ess), float(ps.sd_log_w), text, label, lap.note,
               time.perf_counter() - t_start, timings, lr, S, optimizer, evals, n_fixed)
    return fit_


def _optimise(est: Estimator, lj: LogJoint, S: int, max_steps: int, tol: float, lr0: float, min_steps: int,
              progress):
    params = est.parameters()
    if not params or max_steps == 0:
        return [], False, 0
    # discrete q's logits take larger steps: their score gradients are small and they start far off
    n_cont = len(est.family.parameters())
    scales = [1.0] * n_cont + [DISCRETE_LR_SCALE] * (len(params) - n_cont)

    def make_opt(lr):
        return Adam(params, [lr * s for s in scales])
    opt = make_opt(lr0)
    window = 100
    trace: List[float] = []
    rel_changes: List[float] = []
    prev_mean = None
    good = [p.detach().clone() for p in params]
    avg = [torch.zeros_like(p) for p in params]
    values = [p.detach() for p in params]        # aliases (no autograd), for the running average
    n_avg = 0
    window_means: List[List[torch.Tensor]] = []
    failures = 0
    lr_scale = 1.0
    converged = False
    t = 0
    while t < max_steps:
        decay = lr_scale / math.sqrt(1.0 + t / 100.0)
        opt.zero_grad()
        try:
            objective = est.gradient(S)
            ok = math.isfinite(objective) and all(math.isfinite(float(p.grad.sum()))
                                                  for p in params if p.grad is not None)
        except (ValueError, RuntimeError, torch.linalg.LinAlgError):
            ok = False
        if not ok:
            failures += 1
            with torch.no_grad():
                for p, g in zip(params, good):
                    p.copy_(g)
            lr_scale *= 0.5
            opt = make_opt(lr0)
            if failures >= 8:
                _numeric_failure(est, lj, S)
            continue
        opt.step(decay)
        t += 1
        failures = max(0, failures - 1) if t % 50 == 0 else failures
        trace.append(objective)
        if t % 10 == 0:
            with torch.no_grad():
                for p, g in zip(params, good):
                    g.copy_(p)
        # iterate averaging over the current window
        with torch.no_grad():
            n_avg += 1
            for a, p in zip(avg, values):
                a.lerp_(p, 1.0 / n_avg)
        if progress is not None:
            progress(t, max_steps, objective)
        if t % window == 0:
            cur = float(np.mean(trace[-window:]))
            settled = False
            if prev_mean is not None:
                rel_changes.append(abs(cur - prev_mean) / max(abs(cur), 1.0))   # absolute when |ELBO| < 1
                # and no trend beyond the noise: the change between window means is within 3 standard errors
                se = math.sqrt((np.var(trace[-window:]) + np.var(trace[-2 * window:-window])) / window)
                settled = abs(cur - prev_mean) <= 3 * se
            prev_mean = cur
            if tol > 0 and t >= min_steps and rel_changes and settled:
                recent = rel_changes[-max(2, int(0.1 * max_steps / window)):]
                if np.mean(recent) < tol or np.median(recent) < tol:
                    converged = True
                    break
            window_means.append([a.clone() for a in avg])
            del window_means[:-MAX_WINDOWS]
            n_avg = 0
    # the result: the average iterate over the second half of the run (whole windows, plus the open one)
    if t >= 2:
        keep = window_means[-max(1, len(window_means) // 2):] if window_means else []
        parts = [(w, window) for w in keep] + ([(avg, n_avg)] if n_avg else [])
        total = sum(n for _, n in parts)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(sum(w[i] * (n / total) for w, n in parts))
    return trace, converged, t


def choose_optimizer(optimizer: str, est: Estimator, steps: Optional[int], lr: Optional[float],
                     mc_samples: Optional[int], S: int) -> str:
    """auto: the fixed-draw finish (dadvi) where it applies and the data are small enough for 16 MC
    samples per step; Adam when the user tunes the stochastic steps (`--steps N` runs N Adam steps;
    `--lr`, `--mc-samples`) and for large data (per-step noise is small there, and each pass over
    the data is dear)."""
    fits = est.closed_form
    if optimizer == "dadvi" and not fits:
        raise UsageError("--optimizer dadvi needs --method meanfield or fullrank, the ELBO, and no "
                         "discrete latents on the score path")
    if optimizer == "auto":
        tuned = steps is not None or lr is not None or mc_samples is not None
        return "dadvi" if fits and not tuned and S >= 16 else "adam"
    return optimizer


def _fixed_draw_count(D: int, largest: int, method: str) -> int:
    """Draws for the fixed-draw objective: as many as FIXED_DRAW_BUDGET elements per evaluation allow
    (up to 16384: a heavy-tailed direction, eight schools' tau, needs thousands), never
    fewer than 2D + 2 for a full-rank q (with M <= D its covariance can grow without bound in
    directions no draw sees)."""
    least = 2 * D + 2 if method == "fullrank" else 32
    return int(max(least, min(FIXED_DRAW_MAX, FIXED_DRAW_BUDGET // max(1, largest))))


def _fixed_draw_finish(est: Estimator, M: int, gen: torch.Generator, largest: int):
    """DADVI-style finish (Giordano, Ingram & Broderick 2024): fix M standard-normal draws and
    minimise the resulting deterministic negative ELBO with L-BFGS, in coordinates whitened by the
    warm-up's q.  The draws are moment-matched (mean 0, covariance I exactly), so for a Gaussian
    posterior the fixed-draw optimum is the exact one.  -> (evaluations, converged, objective values;
    none when the objective is not finite at the start)."""
    fam = est.family
    fam.rewhiten()
    D = fam.D
    eps = torch.randn((M, D), generator=gen, dtype=fam.dtype)
    eps = eps - eps.mean(0)
    if M > D:
        C = torch.linalg.cholesky(eps.T @ eps / M)
        eps = torch.linalg.solve_triangular(C, eps.T, upper=False).T
    else:
        eps = eps / eps.std(0, correction=0)

    values = []
    chunk = max(1, FIXED_DRAW_CHUNK // max(1, largest))     # memory: like one step of 16 MC samples

    def value_grad(x):
        with torch.no_grad():
            fam.flat.copy_(x)
        v, g = 0.0, None
        try:
            for i in range(0, M, chunk):
                part = eps[i:i + chunk]
                w = part.shape[0] / M
                vc = est.gradient_at(part)
                if not math.isfinite(vc):
                    return math.inf, None
                v += w * vc
                g = fam.flat.grad * w if g is None else g.add_(fam.flat.grad, alpha=w)
        except (ValueError, RuntimeError, torch.linalg.LinAlgError):
            return math.inf, None
        values.append(v)
        return -v, g

    x0 = fam.flat.detach().clone()
    x, evals, converged = lbfgs_vg(value_grad, x0, max_iter=FIXED_DRAW_ITERS, history=20, gtol=FIXED_DRAW_GTOL,
                                   ftol=1e-10)
    with torch.no_grad():
        fam.flat.copy_(x)
    fam.flat.grad = None
    return evals, converged, values


def _numeric_failure(est: Estimator, lj: LogJoint, S: int):
    with torch.no_grad():
        try:
            theta = est.family.rsample(S)
            z = {n: q.sample(S) for n, q in est.dq.items()}
            bad = lj.nonfinite_latents(theta, z)
        except (ValueError, RuntimeError):
            bad = []
    what = ", ".join(f"'{b}'" for b in bad) if bad else "the log density"
    src = lj.model.source
    raise PplError([Diagnostic(None, f"inference failed: {what} became non-finite (NaN or inf) repeatedly, "
                               f"even after reducing the step size; check the priors and the scale of the data, "
                               f"or try --lr smaller", src.path)], EXIT_NUMERIC)
