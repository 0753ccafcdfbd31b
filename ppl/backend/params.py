"""Params: the model's `param` declarations (point estimates) -> unconstrained
leaf tensors that every optimiser updates together with q's parameters.

A param is not a random variable: it has no prior, no draws and no density
of its own.  Its value is `biject_to(its set)(u)` for an unconstrained leaf
`u`, with NO log|det J| term (a Jacobian belongs to a change of variables
of a density; a point estimate has none), so the fit maximises the ELBO in
the params: maximum marginal likelihood (type-II ML) with q for the latents,
as a VAE's decoder weights are fitted.

The seam: the compiled model (`LogJoint.params`) owns the one `Params` of a
fit and reads `value(name)` into every evaluation, broadcast over the Monte
Carlo draws.  The variational problem (`ppl.infer.engine.VI.parameters()`)
appends `tensors()` to the family's parameters, so whatever steps those
(Adam, the fixed-draw L-BFGS, the minibatch epochs) steps the params too;
the gradient estimators set their `.grad` (autograd reaches them through
the log joint, the closed-form estimator asks for them explicitly).

Initial values (in the unconstrained space u): 0 (so 0 for a real, 1 for a
positive, the midpoint of an interval, lower + 1 for a lower bound), except
unbounded real params with two or more dimensions (weight matrices, used in
products where zero is a saddle: every gradient of `z @ W` through a
zero matrix vanishes for the layer before) which start at seeded
Glorot-normal values, N(0, 2 / (fan_in + fan_out)) with fan_in, fan_out the
last two sizes.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch

from .transforms import bijection, unconstrained_shape


class Params:
    """name -> an unconstrained leaf (requires_grad) and the bijection onto its set."""

    def __init__(self, model, known: Mapping[str, torch.Tensor], rt):
        self.rt = rt
        self.u: Dict[str, torch.Tensor] = {}
        self.transforms: Dict[str, Optional[object]] = {}      # None: the identity (an unbounded real)
        self.shapes: Dict[str, tuple] = {}
        gen = torch.Generator(device=rt.device).manual_seed(int(rt.seed) + 7919)
        from ..expr import compile_expr
        from .ops import TorchOps
        ops = TorchOps(rt.dtype, rt.device)
        for node in model.params():
            c = node.constraint
            kind = c.kind if c is not None else "real"
            shape = tuple(int(d) for d in node.shape)
            bounds = []
            for b in ((c.lower, c.upper) if c is not None else (None, None)):
                bounds.append(None if b is None else
                              compile_expr(b, model.rank, known, ops).fn({}).reshape(-1)[0])
            t = None if kind == "real" else bijection(kind, *bounds)
            ushape = unconstrained_shape(kind, shape)
            if kind == "real" and len(shape) >= 2:
                sd = math.sqrt(2.0 / (shape[-2] + shape[-1])) if shape[-2] + shape[-1] else 1.0
                u0 = sd * torch.randn(ushape, generator=gen, dtype=rt.dtype, device=rt.device)
            else:
                u0 = torch.zeros(ushape, dtype=rt.dtype, device=rt.device)
            self.u[node.name] = u0.requires_grad_(True)
            self.transforms[node.name] = t
            self.shapes[node.name] = shape

    def __bool__(self) -> bool:
        return bool(self.u)

    def __iter__(self):
        return iter(self.u)

    def tensors(self) -> List[torch.Tensor]:
        """The leaves an optimiser steps (in declaration order)."""
        return list(self.u.values())

    def value(self, name: str) -> torch.Tensor:
        """The constrained value (differentiable in the leaf), with a leading draw axis of 1."""
        t = self.transforms[name]
        u = self.u[name]
        return (u if t is None else t(u)).unsqueeze(0)

    def values(self) -> Dict[str, np.ndarray]:
        """name -> the constrained value (numpy, the declared shape)."""
        with torch.no_grad():
            return {n: self.value(n)[0].detach().cpu().numpy().copy() for n in self.u}

    def load(self, values: Mapping[str, np.ndarray]) -> None:
        """Set the params from constrained values (a fit's, or a saved fit's); a missing or misshapen
        one is a ValueError naming it."""
        with torch.no_grad():
            for n, u in self.u.items():
                v = values.get(n)
                if v is None or tuple(np.shape(v)) != self.shapes[n]:
                    raise ValueError(f"no value of shape {self.shapes[n]} for the param '{n}'")
                x = torch.as_tensor(np.asarray(v, dtype=np.float64), dtype=self.rt.dtype, device=self.rt.device)
                t = self.transforms[n]
                u.copy_(x if t is None else t.inv(x))

    # ---- one flat vector (the fixed-draw L-BFGS path) ---------------------------------------------
    def flat(self) -> torch.Tensor:
        return torch.cat([u.detach().reshape(-1) for u in self.u.values()] +
                         [torch.zeros(0, dtype=self.rt.dtype, device=self.rt.device)])

    def assign(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            i = 0
            for u in self.u.values():
                u.copy_(x[i:i + u.numel()].view(u.shape))
                i += u.numel()

    def grad(self) -> torch.Tensor:
        return torch.cat([(torch.zeros_like(u) if u.grad is None else u.grad).reshape(-1) for u in self.u.values()]
                         + [torch.zeros(0, dtype=self.rt.dtype, device=self.rt.device)])

    def size(self) -> int:
        return sum(u.numel() for u in self.u.values())
