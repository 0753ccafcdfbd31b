"""The hierarchical fixtures (tests/data/hier/NAME.json): their data regenerate bit for bit from the stored
generator arguments (tests/hier_data.py, the same code bench/data.py writes the benchmark's CSVs with), and
each carries a complete NUTS summary of the model it states."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

import hier_data

NAMES = ["hier_k1000", "hier_centred_k1000", "hier_slopes_k1000", "hier_poisson_k1000", "hier_bernoulli_k1000"]
BENCH_DATA = os.path.join(os.path.dirname(hier_data.HERE), "bench", "data.py")


@pytest.fixture(scope="module")
def bench_data():
    spec = importlib.util.spec_from_file_location("bench_data_for_tests", BENCH_DATA)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", NAMES)
def test_fixture_regenerates_its_data(name):
    fix = hier_data.load_fixture(name)
    assert os.path.getsize(os.path.join(hier_data.FIXTURES, f"{name}.json")) < 200_000
    assert fix["generator"] == hier_data.SPECS[name]
    cols, true = hier_data.generate(**fix["generator"])
    assert hier_data.data_sha256(cols) == fix["data_sha256"]
    assert len(cols["y"]) == fix["N"] == true["N"] and true["K"] == fix["K"]
    assert len(set(cols["g"].tolist())) == fix["K"]          # every group has rows
    assert fix["model"] == hier_data.model_text(fix["family"])


@pytest.mark.parametrize("name", NAMES)
def test_fixture_posterior_is_complete(name):
    fix = hier_data.load_fixture(name)
    post = fix["posterior"]
    want_globals = {"mu", "tau", "b"} | ({"sigma"} if fix["family"] in ("noncentred", "centred", "slopes") else set())
    want_globals |= {"tau_b"} if fix["family"] == "slopes" else set()
    assert set(fix["globals"]) == want_globals
    want = set(want_globals) | {f"{v}[{k}]" for v in fix["locals"] for k in range(1, fix["K"] + 1)}
    assert set(post) == want
    assert all(len(v) == 2 and v[1] > 0 for v in post.values())
    nuts = fix["nuts"]
    assert nuts["num_warmup"] >= 1000 and nuts["num_samples"] >= 2000 and nuts["divergences"] == 0
    # the reference recovers the simulation's group sd
    assert abs(post["tau"][0] - fix["true"]["tau"]) < 4 * post["tau"][1]


@pytest.mark.parametrize("name", NAMES)
def test_bench_generator_is_the_same(name, bench_data):
    src, cols, meta = bench_data.MODELS[name](None)
    ref, _ = hier_data.generate(**hier_data.SPECS[name])
    assert src == hier_data.model_text(hier_data.SPECS[name]["family"])
    for k in ("y", "x", "g"):
        assert cols[k].dtype == ref[k].dtype and np.array_equal(cols[k], ref[k])
    assert meta["data_sha256"] == hier_data.data_sha256(ref)


def test_csv_round_trip_is_exact(tmp_path, bench_data):
    cols, _ = hier_data.generate(**hier_data.SPECS["hier_k1000"])
    path = str(tmp_path / "data.csv")
    hier_data.write_csv(path, cols)
    bench_path = str(tmp_path / "bench.csv")
    bench_data._write_csv(bench_path, cols)
    with open(path) as f, open(bench_path) as g:
        assert f.read() == g.read()
    raw = np.loadtxt(path, delimiter=",", skiprows=1, dtype=str)
    assert np.array_equal(raw[:, 0].astype(float), cols["y"])
    assert np.array_equal(raw[:, 1].astype(float), cols["x"])
    assert raw[:, 2].tolist() == cols["g"].tolist()


def test_labels_sort_as_group_numbers():
    for K in (1000, 10000):
        lab = hier_data.labels(K).tolist()
        assert sorted(lab) == lab and lab[16] == "g00017" and len(set(map(len, lab))) == 1


def test_fixture_json_is_compact():
    for name in NAMES:
        with open(os.path.join(hier_data.FIXTURES, f"{name}.json")) as f:
            text = f.read()
        assert json.loads(text)["name"] == name
