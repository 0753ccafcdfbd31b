"""The latency of one sum over two CPU processes (gloo), as a minibatch step pays it.

    torchrun --standalone --nproc-per-node 2 bench/collectives.py

Stage: (two processes from torchrun) -> a table on stdout (bench/RESULTS.md keeps it).

Sums 23 doubles (the size of a logistic step's flat buffer) 1,000 times each way: gloo's all_reduce,
and `ppl.dist.sum_over_ranks` (one point-to-point exchange between two processes), back to back and
after some work between sums (softplus over a 16 x 1024 array, repeated), as a fit's steps do.  The
time of a sum is the loop's time less the work's."""
from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as tdist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ppl import dist  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    dist._GROUP = dist.Group(tdist.get_rank(), tdist.get_world_size())
    x = torch.ones(23, dtype=torch.float64)
    y = torch.randn(16, 1024, dtype=torch.float64)
    ways = {"all_reduce": lambda: tdist.all_reduce(x.clone()), "exchange": lambda: dist.sum_over_ranks(x.clone())}
    rows = []
    for reps in (0, 1, 4, 16):
        for name, f in ways.items():
            for _ in range(20):
                f()
            work, t0 = 0.0, time.perf_counter()
            for _ in range(1000):
                a = time.perf_counter()
                for _ in range(reps):
                    torch.nn.functional.softplus(y).sum()
                work += time.perf_counter() - a
                f()
            total = time.perf_counter() - t0
            rows.append((name, work * 1e3, (total - work) * 1e3))
    if dist._GROUP.rank == 0:
        print("| sum | work between sums (us) | one sum (us) |")
        print("|---|---|---|")
        for name, w, s in rows:
            print(f"| {name} | {w:.0f} | {s:.0f} |")
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
