"""Presentation of a fit for the command line: the printed table, `--format
json`, the files of `--out DIR` (through `ppl.outdir`, whole or not at all),
the progress bar and `--profile`.

Stage: `Fit` -> text / JSON / CSV files.  Nothing here runs a fit: the CLI
calls the API and hands the `Fit` here.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from typing import Dict, Optional, Sequence

import numpy as np

from .infer.objectives import OBJECTIVES


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.4e}"


def _steps(fit) -> str:
    state = "converged" if fit.converged else "not converged"
    if fit.optimizer == "exact":
        return "none: every latent is summed out exactly"
    if fit.optimizer == "dadvi":
        warm = f" after {fit.steps} Adam steps ({fit.mc_samples} MC samples/step)" if fit.steps else ""
        return f"{fit.evals} L-BFGS evaluations on {fit.fixed_draws} fixed draws{warm} ({state}; dadvi)"
    return f"{fit.steps} ({state}; {fit.mc_samples} MC samples/step, lr {fit.lr:g})"


def _objective(fit) -> str:
    return OBJECTIVES[fit.objective].label if fit.objective in OBJECTIVES else fit.objective


def _value(fit) -> str:
    """The objective at the fitted q from fresh draws, with its Monte Carlo error (the optimiser's own
    last value where there is none)."""
    v, se = getattr(fit, "objective_value", float("nan")), getattr(fit, "objective_se", float("nan"))
    if not math.isfinite(v):
        return f"{fit.elbo:.4f}"
    return f"{v:.4f}" + (f" ± {se:.2g}" if math.isfinite(se) else "")


def _evidence(fit) -> Optional[str]:
    """log p(y) by importance sampling, where k-hat says the weights can be trusted."""
    v, se = getattr(fit, "log_evidence", float("nan")), getattr(fit, "log_evidence_se", float("nan"))
    if not (math.isfinite(v) and math.isfinite(se)):
        return None
    n = len(fit.log_weights) if getattr(fit, "log_weights", None) is not None else 0
    return f"log p(y)   {v:.4f} ± {se:.2g} (importance sampling over {n} draws of q)"


def summary_note(fit) -> str:
    """Which summary the table shows, for its header and run records."""
    if getattr(fit, "corrected", False):
        return (f"PSIS-corrected: the draws of q weighted by their smoothed importance weights "
                f"(k-hat {fit.khat:.2f} < 0.7); q's own mean and sd beside")
    if fit.khat < 0.7 and getattr(fit, "weights", None) is not None:
        return (f"q's draws, unweighted (the importance weights leave {fit.weights_ess:.0f} effective draws of "
                f"{len(fit.weights)}: too few to correct them; more --draws may)")
    return f"q's draws, unweighted (k-hat {fit.khat:.2f} >= 0.7: the importance weights cannot correct them)"


def table(fit, process_seconds: Optional[float] = None, vars=None, quantiles=None, hdi=None) -> str:
    """The header, then one row per chosen element: level labels where the model has them
    (`a[Carver]`), discrete latents as the probability of each value (ppl.summary)."""
    from .summary import summarize
    s = summarize(fit.model, fit.draws, vars, quantiles, hdi, discrete_names(fit), getattr(fit, "moments", None))
    names = [r.label for r in s.rows] + [r.label for r in s.discrete]
    w = max([len(k) for k in names] + [6])
    corrected = getattr(fit, "corrected", False)
    raw = {}
    if corrected:                          # PSIS-weighted moments and quantiles in place of q's own
        weighted = fit.summary()
        for r in s.rows:
            if r.name in weighted:
                raw[r.name] = (r.values["mean"], r.values["sd"])
                r.values.update({c: weighted[r.name][c] for c in r.values if c in weighted[r.name]})
    total = f" (whole process {process_seconds:.2f} s)" if process_seconds is not None else ""
    lines = [
        f"model      {fit.model.source.path}",
        f"method     {fit.method} (ADVI, start: {fit.init})" + (f"; {fit.method_note}" if fit.method_note else ""),
        f"estimator  {fit.estimator}",
        f"objective  {getattr(fit, 'objective_note', '') or fit.objective}",
        f"steps      {_steps(fit)}",
        f"{_objective(fit):<10} {_value(fit)}",
    ]
    ev = _evidence(fit)
    if ev is not None:
        lines.append(ev)
    gap = getattr(fit, "amortization", None)
    if gap:
        lines.append(f"amortized  encoder ELBO {gap['elbo_encoder']:.4f}; after {gap['steps']} steps per row "
                     f"{gap['elbo_refined']:.4f}: gap {gap['gap']:.4g} nats ({gap['gap_per_row']:.3g} per row)")
    held = getattr(fit, "holdout", None)
    if held:
        lines.append(f"held out   {held['rows']} rows ({100 * held['fraction']:.3g}%): ELBO per row "
                     f"{held['elbo_per_row']:.4f} under the encoders (at the start {held['elbo_per_row_start']:.4f})")
    lines += [
        f"k-hat      {fit.khat:.2f}   ESS {100 * fit.ess:.0f}%   sd(log w) {fit.sd_log_w:.3g}",
        f"time       {fit.seconds:.2f} s{total}" + (f" on {fit.device}" if fit.device != "cpu" else ""),
        f"verdict    {fit.verdict}",
        f"summary    {summary_note(fit)}",
    ]
    if s.rows:
        lines += ["", f"{'':<{w}}  " + " ".join(f"{c:>10}" for c in s.columns)
                  + ("  " + f"{'q mean':>10} {'q sd':>10}" if raw else "")]
        for r in s.rows:
            lines.append(f"{r.label:<{w}}  " + " ".join(f"{_fmt(r.values[c]):>10}" for c in s.columns)
                         + (f"  {_fmt(raw[r.name][0]):>10} {_fmt(raw[r.name][1]):>10}" if r.name in raw else ""))
    if s.discrete:
        values = sorted({v for r in s.discrete for v in r.probs})
        lines += ["", f"{'':<{w}}  " + " ".join(f"{'P(' + str(v) + ')':>7}" for v in values)
                  + "   (discrete: the probability of each value)"]
        for r in s.discrete:
            lines.append(f"{r.label:<{w}}  " + " ".join(f"{r.probs.get(v, 0.0):>7.3f}" for v in values))
    for name, n in s.hidden:
        lines.append(f"({name}: {n} discrete elements not shown; --vars {name} shows them)")
    lines += _point_estimates(fit, w)
    return "\n".join(lines) + "\n"


PARAM_ROWS = 20     # a param with more elements (a weight matrix) gets one line, not a row per element


def _point_estimates(fit, w: int) -> list:
    """The `param` declarations: a value each (a point estimate has no sd and no quantiles)."""
    from .summary import flat_labels
    params = getattr(fit, "params", None) or {}
    if not params:
        return []
    rows, notes = [], []
    for name, v in params.items():
        v = np.asarray(v)
        if v.size > PARAM_ROWS:
            notes.append(f"({name}: {v.size} values, from {_fmt(float(v.min()))} to {_fmt(float(v.max()))}; "
                         f"all in --json and --out fit.npz)")
            continue
        rows += list(zip(flat_labels(fit.model, name, v.shape), v.reshape(-1)))
    w = max([w] + [len(k) for k, _ in rows])
    out = ["", f"{'':<{w}}  {'value':>10}   (param: point estimates, maximum marginal likelihood)"]
    out += [f"{k:<{w}}  {_fmt(float(x)):>10}" for k, x in rows]
    return out + notes


def point_estimates(fit) -> dict:
    """Flattened names of the `param` elements -> their values (for the JSON output)."""
    from .summary import flat_names
    out = {}
    for name, v in (getattr(fit, "params", None) or {}).items():
        v = np.asarray(v)
        out.update(zip(flat_names(name, v.shape), (float(x) for x in v.reshape(-1))))
    return out


def discrete_names(fit) -> list:
    return [n for n, node in fit.model.nodes.items() if node.kind == "latent" and node.discrete]


def to_json(fit, process_seconds: Optional[float] = None) -> str:
    def num(x):
        return x if math.isfinite(x) else None
    from .summary import summarize
    disc = summarize(fit.model, fit.draws, list(fit.draws), None, None, discrete_names(fit))

    def params(s):
        return {k: {c: num(v[c]) for c in ("mean", "sd", "q5", "q50", "q95")} for k, v in s.items()}
    corrected = getattr(fit, "corrected", False)
    return json.dumps({
        "objective": fit.objective, "objective_description": getattr(fit, "objective_note", fit.objective),
        "objective_value": num(getattr(fit, "objective_value", float("nan"))),
        "objective_se": num(getattr(fit, "objective_se", float("nan"))),
        "log_evidence": num(getattr(fit, "log_evidence", float("nan"))),
        "log_evidence_se": num(getattr(fit, "log_evidence_se", float("nan"))),
        "summary": "psis" if corrected else "q", "device": fit.device,
        "process_seconds": None if process_seconds is None else round(process_seconds, 3),
        "params": params(fit.summary()),
        "point_estimates": point_estimates(fit),
        "params_q": params(fit.summary(corrected=False)) if corrected else None,
        "discrete": {r.name: {str(k): p for k, p in r.probs.items()} for r in disc.discrete},
        "labels": {r.name: r.label for r in disc.rows + disc.discrete if r.label != r.name},
        "elbo": num(fit.elbo), "steps": fit.steps, "converged": fit.converged, "method": fit.method,
        "method_note": fit.method_note, "estimator": fit.estimator, "khat": num(round(fit.khat, 4)), "ess": num(round(fit.ess, 4)),
        "sd_log_w": num(fit.sd_log_w), "verdict": fit.verdict_label, "verdict_text": fit.verdict,
        "init": fit.init, "seconds": round(fit.seconds, 3),
        "optimizer": fit.optimizer, "evaluations": fit.evals, "fixed_draws": fit.fixed_draws,
        "amortization": {k: num(v) if isinstance(v, float) else v
                         for k, v in getattr(fit, "amortization", {}).items()} or None,
        "holdout": {k: num(v) if isinstance(v, float) else v for k, v in getattr(fit, "holdout", {}).items()} or None,
    })


def _csv_text(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_outputs(fit, out_dir: str, force: bool, inputs: Sequence[str] = (), *, quantiles=None, hdi=None,
                  command: Optional[Sequence[str]] = None, process_seconds: Optional[float] = None,
                  notes=None) -> None:
    """Everything `--out DIR` holds, whole or not at all; only a folder ppl wrote is replaced, never an
    input (ppl.outdir):
    draws.csv      lp__ and log_q__ (log p and log q of each draw), then every latent and deterministic
    summary.csv    name, label, mean, sd, the quantiles (and HDI) asked for, of every element
    elbo.csv       the objective per Adam step or L-BFGS evaluation
    fit.nc         ArviZ InferenceData (netCDF4, with the `netcdf` extra: ppl.netcdf)
    fit.npz        the fitted approximation and the draws' theta, log p, log q (ppl.saved)
    model.ppl, data.json   the model and its data, so `ppl.load_fit(DIR)` needs nothing else
    elbo.png       with the `plot` extra
    run.json       the run record"""
    from .outdir import write_dir
    from . import saved, netcdf
    from .summary import summarize
    own = fit.model.row_share
    if own is not None:         # each process of a data-parallel fit read its own rows (ppl.dist)
        from .errors import UsageError
        raise UsageError(f"this fit holds only this process's rows of the data (rows {own.lo + 1}..{own.hi} "
                         f"of {own.n}): call fit.gather_data() on every process, then save on the first")
    names, mat = fit.draws_table()
    qd = fit.q_draws
    if qd is not None and len(qd.log_p) == mat.shape[0]:
        names = ["lp__", "log_q__"] + names
        mat = np.concatenate([qd.log_p[:, None], qd.log_q[:, None], mat], 1)
    s = summarize(fit.model, fit.draws, list(fit.draws), quantiles, hdi, moments=getattr(fit, "moments", None))
    files = {
        "draws.csv": _csv_text(names, ([repr(float(x)) for x in row] for row in mat)),
        "summary.csv": _csv_text(["name", "label"] + s.columns,
                                 ([r.name, r.label] + [repr(r.values[c]) for c in s.columns] for r in s.rows)),
        "elbo.csv": _csv_text(["step", "elbo"], ([i + 1, repr(e)] for i, e in enumerate(fit.elbo_trace))),
    }
    if getattr(fit, "corrected", False):     # the weights of the first rows of draws.csv
        files["weights.csv"] = _csv_text(["psis_weight"], ([repr(float(x))] for x in fit.weights))
    files = {k: v.encode() for k, v in files.items()}
    notes = list(notes or [])
    files.update(saved.files(fit))
    nc = netcdf.fit_bytes(fit, notes)
    if nc is not None:
        files["fit.nc"] = nc
    png = _plot(fit)
    if png is not None:
        files["elbo.png"] = png
    write_dir(out_dir, files, force=force, inputs=inputs,
              record=saved.run_record(fit, inputs, command, process_seconds, notes))


def draws_csv(values, qd=None) -> str:
    """draws.csv's text for draws by name (and their log p, log q)."""
    from .summary import flat_names
    names, cols = [], []
    if qd is not None:
        names, cols = ["lp__", "log_q__"], [qd.log_p[:, None], qd.log_q[:, None]]
    for k, v in values.items():
        names += flat_names(k, v.shape[1:])
        cols.append(np.asarray(v).reshape(v.shape[0], -1))
    mat = np.concatenate(cols, 1) if cols else np.zeros((0, 0))
    return _csv_text(names, ([repr(float(x)) for x in row] for row in mat))


