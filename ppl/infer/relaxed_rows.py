"""Relaxed discrete local latents under minibatches: a categorical (or bernoulli) code per data row,
`c[N] ~ categorical(..)`, fitted with `--batch-size B` (or with an encoder of it declared in the
model) by the Gumbel-softmax / concrete relaxation of `ppl.infer.relaxed`.

Stage: (compiled model with per-row latents planned `relaxed`, the start, `FitConfig`) -> the
`RelaxedRows` family and its gradient estimator (registry GRADIENTS, kind `relaxed-rows`); after
the fit, the categorical q's of `ppl.infer.discrete` with every row's logits (draws, summaries and
PSIS use them unrelaxed), and the discrete model's ELBO over all rows (`full_elbo`).

q = q_global(continuous globals) x prod_n Cat(c_n; softmax l_n), where l_n is either
- free per-row logits (K per row): only the batch's rows are updated, by Adam steps with each
  row's own moments and step count (`RowAdam`; the step falls as 1 / sqrt(1 + visits / 20) with
  the row's visits: at a fixed step the logits' noise floor left a mixture's responsibilities
  0.1-0.2 off the exact ones, with the decay within 0.05), so a step costs O(B); or
- an encoder declared in the model, `amortize c from x hidden [..] [activation A]`: an MLP of row
  n's (standardised) data giving its K logits (`LogitsEncoder`), trained with everything else.

A step (`RelaxedRowsGradient`): the batch's rows are drawn relaxed at temperature T,
x = log_softmax((l + g) / T); the factors that use c read the relaxed one-hot; c's own terms
E_q[log p(c)] - E_q[log q(c)] are in closed form (relaxed.py's `Z_TERMS = "exact"`).  Every
per-row term, c's included, is scaled by N/B for the actual batch (a ragged last batch too), the
global terms once, exactly as on the continuous minibatch path (`ppl.infer.minibatch`).  The
temperature falls from T0 to T_END (relaxed.py's) over max(ANNEAL_STEPS, ANNEAL_EPOCHS epochs),
at most half the run's steps; the convergence test waits for it (`min_steps`).  Each step's value
(the trace) is the discrete model's ELBO on the batch at the hard draws the relaxed ones round to
(Gumbel-max: exact draws of q); the reported ELBO is one full pass over all rows at the end.

Auto (`--estimator auto`): a discrete latent with an encoder is relaxed (its q is the encoder's;
enumeration would ignore it), and under `--batch-size` so is a per-row discrete latent that auto
would leave on the score path (that path is not scaled by rows); the header says so.

Refused (located or usage errors, `check`): a relaxed discrete latent that is global under
`--batch-size`, continuous per-row latents next to relaxed ones in one model (a categorical code
with a continuous z per row), another objective than the ELBO, another optimiser than Adam,
`--holdout`, `--refine-local` and `--procs`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import torch

from ..backend.relax import RelaxedDraw
from ..errors import EXIT_USAGE, Diagnostic, PplError, UsageError
from ..frontend.encoders import ACTIVATIONS, encoder_of
from .estimators import GradientEstimator, register_gradient
from .minibatch import CHUNK_ELEMENTS, ELBO_DRAWS, RowLocal, default_epochs, pass_batches
from .relaxed import T0, T_END

ANNEAL_STEPS = 500        # the temperature falls over at least this many steps ...
ANNEAL_EPOCHS = 20        # ... and at least this many epochs
ROW_LR = 0.5              # the per-row logits' Adam step size (times the run's decay) ...
ROW_DECAY_VISITS = 20     # ... over 1 / sqrt(1 + visits / this): each row's own steps fall with its visits
LR = 0.1                  # Adam's step size for the globals (their whitened units) ...
ENCODER_LR_SCALE = 0.1    # ... the encoders' weights at this times it (the `param`s at engine.PARAM_LR_SCALE):
                          # 0.01 each, as for the continuous VAE (amortized.py)
ENCODER_DRAWS = 4         # relaxed draws a row a step when every code has an encoder and no globals
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
MOMENT_ROWS = 512         # rows whose q probabilities the drift test watches


# ---- which fits this module serves --------------------------------------------------------------
def relaxed_names(program) -> List[str]:
    return [n for n in program.score if n in program.relaxed and program.plan[n].estimator == "relaxed"]


def active(model, program, config) -> bool:
    """This module fits the model: discrete latents planned relaxed, all per row, under `--batch-size`
    or with an encoder of one of them."""
    names = relaxed_names(program)
    if not names or len(names) != len(program.score) or not all(model.rows.is_row(n) for n in names):
        return False
    return config.batch_size is not None or any(encoder_of(model, n) is not None for n in names)


def auto_relax(model, config) -> frozenset:
    """The discrete latents `--estimator auto` relaxes here (see the module docstring)."""
    if config.estimator != "auto":
        return frozenset()
    from ..plan import plan as make_plan, relaxable
    out = {e.latent for e in model.encoders if e.discrete}
    if config.batch_size is not None:
        base = make_plan(model, "auto", config.opt)
        out |= {n for n, p in base.items() if p.estimator == "score" and model.nodes[n].discrete
                and model.rows.is_row(n) and relaxable(model, n)}
    return frozenset(out)


def auto_note(model, config, node_plans) -> str:
    names = sorted(n for n in auto_relax(model, config) if node_plans.get(n) and node_plans[n].estimator == "relaxed")
    if not names:
        return ""
    enc = [n for n in names if encoder_of(model, n) is not None]
    why = []
    if enc:
        why.append(f"{', '.join(enc)}: an encoder gives q's logits")
    if len(enc) < len(names):
        why.append(f"{config.opt('batch_size')}: the score path is not scaled by rows")
    return f"auto: relaxed for {', '.join(names)} ({'; '.join(why)})"


def check(model, program, config) -> bool:
    """-> True when this module serves the fit's discrete latents (False: none of them is relaxed, the
    caller's own message applies); raises what it cannot serve (located errors, usage errors)."""
    names = relaxed_names(program)
    if not names:
        return False
    o = config.opt
    rows = model.rows
    errs = []
    for n in names:
        if not rows.is_row(n):
            node = model.nodes[n]
            errs.append(Diagnostic(node.span, f"'{n}' is a global discrete latent: under {o('batch_size')} "
                                              f"{o('estimator', 'relaxed')} serves discrete latents with one value "
                                              f"per data row (`{n}[{rows.symbol or 'N'}] ~ ...`); fit the full data"))
    if errs:
        raise PplError(errs, EXIT_USAGE)
    if len(names) != len(program.score):
        return False
    from .minibatch import local_blocks
    cont = local_blocks(program)
    if cont:
        node = model.nodes[cont[0].name]
        raise PplError([Diagnostic(node.span, f"'{node.name}' is a continuous per-row latent next to the relaxed "
                                              f"discrete per-row latent{'s' if len(names) > 1 else ''} "
                                              f"{', '.join(repr(n) for n in names)}: one model with both kinds of "
                                              f"local latents is not supported yet under {o('batch_size')} or "
                                              f"with an encoder")], EXIT_USAGE)
    from .objectives import OBJECTIVES
    if not OBJECTIVES[config.objective].linear:
        raise UsageError(f"{o('objective', config.objective)} does not apply to relaxed per-row latents; "
                         f"use {o('objective', 'elbo')}")
    if config.optimizer not in ("auto", "adam"):
        raise UsageError(f"{o('optimizer', config.optimizer)} does not apply to relaxed per-row latents "
                         f"(their logits take Adam steps): use {o('optimizer', 'adam')} or {o('optimizer', 'auto')}")
    for opt_name, what in (("holdout", "held-out rows"), ("refine_local", "the amortisation gap")):
        if getattr(config, opt_name, None) is not None:
            raise UsageError(f"{o(opt_name)} ({what}) is not available for relaxed discrete per-row latents yet")
    return True


