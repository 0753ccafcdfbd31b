"""Parse: model text -> AST (frozen dataclasses with spans). DESIGN §1."""
from __future__ import annotations

import dataclasses

import pytest

from ppl.errors import PplError, Source
from ppl.frontend import ast as A
from ppl.frontend.parse import decode, parse, parse_file

from conftest import MODEL_NAMES, MODELS, REFERENCE, reference_names


def prog(text: str) -> A.Program:
    return parse(Source("m.ppl", text))


def stmt(text: str):
    p = prog(text)
    assert len(p.statements) == 1
    return p.statements[0]


def expr(text: str) -> A.Expr:
    s = stmt(f"v = {text}\n")
    assert isinstance(s, A.Assign)
    return s.expr


def sx(e) -> object:
    """An expression as a nested tuple (no spans), for structural comparison."""
    if isinstance(e, A.Num):
        return e.value
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.BinOp):
        return (e.op, sx(e.left), sx(e.right))
    if isinstance(e, A.Neg):
        return ("neg", sx(e.operand))
    if isinstance(e, A.Call):
        return ("call", e.func) + tuple(sx(a) for a in e.args)
    if isinstance(e, A.Index):
        return ("index", sx(e.base)) + tuple(sx(i) for i in e.indices)
    if isinstance(e, A.Vector):
        return ("vec",) + tuple(sx(i) for i in e.items)
    raise AssertionError(e)


def syntax_error(text: str):
    with pytest.raises(PplError) as ei:
        prog(text)
    (d,) = ei.value.diagnostics          # only the first syntax error is reported
    return d


# ---- statements -----------------------------------------------------------------
def test_data_decl_plain():
    s = stmt("data y: real[J]\n")
    assert isinstance(s, A.DataDecl)
    assert s.name == "y" and s.pattern is None
    assert s.type.base == "real" and s.type.bounds == () and s.type.levels is None
    assert [d.value for d in s.type.dims] == ["J"]


def test_data_decl_bounds_and_two_dims():
    s = stmt("data y: int<lower=0, upper=1>[N, 3]\n")
    assert s.type.base == "int"
    assert [(b.key, sx(b.value)) for b in s.type.bounds] == [("lower", 0), ("upper", 1)]
    assert [d.value for d in s.type.dims] == ["N", 3]
    assert isinstance(s.type.dims[1].value, int)


def test_data_decl_negative_and_real_bounds():
    s = stmt("data x: real<lower=-1.5, upper=2e3>[N]\n")
    lo, hi = s.type.bounds
    assert sx(lo.value) == ("neg", 1.5)
    assert hi.value.value == 2000.0 and hi.value.is_int is False


def test_data_decl_scalar_without_dims():
    s = stmt("data n: int\n")
    assert s.type.base == "int" and s.type.dims == ()


def test_data_decl_level():
    s = stmt("data county: level[N] of K\n")
    assert s.type.base == "level"
    assert [d.value for d in s.type.dims] == ["N"]
    assert s.type.levels.value == "K"


def test_data_decl_level_needs_a_name_after_of():
    # `of` takes a size name (K is bound by the data), not a number
    d = syntax_error("data g: level[N] of 4\n")
    assert d.span.line == 1 and d.span.col == 21


def test_data_decl_from_pattern():
    s = stmt('data X: real[N, D] from "x*"\n')
    assert s.pattern == "x*"
    assert [d.value for d in s.type.dims] == ["N", "D"]


def test_sample_with_dims():
    s = stmt("theta_raw[J] ~ normal(0, 1)\n")
    assert isinstance(s, A.Sample)
    assert s.name == "theta_raw" and s.type is None
    assert [d.value for d in s.dims] == ["J"]
    assert sx(s.dist) == ("call", "normal", 0, 1)


def test_sample_scalar():
    s = stmt("tau ~ half_cauchy(5)\n")
    assert s.dims == () and s.type is None
    assert s.dist.func == "half_cauchy"


def test_typed_sample():
    s = stmt("mu: ordered[K] ~ normal(0, 10)\n")
    assert isinstance(s, A.Sample)
    assert s.type.base == "ordered"
    assert [d.value for d in s.type.dims] == ["K"]
    assert [d.value for d in s.dims] == ["K"]       # dims come from the type
    assert sx(s.dist) == ("call", "normal", 0, 10)


