"""Shared by the system scripts: the command line, phase timers, summaries, the JSON line.

Every system script is run as

    python bench/systems/SYSTEM.py MODEL DATA_DIR STEPS SEED FAMILY [--mc-samples S] [--lr X]
                                   [--draws D] [--checkpoints N1,N2,...]

and prints ONE JSON line on stdout:

    {"system", "model", "family", "steps", "seed", "params": {name: {"mean", "sd"}},
     "phases": {phase: seconds}, "checkpoints": {"N": {name: {"mean", "sd"}}}, ...}

Names are ppl's: constrained space, Stan-style, 1-based (`beta[1]`, `theta[8]`).
`--checkpoints` (used only by the driver's step search) also summarises the
fit after each listed step count of the same run; every optimiser here depends
only on the step index, never on the total, so step N of a long run is the
state a run of exactly N steps ends in.  With `--ref REF.json --stop-after K`
the run stops once K consecutive checkpoints are accurate against the
reference (ACCURACY below), and says where (`stopped_at`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

T_START = time.perf_counter()
BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

# "accurate": every reference parameter's mean within MEAN_TOL reference sds, and its sd within SD_TOL (relative)
MEAN_TOL = 0.1
SD_TOL = 0.1

# the bar for the hier_* models against NUTS: every global (unindexed) latent's mean within
# HIER_MEAN_TOL posterior sds and its sd within HIER_SD_TOL (relative), and at least HIER_LOCAL_FRAC of the
# group latents (z[k], a[k], zb[k]) within the same two tolerances
HIER_MEAN_TOL = 0.25
HIER_SD_TOL = 0.30
HIER_LOCAL_FRAC = 0.95

HIER_MODELS = ("hier_k1000", "hier_k10000", "hier_centred_k1000", "hier_slopes_k1000", "hier_poisson_k1000",
               "hier_bernoulli_k1000")
MODELS = ("eight_schools", "logistic", "radon", "mixture", "linreg_1e4", "linreg_1e5", "linreg_1e6") + HIER_MODELS


def parse_args(system, default_lr=None, default_S=1):
    ap = argparse.ArgumentParser(prog=f"{system}.py")
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("data_dir", help="bench/data/MODEL (model.ppl + data.csv)")
    ap.add_argument("steps", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("family", choices=["meanfield", "fullrank", "lowrank"],
                    help="lowrank: NumPyro's AutoLowRankMultivariateNormal only")
    ap.add_argument("--rank", type=int, help="(lowrank) rank; default NumPyro's, round(sqrt(latent dim))")
    ap.add_argument("--mc-samples", type=int, default=default_S, help="MC samples per gradient")
    ap.add_argument("--lr", type=float, default=default_lr)
    ap.add_argument("--optim", default=None, help="(pymc only) adam | adagrad_window (PyMC's default)")
    ap.add_argument("--draws", type=int, default=1000, help="draws for the reported means and sds")
    ap.add_argument("--checkpoints", default="", help="comma-separated step counts to summarise at")
    ap.add_argument("--ref", help="reference JSON (a torch_loop reference run's output) for --stop-after")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop once this many consecutive checkpoints are accurate against --ref")
    ap.add_argument("--rule", default="default", choices=["default", "hier"],
                    help="accuracy rule for --stop-after: the suite's (0.1 sd, 10%%) or the hier bar (HIER_*)")
    ap.add_argument("--init", default="cold", choices=["cold", "laplace"], help="(torch_loop only)")
    ap.add_argument("--average", type=float, default=0.0,
                    help="(torch_loop only) average the iterates over this last fraction of the steps")
    a = ap.parse_args()
    a.checkpoints = sorted({int(c) for c in a.checkpoints.split(",") if c.strip()})
    a.steps = max([a.steps] + a.checkpoints)
    a.ref_params = None
    if a.ref:
        with open(a.ref) as f:
            a.ref_params = json.load(f)["params"]
    return a


def accuracy(params, ref):
    """(worst |mean - ref mean| / ref sd, worst |sd / ref sd - 1|, accurate?) over the reference's parameters."""
    dm = ds = 0.0
    for k, r in ref.items():
        p = params.get(k)
        if p is None or p["mean"] is None or p["sd"] is None or not r["sd"] > 0:
            return float("inf"), float("inf"), False
        dm = max(dm, abs(p["mean"] - r["mean"]) / r["sd"])
        ds = max(ds, abs(p["sd"] / r["sd"] - 1.0))
    ok = dm <= MEAN_TOL and ds <= SD_TOL          # NaN compares False: never accurate
    return dm, ds, bool(ok)


