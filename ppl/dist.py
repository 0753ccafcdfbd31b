"""dist: the runtime seam for data-parallel fits on torch.distributed.

Stage: (world size, rank, rendezvous) -> `Group`, which the compiled model
(ppl/backend/log_joint.py) uses to make its log density the sum over ranks.

Every rank compiles the same model on the same data, holds the same
variational parameters and draws the same Monte Carlo noise (one seed), so
every decision the fit makes (mode search, fixed draws, step sizes,
convergence) is made on identical numbers everywhere (a minibatch fit's
per-row q, ppl.infer.minibatch.RowLocal: each rank steps only its own rows,
which are joined on every rank before a decision or a draw reads them all).
What differs is the rows: rank r evaluates the per-row terms of its share of
the rows only (`share`: contiguous ranges, N need not divide evenly), and
rank 0 alone adds the global terms (priors, Jacobians of global latents), so

    log p(y, theta) = sum over ranks of (rank r's terms)

exactly, not an average that would rescale the prior.  Two autograd
functions make that sum and its gradient (and its Hessian: both are
differentiable) without the fit knowing:

- `AllReduce` (forward: the sum over ranks; backward: the identity) on the
  log density, so every rank sees the whole value;
- `Replicate` (forward: the identity; backward: the sum over ranks) on theta
  where it enters, so the gradient in theta -- and through it in every
  variational parameter, on every path -- is the sum of the ranks' parts.

(The conjugate pair of tensor-parallel training.)  Each collective is one
flat buffer; the group is made with a timeout, so a rank that dies ends the
fit with an error, never a hang.  Outputs are written by rank 0.

`--procs W` starts W local workers (torch.multiprocessing, rendezvous on
127.0.0.1 at a free port); under `torchrun` (RANK and WORLD_SIZE in the
environment) the group comes from the environment, across hosts.  The
backend follows the device: gloo on the CPU, NCCL between GPUs (each
process on the GPU of its local rank).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as tdist

TIMEOUT_SECONDS = 120.0      # every collective: a rank that does not answer within this ends the fit


@dataclass(frozen=True)
class Group:
    rank: int
    world: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


_GROUP: Optional[Group] = None


def current() -> Optional[Group]:
    """The process group of this fit (None: one process)."""
    return _GROUP


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PENDING: Optional[Tuple[int, int, int]] = None     # (rank, world, port) of a worker not yet in its group


def in_group() -> bool:
    """Whether this process is one of a group (a --procs worker, or started by torchrun): it must not
    start workers of its own."""
    return _GROUP is not None or _PENDING is not None or from_environment() is not None


def join(device: str) -> Optional[Group]:
    """Join this process's group, if it is one of several (a `--procs` worker, or started by torchrun),
    with the backend for `device`: NCCL between GPUs (each process on its own, by its local rank), gloo
    on the CPU.  -> the group (None: one process)."""
    if _GROUP is not None:
        return _GROUP
    where = _PENDING or ((*from_environment(), None) if from_environment() else None)
    if where is None:
        return None
    rank, world, port = where
    if _PENDING is None:
        # under torchrun nothing else ends the group: left to the interpreter's exit, its threads were
        # destroyed while joinable now and then ("terminate called without an active exception", SIGABRT)
        import atexit
        atexit.register(close)
    backend = "gloo"
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local % torch.cuda.device_count())
        backend = "nccl"
    return init(rank, world, port, backend=backend)


def init(rank: int, world: int, port: Optional[int] = None, timeout: float = TIMEOUT_SECONDS,
         backend: str = "gloo") -> Group:
    """Join the group: local workers rendezvous on 127.0.0.1:`port`; without a port, from torchrun's
    environment (MASTER_ADDR, MASTER_PORT)."""
    global _GROUP
    kw = dict(backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    if port is not None:
        tdist.init_process_group(init_method=f"tcp://127.0.0.1:{port}", **kw)
    else:
        tdist.init_process_group(init_method="env://", **kw)
    _GROUP = Group(rank, world)
    return _GROUP


def backend() -> str:
    return tdist.get_backend() if tdist.is_initialized() else "none"


def from_environment() -> Optional[Tuple[int, int]]:
    """(rank, world) when started by torchrun with more than one process, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return (rank, world) if world > 1 else None


def close() -> None:
    global _GROUP, _PENDING
    if _GROUP is not None and tdist.is_initialized():
        tdist.destroy_process_group()
    _GROUP = _PENDING = None


