"""Model graph: checked IR -> networkx DAG and its renderings (text, dot, json)."""
from __future__ import annotations

import json

import networkx as nx
import pytest

import ppl
from ppl.errors import UsageError
from ppl.graph import build_graph, to_dot, to_json, to_text

from conftest import model_paths

EIGHT_EDGES = {("mu", "theta"), ("tau", "theta"), ("theta_raw", "theta"), ("theta", "y"), ("sigma", "y")}


def graph_of(name, with_data=True, estimator="auto"):
    mpath, dpath = model_paths(name)
    return build_graph(ppl.load(mpath).check(dpath if with_data else None), estimator)


@pytest.fixture(scope="module")
def eight():
    return graph_of("eight_schools")


@pytest.fixture(scope="module")
def mixture():
    return graph_of("mixture")


def test_eight_schools_nodes_and_kinds(eight):
    assert isinstance(eight, nx.DiGraph)
    assert set(eight.nodes) == {"y", "sigma", "mu", "tau", "theta_raw", "theta"}
    kinds = {n: a["kind"] for n, a in eight.nodes(data=True)}
    assert kinds == {"y": "observed", "sigma": "data", "mu": "latent", "tau": "latent",
                     "theta_raw": "latent", "theta": "deterministic"}


def test_eight_schools_edges(eight):
    assert set(eight.edges) == EIGHT_EDGES
    assert nx.is_directed_acyclic_graph(eight)


def test_eight_schools_attributes(eight):
    n = eight.nodes
    assert n["mu"]["support"] == "real" and n["mu"]["transform"] == "identity"
    assert n["tau"]["support"] == "(0, inf)" and n["tau"]["transform"] == "exp"
    assert n["theta_raw"]["support"] == "real" and n["theta_raw"]["shape"] == [8]
    for lat in ("mu", "tau", "theta_raw"):
        assert n[lat]["estimator"] == "reparam"
    assert n["mu"]["dist"] == "normal(0, 5)"
    assert n["tau"]["dist"] == "half_cauchy(5)"
    assert n["theta_raw"]["dist"] == "normal(0, 1)"
    assert n["theta"]["expr"] == "mu + tau * theta_raw"
    assert n["theta"]["shape"] == [8]
    assert n["theta"].get("support") != "data"              # a deterministic is not data
    assert "estimator" not in n["theta"] and "transform" not in n["theta"]
    assert n["y"]["dist"] == "normal(theta, sigma)" and n["y"]["type"] == "real"
    assert n["sigma"]["support"] == "data" and n["sigma"]["type"] == "real"
    assert "dist" not in n["sigma"]
    assert n["mu"]["line"] == 5 and n["y"]["line"] == 2
    assert eight.graph["estimators"] == "reparam"


def test_eight_schools_topological_order(eight):
    order = eight.graph["order"]
    assert sorted(order) == sorted(eight.nodes)
    pos = {n: i for i, n in enumerate(order)}
    for u, v in eight.edges:
        assert pos[u] < pos[v]
    assert order == ["sigma", "mu", "tau", "theta_raw", "theta", "y"]


def test_symbolic_graph_without_data():
    g = graph_of("eight_schools", with_data=False)
    assert set(g.edges) == EIGHT_EDGES
    assert g.nodes["theta_raw"]["shape"] == ["J"]


def test_mixture_estimators(mixture):
    n = mixture.nodes
    assert n["z"]["estimator"] == "enumerate"
    assert "transform" not in n["z"]                      # discrete: nothing to unconstrain
    assert n["w"]["estimator"] == "reparam" and n["w"]["transform"] == "stick-breaking"
    assert n["mu"]["transform"] == "ordered (cumulative exp)" and n["mu"]["declared"] == "ordered"
    assert n["sigma"]["transform"] == "exp"
    assert n["K"]["kind"] == "constant"
    assert mixture.graph["estimators"] == "reparam + enumerate (z)"
    assert {("w", "z"), ("z", "y"), ("mu", "y"), ("sigma", "y"), ("K", "w"), ("K", "mu")} <= set(mixture.edges)


def test_mixture_score_estimator_requested():
    g = graph_of("mixture", estimator="score")
    assert g.nodes["z"]["estimator"] == "score"
    assert "score (" in g.graph["estimators"] and "z" in g.graph["estimators"]


