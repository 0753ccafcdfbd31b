"""Property tests: no input crashes or hangs the front end.

Random token sequences, random edits of valid models, random bytes, and random
small CSV / JSON files (against a fixed model) go through the API.  Each call
must either succeed or raise `PplError` whose every diagnostic renders with a
``path:line:col:`` prefix (or, for a whole-file data fault, a ``path:``
prefix).  Any other exception fails the test; so does an example that takes
longer than its deadline (a hang is cut off by an alarm).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ppl
from ppl.errors import PplError, UsageError
from ppl.frontend.parse import decode, parse

ROOT = Path(__file__).resolve().parent.parent
MODEL_TEXTS = [p.read_text() for p in sorted((ROOT / "models").glob("*.ppl"))]

FUZZ = settings(max_examples=int(os.environ.get("PPL_FUZZ_EXAMPLES", "300")), deadline=1500, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

HEAD = re.compile(r"^(?P<path>[^\s:][^:]*?)(?::(?P<line>\d+):(?P<col>\d+))?: error: ")


@contextlib.contextmanager
def _no_hang(seconds: float = 10.0):
    """Fail (instead of hanging the run) if the body takes too long."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"no answer in {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _assert_located(err: PplError, paths, text_lines: int | None = None, need_line: bool = True):
    """Every diagnostic names one of `paths`; model diagnostics carry line:col in range."""
    assert err.diagnostics, "a PplError without a message"
    for d in err.diagnostics:
        out = d.render()
        assert "Traceback" not in out and "internal error" not in out, out
        m = HEAD.match(out)
        assert m, f"not a 'path[:line:col]: error:' message: {out!r}"
        assert m.group("path") in paths, f"unexpected path {m.group('path')!r} in {out!r}"
        if m.group("line") is None:
            assert not (need_line and m.group("path") == "fuzz.ppl"), f"a model error without line:col: {out!r}"
            continue
        line, col = int(m.group("line")), int(m.group("col"))
        assert line >= 1 and col >= 1, out
        if text_lines is not None and m.group("path") == "fuzz.ppl":
            assert line <= text_lines + 1, f"line {line} past the end ({text_lines} lines): {out!r}"
        if len(out.splitlines()) > 1:
            assert len(out.splitlines()) == 3 and "^" in out.splitlines()[2], out


DATA = {"N": 3, "K": 2, "J": 2, "y": [0.5, 1.5, 2.0], "x": [1, 2, 3], "z": [1, 2, 1], "w": 2,
        "theta": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "a": [0.1, 0.2, 0.3], "b": 1.5}


def _check_text(text: str):
    """Parse and check model text; only PplError (located) may come out."""
    nlines = text.count("\n") + 1
    with _no_hang():
        try:
            m = ppl.loads(text, path="fuzz.ppl")
        except PplError as e:
            _assert_located(e, {"fuzz.ppl"}, nlines)
            return
        for data in (None, DATA):
            try:
                m.check(data)
            except PplError as e:
                _assert_located(e, {"fuzz.ppl", "<data 1>"}, nlines)


# ---- (a) random token sequences ------------------------------------------------
NAMES = ["mu", "sigma", "theta", "y", "x", "N", "K", "J", "a", "b", "z", "w", "_", "x1"]
KEYWORDS = ["data", "from", "of", "level", "real", "int", "positive", "ordered", "simplex",
            "cholesky_factor_corr", "lower", "upper"]
CALLABLES = ["normal", "half_normal", "gamma", "beta", "dirichlet", "categorical", "poisson", "bernoulli_logit",
             "multi_normal", "lkj_corr_cholesky", "uniform", "exp", "log", "sum", "ones", "rep", "softmax", "dot",
             "cumsum", "zeros", "__import__", "eval", "exec", "open", "getattr"]
NUMBERS = ["0", "1", "2", "3", "2.5", "-1", ".5", "1e3", "1e400", "0.0", "10", "007", "1.", "4e-2"]
PUNCT = ["+", "-", "*", "/", "^", "@", "==", "!=", "<", "<=", ">", ">=", "(", ")", "[", "]", ",", "~", "=",
         ":", "\n", "\n", "\n", '"x*"', "# c\n", ".", "$", "\\\n", "\t", "\"", "μ"]
TOKEN = st.sampled_from(NAMES + KEYWORDS + CALLABLES + NUMBERS + PUNCT)
SEP = st.sampled_from([" ", " ", "", "\n"])


@st.composite
def token_models(draw):
    toks = draw(st.lists(st.tuples(TOKEN, SEP), max_size=40))
    return "".join(t + s for t, s in toks)


# a statement-shaped generator (well-formed expressions), so the checker and
# the data binding, not just the parser, are exercised
FUNCS1 = ["exp", "log", "sqrt", "sum", "mean", "softmax", "cumsum", "inv_logit", "abs", "ones", "zeros", "sd"]
FUNCS2 = ["dot", "rep", "log"]
DISTS = {"normal": 2, "half_normal": 1, "gamma": 2, "beta": 2, "dirichlet": 1, "categorical": 1, "poisson": 1,
         "bernoulli_logit": 1, "multi_normal": 2, "lkj_corr_cholesky": 1, "uniform": 2, "student_t": 3,
         "exponential": 1, "binomial": 2, "categorical_logit": 1, "neg_binomial_2": 2, "lognormal": 2}


@functools.lru_cache(maxsize=None)
def _exprs(names: tuple):
    names = list(names)

    def extend(inner):
        return st.one_of(
            st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "^", "@", "<", "=="]), inner)
            .map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
            inner.map(lambda e: f"-{e}"),
            inner.map(lambda e: f"({e})"),
            st.tuples(st.sampled_from(FUNCS1), inner).map(lambda t: f"{t[0]}({t[1]})"),
            st.tuples(st.sampled_from(FUNCS2), inner, inner).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
            st.tuples(inner, st.lists(st.sampled_from(["1", "2", "0", "4"] + names), min_size=1, max_size=2))
            .map(lambda t: f"{t[0]}[{', '.join(t[1])}]"),
            st.lists(inner, min_size=1, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        )
    return st.recursive(st.sampled_from(names + NUMBERS), extend, max_leaves=5)


