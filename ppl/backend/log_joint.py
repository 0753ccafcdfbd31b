"""log_joint: checked IR + estimator plan + runtime -> the compiled model: a
log density on one flat unconstrained vector, vectorised over a leading Monte
Carlo sample dimension, called with a data batch.

Compiled once per fit.  Each continuous latent owns a block of the vector,
mapped onto its set by `biject_to` (log|det J| added); global data and
constants are tensors made once and folded; per-row data (the model's row
axis, `ppl.frontend.rows`) come with each call in a `Batch`, which also
carries the scale of per-row density terms (N/B under a minibatch) and a
cache of data-only sub-expressions; expressions are closures from
`ppl.expr.compile_expr`.  Enumerated discrete latents are summed out exactly
(one vectorised pass for all values, elementwise per row), several at once
when they share factors (a group: the product of their values); a count
latent is summed over a window of values per element (truncated
enumeration: `set_window`, chosen by `ppl.infer.windows`); discrete latents on
the score path take their values from the caller: discrete values, or relaxed
draws (`ppl.backend.relax.RelaxedDraw`, Gumbel-softmax) for a latent whose
support has a relaxation (its density is then the relaxed one, and `x[z]` a
weighted sum).

Input: `Model`, plan, `Runtime`.  Output: `LogJoint`, with
`log_prob(theta[, z], batch=None) -> (S,)` (None: the full data).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .. import distributions as DS
from ..errors import Diagnostic, PplError
from ..expr import CACHE, compile_expr, soft_key
from ..frontend.check import Model, Node
from ..plan import NodePlan
from ..supports import SUPPORTS
from . import dists as D
from .ops import TorchOps
from .params import Params
from .relax import RELAXATIONS, RelaxedDraw
from .runtime import Batch, as_runtime
from .transforms import bijection, sum_event, unconstrained_shape


@dataclass
class Block:
    name: str
    offset: int
    size: int
    ushape: Tuple[int, ...]
    shape: Tuple[int, ...]
    transform: Optional[object]                 # static bijection, or None when bounds vary
    bounds: Optional[Callable] = None           # env -> (lo, hi) for a varying bijection
    kind: str = "real"
    per_row: bool = False                       # a local latent (rows leading): its Jacobian is a per-row term


@dataclass
class Factor:
    name: str
    value: Callable                             # env -> value tensor
    log_prob: Callable                          # (env, value) -> elementwise log density
    log_prob_sum: Optional[Callable] = None     # (env, value) -> (S,): the same summed, where fused
    per_row: bool = False                       # a term per data row: scaled by the batch's scale


@dataclass
class EnumMember:
    name: str
    values: torch.Tensor                        # (K,) the support; a window: offsets 0..W-1 from its first value
    prior: Factor
    window: bool = False                        # a window per element, between env[lo_key] and env[hi_key]
    per_row: bool = False                       # the window's bounds are per-row data (sliced by a batch)

    @property
    def lo_key(self) -> str:
        return "\0window lo " + self.name

    @property
    def hi_key(self) -> str:
        return "\0window hi " + self.name


@dataclass
class EnumGroup:
    name: str
    members: List[EnumMember]                   # summed jointly over the product of their values
    shape: Tuple[int, ...]
    deterministics: List[Tuple[str, Callable]]  # tainted, in order
    factors: List[Factor]

    @property
    def values(self) -> torch.Tensor:           # a single member's support
        return self.members[0].values

    @property
    def prior(self) -> Factor:
        return self.members[0].prior

    def size(self) -> int:
        out = 1
        for m in self.members:
            out *= int(m.values.shape[0])
        return out


@dataclass
class Evaluation:
    total: torch.Tensor                         # (S,)
    env: Dict[str, torch.Tensor]
    factors: Dict[str, torch.Tensor] = field(default_factory=dict)   # elementwise log densities
    enum_logits: Dict[str, torch.Tensor] = field(default_factory=dict)  # (K, S, *shape) per enumerated latent


class LogJoint:
    def __init__(self, model: Model, plan: Mapping[str, NodePlan], runtime=torch.float64):
        self.rt = rt = as_runtime(runtime)
        self.model, self.plan, self.dtype, self.device = model, dict(plan), rt.dtype, rt.device
        self.ops = TorchOps(rt.dtype, rt.device)
        known, rows = {}, {}
        for k, v in model.values.items():
            t = rt.tensor(np.asarray(v, dtype=np.float64)).unsqueeze(0)
            (rows if model.rows.is_row(k) else known)[k] = t
        for k, v in model.dims.items():
            known.setdefault(k, rt.tensor([float(v)]))
        self.known = known                       # folded into the compiled model
        self.row_data = rows                     # per-row data: passed in each `Batch`
        self.batch = Batch.full(rows, model.rows.size)   # the full data (a data-parallel fit: this process's)
        self.full_batch = self.batch
        self.row_offset = 0                              # the first row of `row_data` (ppl.dist: own rows)
        self.local_rows = False                          # `row_data` holds this process's rows only
        self.params = Params(model, known, rt)           # `param` declarations: point estimates
        self.blocks: List[Block] = []
        self.score: List[str] = []
        self.relaxed: Dict[str, Tuple[object, Callable]] = {}   # score latent -> (relaxation, its distribution)
        self.enum: List[EnumGroup] = []
        self.steps: List[Tuple[str, str, object]] = []   # (kind, name, payload)
        self.deterministic: Dict[str, Callable] = {}     # name -> env -> value
        self.work = 0                                    # draws evaluated with densities (a cost count)
        self._compile()

    # ---- compilation ----------------------------------------------------------
    def expr(self, e):
        return self._compiled(e).fn

    def _compiled(self, e):
        return compile_expr(e, self.model.rank, self.known, self.ops, self.row_data)

    def _aligned_args(self, node: Node, spec: DS.DistSpec, args, floats: bool = False) -> List[Callable]:
        """Argument closures aligned to the node's rank; with `floats`, constant scalars
        become Python floats (no tensor op, no autograd node: the fused densities take them)."""
        ranks = spec.param_event_ranks or (0,) * spec.arity
        target_batch = len(node.shape) - spec.event_rank
        out = []
        for a, er in zip(args, ranks):
            c = self._compiled(a)
            fn = c.fn
            ra = self.model.rank(a)
            if floats and c.const and ra == 0:
                v = float(fn({}).reshape(-1)[0])
                out.append((lambda v: lambda env: v)(v))
                continue
            pad = target_batch - (ra - er)
            if pad > 0:
                fn = (lambda f, ra, pad: lambda env: TorchOps.align(f(env), ra, ra + pad))(fn, ra, pad)
            out.append(fn)
        return out

    def distribution(self, node: Node) -> Callable:
        """(env, batch shape) -> the torch distribution of `node` given its parents, its parameters
        broadcast to that batch shape ((S, *the node's batch dims)): for forward simulation."""
        name, dist_args = DS.fold_link(node.dist.spec, node.dist.args)
        spec = DS.REGISTRY[name]
        args = self._aligned_args(node, spec, dist_args)
        extra = {"event": tuple(node.shape[-spec.event_rank:])} if spec.event_shape is None and spec.event_rank else {}

        def make(env, batch_shape):
            vals = [f(env) for f in args]
            vals = [v.expand(tuple(batch_shape) + tuple(v.shape[len(batch_shape):])) for v in vals]
            return spec.build(D, *vals, **extra)
        make.event_rank = spec.event_rank
        return make

    def _logp_fns(self, node: Node) -> Tuple[Callable, Optional[Callable]]:
        """(env, value) -> elementwise log density of `node`'s distribution, and the registry's
        per-sample sum of it (None where the distribution has no fused sum)."""
        name, dist_args = DS.fold_link(node.dist.spec, node.dist.args)
        spec = DS.REGISTRY[name]
        args = self._aligned_args(node, spec, dist_args, floats=spec.lpdf is not None)
        if spec.lpdf is not None:
            return _bind(spec.lpdf(D), args), None if spec.lpdf_sum is None else _bind(spec.lpdf_sum(D), args)
        build = spec.build
        if spec.event_shape is None and spec.event_rank > 0:
            event = tuple(node.shape[-spec.event_rank:])
            return (lambda env, x: build(D, *[f(env) for f in args], event=event).log_prob(x)), None
        return (lambda env, x: build(D, *[f(env) for f in args]).log_prob(x)), None

    def _compile(self):
        m = self.model
        tainted: Dict[str, str] = {}            # node -> enumerated latent it depends on
        enum_groups: Dict[str, EnumGroup] = {}
        factor_owner: Dict[str, str] = {}
        for name, p in self.plan.items():
            if p.estimator == "enumerate":
                for f in p.factors:
                    factor_owner[f] = p.group or name
        offset = 0
        for name in m.order:
            node = m.nodes[name]
            if node.kind in ("data", "constant"):
                continue
            if node.kind == "param":
                self.steps.append(("param", name, None))
                continue
            owner = next((tainted[d] for d in node.deps if d in tainted), None)
            if node.kind == "deterministic":
                fn = self.expr(node.expr)
                self.deterministic[name] = fn
                if owner is not None:
                    tainted[name] = owner
                    enum_groups[owner].deterministics.append((name, fn))
                else:
                    self.steps.append(("deterministic", name, fn))
                continue
            per_row = m.rows.is_row(name)
            if node.kind == "latent" and node.discrete:
                prior = Factor(name, None, self._logp_fns(node)[0], per_row=per_row)
                np_ = self.plan[name]
                if np_.estimator == "enumerate":
                    spec = DS.REGISTRY[node.dist.spec]
                    if np_.window:      # offsets from the window's first value; one value until set_window
                        vals = torch.zeros(1, dtype=self.dtype, device=self.device)
                    else:
                        vals = torch.arange(np_.size, dtype=self.dtype, device=self.device) + \
                            SUPPORTS[spec.support].first
                    member = EnumMember(name, vals, prior, np_.window, per_row)
                    group = np_.group or name
                    if group in enum_groups:
                        enum_groups[group].members.append(member)
                    else:
                        g = EnumGroup(name, [member], tuple(node.shape), [], [])
                        enum_groups[name] = g
                        self.enum.append(g)
                    tainted[name] = group
                    if np_.window:
                        zero = self.rt.zeros((1,) + tuple(int(d) for d in node.shape))
                        self._set_bounds(member, zero, zero)
                else:
                    self.score.append(name)
                    self.steps.append(("score", name, prior))
                    relaxation = SUPPORTS[DS.REGISTRY[node.dist.spec].support].relaxation
                    if relaxation is not None:
                        self.relaxed[name] = (RELAXATIONS[relaxation], self.distribution(node))
                continue
            if node.kind == "latent":
                block = self._block(node, offset)
                offset += block.size
                self.steps.append(("block", name, (len(self.blocks), block)))
                self.blocks.append(block)
            if node.dist is not None:
                value = (lambda v: lambda env: v)(self.known[name]) if name in self.known else \
                    (lambda n: lambda env: env[n])(name)
                fac = Factor(name, value, *self._logp_fns(node), per_row=per_row)
                if name in factor_owner:
                    enum_groups[factor_owner[name]].factors.append(fac)
                else:
                    self.steps.append(("factor", name, fac))
        self.dim = offset

    def _block(self, node: Node, offset: int) -> Block:
        c = node.constraint
        if c is not None:
            kind, lo_e, hi_e = c.kind, c.lower, c.upper
        else:
            sup = DS.REGISTRY[node.dist.spec].support if node.dist else "real"
            kind = sup
            lo_e, hi_e = (node.dist.args[0], node.dist.args[1]) if sup == "interval" else (None, None)
        shape = tuple(int(d) for d in node.shape)
        varying = None
        lo = hi = None
        r = len(shape)
        fns = []
        for b in (lo_e, hi_e):
            if b is None:
                fns.append(None)
                continue
            fn = self.expr(b)
            rb = self.model.rank(b)
            fns.append((lambda f, rb: lambda env: TorchOps.align(f(env), rb, r))(fn, rb))
        names = {n.id for b in (lo_e, hi_e) if b is not None for n in _names(b)}
        if names - set(self.known):
            varying = lambda env: tuple(f(env) if f else None for f in fns)  # noqa: E731
            t0 = bijection(kind, *(self.rt.zeros(1) if f else None for f in fns))
        else:
            lo, hi = (f({})[0] if f else None for f in fns)
            t0 = bijection(kind, lo, hi)
        ushape = unconstrained_shape(kind, shape)
        size = int(np.prod(ushape)) if ushape else 1
        return Block(node.name, offset, size, ushape, shape, None if varying else t0, varying, kind,
                     self.model.rows.is_row(node.name))

    # ---- evaluation -------------------------------------------------------------
    def split(self, theta: torch.Tensor) -> List[torch.Tensor]:
        """(S, dim) -> one (S, *ushape) tensor per block (views where the shapes allow)."""
        S = theta.shape[0]
        out = []
        for b in self.blocks:
            if not b.ushape:
                out.append(theta[:, b.offset])
            elif len(b.ushape) == 1:
                out.append(theta[:, b.offset:b.offset + b.size])
            else:
                out.append(theta[:, b.offset:b.offset + b.size].reshape((S,) + b.ushape))
        return out

    def evaluate(self, theta: Optional[torch.Tensor], discrete: Optional[Mapping[str, torch.Tensor]] = None,
                 keep_factors: bool = False, keep_enum: bool = False, densities: bool = True,
                 blocks: Optional[List[torch.Tensor]] = None, batch: Optional[Batch] = None,
                 collective: bool = True) -> Evaluation:
        """`densities=False`: values only (no factor densities, no enumeration): `total` is then
        meaningless, and enumerated latents cannot be drawn.  `blocks`: `split(theta)` given
        directly (e.g. as autograd leaves), instead of `theta`.  `batch`: the data batch (None:
        the full data); per-row terms are multiplied by its scale (`factors` stay unscaled).
        `collective=False` (a data-parallel fit): this process's part of the log density, with no
        collective; the caller sums the parts and their gradients itself (ppl.dist.all_reduce_flat)."""
        batch = self.batch if batch is None else batch
        scale = batch.scale if batch.scale != 1.0 else None      # None: no per-row term is scaled
        # a data-parallel fit (see ppl.dist); values only: the whole data's rows, unless this process
        # holds only its own (then its rows of the local latents too)
        shard = batch.shard if densities or self.local_rows else None
        replicated = {}
        if shard is not None and collective:
            # theta (or its blocks) and the params enter through one replicate: one flat all-reduce of
            # their gradient (ppl.dist.replicate_flat: the same collective on every process)
            from ..dist import replicate_flat
            names = [name for kind, name, _ in self.steps if kind == "param"]
            lead = ([] if theta is None else [theta]) if blocks is None else list(blocks)
            rep = replicate_flat(lead + [self.params.value(n) for n in names])
            if blocks is None:
                theta = None if theta is None else rep[0]
            else:
                blocks = rep[:len(lead)]
            replicated = dict(zip(names, rep[len(lead):]))
        own = None                           # theta whole, for the control term below
        if batch.control is not None:
            own = theta if blocks is None else torch.cat([u.reshape(u.shape[0], -1) for u in blocks], 1)
        us = self.split(theta) if blocks is None else blocks
        S = theta.shape[0] if blocks is None else (us[0].shape[0] if us else 1)
        if densities:
            self.work += S
        env: Dict = dict(self.known)
        env.update(batch.data)
        env[CACHE] = batch.cache
        total = None
        factors: Dict[str, torch.Tensor] = {}
        for kind, name, payload in self.steps:
            if kind == "block":
                i, b = payload
                u = us[i]
                if shard is not None and b.per_row and u.shape[1] == b.ushape[0]:
                    u = u[:, shard[0]:shard[1]]      # a local latent's every row: this process's (a batch: its own)
                if b.kind == "real":
                    env[name] = u                    # identity: no transform, no Jacobian
                    continue
                t = b.transform if b.transform is not None else bijection(b.kind, *b.bounds(env))
                x = t(u)
                env[name] = x
                if b.per_row or batch.global_terms:
                    total = _add(total, _scaled(sum_event(t.log_abs_det_jacobian(u, x)), b.per_row, scale))
            elif kind == "deterministic":
                env[name] = payload(env)
            elif kind == "param":
                env[name] = self.params.value(name)          # a point estimate: no Jacobian, no density
                if name in replicated:                         # (its gradient: summed over the processes)
                    env[name] = replicated[name]
            elif kind == "score":
                z = discrete[name]
                if shard is not None and payload.per_row and z.shape[1] != shard[1] - shard[0]:
                    z = z[:, shard[0]:shard[1]]
                if not (payload.per_row or batch.global_terms):
                    env[name] = z
                    continue
                if isinstance(z, RelaxedDraw):
                    lp = self._relaxed(name, z, env)
                else:
                    env[name] = z
                    lp = payload.log_prob(env, z)
                if keep_factors:
                    factors[name] = lp
                total = _add(total, _scaled(sum_event(lp), payload.per_row, scale))
            elif densities and (payload.per_row or batch.global_terms):   # factor
                if payload.log_prob_sum is not None and not keep_factors:
                    total = _add(total, _scaled(payload.log_prob_sum(env, payload.value(env)), payload.per_row, scale))
                    continue
                lp = payload.log_prob(env, payload.value(env))
                if keep_factors:
                    factors[name] = lp
                total = _add(total, _scaled(sum_event(lp), payload.per_row, scale))
        enum_logits = {}
        for g in (self.enum if densities else ()):
            if not (g.prior.per_row or batch.global_terms):
                continue
            L = self._enumerate(g, env, S, batch)
            if keep_enum:
                enum_logits[g.name] = L
            total = _add(total, _scaled(sum_event(torch.logsumexp(L, 0)), g.prior.per_row, scale))
        if total is None:
            total = torch.zeros(S, dtype=self.dtype, device=self.device)
        elif total.shape != (S,):
            total = total.expand(S)
        if batch.control is not None and densities:
            # a zero-mean linear term over batches (minibatch.py); in a data-parallel fit, this
            # process's part of it (summed with the rest: its theta is the replicated one)
            c, theta0 = batch.control
            total = total + (own - theta0) @ c
        if shard is not None and densities and collective:
            from ..dist import AllReduce
            total = AllReduce.apply(total)
        return Evaluation(total, env, factors, enum_logits)

    def relaxed_prior_logits(self, name: str, env, shape) -> torch.Tensor:
        """The logits of latent `name`'s distribution given its parents in `env`, for draws of `shape`."""
        relaxation, make = self.relaxed[name]
        return relaxation.logits_of(make(env, tuple(shape)))

    def _relaxed(self, name: str, z: RelaxedDraw, env) -> torch.Tensor:
        """A relaxed (Gumbel-softmax) draw of a score latent: the model reads its relaxed value (and an
        index reads its one-hot weights); its own term is E_q[log p(z)] in closed form (or the concrete
        density at the prior's logits: `ppl.backend.relax`)."""
        if name not in self.relaxed:
            raise ValueError(f"'{name}' has no continuous relaxation")
        env[name] = z.value
        if z.weights is not None:
            env[soft_key(name)] = z.weights
        relaxation, _ = self.relaxed[name]
        prior = self.relaxed_prior_logits(name, env, z.shape)
        if z.q_logits is not None:           # E_q[log p(z)], summed over z's values
            return relaxation.cross_entropy(z.q_logits, prior).expand(z.shape)
        return relaxation.log_density(prior, z.x, z.T)

    # ---- enumeration --------------------------------------------------------------
    def _set_bounds(self, m: EnumMember, lo: torch.Tensor, hi: torch.Tensor) -> None:
        store = (self.row_data, self.batch.data) if m.per_row else (self.known,)
        for d in store:
            d[m.lo_key], d[m.hi_key] = lo, hi

    def set_window(self, name: str, lo, hi) -> None:
        """Sum the count latent `name` over lo[i]..hi[i] at element i (arrays of its shape)."""
        m = self.member(name)
        node = self.model.nodes[name]
        shape = (1,) + tuple(int(d) for d in node.shape)
        lo_t = self.rt.tensor(np.asarray(lo, dtype=np.float64)).reshape(shape)
        hi_t = self.rt.tensor(np.asarray(hi, dtype=np.float64)).reshape(shape)
        width = int((hi_t - lo_t).max()) + 1 if lo_t.numel() else 1
        m.values = torch.arange(max(1, width), dtype=self.dtype, device=self.device)
        self._set_bounds(m, lo_t, hi_t)

    def window(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        """The window of a count latent: (first values, last values), arrays of its shape."""
        m = self.member(name)
        src = self.row_data if m.per_row else self.known
        shape = tuple(int(d) for d in self.model.nodes[name].shape)
        return (src[m.lo_key].reshape(shape).cpu().numpy().copy(),
                src[m.hi_key].reshape(shape).cpu().numpy().copy())

    def member(self, name: str) -> EnumMember:
        for g in self.enum:
            for m in g.members:
                if m.name == name:
                    return m
        raise KeyError(name)

    def group_of(self, name: str) -> EnumGroup:
        return next(g for g in self.enum if any(m.name == name for m in g.members))

    def member_grid(self, m: EnumMember, env) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(K, 1, *shape or ones) values of a member, and where they lie beyond its window (or None)."""
        nd = len(self.model.nodes[m.name].shape)
        if not m.window:
            return m.values.reshape((-1, 1) + (1,) * nd), None
        lo, hi = env[m.lo_key], env[m.hi_key]
        v = lo.unsqueeze(0) + m.values.reshape((-1, 1) + (1,) * nd)
        beyond = v > hi.unsqueeze(0)
        return torch.minimum(v, hi.unsqueeze(0)), beyond

    def _enumerate(self, g: EnumGroup, env, S, batch: Batch, grids: Optional[Mapping] = None) -> torch.Tensor:
        """(K, S, *shape): log p(z = k, blanket | rest), elementwise over z's elements, for each of the
        group's K joint values (members in order, the first varying slowest).
        One pass for all K values: the sample dimension is stacked K times (value-major), z = k
        is a (K*S, 1, ..) tensor that broadcasts over z's elements (a window: (K*S, *shape), its values
        per element), so x[z] is a one-element index per sample and the densities broadcast; never a
        loop over rows or samples.  `grids`: member -> ((K_j, S or 1, *shape or ones) values, mask or
        None) instead of its own (the window search probes values with it).  A value of zero
        probability scores -inf, never NaN."""
        grids = grids or {}
        parts = [grids[m.name] if m.name in grids else self.member_grid(m, env) for m in g.members]
        Ks = [int(v.shape[0]) for v, _ in parts]
        K = 1
        for k in Ks:
            K *= k
        e = {n: (v.repeat((K,) + (1,) * (v.dim() - 1)) if S > 1 and torch.is_tensor(v) and v.dim() > 0
                 and v.shape[0] == S and n not in self.known and n not in self.row_data else v)
             for n, v in env.items()}
        r = len(parts)
        beyond = None
        zs = []
        for j, ((v, mask), m) in enumerate(zip(parts, g.members)):
            def spread(t):
                view = (1,) * j + (Ks[j],) + (1,) * (r - j - 1) + tuple(t.shape[1:])
                t = t.reshape(view).expand(tuple(Ks) + (S,) + tuple(t.shape[2:]))
                return t.reshape((K * S,) + tuple(t.shape[r + 1:]))
            z = spread(v)
            zs.append(z)
            e[m.name] = z
            if mask is not None:
                mk = spread(mask)
                beyond = mk if beyond is None else beyond | mk
        for name, fn in g.deterministics:
            e[name] = fn(e)
        L = None
        for m, z in zip(g.members, zs):
            lp = m.prior.log_prob(e, z)
            L = lp if L is None else L + (sum_event(lp) if g.shape == () and lp.dim() > 1 else lp)
        for f in g.factors:
            lp = f.log_prob(e, f.value(e))
            L = L + (sum_event(lp) if g.shape == () else lp)
        shape = (batch.size,) + g.shape[1:] if g.prior.per_row and batch.size is not None else g.shape
        L = L.expand((K * S,) + shape)
        bad = torch.isnan(L)
        if beyond is not None:
            bad = bad | beyond.expand(L.shape)
        if bool(bad.any()):
            L = torch.where(bad, torch.full_like(L, -math.inf), L)
        return L.reshape((K, S) + shape)

    def unconstrain(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Constrained values of the continuous latents (each (S, *shape), e.g. prior draws) -> theta
        (S, dim); a value on its set's edge (a draw of exactly 0 for a positive latent) gives a
        non-finite row."""
        env: Dict = dict(self.known)
        env.update(self.batch.data)
        env[CACHE] = self.batch.cache
        env.update(values)
        S = next(iter(values.values())).shape[0] if values else 1
        out = []
        for b in self.blocks:
            x = values[b.name]
            if b.kind == "real":
                u = x
            else:
                t = b.transform if b.transform is not None else bijection(b.kind, *b.bounds(env))
                u = t.inv(x)
            out.append(u.reshape(S, -1))
        return torch.cat(out, 1) if out else torch.zeros((S, 0), dtype=self.dtype, device=self.device)

    def use_shard(self, lo: int, hi: int, global_terms: bool, world: int, local: bool = False,
                  longest: Optional[int] = None) -> None:
        """Evaluate this process's rows [lo, hi) of the data (a data-parallel fit, ppl.dist): every
        evaluation is then summed over the processes; `full_batch` keeps the whole data (`local`: the
        data hold only these rows, read by this process alone: `row_data` is then its rows).  `longest`:
        the most rows any process holds (default: an even split's, ceil(N / world))."""
        if longest is None:
            longest = -(-int(self.model.rows.size) // world)
        self.row_offset = lo if local else 0
        self.local_rows = local
        rows = dict(self.full_batch.data) if local else {k: v[:, lo:hi] for k, v in self.full_batch.data.items()}
        self.batch = Batch(rows, 1.0, hi - lo, shard=(lo, hi), global_terms=global_terms, longest=longest)

    def use_full_data(self) -> None:
        self.batch = self.full_batch

    def log_prob(self, theta: torch.Tensor, discrete=None, batch: Optional[Batch] = None) -> torch.Tensor:
        return self.evaluate(theta, discrete, batch=batch).total

    def largest_node(self) -> int:
        """Elements of the largest modelled variable: the size of one sample's intermediates (a count
        summed over a window: its elements times the values summed)."""
        windows = [g.size() * max(1, int(np.prod(g.shape))) for g in self.enum
                   if any(m.window for m in g.members)]
        return max([int(np.prod(n.shape)) for n in self.model.nodes.values()
                    if n.kind not in ("data", "constant")] + windows + [1])

    def chunk_size(self) -> int:
        """Samples per pass so one pass makes intermediates of at most ~4M elements."""
        return int(max(1, min(4096, 4_000_000 // self.largest_node())))

    # ---- values in constrained space -----------------------------------------
    def constrain(self, theta: torch.Tensor, discrete=None, generator: Optional[torch.Generator] = None
                  ) -> Dict[str, torch.Tensor]:
        """Values of every latent and deterministic (enumerated latents drawn from
        their exact conditional given the rest)."""
        return self.values(self.evaluate(theta, discrete, keep_enum=True), generator)

    def values(self, ev: Evaluation, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Constrained values from an evaluation made with `keep_enum=True`."""
        env = dict(ev.env)
        S = ev.total.shape[0]
        for g in self.enum:
            L = ev.enum_logits[g.name]                           # (K, S, *shape)
            K = L.shape[0]
            # by the inverse CDF (torch.multinomial is ~10x slower on many small rows)
            cdf = torch.cumsum(torch.softmax(L, 0), 0)
            u = torch.rand((1,) + tuple(L.shape[1:]), generator=generator, dtype=L.dtype, device=L.device)
            idx = (cdf < u * cdf[-1:]).sum(0).clamp(max=K - 1)
            stride = K
            for m in g.members:
                v, _ = self.member_grid(m, env)                  # (K_j, 1, *shape or ones)
                stride //= v.shape[0]
                k = (idx // stride) % v.shape[0]
                v = v.expand((v.shape[0], S) + tuple(L.shape[2:]) if v.dim() > 2 or L.dim() > 2
                             else (v.shape[0], S))
                env[m.name] = v.gather(0, k.unsqueeze(0)).squeeze(0)
            for name, fn in g.deterministics:
                env[name] = fn(env)
        out = {}
        for name in self.model.order:
            node = self.model.nodes[name]
            if node.kind in ("latent", "deterministic"):
                v = env[name]
                out[name] = v.expand((S,) + tuple(v.shape[1:])) if v.shape[0] == 1 else v
        return out

    def enum_moments(self, ev: Evaluation) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """E[z] and E[z^2] of each enumerated latent under its exact conditional given each draw's rest
        ((S, *shape) each), from an evaluation made with `keep_enum=True` (Rao-Blackwellised summaries)."""
        out = {}
        for g in self.enum:
            L = ev.enum_logits[g.name]                           # (K, S, *shape)
            p = torch.softmax(L, 0)
            K = L.shape[0]
            c = torch.arange(K, device=L.device)
            stride = K
            for m in g.members:
                v, _ = self.member_grid(m, ev.env)               # (K_j, 1, *shape or ones)
                stride //= v.shape[0]
                vc = v[(c // stride) % v.shape[0]]               # (K, 1, *shape or ones)
                out[m.name] = ((p * vc).sum(0), (p * vc * vc).sum(0))
        return out

    def simulate(self, given: Mapping[str, torch.Tensor], S: int, generator: torch.Generator,
                 batch: Optional[Batch] = None) -> Dict[str, torch.Tensor]:
        """Forward simulation, node by node in topological order: a latent in `given` takes that value
        ((S, *shape) or (1, *shape)), any other latent is drawn from its distribution given its parents
        (the prior), deterministic nodes are computed, and every observed node gets a replicate drawn
        given its parents (the replicates do not replace the data other nodes read).  With posterior
        draws as `given` the replicates are the posterior predictive; with nothing given, the prior
        predictive.  -> values of every latent, deterministic and observed node, each (S, *shape)."""
        batch = self.batch if batch is None else batch
        env: Dict = dict(self.known)
        env.update(batch.data)
        env[CACHE] = batch.cache
        out: Dict[str, torch.Tensor] = {}
        for name in self.model.order:
            node = self.model.nodes[name]
            if node.kind == "deterministic":
                env[name] = out[name] = _full(self.deterministic[name], env, S)
                continue
            if node.kind == "param":
                env[name] = self.params.value(name).detach()
                continue
            if node.kind not in ("latent", "observed") or (node.dist is None and name not in given):
                continue
            if name in given:
                env[name] = out[name] = given[name].expand((S,) + tuple(given[name].shape[1:]))
                continue
            shape = tuple(node.shape)
            if self.model.rows.is_row(name) and batch.size is not None:
                shape = (batch.size,) + shape[1:]
            x = self._draw(self.distribution(node), env, S, shape, generator)
            if node.kind == "latent" and node.declared and node.constraint is not None:
                x = self._restrict(node, x, env, S, shape, generator)
            out[name] = x
            if node.kind == "latent":
                env[name] = x
        return out

    def _draw(self, make, env, S: int, shape, generator: torch.Generator) -> torch.Tensor:
        """S draws of a node of `shape`.  torch's `sample` takes no generator, so the global one is
        forked and seeded from ours (the same draws at the same seed)."""
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            x = make(env, (S,) + tuple(shape[:len(shape) - make.event_rank])).sample()
        return x.to(self.dtype)

    def _restrict(self, node: Node, x, env, S, shape, generator, rounds: int = 200) -> torch.Tensor:
        """A declared constraint restricts the density to a set (as in Stan): draws from the restricted
        distribution by rejection (bounds), or by sorting (`ordered`: exact for exchangeable elements)."""
        kind = node.constraint.kind
        if kind == "ordered":
            return torch.sort(x, -1).values
        if kind not in ("lower", "upper", "interval", "positive"):
            return x
        lo_e, hi_e = node.constraint.lower, node.constraint.upper
        lo = 0.0 if kind == "positive" else (self.expr(lo_e)(env) if lo_e is not None else None)
        hi = self.expr(hi_e)(env) if hi_e is not None else None
        make = self.distribution(node)

        def outside(v):
            bad = torch.zeros_like(v, dtype=torch.bool)
            if lo is not None:
                bad |= v <= lo
            if hi is not None:
                bad |= v >= hi
            return bad
        for _ in range(rounds):
            bad = outside(x)
            if not bad.any():
                return x
            x = torch.where(bad, self._draw(make, env, S, shape, generator), x)
        raise PplError([Diagnostic(node.span, f"cannot draw '{node.name}' from its prior restricted to "
                                              f"{node.constraint.text()}: almost no prior mass lies there")])

    def _latent_ancestors(self, name: str) -> List[str]:
        node = self.model.nodes[name]
        own = [name] if node.kind == "latent" else []
        return own + [a for a in _ancestors(self.model, name) if self.model.nodes[a].kind == "latent"]

    def nonfinite_latents(self, theta: torch.Tensor, discrete=None) -> List[str]:
        """Names of the latents whose value or density is not finite (for messages)."""
        bad = []
        with torch.no_grad():
            try:
                ev = self.evaluate(theta, discrete, keep_factors=True)
            except (ValueError, RuntimeError):
                return [b.name for b in self.blocks]
            for b in self.blocks:
                u = theta[:, b.offset:b.offset + b.size]
                if not torch.isfinite(u).all() or not torch.isfinite(ev.env[b.name]).all():
                    bad.append(b.name)
            for name, lp in ev.factors.items():
                if not torch.isfinite(lp).all():
                    for a in self._latent_ancestors(name):
                        if a not in bad:
                            bad.append(a)
        return bad


def _bind(lpdf: Callable, args: List[Callable]) -> Callable:
    """(env, x) -> lpdf(x, *args(env)), unrolled for one and two arguments (the per-step path)."""
    if len(args) == 1:
        a0 = args[0]
        return lambda env, x: lpdf(x, a0(env))
    if len(args) == 2:
        a0, a1 = args
        return lambda env, x: lpdf(x, a0(env), a1(env))
    return lambda env, x: lpdf(x, *[f(env) for f in args])


def _full(fn: Callable, env, S: int) -> torch.Tensor:
    v = fn(env)
    return v.expand((S,) + tuple(v.shape[1:]))


def _scaled(term: torch.Tensor, per_row: bool, scale: Optional[float]) -> torch.Tensor:
    return term * scale if scale is not None and per_row else term


def _add(total: Optional[torch.Tensor], term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term


def _ancestors(model: Model, name: str) -> List[str]:
    seen, stack = [], list(model.nodes[name].deps)
    while stack:
        n = stack.pop()
        if n in seen or n not in model.nodes:
            continue
        seen.append(n)
        stack.extend(model.nodes[n].deps)
    return seen


def _names(e):
    from ..frontend import ast as A
    return A.names_in(e)