def test_reparam_on_discrete_is_a_usage_error():
    with pytest.raises(UsageError, match="'z' is discrete"):
        graph_of("mixture", estimator="reparam")


def test_radon_edges_and_gather():
    g = graph_of("radon")
    assert {("county", "log_radon"), ("a", "log_radon"), ("floor", "log_radon"), ("b", "log_radon"),
            ("sigma_y", "log_radon"), ("mu_a", "a"), ("sigma_a", "a")} == set(g.edges)
    assert g.nodes["county"]["type"] == "level" and g.nodes["county"]["kind"] == "data"


def test_flat_latent_in_graph():
    g = build_graph(ppl.loads("data y: real[N]\nb: real[2]\ns: real<lower=0>\n"
                              "y ~ normal(b[1] + b[2], s)\n").check({"y": [1.0, 2.0]}))
    assert g.nodes["b"]["dist"] == "flat" and g.nodes["b"]["kind"] == "latent"
    assert g.nodes["s"]["support"] == "(0, inf)" and g.nodes["s"]["declared"] == "(0, inf)"
    assert set(g.edges) == {("b", "y"), ("s", "y")}


# ---- renderings ---------------------------------------------------------------------------
def test_to_json(eight):
    doc = json.loads(to_json(eight))
    assert set(doc) == {"model", "estimators", "rows", "order", "nodes", "edges"}
    assert doc["model"].endswith("eight_schools.ppl") and doc["rows"] == "J"
    assert doc["estimators"] == "reparam"
    nodes = {d["name"]: d for d in doc["nodes"]}
    assert [d["name"] for d in doc["nodes"]] == ["y", "sigma", "mu", "tau", "theta_raw", "theta"]
    assert {n: d["kind"] for n, d in nodes.items()} == {
        "y": "observed", "sigma": "data", "mu": "latent", "tau": "latent", "theta_raw": "latent",
        "theta": "deterministic"}
    assert nodes["tau"]["support"] == "(0, inf)" and nodes["tau"]["estimator"] == "reparam"
    assert nodes["theta_raw"]["shape"] == [8]
    assert {n for n, d in nodes.items() if d.get("rows") == "per row"} == {"y", "sigma", "theta_raw", "theta"}
    assert {tuple(e) for e in doc["edges"]} == EIGHT_EDGES
    assert doc["order"][-1] == "y"


def test_to_text(eight):
    text = to_text(eight)
    lines = text.splitlines()
    assert lines[0].startswith("model ") and "eight_schools.ppl" in lines[0] and "reparam" in lines[0]
    assert len(lines) == 7
    body = {ln.split()[1]: ln for ln in lines[1:]}
    assert body["tau"].split()[0] == "latent"
    assert "half_cauchy(5)" in body["tau"] and "support (0, inf)" in body["tau"]
    assert "transform exp" in body["tau"]
    assert body["theta[8]"].split()[0] == "deterministic"
    assert "mu + tau * theta_raw" in body["theta[8]"] and "<- mu, tau, theta_raw" in body["theta[8]"]
    assert body["y[8]"].split()[0] == "observed" and "<- sigma, theta" in body["y[8]"]
    assert text.endswith("\n")


def test_to_dot(eight):
    dot = to_dot(eight)
    assert dot.startswith("digraph model {") and dot.rstrip().endswith("}")
    for u, v in EIGHT_EDGES:
        assert f'  "{u}" -> "{v}";' in dot
    assert dot.count("->") == len(EIGHT_EDGES)
    assert '"tau" [label="tau\\n~ half_cauchy(5)", shape=ellipse];' in dot
    assert '"theta" [label="theta[8]\\n= mu + tau * theta_raw", shape=ellipse, style=dashed];' in dot
    assert '"sigma" [label="sigma[8]", shape=box' in dot


def test_to_dot_marks_enumerated_latent(mixture):
    dot = to_dot(mixture)
    assert '\\n[enumerate]"' in dot
    line = next(ln for ln in dot.splitlines() if ln.strip().startswith('"z" ['))
    assert "categorical(w)" in line and "[enumerate]" in line

