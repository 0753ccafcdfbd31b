"""Data binding: CSV / JSON / --set -> arrays checked against the `data` declarations."""
from __future__ import annotations

import json

import numpy as np
import pytest

import ppl
from ppl.data import load_data
from ppl.errors import PplError, Source, UsageError
from ppl.frontend.parse import parse

LEVELS = "data g: level[N] of K\na[K] ~ normal(0, 1)\n"


def check(src, data=None, sets=()):
    return ppl.loads(src, "m.ppl").check(data, sets)


def error(src, data=None, sets=()):
    with pytest.raises(PplError) as ei:
        check(src, data, sets)
    assert len(ei.value.diagnostics) == 1
    return ei.value.diagnostics[0]


# ---- CSV ------------------------------------------------------------------------------
def test_csv_by_column_name_and_unused_columns_ignored(write):
    path = write("d.csv", "extra,sigma,y,notes\n1,15,28,a b\n2,10,8,c\n3,16,-3,d\n")
    m = check("data y: real[J]\ndata sigma: real<lower=0>[J]\nmu ~ normal(0, 5)\ny ~ normal(mu, sigma)\n", path)
    np.testing.assert_array_equal(m.values["y"], [28.0, 8.0, -3.0])
    np.testing.assert_array_equal(m.values["sigma"], [15.0, 10.0, 16.0])
    assert m.dims == {"J": 3}
    assert "extra" not in m.values and "notes" not in m.values


def test_csv_int_column(write):
    path = write("d.csv", "n\n1\n0\n7\n")
    m = check("data n: int<lower=0>[N]\nmu ~ normal(0, 1)\n", path)
    np.testing.assert_array_equal(m.values["n"], [1, 0, 7])
    assert m.nodes["n"].is_int


