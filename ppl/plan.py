"""Estimator plan: checked IR -> how each latent is handled (torch-free).

Continuous latents use `reparam` (pathwise gradients).  A discrete latent is
`enumerate`d (summed out exactly) when that is cheap and exact in closed form:
finite support of known size (at most MAX_ENUM values), and every factor it
touches lines up with it element by element (the factor has the latent's shape,
and the path from the latent to it is elementwise or a gather `x[z]`), or the
latent is a scalar.  A count (a support with no known size that can be summed
over a window, `Support.window`) is enumerated the same way over a window of
likely values per element, found at fit time (`window`: truncated
enumeration, ppl/infer/windows.py); a window found too wide sends it back here
(`too_wide`).  Discrete latents that use one another or share a factor form one
group, summed jointly over the product of their values or not at all
(`group`).  Otherwise a latent gets `score` (BBVI: score-function gradients,
Rao-Blackwellised with its Markov blanket, plus a baseline), or `relaxed`
(Gumbel-softmax / concrete, ppl/infer/relaxed.py) when asked for, or when
`auto` measured the score path too noisy at the start (`relax`); a latent can
be relaxed when its support has a relaxation (categorical, bernoulli) and
every use of it stays smooth in the relaxed value (`relax_refusal`).  The plan also
names, for each discrete latent, the factors in its Markov blanket.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

from . import distributions as DS
from . import functions as FN
from .config import python_opt
from .errors import EXIT_USAGE, Diagnostic, PplError, UsageError
from .frontend import ast as A
from .frontend.check import Model, Node
from .supports import SUPPORTS

ESTIMATORS = ("auto", "reparam", "score", "enumerate", "relaxed")
# "score-all" (API only): the score-function estimator for continuous latents too (for tests and study)
MAX_ENUM = 64


@dataclass(frozen=True)
class NodePlan:
    estimator: str                    # reparam | enumerate | score | relaxed
    factors: Tuple[str, ...] = ()     # nodes whose densities depend on this latent (its Markov blanket);
                                      # for an enumerated group: the group's, on its first member only
    local: bool = False               # factors line up element by element with the latent
    size: int = 0                     # number of values to sum over (enumerate; 0: a window, found at fit time)
    window: bool = False              # truncated enumeration: an unbounded count summed over a window
    group: str = ""                   # enumerated: the first latent of the group summed out jointly with it


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


def windowable(node: Node) -> bool:
    """A discrete latent with no known finite support whose values can be summed over a window
    (a count: its density is defined at every value, and its tails fall off)."""
    return bool(SUPPORTS[DS.REGISTRY[node.dist.spec].support].window)


def _clusters(model: Model, discrete: List[Node], info) -> List[List[Node]]:
    """Discrete latents joined when one uses another or they share a factor: each cluster is summed
    out jointly or not at all."""
    parent = {n.name: n.name for n in discrete}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    for i, a in enumerate(discrete):
        fa = set(info[a.name][0])
        for b in discrete[i + 1:]:
            if b.name in fa or a.name in info[b.name][0] or fa & set(info[b.name][0]):
                parent[find(b.name)] = find(a.name)
    out: Dict[str, List[Node]] = {}
    for n in discrete:
        out.setdefault(find(n.name), []).append(n)
    return list(out.values())


def relax_refusal(model: Model, name: str) -> Optional[Tuple[str, Optional[A.Expr]]]:
    """Why the discrete latent `name` cannot be relaxed (the reason, and the expression at fault), or None.
    Its support needs a relaxation; a relaxed categorical's value is a one-hot of weights, so it may only
    index (`x[z]`, the whole index: a weighted sum); a relaxed bernoulli's value is a number in (0, 1),
    used in arithmetic but never as an index.  Nothing computed from it may be compared or used as an
    index (a step function: no gradient, or no meaning, at a relaxed value)."""
    node = model.nodes[name]
    support = SUPPORTS[DS.REGISTRY[node.dist.spec].support]
    if support.relaxation is None:
        return f"its support {support.text} has no continuous relaxation", None
    categorical = support.relaxation == "concrete"
    tainted = {name}

    def bad(e: A.Expr, as_index: bool = False) -> Optional[Tuple[str, A.Expr]]:
        whole = isinstance(e, A.Name) and e.id == name and categorical     # x[z]: the soft index
        if as_index and not whole and any(x.id in tainted for x in A.names_in(e)):
            return "its relaxed value cannot be an index", e
        if isinstance(e, A.Name):
            if e.id == name and categorical and not as_index:
                return "a relaxed categorical can only be an index (x[z])", e
            return None
        if isinstance(e, A.BinOp) and e.op in ("==", "!=", "<", "<=", ">", ">=") and \
                any(x.id in tainted for x in A.names_in(e)):
            return "a comparison has no gradient at a relaxed value", e
        if isinstance(e, A.Index):
            return bad(e.base) or next((r for r in (bad(i, True) for i in e.indices) if r), None)
        return next((r for r in (bad(c) for c in A.children(e)) if r), None)

    for n in model.order:
        other = model.nodes[n]
        if n == name:
            continue
        exprs = [other.expr] if other.expr is not None and other.kind == "deterministic" else \
            list(other.dist.args) if other.dist is not None else []
        if other.constraint is not None:
            exprs += [b for b in (other.constraint.lower, other.constraint.upper) if b is not None]
        for e in exprs:
            if not any(x.id in tainted for x in A.names_in(e)):
                continue
            why = bad(e)
            if why:
                return why
            if other.kind == "deterministic":
                tainted.add(n)
    return None


def relaxable(model: Model, name: str) -> bool:
    return relax_refusal(model, name) is None


def plan(model: Model, requested: str = "auto", opt: Callable = python_opt,
         too_wide: frozenset = frozenset(), relax: frozenset = frozenset()) -> Dict[str, NodePlan]:
    """`opt(name[, value])` spells an option as the caller does (`ppl.config.cli_opt` / `python_opt`).
    `too_wide`: count latents whose window was found too wide at fit time (they go to the score path).
    `relax`: discrete latents that `auto` sends to the relaxed estimator instead of the score path (or of
    enumeration: a latent with an encoder, whose q is the encoder's, ppl.infer.relaxed_rows)."""
    if requested not in ESTIMATORS + ("score-all",):
        raise UsageError(f"unknown estimator '{requested}' for {opt('estimator')} (valid: {', '.join(ESTIMATORS)})")
    if requested in ("score", "enumerate", "relaxed") and not any(n.discrete for n in model.latents()):
        raise UsageError(f"{opt('estimator', requested)} applies to discrete latents, and the model has none "
                         f"(continuous latents use reparameterised gradients)")
    out: Dict[str, NodePlan] = {}
    discrete = [n for n in model.latents() if n.discrete]
    info = {n.name: factors_of(model, n.name) for n in discrete}
    for node in model.latents():
        if not node.discrete:
            out[node.name] = NodePlan("score" if requested == "score-all" else "reparam")
    for cluster in _clusters(model, discrete, info):
        names = {n.name for n in cluster}
        sizes = {n.name: enum_size(model, n) for n in cluster}
        finite = 1
        for n in cluster:
            finite *= sizes[n.name] or 1
        aligned = {}
        for n in cluster:
            factors, local = info[n.name]
            aligned[n.name] = local and all(model.nodes[f].shape == n.shape for f in factors)
        sized = all(sizes[n.name] is not None or (windowable(n) and n.name not in too_wide) for n in cluster)
        same_shape = all(n.shape == cluster[0].shape for n in cluster)
        lined_up = same_shape and (cluster[0].shape == () or all(aligned[n.name] for n in cluster))
        can_enum = sized and finite <= MAX_ENUM and lined_up
        if requested == "enumerate" and not can_enum:
            node = next((n for n in cluster if sizes[n.name] is None and not windowable(n)), cluster[0])
            if not sized or finite > MAX_ENUM:
                why = ("its window of likely values is too wide" if node.name in too_wide else
                       "its support is not a small finite set")
            elif not same_shape:
                why = f"it is summed jointly with {', '.join(repr(n.name) for n in cluster if n is not node)}, " \
                      f"whose shapes differ"
            else:
                why = "its factors do not line up with it element by element"
            raise UsageError(f"cannot enumerate '{node.name}': {why}; use {opt('estimator', 'auto')} or score")
        if requested == "reparam":
            raise UsageError(f"'{cluster[0].name}' is discrete, so it has no reparameterised gradient; "
                             f"use {opt('estimator', 'auto')}, enumerate, score or relaxed")
        if requested == "relaxed":
            for n in cluster:
                refusal = relax_refusal(model, n.name)
                if refusal is not None:
                    why, where = refusal
                    raise PplError([Diagnostic(where.span if where is not None else n.span,
                                               f"{opt('estimator', 'relaxed')} cannot relax '{n.name}': {why}; "
                                               f"relaxed applies to categorical and bernoulli latents used "
                                               f"smoothly (valid: {', '.join(ESTIMATORS)}; use "
                                               f"{opt('estimator', 'auto')} or score)")], EXIT_USAGE)
        if can_enum and requested in ("auto", "enumerate") and not (requested == "auto" and names & relax):
            owner = cluster[0].name
            group_factors = tuple(f for f in model.order
                                  if any(f in info[n.name][0] for n in cluster) and f not in names)
            for n in cluster:
                out[n.name] = NodePlan("enumerate", group_factors if n.name == owner else (), True,
                                       sizes[n.name] or 0, sizes[n.name] is None, owner)
        else:
            for n in cluster:
                est = "relaxed" if requested == "relaxed" or n.name in relax else "score"
                out[n.name] = NodePlan(est, tuple(info[n.name][0]), aligned[n.name], sizes[n.name] or 0)
    return {n: out[n] for n in model.order if n in out}


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


def describe(p: Dict[str, NodePlan], windows: Optional[Dict[str, str]] = None) -> str:
    """'reparam' / 'enumerate (z)' / 'reparam + truncated enumeration (n)' / 'reparam + score (z)' for the
    fit header; `windows`: latent -> its window, as the fit found it (shown after the name)."""
    groups: Dict[str, List[str]] = {}
    for name, np_ in p.items():
        est = "truncated enumeration" if np_.estimator == "enumerate" and np_.window else np_.estimator
        groups.setdefault(est, []).append(name + (f": {windows[name]}" if windows and name in windows else ""))
    parts = []
    for est in ("reparam", "enumerate", "truncated enumeration", "score", "relaxed"):
        if est in groups:
            names = groups[est]
            sep = "; " if windows else ", "
            parts.append(est if est == "reparam" else f"{est} ({sep.join(names)})")
    return " + ".join(parts) if parts else "none"