DIMS = st.sampled_from(["", "", "", "[N]", "[K]", "[3]", "[0]", "[N, K]", "[2, 2]", "[J]"])
TYPES = st.sampled_from(["real", "real", "real", "int", "positive", "ordered", "simplex", "real<lower=0>",
                         "real<lower=1, upper=0>", "int<lower=0>", "real<lower=-1, upper=mu>", "rael",
                         "cholesky_factor_corr", "int<upper=1>"])


@st.composite
def statement_models(draw):
    """Statements in order, each using names defined before it (mostly)."""
    lines, defined = [], ["N", "K"]
    for name in draw(st.permutations(NAMES[:10]))[: draw(st.integers(1, 6))]:
        expr = _exprs(tuple(defined + ["y"]))
        dims, typ = draw(DIMS), draw(TYPES)
        dist = draw(st.sampled_from(sorted(DISTS)))
        nargs = DISTS[dist] if draw(st.integers(0, 9)) else draw(st.integers(0, 3))
        call = f"{dist}({', '.join(draw(st.lists(expr, min_size=nargs, max_size=nargs)))})"
        kind = draw(st.integers(0, 6))
        if kind == 0:
            lines.append(f"data {name}: {typ}{dims}")
        elif kind in (1, 2):
            lines.append(f"{name}{dims} ~ {call}")
        elif kind == 3:
            lines.append(f"{name}: {typ}{dims} ~ {call}")
        elif kind == 4:
            lines.append(f"{name} = {draw(expr)}")
        elif kind == 5:
            lines.append(f"{name}: {typ}{dims}")
        else:
            lines.append(f"data {name}: level[N] of K")
        defined.append(name)
        if draw(st.integers(0, 4)) == 0:       # an observation of something defined
            lines.append(f"{draw(st.sampled_from(defined))} ~ {call}")
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\n\n"]))