def test_typed_sample_with_bounds():
    s = stmt("sigma: real<lower=0> ~ normal(0, 1)\n")
    assert s.type.base == "real" and s.dims == ()
    assert [(b.key, sx(b.value)) for b in s.type.bounds] == [("lower", 0)]


def test_flat_latents():
    p = prog("beta: real[4]\nsigma: real<lower=0>\n")
    b, s = p.statements
    assert isinstance(b, A.FlatDecl) and isinstance(s, A.FlatDecl)
    assert b.name == "beta" and [d.value for d in b.type.dims] == [4]
    assert s.name == "sigma" and s.type.dims == () and s.type.bounds[0].key == "lower"


def test_assign():
    s = stmt("theta = mu + tau * theta_raw\n")
    assert isinstance(s, A.Assign) and s.name == "theta"
    assert sx(s.expr) == ("+", "mu", ("*", "tau", "theta_raw"))


def test_comments_and_blank_lines():
    p = prog("# header\n\n\ndata y: real[N]   # trailing\n# between\nmu ~ normal(0, 1) # c\n# no newline at end")
    assert [type(s).__name__ for s in p.statements] == ["DataDecl", "Sample"]
    assert p.statements[1].span.line == 6


def test_empty_and_comment_only_programs_parse_to_nothing():
    assert prog("").statements == ()
    assert prog("# nothing\n\n").statements == ()


def test_continuation_inside_parentheses():
    p = prog("log_weight ~ normal(beta[1] + beta[2] * x\n                    + beta[3] * z, sigma)\nb ~ normal(0, 1)\n")
    s, b = p.statements
    mu = s.dist.args[0]
    assert sx(mu) == ("+", ("+", ("index", "beta", 1), ("*", ("index", "beta", 2), "x")),
                      ("*", ("index", "beta", 3), "z"))
    assert s.dist.args[1].span.line == 2
    assert b.span.line == 3


def test_continuation_inside_brackets_and_type_bounds():
    p = prog("v = [1,\n  2,\n  3]\nx: real<lower=0,\n   upper=1> ~ beta(2, 2)\n")
    v, x = p.statements
    assert sx(v.expr) == ("vec", 1, 2, 3)
    assert [b.key for b in x.type.bounds] == ["lower", "upper"]


def test_newline_outside_brackets_ends_statement():
    d = syntax_error("v = a +\n b\n")
    assert d.span.line == 1
    assert "end of line" in d.message


def test_all_design_models_parse():
    for name in MODEL_NAMES:
        p = parse_file(str(MODELS / f"{name}.ppl"))
        assert p.statements, name
        assert p.path.endswith(f"{name}.ppl")


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="no ../shared/reference")
def test_all_reference_models_parse():
    names = reference_names()
    assert len(names) >= 1
    for name in names:
        assert parse_file(str(REFERENCE / name / "model.ppl")).statements


def test_eight_schools_statement_kinds():
    p = parse_file(str(MODELS / "eight_schools.ppl"))
    got = [(type(s).__name__, s.name) for s in p.statements]
    assert got == [("DataDecl", "y"), ("DataDecl", "sigma"), ("Sample", "mu"), ("Sample", "tau"),
                   ("Sample", "theta_raw"), ("Assign", "theta"), ("Sample", "y")]


