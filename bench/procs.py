"""Data-parallel fits: `ppl fit --procs 1` against `--procs 2` on one large CSV, side by side.

    python bench/procs.py DATA.csv [--make N] [--model models/logistic.ppl] [--runs default,minibatch]
                          [--batch-size 1024] [--epochs 2] [--reference]

    e.g. python bench/procs.py /tmp/ppl-procs-bench/logistic_10000000.csv --make 10000000 --runs minibatch

Stage: (a logistic CSV, run configurations) -> a markdown table on stdout (bench/RESULTS.md keeps them).

Each configuration runs as its own `ppl fit` process (one thread per worker: OMP_NUM_THREADS=1), the
two process counts interleaved, and reports the whole process's wall time, the fit's own time (the
header's: for the default full-data fit, the time to its converged, accurate fit), the optimisation's
own time (`--profile`) and the epochs it ran (`--batch-size` is each process's: two processes take a
batch of 2B rows a step), the time per epoch (the optimisation's time over its epochs), the peak resident memory of each process (VmHWM from /proc, read
every 0.2 s while it runs: the launcher, then each worker), and the worst difference of the posterior
means from the one-process run (in posterior sds): ~0 for the default fit (the same computation); a
minibatch run of two processes is `--procs 1 --batch-size 2B`'s fit, another fit of the same posterior.
`--reference`: also the worst difference from the Laplace reference (Newton's mode of the posterior,
bench/minibatch.laplace_reference), i.e. how accurate the fit is in that time.  Under `--procs 2`
each worker reads only its own rows of the CSV (its byte range; `ppl fit`'s header says so).
Data: `--make N` writes them with bench/minibatch.py's write_csv (under /tmp; never committed)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _children(pid: int):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _hwm_mb(pid: int):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(model, data, procs, extra):
    cmd = [sys.executable, "-m", "ppl", "fit", model, data, "--format", "json", "--progress", "off", "--seed", "1",
           "--procs", str(procs), "--profile", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {}                      # pid -> peak RSS (MB); the launcher first, then its workers
    while p.poll() is None:
        todo, seen = [p.pid], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            hwm = _hwm_mb(pid)
            if hwm is not None:
                peak[pid] = max(peak.get(pid, 0.0), hwm)
            todo += _children(pid)
        time.sleep(0.2)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"--procs {procs} {' '.join(extra)} failed:\n{err[-2000:]}")
    res = json.loads(out)
    # the workers: the largest processes besides the launcher (a resource tracker is tiny)
    rss = [peak[k] for k in sorted(peak)]
    workers = sorted(rss[1:], reverse=True)[:procs] if procs > 1 else rss[:1]
    # the optimisation's own time (`--profile`), and the epochs it ran (the method note's "E epochs")
    opt = next((float(line.split()[1]) for line in err.splitlines() if line.strip().startswith("optimise ")), None)
    note = res.get("method_note") or ""
    epochs = next((float(w) for w, nxt in zip(note.split(), note.split()[1:]) if nxt.startswith("epochs")), None)
    return {"wall": wall, "fit": res["seconds"], "rss": workers, "launcher": rss[0] if procs > 1 else None,
            "params": res["params"], "steps": res["steps"], "device": res.get("device", ""),
            "optimise": opt, "epochs": epochs, "note": note}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", help="a logistic CSV; with --make N, where to write it")
    ap.add_argument("--make", type=int, default=None, metavar="N",
                    help="first write N rows (x1..x10, y) to DATA with bench/minibatch.py's write_csv")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "logistic.ppl"))
    ap.add_argument("--runs", default="default,minibatch")
    ap.add_argument("--batch-size", default="1024")
    ap.add_argument("--epochs", default="2")
    ap.add_argument("--reference", action="store_true")
    a = ap.parse_args()
    if a.make is not None and not Path(a.data).exists():
        sys.path.insert(0, HERE)
        from minibatch import write_csv
        Path(a.data).parent.mkdir(parents=True, exist_ok=True)
        write_csv(Path(a.data), a.make)
    ref = None
    if a.reference:
        sys.path.insert(0, HERE)
        from minibatch import laplace_reference
        csv = Path(a.data)
        ref = laplace_reference(csv, csv.with_suffix(".laplace.json"))
    configs = {"default": [], "minibatch": ["--batch-size", a.batch_size, "--epochs", a.epochs,
                                            "--method", "meanfield"]}
    print("| run | procs | process s | fit s | optimise s | epochs | s per epoch | peak RSS MB per worker (launcher) | "
          "steps | worst mean diff from procs 1 (sd) | worst mean diff from Laplace (sd) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in a.runs.split(","):
        res = {w: run(a.model, a.data, w, configs[name]) for w in (1, 2)}
        base = res[1]["params"]
        for w in (1, 2):
            r = res[w]
            diff = max(abs(r["params"][k]["mean"] - v["mean"]) / v["sd"] for k, v in base.items())
            per_epoch = f"{r['optimise'] / r['epochs']:.3g}" if r["epochs"] and r["optimise"] else ""
            acc = ""
            if ref is not None:
                acc = f"{max(abs(r['params'][k]['mean'] - v['mean']) / v['sd'] for k, v in ref['params'].items()):.2g}"
            mem = " / ".join(f"{x:.0f}" for x in r["rss"]) + (f" ({r['launcher']:.0f})" if r["launcher"] else "")
            opt = f"{r['optimise']:.1f}" if r["optimise"] is not None else ""
            print(f"| {name} | {w} | {r['wall']:.1f} | {r['fit']:.1f} | {opt} | {r['epochs'] or ''} | {per_epoch} | "
                  f"{mem} | {r['steps']} | {diff:.1e} | {acc} |", flush=True)
        pe = [res[w]["optimise"] / res[w]["epochs"] if res[w]["epochs"] and res[w]["optimise"] else None for w in (1, 2)]
        ratio = f"{pe[0] / pe[1]:.2f}x" if None not in pe else ""
        print(f"| {name} | speed-up | {res[1]['wall'] / res[2]['wall']:.2f}x | {res[1]['fit'] / res[2]['fit']:.2f}x "
              f"| | | {ratio} | | | | |", flush=True)
        print(f"<!-- {name} procs 2 device: {res[2]['device']} -->", flush=True)


if __name__ == "__main__":
    main()
