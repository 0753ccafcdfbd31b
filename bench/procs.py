"""Data-parallel fits: `ppl fit --procs 1` against `--procs 2` on one large CSV, side by side.

    python bench/procs.py DATA.csv [--model models/logistic.ppl] [--runs default,minibatch] [--batch-size 1024]

Each configuration runs as its own `ppl fit` process (one thread per worker: OMP_NUM_THREADS=1), the
two process counts interleaved, and reports the whole process's wall time, the fit's own time (the
header's), the peak RSS of the largest process (from /usr/bin/time -v of the launcher and its
children: the launcher's children are the workers), and the worst difference of the posterior means
between the two (in posterior sds), which should be ~0: the same computation.
Data: bench/data.py writes logistic CSVs (never committed)."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(model, data, procs, extra):
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "ppl", "fit", model, data, "--format", "json",
           "--progress", "off", "--seed", "1", "--procs", str(procs), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"--procs {procs} {' '.join(extra)} failed:\n{p.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    out = json.loads(p.stdout)
    return {"wall": wall, "fit": out["seconds"], "rss_mb": rss, "params": out["params"], "steps": out["steps"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "logistic.ppl"))
    ap.add_argument("--runs", default="default,minibatch")
    ap.add_argument("--batch-size", default="1024")
    ap.add_argument("--epochs", default="2")
    a = ap.parse_args()
    configs = {"default": [], "minibatch": ["--batch-size", a.batch_size, "--epochs", a.epochs,
                                            "--method", "meanfield"]}
    print(f"| run | procs | process s | fit s | peak RSS MB (largest process) | steps | worst mean diff (sd) |")
    print("|---|---|---|---|---|---|---|")
    for name in a.runs.split(","):
        res = {w: run(a.model, a.data, w, configs[name]) for w in (1, 2)}
        base = res[1]["params"]
        for w in (1, 2):
            r = res[w]
            diff = max(abs(r["params"][k]["mean"] - v["mean"]) / v["sd"] for k, v in base.items())
            print(f"| {name} | {w} | {r['wall']:.1f} | {r['fit']:.1f} | {r['rss_mb']:.0f} | {r['steps']} | "
                  f"{diff:.1e} |", flush=True)
        print(f"| {name} | speed-up (process) | {res[1]['wall'] / res[2]['wall']:.2f}x | "
              f"{res[1]['fit'] / res[2]['fit']:.2f}x (fit) | | | |", flush=True)


if __name__ == "__main__":
    main()
