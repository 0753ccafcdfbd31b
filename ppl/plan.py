"""Estimator plan: checked IR -> how each latent is handled (torch-free).

Continuous latents use `reparam` (pathwise gradients).  A discrete latent is
`enumerate`d (summed out exactly) when that is cheap and exact in closed form:
finite support of known size (at most MAX_ENUM values), and every factor it
touches lines up with it element by element (the factor has the latent's shape,
and the path from the latent to it is elementwise or a gather `x[z]`), or the
latent is a scalar.  Otherwise it gets `score` (BBVI: score-function gradients,
Rao-Blackwellised with its Markov blanket, plus a baseline).  The plan also
names, for each discrete latent, the factors in its Markov blanket.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

from . import distributions as DS
from . import functions as FN
from .config import python_opt
from .errors import UsageError
from .frontend import ast as A
from .frontend.check import Model, Node
from .supports import SUPPORTS

ESTIMATORS = ("auto", "reparam", "score", "enumerate")
# "score-all" (API only): the score-function estimator for continuous latents too (for tests and study)
MAX_ENUM = 64


@dataclass(frozen=True)
class NodePlan:
    estimator: str                    # reparam | enumerate | score
    factors: Tuple[str, ...] = ()     # nodes whose densities depend on this latent (its Markov blanket)
    local: bool = False               # factors line up element by element with the latent
    size: int = 0                     # number of values to sum over (enumerate)


def factors_of(model: Model, name: str) -> Tuple[List[str], bool]:
    """Nodes with a density that uses `name` (directly or through deterministics),
    and whether every path is elementwise."""
    tainted: Set[str] = {name}
    local = True
    out: List[str] = []
    for n in model.order:
        node = model.nodes[n]
        if n == name:
            continue
        exprs = []
        if node.expr is not None and node.kind == "deterministic":
            exprs = [node.expr]
        elif node.dist is not None:
            exprs = list(node.dist.args)
        if node.constraint is not None:
            exprs += [b for b in (node.constraint.lower, node.constraint.upper) if b is not None]
        uses = [e for e in exprs if any(x.id in tainted for x in A.names_in(e))]
        if not uses:
            continue
        for e in uses:
            local &= _elementwise(e, tainted)
        if node.kind == "deterministic":
            tainted.add(n)
            if node.shape != model.nodes[name].shape:
                local = False
        else:
            out.append(n)
    return out, local


def _elementwise(e: A.Expr, tainted: Set[str]) -> bool:
    def has(x):
        return any(n.id in tainted for n in A.names_in(x))
    for x in A.walk(e):
        if isinstance(x, A.Call) and FN.REGISTRY[x.func].axes != "elementwise" and any(has(a) for a in x.args):
            return False
        if isinstance(x, A.BinOp) and x.op == "@" and has(x):
            return False
        if isinstance(x, A.Vector) and has(x):
            return False
        if isinstance(x, A.Index):
            if has(x.base):
                return False
            if len(x.indices) > 1 and any(has(i) for i in x.indices):
                return False
    return True


def enum_size(model: Model, node: Node) -> Optional[int]:
    """How many values a discrete latent takes (None: unknown or unbounded); from the supports registry."""
    count = SUPPORTS[DS.REGISTRY[node.dist.spec].support].count
    return None if count is None else count(model, node.dist)


def plan(model: Model, requested: str = "auto", opt: Callable = python_opt) -> Dict[str, NodePlan]:
    """`opt(name[, value])` spells an option as the caller does (`ppl.config.cli_opt` / `python_opt`)."""
    if requested not in ESTIMATORS + ("score-all",):
        raise UsageError(f"unknown estimator '{requested}' for {opt('estimator')} (valid: {', '.join(ESTIMATORS)})")
    if requested in ("score", "enumerate") and not any(n.discrete for n in model.latents()):
        raise UsageError(f"{opt('estimator', requested)} applies to discrete latents, and the model has none "
                         f"(continuous latents use reparameterised gradients)")
    out: Dict[str, NodePlan] = {}
    enumerated: Dict[str, Set[str]] = {}
    for node in model.latents():
        if not node.discrete:
            est = "score" if requested == "score-all" else "reparam"
            out[node.name] = NodePlan(est)
            continue
        factors, local = factors_of(model, node.name)
        size = enum_size(model, node)
        shape_ok = node.shape == () or all(model.nodes[f].shape == node.shape for f in factors)
        disc_parent = any(model.nodes[d].kind == "latent" and model.nodes[d].discrete for d in node.deps)
        can_enum = (size is not None and size <= MAX_ENUM and (node.shape == () or (local and shape_ok))
                    and not disc_parent and not any(set(factors) & s for s in enumerated.values())
                    and not any(model.nodes[f].discrete and model.nodes[f].kind == "latent" for f in factors))
        if requested == "enumerate" and not can_enum:
            why = ("its support is not a small finite set" if size is None or size > MAX_ENUM else
                   "its factors do not line up with it element by element")
            raise UsageError(f"cannot enumerate '{node.name}': {why}; use {opt('estimator', 'auto')} or score")
        if requested == "reparam":
            raise UsageError(f"'{node.name}' is discrete, so it has no reparameterised gradient; "
                             f"use {opt('estimator', 'auto')}, enumerate or score")
        if can_enum and requested in ("auto", "enumerate"):
            enumerated[node.name] = set(factors)
            out[node.name] = NodePlan("enumerate", tuple(factors), True, size)
        else:
            out[node.name] = NodePlan("score", tuple(factors), local and shape_ok, size or 0)
    return out


def centred_latents(model: Model) -> List[str]:
    """Latents of a centred hierarchy: a location-scale distribution whose scale depends on a latent
    (`a[K] ~ normal(mu, sigma_a)`), the funnel that non-centring removes."""
    lat = {n.name for n in model.latents()}
    out = []
    for node in model.latents():
        spec = DS.REGISTRY[node.dist.spec] if node.dist is not None else None
        if spec is None or spec.scale is None:
            continue
        names = {x.id for x in A.names_in(node.dist.args[spec.scale])}
        if names & _latent_closure(model, lat):
            out.append(node.name)
    return out


def _latent_closure(model: Model, latents: Set[str]) -> Set[str]:
    """Latents and the deterministic nodes computed from them."""
    out = set(latents)
    for n in model.order:
        node = model.nodes[n]
        if node.kind == "deterministic" and set(node.deps) & out:
            out.add(n)
    return out


def describe(p: Dict[str, NodePlan]) -> str:
    """'reparam' / 'enumerate (z)' / 'reparam + score (z)' for the fit header."""
    groups: Dict[str, List[str]] = {}
    for name, np_ in p.items():
        groups.setdefault(np_.estimator, []).append(name)
    parts = []
    for est in ("reparam", "enumerate", "score"):
        if est in groups:
            names = groups[est]
            parts.append(est if est == "reparam" else f"{est} ({', '.join(names)})")
    return " + ".join(parts) if parts else "none"
