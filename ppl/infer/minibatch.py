"""Minibatch stochastic VI: `batch_size` rows per step, shuffled epochs.

Stage: (compiled model, family, start, `FitConfig` with `batch_size`) ->
optimised variational parameters, and the ELBO of the final q over the full
data.

Which terms are per row comes from the model graph (`Model.rows`, ppl.frontend.rows),
never from the user: the compiled model multiplies every per-row density
term by N/B for the batch at hand (B: its actual rows, so a ragged last batch
is scaled right) and leaves global terms alone; `check` refuses, as located
errors, nodes that mix rows (`sum(y)`, `mean(x)`, `y[1]`, `cumsum`), whose
value on a batch is not their value on the data.

Latents:
- global latents take the usual families (registry FAMILIES), on the Adam
  path (the fixed-draw optimiser needs the full data every evaluation);
  without local latents every batch carries a control variate
  (`ControlVariate`: SVRG's anchor gradient, refreshed each epoch), which
  cancels the subsampling noise to first order;
- a *local* latent (leading dimension the row axis, `z[N] ~ ...`) gets its own
  per-row variational parameters: `RowLocal` is q = q_global(globals) x
  prod_n N(z_n; m_n, diag s_n^2), one mean-field row per data row.  Only the
  batch's rows are drawn and updated, by natural-gradient steps (see the
  class), so a step costs O(B), never O(N); under `--procs` each process
  draws the whole batch's local noise and steps the rows of it that it
  owns.  Its gradient is the `row-local` estimator (registry GRADIENTS; a
  kind of its own, chosen only for this family).  The per-row part lives
  here, in one place: any registered family that needs no model structure
  serves the globals.

The run (`optimise`): shuffled batches each epoch from a generator seeded by
the fit's seed; Stan's relative-change test (engine.Convergence) and q's
moments settling (DRIFT_TOL), on windows of whole epochs (at least WINDOW
steps), or, when every latent is global and an epoch is longer than WINDOW
steps, on windows of WINDOW steps inside the epoch (10^6 rows in batches of
1024 stop in the first epoch).  Once they pass (or at the cap less the
averaging phase) the step size drops by DECAY and the iterates are averaged
over a phase at least as long again (globals per step, per-row parameters
per epoch; by steps: at least AVG_STEPS, after the SVRG anchor moves to
where phase 1 stopped).  Progress shows the epoch.  `full_elbo` is the
reported ELBO: one pass over all rows, in chunks, with the final q.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..errors import Diagnostic, PplError, UsageError
from ..frontend import ast as A
from ..frontend.rows import GLOBAL, MIXED, ROW, _rowness
from ..backend.runtime import Batch
from .engine import WINDOW, Averager, Convergence, OptimResult, ParamDrift, VI, record_step
from .estimators import GradientEstimator, register_gradient
from .families import Preconditioner

LOCAL_LR = 0.5            # per-row natural-gradient step size rho (1: the Gaussian row's optimum at once)
DECAY = 0.5               # step size factor for the averaging phase
AVG_STEPS = 1000          # windows by steps: the averaging phase's least length (and at least phase 1's)
EPOCH_STEPS = 10000       # default epoch cap: about this many steps (at least MIN_EPOCHS)
MIN_EPOCHS = 4
ELBO_DRAWS = 100          # least draws of q for the reported ELBO over the full data
ELBO_BUDGET = 200_000_000
CHUNK_ELEMENTS = 4_000_000
PASS_BUDGET = 100_000_000  # the final pass (ELBO, k-hat): about this many element-evaluations ...
PASS_DRAWS = 40            # ... but at least this many draws of q
START_ROWS = 50_000       # rows of the subsample the start (mode search) of a minibatch fit is found on
DRIFT_TOL = 0.1           # converged: q's means moved less than this many sds (RMS) over the last window
_LOG2PI = math.log(2 * math.pi)


# ---- the model under minibatches ----------------------------------------------------------------
def check(model, program, config) -> None:
    """Refuse what minibatches cannot serve: no row axis, B > N (usage errors), a node that mixes
    rows (a located error), discrete latents on the score path (their q is not scaled by rows)."""
    rows = model.rows
    o = config.opt
    if rows.symbol is None or rows.size is None:
        raise UsageError(f"{o('batch_size')} needs data with rows (a leading dimension shared by the data "
                         f"declarations); this model's data have none")
    config.check_rows(rows.size)
    diags = mixing_diagnostics(model, o('batch_size'))
    if diags:
        raise PplError(diags)
    from . import relaxed_rows                  # (it builds on this module)
    if program.score and not relaxed_rows.check(model, program, config):
        raise UsageError(f"{o('batch_size')} cannot fit discrete latents on the score path "
                         f"({', '.join(program.score)}); sum them out ({o('estimator', 'enumerate')}) or fit "
                         f"the full data")


def mixing_diagnostics(model, flag: str, part: str = "batch") -> List[Diagnostic]:
    """One located message per node that mixes rows, at the innermost sub-expression that does
    (`part`: what sees only some of the rows: each step's batch, or each process)."""
    rows = model.rows
    kind = {n: (ROW if n in rows.per_row else MIXED if n in rows.mixes_rows else GLOBAL) for n in model.nodes}
    out = []
    for name in model.order:
        if name not in rows.mixes_rows:
            continue
        node = model.nodes[name]
        exprs = ([node.expr] if node.expr is not None else []) + (list(node.dist.args) if node.dist else [])
        where = None
        for e in exprs:
            where = _innermost_mixing(e, kind, model.rank)
            if where is not None:
                break
        if isinstance(where, A.Name):            # it reads a node already reported
            continue
        span = where.span if where is not None else node.span
        what = f"'{A_text(where)}'" if where is not None else f"the density of '{name}'"
        sees = "each step sees only a batch of rows, so its value would be the batch's" if part == "batch" else \
            "each process sees only its own rows, so its value would be that process's"
        out.append(Diagnostic(span, f"{what} mixes the data rows (axis {rows.symbol}): under {flag} {sees}, "
                                    f"not the data's; compute it outside the model and pass it as data, or fit "
                                    f"without {flag.split(' with ')[0]}"))
    return out


def _innermost_mixing(e, kind, rank):
    if _rowness(e, kind, rank) != MIXED:
        return None
    for c in A.children(e):
        inner = _innermost_mixing(c, kind, rank)
        if inner is not None:
            return inner
    return e


def A_text(e) -> str:
    from ..frontend.check import A_text as text
    return text(e)


def local_blocks(program) -> list:
    rows = program.model.rows
    return [b for b in program.blocks if rows.is_row(b.name)]


# ---- batches ----------------------------------------------------------------------------------
class Epochs:
    """Shuffled batches of B rows, epoch after epoch (the last batch of an epoch may be smaller)."""

    def __init__(self, row_data, n_rows: int, batch_size: int, seed: int, device=None, shard: Batch = None,
                 offset: int = 0):
        self.row_data, self.N, self.B = row_data, n_rows, batch_size
        self.offset = offset          # the first row of `row_data` (each process read its own rows: ppl.dist)
        self.gen = torch.Generator().manual_seed((int(seed) * 2654435761 + 97) % (2 ** 63))
        self.per_epoch = -(-n_rows // batch_size)
        self.device = device
        self.shard = shard if shard is not None and shard.shard is not None else None

    def epoch(self) -> Iterator[Batch]:
        # one batch of every row: in order (the same objective; a node that mixes rows sees the data)
        perm = torch.arange(self.N) if self.B >= self.N else torch.randperm(self.N, generator=self.gen)
        if self.device is not None:
            perm = perm.to(self.device)
        for i in range(0, self.N, self.B):
            rows = perm[i:i + self.B]
            if self.shard is None:
                yield Batch.rows(self.row_data, rows, self.N)
                continue
            # a data-parallel fit (ppl.dist): the one-process batch, of which this process evaluates
            # the rows it owns
            yield Batch.own_rows(self.row_data, rows, self.N, self.shard, self.offset)


def pass_batches(program, chunk: int) -> Iterator[Batch]:
    """One pass over all rows in chunks of at most `chunk` rows: per-row terms unscaled, the global
    terms in the first chunk only (the chunks' log densities add up to the full one).  In a
    data-parallel fit: this process's rows, in as many chunks as every process makes (each
    evaluation is collective)."""
    N = program.model.rows.size
    shard = program.batch.shard
    lo, hi = shard if shard is not None else (0, N)
    longest = program.batch.longest if shard is not None else N
    for k in range(max(1, -(-longest // chunk))):
        a = min(hi, lo + k * chunk)
        yield row_range(program, a, min(hi, a + chunk), k == 0 and (shard is None or program.batch.global_terms))


def row_range(program, a: int, b: int, global_terms: bool) -> Batch:
    """Rows [a, b) of the whole data (this process's, in a data-parallel fit) as an unscaled batch of
    views; the global terms only where `global_terms`."""
    off = program.row_offset                     # (each process read its own rows: ppl.dist)
    return Batch({name: v[:, a - off:b - off] for name, v in program.row_data.items()}, 1.0, b - a,
                 index=torch.arange(a, b, device=program.device), shard=program.batch.shard,
                 global_terms=global_terms)


# ---- the start: the mode search on a subsample ------------------------------------------------
class Subsample:
    """The compiled model on START_ROWS rows drawn once (seeded), each per-row term scaled by N/n: the
    Laplace start (mode, Hessian) of a minibatch fit is found on it, so the fit does no full-data work
    before its final pass.  Its mode is the full data's to about sqrt(N/n) posterior sds and its
    curvature to a few percent, which the first epoch's steps make up.  Stands in for the compiled model
    wherever the start uses one (the mode search, the checks for flat directions)."""

    def __init__(self, program, rows: int, seed: int):
        N = program.model.rows.size
        gen = torch.Generator().manual_seed((int(seed) * 40503 + 11) % (2 ** 63))
        idx = torch.randperm(N, generator=gen)[:rows].sort().values.to(program.device)
        self.program, self.rows = program, rows
        if not (program.local_rows and program.batch.shard is not None):
            self.batch = Batch.rows(program.row_data, idx, N)
        else:                   # each process read its own rows (ppl.dist): the subsample's rows it holds
            self.batch = Batch.own_rows(program.row_data, idx, N, program.batch, program.row_offset)

    def __getattr__(self, name):
        return getattr(self.program, name)

    def evaluate(self, theta, discrete=None, *args, batch: Optional[Batch] = None, **kwargs):
        return self.program.evaluate(theta, discrete, *args, batch=self.batch if batch is None else batch,
                                     **kwargs)

    def log_prob(self, theta, discrete=None, batch: Optional[Batch] = None):
        return self.evaluate(theta, discrete, batch=batch).total

    def largest_node(self) -> int:
        return max(1, self.program.largest_node() * self.rows // self.program.model.rows.size)

    def chunk_size(self) -> int:
        return int(max(1, min(4096, 4_000_000 // self.largest_node())))


def start_program(program, config):
    """What the start of a minibatch fit is found on: a Subsample of START_ROWS rows (all of them when
    N is not larger, or when the model has local latents, whose rows the start must all place)."""
    N = program.model.rows.size
    if N is None or N <= START_ROWS or local_blocks(program):
        return program
    return Subsample(program, START_ROWS, config.seed)


# ---- per-row local latents --------------------------------------------------------------------
class RowLocal:
    """q = q_global(theta_g) x prod_n N(z_n; m_n, diag s_n^2) over the local latents' rows, in the
    unconstrained space, starting at the Laplace start's mean and conditional sds.  Duck-types a
    Family for the draws after the fit (`rsample_with_log_q`, `dim`); its gradient is `RowLocalGradient`.

    The rows take natural-gradient steps (Khan & Lin 2017, the Gaussian case): with g = E_q[d log p_n/dz]
    and h = E_q[d^2 log p_n/dz^2] (by Price's theorem, from E[g eps] / s), precision <- (1 - rho) / s^2 +
    rho (-h) and m <- m + rho g / precision.  This needs no whitening, so a poor start (a hierarchy's
    joint mode, where tau -> 0) costs a few epochs, not a diverging step; rho = 1 would jump to the
    optimum of a Gaussian row given the globals."""
    name = "row-local"
    gaussian = closed_form = False
    needs_structure = False

    def __init__(self, global_cls, start, program, gen, config):
        self.program, self.gen, self.config = program, gen, config
        N = program.model.rows.size
        self.N, self.dim = N, program.dim
        self.dtype, self.device = program.dtype, program.device
        locs = local_blocks(program)
        self.local_names = [b.name for b in locs]
        cols, self.layout, g_idx, k0, g0 = [], [], [], 0, 0
        for b in program.blocks:
            if b in locs:
                assert b.ushape and b.ushape[0] == N
                k = b.size // N
                cols.append(torch.arange(b.offset, b.offset + b.size, device=self.device).reshape(N, k))
                self.layout.append(("local", k0, k, b))
                k0 += k
            else:
                g_idx.append(torch.arange(b.offset, b.offset + b.size, device=self.device))
                self.layout.append(("global", g0, b.size, b))
                g0 += b.size
        self.K = k0
        L = torch.cat(cols, 1) if cols else \
            torch.zeros((N, 0), dtype=torch.long, device=self.device)  # (N, K) coordinates of theta
        g = torch.cat(g_idx) if g_idx else torch.zeros(0, dtype=torch.long, device=self.device)
        self.g_idx, self.l_idx = g, L
        sd = start.diagonal()
        mu0_g = start.mu0[g]
        if global_cls.preconditioner == "full":
            if start.A.dim() == 2:
                C = start.A[g]
                A_g = torch.linalg.cholesky(C @ C.T) if g.numel() else C[:, g]
            else:
                A_g = torch.diag(sd[g])
        else:
            A_g = sd[g]
        self.glob = global_cls(Preconditioner(mu0_g, A_g), gen, config)
        # [m | log s] per row, in theta
        self.loc = torch.cat([start.mu0[L], torch.log(sd[L])], 1).to(self.dtype).contiguous()
        self.lr_scale = 1.0
        self._avg, self._n_avg = None, 0

    # family protocol (what the engine and the draws use)
    lr = None                     # Adam's step size: the engine's default
    lr_follows_draws = True       # ... smaller with fewer MC samples
    mc_samples: Optional[int] = None    # MC samples per step by default (None: `mc_samples`'s rule)

    def hold(self) -> None:
        """The globals' family keeps what it holds fixed; the rows hold nothing."""
        self.glob.hold()

    def settle(self, program, gen):
        """Nothing to compare against (the flow's check against its start does not apply here)."""
        return None

    def parameters(self) -> List[torch.Tensor]:
        return self.glob.parameters()

    def global_draws(self, S: int):
        """S draws of the globals (S, dim_g) and their entropy (or its estimate); none without globals."""
        glob = self.glob
        if not glob.dim:
            return torch.zeros((S, 0), dtype=self.dtype, device=self.device), 0.0
        if glob.gaussian:
            return glob.rsample(S), glob.entropy()
        theta_g, lq = glob.rsample_with_log_q(S)
        return theta_g, -lq.mean()

    def local_eps(self, B: int, S: int) -> torch.Tensor:
        return torch.randn((S, B, self.K), generator=self.gen, dtype=self.dtype, device=self.device)

    def local_theta(self, rows, eps) -> torch.Tensor:
        return rows[:, :self.K] + eps * torch.exp(rows[:, self.K:])                  # (S, B, K)

    def local_entropy(self, rows) -> torch.Tensor:
        """Sum over `rows` of each row's q entropy (in theta)."""
        return rows[:, self.K:].sum() + 0.5 * rows.shape[0] * self.K * (1 + _LOG2PI)

    def local_log_q(self, eps, rows) -> torch.Tensor:
        """(S, B, K) standard-normal draws -> (S,) log q of the local values they make."""
        return (-0.5 * eps * eps - 0.5 * _LOG2PI).sum((-1, -2)) - rows[:, self.K:].sum()

    def blocks(self, theta_g: torch.Tensor, z: torch.Tensor) -> List[torch.Tensor]:
        """The compiled model's blocks (its `split`), the local ones for the rows of z only."""
        S, B = theta_g.shape[0], z.shape[1]
        out = []
        for where, start, size, b in self.layout:
            if where == "local":
                out.append(z[:, :, start:start + size].reshape((S, B) + tuple(b.ushape[1:])))
            elif not b.ushape:
                out.append(theta_g[:, start])
            else:
                out.append(theta_g[:, start:start + size].reshape((S,) + tuple(b.ushape)))
        return out

    def rsample_with_log_q(self, S: int):
        """Full draws of theta in the compiled model's layout (every row), and log q."""
        theta_g, lq = self.glob.rsample_with_log_q(S)
        eps = self.local_eps(self.N, S)
        z = self.local_theta(self.loc, eps)
        theta = torch.empty((S, self.dim), dtype=self.dtype, device=self.device)
        theta[:, self.g_idx] = theta_g
        theta[:, self.l_idx] = z
        return theta, lq + self.local_log_q(eps, self.loc)

    def rsample(self, S: int):
        return self.rsample_with_log_q(S)[0]

    # the per-row steps and their average
    @torch.no_grad()
    def step_rows(self, idx, eps: torch.Tensor, g: torch.Tensor) -> None:
        """A natural-gradient step of the rows `idx` given per-draw gradients g (S, B, K) of their own
        log densities at the draws m + s eps."""
        K = self.K
        rows = self.loc[idx]
        m, s = rows[:, :K], torch.exp(rows[:, K:])
        rho = min(1.0, LOCAL_LR * self.lr_scale)
        grad = g.mean(0)
        # curvature along each draw, weighted by eps^2 (Price's E[g eps] / s as a ratio: exact for a
        # Gaussian row with the antithetic draws; the plain mean carries chi-square noise, whose bias
        # in s^2 a hierarchy's tau amplifies)
        neg_h = (-(g * eps).sum(0) / (s * (eps * eps).sum(0))).clamp(min=0.0)
        prec = (1 - rho) / (s * s) + rho * neg_h
        if rho >= 1.0:
            prec = prec.clamp(min=1e-12)
        m = m + rho * grad / prec
        self.loc[idx] = torch.cat([m, -0.5 * torch.log(prec)], 1)

    def start_average(self) -> None:
        self._avg, self._n_avg = torch.zeros_like(self.loc), 0

    @torch.no_grad()
    def add_average(self) -> None:
        if self._avg is not None:
            self._n_avg += 1
            self._avg.lerp_(self.loc, 1.0 / self._n_avg)

    @torch.no_grad()
    def assign_average(self) -> None:
        if self._avg is not None and self._n_avg:
            self.loc.copy_(self._avg)

    @torch.no_grad()
    def share_rows(self) -> None:
        """A data-parallel fit (ppl.dist): each process steps only the rows it owns; -> every process
        holds every row's [m | log s] (one collective; the processes' rows are contiguous, in rank order)."""
        shard = self.program.batch.shard
        if shard is not None and self.loc.shape[1]:         # (every local latent encoded: no rows of its own)
            from .. import dist
            self.loc.copy_(dist.gather_rows(self.loc[shard[0]:shard[1]], 0, everywhere=True))

    # saved fits (ppl.posterior.Approximation.state; restored by ppl.infer.amortized.restore)
    def state_arrays(self):
        """The numbers beyond `parameters()` that define q: the rows' [m | log s], the globals' whitening."""
        out = {"q.rows": np.asarray(self.name), "q.rows.loc": self.loc.detach().cpu().numpy().copy()}
        pre = getattr(self.glob, "pre", None)
        if pre is not None:
            out["q.pre.mu0"] = pre.mu0.detach().cpu().numpy().copy()
            out["q.pre.A"] = pre.A.detach().cpu().numpy().copy()
        return out

    def restore_arrays(self, state) -> None:
        loc = state.get("q.rows.loc")
        if loc is None or tuple(loc.shape) != tuple(self.loc.shape):
            raise ValueError("the saved per-row parameters do not fit the model's rows")
        self.loc = torch.as_tensor(loc, dtype=self.dtype, device=self.device).contiguous()

    def describe(self) -> str:
        return (f"{self.glob.name} over the globals, mean-field per row for "
                f"{', '.join(repr(n) for n in self.local_names)} (natural-gradient steps)")


def antithetic_draws(fam, S: int, batch=None):
    """The draws of a step of a family with per-row locals (RowLocal and its kin): the batch's rows
    (all of them without a batch) and S draws in antithetic pairs, each draw of the globals with local
    draws eps and -eps, so a Gaussian row's gradient and curvature (for its natural-gradient step) carry
    no noise of its own.  -> (row indices, the batch's scale, S (even), S / 2, the globals' draws, their
    entropy (or its estimate), the rows' parameters, the rows' eps)."""
    idx = batch.index if batch is not None and batch.index is not None else \
        torch.arange(fam.N, device=fam.device)
    scale = 1.0 if batch is None else batch.scale
    half = max(1, (S + 1) // 2)
    theta_g, ent = fam.global_draws(half)
    rows = fam.loc[idx]
    if batch is None or batch.positions is None:
        eps = fam.local_eps(rows.shape[0], half)
    else:   # a data-parallel fit: the one-process batch's draws (the shared generator advances alike on
        eps = fam.local_eps(batch.whole, half)[:, batch.positions]      # every process), its own rows'
    return idx, scale, 2 * half, half, torch.cat([theta_g, theta_g]), ent, rows, torch.cat([eps, -eps])


@register_gradient
class RowLocalGradient(GradientEstimator):
    """Pathwise, autograd: the globals' family's gradient, and each batch row's gradient in its own
    local values (for the rows' natural-gradient step, RowLocal.step_rows)."""
    name = "row-local"
    serves = "row-local"

    @classmethod
    def applies(cls, vi) -> bool:
        return isinstance(vi.family, RowLocal) and vi.objective.linear and not vi.discrete

    def gradient(self, S: int, batch=None) -> float:
        fam, lj = self.vi.family, self.vi.program
        idx, scale, S, half, theta_g, ent, rows, eps = antithetic_draws(fam, S, batch)
        z = fam.local_theta(rows, eps).requires_grad_(True)
        parts = (batch if batch is not None else lj.batch).shard is not None
        total = lj.evaluate(None, blocks=fam.blocks(theta_g, z), batch=batch, collective=not parts).total
        if parts:
            return summed_step(self.vi, total.mean(), ent, z, idx, rows, eps, scale, S, batch)
        value = total.mean() + ent
        v = float(value.detach()) + scale * float(fam.local_entropy(rows))
        if not math.isfinite(v):
            return math.nan
        (-value).backward()
        g = z.grad * (S / scale)                 # each draw's gradient of its rows' own terms
        if not bool(torch.isfinite(g).all()):
            return math.nan
        fam.step_rows(idx, eps, -g)
        return v

def summed_step(vi: VI, lp, ent, z, idx, rows, eps, scale: float, S: int, batch: Batch) -> float:
    """A data-parallel fit (ppl.dist) of per-row q (RowLocal, Amortized): this process's part of the
    value (its batch rows' log p `lp`; the globals' entropy `ent` on the first process only) and of the
    gradients of the family's parameters (the globals', the encoders'), summed over the processes in one
    all-reduce with the rows' entropy and a count of rows whose gradient is not finite (which fails the
    step on every process); a row's gradient is its own terms', so each process steps its own rows.
    `z`: the batch rows' local draws (None: every local latent encoded, no rows to step)."""
    from .. import dist
    fam = vi.family
    ps = [p for p in vi.parameters() if p.requires_grad]
    part = lp + ent if batch.global_terms else lp
    leaves = ([z] if z is not None else []) + ps
    # (a process none of whose rows are in the batch, and not the first: a part that is a constant)
    gs = torch.autograd.grad(part, leaves, allow_unused=True) if part.requires_grad else [None] * len(leaves)
    gs = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)]
    gz = gs.pop(0) if z is not None else None
    zero = torch.zeros_like(part.detach())
    own = torch.stack([part.detach(), scale * fam.local_entropy(rows).detach() if z is not None else zero,
                       (~torch.isfinite(gz)).sum().to(zero.dtype) if z is not None else zero])
    summed = dist.all_reduce_flat([own] + gs)
    value, ent_rows, not_finite = summed[0].tolist()
    v = value + ent_rows
    if not math.isfinite(v) or not_finite:
        return math.nan
    for p, g in zip(ps, summed[1:]):
        p.grad = -g
    if z is not None:
        fam.step_rows(idx, eps, gz * (S / scale))        # each draw's gradient of its rows' own terms
    return v


# ---- a control variate for the subsampling noise (no local latents) ------------------------------
class ControlVariate:
    """The batch's gradient noise, cancelled to first order (SVRG; Baker et al. 2019's control variates):
    with the anchor theta0 (q's mean at the start of each epoch), each batch's log density gains
    (theta - theta0) . (grad log p(theta0) - grad log p_batch(theta0)), whose mean over the batches of an epoch
    is zero, so the objective and its gradient stay unbiased, and whose gradient cancels the batch's
    deviation at theta0: what is left is the deviation of the per-row gradients' change since theta0.
    Costs one pass over the data per epoch and one one-draw gradient per step."""

    def __init__(self, program, family):
        self.program, self.family = program, family
        self.theta0 = self.g_full = None

    def anchor(self) -> bool:
        from .improper import q_moments
        with torch.no_grad():
            mom = q_moments(self.family)
        if mom is None or not bool(torch.isfinite(mom[0]).all()):
            self.theta0 = None
            return False
        self.theta0 = mom[0].detach().unsqueeze(0)
        lj, N = self.program, self.program.model.rows.size
        chunk = max(1, CHUNK_ELEMENTS // max(1, lj.largest_node() // N))
        g = torch.zeros_like(self.theta0)
        for b in pass_batches(lj, chunk):
            g += self._grad(b)
        if lj.batch.shard is not None:          # the processes' parts: one all-reduce, not two a chunk
            from .. import dist
            g, = dist.all_reduce_flat([g])
        self.g_full = g[0]
        return bool(torch.isfinite(self.g_full).all())

    def _grad(self, batch: Batch) -> torch.Tensor:
        """The gradient of log p at the anchor over `batch` (in a data-parallel fit: this process's part)."""
        x = self.theta0.clone().requires_grad_(True)
        g, = torch.autograd.grad(self.program.evaluate(x, batch=batch, collective=False).total.sum(), x)
        return g

    def attach(self, batch: Batch) -> Batch:
        """In a data-parallel fit, each process's part of c (no collective: the step's one all-reduce
        sums the parts with the rest): the full gradient on the first, less its own rows' gradient."""
        if self.theta0 is not None:
            c = -self._grad(batch)[0]
            if batch.shard is None or batch.global_terms:
                c = c + self.g_full
            if bool(torch.isfinite(c).all()):
                batch.control = (c, self.theta0[0])
        return batch


# ---- the run ----------------------------------------------------------------------------------
def mc_samples(config, program, family=None) -> int:
    """As the full-data fit's rule (16, or the family's own default; fewer when one step's
    intermediates are large), for a batch."""
    if config.mc_samples:
        return config.mc_samples
    from .fit import MC_BUDGET
    per_step = max(1, program.largest_node() * config.batch_size // max(1, program.model.rows.size))
    return max(1, min(getattr(family, "mc_samples", None) or 16, MC_BUDGET // per_step))


def default_epochs(per_epoch: int) -> int:
    return int(max(MIN_EPOCHS, math.ceil(EPOCH_STEPS / per_epoch)))


def optimise(vi: VI, config, S: int, lr: float, progress: Optional[Callable] = None) -> OptimResult:
    """Epochs of shuffled batches; converge on windows (of WINDOW steps inside long epochs when every
    latent is global, else of whole epochs); then decay and average."""
    program = vi.program
    N = program.model.rows.size
    batches = Epochs(program.row_data, N, config.batch_size, config.seed, program.device, program.batch,
                     program.row_offset)
    nb = batches.per_epoch
    E = config.epochs or default_epochs(nb)
    total_steps = E * nb
    local = vi.family if isinstance(vi.family, RowLocal) else None
    # a long epoch of a model whose latents are all global: windows of WINDOW steps inside the epoch (a
    # fit of 10^6 rows can stop in its first epoch); per-row q moves each row once an epoch, so with
    # local latents q's moments can only settle from one epoch to the next
    by_steps = nb > WINDOW and not local_blocks(program)
    w_epochs = 1 if by_steps else max(1, math.ceil(WINDOW / nb))      # a window: at least WINDOW steps
    window = WINDOW if by_steps else w_epochs * nb
    avg_epochs = max(1, min(max(w_epochs, math.ceil(E / 5)), E // 2)) if E >= 2 else 0
    # by steps, phase 1 leaves the averaging phase at least its own length (and AVG_STEPS, below)
    cap1 = max(1, total_steps // 2) if by_steps else (E - avg_epochs) * nb
    state = vi.init(lr, S)
    conv = Convergence(config.tol, max(config.min_steps, getattr(vi.estimator, "min_steps", 0)), total_steps, window)
    trace: List[float] = []
    epoch = 0

    avg = Averager(state.params, window)
    pdrift = ParamDrift(program.params.tensors()) if program.params else None     # `param`s still moving?

    # (not with `param`s: the anchor's gradient would go stale as they move within an epoch)
    cv = ControlVariate(program, vi.family) if local is None and program.dim and not program.params else None

    threads = torch.get_num_threads()
    anchored = False

    def anchor() -> None:
        nonlocal anchored
        torch.set_num_threads(threads)          # the anchor's pass over all rows: every thread
        anchored = cv is not None and cv.anchor()
        torch.set_num_threads(1)                # a batch's tensors are small: more threads only wait on each other

    def stream() -> Iterator[Optional[Batch]]:
        """The batches, epoch after epoch (each epoch's anchor first); None at each epoch's end."""
        nonlocal epoch
        while True:
            epoch += 1
            if hasattr(progress, "epoch"):
                progress.epoch(epoch, E)
            anchor()
            for b in batches.epoch():
                yield cv.attach(b) if anchored else b
            if local is not None:
                local.add_average()
            yield None

    def step(b: Batch) -> bool:
        value = vi.update(state, b)
        if value is None:
            return False
        record_step(value, trace, avg, pdrift, progress, state.t, total_steps)
        return True

    def window_ends(b: Optional[Batch]) -> bool:
        """After a batch's step (or an epoch's end, b None): whether a window closed there."""
        if by_steps:
            return b is not None and state.t % WINDOW == 0
        return b is None and epoch % w_epochs == 0

    prev = None

    def settled() -> bool:
        """At a window's end in phase 1: the windowed ELBO test passes and q's moments have settled."""
        nonlocal prev
        elbo_settled = conv.check(trace, state.t)
        if local is not None:
            local.share_rows()                  # (every process: the same moments, the same decision)
        cur = window_moments(vi.family, avg)
        moved = prev is None or drift(prev, cur) >= DRIFT_TOL
        prev = cur
        if elbo_settled and not moved and (pdrift is None or pdrift.settled()):
            return True
        if pdrift is not None:
            pdrift.reset()
        conv.converged = False
        return False

    batches_left = stream()
    try:
        # phase 1: until the windowed test passes and q's moments have settled, or the cap less the
        # averaging phase
        for b in batches_left:
            if b is not None and not step(b):
                continue
            if window_ends(b):
                avg.close_window()
                if len(trace) >= 2 and settled():
                    break
            if (by_steps and state.t >= cap1) or (not by_steps and b is None and epoch * nb >= cap1):
                break
        # phase 2: a smaller step for as long again (by steps: at least AVG_STEPS; at most to the cap);
        # the result is the average iterate over the second half of the run
        if state.params or local is not None:
            state.lr_scale *= DECAY
            if local is not None:
                local.lr_scale *= DECAY
                local.start_average()
            if by_steps:
                end_step, end_epoch = state.t + min(total_steps - state.t, max(AVG_STEPS, state.t)), None
                if b is not None:               # mid-epoch: the anchor moves to where phase 1 settled
                    anchor()
            else:
                end_step, end_epoch = None, epoch + min(E - epoch, max(avg_epochs, w_epochs, epoch))
            done = state.t >= end_step if by_steps else epoch >= end_epoch
            while not done:
                b = next(batches_left)
                if b is not None and not step(b):
                    continue
                if window_ends(b):
                    avg.close_window()
                done = state.t >= end_step if by_steps else (b is None and epoch >= end_epoch)
            if state.params and state.t >= 2:
                avg.assign()
            if local is not None:
                local.assign_average()
        if local is not None:
            local.share_rows()
    finally:
        batches_left.close()
        torch.set_num_threads(threads)
    return OptimResult(trace, conv.converged, state.t)


@torch.no_grad()
def window_moments(fam, avg: Averager):
    """q's means and sds at the last window's average parameters (the locals: their rows now)."""
    from .improper import q_moments
    glob = fam.glob if isinstance(fam, RowLocal) else fam
    live = [p.detach().clone() for p in avg.params]
    if avg.windows:
        for p, w in zip(avg.params, avg.windows[-1]):
            p.copy_(w)
    try:
        mom = q_moments(glob)
        rows = fam.encoder_moments() if hasattr(fam, "encoder_moments") else None   # encoders: at the window's
    finally:                                                                       # average weights
        for p, v in zip(avg.params, live):
            p.copy_(v)
    if mom is None:
        return None
    mean, sd = mom[0], mom[1].clamp(min=0).sqrt()
    if isinstance(fam, RowLocal):
        K = fam.K
        mean = torch.cat([mean, fam.loc[:, :K].reshape(-1)])
        sd = torch.cat([sd, torch.exp(fam.loc[:, K:]).reshape(-1)])
    if rows is not None:
        mean, sd = torch.cat([mean, rows[0]]), torch.cat([sd, rows[1]])
    return mean, sd


def drift(prev, cur) -> float:
    """RMS over coordinates of the change in q's means, in q's sds (0 when moments are unknown)."""
    if prev is None or cur is None:
        return 0.0
    d = (cur[0] - prev[0]) / cur[1].clamp(min=1e-300)
    return float(torch.sqrt((d * d).mean())) if d.numel() else 0.0


def pass_draws(program) -> int:
    """Draws of q in the final pass over all rows (their log p gives the ELBO, k-hat and the weights):
    as for a full-data fit (psis_draws), but within PASS_BUDGET, not less than PASS_DRAWS: at 10^7 rows
    the full fit's 200 would cost more than the optimisation."""
    from .fit import psis_draws
    largest = program.largest_node()
    return int(min(psis_draws(largest), max(PASS_DRAWS, PASS_BUDGET // max(1, largest))))


@torch.no_grad()
def log_p_rows(program, theta: torch.Tensor) -> torch.Tensor:
    """log p at the draws theta (S, dim) over all rows, summed chunk by chunk of rows (`pass_batches`:
    global terms once): the final pass of a minibatch fit holds one chunk's intermediates, not (S, N)
    of them."""
    N, S = program.model.rows.size, theta.shape[0]
    per_row = max(1, program.largest_node() // N)
    chunk = max(1, CHUNK_ELEMENTS // (S * per_row))
    acc = torch.zeros(S, dtype=program.dtype, device=program.device)
    for b in pass_batches(program, chunk):
        acc += program.evaluate(theta, batch=b).total
    return acc


@torch.no_grad()
def full_elbo(vi: VI, draws: Optional[int] = None) -> float:
    """The ELBO of the final q over the full data: the same draws of the globals for every chunk of
    rows, each chunk's scaled log density weighted by its share of the rows (global terms once).
    As many draws as ELBO_BUDGET element-evaluations allow (ELBO_DRAWS to 2000): the globals' draws
    move every row's term at once, so a small N affords the draws its noise needs."""
    program, fam = vi.program, vi.family
    if hasattr(fam, "full_elbo"):              # a family with rows of its own making (amortized.py)
        return fam.full_elbo(vi, draws)
    N = program.model.rows.size
    if draws is None:
        draws = int(min(2000, max(ELBO_DRAWS, ELBO_BUDGET // max(1, program.largest_node()))))
    per_row = max(1, program.largest_node() // N)
    chunk = max(1, CHUNK_ELEMENTS // (draws * per_row))
    if isinstance(fam, RowLocal):
        theta_g, lq = fam.glob.rsample_with_log_q(draws)
        acc, ent_local = _rows_pass(program, fam, theta_g, chunk)
        return float((acc - lq).mean()) + ent_local
    theta, lq = fam.rsample_with_log_q(draws)
    acc = torch.zeros(draws, dtype=program.dtype, device=program.device)
    for b in pass_batches(program, chunk):
        acc += program.evaluate(theta, batch=b).total
    return float((acc - lq).mean())


def _rows_pass(program, local: RowLocal, theta_g: torch.Tensor, chunk: int):
    """log p at the globals' draws theta_g and a draw of every row, summed over chunks of `chunk` rows
    (global terms once), and the rows' entropy (`chunk_walk`)."""
    acc = torch.zeros(theta_g.shape[0], dtype=program.dtype, device=program.device)
    ent = 0.0
    for a, n, a1, b1, b in chunk_walk(program, chunk):
        eps = local.local_eps(n, theta_g.shape[0])
        if b is None:
            continue
        rows = local.loc[a1:b1]
        z = local.local_theta(rows, eps[:, a1 - a:b1 - a])
        acc += program.evaluate(None, blocks=local.blocks(theta_g, z), batch=b, collective=False).total
        ent += float(local.local_entropy(rows))
    return sum_parts(program, acc, ent)


def chunk_walk(program, chunk: int) -> Iterator[Tuple[int, int, int, int, Optional[Batch]]]:
    """The one-process chunks of `chunk` rows, in order: (first row, rows, this process's rows of it
    [a1, b1), their batch, or None where it holds none).  In a data-parallel
    fit every process walks every chunk, so draws made per chunk advance the shared generator alike and
    are one process's; the global terms are in the first batch only.  Evaluate with collective=False and
    add the parts up with `sum_parts`."""
    N, shard = program.model.rows.size, program.batch.shard
    lo, hi = shard if shard is not None else (0, N)
    first = shard is None or program.batch.global_terms
    for a in range(0, N, chunk):
        n = min(N, a + chunk) - a
        a1, b1 = max(a, lo), min(a + n, hi)
        if a1 >= b1:
            yield a, n, a1, b1, None
            continue
        yield a, n, a1, b1, row_range(program, a1, b1, first)
        first = False


def sum_parts(program, acc: torch.Tensor, ent: float) -> Tuple[torch.Tensor, float]:
    """(log p summed over this process's rows, its rows' entropy) -> the sums over the processes (one
    all-reduce; one process: as they are)."""
    if program.batch.shard is None:
        return acc, ent
    from .. import dist
    acc, e = dist.all_reduce_flat([acc, torch.tensor([ent], dtype=acc.dtype, device=acc.device)])
    return acc, float(e)


def global_batch(config, N: Optional[int]):
    """A data-parallel fit (ppl.dist): `batch_size` is each process's batch, as in PyTorch's DDP and
    Horovod, so a step of W processes evaluates W * B rows (at most N) and an epoch takes W times fewer
    steps -> the config with the global batch.  The fit is then `--procs 1 --batch-size W*B`'s, to
    rounding: every process draws that one-process batch and evaluates the rows of it it owns."""
    from .. import dist
    group = dist.current()
    if group is None or config.batch_size is None or group.world == 1:
        return config
    from dataclasses import replace
    B = config.batch_size * group.world
    return replace(config, batch_size=min(N, B) if N else B)


def describe(config, result: OptimResult, N: int) -> str:
    from .. import dist
    nb = -(-N // config.batch_size)
    group = dist.current()
    per = f" ({-(-config.batch_size // group.world)} a process)" if group is not None and group.world > 1 else ""
    return (f"minibatches of {config.batch_size}{per} of {N} rows: {result.steps} steps, "
            f"{result.steps / nb:.3g} epochs")