# ---- expressions and precedence ---------------------------------------------------------
@pytest.mark.parametrize("text, tree", [
    ("-x^2", ("neg", ("^", "x", 2))),
    ("-2^2", ("neg", ("^", 2, 2))),
    ("a + b * c", ("+", "a", ("*", "b", "c"))),
    ("a * b + c", ("+", ("*", "a", "b"), "c")),
    ("(a + b) * c", ("*", ("+", "a", "b"), "c")),
    ("a - b - c", ("-", ("-", "a", "b"), "c")),
    ("a / b / c", ("/", ("/", "a", "b"), "c")),
    ("2 ^ 3 ^ 2", ("^", 2, ("^", 3, 2))),          # right-associative
    ("x ^ -1", ("^", "x", ("neg", 1))),
    ("a * -b", ("*", "a", ("neg", "b"))),
    ("- -a", ("neg", ("neg", "a"))),
    ("alpha + X @ beta", ("+", "alpha", ("@", "X", "beta"))),
    ("X @ b * c", ("*", ("@", "X", "b"), "c")),      # @ binds like *
    ("a + b < c * d", ("<", ("+", "a", "b"), ("*", "c", "d"))),
    ("a == b", ("==", "a", "b")),
    ("a != b", ("!=", "a", "b")),
    ("a <= b", ("<=", "a", "b")),
    ("a >= b", (">=", "a", "b")),
    ("a < b", ("<", "a", "b")),
    ("a > b", (">", "a", "b")),
    ("3 > 2", (">", 3, 2)),
    ("(a > b) * 2", ("*", (">", "a", "b"), 2)),
    ("f(a > 0, b)", ("call", "f", (">", "a", 0), "b")),
    ("[a > 0, b < 1]", ("vec", (">", "a", 0), ("<", "b", 1))),
    ("[1, 2.5, mu + 1]", ("vec", 1, 2.5, ("+", "mu", 1))),
    ("[theta, 1 - theta]", ("vec", "theta", ("-", 1, "theta"))),
    ("theta[1]", ("index", "theta", 1)),
    ("L[2, 1]", ("index", "L", 2, 1)),
    ("a[county]", ("index", "a", "county")),
    ("mu[z] + sigma[z]", ("+", ("index", "mu", "z"), ("index", "sigma", "z"))),
    ("x[i][j]", ("index", ("index", "x", "i"), "j")),
    ("-a[1]", ("neg", ("index", "a", 1))),
    ("a[1]^2", ("^", ("index", "a", 1), 2)),
    ("exp(x)", ("call", "exp", "x")),
    ("log(exposure) + a", ("+", ("call", "log", "exposure"), "a")),
    ("rep(0, K)", ("call", "rep", 0, "K")),
    ("ones(K)", ("call", "ones", "K")),
    ("f()", ("call", "f")),
    ("sum(exp(x))", ("call", "sum", ("call", "exp", "x"))),
    ("1.5e-3", 0.0015),
    (".5", 0.5),
    ("3.", 3.0),
])
def test_expression_trees(text, tree):
    assert sx(expr(text)) == tree


def test_number_literals_keep_intness():
    assert expr("3").is_int is True and expr("3").value == 3
    assert expr("3.0").is_int is False and expr("3.0").value == 3.0
    assert expr("1e2").is_int is False and expr("1e2").value == 100.0


# ---- spans -----------------------------------------------------------------------
def test_spans_of_statement_and_name():
    p = prog("data y: real[J]\n\n  mu ~ normal(0, 5)\n")
    d, s = p.statements
    assert (d.span.line, d.span.col) == (1, 1)
    assert (d.name_span.line, d.name_span.col, d.name_span.end_col) == (1, 6, 7)
    assert (s.span.line, s.span.col) == (3, 3)
    assert (s.name_span.col, s.name_span.end_col) == (3, 5)
    assert (s.dist.span.line, s.dist.span.col) == (3, 8)
    assert (s.dist.func_span.col, s.dist.func_span.end_col) == (8, 14)
    assert s.span.path == "m.ppl"


def test_spans_of_expression_nodes():
    src = "log_radon ~ normal(a[county] + b * floo, sigma_y)\n"
    s = stmt(src)
    plus = s.dist.args[0]
    assert isinstance(plus, A.BinOp) and plus.op == "+"
    assert (plus.span.col, plus.span.end_col) == (20, 40)
    floo = plus.right.right
    assert floo.id == "floo"
    assert (floo.span.line, floo.span.col, floo.span.end_col) == (1, 36, 40)   # DESIGN §4's caret
    idx = plus.left
    assert isinstance(idx, A.Index) and (idx.span.col, idx.span.end_col) == (20, 29)
    assert (idx.indices[0].span.col, idx.indices[0].span.end_col) == (22, 28)


