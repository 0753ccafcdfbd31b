"""Optimiser primitives: Adam (the stochastic steps of the variational fit)
and L-BFGS with a backtracking Armijo line search (the mode search, and the
fixed-draw objective of dadvi: `lbfgs_vg` takes a value-and-gradient
function).

Written here rather than taken from torch.optim because torch.optim's first
step imports torch._dynamo, which costs about a second per process: more than
a whole small fit.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch


class Adam:
    """Adam over a list of tensors, each with its own step size: one multi-tensor (`torch._foreach_*`)
    update per step for all of them, not a Python loop over parameters (a VAE's dozen weight tensors
    cost a dozen dispatches per op otherwise)."""

    def __init__(self, params: Sequence[torch.Tensor], lrs: Sequence[float], betas=(0.9, 0.999), eps=1e-8):
        self.params = list(params)
        self.lrs = list(lrs)
        self.b1, self.b2 = betas
        self.eps = eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, scale: float = 1.0):
        self.t += 1
        c1 = 1 - self.b1 ** self.t
        rc2 = math.sqrt(1 - self.b2 ** self.t)
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        if len(live) == len(self.params):
            ps, ms, vs, lrs = self.params, self.m, self.v, self.lrs
        else:
            ps, ms, vs, lrs = ([xs[i] for i in live] for xs in (self.params, self.m, self.v, self.lrs))
        gs = [p.grad for p in ps]
        torch._foreach_lerp_(ms, gs, 1 - self.b1)
        torch._foreach_mul_(vs, self.b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - self.b2)
        # p -= lr/c1 * m / (sqrt(v/c2) + eps), with sqrt(c2) moved out of the denominator
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, self.eps * rc2)
        torch._foreach_addcdiv_(ps, ms, denom, [-lr * scale * rc2 / c1 for lr in lrs])


def lbfgs(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, max_iter: int = 500, history: int = 10,
          gtol: float = 1e-7, ftol: float = 1e-12, max_evals: Optional[int] = None,
          on_eval: Optional[Callable[[float], None]] = None, converged: bool = False):
    """Minimise f (differentiated by autograd) from x0; returns (x, evaluations), and whether it
    converged when `converged`."""
    def value_grad(x):
        x = x.detach().requires_grad_(True)
        v = f(x)
        if not torch.isfinite(v):
            return math.inf, None
        g, = torch.autograd.grad(v, x)
        return float(v.detach()), g
    out = lbfgs_vg(value_grad, x0, max_iter, history, gtol, ftol, max_evals, on_eval=on_eval)
    return out if converged else out[:2]


def lbfgs_vg(value_grad: Callable[[torch.Tensor], Tuple[float, Optional[torch.Tensor]]], x0: torch.Tensor,
             max_iter: int = 500, history: int = 10, gtol: float = 1e-7, ftol: float = 1e-12,
             max_evals: Optional[int] = None, stop: Optional[Callable[[float], bool]] = None,
             on_eval: Optional[Callable[[float], None]] = None) -> Tuple[torch.Tensor, int, bool]:
    """Minimise from x0, given x -> (value, gradient); returns (x, evaluations, converged: the
    gradient or the change of the value fell below its tolerance).  A non-finite value or gradient
    counts as +inf (the line search backs off)."""
    evals = 0
    vg = value_grad

    def value_grad(x):
        nonlocal evals
        evals += 1
        v, g = vg(x)
        if on_eval is not None:
            on_eval(v)
        if g is None or not math.isfinite(v) or not torch.isfinite(g).all():
            return math.inf, None
        return v, g

    x = x0.detach().clone()
    fx, g = value_grad(x)
    if g is None:
        return x, evals, False
    s_hist: List[torch.Tensor] = []
    y_hist: List[torch.Tensor] = []
    converged = False
    for it in range(max_iter):
        if float(g.abs().max()) < gtol:
            converged = True
            break
        if max_evals is not None and evals >= max_evals:
            break
        # two-loop recursion
        q = g.clone()
        alphas = []
        for s, y in zip(reversed(s_hist), reversed(y_hist)):
            rho = 1.0 / float(y @ s)
            a = rho * float(s @ q)
            alphas.append((a, rho, s, y))
            q -= a * y
        if s_hist:
            q *= float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1])
        else:
            q /= max(1.0, float(g.abs().max()))
        for a, rho, s, y in reversed(alphas):
            b = rho * float(y @ q)
            q += (a - b) * s
        d = -q
        gd = float(g @ d)
        if gd >= 0:                       # not a descent direction: restart from steepest descent
            s_hist.clear()
            y_hist.clear()
            d = -g / max(1.0, float(g.abs().max()))
            gd = float(g @ d)
        step = 1.0
        for _ in range(40):
            x_new = x + step * d
            f_new, g_new = value_grad(x_new)
            if g_new is not None and f_new <= fx + 1e-4 * step * gd:
                break
            step *= 0.5 if g_new is not None else 0.1
        else:
            break
        s, y = x_new - x, g_new - g
        if float(s @ y) > 1e-12 * float(y @ y):
            s_hist.append(s)
            y_hist.append(y)
            if len(s_hist) > history:
                s_hist.pop(0)
                y_hist.pop(0)
        converged = abs(fx - f_new) <= ftol * max(1.0, abs(fx))
        x, fx, g = x_new, f_new, g_new
        if stop is not None and stop(fx):
            converged = True
        if converged:
            break
    return x, evals, converged


def plateau(window: int, tol: float) -> Callable[[float], bool]:
    """A stopping rule for `lbfgs_vg`: the value fell by less than `tol` over the last `window` iterations."""
    values: List[float] = []

    def stop(fx: float) -> bool:
        values.append(fx)
        return len(values) > window and values[-window - 1] - fx < tol
    return stop


def newton(value: Callable[[torch.Tensor], float],
           value_grad_hess: Callable[[torch.Tensor], Tuple[float, Optional[torch.Tensor], Optional[torch.Tensor]]],
           x0: torch.Tensor, max_iter: int = 100, tol: float = 1e-10, max_evals: Optional[int] = None,
           on_eval: Optional[Callable[[float], None]] = None) -> "NewtonResult":
    """Minimise f from x0 by Newton steps with the exact Hessian; -> `NewtonResult`.

    Each step solves in coordinates scaled by the Hessian's diagonal (the curvature each coordinate
    gets from the data and the priors: an intercept of 6e4 beside a slope of 1e3 and a log scale
    of 10 all become unit-scale), by an eigendecomposition: |eigenvalue| for a non-convex direction
    (the step goes downhill, never to a saddle), and a floor of FLAT_EIG times the largest for a flat
    one (no division by zero along a ridge).  A backtracking Armijo line search takes the step, or a
    fraction of it (a tenth at a time where the value is not finite, a half otherwise).  Converged
    when the Newton decrement g' H^-1 g (in the modified metric) falls below `tol`, or when a full
    step no longer changes f by more than rounding.  `value(x)` is f alone (the line search's
    trials); `value_grad_hess(x)` -> (f, gradient, Hessian), or (inf, None, None) where not finite."""
    evals = 0

    def v(x):
        nonlocal evals
        evals += 1
        fx = value(x)
        if on_eval is not None:
            on_eval(fx)
        return fx if math.isfinite(fx) else math.inf

    def vgh(x):
        nonlocal evals
        evals += 1
        fx, g, H = value_grad_hess(x)
        if on_eval is not None:
            on_eval(fx)
        if g is None or not math.isfinite(fx) or not bool(torch.isfinite(g).all() and torch.isfinite(H).all()):
            return math.inf, None, None
        return fx, g, H

    x = x0.detach().clone()
    fx, g, H = vgh(x)
    if g is None:
        return NewtonResult(x, evals, False, None, None, math.inf, 0)
    eps = torch.finfo(x.dtype).eps
    decrement = math.inf
    it = 0
    for it in range(1, max_iter + 1):
        d = torch.diagonal(H).abs()
        d = torch.where(d > 0, d, torch.ones_like(d)).rsqrt()           # coordinate scales
        Hs = d[:, None] * H * d[None, :]
        lam, V = torch.linalg.eigh(0.5 * (Hs + Hs.T))
        floor = FLAT_EIG * max(float(lam.abs().max()), eps)
        lam_m = lam.abs().clamp(min=floor)
        gv = V.T @ (d * g)
        step = -d * (V @ (gv / lam_m))
        decrement = float((gv * gv / lam_m).sum())
        if decrement < tol:
            return NewtonResult(x, evals, True, g, H, decrement, it - 1)
        if max_evals is not None and evals >= max_evals:
            break
        gd = -decrement
        t, x_new = 1.0, None
        for _ in range(60):
            x_try = x + t * step
            f_try = v(x_try)
            if f_try <= fx + 1e-4 * t * gd:
                x_new = x_try
                break
            t *= 0.5 if math.isfinite(f_try) else 0.1
        if x_new is None:               # no decrease along the Newton direction: rounding, or a kink
            return NewtonResult(x, evals, decrement < 1e-6 * max(1.0, abs(fx)), g, H, decrement, it)
        f_n, g_n, H_n = vgh(x_new)
        if g_n is None:
            return NewtonResult(x, evals, False, g, H, decrement, it)
        small = abs(fx - f_n) <= 16 * eps * max(1.0, abs(fx)) and t == 1.0
        x, fx, g, H = x_new, f_n, g_n, H_n
        if small:                       # a full step changed nothing beyond rounding
            return NewtonResult(x, evals, True, g, H, decrement, it)
    return NewtonResult(x, evals, False, g, H, decrement, it)


FLAT_EIG = 1e-10     # eigenvalues (scaled coordinates) below this times the largest: flat directions


class NewtonResult:
    def __init__(self, x, evals, converged, grad, hess, decrement, iterations):
        self.x, self.evals, self.converged = x, evals, converged
        self.grad, self.hess = grad, hess            # of f at x (the Hessian: the Laplace precision)
        self.decrement, self.iterations = decrement, iterations
