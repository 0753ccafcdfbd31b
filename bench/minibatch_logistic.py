"""Minibatch against full-batch VI on a large logistic regression (issue 10, item 1).

    python bench/minibatch_logistic.py [--rows 1000000] [--cols 10] [--batch-size 1024] [--dir DIR]

Writes a seeded CSV (x1..xD, y) to DIR (default: a temporary directory; never committed), then runs
`ppl fit models/logistic.ppl` on it twice in fresh processes, on the full data and with
`--batch-size B`, and prints the wall time, the peak resident memory of each process, the
minibatch fit's largest |mean difference| in full-batch posterior sds and its largest relative sd
difference.  Set OMP_NUM_THREADS for comparable timings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minibatch import write_csv  # noqa: E402  (one generator of the logistic CSVs)


ROOT = Path(__file__).resolve().parents[1]


def run(args) -> dict:
    """One `ppl fit` in a fresh process -> (json output, seconds, peak RSS in MB of that process)."""
    cmd = [sys.executable, "-c", "import resource, sys; from ppl.cli import main; rc = main(sys.argv[1:]); "
           "sys.stderr.write('MAXRSS %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)",
           "fit", str(ROOT / "models" / "logistic.ppl")] + args + ["--format", "json", "--progress", "off"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    rss = [int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("MAXRSS")][0] / 1024
    return {"out": json.loads(p.stdout), "seconds": dt, "peak_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--cols", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    d = Path(a.dir or tempfile.mkdtemp(prefix="ppl-mb-"))
    csv = d / f"logistic_{a.rows}x{a.cols}.csv"
    if not csv.exists():
        write_csv(csv, a.rows, a.cols)
    data_mb = a.rows * (a.cols + 1) * 8 / 2 ** 20
    full = run([str(csv)])
    mb = run([str(csv), "--batch-size", str(a.batch_size)])

    def summary(r):
        out = {}
        for k, v in r["out"]["params"].items():
            if isinstance(v, dict) and "mean" in v:
                out[k] = v
            elif isinstance(v, list):
                out.update({f"{k}[{i + 1}]": e for i, e in enumerate(v)})
            else:
                out.update(v)
        return out
    sf, sm = summary(full), summary(mb)
    names = list(sf)
    dmean = max(abs(sm[k]["mean"] - sf[k]["mean"]) / sf[k]["sd"] for k in names)
    dsd = max(abs(sm[k]["sd"] / sf[k]["sd"] - 1) for k in names)
    print(f"logistic regression, N = {a.rows:,}, D = {a.cols} (data {data_mb:.0f} MB as float64)")
    print(f"{'fit':<22}{'seconds':>9}{'peak RSS MB':>13}{'ELBO':>16}{'steps':>8}")
    for name, r in (("full batch", full), (f"--batch-size {a.batch_size}", mb)):
        o = r["out"]
        print(f"{name:<22}{r['seconds']:>9.1f}{r['peak_mb']:>13.0f}{o.get('elbo', float('nan')):>16.2f}"
              f"{o.get('steps', 0):>8}")
    print(f"minibatch vs full batch: max |mean diff| = {dmean:.3f} sd, max |sd ratio - 1| = {dsd:.3f}")
    print(f"time ratio (minibatch / full) = {mb['seconds'] / full['seconds']:.2f}")


if __name__ == "__main__":
    main()
