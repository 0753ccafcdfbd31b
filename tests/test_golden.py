"""Golden-file tests: malformed models and data files -> exact stderr and exit code.

Layout (everything under tests/golden/, which is the working directory of
every run, so paths in messages are short and stable):

- ``models/NAME.ppl``: one malformed model per file, one fault each (except
  ``multi_errors.ppl``).  Line 1 is a comment saying what is wrong; a leading
  comment line ``# args: ARG...`` gives the data arguments (files relative to
  tests/golden/, ``--set N=V``).  Expected output: ``models/NAME.err``.
- ``data/NAME.args``: one data case: the ``ppl check`` arguments after
  ``check`` (a valid model from ``data/models/``, the malformed data file(s),
  ``--set`` pairs).  Comment lines (``#``) say what is wrong.  Expected output:
  ``data/NAME.err``.

A ``.err`` file is the exact stderr of ``ppl check ...`` followed by a line
``# exit CODE`` (1, or 2 for a malformed ``--set``, which is a usage error).  Regenerate with ``PPL_REGOLD=1 pytest tests/test_golden.py``
and review the diff: every message must be located and helpful.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from ppl.cli import main

GOLDEN = Path(__file__).parent / "golden"
REGOLD = os.environ.get("PPL_REGOLD") == "1"

MODEL_CASES = sorted(GOLDEN.glob("models/*.ppl"))
DATA_CASES = sorted(GOLDEN.glob("data/*.args"))

HEAD = re.compile(r"^(?P<path>[^\s:][^:]*?)(?::(?P<line>\d+):(?P<col>\d+))?: error: (?P<msg>.+)$")
GUTTER = re.compile(r"^ *(?P<line>\d+) \| (?P<text>.*)$")
CARET = re.compile(r"^ +\| (?P<pad> *)(?P<carets>\^+)$")


def _model_args(path: Path) -> list:
    args = []
    for raw in path.read_bytes().splitlines():
        if not raw.startswith(b"#"):
            break
        line = raw.decode("utf-8", "replace")
        if line.startswith("# args:"):
            args += shlex.split(line[len("# args:"):])
    return args


def _data_args(path: Path) -> list:
    args = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            args += shlex.split(line)
    return args


def _run(argv, capsys, monkeypatch):
    monkeypatch.chdir(GOLDEN)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _diagnostics(err: str):
    """Split stderr into diagnostics: (head match, [following lines])."""
    out = []
    for line in err.splitlines():
        m = HEAD.match(line)
        if m:
            out.append((m, []))
        else:
            assert out, f"stderr does not start with a 'path: error:' line:\n{err}"
            out[-1][1].append(line)
    return out


def _assert_helpful(err: str, code: int, expect_paths):
    assert code == 1, f"exit code {code}, expected 1\n{err}"
    assert "Traceback" not in err and "internal error" not in err, err
    diags = _diagnostics(err)
    assert diags, "no message on stderr"
    for m, rest in diags:
        assert m.group("path") in expect_paths, f"message names {m.group('path')!r}, not one of {expect_paths}:\n{err}"
        if m.group("line") is None:
            continue              # a whole-file (or --set) fault: the path prefix is the location
        assert len(rest) == 2, f"a located message shows the line and a caret:\n{err}"
        g, c = GUTTER.match(rest[0]), CARET.match(rest[1])
        assert g and c, f"bad source/caret lines:\n{err}"
        assert int(g.group("line")) == int(m.group("line"))
        col, text, pad = int(m.group("col")), g.group("text"), len(c.group("pad"))
        if text.startswith("..."):    # a long line, shown as a window around the caret
            assert 3 <= pad < len(text), f"caret outside the quoted window:\n{err}"
        else:
            assert pad == col - 1, f"caret not under column {col}:\n{err}"
        assert pad + len(c.group("carets")) <= max(1, len(text) + 1), f"caret past the line:\n{err}"


def _compare(expected: Path, code: int, err: str):
    actual = err + f"# exit {code}\n"
    if REGOLD or not expected.exists():
        expected.write_text(actual)
        if not REGOLD:
            pytest.fail(f"wrote a new golden file {expected}; review it and rerun")
        return
    assert actual == expected.read_text()


@pytest.mark.parametrize("path", MODEL_CASES, ids=[p.stem for p in MODEL_CASES])
def test_malformed_model(path, capsys, monkeypatch):
    rel = str(path.relative_to(GOLDEN))
    args = _model_args(path)
    code, out, err = _run(["check", rel] + args, capsys, monkeypatch)
    data_paths = {a for a in args if not a.startswith("-") and "=" not in a}
    _assert_helpful(err, code, {rel} | data_paths)
    assert out == ""
    # a model fault is located in the model, with line and column
    assert any(m.group("path") == rel and m.group("line") for m, _ in _diagnostics(err)), err
    _compare(path.with_suffix(".err"), code, err)


@pytest.mark.parametrize("path", DATA_CASES, ids=[p.stem for p in DATA_CASES])
def test_malformed_data(path, capsys, monkeypatch):
    args = _data_args(path)
    code, out, err = _run(["check"] + args, capsys, monkeypatch)
    files = {a for a in args if not a.startswith("-") and "=" not in a}
    if code == 2:      # a malformed --set is a usage error: one line naming --set and the bad value
        assert err.startswith("ppl check: error: --set ") and err.count("\n") == 1, err
    else:
        _assert_helpful(err, code, files | {"--set"})
    assert out == ""
    _compare(path.with_suffix(".err"), code, err)


def test_corpus_size():
    assert len(MODEL_CASES) >= 45
    assert len(DATA_CASES) >= 16


def test_no_stray_goldens():
    """Every .err file belongs to a case (catches renamed cases)."""
    cases = {p.with_suffix(".err") for p in MODEL_CASES + DATA_CASES}
    for err in list(GOLDEN.glob("models/*.err")) + list(GOLDEN.glob("data/*.err")):
        assert err in cases, f"{err} has no case"


@pytest.mark.parametrize("path", MODEL_CASES, ids=[p.stem for p in MODEL_CASES])
def test_graph_agrees_with_check(path, capsys, monkeypatch):
    """`ppl graph` refuses the same models with the same message."""
    rel = str(path.relative_to(GOLDEN))
    code, out, err = _run(["graph", rel] + _model_args(path), capsys, monkeypatch)
    assert code == 1 and out == ""
    assert err + f"# exit {code}\n" == path.with_suffix(".err").read_text()


@pytest.mark.parametrize("bad,expect", [
    ("n/a", "row 40000, column 'y': 'n/a' is not a number"),
    ("", "row 40000, column 'y': empty cell"),
    ("nan", "row 40000, column 'y': 'nan' is not a finite number (NaN and inf are not data)"),
    ("1e5", "row 40000, column 'y': 100000 violates the bound upper=100 of 'y' (must be <= 100)"),
])
def test_large_csv_faults_are_located(bad, expect, tmp_path, capsys, monkeypatch):
    """Files over 1 MB take a fast numeric path; a fault must still be found with its row and column."""
    rows = ["x,y,count"] + [f"{i % 7}.2500,{(i % 13) / 10:.4f},{i % 5}" for i in range(1, 80001)]
    rows[40000] = f"1.5,{bad},2"
    data = tmp_path / "big.csv"
    data.write_text("\n".join(rows) + "\n")
    assert data.stat().st_size > 1 << 20
    model = GOLDEN / "data" / "models" / "reg.ppl"
    code, out, err = _run(["check", str(model), str(data)], capsys, monkeypatch)
    _assert_helpful(err, code, {str(data)})
    assert err.startswith(f"{data}:40001:5: error: {expect}\n"), err