def test_spans_of_types_dims_and_bounds():
    s = stmt("data sigma: real<lower=0>[J]\n")
    assert (s.type.span.col) == 13
    assert (s.type.bounds[0].span.col, s.type.bounds[0].value.span.col) == (18, 24)
    assert (s.type.dims[0].span.col, s.type.dims[0].span.end_col) == (27, 28)


def test_span_of_multiline_statement():
    s = stmt("y ~ normal(a +\n  b, 1)\n")
    assert (s.span.line, s.span.end_line) == (1, 2)
    assert s.dist.args[0].right.span.line == 2


# ---- AST nodes are frozen dataclasses ----------------------------------------------
def test_ast_nodes_are_frozen_dataclasses():
    p = prog("data y: real[J]\nmu ~ normal(0, 5)\nt = -mu^2 + [mu, 1][1]\nb: real[2]\n")
    seen = set()

    def visit(node):
        if isinstance(node, tuple):
            for n in node:
                visit(n)
            return
        if not dataclasses.is_dataclass(node):
            return
        if type(node).__module__ != A.__name__:
            return
        seen.add(type(node).__name__)
        assert type(node).__dataclass_params__.frozen, type(node).__name__
        for f in dataclasses.fields(node):
            visit(getattr(node, f.name))
    visit(p)
    assert {"Program", "DataDecl", "Sample", "Assign", "FlatDecl", "TypeSpec", "Dim", "Call", "Num",
            "Name", "BinOp", "Neg", "Index", "Vector"} <= seen
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.statements[1].name = "nu"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.statements[2].expr.op = "*"


def test_ast_nodes_have_spans():
    p = prog("mu ~ normal(0, 5)\nt = exp(-mu) + [1, 2][1]\n")
    for s in p.statements:
        for e in A.walk(s.expr if isinstance(s, A.Assign) else s.dist):
            assert e.span.line >= 1 and e.span.col >= 1


# ---- syntax errors -------------------------------------------------------------------
def test_syntax_error_is_located():
    d = syntax_error("mu ~ normal(0, 5)\ny ~ normal(mu,, 1)\n")
    assert (d.span.line, d.span.col) == (2, 15)
    assert "unexpected ','" in d.message
    assert d.render().startswith("m.ppl:2:15: error:")
    assert "    2 | y ~ normal(mu,, 1)" in d.render()


def test_only_first_syntax_error_is_reported():
    with pytest.raises(PplError) as ei:
        prog("a ~ normal(0,,1)\nb ~ normal(0,,1)\n")
    assert len(ei.value.diagnostics) == 1
    assert ei.value.diagnostics[0].span.line == 1


def test_unclosed_bracket_reaches_end_of_file():
    d = syntax_error("mu ~ normal(0, 5\n")
    assert "end of file" in d.message


def test_bad_character():
    d = syntax_error("mu ~ normal(0, 5) $\n")
    assert (d.span.line, d.span.col) == (1, 19)
    assert "'$'" in d.message


def test_fractional_dimension_is_an_error():
    d = syntax_error("b[2.5] ~ normal(0, 1)\n")
    assert "whole number" in d.message


def test_decode_rejects_bad_utf8_and_strips_bom():
    with pytest.raises(PplError) as ei:
        decode(b"mu ~ normal(0, 1)\n\xff\n", "m.ppl")
    d = ei.value.diagnostics[0]
    assert d.span.line == 2 and "0xff" in d.message
    assert decode("\ufeffmu ~ normal(0, 1)\n".encode(), "m.ppl").text.startswith("mu")


def test_parse_file_missing():
    with pytest.raises(PplError) as ei:
        parse_file("/nonexistent/model.ppl")
    assert "cannot read model file" in ei.value.render()
    assert "/nonexistent/model.ppl" in ei.value.render()


def test_crlf_line_endings():
    p = prog("data y: real[N]\r\nmu ~ normal(0,\r\n  1)\r\ny ~ normal(mu, 1)\r\n")
    assert [type(s).__name__ for s in p.statements] == ["DataDecl", "Sample", "Sample"]
    assert p.statements[2].span.line == 4
    d = syntax_error("mu ~ normal(0, 1)\r\ny ~ normal(mu,, 1)\r\n")
    assert (d.span.line, d.span.col) == (2, 15)
    assert "\r" not in d.render()
