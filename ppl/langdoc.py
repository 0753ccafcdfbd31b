"""The language reference's generated parts: the registries (distributions,
functions, supports, types, link folds) -> Markdown tables, spliced into
docs/language.md between `<!-- BEGIN GENERATED: NAME -->` and
`<!-- END GENERATED: NAME -->` markers.

    python -m ppl.langdoc            rewrite docs/language.md's generated parts
    python -m ppl.langdoc --check    exit 1 when they differ from the registries

tests/test_langdoc.py runs the check, requires a description here for every
registry entry (a new distribution or function without one fails), and runs
every example of the document.

Stage: registries -> Markdown text.  torch-free.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Dict, List

from . import distributions as DS
from . import functions as FN
from .supports import SUPPORTS

# what each distribution means, in Stan's parameterisation (one entry per registry entry)
DIST_MEANING: Dict[str, str] = {
    "normal": "mean mu, standard deviation sigma",
    "student_t": "nu degrees of freedom, location mu, scale sigma",
    "cauchy": "location mu, scale sigma",
    "half_normal": "|x| for x ~ normal(0, sigma)",
    "half_cauchy": "|x| for x ~ cauchy(0, sigma)",
    "half_student_t": "|x| for x ~ student_t(nu, 0, sigma)",
    "exponential": "rate (mean 1/rate)",
    "gamma": "shape alpha, rate beta (mean alpha/beta)",
    "inv_gamma": "shape alpha, scale beta (1/x ~ gamma(alpha, beta))",
    "lognormal": "log(x) ~ normal(mu, sigma)",
    "beta": "shape a, shape b (mean a/(a+b))",
    "uniform": "flat on (lo, hi)",
    "laplace": "double exponential: location mu, scale b",
    "logistic": "location mu, scale s",
    "weibull": "shape k, scale lambda",
    "dirichlet": "concentrations alpha (a vector); the value is a simplex of the same length",
    "multi_normal": "mean vector mu, covariance matrix Sigma",
    "multi_normal_cholesky": "mean vector mu, L the lower Cholesky factor of the covariance",
    "lkj_corr_cholesky": "LKJ(eta) on correlation matrices, as their Cholesky factor; the size comes from "
                         "the declaration (`L: cholesky_factor_corr[K, K] ~ lkj_corr_cholesky(2)`)",
    "bernoulli": "P(x = 1) = p",
    "bernoulli_logit": "P(x = 1) = inv_logit(a)",
    "binomial": "n trials, success probability p",
    "binomial_logit": "n trials, success probability inv_logit(a)",
    "poisson": "rate lambda",
    "poisson_log": "rate exp(a)",
    "neg_binomial_2": "mean mu, variance mu + mu^2/phi",
    "categorical": "values 1..K with probabilities p (a simplex of length K)",
    "categorical_logit": "values 1..K with probabilities softmax(a)",
}

FUNCTION_MEANING: Dict[str, str] = {
    "exp": "e^x", "log": "natural logarithm", "log1p": "log(1 + x)", "expm1": "e^x - 1",
    "sqrt": "square root", "square": "x * x", "abs": "absolute value",
    "inv_logit": "1 / (1 + e^-x)", "logit": "log(p / (1 - p))", "softplus": "log(1 + e^x)",
    "tanh": "hyperbolic tangent", "relu": "max(x, 0) (rectified linear unit)",
    "sigmoid": "1 / (1 + e^-x) (the same as inv_logit)", "sum": "sum of all elements", "mean": "mean of all elements",
    "sd": "sample standard deviation of all elements (n - 1)", "log_sum_exp": "log(sum(exp(x))), stably",
    "dot": "sum(a * b) of two vectors of one length", "cumsum": "cumulative sum along the last axis",
    "softmax": "exp(x) / sum(exp(x)) along the last axis", "ones": "a vector of n ones (n a known integer)",
    "zeros": "a vector of n zeros (n a known integer)",
    "rep": "n copies of x stacked on a new first axis (n a known integer)",
}

PARAM_KINDS = {k: text for k, (text, _) in DS.PARAM_CHECKS.items()}
AXES = {"elementwise": "elementwise (keeps the shape)", "last": "along the last axis (keeps the shape)",
        "reduce": "whole argument"}

LATENT_TYPES_DOC = {
    "real": "any real number; with bounds `real<lower=a>`, `real<upper=b>`, `real<lower=a, upper=b>`",
    "positive": "(0, inf), the same as `real<lower=0>`",
    "ordered": "a vector in increasing order (`mu: ordered[K] ~ normal(0, 10)`)",
    "simplex": "a vector of non-negative numbers summing to 1",
    "cholesky_factor_corr": "the Cholesky factor of a correlation matrix (`cholesky_factor_corr[K, K]`)",
}
DATA_TYPES_DOC = {
    "real": "numbers; bounds `<lower=.., upper=..>` are checked when the data are read",
    "int": "whole numbers (a column of 0/1, counts, ...); bounds checked likewise",
    "level": "`level[N] of K`: labels (numbers or strings) numbered 1..K; K is bound by the number of "
             "distinct labels, unless given (JSON or --set) with labels that are 1..K already",
}


def _table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def distributions() -> str:
    def rows(discrete: bool):
        out = []
        for name, d in DS.REGISTRY.items():
            if d.discrete != discrete:
                continue
            ranks = d.param_event_ranks or (0,) * d.arity
            params = ", ".join(f"{p} ({PARAM_KINDS.get(k, k)}{', vector' if r == 1 else ''})"
                               for (p, k), r in zip(d.params, ranks))
            sup = SUPPORTS[d.support].text if d.support != "interval" else "(lo, hi)"
            value = {0: "scalar", 1: "vector", 2: "matrix"}[d.event_rank]
            out.append([f"`{name}({', '.join(p for p, _ in d.params)})`", params, sup, value,
                        DIST_MEANING.get(name, "")])
        return out
    head = ["distribution", "parameters", "support", "one draw", "meaning"]
    folds = [[f"`{d}({'..., ' * i}{f}(e))`", f"`{t}`"] for (d, i, f), t in DS.LINK_FOLDS.items()]
    return ("Continuous:\n\n" + _table(head, rows(False)) + "\n\nDiscrete:\n\n" + _table(head, rows(True)) +
            "\n\nA link applied to a parameter is folded into the distribution that takes the linear "
            "predictor (the same density, computed without the round trip):\n\n" +
            _table(["written", "computed as"], folds))


def functions() -> str:
    rows = []
    for name, f in FN.REGISTRY.items():
        rows.append([f"`{name}({', '.join(f.params)})`", FUNCTION_MEANING.get(name, ""), AXES[f.axes],
                     "yes" if f.int_result else "no"])
    return _table(["function", "value", "works on", "int stays int"], rows)


def supports() -> str:
    rows = [[f"`{s.name}`", s.text, "discrete" if s.discrete else "continuous",
             s.transform or (("summed out (over a window of likely values when unbounded)" if s.window else "summed out")
                             + " or score-function q (" + (s.q or "none") + ")" if s.discrete else "")]
            for s in SUPPORTS.values()]
    return _table(["support", "set", "kind", "unconstraining transform / how it is fitted"], rows)


def types() -> str:
    from .frontend.check import DATA_TYPES, LATENT_TYPES
    rows = [[f"`{t}`", "data", DATA_TYPES_DOC.get(t, "")] for t in sorted(DATA_TYPES)]
    rows += [[f"`{t}`", "latent", LATENT_TYPES_DOC.get(t, "")] for t in sorted(LATENT_TYPES)]
    rows += [[f"`{t}`", "param", "as for a latent (a param is continuous: `int` is an error)"]
             for t in sorted(LATENT_TYPES)]
    return _table(["type", "for", "meaning"], rows)


SECTIONS = {"types": types, "distributions": distributions, "functions": functions, "supports": supports}
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "language.md")


def splice(text: str) -> str:
    """`text` with every generated section replaced by what the registries give now."""
    for name, fn in SECTIONS.items():
        pat = re.compile(rf"(<!-- BEGIN GENERATED: {name} -->\n)(?:.*?\n)?(<!-- END GENERATED: {name} -->)", re.S)
        if not pat.search(text):
            raise ValueError(f"docs/language.md has no generated section '{name}'")
        body = fn()
        text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    new = splice(text)
    if "--check" in argv:
        if new != text:
            print("docs/language.md is out of date: run python -m ppl.langdoc", file=sys.stderr)
            return 1
        return 0
    if new != text:
        with open(DOC, "w", encoding="utf-8") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
