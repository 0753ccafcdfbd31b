"""Amortised local latents: q(z_n | x_n) from an encoder of row n's data, declared in the model
(`amortize z from x hidden [64] activation tanh`, `amortize z from y linear`).

Stage: (compiled model, the checked `amortize` declarations, the start) -> the `Amortized` family
and its gradient estimator (registry GRADIENTS, kind `amortized`); after the fit, `encode` gives
q(z_n | x_n) for new rows (`encoded_rows`: their draws, for `ppl predict`), `refine` the
amortisation gap (`--refine-local`), and `split_holdout` / `heldout_elbo` the held-out rows' ELBO
per row (`--holdout`).

`Amortized` is `RowLocal` (ppl/infer/minibatch.py) with some local latents' rows taken from
encoders: q = q_global(globals) x prod_n [prod_{amortised z} q_phi(z_n | x_n)] x [per-row
mean-field rows of the other local latents].  Globals: any registered family that needs no model
structure.  Per-row rows: RowLocal's natural-gradient steps.  Encoders: Gaussian in z's
unconstrained space (the compiled model adds the Jacobian of biject_to, as for any latent):
- MLP: hidden layers h(x_n) with the declared sizes and activation (registry
  ppl.frontend.encoders.ACTIVATIONS), [mu | log sd] = h W_h + b_h (both heads one product), mu
  plus x_n W_x (a linear skip from the inputs, so the MLP encoder holds every linear one), diagonal;
- linear: mu = A x_n + b with a full covariance L L^T shared by the rows, which is exact wherever
  the posterior of z_n is Gaussian with a mean linear in x_n and a covariance that does not depend
  on it (a linear Gaussian model, probabilistic PCA);
- `iaf K`: K inverse autoregressive flow steps (Kingma et al. 2016) on each row's standard-normal
  draws before the affine map, their MADEs fed the row's context.
Inputs are standardised by the fitted data's column means and sds (floored: `standard_sd`; kept
with the encoder, so new rows are standardised the same way); a level column enters one-hot.  The encoders' weights are
trained with everything else by Adam on the reparameterised ELBO (only the batch's rows are
encoded per step), at ENCODER_LR_SCALE of the globals' step size (those are whitened, the weights
are not).  Without globals or per-row rows a step draws z once a row (ENCODER_DRAWS; a `linear`
encoder an antithetic pair), at the full step size.

The fit runs through minibatch.optimise whether or not `batch_size` is given (without it: one
batch of all rows in order each step; the epoch is a step).  In a data-parallel fit (ppl.dist)
every process reads the whole data (so the inputs' standardisation, the encoders' start and q's
draws of every row are one process's), draws the one-process batch's noise and encodes the rows of
it that it owns; `minibatch.summed_step` and `elbo_of` sum the processes' parts in one
all-reduce.  `--holdout` and `--refine-local` are one-process only (ppl.infer.fit.shard refuses).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..backend.runtime import Batch
from ..frontend.encoders import ACTIVATIONS, EncoderSpec, encoder_of
from .estimators import GradientEstimator, register_gradient
from .minibatch import (CHUNK_ELEMENTS, ELBO_BUDGET, ELBO_DRAWS, RowLocal, antithetic_draws, chunk_walk, sum_parts,
                        summed_step)

ENCODER_LR_SCALE = 0.1
IAF_HIDDEN_MIN = 16       # hidden units per IAF step's MADE layer: 2 k, at least this
IAF_GATE_BIAS = 1.5       # each step starts as u' = sigmoid(1.5) u (no shift), undone by a constant factor
IAF_MOMENT_DRAWS = 2000
RIDGE = 1e-6          # relative ridge of the least-squares start of an encoder's mean head
# draws per row per step when only encoders' rows are drawn: one, as a VAE takes (the batch's rows
# average the noise); an antithetic pair for a linear encoder (on a linear Gaussian model its mean's
# gradient is then exact).  With global latents or per-row rows: the engine's default (16).
ENCODER_DRAWS = {False: 1, True: 2}       # by EncoderSpec.linear
_LOG2PI = math.log(2 * math.pi)


def check(program, config) -> None:
    """What a model with encoders cannot be fitted with (usage errors): another optimiser than Adam, an
    objective that is not a sum over rows, discrete latents on the score path."""
    from ..errors import UsageError
    from .objectives import OBJECTIVES
    o = config.opt
    if config.optimizer not in ("auto", "adam"):
        raise UsageError(f"{o('optimizer', config.optimizer)} does not apply to a model with an encoder (amortize): "
                         f"its weights are trained by Adam steps ({o('optimizer', 'adam')} or {o('optimizer', 'auto')})")
    if not OBJECTIVES[config.objective].linear:
        raise UsageError(f"{o('objective', config.objective)} does not apply to a model with an encoder (amortize); "
                         f"use {o('objective', 'elbo')}")
    from . import relaxed_rows
    if program.score and not relaxed_rows.check(program.model, program, config):
        raise UsageError(f"a model with an encoder (amortize) cannot fit discrete latents on the score path "
                         f"({', '.join(program.score)}); sum them out ({config.opt('estimator', 'enumerate')})")


# ---- inputs ---------------------------------------------------------------------------------------
SD_FLOOR = 0.25         # a column's sd is taken as at least this times the median column's


def standard_sd(x: torch.Tensor) -> torch.Tensor:
    """The columns' sds for standardising x (B, P), floored at SD_FLOOR times the median column's
    (a pixel that is almost always 0 would otherwise enter at ~40 sd, and one such row's first steps
    can send its q's log sd to ~6); a constant column at 1."""
    sd = x.std(0, correction=0)
    floor = SD_FLOOR * sd[sd > 0].median() if bool((sd > 0).any()) else sd.new_tensor(1.0)
    return torch.where(sd > 0, torch.maximum(sd, floor), torch.ones_like(sd))


class Features:
    """Row data -> the encoder's input matrix (B, P): the declared inputs flattened per row and
    concatenated, levels one-hot, standardised by the fitted data's means and sds."""

    def __init__(self, model, names, row_data: Dict[str, torch.Tensor], mean=None, sd=None):
        self.names = tuple(names)
        self.levels = {}
        for n in self.names:
            decl = model.nodes[n].decl
            if decl is not None and decl.base == "level":
                self.levels[n] = int(model.dims[decl.levels.value]) if isinstance(decl.levels.value, str) \
                    else int(decl.levels.value)
        if mean is None:
            x = self.raw(row_data)
            mean = x.mean(0)
            sd = standard_sd(x)
        self.mean, self.sd = mean, sd

    def raw(self, data: Dict[str, torch.Tensor]) -> torch.Tensor:
        cols = []
        for n in self.names:
            v = data[n][0]
            v = v.reshape(v.shape[0], -1)
            if n in self.levels:
                v = torch.nn.functional.one_hot(v[:, 0].long() - 1, self.levels[n]).to(data[n].dtype)
            cols.append(v)
        return torch.cat(cols, 1)

    def __call__(self, data: Dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.raw(data) - self.mean) / self.sd

    @property
    def size(self) -> int:
        return int(self.mean.shape[0])


# ---- one encoder ----------------------------------------------------------------------------------
class Encoder:
    """q(z_n | x_n) for one local latent with k unconstrained values per row."""

    def __init__(self, spec: EncoderSpec, k: int, features: Features, m0: torch.Tensor, sd0: torch.Tensor,
                 gen: torch.Generator, x_train: Optional[torch.Tensor] = None):
        self.spec, self.k, self.features = spec, k, features
        dtype, device = m0.dtype, m0.device
        P = features.size
        self.act = ACTIVATIONS[spec.activation]()
        self.params: Dict[str, torch.Tensor] = {}
        if spec.linear:
            self.params["A"] = torch.zeros(P, k, dtype=dtype, device=device)
            self.params["b"] = m0.mean(0).clone()
            L = torch.zeros(k, k, dtype=dtype, device=device)
            L.diagonal().copy_(torch.log(sd0.mean(0)))
            self.params["L"] = L                         # strict lower triangle, log of the diagonal
            self._least_squares(x_train, m0, lambda x: x, self._assign_linear)
        else:
            sizes = [P] + list(spec.hidden)
            for i in range(len(spec.hidden)):
                fan_in = sizes[i]
                gain = math.sqrt(2.0) if spec.activation in ("relu", "elu") else 1.0
                self.params[f"W{i}"] = torch.randn(fan_in, sizes[i + 1], generator=gen, dtype=dtype,
                                                   device=device) * (gain / math.sqrt(max(1, fan_in)))
                self.params[f"b{i}"] = torch.zeros(sizes[i + 1], dtype=dtype, device=device)
            h = sizes[-1]
            # the heads on the hidden layer, [mean | log sd], in one matrix (one product); the mean's
            # linear skip from the inputs apart
            self.params["Wh"] = torch.zeros(h, 2 * k, dtype=dtype, device=device)
            self.params["bh"] = torch.cat([m0.mean(0), torch.log(sd0.mean(0))])
            self.params["Wx"] = torch.zeros(P, k, dtype=dtype, device=device)
            self._least_squares(x_train, m0, lambda x: torch.cat([self.hidden(x), x], 1), self._assign_mlp)
        # IAF steps (Kingma et al. 2016) over the row's k values, with the row's context (the last
        # hidden layer; the standardised inputs for `linear`) entering each MADE's first layer
        self.masks: Dict[str, torch.Tensor] = {}
        ctx = P if spec.linear else sizes[-1]
        H = max(IAF_HIDDEN_MIN, 2 * k)
        for t in range(spec.iaf):
            order = torch.arange(k) if t % 2 == 0 else torch.arange(k - 1, -1, -1)
            m1, m2, m3 = (m.to(dtype=dtype, device=device) for m in context_made_masks(order, H))
            self.masks.update({f"F1_{t}": m1, f"F2_{t}": m2, f"F3_{t}": m3})
            self.params[f"F1_{t}"] = m1 * torch.randn(k, H, generator=gen, dtype=dtype, device=device) / math.sqrt(k)
            self.params[f"C_{t}"] = torch.randn(ctx, H, generator=gen, dtype=dtype, device=device) / math.sqrt(ctx)
            self.params[f"c1_{t}"] = torch.zeros(H, dtype=dtype, device=device)
            self.params[f"F2_{t}"] = m2 * torch.randn(H, H, generator=gen, dtype=dtype, device=device) / math.sqrt(H)
            self.params[f"c2_{t}"] = torch.zeros(H, dtype=dtype, device=device)
            self.params[f"F3_{t}"] = torch.zeros(H, 2 * k, dtype=dtype, device=device)   # starts at the Gaussian
            self.params[f"c3_{t}"] = torch.cat([torch.zeros(k, dtype=dtype, device=device),
                                                torch.full((k,), IAF_GATE_BIAS, dtype=dtype, device=device)])
        for p in self.params.values():
            p.requires_grad_(True)

    @torch.no_grad()
    def _least_squares(self, x: Optional[torch.Tensor], m0: torch.Tensor, inputs, assign) -> None:
        """The mean head's start: least squares of the start's per-row means on the mean head's
        inputs (the last hidden layer and the skip), so the encoder starts near where the start point
        put each row; `assign(W, b)` sets the head."""
        if x is None:
            return
        H = inputs(x)
        Hc = H - H.mean(0)
        mc = m0 - m0.mean(0)
        G = Hc.T @ Hc
        G = G + RIDGE * float(torch.diagonal(G).mean().clamp(min=1e-300)) * torch.eye(G.shape[0], dtype=G.dtype,
                                                                                      device=G.device)
        try:
            Wv = torch.linalg.solve(G, Hc.T @ mc)
        except (RuntimeError, torch.linalg.LinAlgError):
            return
        if bool(torch.isfinite(Wv).all()):
            assign(Wv, m0.mean(0) - H.mean(0) @ Wv)

    def _assign_linear(self, W: torch.Tensor, b: torch.Tensor) -> None:
        self.params["A"].copy_(W)
        self.params["b"].copy_(b)

    def _assign_mlp(self, W: torch.Tensor, b: torch.Tensor) -> None:
        h, k = self.params["Wh"].shape[0], self.k
        self.params["Wh"][:, :k].copy_(W[:h])
        self.params["Wx"].copy_(W[h:])
        self.params["bh"][:k].copy_(b)

    def parameters(self) -> List[torch.Tensor]:
        return list(self.params.values())

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        h = x
        for i in range(len(self.spec.hidden)):
            h = self.act(torch.addmm(p[f"b{i}"], h, p[f"W{i}"]))
        return h

    def scale_tril(self) -> torch.Tensor:
        L = self.params["L"]
        return torch.tril(L, -1) + torch.diag_embed(torch.exp(torch.diagonal(L)))

    def moments(self, x: torch.Tensor):
        """x (B, P) standardised -> (mean (B, k), sd (B, k) or a shared Cholesky factor (k, k))."""
        p = self.params
        if self.spec.linear:
            return torch.addmm(p["b"], x, p["A"]), self.scale_tril()
        h = self.hidden(x)
        k = self.k
        heads = torch.addmm(p["bh"], h, p["Wh"])
        return torch.addmm(heads[:, :k], x, p["Wx"]), heads[:, k:]

    def context(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.spec.linear else self.hidden(x)

    def draw(self, x: torch.Tensor, eps: torch.Tensor):
        """eps (S, B, k) -> (z (S, B, k), log q of each draw's rows (S,), the entropy of the rows' q:
        analytic for the Gaussian, -log q of the draws with IAF steps).  The IAF steps act on the
        standard-normal draws u before the Gaussian's affine map z = mu + sd u (z = mu + L u), each
        u' = sigma u + (1 - sigma) shift(u_<i, context); their start, sigma = sigmoid(IAF_GATE_BIAS)
        and no shift, is undone by a constant factor, so q starts exactly at the Gaussian."""
        mu, s = self.moments(x)
        B, k = mu.shape
        lq = (-0.5 * eps * eps).sum((-1, -2)) - 0.5 * B * k * _LOG2PI
        u = eps
        T = self.spec.iaf
        if T:
            p, m = self.params, self.masks
            ctx = torch.matmul(self.context(x), torch.stack([p[f"C_{t}"] for t in range(T)]))   # (T, B, H)
            for t in range(T):
                h = _elu(torch.matmul(u, p[f"F1_{t}"] * m[f"F1_{t}"]) + ctx[t] + p[f"c1_{t}"])
                h = _elu(torch.matmul(h, p[f"F2_{t}"] * m[f"F2_{t}"]) + p[f"c2_{t}"])
                out = torch.matmul(h, p[f"F3_{t}"] * m[f"F3_{t}"]) + p[f"c3_{t}"]
                shift, gate = out[..., :k], out[..., k:]
                u = torch.addcmul(shift, torch.sigmoid(gate), u - shift)
                lq = lq - torch.nn.functional.logsigmoid(gate).sum((-1, -2))
            log_c = -T * math.log(1.0 / (1.0 + math.exp(-IAF_GATE_BIAS)))
            u = u * math.exp(log_c)
            lq = lq - B * k * log_c
        if self.spec.linear:
            z = mu + u @ s.T
            logdet = B * torch.log(torch.diagonal(s)).sum()
        else:
            z = mu + u * torch.exp(s)
            logdet = s.sum()
        lq = lq - logdet
        if not T:
            return z, lq, logdet + 0.5 * B * k * (1 + _LOG2PI)
        return z, lq, -lq.mean()

    @torch.no_grad()
    def mean_sd(self, x: torch.Tensor, draws: int = IAF_MOMENT_DRAWS):
        """Each row's q mean and marginal sds (B, k) (after IAF steps: from `draws` draws, with a
        private generator)."""
        mu, s = self.moments(x)
        if self.spec.iaf:
            g = torch.Generator(device=mu.device).manual_seed(0)
            eps = torch.randn((draws,) + tuple(mu.shape), generator=g, dtype=mu.dtype, device=mu.device)
            z = self.draw(x, eps)[0]
            return z.mean(0), z.std(0)
        if self.spec.linear:
            sd = torch.sqrt((s * s).sum(1)).expand_as(mu)
        else:
            sd = torch.exp(s)
        return mu, sd


# ---- the family ---------------------------------------------------------------------------------
class Amortized(RowLocal):
    """RowLocal with the rows of the declared latents from encoders (see the module docstring)."""
    name = "amortized"
    # the draws beyond PSIS's get their log p (a pass over every row each) only when k-hat < 0.7 says
    # their weights may be used (fit.draw_and_diagnose)
    rest_after_khat = True
    # PSIS's draws: each evaluates every row (a VAE on 1,800 digits: 16 s for 1000); over a joint of
    # thousands of per-row latents k-hat is large whatever q is, and 200 draws say so as well
    max_psis_draws = 200

    def __init__(self, global_cls, start, program, gen, config, state: Optional[Dict[str, np.ndarray]] = None):
        super().__init__(global_cls, start, program, gen, config)
        model = program.model
        K_full = self.K
        full = self.loc
        row_cols: List[int] = []
        self.encoders: List[Tuple[Encoder, int, int, str]] = []
        for where, k0, k, b in self.layout:
            if where != "local":
                continue
            spec = encoder_of(model, b.name)
            if spec is None:
                row_cols += list(range(k0, k0 + k))
                continue
            feats = Features(model, spec.inputs, program.row_data)
            x_train = None
            if state is not None:
                feats.mean = program.rt.tensor(state[f"q.enc.{b.name}.x_mean"])
                feats.sd = program.rt.tensor(state[f"q.enc.{b.name}.x_sd"])
            else:
                x_train = feats(program.row_data)
            m0, sd0 = full[:, k0:k0 + k], torch.exp(full[:, K_full + k0:K_full + k0 + k])
            enc = Encoder(spec, k, feats, m0, sd0, gen, x_train)
            self.encoders.append((enc, k0, k, b.name))
        rc = torch.as_tensor(row_cols, dtype=torch.long, device=self.device)
        self.loc = torch.cat([full[:, rc], full[:, K_full + rc]], 1).contiguous()
        self.K, self.K_full = len(row_cols), K_full
        order = row_cols + [c for _, k0, k, _ in self.encoders for c in range(k0, k0 + k)]
        self.perm = torch.as_tensor(np.argsort(order), dtype=torch.long, device=self.device)
        self.identity = order == list(range(K_full))
        self.mc_samples = None if self.glob.dim or self.K else \
            max(ENCODER_DRAWS[e.spec.linear] for e, *_ in self.encoders)
        # where the draws follow the encoders' rows (ENCODER_DRAWS) the step size does not follow the
        # draws; with globals or per-row rows, fewer draws are noisier steps for them, as for any family
        self.lr_follows_draws = self.mc_samples is None
        # the fitted rows' encoder inputs, standardised once (a step takes its batch's rows of them),
        # where they are small beside the data; larger: standardised batch by batch
        N = self.N
        self.x_rows = [enc.features(program.row_data)
                       if N * enc.features.size <= CHUNK_ELEMENTS else None for enc, *_ in self.encoders]
        self.all_rows = torch.arange(N, device=self.device)

    def parameters(self) -> List[torch.Tensor]:
        return self.glob.parameters() + [p for e, *_ in self.encoders for p in e.parameters()]

    def lr_scales(self) -> List[float]:
        n = len(self.glob.parameters())
        return [1.0] * n + [ENCODER_LR_SCALE] * (len(self.parameters()) - n)

    def encoder_eps(self, B: int, S: int) -> List[torch.Tensor]:
        return [torch.randn((S, B, k), generator=self.gen, dtype=self.dtype, device=self.device)
                for _, _, k, _ in self.encoders]

    def assemble(self, z_rows: torch.Tensor, z_enc: List[torch.Tensor]) -> torch.Tensor:
        z = torch.cat([z_rows] + z_enc, -1)
        return z if self.identity else z[..., self.perm]

    def assemble_encoded(self, z_enc: List[torch.Tensor]) -> torch.Tensor:
        """`assemble` without per-row rows (K = 0)."""
        z = z_enc[0] if len(z_enc) == 1 else torch.cat(z_enc, -1)
        return z if self.identity else z[..., self.perm]

    def encode_rows(self, data: Dict[str, torch.Tensor], eps: List[torch.Tensor], index=None):
        """-> (each encoder's draws (S, B, k), log q of the draws (S,), analytic entropy).  `index`: the
        fitted data's rows that `data` holds (their standardised inputs are kept)."""
        if len(self.encoders) == 1:
            enc = self.encoders[0][0]
            z, lq, ent = enc.draw(self.inputs(0, data, index), eps[0])
            return [z], lq, ent
        zs, lq, ent = [], 0.0, 0.0
        for i, ((enc, _, _, _), e) in enumerate(zip(self.encoders, eps)):
            z, l, h = enc.draw(self.inputs(i, data, index), e)
            zs.append(z)
            lq, ent = lq + l, ent + h
        return zs, lq, ent

    def inputs(self, i: int, data: Dict[str, torch.Tensor], index=None) -> torch.Tensor:
        """Encoder i's standardised inputs for the rows of `data` (the kept ones for the fitted rows `index`)."""
        x = self.x_rows[i]
        if x is None or index is None:
            return self.encoders[i][0].features(data)
        return x.index_select(0, index)

    def rsample_with_log_q(self, S: int):
        """Full draws of theta in the compiled model's layout (every row), and log q."""
        theta_g, lq = self.glob.rsample_with_log_q(S)
        eps = self.local_eps(self.N, S)
        z_r = self.local_theta(self.loc, eps)
        z_e, lq_e, _ = self.encode_rows(self.program.row_data, self.encoder_eps(self.N, S))
        theta = torch.empty((S, self.dim), dtype=self.dtype, device=self.device)
        theta[:, self.g_idx] = theta_g
        theta[:, self.l_idx] = self.assemble(z_r, z_e)
        return theta, lq + self.local_log_q(eps, self.loc) + lq_e

    DRIFT_ROWS = 512

    @torch.no_grad()
    def encoder_moments(self):
        """The encoders' q means and sds of the first DRIFT_ROWS rows, flat (for the drift test of
        minibatch.optimise: training has settled when these stop moving too)."""
        n = min(self.N, self.DRIFT_ROWS)
        data = {k: v[:, :n] for k, v in self.program.row_data.items()}
        ms, ss = [], []
        for enc, *_ in self.encoders:
            m, s = enc.mean_sd(enc.features(data))
            ms.append(m.reshape(-1))
            ss.append(s.reshape(-1))
        return torch.cat(ms), torch.cat(ss)

    @torch.no_grad()
    def full_elbo(self, vi, draws: Optional[int] = None) -> float:
        """minibatch.full_elbo with the encoders' rows: one pass over all rows in chunks, the same
        draws of the globals for every chunk."""
        return elbo_of(self, vi.program, draws)

    def describe(self) -> str:
        parts = [f"{self.glob.name} over the globals"]
        parts += [f"encoder {e.spec.describe()}" for e, *_ in self.encoders]
        rest = [n for n in self.local_names if n not in {name for *_, name in self.encoders}]
        if rest:
            parts.append(f"mean-field per row for {', '.join(repr(n) for n in rest)} (natural-gradient steps)")
        return "; ".join(parts)

    # ---- saved fits ----------------------------------------------------------------------------
    def state_arrays(self) -> Dict[str, np.ndarray]:
        """RowLocal's, and each encoder's input scaling (its weights are among `parameters()`)."""
        out = super().state_arrays()
        for enc, _, _, name in self.encoders:
            out[f"q.enc.{name}.x_mean"], out[f"q.enc.{name}.x_sd"] = _np(enc.features.mean), _np(enc.features.sd)
        return out


# the per-row families of saved fits, by `q.rows`: (global_cls, start, program, gen, config, state) -> family
# (ppl.infer.relaxed_rows adds its own)
ROW_FAMILIES = {
    RowLocal.name: lambda global_cls, start, program, gen, config, state: RowLocal(global_cls, start, program, gen,
                                                                                  config),
    Amortized.name: lambda global_cls, start, program, gen, config, state: Amortized(global_cls, start, program, gen,
                                                                                     config, state=state),
}


def restore(program, config, state: Dict[str, np.ndarray], global_cls, gen) -> RowLocal:
    """The per-row family of a saved fit (`q.rows`: RowLocal's or Amortized's name); its parameters are
    copied in by the caller, in `parameters()` order."""
    from .families import Preconditioner
    from .laplace import Start
    rt = program.rt
    start = Start(rt.zeros(program.dim), rt.zeros(program.dim) + 1.0, False, "")
    make = ROW_FAMILIES.get(str(state["q.rows"]), ROW_FAMILIES[RowLocal.name])
    fam = make(global_cls, start, program, gen, config, state)
    if "q.pre.mu0" in state and hasattr(fam.glob, "pre"):
        fam.glob.pre = Preconditioner(rt.tensor(state["q.pre.mu0"]), rt.tensor(state["q.pre.A"]))
    fam.restore_arrays(state)
    return fam


def context_made_masks(order: torch.Tensor, H: int):
    """MADE masks (Germain et al. 2015) for weights of shape (in, out), two hidden layers of H units,
    with a context that every hidden unit sees: hidden degrees 0..k-1 (degree d sees the values in
    positions < d, degree 0 the context alone), so output i (position order[i]) depends on the
    values before it and on the context.  -> (values->hidden, hidden->hidden, hidden->[shift|gate])."""
    k = order.shape[0]
    deg = torch.arange(H) % k
    m1 = order[:, None] < deg[None, :]
    m2 = deg[:, None] <= deg[None, :]
    m3 = deg[:, None] <= order[None, :]
    return m1, m2, torch.cat([m3, m3], 1)


def _elu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.elu(x)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


# ---- the ELBO over all rows, and new rows ---------------------------------------------------------
@torch.no_grad()
def elbo_of(fam: Amortized, program, draws: Optional[int] = None, draw_enc=None) -> float:
    """The ELBO of q over all rows, in chunks, the same draws of the globals for every chunk (as
    minibatch.full_elbo), the amortised latents' rows from `draw_enc(data, idx, eps list)` -> (their
    columns, log q) (default: the encoders)."""
    N = fam.N
    if draws is None:
        # the globals' draws move every row's term at once (minibatch.full_elbo's rule); without
        # globals each row's noise is its own and averages out over the rows: ELBO_DRAWS suffice
        draws = int(min(2000, max(ELBO_DRAWS, ELBO_BUDGET // max(1, program.largest_node())))) \
            if fam.glob.dim else ELBO_DRAWS
    if draw_enc is None:
        def draw_enc(data, idx, eps):
            return fam.encode_rows(data, eps)[:2]
    per_row = max(1, program.largest_node() // N)
    chunk = max(1, CHUNK_ELEMENTS // (draws * per_row))
    theta_g, lq = fam.glob.rsample_with_log_q(draws)
    acc = torch.zeros(draws, dtype=program.dtype, device=program.device)
    ent_rows = 0.0
    for a, n, a1, b1, b in chunk_walk(program, chunk):          # (in a data-parallel fit: this process's rows)
        eps_r, eps_e = fam.local_eps(n, draws), fam.encoder_eps(n, draws)
        if b is None:
            continue
        rows = fam.loc[a1:b1]
        z_r = fam.local_theta(rows, eps_r[:, a1 - a:b1 - a])
        z_e, lq_e = draw_enc(b.data, b.index, [e[:, a1 - a:b1 - a] for e in eps_e])
        total = program.evaluate(None, blocks=fam.blocks(theta_g, fam.assemble(z_r, z_e)), batch=b,
                                 collective=False).total
        acc += total - lq_e
        ent_rows += float(fam.local_entropy(rows))
    acc, ent_rows = sum_parts(program, acc, ent_rows)
    return float((acc - lq).mean()) + ent_rows


@register_gradient
class AmortizedGradient(GradientEstimator):
    """Pathwise, autograd: the globals' family and the encoders' weights get the gradient of the batch's
    ELBO (the encoders' entropy analytic); the per-row rows take RowLocal's natural-gradient step."""
    name = "amortized"
    serves = "amortized"

    @classmethod
    def applies(cls, vi) -> bool:
        return isinstance(vi.family, Amortized) and vi.objective.linear and not vi.discrete

    def gradient(self, S: int, batch=None) -> float:
        fam, lj = self.vi.family, self.vi.program
        # an even S: antithetic pairs; an odd S (a VAE's one draw a row): S independent draws, unless
        # per-row rows take natural-gradient steps (their curvature needs the pairs: S rounded up)
        draws = plain_draws if S % 2 and not fam.K else paired_draws
        idx, scale, S, theta_g, ent, rows, eps, eps_e = draws(fam, S, batch)
        data = lj.row_data if batch is None else batch.data
        z_e, _, ent_e = fam.encode_rows(data, eps_e, idx)
        if fam.K:
            z_r = fam.local_theta(rows, eps).requires_grad_(True)
            z = fam.assemble(z_r, z_e)
        else:                                           # every local latent encoded
            z = fam.assemble_encoded(z_e)
        parts = (batch if batch is not None else lj.batch).shard is not None
        total = lj.evaluate(None, blocks=fam.blocks(theta_g, z), batch=batch, collective=not parts).total
        if parts:
            return summed_step(self.vi, total.mean() + scale * ent_e, ent, z_r if fam.K else None, idx, rows, eps,
                               scale, S, batch)
        value = total.mean() + ent + scale * ent_e
        v = float(value.detach()) + (scale * float(fam.local_entropy(rows)) if fam.K else 0.0)
        if not math.isfinite(v):
            return math.nan
        (-value).backward()
        if fam.K:
            g = z_r.grad * (S / scale)
            if not bool(torch.isfinite(g).all()):
                return math.nan
            fam.step_rows(idx, eps, -g)
        return v


def batch_encoder_eps(fam: Amortized, S: int, batch=None, rows: Optional[int] = None) -> List[torch.Tensor]:
    """The encoders' eps of a batch's `rows` rows; in a data-parallel fit, the one-process batch's
    (drawn on every process, the shared generator advancing alike), its own rows' kept."""
    if batch is None or batch.positions is None:
        return fam.encoder_eps(rows, S)
    return [e[:, batch.positions] for e in fam.encoder_eps(batch.whole, S)]


def paired_draws(fam: Amortized, S: int, batch=None):
    """antithetic_draws, with the encoders' eps in antithetic pairs too.  -> (row indices, the batch's
    scale, S (even), the globals' draws, their entropy, the rows' parameters, the rows' eps, the
    encoders' eps)."""
    idx, scale, S, half, theta_g, ent, rows, eps = antithetic_draws(fam, S, batch)
    return idx, scale, S, theta_g, ent, rows, eps, [torch.cat([e, -e])
                                                    for e in batch_encoder_eps(fam, half, batch, rows.shape[0])]


def plain_draws(fam: Amortized, S: int, batch=None):
    """As paired_draws, with S independent draws, for a family whose local latents are all encoded
    (no per-row rows: None for theirs)."""
    idx = batch.index if batch is not None and batch.index is not None else fam.all_rows
    scale = 1.0 if batch is None else batch.scale
    theta_g, ent = fam.global_draws(S)
    return idx, scale, S, theta_g, ent, None, None, batch_encoder_eps(fam, S, batch, idx.shape[0])


# ---- after the fit: new rows, refinement ------------------------------------------------------------
def encode_data(fit, data=None, sets=()) -> Dict[str, Dict[str, np.ndarray]]:
    """`Fit.encode`: q(z_n | x_n) of the fitted encoders for the rows of `data` (files or a mapping of
    column names to values, as `fit` takes them; None: the fitted data).  Columns the encoders do not
    read may be left out where the model allows it (observed columns, as for `predict`)."""
    from ..api import PplModel
    from ..errors import UsageError
    from ..predict import new_data_model
    fam = getattr(fit.q, "family", None) if fit.q is not None else None
    if not isinstance(fam, Amortized):
        raise UsageError("this fit has no encoder: declare one in the model (amortize LATENT from DATA ...)")
    if data is None and not sets:
        return encode(fam, fit.q.program, fit.model)
    model, filled = new_data_model(PplModel(fit.model.source), fit.model, data, sets)
    need = sorted({n for enc, *_ in fam.encoders for n in enc.features.names} & set(filled))
    if need:
        raise UsageError(f"the encoders read {', '.join(repr(n) for n in need)}, which the new data do not have")
    for enc, *_ in fam.encoders:
        for n, K in enc.features.levels.items():
            if int(np.max(model.values[n])) > K:
                raise UsageError(f"'{n}' has levels the fit never saw; the encoder knows {K}")
    return encode(fam, fit.q.program, model)


@torch.no_grad()
def encoded_rows(fit, model_new, program_new, filled, S: int, gen) -> Dict[str, torch.Tensor]:
    """For `ppl predict` with new rows: each amortised latent's S draws from q(z_n | x_n) of the new
    rows (constrained), where the encoder's inputs are in the new data; a latent left out here is
    drawn from its prior, as any new row's latent."""
    fam = getattr(fit.q, "family", None) if fit.q is not None else None
    if not isinstance(fam, Amortized):
        return {}
    blocks = {b.name: b for b in program_new.blocks}
    out = {}
    for enc, _, k, name in fam.encoders:
        b = blocks.get(name)
        if b is None or b.transform is None and b.kind != "real" or set(enc.features.names) & set(filled):
            continue
        if any(n in enc.features.levels and int(np.max(model_new.values[n])) > enc.features.levels[n]
               for n in enc.features.names):
            continue
        data = {n: program_new.rt.tensor(np.asarray(model_new.values[n], dtype=np.float64)).unsqueeze(0)
                for n in enc.features.names}
        x = enc.features(data)
        eps = torch.randn((S, x.shape[0], k), generator=gen, dtype=x.dtype, device=x.device)
        u = enc.draw(x, eps)[0].reshape((S,) + tuple(b.ushape))
        out[name] = u if b.transform is None else b.transform(u)
    return out


def encode(fam: Amortized, program, model_new) -> Dict[str, Dict[str, np.ndarray]]:
    """q(z_n | x_n) for the rows of `model_new` (the model checked with new data): latent ->
    {"mean": (rows, *shape), "sd": (rows, *shape)} in z's unconstrained space."""
    rt = program.rt
    out = {}
    for enc, _, k, name in fam.encoders:
        data = {}
        for n in enc.features.names:
            v = np.asarray(model_new.values[n], dtype=np.float64)
            data[n] = rt.tensor(v).unsqueeze(0)
        x = enc.features(data)
        mu, sd = enc.mean_sd(x)
        shape = tuple(int(d) for d in model_new.nodes[name].shape[1:])
        B = x.shape[0]
        out[name] = {"mean": _np(mu).reshape((B,) + shape), "sd": _np(sd).reshape((B,) + shape)}
    return out


REFINE_DRAWS = 16         # MC draws per refinement step, antithetic pairs (each row's own Gaussian; globals from q)
REFINE_DECAY = 25.0       # the step size falls as 1 / (1 + t / REFINE_DECAY): the rows settle, not wander
REFINE_LR = 0.05          # Adam's step size, in coordinates whitened by the encoder's q of the row
GAP_DRAWS = 500           # draws for the ELBO before and after (common random numbers: the same draws)


class RefinedRows:
    """Each row's own Gaussian over the amortised latents' values, started at the encoder's output:
    z_n = m_n + C_n eps with m_n = mu_n + L_n a_n and C_n = L_n tril_exp(T_n), where (mu_n, L_n) is the
    encoder's q of row n (a diagonal L_n for an MLP, the shared factor for `linear`)."""

    def __init__(self, fam: Amortized, row_data: Dict[str, torch.Tensor]):
        self.fam = fam
        mus, Ls = [], []
        with torch.no_grad():
            for enc, _, k, _ in fam.encoders:
                x = enc.features(row_data)
                if enc.spec.iaf:                     # a Gaussian from the flow's moments
                    mu, sd = enc.mean_sd(x)
                    L = torch.diag_embed(sd)
                else:
                    mu, s = enc.moments(x)
                    L = s.expand(mu.shape[0], k, k) if enc.spec.linear else torch.diag_embed(torch.exp(s))
                mus.append(mu)
                Ls.append(L)
        self.mu = torch.cat(mus, 1)
        kt = self.mu.shape[1]
        self.L = torch.zeros(self.mu.shape[0], kt, kt, dtype=self.mu.dtype, device=self.mu.device)
        o = 0
        for L in Ls:
            k = L.shape[-1]
            self.L[:, o:o + k, o:o + k] = L
            o += k
        N, k = self.mu.shape
        self.a = torch.zeros(N, k, dtype=self.mu.dtype, device=self.mu.device, requires_grad=True)
        self.T = torch.zeros(N, k, k, dtype=self.mu.dtype, device=self.mu.device, requires_grad=True)
        self.sizes = [k for _, _, k, _ in fam.encoders]

    def factor(self, idx):
        T = self.T[idx]
        C = torch.tril(T, -1) + torch.diag_embed(torch.exp(torch.diagonal(T, dim1=-2, dim2=-1)))
        return self.mu[idx] + (self.L[idx] @ self.a[idx].unsqueeze(-1)).squeeze(-1), self.L[idx] @ C

    def draw(self, idx, eps: torch.Tensor):
        """eps (S, B, k) -> (each encoder's columns of z (S, B, k_e), log q (S,), entropy)."""
        m, C = self.factor(idx)
        z = m + torch.einsum("bij,sbj->sbi", C, eps)
        logdet = torch.log(torch.diagonal(C, dim1=-2, dim2=-1).abs()).sum()
        B, k = m.shape
        lq = (-0.5 * eps * eps).sum((-1, -2)) - 0.5 * B * k * _LOG2PI - logdet
        return list(torch.split(z, self.sizes, -1)), lq, logdet + 0.5 * B * k * (1 + _LOG2PI)

    @torch.no_grad()
    def mean_sd(self):
        m, C = self.factor(slice(None))
        return m, torch.sqrt((C * C).sum(-1))


def _elbo_rows(fam: Amortized, program, draw_enc, gen_seed: int, draws: int) -> float:
    """`elbo_of` on the draws of a private generator seeded `gen_seed` (two calls with one seed:
    common draws, so their difference carries little Monte Carlo noise)."""
    saved = fam.gen, fam.glob.gen
    fam.gen = fam.glob.gen = torch.Generator(device=fam.device).manual_seed(gen_seed)
    try:
        return elbo_of(fam, program, draws, draw_enc)
    finally:
        fam.gen, fam.glob.gen = saved


def refine(fam: Amortized, program, steps: int, seed: int = 0) -> Dict[str, float]:
    """`steps` Adam steps of every row's own Gaussian (the amortised latents; the globals' q and the
    other rows held), from the encoder's output; -> the ELBO before and after, on common draws, and
    their difference: the amortisation gap (Cremer et al. 2018) as far as the steps close it."""
    from .optim import Adam
    rows = RefinedRows(fam, program.row_data)
    gen = torch.Generator(device=fam.device).manual_seed(int(seed) * 7919 + 13)

    def enc_draw(data, idx, eps):
        zs, lq, _ = fam.encode_rows(data, eps)
        return zs, lq

    def row_draw(data, idx, eps):
        z, lq, _ = rows.draw(idx, torch.cat(eps, -1))
        return z, lq

    before = _elbo_rows(fam, program, enc_draw, int(seed) + 101, GAP_DRAWS)
    opt = Adam([rows.a, rows.T], [REFINE_LR, REFINE_LR])
    N = fam.N
    per_row = max(1, program.largest_node() // N)
    chunk = max(1, CHUNK_ELEMENTS // (REFINE_DRAWS * per_row))
    saved = fam.gen, fam.glob.gen
    fam.gen = fam.glob.gen = gen
    avg_a, avg_T, n_avg = rows.a.detach().clone(), rows.T.detach().clone(), 0
    try:
        for t in range(steps):
            opt.zero_grad()
            for i in range(0, N, chunk):
                idx = torch.arange(i, min(N, i + chunk), device=program.device)
                b = Batch.rows(program.row_data, idx, N)
                with torch.no_grad():
                    theta_g = fam.glob.rsample(REFINE_DRAWS)
                    r = fam.loc[idx]
                    z_r = fam.local_theta(r, fam.local_eps(r.shape[0], REFINE_DRAWS))
                eps = torch.randn((REFINE_DRAWS // 2, idx.shape[0], rows.mu.shape[1]), generator=gen,
                                  dtype=program.dtype, device=program.device)
                eps = torch.cat([eps, -eps])            # antithetic: a Gaussian row's mean gradient is exact
                z_e, _, ent = rows.draw(idx, eps)
                total = program.evaluate(None, blocks=fam.blocks(theta_g, fam.assemble(z_r, z_e)), batch=b).total
                (-(total.mean() + ent) / N).backward()
            opt.step(1.0 / (1.0 + t / REFINE_DECAY))
            if t >= steps // 2:                     # the average iterate over the second half
                n_avg += 1
                with torch.no_grad():
                    avg_a.lerp_(rows.a, 1.0 / n_avg)
                    avg_T.lerp_(rows.T, 1.0 / n_avg)
        with torch.no_grad():
            rows.a.copy_(avg_a)
            rows.T.copy_(avg_T)
    finally:
        fam.gen, fam.glob.gen = saved
    after = _elbo_rows(fam, program, row_draw, int(seed) + 101, GAP_DRAWS)
    m, sd = rows.mean_sd()
    return {"steps": steps, "elbo_encoder": before, "elbo_refined": after, "gap": after - before,
            "gap_per_row": (after - before) / N, "rows_mean": m, "rows_sd": sd}


# ---- held-out rows ------------------------------------------------------------------------------------
def split_holdout(model, config):
    """`holdout=F`: a seeded random F of the rows (at least one, leaving at least one) is set aside; the
    fit sees the rest.  -> (the model checked with the training rows, the model checked with the
    held-out rows).  Needs an encoder for every local latent: a held-out row's q(z_n | x_n) comes from
    the encoders, which is what the held-out ELBO measures."""
    from ..api import PplModel
    from ..errors import UsageError
    from ..frontend import ast as A
    o = config.opt
    rows = model.rows
    if rows.symbol is None or not rows.size:
        raise UsageError(f"{o('holdout')} needs data with rows (a leading dimension the data share)")
    missing = [n.name for n in model.latents() if rows.is_row(n.name) and encoder_of(model, n.name) is None]
    if not model.encoders or missing:
        what = f"the local latent{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} " \
               f"ha{'ve' if len(missing) > 1 else 's'} none" if missing else "the model declares none"
        raise UsageError(f"{o('holdout')} scores held-out rows through encoders (amortize), so every local latent "
                         f"needs one; {what}")
    N = rows.size
    n_out = min(N - 1, max(1, int(round(config.holdout * N))))
    if N < 2:
        raise UsageError(f"{o('holdout')} needs at least 2 rows; the data have {N}")
    perm = np.random.default_rng(int(config.seed) + 7).permutation(N)
    out_idx, in_idx = np.sort(perm[:n_out]), np.sort(perm[n_out:])

    def subset(idx):
        obj = {}
        for st in model.program.statements:
            if not isinstance(st, A.DataDecl) or st.name not in model.values:
                continue
            v = np.asarray(model.values[st.name])
            if rows.is_row(st.name):
                v = v[idx]
            obj[st.name] = v.astype(np.int64).tolist() if st.type.base in ("int", "level") else v.tolist()
        for k, n in model.dims.items():
            if k not in model.nodes or model.nodes[k].kind == "data":
                obj[k] = int(len(idx)) if k == rows.symbol else int(n)
        return obj
    pm = PplModel(model.source)
    train, held = pm.check(subset(in_idx)), pm.check(subset(out_idx))
    train.levels.update(model.levels)
    held.levels.update(model.levels)
    return train, held


@torch.no_grad()
def heldout_elbo(fam: Amortized, program, held_model, draws: int = 200, seed: int = 0) -> float:
    """The ELBO per row of held-out rows: E over q of each row's own terms (its likelihood, its local
    latents' prior and Jacobian) minus log q(z_n | x_n), averaged over the rows; global terms left
    out.  A row's own terms are told from the global ones by evaluating each batch at two scales
    (the compiled model multiplies per-row terms by the batch's scale)."""
    rt = program.rt
    row_data = {k: rt.tensor(np.asarray(held_model.values[k], dtype=np.float64)).unsqueeze(0)
                for k in program.row_data}
    N = held_model.rows.size
    saved = fam.gen, fam.glob.gen
    g = torch.Generator(device=fam.device).manual_seed(int(seed) + 211)
    fam.gen = fam.glob.gen = g
    try:
        per_row = max(1, program.largest_node() // max(1, program.model.rows.size))
        chunk = max(1, CHUNK_ELEMENTS // (draws * per_row))
        theta_g, _ = fam.glob.rsample_with_log_q(draws)
        acc = torch.zeros(draws, dtype=program.dtype, device=program.device)
        for i in range(0, N, chunk):
            idx = torch.arange(i, min(N, i + chunk), device=program.device)
            data = {k: v.index_select(1, idx) for k, v in row_data.items()}
            B = idx.shape[0]
            z_e, lq_e, _ = fam.encode_rows(data, fam.encoder_eps(B, draws))
            z_r = torch.zeros((draws, B, 0), dtype=program.dtype, device=program.device)   # every local: encoded
            blocks = fam.blocks(theta_g, fam.assemble(z_r, z_e))
            t1 = program.evaluate(None, blocks=blocks, batch=Batch(data, 1.0, B, index=idx)).total
            t2 = program.evaluate(None, blocks=blocks, batch=Batch(data, 2.0, B, index=idx)).total
            acc += (t2 - t1) - lq_e
        return float(acc.mean()) / N
    finally:
        fam.gen, fam.glob.gen = saved
