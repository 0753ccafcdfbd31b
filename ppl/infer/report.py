"""Outputs of a fit: the printed table, `--format json`, `--out DIR` files
(written whole or not at all), the progress bar and `--profile`.

Stage: `Fit` -> text / JSON / CSV files.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from typing import Optional, Sequence


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.4e}"


def _steps(fit) -> str:
    state = "converged" if fit.converged else "not converged"
    if fit.optimizer == "dadvi":
        warm = f" after {fit.steps} Adam steps ({fit.mc_samples} MC samples/step)" if fit.steps else ""
        return f"{fit.evals} L-BFGS evaluations on {fit.fixed_draws} fixed draws{warm} ({state}; dadvi)"
    return f"{fit.steps} ({state}; {fit.mc_samples} MC samples/step, lr {fit.lr:g})"


def table(fit) -> str:
    s = fit.summary()
    w = max([len(k) for k in s] + [6])
    lines = [
        f"model      {fit.model.source.path}",
        f"method     {fit.method} (ADVI, start: {fit.init})",
        f"estimator  {fit.estimator}",
        f"steps      {_steps(fit)}",
        f"ELBO       {fit.elbo:.4f}",
        f"k-hat      {fit.khat:.2f}   ESS {100 * fit.ess:.0f}%   sd(log w) {fit.sd_log_w:.3g}",
        f"time       {fit.seconds:.2f} s",
        f"verdict    {fit.verdict}",
        "",
        f"{'':<{w}}  {'mean':>10} {'sd':>10} {'q5':>10} {'q50':>10} {'q95':>10}",
    ]
    for k, v in s.items():
        lines.append(f"{k:<{w}}  " + " ".join(f"{_fmt(v[c]):>10}" for c in ("mean", "sd", "q5", "q50", "q95")))
    return "\n".join(lines) + "\n"


def to_json(fit) -> str:
    def num(x):
        return x if math.isfinite(x) else None
    return json.dumps({
        "params": {k: {c: num(v[c]) for c in ("mean", "sd", "q5", "q50", "q95")} for k, v in fit.summary().items()},
        "elbo": num(fit.elbo), "steps": fit.steps, "converged": fit.converged, "method": fit.method,
        "estimator": fit.estimator, "khat": num(round(fit.khat, 4)), "ess": num(round(fit.ess, 4)),
        "sd_log_w": num(fit.sd_log_w), "verdict": fit.verdict_label, "verdict_text": fit.verdict,
        "init": fit.init, "seconds": round(fit.seconds, 3),
        "optimizer": fit.optimizer, "evaluations": fit.evals, "fixed_draws": fit.fixed_draws,
    })


def _csv_text(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_outputs(fit, out_dir: str, force: bool, inputs: Sequence[str] = (), record=None) -> None:
    """draws.csv, summary.csv, elbo.csv (elbo.png with matplotlib) and run.json into out_dir, whole or
    not at all; only a folder ppl wrote is replaced, never an input (ppl.outdir)."""
    from ..outdir import write_dir
    names, mat = fit.draws_table()
    s = fit.summary()
    files = {
        "draws.csv": _csv_text(names, ([repr(float(x)) for x in row] for row in mat)),
        "summary.csv": _csv_text(["name", "mean", "sd", "q5", "q50", "q95"],
                                 ([k] + [repr(v[c]) for c in ("mean", "sd", "q5", "q50", "q95")]
                                  for k, v in s.items())),
        "elbo.csv": _csv_text(["step", "elbo"], ([i + 1, repr(e)] for i, e in enumerate(fit.elbo_trace))),
    }
    files = {k: v.encode() for k, v in files.items()}
    png = _plot(fit)
    if png is not None:
        files["elbo.png"] = png
    run = {"model": fit.model.source.path, "inputs": list(inputs), "method": fit.method,
           "estimator": fit.estimator, "optimizer": fit.optimizer, "seed": getattr(fit, "seed", None),
           "steps": fit.steps, "converged": fit.converged, "elbo": fit.elbo, "khat": fit.khat, "ess": fit.ess,
           "verdict": fit.verdict_label, **(record or {})}
    write_dir(out_dir, files, force=force, inputs=inputs, record=run)


def _plot(fit) -> Optional[bytes]:
    """elbo.png's bytes where matplotlib is installed (the `plot` extra), else None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, len(fit.elbo_trace) + 1), fit.elbo_trace, lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO estimate")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


class Progress:
    """A one-line progress bar on a terminal (stderr), redrawn at most 10 times a second."""

    def __init__(self):
        self.last = 0.0

    def __call__(self, t, total, elbo):
        now = time.monotonic()
        if now - self.last < 0.1 and t < total:
            return
        self.last = now
        frac = t / max(total, 1)
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r  step {t:>6}/{total}  [{bar:<30}]  ELBO {elbo:.4g}   ")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\r" + " " * 79 + "\r")
        sys.stderr.flush()


def run_fit_command(args) -> int:
    t_start = time.perf_counter()
    from ..api import load
    timings = {}
    t0 = time.perf_counter()
    m = load(args.model)
    timings["parse"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = m.check(args.data if (args.data or args.set) else [], args.set)
    timings["data+check"] = time.perf_counter() - t0
    inputs = [args.model, *args.data]
    if args.out is not None:
        from ..outdir import check_target
        check_target(args.out, args.force, inputs)       # refused before the fit, not after
    show = args.progress == "on" or (args.progress == "auto" and args.format != "json" and sys.stderr.isatty())
    bar = Progress() if show else None
    t0 = time.perf_counter()
    from .fit import fit as run          # imports torch
    timings["imports"] = time.perf_counter() - t0
    try:
        f = run(model, method=args.method, estimator=args.estimator, steps=args.steps, tol=args.tol, lr=args.lr,
                mc_samples=args.mc_samples, draws=args.draws, seed=args.seed, rank=args.rank,
                objective=args.objective, alpha=args.alpha, init=args.init, progress=bar, timings=timings,
                optimizer=args.optimizer)
    finally:
        if bar is not None:
            bar.close()
    f.seconds = time.perf_counter() - t_start
    if args.out is not None:
        write_outputs(f, args.out, args.force, inputs, record={"seed": args.seed})
    sys.stdout.write(to_json(f) + "\n" if args.format == "json" else table(f))
    if args.profile:
        total = f.seconds
        sys.stderr.write("profile (seconds):\n")
        for k in ("parse", "data+check", "imports", "compile", "init", "optimise", "draws", "khat"):
            if k in f.timings:
                sys.stderr.write(f"  {k:<12} {f.timings[k]:8.3f}\n")
        sys.stderr.write(f"  {'total':<12} {total:8.3f}  (from the start of `fit`; Python start-up and ppl's own imports come before)\n")
    return 0
