"""A saved fit: the files of `--out DIR` that make a fit whole again in a new
process (`ppl.load_fit(DIR)`), and the run record.

    model.ppl   the model's source, as fitted
    data.json   its data, as the model read them (level columns by their labels), names to values
    fit.npz     the fitted approximation (family, preconditioner, parameters), the reported draws
                (constrained values, theta, z, log p, log q) and the ELBO trace; read with
                numpy's `allow_pickle=False` (arrays only: nothing in it runs)
    run.json    the run record: command, versions, seed, configuration, verdict, k-hat, ESS, ELBO,
                timings, and what `load_fit` needs to rebuild the `Fit`

Stage: `Fit` -> bytes (when writing); an output directory -> `Fit` (when loading).
"""
from __future__ import annotations

import io
import json
import os
import platform
from typing import Dict, Optional, Sequence

import numpy as np

from . import __version__
from .errors import Diagnostic, PplError, Source
from .frontend import ast as A

FORMAT = 1      # the layout of fit.npz; a newer one is refused by an older ppl


# ---- writing -------------------------------------------------------------------------------------------
def data_object(model) -> Dict[str, object]:
    """The model's data as a JSON-ready mapping, read back to the same values: level columns by their
    labels (so the labels and their numbering come back too), ints as ints, every dimension size."""
    out: Dict[str, object] = {}
    for st in model.program.statements:
        if not isinstance(st, A.DataDecl) or st.name not in model.values:
            continue
        v = np.asarray(model.values[st.name])
        labels = model.levels.get(st.name)
        if st.type.base == "level" and labels:
            out[st.name] = np.asarray(labels, dtype=object)[v.astype(int) - 1].tolist()
        elif st.type.base in ("int", "level"):
            out[st.name] = v.astype(np.int64).tolist()
        else:
            out[st.name] = v.tolist()
    for k, n in model.dims.items():
        if k not in model.nodes or model.nodes[k].kind == "data":
            out.setdefault(k, int(n))
    return out


def files(fit) -> Dict[str, bytes]:
    """model.ppl, data.json and fit.npz of a fit (fit.npz without the approximation when it has none)."""
    arrays: Dict[str, np.ndarray] = {"format": np.asarray(FORMAT), "elbo_trace": np.asarray(fit.elbo_trace, float)}
    for k, v in fit.draws.items():
        arrays[f"values.{k}"] = np.asarray(v)
    for k, (mean, sd) in (getattr(fit, "moments", None) or {}).items():     # enumerated latents (Fit.moments)
        arrays[f"moments.{k}.mean"], arrays[f"moments.{k}.sd"] = np.asarray(mean), np.asarray(sd)
    for k, v in (getattr(fit, "params", None) or {}).items():               # `param` point estimates
        arrays[f"param.{k}"] = np.asarray(v)
    if fit.q is not None:
        arrays.update(fit.q.state())
    qd = fit.q_draws
    if qd is not None:
        arrays["draws.theta"] = qd.theta.detach().cpu().numpy()
        arrays["draws.log_p"], arrays["draws.log_q"] = qd.log_p, qd.log_q
        for k, v in qd.z.items():
            arrays[f"draws.z.{k}"] = v.detach().cpu().numpy()
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return {"model.ppl": fit.model.source.text.encode(),
            "data.json": (json.dumps(data_object(fit.model)) + "\n").encode(),
            "fit.npz": buf.getvalue()}


def versions() -> Dict[str, str]:
    import torch
    return {"ppl": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__}


def run_record(fit, inputs: Sequence[str], command: Optional[Sequence[str]], process_seconds: Optional[float],
               notes: Sequence[str] = ()) -> dict:
    from .config import describe
    return {"command": None if command is None else list(command), "model": fit.model.source.path,
            "inputs": list(inputs), "versions": versions(),
            "method": fit.method, "method_note": fit.method_note, "estimator": fit.estimator,
            "objective": fit.objective, "optimizer": fit.optimizer, "init": fit.init, "device": fit.device,
            "seed": fit.config.seed, "steps": fit.steps, "evaluations": fit.evals, "fixed_draws": fit.fixed_draws,
            "lr": fit.lr, "mc_samples": fit.mc_samples, "converged": fit.converged, "elbo": fit.elbo,
            "khat": fit.khat, "ess": fit.ess, "sd_log_w": fit.sd_log_w, "verdict": fit.verdict_label,
            "verdict_text": fit.verdict, "summary": "psis" if getattr(fit, "corrected", False) else "q", "seconds": fit.seconds, "process_seconds": process_seconds,
            "timings": dict(fit.timings), "draws": next((int(v.shape[0]) for v in fit.draws.values()), 0),
            "notes": list(notes), "config": describe(fit.config),
            "amortization": {k: v for k, v in getattr(fit, "amortization", {}).items()} or None,
            "holdout": dict(getattr(fit, "holdout", {})) or None}


# ---- loading -------------------------------------------------------------------------------------------
def _fail(path: str, msg: str) -> PplError:
    return PplError([Diagnostic(None, msg, path)])


