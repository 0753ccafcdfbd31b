"""ArviZ InferenceData as netCDF4: a fit -> the bytes of `fit.nc`.

The groups of the InferenceData schema, one chain (the draws of q are
independent):
- posterior: every latent and deterministic node, dims (chain, draw, *dims);
- sample_stats: `lp` (log p of each draw, unconstrained, Jacobian included),
  `log_q`, `log_weight` (lp - log_q: the importance ratios for PSIS, ArviZ
  1.x's `loo_approximate_posterior(log_p=lp, log_q=log_q)`), `psis_weight`
  (their Pareto-smoothed, normalised weights);
- log_likelihood: log p(y_i | theta) per observed element, unscaled
  (`ppl.loo`), for `az.loo` / `az.waic` / `az.compare`;
- posterior_predictive: a replicate of every observed node per draw
  (`ppl.predict`), for `az.plot_ppc`;
- observed_data and constant_data: the data, as the model read them.

Dims are named after the model's dimension symbols (`J`, `K`, `N`; else
`NAME_dim_I` as ArviZ names them); coordinates are the level labels where a
`level[N] of K` column gave them, else 1-based indexes (so ArviZ labels
elements `a[1]` as ppl does).  log_likelihood and posterior_predictive are
left out above MAX_ELEMENTS numbers each (a note in run.json says so).

Written with h5netcdf (the `netcdf` extra: h5py, no xarray or ArviZ needed);
without it, no fit.nc (a note says why).  Read with `az.from_netcdf` (ArviZ
0.x: InferenceData; 1.x: an xarray DataTree with these groups).

Stage: `Fit` -> bytes.
"""
from __future__ import annotations

import datetime
import io
from typing import Dict, List, Optional

import numpy as np

from . import __version__
from .frontend import ast as A

MAX_ELEMENTS = 25_000_000
MISSING = "fit.nc not written: install the netcdf extra (pip install 'ppl[netcdf]')"


def available() -> bool:
    try:
        import h5netcdf  # noqa: F401  (only whether it is there)
        return True
    except ImportError:
        return False


class _Group:
    """One netCDF group under construction: variables with named dims, coordinates per dim."""

    def __init__(self, model, with_sample_dims: bool):
        self.model, self.sample = model, with_sample_dims
        self.vars: Dict[str, tuple] = {}            # name -> (dims, array, attrs)
        self.dims: Dict[str, int] = {}
        self.coords: Dict[str, np.ndarray] = {}

    def add(self, name: str, arr: np.ndarray, attrs: Optional[dict] = None) -> None:
        from .summary import coordinates, dim_symbols
        arr = np.asarray(arr)
        lead = ("chain", "draw") if self.sample else ()
        if self.sample:
            arr = arr[None]
        shape = arr.shape[len(lead):]
        syms = dim_symbols(self.model, name, shape)
        coords = coordinates(self.model, name, shape)
        dims = []
        for i, (sym, n, c) in enumerate(zip(syms, shape, coords)):
            d = sym if sym is not None else f"{name}_dim_{i}"
            if self.dims.get(d, n) != n or d in ("chain", "draw"):
                d = f"{name}_dim_{i}"
            self.dims[d] = n
            if d not in self.coords:
                self.coords[d] = np.asarray(c, dtype=object) if c is not None else np.arange(1, n + 1)
            dims.append(d)
        if self.sample:
            self.dims["chain"], self.dims["draw"] = 1, arr.shape[1]
            self.coords["chain"], self.coords["draw"] = np.arange(1), np.arange(arr.shape[1])
        self.vars[name] = (tuple(lead) + tuple(dims), arr, attrs or {})

    def write(self, f, group: str, attrs: dict) -> None:
        import h5py
        g = f.create_group(group)
        clash = {d for d in self.dims if d in self.vars}          # a variable named like a dimension
        rename = {d: f"{d}_dim" for d in clash}
        g.dimensions = {rename.get(d, d): n for d, n in self.dims.items()}
        for d, c in self.coords.items():
            dn = rename.get(d, d)
            if c.dtype == object:
                g.create_variable(dn, (dn,), dtype=h5py.string_dtype(), data=c.astype(str).astype(object))
            else:
                g.create_variable(dn, (dn,), data=c)
        for name, (dims, arr, a) in self.vars.items():
            v = g.create_variable(name, tuple(rename.get(d, d) for d in dims), data=arr)
            for k, val in a.items():
                v.attrs[k] = val
        for k, val in attrs.items():
            g.attrs[k] = val


