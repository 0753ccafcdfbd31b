"""The streaming CSV reader (large files) against the careful whole-file reader: the same arrays and
the same located errors, with chunk boundaries anywhere (here: a chunk of a few dozen bytes)."""
from __future__ import annotations

import numpy as np
import pytest

import ppl
import ppl.data as D
from ppl.errors import PplError

REG = """data x: real[N]
data y: real<lower=-5, upper=100>[N]
data count: int<lower=0>[N]
mu ~ normal(0, 5)
y ~ normal(mu + x, 1)
"""
MATRIX = """data X: real[N, D] from "x*"
data y: int<lower=0, upper=1>[N]
b[D] ~ normal(0, 1)
y ~ bernoulli_logit(X @ b)
"""


def _load(model: str, path, stream: bool, monkeypatch, chunk: int = 40):
    """(arrays by name, None) or (None, the rendered error) from one reader."""
    with monkeypatch.context() as m:
        m.setattr(D, "FAST_CSV_BYTES", 0 if stream else 1 << 40)
        m.setattr(D, "STREAM_CHUNK_BYTES", chunk)
        try:
            got = ppl.loads(model, "m.ppl").check(str(path))
        except PplError as e:
            return None, str(e)
    return {k: np.asarray(v) for k, v in got.values.items()}, None


def _same(model, path, monkeypatch, chunks=(17, 40, 1 << 20)):
    old, old_err = _load(model, path, False, monkeypatch)
    for chunk in chunks:
        new, new_err = _load(model, path, True, monkeypatch, chunk)
        assert new_err == old_err, (chunk, new_err, old_err)
        if old is not None:
            assert new.keys() == old.keys()
            for k in old:
                assert new[k].dtype == old[k].dtype and new[k].shape == old[k].shape
                np.testing.assert_array_equal(new[k], old[k])
    return old, old_err


def _rows(n=60):
    return [f"{i % 7}.25,{(i % 13) / 10:.4f},{i % 5}" for i in range(1, n + 1)]


def _write(tmp_path, header, rows, name="d.csv", end="\n"):
    p = tmp_path / name
    p.write_text(header + end + end.join(rows) + end)
    return p


def test_stream_is_taken_and_gives_the_same_arrays(tmp_path, monkeypatch):
    p = _write(tmp_path, "x,y,count", _rows())
    with monkeypatch.context() as m:
        m.setattr(D, "FAST_CSV_BYTES", 0)
        assert D._read(str(p)).stream is not None
    old, err = _same(REG, p, monkeypatch)
    assert err is None and old["x"].shape == (60,)


def test_matrix_columns_crlf_blank_lines_and_quotes(tmp_path, monkeypatch):
    rows = [f"{i / 3:.6f},{-i / 7:.6f},z{i},{i % 2}" for i in range(50)]
    rows[10] = '"1.5",2.5,"a, b",1'            # quoted cells (one with a comma) take the csv module's path
    rows[20] = ""                               # blank lines are skipped, as the careful reader does
    old, err = _same(MATRIX, _write(tmp_path, "x1,x2,note,y", rows, end="\r\n"), monkeypatch)
    assert err is None and old["X"].shape == (49, 2)
    np.testing.assert_array_equal(old["X"][10], [1.5, 2.5])


@pytest.mark.parametrize("bad", ["n/a", "", "nan", "1e5", "-9", " inf "])
def test_bad_cells_same_error(bad, tmp_path, monkeypatch):
    rows = _rows()
    rows[37] = f"1.5,{bad},2"
    _, err = _same(REG, _write(tmp_path, "x,y,count", rows), monkeypatch)
    assert err and "row 38, column 'y'" in err


def test_error_order_is_the_careful_readers(tmp_path, monkeypatch):
    """A non-number after a bound violation, in another column: the declarations' order, and within one
    the kind (not a number before not an integer before a bound), as the careful reader reports."""
    rows = _rows()
    rows[5] = "1.5,200,2"            # y above its bound (row 6)
    rows[30] = "1.5,1,2.5"           # count not an integer (row 31)
    rows[50] = "oops,1,2"            # x not a number (row 51): x is declared first
    _, err = _same(REG, _write(tmp_path, "x,y,count", rows), monkeypatch)
    assert "row 51, column 'x': 'oops' is not a number" in err
    rows[50] = "1,1,2"
    rows[40] = "1,-200,2"            # a later lower-bound violation: the lower bound is declared first
    _, err = _same(REG, _write(tmp_path, "x,y,count", rows), monkeypatch)
    assert "row 41, column 'y': -200 violates the bound lower=-5" in err
    rows[40] = "1,1,2"
    _, err = _same(REG, _write(tmp_path, "x,y,count", rows), monkeypatch)
    assert "row 6, column 'y': 200 violates the bound upper=100" in err
    rows[5] = "1.5,1,2"
    _, err = _same(REG, _write(tmp_path, "x,y,count", rows), monkeypatch)
    assert "row 31, column 'count': '2.5' is not an integer" in err