def test_csv_blank_lines_skipped_and_bom(write, tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes("\ufeffy\n1\n\n2\n".encode())
    m = check("data y: real[N]\nmu ~ normal(0, 1)\n", str(p))
    np.testing.assert_array_equal(m.values["y"], [1.0, 2.0])


# ---- levels -----------------------------------------------------------------------------
def test_level_string_labels_sorted(write):
    path = write("d.csv", "g\nChisago\nAitkin\nCarver\nAitkin\n")
    m = check(LEVELS, path)
    assert m.levels["g"] == ["Aitkin", "Carver", "Chisago"]
    np.testing.assert_array_equal(m.values["g"], [3, 1, 2, 1])
    assert m.dims == {"N": 4, "K": 3}
    assert m.nodes["a"].shape == (3,)


def test_level_integer_labels_kept_when_k_given(write):
    path = write("d.csv", "g\n3\n1\n3\n")
    m = check(LEVELS, path, ["K=4"])                     # labels 1..K used as they are
    np.testing.assert_array_equal(m.values["g"], [3, 1, 3])
    assert m.dims["K"] == 4 and m.nodes["a"].shape == (4,)
    assert m.levels["g"] == ["1", "2", "3", "4"]
    m = check(LEVELS, [path, {"K": 4}])                  # ... also when K comes from JSON
    np.testing.assert_array_equal(m.values["g"], [3, 1, 3])
    assert m.dims["K"] == 4


def test_level_integer_labels_renumbered_without_k(write):
    path = write("d.csv", "g\n3\n1\n3\n")
    m = check(LEVELS, path)
    np.testing.assert_array_equal(m.values["g"], [2, 1, 2])
    assert m.dims["K"] == 2
    assert m.levels["g"] == ["1", "3"]


def test_level_numeric_labels_sorted_numerically(write):
    path = write("d.csv", "g\n10\n2\n9\n2\n")
    m = check(LEVELS, path)
    assert m.levels["g"] == ["2", "9", "10"]             # not "10" < "2" < "9"
    np.testing.assert_array_equal(m.values["g"], [3, 1, 2, 1])


def test_level_labels_out_of_1_to_k_with_k_given(write):
    path = write("d.csv", "g\n10\n2\n9\n2\n")
    m = check(LEVELS, path, ["K=3"])                     # 3 distinct labels: renumbered, K agrees
    np.testing.assert_array_equal(m.values["g"], [3, 1, 2, 1])
    d = error(LEVELS, path, ["K=5"])                     # 3 distinct labels, K says 5
    assert "3 distinct labels" in d.message and "K = 5" in d.message


def test_level_mixed_labels_sorted_as_strings(write):
    path = write("d.csv", "g\nb\n10\n9\n")
    m = check(LEVELS, path)
    assert m.levels["g"] == ["10", "9", "b"]
    np.testing.assert_array_equal(m.values["g"], [3, 1, 2])


def test_level_empty_cell_is_an_error(write):
    path = write("d.csv", "g,y\na,1\n,2\n")
    d = error(LEVELS, path)
    assert d.span.path == path and d.span.line == 3
    assert "row 2, column 'g'" in d.message and "empty" in d.message


# ---- from "pattern" --------------------------------------------------------------------------
def test_from_pattern_in_file_order(write):
    path = write("d.csv", "x2,y,x1,x10,z\n1,0,2,3,4\n5,1,6,7,8\n")
    m = check('data X: real[N, D] from "x*"\nb[D] ~ normal(0, 1)\n', path)
    np.testing.assert_array_equal(m.values["X"], [[1, 2, 3], [5, 6, 7]])   # x2, x1, x10
    assert m.dims == {"N": 2, "D": 3}


def test_from_pattern_is_case_sensitive_and_must_match(write):
    path = write("d.csv", "X1,y\n1,0\n")
    d = error('data X: real[N, D] from "x*"\nb[D] ~ normal(0, 1)\n', path)
    assert 'no CSV column matches "x*"' in d.message and "X1" in d.message


def test_from_pattern_cell_error_names_the_column(write):
    path = write("d.csv", "x1,x2\n1,2\n3,oops\n")
    d = error('data X: real[N, D] from "x*"\nb[D] ~ normal(0, 1)\n', path)
    assert d.span.path == path and (d.span.line, d.span.col) == (3, 3)
    assert d.message == "row 2, column 'x2': 'oops' is not a number"


# ---- JSON ----------------------------------------------------------------------------------------
def test_json_posteriordb_style_with_matrix(write):
    path = write("d.json", json.dumps({"N": 3, "D": 2, "X": [[1, 2], [3, 4], [5, 6]], "y": [0, 1, 1],
                                       "unused": [9, 9], "title": "ignored"}))
    m = check("data X: real[N, D]\ndata y: int<lower=0, upper=1>[N]\nb[D] ~ normal(0, 1)\n"
              "y ~ bernoulli_logit(X @ b)\n", path)
    np.testing.assert_array_equal(m.values["X"], [[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(m.values["y"], [0, 1, 1])
    assert m.dims == {"N": 3, "D": 2}
    assert "unused" not in m.values


def test_json_scalar_data_and_3d_array(write):
    path = write("d.json", json.dumps({"s": 2.5, "A": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]}))
    m = check("data s: real\ndata A: real[I, J, K]\nmu ~ normal(s, 1)\n", path)
    assert float(m.values["s"]) == 2.5
    assert m.values["A"].shape == (2, 2, 2) and m.values["A"][1, 0, 1] == 6
    assert m.dims == {"I": 2, "J": 2, "K": 2}


def test_json_ragged_array_is_an_error(write):
    path = write("d.json", '{"y": [[1, 2], [3]]}')
    d = error("data y: real[N, M]\nb ~ normal(0, 1)\n", path)
    assert d.span.path == path and "ragged" in d.message


def test_json_wrong_rank_is_an_error(write):
    path = write("d.json", '{"y": [[1, 2], [3, 4]]}')
    d = error("data y: real[N]\nb ~ normal(0, 1)\n", path)
    assert "2 dimensions" in d.message and "declares 1" in d.message


def test_json_string_value_is_an_error(write):
    path = write("d.json", '{\n  "y": [1, "a"]\n}')
    d = error("data y: real[N]\nb ~ normal(0, 1)\n", path)
    assert d.span.path == path and d.span.line == 2
    assert "key 'y', element 2" in d.message and '"a" is not a number' in d.message


def test_invalid_json_is_located(write):
    path = write("d.json", '{"y": [1, 2,]}')
    d = error("data y: real[N]\nb ~ normal(0, 1)\n", path)
    assert d.span.path == path and "invalid JSON" in d.message


def test_python_mapping_as_data():
    m = check("data y: real[N]\nb ~ normal(0, 1)\n", {"y": np.array([1.0, 2.0])})
    np.testing.assert_array_equal(m.values["y"], [1.0, 2.0])


# ---- --set, several files, sizes ---------------------------------------------------------------
def test_set_scalars(write):
    m = check("data s: real\ndata n: int\nmu ~ normal(s, n)\n", None, ["s=2.5", "n=3"])
    assert float(m.values["s"]) == 2.5 and float(m.values["n"]) == 3.0


def test_set_binds_a_size(write):
    m = check("b[K] ~ normal(0, 1)\n", None, ["K=4"])
    assert m.dims == {"K": 4} and m.nodes["b"].shape == (4,)


@pytest.mark.parametrize("bad,expect", [
    ("s=abc", "--set s=abc: 'abc' is not a number"),
    ("s", "--set 's' is not NAME=VALUE"),
    ("=3", "--set '=3' is not NAME=VALUE"),
    ("s=nan", "--set s=nan: the value must be a finite number"),
    ("s=-inf", "--set s=-inf: the value must be a finite number"),
])
def test_malformed_set_is_a_usage_error(bad, expect):
    with pytest.raises(UsageError) as ei:
        check("data s: real\nb ~ normal(0, 1)\n", None, [bad])
    assert str(ei.value) == expect


def test_several_files_combined(write):
    a = write("a.csv", "y,county\n1.5,x\n2.5,y\n3.5,x\n")
    b = write("b.json", json.dumps({"N": 3, "prior_scale": 2.0}))
    m = check("data y: real[N]\ndata county: level[N] of K\ndata prior_scale: real<lower=0>\n"
              "a[K] ~ normal(0, prior_scale)\ny ~ normal(a[county], 1)\n", [a, b])
    np.testing.assert_array_equal(m.values["y"], [1.5, 2.5, 3.5])
    np.testing.assert_array_equal(m.values["county"], [1, 2, 1])
    assert float(m.values["prior_scale"]) == 2.0
    assert m.dims == {"N": 3, "K": 2}


def test_first_file_with_the_column_wins(write):
    a = write("a.csv", "y\n1\n2\n")
    b = write("b.csv", "y\n7\n8\n9\n")
    m = check("data y: real[N]\nb ~ normal(0, 1)\n", [b, a])
    np.testing.assert_array_equal(m.values["y"], [7, 8, 9])


def test_dim_conflict_between_files(write):
    a = write("a.csv", "y\n1\n2\n3\n")
    b = write("b.csv", "z\n1\n2\n")
    d = error("data y: real[N]\ndata z: real[N]\nb ~ normal(0, 1)\n", [a, b])
    assert "gives N = 2" in d.message and "gives N = 3" in d.message
    assert "column 'z'" in d.message and "column 'y'" in d.message


def test_dim_conflict_with_json_scalar(write):
    a = write("a.csv", "y\n1\n2\n")
    j = write("s.json", '{"N": 3}')
    d = error("data y: real[N]\nb ~ normal(0, 1)\n", [a, j])
    assert "N = 2" in d.message and "N = 3" in d.message and j in d.message


def test_dim_conflict_with_set(write):
    a = write("a.csv", "y\n1\n2\n")
    d = error("data y: real[N]\nb ~ normal(0, 1)\n", [a], ["N=5"])
    assert "--set N gives N = 5" in d.message


def test_literal_dim_must_match(write):
    a = write("a.csv", "y\n1\n2\n")
    d = error("data y: real[3]\nb ~ normal(0, 1)\n", a)
    assert "has size 2" in d.message and "declares 3" in d.message


# ---- error messages name file, row, column and value -------------------------------------------
def test_not_a_number_names_file_row_column_value(write):
    path = write("radon.csv", "log_radon,floor\n1.0,0\n" + "".join(f"{i}.0,1\n" for i in range(15)) + "n/a,0\n")
    d = error("data log_radon: real[N]\ndata floor: real[N]\nb ~ normal(0, 1)\n", path)
    assert d.message == "row 17, column 'log_radon': 'n/a' is not a number"
    assert d.span.path == path and (d.span.line, d.span.col) == (18, 1)
    assert d.render().splitlines()[0] == f"{path}:18:1: error: row 17, column 'log_radon': 'n/a' is not a number"


def test_empty_cell_and_non_integer(write):
    path = write("d.csv", "y,n\n1,\n2,3\n")
    d = error("data y: real[N]\ndata n: int[N]\nb ~ normal(0, 1)\n", path)
    assert (d.span.line, d.span.col) == (2, 3) and d.message == "row 1, column 'n': empty cell"
    path = write("e.csv", "y,n\n1,4\n2,2.5\n")
    d = error("data y: real[N]\ndata n: int[N]\nb ~ normal(0, 1)\n", path)
    assert d.span.line == 3 and "row 2, column 'n'" in d.message and "'2.5' is not an integer" in d.message


def test_nan_is_not_data(write):
    path = write("d.csv", "y\n1\nnan\n")
    d = error("data y: real[N]\nb ~ normal(0, 1)\n", path)
    assert "row 2, column 'y'" in d.message and "not a finite number" in d.message


def test_bound_violation(write):
    path = write("d.csv", "sigma\n1\n-2\n")
    d = error("data sigma: real<lower=0>[N]\nb ~ normal(0, 1)\n", path)
    assert d.span.path == path and d.span.line == 3
    assert d.message.startswith("row 2, column 'sigma': -2 ")
    assert "lower=0" in d.message


def test_ragged_csv_row(write):
    path = write("d.csv", "y,n\n1,2\n2\n")
    d = error("data y: real[N]\nb ~ normal(0, 1)\n", path)
    assert d.span.line == 3 and "row 2 has 1 field" in d.message and "header has 2" in d.message


def test_missing_column_suggests_a_name(write):
    path = write("d.csv", "yy,n\n1,2\n")
    d = error("data y: real[N]\nb ~ normal(0, 1)\n", path)
    assert d.span.path == "m.ppl" and d.span.line == 1
    assert "no column or key named 'y'" in d.message and "did you mean 'yy'" in d.message
    assert "columns yy, n" in d.message


def test_scalar_declared_but_column_given(write):
    path = write("d.csv", "s\n1\n2\n")
    d = error("data s: real\nb ~ normal(0, 1)\n", path)
    assert "declared a scalar" in d.message


def test_missing_data_file():
    d = error("data y: real[N]\nb ~ normal(0, 1)\n", "/nonexistent/d.csv")
    assert d.render() == "/nonexistent/d.csv: error: cannot read data file: No such file or directory"


def test_empty_and_header_only_csv(write):
    d = error("data y: real[N]\nb ~ normal(0, 1)\n", write("e.csv", ""))
    assert "empty" in d.message
    d = error("data y: real[N]\nb ~ normal(0, 1)\n", write("h.csv", "y\n"))
    assert "no rows" in d.message


def test_load_data_direct(write):
    path = write("d.csv", "y,g\n1,b\n2,a\n")
    prog = parse(Source("m.ppl", "data y: real[N]\ndata g: level[N] of K\n"))
    ds = load_data(list(prog.statements), [path], (), ["N", "K"])
    np.testing.assert_array_equal(ds.values["y"], [1, 2])
    np.testing.assert_array_equal(ds.values["g"], [2, 1])
    assert ds.dims == {"N": 2, "K": 2}
    assert ds.levels == {"g": ["a", "b"]}
