"""Encoders declared in the model: `amortize LATENT from DATA... (hidden [..] [activation A] | linear) [iaf K]`.

Stage: checked IR (`Model`, with its row axis) + the `amortize` declarations -> `EncoderSpec`s
(torch-free), or located errors.

An encoder maps row n's data to q(LATENT_n | DATA_n), so LATENT must be a *local* latent (its
leading dimension the row axis, and no node that mixes rows reads it, directly or through others)
and every DATA must be data of those rows.  A continuous latent's encoder gives a Gaussian q; a
discrete one's (categorical, bernoulli: a support with a continuous relaxation) gives the logits of
its categorical q, fitted by the relaxed estimator (ppl.infer.relaxed_rows), so it must be
relaxable (`ppl.plan.relax_refusal`) and takes an MLP (`hidden`), neither `linear` nor `iaf`.  The
activations are the registry `ACTIVATIONS` (name -> torch function, built only when a fit asks for it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import Diagnostic, PplError, did_you_mean, one_of
from . import ast as A

DEFAULT_ACTIVATION = "relu"


def _torch_activation(name: str) -> Callable:
    def make():
        import torch
        import torch.nn.functional as F
        return {"relu": F.relu, "tanh": torch.tanh, "softplus": F.softplus, "sigmoid": torch.sigmoid,
                "elu": F.elu}[name]
    return make


# name -> a maker of the torch function (torch is imported only when a fit builds the encoder)
ACTIVATIONS: Dict[str, Callable] = {n: _torch_activation(n) for n in ("relu", "tanh", "softplus", "sigmoid", "elu")}


@dataclass(frozen=True)
class EncoderSpec:
    latent: str
    inputs: Tuple[str, ...]
    hidden: Tuple[int, ...]
    activation: str
    linear: bool
    iaf: int
    decl: A.Amortize
    discrete: bool = False           # q is categorical: the encoder gives its logits (relaxed_rows.py)

    def describe(self) -> str:
        how = "linear Gaussian (a covariance shared by the rows)" if self.linear else \
            f"MLP {list(self.hidden)} {self.activation}" + (" -> logits" if self.discrete else "")
        return f"{self.latent} from {', '.join(self.inputs)}: {how}" + (f", {self.iaf} IAF steps" if self.iaf else "")


def check_encoders(model) -> Tuple[EncoderSpec, ...]:
    """The model's `amortize` declarations, checked against its nodes and row axis."""
    decls = getattr(model.program, "encoders", ())
    if not decls:
        return ()
    errs: List[Diagnostic] = []
    rows = model.rows
    descendants = _descendants(model)
    seen: Dict[str, int] = {}
    out = []
    for d in decls:
        ok = True
        name = d.latent.id
        node = model.nodes.get(name)
        if node is None:
            errs.append(Diagnostic(d.latent.span, f"unknown name '{name}'{did_you_mean(name, model.nodes)}"))
            ok = False
        elif node.kind != "latent":
            what = {"data": "data", "observed": "observed data", "constant": "a constant",
                    "deterministic": "a deterministic node"}.get(node.kind, node.kind)
            errs.append(Diagnostic(d.latent.span, f"'{name}' is {what}, not a latent: amortize names a local latent "
                                                  f"(one value per data row, `z[N] ~ ...`) whose q an encoder gives"))
            ok = False
        elif node.discrete and (refusal := _discrete_refusal(model, node, d)) is not None:
            errs.append(refusal)
            ok = False
        elif rows.symbol is None or name not in rows.per_row:
            dims = node.shape
            lead = f"its leading dimension is {dims[0]}" if dims else "it is a scalar"
            rsym = f"the data rows are {rows.symbol}" if rows.symbol else "the data have no rows"
            errs.append(Diagnostic(d.latent.span, f"'{name}' is a global latent, not a local one ({lead}; {rsym}): "
                                                  f"an encoder maps each row's data to that row's latent, so "
                                                  f"declare it with the rows leading, like {name}[{rows.symbol or 'N'}]"))
            ok = False
        else:
            mixer = next((m for m in model.order if m in descendants.get(name, ()) and m in rows.mixes_rows), None)
            if mixer is not None:
                errs.append(Diagnostic(d.latent.span, f"'{name}' is not local: '{mixer}' (line "
                                                      f"{model.nodes[mixer].span.line}) uses it across rows, so row "
                                                      f"n's posterior depends on other rows than n"))
                ok = False
        if ok and name in seen:
            errs.append(Diagnostic(d.latent.span, f"'{name}' already has an encoder (line {seen[name]})"))
            ok = False
        seen.setdefault(name, d.span.line)
        for x in d.inputs:
            xn = model.nodes.get(x.id)
            if xn is None:
                errs.append(Diagnostic(x.span, f"unknown name '{x.id}'{did_you_mean(x.id, model.nodes)}"))
                ok = False
            elif xn.kind not in ("data", "observed", "constant"):
                errs.append(Diagnostic(x.span, f"'{x.id}' is {'a latent' if xn.kind == 'latent' else 'not data'}: "
                                               f"an encoder reads the data of the latent's rows"))
                ok = False
            elif rows.symbol is None or x.id not in rows.per_row:
                lead = f"its leading dimension is {xn.shape[0]}" if xn.shape else "it is a scalar"
                errs.append(Diagnostic(x.span, f"'{x.id}' is not data of the rows of '{name}' ({lead}; the rows are "
                                               f"{rows.symbol}): an encoder reads row n's data for row n's latent"))
                ok = False
        for h in d.hidden:
            if not h.is_int or h.value < 1:
                errs.append(Diagnostic(h.span, f"a hidden layer size must be a whole number of at least 1, "
                                               f"not {h.value}"))
                ok = False
        act = DEFAULT_ACTIVATION
        if d.activation is not None:
            act = d.activation.id
            if act not in ACTIVATIONS:
                hint = did_you_mean(act, ACTIVATIONS)
                errs.append(Diagnostic(d.activation.span, f"unknown activation '{act}'{hint} "
                                                          f"(activations: {one_of(ACTIVATIONS)})"))
                ok = False
        iaf = 0
        if d.iaf is not None:
            if not d.iaf.is_int or d.iaf.value < 1:
                errs.append(Diagnostic(d.iaf.span, f"iaf takes a whole number of steps of at least 1, "
                                                   f"not {d.iaf.value}"))
                ok = False
            else:
                iaf = int(d.iaf.value)
        if ok:
            out.append(EncoderSpec(name, tuple(x.id for x in d.inputs), tuple(int(h.value) for h in d.hidden),
                                   act, d.linear, iaf, d, bool(node.discrete)))
    if errs:
        errs.sort(key=lambda e: (e.span.line, e.span.col) if e.span else (0, 0))
        raise PplError(errs)
    return tuple(out)