def predictive_table(values, model, kind: str, vars=None, quantiles=None, hdi=None) -> str:
    """`ppl predict`'s summary: the replicated observations first, then the other nodes."""
    from .summary import summarize
    observed = [k for k in values if k in model.nodes and model.nodes[k].kind == "observed"]
    order = observed + [k for k in values if k not in observed]
    values = {k: values[k] for k in order}
    s = summarize(model, values, vars, quantiles, hdi)
    n = next((int(v.shape[0]) for v in values.values()), 0)
    w = max([len(r.label) for r in s.rows] + [6])
    what = {"posterior_predictive": "posterior predictive", "prior_predictive": "prior predictive",
            "predictions": "posterior predictive for the new data"}[kind]
    lines = [f"{what}: {n} draws; replicated: {', '.join(observed) or 'none'}", "",
             f"{'':<{w}}  " + " ".join(f"{c:>10}" for c in s.columns)]
    for r in s.rows:
        lines.append(f"{r.label:<{w}}  " + " ".join(f"{_fmt(r.values[c]):>10}" for c in s.columns))
    return "\n".join(lines) + "\n"


def predictive_file(values, path: str, kind: str, model) -> bytes:
    """`ppl predict --out`: FILE.csv (one row per draw, every element a column) or FILE.nc (an
    InferenceData group named by `kind`: posterior_predictive, prior_predictive or predictions)."""
    if path.lower().endswith(".nc"):
        from .netcdf import predictive_bytes
        return predictive_bytes(values, kind, model)
    return draws_csv(values).encode()


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


