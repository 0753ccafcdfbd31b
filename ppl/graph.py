"""Model graph: checked IR -> networkx DAG, and its renderings (text, dot, json).

One node per named variable with its kind, distribution, shape, support,
transform to unconstrained space and estimator; one edge for each name an
expression (or a size) uses; a discrete latent's bounds from the graph
(`ppl.bounds`: `n >= y (binomial trials)`).  `ppl graph` renders exactly
this object.  Torch-free, except for a model with count latents summed over
a window when data are given: their windows at prior draws are found (as
`ppl fit` first does) and shown.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from typing import Callable, Dict, Optional

import networkx as nx

from . import distributions as DS
from .errors import PplError, Diagnostic
from .frontend.check import A_text, Model, Node
from .config import python_opt
from .bounds import bounds as bounds_of
from .plan import NodePlan, describe, plan
from .supports import SUPPORTS



def transform_name(node: Node) -> Optional[str]:
    if node.kind not in ("latent", "param") or node.discrete:
        return None
    kind = node.constraint.kind if node.constraint is not None else \
        DS.REGISTRY[node.dist.spec].support if node.dist else "real"
    return SUPPORTS[kind].transform


def build_graph(model: Model, estimator: str = "auto", opt: Callable = python_opt) -> nx.DiGraph:
    """`opt` spells an option as the caller does (ppl.config.cli_opt / python_opt)."""
    g = nx.DiGraph(name=model.source.path)
    node_plans: Dict[str, NodePlan] = plan(model, estimator, opt)
    windows: Dict[str, str] = {}
    if model.has_data and any(p.window for p in node_plans.values()):
        from .infer.windows import preview
        windows, too_wide = preview(model, node_plans)
        if too_wide:
            node_plans = plan(model, estimator, opt, frozenset(too_wide))
    for name, node in model.nodes.items():
        attrs = dict(kind=node.kind, shape=[d for d in node.shape], line=node.span.line,
                     support=node.support if node.kind in ("latent", "param") or node.dist else "data")
        if node.kind == "deterministic":
            del attrs["support"]   # a function of latents: no support of its own (not "data")
        if node.dist is not None:
            attrs["dist"] = f"{node.dist.spec}({', '.join(A_text(a) for a in node.dist.args)})"
        if node.expr is not None:
            attrs["expr"] = A_text(node.expr)
        if node.kind in ("data", "observed") and node.decl is not None:
            attrs["type"] = node.decl.base
        t = transform_name(node)
        if t is not None:
            attrs["transform"] = t
        if name in node_plans:
            attrs["estimator"] = "truncated enumeration" if node_plans[name].window else node_plans[name].estimator
            if name in windows:
                attrs["window"] = windows[name]
            grp = node_plans[name].group
            others = [n for n, p in node_plans.items() if p.group and p.group == grp and n != name]
            if grp and others:
                attrs["summed_with"] = others
        if node.kind == "latent" and node.discrete and model.has_data:
            b = bounds_of(model, name)
            if b.why or b.relations:
                attrs["bounds"] = "; ".join(b.why + b.relations)
        if node.kind == "latent" and node.dist is None:
            attrs["dist"] = "flat"
        if node.kind == "param":
            attrs["dist"] = "point estimate"
        if node.declared and node.constraint is not None:
            attrs["declared"] = node.constraint.text()
        enc = next((e for e in getattr(model, "encoders", ()) if e.latent == name), None)
        if enc is not None:
            attrs["encoder"] = enc.describe().split(": ", 1)[1] + f" of {', '.join(enc.inputs)}"
        if model.rows.is_row(name):
            attrs["rows"] = "per row"
        elif name in model.rows.mixes_rows:
            attrs["rows"] = "mixes rows"
        g.add_node(name, **attrs)
    for name, node in model.nodes.items():
        for d in node.deps:
            if d in model.nodes:
                g.add_edge(d, name)
    g.graph["estimators"] = describe(node_plans)
    g.graph["rows"] = model.rows.symbol
    g.graph["order"] = [n for n in nx.lexicographical_topological_sort(
        g, key=lambda n: list(model.nodes).index(n))]
    return g


def to_json(g: nx.DiGraph) -> str:
    return json.dumps({
        "model": g.graph.get("name"),
        "estimators": g.graph.get("estimators"),
        "rows": g.graph.get("rows"),
        "order": g.graph["order"],
        "nodes": [{"name": n, **a} for n, a in g.nodes(data=True)],
        "edges": [[u, v] for u, v in g.edges()],
    }, indent=2)


def _shape_text(shape) -> str:
    return "" if not shape else "[" + ", ".join(str(d) for d in shape) + "]"


def to_text(g: nx.DiGraph) -> str:
    rows = f"; rows: {g.graph['rows']}" if g.graph.get("rows") else ""
    lines = [f"model {g.graph.get('name')}  (estimators: {g.graph.get('estimators')}{rows})"]
    for n in g.graph["order"]:
        a = g.nodes[n]
        desc = f"{n}{_shape_text(a['shape'])}"
        what = a.get("dist") or a.get("expr") or a.get("type", "")
        extra = []
        if a["kind"] == "param":
            extra.append(f"set {a['support']}")
            if "transform" in a:
                extra.append(f"transform {a['transform']} (no Jacobian)")
        if a["kind"] == "latent":
            extra.append(f"support {a['support']}")
            if "transform" in a:
                extra.append(f"transform {a['transform']}")
            if "estimator" in a:
                extra.append(f"estimator {a['estimator']}")
            if "summed_with" in a:
                extra.append(f"summed jointly with {', '.join(a['summed_with'])}")
            if "bounds" in a:
                extra.append(f"bounds {a['bounds']}")
            if "window" in a:
                extra.append(f"window {a['window']}")
            if "encoder" in a:
                extra.append(f"q from an encoder: {a['encoder']}")
        if "rows" in a:
            extra.append(a["rows"])
        parents = sorted(g.predecessors(n), key=g.graph["order"].index)
        if parents:
            extra.append("<- " + ", ".join(parents))
        lines.append(f"  {a['kind']:<13} {desc:<18} {what}" + ("   [" + "; ".join(extra) + "]" if extra else ""))
    return "\n".join(lines) + "\n"


_STYLE = {
    "data": 'shape=box, style=filled, fillcolor="#dddddd"',
    "observed": 'shape=ellipse, style=filled, fillcolor="#bbbbbb"',
    "constant": 'shape=box, style=dashed',
    "latent": 'shape=ellipse',
    "deterministic": 'shape=ellipse, style=dashed',
    "param": 'shape=box, style="rounded,bold"',       # a point estimate: no distribution, no circle
}


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(g: nx.DiGraph) -> str:
    out = ["digraph model {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=11];']
    plate = [n for n in g.graph["order"] if g.nodes[n].get("rows") == "per row"]
    if plate:      # the row axis as a plate
        out.append(f'  subgraph cluster_rows {{ label="{_dot_escape(str(g.graph["rows"]))} rows"; style=rounded; '
                   + " ".join(f'"{_dot_escape(n)}";' for n in plate) + " }")
    for n in g.graph["order"]:
        a = g.nodes[n]
        label = f"{n}{_shape_text(a['shape'])}"
        if a["kind"] == "param":
            label = f"param {label}\\n(point estimate)"
        elif a.get("dist"):
            label += f"\\n~ {_dot_escape(a['dist'])}"
        elif a.get("expr"):
            label += f"\\n= {_dot_escape(a['expr'])}"
        if a.get("estimator") in ("enumerate", "truncated enumeration", "score", "relaxed"):
            label += f"\\n[{a['estimator']}]"
        out.append(f'  "{_dot_escape(n)}" [label="{label}", {_STYLE[a["kind"]]}];')
    for u, v in g.edges():
        out.append(f'  "{_dot_escape(u)}" -> "{_dot_escape(v)}";')
    out.append("}")
    return "\n".join(out) + "\n"


def render(dot_text: str, fmt: str) -> bytes:
    """Render DOT text with Graphviz's `dot` to png or svg bytes."""
    exe = shutil.which("dot")
    if exe is None:
        raise PplError([Diagnostic(None, "Graphviz's `dot` is needed for png/svg output and was not found; "
                                   "install it (Debian/Ubuntu: apt-get install graphviz; macOS: brew install "
                                   "graphviz), or use --format dot|text|json", "ppl graph")])
    p = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=60)
    if p.returncode != 0:
        raise PplError([Diagnostic(None, "Graphviz failed: " + p.stderr.decode(errors="replace").strip()[:300],
                                   "ppl graph")])
    return p.stdout