def test_row_width_beats_cell_faults_and_a_bad_row_across_a_chunk_boundary(tmp_path, monkeypatch):
    rows = _rows()
    rows[3] = "x,y,z"                            # a cell fault early ...
    rows[44] = "1.25,0.5,3,9"                    # ... but a row of the wrong width is reported first
    p = _write(tmp_path, "x,y,count", rows)
    text = p.read_text()
    at = text.index("1.25,0.5,3,9")
    # every cut inside the bad row (and around it)
    for chunk in range(at - 30, at + 14, 3):
        new, err = _load(REG, p, True, monkeypatch, chunk)
        assert err is not None and ":46:1: error: row 45 has 4 fields, but the header has 3" in err, (chunk, err)
    _same(REG, p, monkeypatch)
    rows[44] = "1.25,0.5,oops"                   # a bad cell cut by a chunk boundary
    p = _write(tmp_path, "x,y,count", rows[4:])
    text = p.read_text()
    at = text.index("oops")
    for chunk in (at - 2, at, at + 2, 23, 29):
        _, err = _load(REG, p, True, monkeypatch, chunk)
        assert ":42:10: error: row 41, column 'count': 'oops' is not a number" in err, (chunk, err)
    _same(REG, p, monkeypatch, chunks=(at - 3, at + 1))


@pytest.mark.parametrize("content", [
    "x,y,count\n",                                # a header and no rows
    'x,y,count\n1,2,3\n"4,5,6\n7,8,9\n',          # a quote never closed
    "x,y,count\n1,2,3\n4,5\x00,6\n",              # a NUL byte
    "x,x,count\n1,2,3\n",                         # a duplicate column name
])
def test_file_faults_same_error(content, tmp_path, monkeypatch):
    p = tmp_path / "d.csv"
    p.write_text(content)
    _, err = _same(REG, p, monkeypatch)
    assert err


def test_invalid_utf8_same_error(tmp_path, monkeypatch):
    p = tmp_path / "d.csv"
    p.write_bytes(("x,y,count\n" + "\n".join(_rows(30)) + "\n").encode() + b"1,\xff2,3\n")
    _, err = _same(REG, p, monkeypatch)
    assert "is not UTF-8" in err


def test_level_column_and_unused_text_column(tmp_path, monkeypatch):
    rows = [f"{i % 3},g{i % 4},{i}.5" for i in range(40)]
    p = _write(tmp_path, "y,g,notes", rows)
    model = "data y: real[N]\ndata g: level[N] of K\na[K] ~ normal(0, 1)\ny ~ normal(a[g], 1)\n"
    old, err = _same(model, p, monkeypatch)
    assert err is None and old["g"].max() == 4
    old, err = _same("data y: real[N]\nmu ~ normal(0, 1)\ny ~ normal(mu, 1)\n", p, monkeypatch)
    assert err is None and old["y"].shape == (40,)


# ---- a data-parallel fit: each process's byte range of the rows (ppl.data._range_table) ---------------
def _decls(model):
    from ppl.frontend import ast as A
    return [s for s in ppl.loads(model, "m.ppl").program.statements if isinstance(s, A.DataDecl)]


def _ranges(model, path, world, monkeypatch, chunk=23):
    """Every process's arrays from its byte range, joined in rank order (None where one falls back)."""
    monkeypatch.setattr(D, "STREAM_CHUNK_BYTES", chunk)
    parts = [D._range_table(str(path), _decls(model), r, world) for r in range(world)]
    if any(p is None for p in parts):
        return None
    return {k: np.concatenate([p.stream.needs[k].out for p in parts]) for k in parts[0].stream.needs}


@pytest.mark.parametrize("eol,last", [("\n", True), ("\r\n", True), ("\n", False)], ids=["lf", "crlf", "no-final-eol"])
def test_byte_ranges_cut_at_line_ends_give_every_row_once(tmp_path, monkeypatch, eol, last):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(37, 3)).round(6)
    y = (rng.random(37) < 0.5).astype(int)
    lines = ["x1,y,x2,x3"] + [f"{a[0]!r},{b},{a[1]!r},{a[2]!r}" for a, b in zip(X.tolist(), y.tolist())]
    path = tmp_path / "d.csv"
    path.write_bytes((eol.join(lines) + (eol if last else "")).encode())
    for world in (1, 2, 3, 5):
        got = _ranges(MATRIX, path, world, monkeypatch)
        assert got is not None, world
        assert np.array_equal(got["X"], X) and np.array_equal(got["y"], y), world
    sizes = [D._range_table(str(path), _decls(MATRIX), r, 2).stream.rows for r in range(2)]
    assert sum(sizes) == 37 and min(sizes) > 0


@pytest.mark.parametrize("body,why", [
    ('1.0,2,"3"\n4.0,5,6\n', "a quoted field"),
    ("1.0,2,3\n4.0,oops,6\n", "a cell that is not a number"),
    ("1.0,2,3\n4.0,-1,6\n", "a bound violated"),
    ("1.0,2,3\n4.0,5\n", "a row of the wrong width"),
], ids=["quoted", "not-a-number", "bound", "width"])
def test_a_byte_range_that_cannot_be_read_alone_falls_back_to_the_whole_file(tmp_path, monkeypatch, body, why):
    path = tmp_path / "d.csv"
    path.write_text("x,count,y\n" + body)
    assert _ranges(REG, path, 2, monkeypatch) is None, why


def test_level_labels_fall_back_to_the_whole_file(tmp_path, monkeypatch):
    path = tmp_path / "d.csv"
    path.write_text("y,g\n1.0,a\n2.0,b\n3.0,a\n")
    model = "data y: real[N]\ndata g: level[N] of K\na[K] ~ normal(0, 1)\ny ~ normal(a[g], 1)\n"
    assert _ranges(model, path, 2, monkeypatch) is None