def hier_accuracy(params, ref):
    """The hier bar against a NUTS reference {name: {mean, sd}}: a dict with the worst global mean error (in
    reference sds) and sd error (relative), the worst global's name, the fraction of group latents (indexed
    names) within both tolerances, and ok."""
    dm = ds = 0.0
    worst, worst_score = None, -1.0
    n_loc = ok_loc = 0
    for k, r in ref.items():
        p = params.get(k)
        good = p is not None and p.get("mean") is not None and p.get("sd") is not None and r["sd"] > 0
        m_err = abs(p["mean"] - r["mean"]) / r["sd"] if good else float("inf")
        s_err = abs(p["sd"] / r["sd"] - 1.0) if good else float("inf")
        if "[" in k:
            n_loc += 1
            ok_loc += bool(m_err <= HIER_MEAN_TOL and s_err <= HIER_SD_TOL)
            continue
        dm, ds = max(dm, m_err), max(ds, s_err)
        score = max(m_err / HIER_MEAN_TOL, s_err / HIER_SD_TOL)
        if not score <= worst_score:
            worst, worst_score = k, score
    frac = ok_loc / n_loc if n_loc else 1.0
    ok = dm <= HIER_MEAN_TOL and ds <= HIER_SD_TOL and frac >= HIER_LOCAL_FRAC
    return {"dmean": dm, "dsd": ds, "worst": worst, "local_ok_frac": frac, "n_local": n_loc, "ok": bool(ok)}


class Checkpoints:
    """Collects checkpoint summaries; `.record(n, summary)` returns True when the run should stop."""

    def __init__(self, args):
        self.args = args
        self.wanted = set(args.checkpoints)
        self.data = {}
        self.streak = 0
        self.stopped_at = None

    def __contains__(self, n):
        return n in self.wanted

    def record(self, n, summary):
        a = self.args
        self.data[str(n)] = summary
        if a.ref_params is None or a.stop_after <= 0:
            return False
        if getattr(a, "rule", "default") == "hier":
            h = hier_accuracy(summary, a.ref_params)
            ok = h["ok"]
            summary["_acc"] = h
        else:
            dm, ds, ok = accuracy(summary, a.ref_params)
            summary["_acc"] = {"dmean": dm, "dsd": ds, "ok": ok}
        self.streak = self.streak + 1 if ok else 0
        if self.streak >= a.stop_after:
            self.stopped_at = n
            return True
        return False


class Phases:
    """phases['name'] += seconds; `with ph('fit'): ...`"""

    def __init__(self):
        self.t = {"startup+imports": 0.0}
        self._last = T_START

    def mark(self, name):
        now = time.perf_counter()
        self.t[name] = self.t.get(name, 0.0) + now - self._last
        self._last = now

    def __call__(self, name):
        ph = self

        class _C:
            def __enter__(self):
                ph._last = time.perf_counter()

            def __exit__(self, *exc):
                ph.mark(name)
        return _C()


def flat_names(name, shape):
    import numpy as np
    if not shape:
        return [name]
    return [f"{name}[{','.join(str(i + 1) for i in idx)}]" for idx in np.ndindex(*shape)]


def summarise(draws):
    """{name: array (D, *shape)} -> {flat name: {mean, sd}} (sd with ddof=1, as ppl); NaN -> None."""
    import numpy as np
    out = {}
    for name, arr in draws.items():
        arr = np.asarray(arr, dtype=np.float64)
        flat = arr.reshape(arr.shape[0], -1)
        mean, sd = flat.mean(0), flat.std(0, ddof=1)
        for j, key in enumerate(flat_names(name, arr.shape[1:])):
            m, s = float(mean[j]), float(sd[j])
            out[key] = {"mean": m if np.isfinite(m) else None, "sd": s if np.isfinite(s) else None}
    return out


def emit(args, system, params, phases, checkpoints=None, **extra):
    if isinstance(checkpoints, Checkpoints):
        if checkpoints.stopped_at is not None:
            extra["stopped_at"] = checkpoints.stopped_at
        checkpoints = checkpoints.data
    if args.model in HIER_MODELS and checkpoints:
        # thousands of group latents: the checkpoints keep only the globals and the accuracy verdicts
        checkpoints = {n: {k: v for k, v in s.items() if "[" not in k} for n, s in checkpoints.items()}
    rec = {"system": system, "model": args.model, "family": args.family, "steps": args.steps, "seed": args.seed,
           "mc_samples": args.mc_samples, "lr": args.lr, "optim": args.optim, "draws": args.draws, "params": params,
           "phases": {k: round(v, 4) for k, v in phases.t.items()},
           "script_seconds": round(time.perf_counter() - T_START, 4)}
    if checkpoints:
        rec["checkpoints"] = checkpoints
    rec.update(extra)
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()
