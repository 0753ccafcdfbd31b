"""ppl: `ppl fit MODEL DATA --format json`, exactly as a user runs it.

    python bench/systems/ppl_cli.py MODEL DATA_DIR STEPS SEED FAMILY [--mc-samples S] [--lr X] [--draws D]

STEPS 0 means ppl's defaults (its own convergence check and step cap); STEPS N
> 0 adds `--steps N --tol 0` (exactly N steps).  FAMILY `auto` leaves
`--method` at its default; `meanfield`/`fullrank`/`lowrank`/`flow` pass it.
Prints one JSON line like the other system scripts (means and sds by ppl's
own names), plus ppl's own fields (elbo, khat, ess, verdict, method, seconds)
and the wall time of the `ppl` process.

The driver (bench/run.py) builds the same command line with `command()` and
times that `ppl` process itself, so no wrapper start-up is counted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCH)
PPL = os.environ.get("PPL", os.path.join(ROOT, ".venv", "bin", "ppl"))


def command(model_dir, steps=0, seed=0, family="auto", mc_samples=None, lr=None, draws=None, extra=()):
    """The `ppl fit` command line for bench/data/MODEL (model.ppl + data.csv)."""
    argv = [PPL, "fit", os.path.join(model_dir, "model.ppl"), os.path.join(model_dir, "data.csv"),
            "--format", "json", "--seed", str(seed)]
    if steps and steps > 0:
        argv += ["--steps", str(steps), "--tol", "0"]
    if family and family != "auto":
        argv += ["--method", family]
    if mc_samples:
        argv += ["--mc-samples", str(mc_samples)]
    if lr is not None:
        argv += ["--lr", repr(lr)]
    if draws:
        argv += ["--draws", str(draws)]
    return argv + list(extra)


def main():
    ap = argparse.ArgumentParser(prog="ppl_cli.py")
    ap.add_argument("model")
    ap.add_argument("data_dir")
    ap.add_argument("steps", type=int, help="0 = ppl's defaults")
    ap.add_argument("seed", type=int)
    ap.add_argument("family", help="auto | meanfield | fullrank | lowrank | flow")
    ap.add_argument("--mc-samples", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--draws", type=int)
    a = ap.parse_args()
    argv = command(a.data_dir, a.steps, a.seed, a.family, a.mc_samples, a.lr, a.draws)
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        return r.returncode
    out = json.loads(r.stdout)
    rec = {"system": "ppl", "model": a.model, "family": out.get("method"), "steps": out.get("steps"),
           "seed": a.seed, "mc_samples": a.mc_samples, "lr": a.lr, "draws": a.draws,
           "params": {k: {"mean": v["mean"], "sd": v["sd"]} for k, v in out["params"].items()},
           "phases": {"ppl process": round(wall, 4), "ppl's own total": out.get("seconds")},
           "command": argv}
    for k in ("elbo", "converged", "method", "estimator", "khat", "ess", "verdict"):
        rec[k] = out.get(k)
    sys.stdout.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