def share(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Rank `rank`'s rows [lo, hi) of n: contiguous, sizes differing by at most one."""
    q, r = divmod(n, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


class AllReduce(torch.autograd.Function):
    """y = sum over ranks of x (every rank gets y); the gradient passes to x unchanged (each rank's
    loss is the same function of y)."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        tdist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g):
        return Replicate.apply(g)


class Replicate(torch.autograd.Function):
    """y = x (replicated on every rank); the gradient into x is the sum over ranks of theirs."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return AllReduce.apply(g)


def all_gather_object(obj):
    """[every rank's `obj`] in rank order (one collective; one process: [obj])."""
    if _GROUP is None:
        return [obj]
    out = [None] * _GROUP.world
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_flat(tensors):
    """The sum over ranks of each tensor, in one all-reduce of one flat buffer (all of them
    concatenated); -> new tensors of the same shapes."""
    tensors = list(tensors)
    if _GROUP is None or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    tdist.all_reduce(flat)
    return _split_like(flat, tensors)


def _split_like(flat: torch.Tensor, tensors):
    """A flat buffer (the tensors concatenated) -> views of it shaped as the tensors."""
    out, at = [], 0
    for t in tensors:
        out.append(flat[at:at + t.numel()].view_as(t))
        at += t.numel()
    return out


def gather_rows(t: torch.Tensor, dim: int = 1, everywhere: bool = False) -> Optional[torch.Tensor]:
    """Every rank's rows of a per-row value (`t`: this rank's, along `dim`), joined in rank order on
    rank 0 (the whole value); None on the other ranks (`everywhere`: on every rank).  Rows may be
    unequal: padded to the largest share for the collective, cut after."""
    if _GROUP is None:
        return t
    home = t.device
    t = t.contiguous()
    if backend() == "nccl" and home.type != "cuda":       # NCCL moves only tensors on the GPU
        t = t.cuda()
    sizes = [int(n) for n in all_gather_object(int(t.shape[dim]))]
    top = max(sizes)
    if t.shape[dim] < top:
        pad = list(t.shape)
        pad[dim] = top - t.shape[dim]
        t = torch.cat([t, t.new_zeros(pad)], dim)
    parts = [torch.empty_like(t) for _ in sizes] if _GROUP.leader or everywhere else None
    if everywhere:
        tdist.all_gather(parts, t)
    else:
        tdist.gather(t, parts, dst=0)
        if not _GROUP.leader:
            return None
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim).to(home)


def replicate_flat(tensors):
    """`Replicate` of several tensors as one: they are concatenated into one flat buffer, so the
    backward pass makes one all-reduce for all of them.  (One collective per tensor would be made in
    the order autograd reaches them, which follows the graph; the graph differs between ranks -- only
    rank 0 adds the global terms -- so two ranks could all-reduce different tensors against each
    other: wrong sums between tensors of one shape, an abort between tensors of two.)"""
    tensors = list(tensors)
    if not tensors:
        return tensors
    return _split_like(Replicate.apply(torch.cat([t.reshape(-1) for t in tensors])), tensors)


def agree(flag: bool) -> bool:
    """Whether `flag` holds on any rank (a decision every rank must take alike, e.g. a time bound)."""
    if _GROUP is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ---- the launcher: `ppl fit --procs W` ------------------------------------------------------------
def _worker(rank: int, world: int, port: int, argv, errdir: str, threads: int) -> None:
    """One worker: run `ppl fit` as asked, which joins the group; a failure leaves its message for the
    parent."""
    global _PENDING
    import sys
    torch.set_num_threads(threads)
    from . import cli
    out = open(os.devnull, "w") if rank else None
    err_path = os.path.join(errdir, f"rank{rank}.err")
    with open(err_path, "w") as err:
        sys.stderr = err
        if out is not None:
            sys.stdout = out
        _PENDING = (rank, world, port)            # the command joins the group (`join`), with its device
        try:
            code = cli.main(list(argv))
        finally:
            close()
            sys.stderr.flush()
    if code:
        sys.exit(code)


def launch(argv, world: int, worker=None) -> int:
    """Start `world` workers of `ppl fit argv` on this machine; -> the exit code.  The first worker
    writes the outputs; a worker that fails ends them all, and its message (once per distinct
    message) is what the user sees."""
    import logging
    import sys
    import tempfile
    import torch.multiprocessing as mp
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)   # (its note on ending the others)
    threads = max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory(prefix="ppl-procs-") as errdir:
        port = free_port()
        ctx = mp.start_processes(worker or _worker, args=(world, port, list(argv), errdir, threads), nprocs=world,
                                 join=False, start_method="spawn")
        code = 0
        try:
            while not ctx.join():
                pass
        except mp.ProcessExitedException as e:
            code = e.exit_code if e.exit_code and e.exit_code > 0 else 1
        except mp.ProcessRaisedException:
            code = 1
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        seen = []
        for rank in range(world):
            path = os.path.join(errdir, f"rank{rank}.err")
            text = open(path).read() if os.path.exists(path) else ""
            if text.strip() and text not in seen:
                seen.append(text)
        # a worker's own error ends the others inside a collective ("connection closed by peer"): their
        # internal errors are its consequence, not news for the user
        from .cli import INTERNAL
        own = [t for t in seen if INTERNAL not in t]
        for text in own or seen:
            sys.stderr.write(text)
        return code