def _discrete_refusal(model, node, d) -> Optional[Diagnostic]:
    """Why a discrete latent cannot have this encoder (None: it can, as the logits of a relaxed q)."""
    name = node.name
    if d.linear or d.iaf is not None:
        return Diagnostic(d.span, f"'{name}' is discrete: its encoder gives the logits of a categorical q, an "
                                  f"MLP (hidden [..]); `linear` and `iaf` shape a Gaussian q of a continuous latent")
    from ..plan import relax_refusal             # (the plan imports the checker, which imports this)
    refusal = relax_refusal(model, name)
    if refusal is not None:
        why, where = refusal
        return Diagnostic(where.span if where is not None else d.latent.span,
                          f"'{name}' is discrete and cannot be relaxed ({why}): an encoder of a discrete latent "
                          f"gives the logits of its relaxed (Gumbel-softmax) q")
    return None


def _descendants(model) -> Dict[str, set]:
    children: Dict[str, List[str]] = {}
    for n, node in model.nodes.items():
        for p in node.deps:
            children.setdefault(p, []).append(n)
    out: Dict[str, set] = {}
    for n in model.nodes:
        seen, stack = set(), list(children.get(n, ()))
        while stack:
            c = stack.pop()
            if c not in seen:
                seen.add(c)
                stack.extend(children.get(c, ()))
        out[n] = seen
    return out


def encoder_of(model, name: str) -> Optional[EncoderSpec]:
    return next((e for e in getattr(model, "encoders", ()) if e.latent == name), None)
