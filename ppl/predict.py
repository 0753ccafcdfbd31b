"""Predictive draws: a fit (or nothing, for the prior) + data -> replicated
data for every observed node and the value of every deterministic node, per
draw (Stan's generated quantities), by forward simulation of the compiled
model (`LogJoint.simulate`).

- Posterior predictive: the fit's draws of every latent are given; each
  observed node gets a replicate drawn given its parents.  Prior predictive
  (`prior=True`): nothing is given, every latent is drawn from its prior.
- New data (new rows, a new N): the observed columns may be left out (their
  replicates are what is asked for).  A level column's labels are matched to
  the fitted ones by name; a label the fit never saw is a new level, whose
  parameters are drawn from their prior given the fitted hyperparameters
  (`a[new] ~ normal(mu_a, sigma_a)`).  A latent indexed by the row axis (a
  local latent, `z[N]`) is drawn from its prior for new rows (from its encoder's q(z_n | x_n) where the
  model declares one and the new data hold its inputs): those are new
  units.
- A deterministic node that reads an observed column left out of new data
  is not reported (its value would be meaningless).

Stage: `Fit` (+ data) -> name -> (draws, *shape) numpy arrays.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from .errors import Diagnostic, PplError, UsageError
from .frontend import ast as A

# placeholders for an observed column absent from data for prediction: a value inside each support
_PLACEHOLDER = {"real": 0.0, "positive": 1.0, "unit_interval": 0.5, "simplex": 0.0, "boolean": 0.0,
                "categorical": 1.0, "binomial": 0.0, "nonneg_int": 0.0}


def observed_data_names(model) -> List[str]:
    """Data declarations that some `~` observes."""
    return [n for n, node in model.nodes.items() if node.kind == "observed" and
            any(isinstance(st, A.DataDecl) and st.name == n for st in model.program.statements)]


def _placeholders(symbolic) -> Dict[str, float]:
    from . import distributions as DS
    out = {}
    for name in observed_data_names(symbolic):
        node = symbolic.nodes[name]
        sup = DS.REGISTRY[node.dist.spec].support if node.dist is not None else "real"
        if sup == "interval":
            continue                    # bounds from expressions: no safe placeholder, the column is needed
        out[name] = _PLACEHOLDER.get(sup, 0.0)
    return out


def _level_decls(model):
    return [st for st in model.program.statements
            if isinstance(st, A.DataDecl) and st.type.base == "level" and st.type.levels is not None
            and isinstance(st.type.levels.value, str)]


def _check(pmodel, data, sets, fill):
    """-> (the model checked with `data`, the names filled in for absent observed columns)."""
    from .api import _check_data_size, _split_data
    from .data import load_data
    from .frontend.check import check
    files, objects = _split_data(data)
    _check_data_size(files)
    seen = {}

    def loader(decls, syms):
        seen["ds"] = ds = load_data(decls, files, sets, syms, objects=objects, fill_missing=fill)
        return ds
    model = check(pmodel.program, pmodel.source, loader)
    return model, list(seen["ds"].filled) if "ds" in seen else []


def new_data_model(pmodel, fitted, data, sets=()):
    """The model checked with new data: absent observed columns filled, level columns recoded onto the
    fitted labels (new labels numbered after them).  -> (model, names of the filled columns)."""
    from .saved import data_object
    fill = _placeholders(pmodel.check())
    first, filled = _check(pmodel, data, sets, fill)
    decls = _level_decls(first)
    if not decls or not any(st.name in fitted.levels for st in decls):
        return first, filled
    obj = data_object(first)
    merged: Dict[str, List[str]] = {}
    for st in decls:
        sym = st.type.levels.value
        old = fitted.levels.get(st.name)
        if old is None:
            continue
        labels = merged.setdefault(sym, list(old))
        new_labels = first.levels.get(st.name) or []
        for lab in new_labels:
            if lab not in labels:
                labels.append(lab)
        codes = np.asarray(first.values[st.name]).astype(int)
        obj[st.name] = [labels.index(new_labels[c - 1]) + 1 for c in codes.reshape(-1)]
    for sym, labels in merged.items():
        obj[sym] = len(labels)
    for n in filled:
        obj.pop(n, None)
    model, _ = _check(pmodel, obj, (), {n: fill[n] for n in filled})
    for st in decls:
        sym = st.type.levels.value
        if sym in merged:
            model.levels[st.name] = merged[sym]
    return model, filled


def predictive(fit, data=None, sets: Sequence[str] = (), *, prior: bool = False, draws: Optional[int] = None,
               seed: Optional[int] = None, pmodel=None) -> Dict[str, np.ndarray]:
    """See the module docstring.  `pmodel`: the model to simulate (a `PplModel`; default: the fitted one:
    a model with extra deterministic nodes computes them from the fitted latents)."""
    return simulate(fit, data, sets, prior=prior, draws=draws, seed=seed, pmodel=pmodel)[0]


def simulate(fit, data=None, sets: Sequence[str] = (), *, prior: bool = False, draws: Optional[int] = None,
             seed: Optional[int] = None, pmodel=None):
    """-> (name -> (draws, *shape) arrays, the checked model they are of)."""
    import torch
    from .api import PplModel
    from .backend.log_joint import LogJoint
    from .backend.runtime import Runtime
    from .plan import plan as make_plan
    if pmodel is None:
        pmodel = PplModel(fit.model.source)
    if data is None and not sets and pmodel.source.text == fit.model.source.text:
        model, filled = fit.model, []
    elif data is None and not sets:
        from .saved import data_object
        model, filled = pmodel.check(data_object(fit.model)), []
        model.levels.update(fit.model.levels)
    else:
        model, filled = new_data_model(pmodel, fit.model, data, sets)
    config = fit.config
    S = draws or next((int(v.shape[0]) for v in fit.draws.values()), config.draws)
    rt = Runtime.make("cpu", config.dtype, config.seed if seed is None else seed)
    program = LogJoint(model, make_plan(model, config.estimator, config.opt), rt)
    if program.params:          # the fitted point estimates (prior or posterior predictive alike)
        try:
            program.params.load(getattr(fit, "params", None) or {})
        except ValueError as e:
            raise PplError([Diagnostic(model.params()[0].name_span, f"the fit has {e}")]) from None
    gen = rt.generator()
    if not prior:
        _check_latents(model, fit)
    given = {}
    if not prior:
        post = fit.draws if S == next((int(v.shape[0]) for v in fit.draws.values()), -1) \
            else fit.draw(S, None if seed is None else seed + 1)
        given, partial = _given_latents(model, fit.model, post, rt)
        if filled is not None and model is not fit.model:     # new rows of amortised latents: from their encoder
            from .infer.amortized import encoded_rows
            for k, v in encoded_rows(fit, model, program, filled, S, gen).items():
                given.setdefault(k, v)
    else:
        partial = {}
        _check_proper(model)
    with torch.no_grad():
        if partial:             # latents with new levels: the new levels from the prior given the rest
            first = program.simulate(given, S, gen)
            for name, (k_old, axis) in partial.items():
                full = first[name].clone()
                idx = [slice(None)] * full.dim()
                idx[axis + 1] = slice(0, k_old)
                full[tuple(idx)] = rt.tensor(post[name])
                given[name] = full
        out = program.simulate(given, S, gen)
    tainted = _reads(model, filled)
    return {k: v.detach().cpu().numpy() for k, v in out.items() if k not in tainted}, model


def _check_latents(model, fit) -> None:
    missing = [n for n in model.latents() if n.name not in fit.draws]
    if missing:
        n = missing[0]
        raise PplError([Diagnostic(n.name_span, f"'{n.name}' is a latent here, but the fit has no draws of it "
                                                f"(the fit's latents: {', '.join(fit.draws)})")])


def _check_proper(model) -> None:
    for n in model.latents():
        if n.dist is None:
            raise PplError([Diagnostic(n.name_span, f"'{n.name}' has a flat (improper) prior, so the prior "
                                                    f"predictive cannot draw it; give it a proper prior")])


def _given_latents(model, fitted, post: Dict[str, np.ndarray], rt):
    """-> (latent name -> posterior draws as tensors, latents with new levels: name -> (fitted length,
    axis)).  A latent whose shape changed along a row axis is left to its prior (new units)."""
    from .summary import dim_symbols
    given, partial = {}, {}
    level_syms = {st.type.levels.value for st in _level_decls(model)}
    for node in model.latents():
        v = post[node.name]
        new_shape, old_shape = tuple(int(d) for d in node.shape), tuple(v.shape[1:])
        if new_shape == old_shape:
            given[node.name] = rt.tensor(v)
            continue
        syms = dim_symbols(model, node.name, new_shape)
        diff = [i for i, (a, b) in enumerate(zip(new_shape, old_shape)) if a != b] \
            if len(new_shape) == len(old_shape) else None
        if diff is not None and len(diff) == 1 and syms[diff[0]] in level_syms and new_shape[diff[0]] > old_shape[diff[0]]:
            partial[node.name] = (old_shape[diff[0]], diff[0])
        elif diff is not None and all(model.rows.is_row(node.name) and i == 0 for i in diff):
            continue                                                  # new rows: from the prior
        else:
            raise UsageError(f"the latent '{node.name}' has shape {list(new_shape)} with these data, "
                             f"{list(old_shape)} in the fit; only new rows and new levels can be predicted")
    return given, partial


def _reads(model, names: Sequence[str]) -> set:
    """Deterministic nodes that depend on any of `names` (directly or not): their values would be
    computed from placeholders.  (The observed nodes themselves are replicated, not read.)"""
    read, bad = set(names), set()
    for n in model.order:
        node = model.nodes[n]
        if node.kind == "deterministic" and any(d in read for d in node.deps):
            read.add(n)
            bad.add(n)
    return bad