@st.composite
def edited_models(draw):
    """A valid example model with a few random character edits."""
    text = draw(st.sampled_from(MODEL_TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.integers(0, 2))
        ch = draw(st.sampled_from(list("()[]<>,~=:+-*/^@.\"#\n 0123456789abcxyzNK_\t\0") + ["é"]))
        if op == 0:
            text = text[:i] + ch + text[i:]
        elif op == 1:
            text = text[:i] + text[i + 1:]
        else:
            text = text[:i] + ch + text[i + 1:]
    return text


@FUZZ
@given(token_models())
def test_random_tokens(text):
    _check_text(text)


@FUZZ
@given(statement_models())
def test_random_statements(text):
    _check_text(text)


@FUZZ
@given(edited_models())
def test_edited_models(text):
    _check_text(text)


# ---- (b) random bytes ---------------------------------------------------------
LANG_BYTES = st.lists(st.sampled_from([t.encode() for t in NAMES + CALLABLES + NUMBERS + PUNCT]
                                      + [b"\xff", b"\x00", b"\xc3", b"\xe2\x80\xa8", b"\r", b"\x0c", b"\x85"]),
                      max_size=40).map(b"".join)


@FUZZ
@given(st.one_of(st.binary(max_size=200), LANG_BYTES))
def test_random_bytes(raw):
    with _no_hang():
        try:
            parse(decode(raw, "fuzz.ppl"))
        except PplError as e:
            # line numbers count '\n' as the lexer does; the decoded text may be shorter
            _assert_located(e, {"fuzz.ppl"}, raw.count(b"\n") + 1)


# ---- (c) random data files against a fixed model ---------------------------
FIXED_MODEL = """\
data x: real[N]
data y: real<lower=0>[N]
data n: int<lower=0, upper=10>[N]
data g: level[N] of K
data X: real[N, D] from "c*"
a[K] ~ normal(0, 1)
b ~ normal(0, 1)
y ~ lognormal(a[g] + b * x, 1)
n ~ poisson_log(X @ rep(b, D))
"""
CELLS = ["1", "0", "2", "-1", "2.5", "1e3", "1e400", "nan", "NaN", "inf", "-inf", "", " ", "a", "b", "n/a",
         '"3"', '"a,b"', "0x10", "1_000", "١", "TRUE", "\t4", "5 ", "\"", "11"]
COLUMNS = ["x", "y", "n", "g", "c1", "c2", "N", "", "x", "é", "z"]


@st.composite
def csv_texts(draw):
    header = draw(st.lists(st.sampled_from(COLUMNS), min_size=0, max_size=7))
    rows = draw(st.lists(st.lists(st.sampled_from(CELLS), max_size=8), max_size=6))
    nl = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = nl.join([",".join(header)] + [",".join(r) for r in rows])
    if draw(st.booleans()):
        text += nl
    return text


JSON_SCALARS = st.one_of(st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from(["a", "b", "", "1"]), st.booleans(), st.none())
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                st.dictionaries(st.sampled_from(["a", "x"]), inner,
                                                                                max_size=2)),
                           max_leaves=12)


@st.composite
def json_texts(draw):
    obj = draw(st.one_of(st.dictionaries(st.sampled_from(["x", "y", "n", "g", "X", "N", "K", "D", "z"]),
                                         JSON_VALUES, max_size=7),
                         JSON_VALUES))
    text = json.dumps(obj)
    if draw(st.integers(0, 4)) == 0:      # sometimes broken JSON
        text = text[: draw(st.integers(0, len(text)))]
    return text


_TMP = tempfile.mkdtemp(prefix="ppl-fuzz-")
atexit.register(shutil.rmtree, _TMP, True)
_MODEL = ppl.loads(FIXED_MODEL, path="fixed.ppl")


def _check_data(text: str, name: str, sets=()):
    path = os.path.join(_TMP, name)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    with _no_hang():
        try:
            _MODEL.check(path, sets)
        except PplError as e:
            _assert_located(e, {path, "fixed.ppl", "--set"})
        except UsageError as e:
            assert str(e).startswith("--set "), e          # a malformed --set is a usage error (exit 2)


@FUZZ
@given(csv_texts(), st.lists(st.sampled_from(["N=3", "K=2", "D=2", "K=x", "N", "D=1.5", "x=1", "K=nan"]),
                             max_size=2))
def test_random_csv(text, sets):
    _check_data(text, "data.csv", sets)


@FUZZ
@given(json_texts())
def test_random_json(text):
    _check_data(text, "data.json")


@FUZZ
@given(st.binary(max_size=120))
def test_random_data_bytes(raw):
    path = os.path.join(_TMP, "raw.csv")
    with open(path, "wb") as f:
        f.write(raw)
    with _no_hang():
        try:
            _MODEL.check(path)
        except PplError as e:
            _assert_located(e, {path, "fixed.ppl"})


def test_fixed_model_accepts_good_data(tmp_path):
    """The fixed model is valid, so the fuzzing above reaches the data checks."""
    p = tmp_path / "ok.csv"
    p.write_text("x,y,n,g,c1,c2\n1,0.5,3,a,1,2\n2,1.5,0,b,3,4\n")
    m = _MODEL.check(str(p))
    assert m.dims == {"N": 2, "K": 2, "D": 2} or set(m.dims) >= {"N", "K", "D"}