# ---- the encoder of a discrete latent -----------------------------------------------------------
class LogitsEncoder:
    """Row n's data -> its latent's logits (B, *rest): an MLP with the declared hidden sizes and
    activation; the last layer starts small and random (so rows start near uniform but not alike)."""

    def __init__(self, spec, out_shape, features, gen, dtype, device):
        self.spec, self.out_shape, self.features = spec, tuple(out_shape), features
        self.act = ACTIVATIONS[spec.activation]()
        sizes = [features.size] + list(spec.hidden) + [int(np.prod(self.out_shape))]
        self.params: List[torch.Tensor] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = i == len(sizes) - 2
            sd = (1.0 if last else math.sqrt(2.0)) / math.sqrt(a)
            W = torch.randn(a, b, generator=gen, dtype=dtype, device=device) * sd
            self.params += [W.requires_grad_(True), torch.zeros(b, dtype=dtype, device=device, requires_grad=True)]

    def parameters(self) -> List[torch.Tensor]:
        return self.params

    def __call__(self, data: Dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.features(data)
        n = len(self.params) // 2
        for i in range(n):
            h = h @ self.params[2 * i] + self.params[2 * i + 1]
            if i < n - 1:
                h = self.act(h)
        return h.reshape((h.shape[0],) + self.out_shape)


class RowAdam:
    """Adam on a table of per-row logits: a step updates the given rows only, with their own moments
    and step counts."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.m, self.v = torch.zeros_like(table), torch.zeros_like(table)
        self.t = torch.zeros(table.shape[0], dtype=table.dtype, device=table.device)

    @torch.no_grad()
    def step(self, idx: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """Ascend: `grad` (B, ...) is the gradient of the objective in the rows `idx` (no repeats)."""
        t = self.t[idx] + 1
        self.t[idx] = t
        m = self.m[idx].mul_(ADAM_B1).add_(grad, alpha=1 - ADAM_B1)
        v = self.v[idx].mul_(ADAM_B2).addcmul_(grad, grad, value=1 - ADAM_B2)
        self.m[idx], self.v[idx] = m, v
        shape = (-1,) + (1,) * (grad.dim() - 1)
        mhat = m / (1 - ADAM_B1 ** t).reshape(shape)
        vhat = v / (1 - ADAM_B2 ** t).reshape(shape)
        rate = lr / torch.sqrt(1 + t / ROW_DECAY_VISITS).reshape(shape)
        self.table[idx] += rate * mhat / (vhat.sqrt() + ADAM_EPS)


# ---- the family ---------------------------------------------------------------------------------
class RelaxedRows(RowLocal):
    """q_global(globals) x prod_n Cat(c_n; softmax l_n): the rows' logits free or from an encoder."""
    name = "relaxed-rows"
    serves = "relaxed-rows"
    max_psis_draws = 200      # each PSIS draw evaluates every row (amortized.Amortized's reason)
    lr = LR                   # (not the cold start's larger step: the weights are not whitened)

    def __init__(self, global_cls, start, program, gen, config):
        super().__init__(global_cls, start, program, gen, config)     # the globals (no continuous rows)
        self.qs: Dict[str, object] = {}
        self.encoders: Dict[str, LogitsEncoder] = {}
        self.tables: Dict[str, RowAdam] = {}
        self._lavg: Dict[str, torch.Tensor] = {}

    def adopt(self, discrete: Dict[str, object]) -> Dict[str, object]:
        """Take the discrete q's (categorical, logits (N, ..., K)) as this family's rows; the engine's
        optimiser gets none of them (-> {}).  `finish` gives them back filled."""
        from .amortized import Features
        model, program = self.program.model, self.program
        self.qs = dict(discrete)
        for n, q in self.qs.items():
            spec = encoder_of(model, n)
            if spec is not None:
                feats = Features(model, spec.inputs, program.row_data)
                self.encoders[n] = LogitsEncoder(spec, q.param.shape[1:], feats, self.gen, self.dtype, self.device)
            else:
                self.tables[n] = RowAdam(q.param.detach().clone())
        if self.encoders and not self.tables and not self.glob.dim:
            self.mc_samples = ENCODER_DRAWS      # a categorical VAE's step: one relaxed draw a row
        return {}

    def parameters(self) -> List[torch.Tensor]:
        return self.glob.parameters() + [p for e in self.encoders.values() for p in e.parameters()]

    def lr_scales(self) -> List[float]:
        n = len(self.glob.parameters())
        return [1.0] * n + [ENCODER_LR_SCALE] * (len(self.parameters()) - n)

    def logits(self, name: str, idx: torch.Tensor, data: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The rows' logits (B, ..., K): the encoder's of their data, or (a leaf) the free table's."""
        enc = self.encoders.get(name)
        if enc is not None:
            return enc(data)
        return self.tables[name].table[idx].clone().requires_grad_(torch.is_grad_enabled())

    @torch.no_grad()
    def step_logits(self, idx: torch.Tensor, leaves: Dict[str, torch.Tensor], scale: float) -> None:
        lr = ROW_LR * self.lr_scale
        for n, l in leaves.items():
            if l.grad is not None:
                self.tables[n].step(idx, -l.grad / scale, lr)      # (the loss's gradient, per row)

    @torch.no_grad()
    def all_logits(self, name: str) -> torch.Tensor:
        if name in self.tables:
            return self.tables[name].table.clone()
        chunk = 4096
        data = self.program.row_data
        return torch.cat([self.encoders[name]({k: v[:, a:a + chunk] for k, v in data.items()})
                          for a in range(0, self.N, chunk)], 0)

    def finish(self) -> Dict[str, object]:
        """The fitted rows as the discrete q's (their `param`: every row's logits) for the draws."""
        with torch.no_grad():
            for n, q in self.qs.items():
                q.param.copy_(self.all_logits(n))
        return self.qs

    # the per-epoch average of the free logits (minibatch.optimise's averaging epochs)
    def start_average(self) -> None:
        super().start_average()
        self._lavg = {n: torch.zeros_like(t.table) for n, t in self.tables.items()}
        self._n_lavg = 0

    @torch.no_grad()
    def add_average(self) -> None:
        super().add_average()
        if self._lavg:
            self._n_lavg += 1
            for n, a in self._lavg.items():
                a.lerp_(self.tables[n].table, 1.0 / self._n_lavg)

    @torch.no_grad()
    def assign_average(self) -> None:
        super().assign_average()
        if self._lavg and self._n_lavg:
            for n, a in self._lavg.items():
                self.tables[n].table.copy_(a)

    @torch.no_grad()
    def encoder_moments(self):
        """q's probabilities of the first MOMENT_ROWS rows and their sds (the drift test's)."""
        n = min(self.N, MOMENT_ROWS)
        idx = torch.arange(n, device=self.device)
        data = {k: v[:, :n] for k, v in self.program.row_data.items()}
        ps = []
        for name in self.qs:
            l = self.logits(name, idx, data)
            relaxation = self.program.relaxed[name][0]
            ps.append((torch.softmax(l, -1) if relaxation.categories else torch.sigmoid(l)).reshape(-1))
        p = torch.cat(ps) if ps else torch.zeros(0, dtype=self.dtype, device=self.device)
        return p, torch.sqrt(p * (1 - p)).clamp(min=0.05)

    def draws(self, idx, data, S: int, T: Optional[float], noise: Optional[Dict[str, torch.Tensor]] = None):
        """The rows' draws: -> (logits leaves by name, draws by name (relaxed at T; T None: the hard ones,
        with c's terms still in closed form), sum over the rows of E_q[log q(c_n)], the hard draws)."""
        leaves, draws, hard, lq = {}, {}, {}, 0.0
        for n in self.qs:
            relaxation = self.program.relaxed[n][0]
            l = self.logits(n, idx, data)
            leaves[n] = l
            u = noise[n] if noise is not None else relaxation.noise(l.shape, S, self.gen, self.dtype, self.device)
            d = relaxation.draw(l, u, T if T is not None else 1.0)
            d.q_logits = l
            hard[n] = hard_draw(relaxation, d.hard, l)
            draws[n] = d if T is not None else hard[n]
            lq = lq + relaxation.cross_entropy(l, l).sum()
        return leaves, draws, lq, hard

    @torch.no_grad()
    def full_elbo(self, vi, draws: Optional[int] = None) -> float:
        """The discrete model's ELBO of the final q over all rows: one pass in chunks, the same draws
        of the globals for every chunk, exact draws of c's q, c's own terms in closed form."""
        program = self.program
        if draws is None:
            draws = ELBO_DRAWS
        per_row = max(1, program.largest_node() // self.N)
        chunk = max(1, CHUNK_ELEMENTS // (draws * per_row))
        theta_g, lq_g = self.glob.rsample_with_log_q(draws)
        acc = torch.zeros(draws, dtype=program.dtype, device=program.device)
        ent = 0.0
        for b in pass_batches(program, chunk):
            _, hard, lq, _ = self.draws(b.index, b.data, draws, None)
            acc += program.evaluate(theta_g, hard, batch=b).total
            ent -= float(lq)
        return float((acc - lq_g).mean()) + ent

    # saved fits (ppl.posterior.Approximation.state; restored by `restored`)
    def state_arrays(self) -> Dict[str, np.ndarray]:
        """RowLocal's, and each encoder's input scaling and output shape (its weights are among
        `parameters()`, every row's logits in the discrete q's)."""
        out = super().state_arrays()
        for n, e in self.encoders.items():
            out[f"q.enc.{n}.x_mean"], out[f"q.enc.{n}.x_sd"] = _np(e.features.mean), _np(e.features.sd)
            out[f"q.enc.{n}.out_shape"] = np.asarray(e.out_shape, dtype=np.int64)
        return out

    @classmethod
    def restored(cls, global_cls, start, program, gen, config, state) -> "RelaxedRows":
        """The family of a saved fit, its encoders in place for the caller to copy their weights in."""
        from .amortized import Features
        fam = cls(global_cls, start, program, gen, config)
        model = program.model
        for n in program.score:
            spec = encoder_of(model, n)
            if spec is None or f"q.enc.{n}.x_mean" not in state:
                continue
            feats = Features(model, spec.inputs, program.row_data, program.rt.tensor(state[f"q.enc.{n}.x_mean"]),
                             program.rt.tensor(state[f"q.enc.{n}.x_sd"]))
            shape = tuple(int(v) for v in state[f"q.enc.{n}.out_shape"])
            fam.encoders[n] = LogitsEncoder(spec, shape, feats, gen, fam.dtype, fam.device)
        return fam

    def describe(self) -> str:
        parts = [f"{self.glob.name} over the globals"] if self.glob.dim else []
        parts += [f"encoder {e.spec.describe()} for '{n}'" for n, e in self.encoders.items()]
        if self.tables:
            parts.append(f"free logits per row for {', '.join(repr(n) for n in self.tables)} (per-row Adam)")
        return "; ".join(parts) + "; relaxed (Gumbel-softmax) draws of the batch's rows"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _register_saved() -> None:
    from .amortized import ROW_FAMILIES
    ROW_FAMILIES[RelaxedRows.name] = RelaxedRows.restored


_register_saved()


def hard_draw(relaxation, hard: torch.Tensor, logits: torch.Tensor) -> RelaxedDraw:
    """An exact draw of q as the compiled model reads a relaxed one (a one-hot index), with q's logits so
    that c's own terms stay in closed form."""
    if relaxation.categories:
        K = logits.shape[-1]
        w = torch.nn.functional.one_hot(hard.long() - 1, K).to(logits.dtype)
    else:
        w = None
    return RelaxedDraw(relaxation, None, 0.0, hard, w, hard, logits.detach())


# ---- the gradient -------------------------------------------------------------------------------
def anneal_horizon(config, N: int) -> int:
    """max(ANNEAL_STEPS, ANNEAL_EPOCHS epochs), at most half the run's steps."""
    B = config.batch_size or N
    nb = -(-N // B)
    epochs = config.epochs or (config.steps if config.batch_size is None and config.steps else None) or \
        default_epochs(nb)
    return max(1, min(max(ANNEAL_STEPS, ANNEAL_EPOCHS * nb), (epochs * nb) // 2))


def objective(fam: RelaxedRows, program, theta_g: torch.Tensor, ent, T: Optional[float], batch=None,
              noise: Optional[Dict[str, torch.Tensor]] = None):
    """The relaxed objective on `batch` (None: every row) at temperature T (None: the discrete ELBO's
    estimate at exact draws of q), given the globals' draws theta_g and their entropy: every per-row
    term scaled by the batch's N/B, the global ones once.  `noise`: the rows' uniform noise (S, B, ...)
    by name (else fresh).  -> (value, the logits' leaves, the hard draws, sum E_q log q)."""
    idx = batch.index if batch is not None and batch.index is not None else \
        torch.arange(fam.N, device=fam.device)
    data = program.row_data if batch is None else batch.data
    scale = 1.0 if batch is None else batch.scale
    S = theta_g.shape[0]
    leaves, draws, lq, hard = fam.draws(idx, data, S, T, noise)
    total = program.evaluate(theta_g, draws, batch=batch).total     # (no continuous rows: theta_g is theta)
    return total.mean() + ent - scale * lq, leaves, hard, lq


@register_gradient
class RelaxedRowsGradient(GradientEstimator):
    """Relaxed draws of the batch's rows (c's terms in closed form), pathwise for the globals; the free
    logits take RowAdam steps, the encoders' weights, the globals and the `param`s the engine's Adam."""
    name = "relaxed-rows"
    serves = "relaxed-rows"

    def __init__(self, vi):
        super().__init__(vi)
        self.t = 0
        self.horizon = anneal_horizon(vi.config, vi.program.model.rows.size)
        self.min_steps = 2 * self.horizon       # no convergence test while the temperature falls

    @classmethod
    def applies(cls, vi) -> bool:
        return isinstance(vi.family, RelaxedRows) and vi.objective.linear

    def temperature(self, t: Optional[int] = None) -> float:
        t = self.t if t is None else t
        return T0 * (T_END / T0) ** min(1.0, t / self.horizon)

    def gradient(self, S: int, batch=None) -> float:
        fam, program = self.vi.family, self.vi.program
        T = self.temperature()
        self.t += 1
        theta_g, ent = fam.global_draws(S)
        scale = 1.0 if batch is None else batch.scale
        value, leaves, hard, lq = objective(fam, program, theta_g, ent, T, batch)
        if not bool(torch.isfinite(value)):
            return math.nan
        (-value).backward()
        free = {n: l for n, l in leaves.items() if n in fam.tables}
        if any(l.grad is not None and not bool(torch.isfinite(l.grad).all()) for l in free.values()):
            return math.nan
        idx = batch.index if batch is not None and batch.index is not None else \
            torch.arange(fam.N, device=fam.device)
        fam.step_logits(idx, free, scale)
        with torch.no_grad():                   # the value: the discrete model's ELBO at the hard draws
            evh = program.evaluate(theta_g.detach(), hard, batch=batch).total
            return float(evh.mean() + ent - scale * lq.detach())