def _data_groups(model):
    observed, constant = {}, {}
    for st in model.program.statements:
        if isinstance(st, A.DataDecl) and st.name in model.values:
            v = np.asarray(model.values[st.name])
            if st.type.base in ("int", "level"):
                v = v.astype(np.int64)
            (observed if model.nodes[st.name].kind == "observed" else constant)[st.name] = v
    return observed, constant


def fit_bytes(fit, notes: List[str], predictive: bool = True) -> Optional[bytes]:
    """fit.nc's bytes, or None (with a note) where h5netcdf is missing."""
    if not available():
        notes.append(MISSING)
        return None
    import h5netcdf
    model = fit.model
    attrs = {"created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "inference_library": "ppl", "inference_library_version": __version__,
             "method": fit.method, "objective": fit.objective, "verdict": fit.verdict_label,
             "khat": float(fit.khat), "ess": float(fit.ess)}
    groups: Dict[str, _Group] = {}
    post = _Group(model, True)
    discrete = {n for n, node in model.nodes.items() if node.kind == "latent" and node.discrete}
    for k, v in fit.draws.items():
        post.add(k, v.astype(np.int64) if k in discrete and np.all(np.isfinite(v)) else v)
    groups["posterior"] = post
    qd = fit.q_draws
    if qd is not None:
        from .infer.psis import psis
        ss = _Group(model, True)
        ss.add("lp", qd.log_p)
        ss.add("log_q", qd.log_q)
        ss.add("log_weight", qd.log_weights)
        ss.add("psis_weight", psis(qd.log_weights).weights)
        groups["sample_stats"] = ss
        S = len(qd.log_p)
        n_obs = sum(int(np.prod(model.nodes[n].shape)) for n in model.order if model.nodes[n].kind == "observed")
        if S * n_obs <= MAX_ELEMENTS:
            ll = _Group(model, True)
            for k, v in fit.log_likelihood().items():
                ll.add(k, v)
            if ll.vars:
                groups["log_likelihood"] = ll
            if predictive:
                pp = _Group(model, True)
                rep = fit.predict()
                for k in model.order:
                    if model.nodes[k].kind == "observed" and k in rep:
                        pp.add(k, rep[k])
                if pp.vars:
                    groups["posterior_predictive"] = pp
        else:
            notes.append(f"fit.nc: log_likelihood and posterior_predictive left out ({S} draws x {n_obs} "
                         f"observations is more than {MAX_ELEMENTS:,} numbers)")
    observed, constant = _data_groups(model)
    for gname, data in (("observed_data", observed), ("constant_data", constant)):
        if data:
            g = _Group(model, False)
            for k, v in data.items():
                g.add(k, v)
            groups[gname] = g
    buf = io.BytesIO()
    with h5netcdf.File(buf, "w") as f:
        for gname, g in groups.items():
            g.write(f, gname, attrs)
        for k, val in attrs.items():
            f.attrs[k] = val
    return buf.getvalue()


def predictive_bytes(values: Dict[str, np.ndarray], kind: str, model) -> bytes:
    """`ppl predict --out FILE.nc`: the replicated observed nodes in the group `kind`, and the other
    nodes (latents, deterministics) in `posterior` (`prior` for the prior predictive)."""
    from .errors import UsageError
    if not available():
        raise UsageError(MISSING.replace("fit.nc not written", "cannot write a .nc file"))
    import h5netcdf
    attrs = {"created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "inference_library": "ppl", "inference_library_version": __version__}
    rep, rest = _Group(model, True), _Group(model, True)
    for k, v in values.items():
        (rep if model.nodes[k].kind == "observed" else rest).add(k, v)
    buf = io.BytesIO()
    with h5netcdf.File(buf, "w") as f:
        if rest.vars:
            rest.write(f, "prior" if kind == "prior_predictive" else "posterior", attrs)
        if rep.vars:
            rep.write(f, kind, attrs)
    return buf.getvalue()
