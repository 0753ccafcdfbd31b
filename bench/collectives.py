"""The latency of one sum over two CPU processes (gloo), as a minibatch step pays it.

    torchrun --standalone --nproc-per-node 2 bench/collectives.py

Stage: (two processes from torchrun) -> a table on stdout (bench/RESULTS.md keeps it).

Sums 23 doubles (the size of a logistic step's flat buffer) 1,000 times each way: gloo's all_reduce
(what ppl uses), and one point-to-point exchange (`exchange` below: each process sends its part and
receives the other's, then both add them in rank order; one message each way where gloo's ring takes
two rounds), back to back and after some work between sums (softplus over a 16 x 1024 array,
repeated), as a fit's steps do.  The time of a sum is the loop's time less the work's."""
from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as tdist


def exchange(t: torch.Tensor) -> torch.Tensor:
    """The sum over two processes by one exchange of messages; the lower rank's part first."""
    rank = tdist.get_rank()
    other = torch.empty_like(t)
    sent = tdist.isend(t, 1 - rank)
    tdist.recv(other, 1 - rank)
    sent.wait()
    return t + other if rank == 0 else other + t


def main() -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    if tdist.get_world_size() != 2:
        raise SystemExit("run with --nproc-per-node 2")
    x = torch.ones(23, dtype=torch.float64)
    y = torch.randn(16, 1024, dtype=torch.float64)
    ways = {"all_reduce": lambda: tdist.all_reduce(x.clone()), "exchange": lambda: exchange(x.clone())}
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
    if tdist.get_rank() == 0:
        print("| sum | work between sums (us) | one sum (us) |")
        print("|---|---|---|")
        for name, w, s in rows:
            print(f"| {name} | {w:.0f} | {s:.0f} |")
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