def read_record(fit_dir: str) -> dict:
    """run.json of a ppl output directory (a located error when it is not one)."""
    from .outdir import KIND, MARKER
    path = os.path.join(fit_dir, MARKER)
    if not os.path.isdir(fit_dir):
        raise _fail(fit_dir, "is not a directory written by `ppl fit --out`")
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise _fail(fit_dir, f"has no readable {MARKER} ({getattr(e, 'strerror', None) or e}); "
                             f"give a directory written by `ppl fit --out`") from None
    if not isinstance(rec, dict) or rec.get("kind") != KIND:
        raise _fail(path, "is not a ppl run record")
    return rec


def _read(fit_dir: str, name: str, rec: dict) -> bytes:
    if name not in rec.get("files", []):
        raise _fail(fit_dir, f"has no {name}: it was written by an older ppl, or by a fit that was not "
                             f"saved whole; fit again with --out")
    try:
        with open(os.path.join(fit_dir, name), "rb") as f:
            return f.read()
    except OSError as e:
        raise _fail(os.path.join(fit_dir, name), f"cannot read: {e.strerror or e}") from None


def load_arrays(fit_dir: str, rec: Optional[dict] = None) -> Dict[str, np.ndarray]:
    rec = rec or read_record(fit_dir)
    raw = _read(fit_dir, "fit.npz", rec)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, KeyError) as e:
        raise _fail(os.path.join(fit_dir, "fit.npz"), f"is damaged ({e})") from None
    if int(arrays.get("format", -1)) != FORMAT:
        raise _fail(os.path.join(fit_dir, "fit.npz"), f"has layout {arrays.get('format')}, this ppl reads {FORMAT}")
    return arrays


def saved_model(fit_dir: str, rec: Optional[dict] = None):
    """(PplModel, data mapping) as saved."""
    from .api import PplModel
    rec = rec or read_record(fit_dir)
    text = _read(fit_dir, "model.ppl", rec).decode("utf-8")
    path = rec.get("model") or os.path.join(fit_dir, "model.ppl")
    data = json.loads(_read(fit_dir, "data.json", rec).decode("utf-8"))
    return PplModel(Source(path, text)), data


def load_fit(fit_dir: str):
    """A `Fit` as `ppl fit --out DIR` saved it, whole: its draws, diagnostics, run record and its
    approximation (draw more with `fit.draw`, predict with `fit.predict`, start a new fit from it
    with `init=DIR`)."""
    import torch
    from .config import FitConfig
    from .infer.fit import Fit
    from .posterior import Approximation, QDraws
    rec = read_record(fit_dir)
    m, data = saved_model(fit_dir, rec)
    model = m.check(data)
    arrays = load_arrays(fit_dir, rec)
    cfg = dict(rec.get("config") or {})
    cfg["device"] = "cpu"
    config = FitConfig(**{k: v for k, v in cfg.items() if k in FitConfig.__dataclass_fields__})
    q = None
    if "q.method" in arrays:
        try:
            q = Approximation.restore(model, config, arrays)
        except ValueError as e:
            raise _fail(os.path.join(fit_dir, "fit.npz"), f"does not fit its model: {e}") from None
    params = {k[len("param."):]: v for k, v in arrays.items() if k.startswith("param.")}
    if q is not None and q.program.params:
        try:
            q.program.params.load(params)
        except ValueError as e:
            raise _fail(os.path.join(fit_dir, "fit.npz"), f"does not fit its model: {e}") from None
    draws = {k[len("values."):]: v for k, v in arrays.items() if k.startswith("values.")}
    order = [n for n in model.order if n in draws]
    draws = {k: draws[k] for k in order}
    q_draws = None
    if "draws.theta" in arrays:
        dt = q.program.dtype if q is not None else torch.float64
        z = {k[len("draws.z."):]: torch.as_tensor(v, dtype=dt) for k, v in arrays.items() if k.startswith("draws.z.")}
        q_draws = QDraws(torch.as_tensor(arrays["draws.theta"], dtype=dt), z, arrays["draws.log_p"],
                         arrays["draws.log_q"])
    nan = float("nan")

    def num(key):
        v = rec.get(key)
        return nan if v is None else float(v)
    return Fit(model=model, config=config, method=rec.get("method", ""), method_note=rec.get("method_note", ""),
               estimator=rec.get("estimator", ""), objective=rec.get("objective", "elbo"), draws=draws,
               elbo_trace=[float(x) for x in arrays["elbo_trace"]], elbo=num("elbo"), steps=int(rec.get("steps", 0)),
               converged=bool(rec.get("converged")), khat=num("khat"), ess=num("ess"), sd_log_w=num("sd_log_w"),
               verdict=rec.get("verdict_text", ""), verdict_label=rec.get("verdict", ""), init=rec.get("init", ""),
               seconds=num("seconds"), timings=dict(rec.get("timings") or {}), lr=float(rec.get("lr") or 0.0),
               mc_samples=int(rec.get("mc_samples") or 0), optimizer=rec.get("optimizer", ""),
               evals=int(rec.get("evaluations") or 0), fixed_draws=int(rec.get("fixed_draws") or 0),
               device="cpu", q=q, q_draws=q_draws, params=params,
               moments={k[len("moments."):-len(".mean")]: (v, arrays[k[:-len(".mean")] + ".sd"])
                        for k, v in arrays.items() if k.startswith("moments.") and k.endswith(".mean")})
