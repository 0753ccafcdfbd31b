"""Hints for habits from elsewhere (ppl/frontend/hints.py, ppl/data.py's sniffing).

The located messages themselves are golden cases (tests/golden/models/hint_*.ppl,
tests/golden/data/{semicolon,tab,utf16,binary,excel,gzip,...}.args).  Here: the
variance warnings against goldens in tests/golden/warnings/ (NAME.ppl -> NAME.warn,
the rendered warnings, empty when there are none; `PPL_REGOLD=1` rewrites them),
and the cases where a hint must *not* fire.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import ppl
from ppl import data as D
from ppl.errors import PplError, Source
from ppl.frontend import hints
from ppl.frontend.parse import parse

from conftest import MODELS, REFERENCE, reference_names

GOLDEN = Path(__file__).parent / "golden"
WARN_CASES = sorted(GOLDEN.glob("warnings/*.ppl"))
REGOLD = os.environ.get("PPL_REGOLD") == "1"


def syntax_error(text: str) -> str:
    with pytest.raises(PplError) as ei:
        parse(Source("m.ppl", text))
    (d,) = ei.value.diagnostics
    return d.render()


def warnings_of(text: str):
    return [w.message for w in hints.warnings(parse(Source("m.ppl", text)))]


# ---- variance warnings ------------------------------------------------------------------
@pytest.mark.parametrize("path", WARN_CASES, ids=[p.stem for p in WARN_CASES])
def test_variance_warnings_golden(path, monkeypatch):
    monkeypatch.chdir(GOLDEN)
    model = ppl.load(str(path.relative_to(GOLDEN))).check()       # a checked model (symbolic sizes)
    out = "".join(w.render() + "\n" for w in hints.warnings(model))
    assert out == "".join(w.render() + "\n" for w in hints.warnings(model.program))   # Model or Program
    expected = path.with_suffix(".warn")
    if REGOLD or not expected.exists():
        expected.write_text(out)
        if not REGOLD:
            pytest.fail(f"wrote a new golden file {expected}; review it and rerun")
        return
    assert out == expected.read_text()


def test_warning_renders_like_an_error_but_says_warning():
    (w,) = hints.warnings(parse(Source("m.ppl", "s2 ~ inv_gamma(1, 1)\nx ~ normal(0, s2)\n")))
    assert w.render().splitlines() == [
        "m.ppl:2:15: warning: normal takes an sd; 's2' looks like a variance: write normal(0, sqrt(s2))",
        "    2 | x ~ normal(0, s2)",
        "      |               ^^"]
    assert not warnings_of("v ~ inv_gamma(1, 1)\nx ~ normal(0, v)\n")     # 'v' alone says nothing


@pytest.mark.parametrize("text", [
    "sigma2 ~ inv_gamma(1, 1)\nx ~ normal(sigma2, 1)\n",                 # a location, not a scale
    "sigma2 ~ inv_gamma(1, 1)\nx ~ normal(0, sqrt(sigma2))\n",           # already an sd
    "sigma1 ~ half_normal(1)\nsigma2 ~ half_normal(1)\nx ~ normal(0, sigma2)\n",   # a numbering
    "var ~ gamma(2, 2)\nx ~ gamma(var, 1)\n",                            # gamma has no scale parameter
    "s ~ half_normal(1)\nx ~ normal(0, s^3)\n",
    "L: cholesky_factor_corr[2, 2] ~ lkj_corr_cholesky(2)\nx ~ multi_normal_cholesky([0, 0], L)\n",
    "variable ~ half_normal(1)\nx ~ normal(0, variable)\n",
])
def test_no_variance_warning(text):
    assert warnings_of(text) == []


@pytest.mark.parametrize("name", ["sigma2", "sigma_sq", "sigmasq", "sigma_squared", "s2", "tau2", "tau_sq",
                                  "var", "variance", "var_y", "y_var", "sigma_y_sq", "sd2", "Sigma2"])
def test_variance_names(name):
    (msg,) = warnings_of(f"{name} ~ inv_gamma(1, 1)\nx ~ normal(0, {name})\n")
    assert msg == f"normal takes an sd; '{name}' looks like a variance: write normal(0, sqrt({name}))"


def test_scale_parameters_of_other_families():
    (m1,) = warnings_of("v2 = 1\ns2 ~ inv_gamma(1, 1)\nx ~ cauchy(0, s2)\n")
    assert m1.startswith("cauchy takes a scale;")
    (m2,) = warnings_of("s2 ~ inv_gamma(1, 1)\nx ~ half_normal(s2)\n")
    assert m2 == "half_normal takes an sd; 's2' looks like a variance: write half_normal(sqrt(s2))"


def test_shipped_and_reference_models_have_no_warnings():
    paths = sorted(MODELS.glob("*.ppl")) + [REFERENCE / n / "model.ppl" for n in reference_names()]
    assert paths
    for p in paths:
        assert hints.warnings(ppl.load(str(p)).program) == [], p


# ---- syntax hints: where they must not fire --------------------------------------------------
def test_hint_replaces_the_generic_message_only_for_the_habit():
    assert "expected '(' or an operator" in syntax_error("a ~ normal(0, 1)\nx = a | b\n")   # no lpdf call
    assert "drop the ';'" in syntax_error("mu ~ normal(0, 1);\n")
    # `a <- 1` is a comparison with -1, which parses
    parse(Source("m.ppl", "a ~ normal(0, 1)\nc = a <- 1\n"))


def test_an_unclosed_bracket_wins_over_a_block_hint():
    out = syntax_error("mu ~ normal(0, 1\nmodel {\n")
    assert "blocks" not in out and "inside the '(' opened at line 1" in out


def test_truncation_rewrites_both_bounds_and_dims():
    out = syntax_error("y[N] ~ normal(0, 1)T[, 10]\n")
    assert "`y: real<upper=10>[N] ~ normal(0, 1)`" in out
    out = syntax_error("p ~ normal(0.5, 1) T[0, 1];\n")
    assert "`p: real<lower=0, upper=1> ~ normal(0.5, 1)`" in out


def test_truncation_of_data_is_not_rewritten_as_a_bound():
    out = syntax_error("data y: real[N]\nmu ~ normal(0, 1)\ny ~ normal(mu, 1) T[0, 5]\n")
    assert "cannot truncate the density of data 'y'" in out and "lognormal" not in out


def test_keyword_arguments_name_the_signature():
    assert "in Stan's order: normal(mu, sigma)" in syntax_error("mu ~ Normal(mu=0, sigma=1)\n")
    assert "arguments are positional: rep(x, n)" in syntax_error("v = rep(x=1, n=3)\n")
    assert "drop 'k='" in syntax_error("v = foo(k=1)\n")
    # `=` inside the bounds of a type is fine
    parse(Source("m.ppl", "sigma: real<lower=0, upper=10> ~ normal(0, 1)\n"))


def test_target_and_bar_rewrite_only_plain_cases():
    assert "`y ~ poisson(lam)`" in syntax_error("target += poisson_lpmf(y | lam);\n")
    out = syntax_error("target += normal_lpdf(y[n] | mu, 1)\n")          # an indexed value: the generic form
    assert "write each density term with '~'" in out
    out = syntax_error("target += foo_lpdf(y | mu)\n")                      # not a ppl distribution
    assert "write each density term with '~'" in out


def test_stan_declarations():
    assert "`mu: real` for a latent, `data mu: real` for data" in syntax_error("real mu;\n")
    assert "`data N: int<lower=0>` for data" in syntax_error("int<lower=0> N;\n")
    assert "`z: real[J, K]` for a latent" in syntax_error("array[J] vector[K] z;\n")
    assert "`data S: real[K, K]` for data" in syntax_error("cov_matrix[K] S;\n")
    assert "`L: cholesky_factor_corr[K, K]` for a latent" in syntax_error("cholesky_factor_corr[K] L;\n")


def test_hints_through_the_api():
    with pytest.raises(PplError) as ei:
        ppl.loads("mu ~ normal(0, 1);\n", "m.ppl")
    assert "drop the ';'" in str(ei.value)


# ---- data files ----------------------------------------------------------------------
MODEL = "data x: real[N]\ndata y: real[N]\nmu ~ normal(0, 1)\ny ~ normal(mu + x, 1)\n"


def data_error(tmp_path, name: str, content: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(PplError) as ei:
        ppl.loads(MODEL, "m.ppl").check(str(p))
    (d,) = ei.value.diagnostics
    return d.render()


@pytest.mark.parametrize("content", [
    b"x,y\n1.5,2\n2.5,3\n",                              # plain
    b'x,y,label\n1.5,2,"a;b"\n2.5,3,"c;d"\n',             # ';' inside a quoted field
    b"x,y,note\n1.5,2,a;b\n2.5,3,c\td\n",                 # separators inside fields of a ',' file
    b"\xef\xbb\xbfx,y\n1.5,2\n",                          # a BOM
    b"x,y\n1.5,2\n2.5,3\n" + b"\n" * 10000,               # many blank lines
])
def test_ordinary_csv_is_not_flagged(tmp_path, content):
    p = tmp_path / "d.csv"
    p.write_bytes(content)
    ppl.loads(MODEL, "m.ppl").check(str(p))


def test_single_stray_bytes_keep_their_located_messages(tmp_path):
    assert "a NUL byte in a text data file" in data_error(tmp_path, "d.csv", b"x,y\n1.5,2\x00\n")
    assert "byte 0xe9 is not UTF-8 text" in data_error(tmp_path, "d.csv", b"x,y\n1.5,2\xe9\n")


def test_binary_messages_never_show_the_bytes(tmp_path):
    blob = bytes(range(256)) * 4
    out = data_error(tmp_path, "d.csv", blob)
    assert out == f"{tmp_path / 'd.csv'}: error: this is not a text file; ppl reads CSV or JSON text"
    out = data_error(tmp_path, "d.json", b"PK\x03\x04" + b"\x00" * 26 + b"xl/workbook.xml" + blob)
    assert "Excel workbook" in out and "\n" not in out


def test_json_is_not_checked_for_separators(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('{"x": [1.5, 2.5], "y": [1, 2]}')
    ppl.loads(MODEL, "m.ppl").check(str(p))


def test_semicolon_detection_reads_only_the_head(tmp_path):
    """A large ';' file is refused at once (before numpy's parser or the careful reader see it);
    a large ordinary CSV still takes the fast path."""
    rows = "".join(f"{i % 7},{i % 3}5;{i % 11},25\n" for i in range(200_000))
    p = tmp_path / "big.csv"
    p.write_text("x;y\n" + rows)
    assert p.stat().st_size > D.FAST_CSV_BYTES
    t0 = time.perf_counter()
    with pytest.raises(PplError) as ei:
        ppl.loads(MODEL, "m.ppl").check(str(p))
    assert time.perf_counter() - t0 < 1.0
    assert "';'-separated with decimal commas" in str(ei.value) and ":2:1:" in str(ei.value)
    ok = tmp_path / "ok.csv"
    ok.write_text("x,y\n" + "".join(f"{i % 7}.5,{i % 3}.25\n" for i in range(200_000)))
    assert D._read(str(ok)).stream is not None


# ---- robustness: a hint never raises ------------------------------------------------------
from hypothesis import given, settings                      # noqa: E402
from hypothesis import strategies as st                     # noqa: E402

PIECES = ["target", "+=", "normal_lpdf", "(", ")", "[", "]", "|", ";", "<-", "<", "-", "T", "~", "=", ",", " ",
          "{", "}", "data", "model", "real", "array", "vector", "for", "in", "mu", "sigma", "0", "1", "\t", "#",
          "transformed", "generated quantities", "int", "cov_matrix", ":", "y", "x"]


@settings(max_examples=int(os.environ.get("PPL_FUZZ_EXAMPLES", "300")), deadline=None, database=None)
@given(st.lists(st.sampled_from(PIECES), max_size=14), st.integers(0, 40),
       st.lists(st.tuples(st.sampled_from("([<"), st.integers(1, 3), st.integers(1, 40)), max_size=3))
def test_syntax_hint_never_raises(pieces, col, brackets):
    text = "".join(pieces)
    src = Source("m.ppl", "data y: real[N]\n" + text + "\n" + text + "\n")
    for line in (1, 2, 3):
        h = hints.syntax_hint(src, line, col, brackets)
        if h is not None:
            c, end, msg = h
            assert 1 <= c < end and msg


@settings(max_examples=int(os.environ.get("PPL_FUZZ_EXAMPLES", "300")), deadline=None, database=None)
@given(st.binary(max_size=300), st.sampled_from([".csv", ".json", ".tsv", ""]))
def test_sniff_never_raises_anything_but_a_located_error(tmp_path_factory, blob, ext):
    p = tmp_path_factory.mktemp("sniff") / f"d{ext}"
    p.write_bytes(blob)
    try:
        D._sniff(str(p), ext)
    except PplError as e:
        (d,) = e.diagnostics
        assert d.render().startswith(str(p) + ":")


def test_the_variance_warning_reaches_check_and_fit(tmp_path, capsys):
    from ppl.cli import main
    (tmp_path / "v.ppl").write_text("data y: real[N]\nmu ~ normal(0, 1)\nsigma2 ~ gamma(2, 2)\ny ~ normal(mu, sigma2)\n")
    (tmp_path / "v.csv").write_text("y\n1\n2\n0.5\n")
    for argv in (["check"], ["fit", "--steps", "50", "--draws", "50"]):
        assert main([argv[0], str(tmp_path / "v.ppl"), str(tmp_path / "v.csv"), *argv[1:]]) == 0
        err = capsys.readouterr().err
        assert "4:16: warning: normal takes an sd; 'sigma2' looks like a variance" in err, err
