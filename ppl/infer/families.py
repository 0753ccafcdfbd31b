"""Variational families over the unconstrained vector theta (D dims).

Every family lives in whitened coordinates u, with a fixed affine
preconditioner theta = mu0 + A u taken from the Laplace approximation (A is
lower-triangular, or a vector for a diagonal map), so one step size suits every
model: in u the posterior has roughly unit scale.  The preconditioner's
log|det A| is added to entropies and log densities.

Registry `FAMILIES`: meanfield, fullrank, lowrank, flow.  Each family gives
`rsample(S)` (reparameterised), `log_q(theta)`, `entropy()` (None when not
analytic), `parameters()` and a `state()`/`load()` pair for iterate averaging.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch

_LOG2PI = math.log(2 * math.pi)


class Preconditioner:
    def __init__(self, mu0: torch.Tensor, A: torch.Tensor):
        self.mu0, self.A = mu0, A
        self.diag = A.dim() == 1
        self.logdet = torch.log(A.abs()).sum() if self.diag else torch.log(torch.diagonal(A).abs()).sum()

    def to_theta(self, u: torch.Tensor) -> torch.Tensor:
        return self.mu0 + (u * self.A if self.diag else u @ self.A.T)

    def to_u(self, theta: torch.Tensor) -> torch.Tensor:
        d = theta - self.mu0
        if self.diag:
            return d / self.A
        return torch.linalg.solve_triangular(self.A, d.T, upper=False).T


class Family:
    name = "family"
    gaussian = True

    def __init__(self, pre: Preconditioner, generator: torch.Generator):
        self.pre, self.gen = pre, generator
        self.D = pre.mu0.shape[0]
        self.dtype = pre.mu0.dtype

    def _eps(self, S: int, d: Optional[int] = None) -> torch.Tensor:
        return torch.randn((S, d or self.D), generator=self.gen, dtype=self.dtype)

    def parameters(self) -> List[torch.Tensor]:
        return list(self._params.values())

    def state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._params.items()}

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in state.items():
                self._params[k].copy_(v)

    def rsample(self, S: int) -> torch.Tensor:
        return self.pre.to_theta(self.rsample_u(S))

    def log_q(self, theta: torch.Tensor) -> torch.Tensor:
        return self.log_q_u(self.pre.to_u(theta)) - self.pre.logdet

    def entropy(self) -> Optional[torch.Tensor]:
        h = self.entropy_u()
        return None if h is None else h + self.pre.logdet


class MeanField(Family):
    name = "meanfield"

    def __init__(self, pre, generator, **_):
        super().__init__(pre, generator)
        self._params = {"m": torch.zeros(self.D, dtype=self.dtype, requires_grad=True),
                        "log_s": torch.zeros(self.D, dtype=self.dtype, requires_grad=True)}

    def rsample_u(self, S):
        p = self._params
        return p["m"] + self._eps(S) * torch.exp(p["log_s"])

    def log_q_u(self, u):
        p = self._params
        z = (u - p["m"]) * torch.exp(-p["log_s"])
        return -0.5 * (z * z).sum(-1) - p["log_s"].sum() - 0.5 * self.D * _LOG2PI

    def entropy_u(self):
        return self._params["log_s"].sum() + 0.5 * self.D * (1 + _LOG2PI)


class FullRank(Family):
    name = "fullrank"

    def __init__(self, pre, generator, **_):
        super().__init__(pre, generator)
        self._params = {"m": torch.zeros(self.D, dtype=self.dtype, requires_grad=True),
                        "L": torch.zeros(self.D, self.D, dtype=self.dtype, requires_grad=True)}

    def scale_tril(self):
        L = self._params["L"]
        return torch.tril(L, -1) + torch.diag_embed(torch.exp(torch.diagonal(L)))

    def rsample_u(self, S):
        return self._params["m"] + self._eps(S) @ self.scale_tril().T

    def log_q_u(self, u):
        L = self.scale_tril()
        z = torch.linalg.solve_triangular(L, (u - self._params["m"]).T, upper=False).T
        return -0.5 * (z * z).sum(-1) - torch.diagonal(self._params["L"]).sum() - 0.5 * self.D * _LOG2PI

    def entropy_u(self):
        return torch.diagonal(self._params["L"]).sum() + 0.5 * self.D * (1 + _LOG2PI)


class LowRank(Family):
    """Diagonal plus rank r: cov = W W^T + diag(d^2)."""
    name = "lowrank"

    def __init__(self, pre, generator, rank: Optional[int] = None, **_):
        super().__init__(pre, generator)
        r = rank or max(1, min(10, self.D // 4))
        self.r = min(r, self.D)
        W0 = 1e-2 * torch.randn((self.D, self.r), generator=generator, dtype=self.dtype)
        self._params = {"m": torch.zeros(self.D, dtype=self.dtype, requires_grad=True),
                        "log_d": torch.zeros(self.D, dtype=self.dtype, requires_grad=True),
                        "W": W0.requires_grad_(True)}

    def rsample_u(self, S):
        p = self._params
        return p["m"] + self._eps(S, self.r) @ p["W"].T + self._eps(S) * torch.exp(p["log_d"])

    def _capacitance(self):
        p = self._params
        Wd = p["W"] * torch.exp(-2 * p["log_d"])[:, None]
        return torch.eye(self.r, dtype=self.dtype) + p["W"].T @ Wd

    def log_q_u(self, u):
        p = self._params
        x = u - p["m"]
        dinv2 = torch.exp(-2 * p["log_d"])
        C = self._capacitance()
        Lc = torch.linalg.cholesky(C)
        a = (x * dinv2) @ p["W"]                                  # (S, r)
        b = torch.cholesky_solve(a.T, Lc).T
        maha = (x * x * dinv2).sum(-1) - (a * b).sum(-1)
        logdet = 2 * p["log_d"].sum() + 2 * torch.log(torch.diagonal(Lc)).sum()
        return -0.5 * (maha + logdet + self.D * _LOG2PI)

    def entropy_u(self):
        p = self._params
        Lc = torch.linalg.cholesky(self._capacitance())
        logdet = 2 * p["log_d"].sum() + 2 * torch.log(torch.diagonal(Lc)).sum()
        return 0.5 * logdet + 0.5 * self.D * (1 + _LOG2PI)


class Flow(Family):
    """A Gaussian (full-rank, or diagonal above 200 dims) base followed by affine
    coupling layers (RealNVP) with small tanh networks; initialised at the identity."""
    name = "flow"
    gaussian = False

    def __init__(self, pre, generator, layers: int = 4, hidden: Optional[int] = None, **_):
        super().__init__(pre, generator)
        D = self.D
        self.base = FullRank(pre, generator) if D <= 200 else MeanField(pre, generator)
        h = hidden or max(8, min(64, 2 * D))
        self.masks = []
        self._params = dict(("base_" + k, v) for k, v in self.base._params.items())
        for i in range(layers if D > 1 else 0):
            mask = torch.zeros(D, dtype=self.dtype)
            mask[(torch.arange(D) + i) % 2 == 0] = 1.0
            self.masks.append(mask)
            W1 = (torch.randn((D, h), generator=generator, dtype=self.dtype) / math.sqrt(D)).requires_grad_(True)
            b1 = torch.zeros(h, dtype=self.dtype, requires_grad=True)
            W2 = torch.zeros((h, 2 * D), dtype=self.dtype, requires_grad=True)     # identity at start
            b2 = torch.zeros(2 * D, dtype=self.dtype, requires_grad=True)
            for k, v in (("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2)):
                self._params[f"{k}_{i}"] = v

    def _layer(self, i, x):
        p, mask = self._params, self.masks[i]
        hdn = torch.tanh((x * mask) @ p[f"W1_{i}"] + p[f"b1_{i}"])
        out = hdn @ p[f"W2_{i}"] + p[f"b2_{i}"]
        s, t = out[..., :self.D], out[..., self.D:]
        s = torch.tanh(s) * (1 - mask)
        t = t * (1 - mask)
        return x * torch.exp(s) + t, s.sum(-1)

    def _inverse_layer(self, i, y):
        p, mask = self._params, self.masks[i]
        x_masked = y * mask
        hdn = torch.tanh(x_masked @ p[f"W1_{i}"] + p[f"b1_{i}"])
        out = hdn @ p[f"W2_{i}"] + p[f"b2_{i}"]
        s, t = torch.tanh(out[..., :self.D]) * (1 - mask), out[..., self.D:] * (1 - mask)
        return (y - t) * torch.exp(-s), s.sum(-1)

    def rsample_u(self, S):
        return self._forward(self.base.rsample_u(S))[0]

    def _forward(self, x):
        logdet = torch.zeros(x.shape[0], dtype=self.dtype)
        for i in range(len(self.masks)):
            x, ld = self._layer(i, x)
            logdet = logdet + ld
        return x, logdet

    def rsample_with_log_q(self, S):
        x0 = self.base.rsample_u(S)
        x, ld = self._forward(x0)
        return self.pre.to_theta(x), self.base.log_q_u(x0) - ld - self.pre.logdet

    def log_q_u(self, u):
        logdet = torch.zeros(u.shape[0], dtype=self.dtype)
        x = u
        for i in reversed(range(len(self.masks))):
            x, ld = self._inverse_layer(i, x)
            logdet = logdet + ld
        return self.base.log_q_u(x) - logdet

    def entropy_u(self):
        return None


FAMILIES: Dict[str, Callable] = {"meanfield": MeanField, "fullrank": FullRank, "lowrank": LowRank, "flow": Flow}