def show_progress(mode: str, fmt: str) -> bool:
    return mode == "on" or (mode == "auto" and fmt != "json" and sys.stderr.isatty())


def profile(timings: Dict[str, float], fit, process_seconds: float) -> str:
    """Where the time went: the command's own stages, the fit's, and the total."""
    lines = ["profile (seconds):"]
    for k, v in list(timings.items()) + list(fit.timings.items()):
        lines.append(f"  {k:<15} {v:8.3f}")
    lines.append(f"  {'total':<15} {process_seconds:8.3f}  (from the start of `ppl fit`'s work; Python start-up "
                 f"and ppl's own imports come before)")
    return "\n".join(lines) + "\n"


class Progress:
    """A one-line progress bar on a terminal (stderr), redrawn at most 10 times a second: steps, the
    ELBO, the time so far, the rate and the longest time left (the step cap; convergence stops sooner)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.last = 0.0
        self.start: Optional[float] = None
        self.width = 0
        self.name = "optimise"
        self.count = 0

    def estimate(self, parts: Dict[str, float]) -> None:
        """Before a long fit: how long each phase may take, roughly."""
        self._show(f"  this fit may take about {_duration(sum(parts.values()))} ("
                   + ", ".join(f"{k} ~{_duration(v)}" for k, v in parts.items()) + ")")
        self.stream.write("\n")
        self.width = 0

    def phase(self, name: str) -> None:
        """A stage begins (mode search, optimise, draws): its own clock and counter."""
        self.name, self.start, self.count, self.last = name, time.monotonic(), 0, 0.0

    def epoch(self, e: int, total: int) -> None:
        """A pass over the data begins (minibatch fits)."""
        self.name = f"optimise, epoch {e}/{total}"

    def tick(self, value=None) -> None:
        """One evaluation of a stage without a known length (L-BFGS, chunks of draws)."""
        self.count += 1
        now = time.monotonic()
        if self.start is None:
            self.start = now
        if now - self.last < 0.1:
            return
        self.last = now
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        what = "" if value is None or value != value else f"  objective {value:.6g}"
        self._show(f"  {self.name}: {self.count} evaluations{what}  {_duration(elapsed)}"
                   f"{f', {rate:.0f}/s' if rate else ''}")

    def __call__(self, t, total, elbo):
        now = time.monotonic()
        if self.start is None:
            self.start = now
        if now - self.last < 0.1 and t < total:
            return
        self.last = now
        frac = t / max(total, 1)
        bar = "#" * int(20 * frac)
        elapsed = now - self.start
        rate = t / elapsed if elapsed > 0 else 0.0
        left = f"  <= {_duration((total - t) / rate)} left" if rate > 0 and t < total else ""
        self._show(f"  {self.name}: step {t:>6}/{total} [{bar:<20}] ELBO {elbo:.4g}  {_duration(elapsed)}"
                   f"{f', {rate:.0f} steps/s' if rate else ''}{left}")

    def _show(self, line: str) -> None:
        self.width = max(self.width, len(line))
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()

    def close(self):
        self.stream.write("\r" + " " * max(79, self.width) + "\r")
        self.stream.flush()


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"
