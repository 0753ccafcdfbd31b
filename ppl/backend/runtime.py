"""The run-time seam between the compiled model and inference.

Stage: (device, dtype, seed) -> `Runtime`; the model's row data -> `Batch`.

A `Runtime` says where tensors live and in what precision, and owns the
random generator every draw of a fit comes from.  A `Batch` is what the
compiled model (`ppl.backend.log_joint.LogJoint`) is called with besides the
latents: the per-row data (the rows of this batch), the factor `scale` that
multiplies every per-row density term (N/B for a minibatch of B of N rows,
1 for the full data), and a cache for the data-only sub-expressions of this
batch.  Global data and constants are folded into the compiled model.

How later features plug in here:
- minibatches: `Batch.rows(model_data, index, n_total)` takes some rows and
  sets the scale; the engine's `update(state, batch)` takes it as it is;
- a device: `Runtime.make("cuda")`; the compiled model makes its tensors
  through it (`rt.tensor`, `rt.zeros`), the families, the discrete q's and
  the optimisers make theirs on the device and in the dtype of the tensors
  they are given (the start point, the parameters), every draw comes from
  `rt.generator()`, and results come back with `to_numpy`;
- several processes: each process builds the batch of the rows it owns,
  with the scale of the global N.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class Runtime:
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float64
    seed: int = 0

    @classmethod
    def make(cls, device: str = "cpu", dtype: Any = "float64", seed: int = 0) -> "Runtime":
        dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
        return cls(torch.device(device), dt, seed)

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def tensor(self, x, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return torch.as_tensor(x, dtype=dtype or self.dtype, device=self.device)

    def zeros(self, *shape, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype or self.dtype, device=self.device)


def as_runtime(rt_or_dtype) -> Runtime:
    """A `Runtime`, or a dtype (the CPU)."""
    return rt_or_dtype if isinstance(rt_or_dtype, Runtime) else Runtime(dtype=rt_or_dtype)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


@dataclass
class Batch:
    data: Dict[str, torch.Tensor]            # per-row data of this batch, each (1, rows, ...)
    scale: float = 1.0                       # multiplies every per-row density term
    size: Optional[int] = None               # rows in this batch (None: no row axis)
    cache: Dict[Any, Any] = field(default_factory=dict)   # data-only sub-expressions of this batch
    index: Optional[torch.Tensor] = None     # the rows taken (0-based; None: all of them, in order)
    control: Optional[Any] = None            # (c, theta0): the log density gains (theta - theta0) . c
    shard: Optional[Any] = None              # (lo, hi): this process's rows of a data-parallel fit (ppl.dist):
                                             # its log density is summed over the processes
    global_terms: bool = True                # global density terms are added here (one process of a group)
    longest: Optional[int] = None            # (with `shard`) the most rows any process holds
    positions: Optional[torch.Tensor] = None  # `own_rows`: where the rows `index` are in the one-process batch
    whole: Optional[int] = None              # `own_rows`: that batch's rows

    @classmethod
    def full(cls, row_data: Mapping[str, torch.Tensor], size: Optional[int]) -> "Batch":
        return cls(dict(row_data), 1.0, size)

    @classmethod
    def rows(cls, row_data: Mapping[str, torch.Tensor], index: torch.Tensor, n_total: int) -> "Batch":
        """The rows `index` (0-based) of the full data, scaled to stand for all `n_total` rows."""
        B = int(index.shape[0])
        return cls({k: v.index_select(1, index) for k, v in row_data.items()}, n_total / B, B, index=index)

    @classmethod
    def own_rows(cls, row_data: Mapping[str, torch.Tensor], index: torch.Tensor, n_total: int, shard: "Batch",
                 offset: int = 0) -> "Batch":
        """A data-parallel fit (ppl.dist): of the rows `index` of the whole data (one process's batch),
        those this process owns (`shard.shard`: [lo, hi)), scaled by `n_total` over all of `index` (the
        sum over the processes is that batch's).  `offset`: the first row `row_data` holds (0: all)."""
        lo, hi = shard.shard
        positions = torch.nonzero((index >= lo) & (index < hi)).reshape(-1)
        own = index[positions]
        at = own - offset if offset else own
        B = int(index.shape[0])
        return cls({k: v.index_select(1, at) for k, v in row_data.items()}, n_total / B, int(own.shape[0]),
                   index=own, shard=shard.shard, global_terms=shard.global_terms, longest=shard.longest,
                   positions=positions, whole=B)
