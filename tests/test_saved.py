"""ppl/saved.py and ppl/posterior.py: a fit saved by --out is restored whole in a new process (the same
draws at the same seed), draws more (`ppl draws`), and starts a new fit (`--init FIT_DIR`)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ppl
from ppl.cli import main
from conftest import MODELS

M = str(MODELS)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_restored_fit_has_the_same_draws_and_diagnostics(saved_fit):
    d = saved_fit("radon")
    fit = ppl.load_fit(str(d))
    rec = json.loads((d / "run.json").read_text())
    assert fit.khat == rec["khat"] and fit.verdict_label == rec["verdict"] and fit.method == rec["method"]
    with open(d / "draws.csv") as f:
        rows = list(csv.reader(f))
    j = rows[0].index("a[3]")
    assert np.array_equal(fit.draws["a"][:, 2], [float(r[j]) for r in rows[1:]])
    assert np.array_equal(fit.q_draws.log_p, [float(r[0]) for r in rows[1:]])
    assert fit.model.levels["county"][0] == "Aitkin"
    assert repr(fit).startswith("<Fit ") and len(repr(fit)) < 200


@pytest.mark.parametrize("name", ["mixture"])       # enumerated z too; one new process is 5-8 s
def test_same_draws_at_the_same_seed_in_a_new_process(saved_fit, name):
    d = saved_fit(name)
    here = ppl.load_fit(str(d)).draw(50, seed=11)
    code = ("import sys, json, ppl\n"
            f"v = ppl.load_fit({str(d)!r}).draw(50, seed=11)\n"
            "json.dump({k: x.tolist() for k, x in v.items()}, sys.stdout)\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    there = json.loads(out.stdout)
    assert set(there) == set(here)
    for k in here:
        assert np.array_equal(np.asarray(there[k]), here[k]), k
    assert not np.array_equal(ppl.load_fit(str(d)).draw(50, seed=12)[next(iter(here))], here[next(iter(here))])


def test_the_original_fit_draws_as_the_restored_one(tmp_path):
    m = ppl.load(M + "/eight_schools.ppl")
    fit = m.fit(M + "/eight_schools.csv", seed=4, draws=200)
    fit.save(str(tmp_path / "o"))
    a = fit.draw(30, seed=9)
    b = ppl.load_fit(str(tmp_path / "o")).draw(30, seed=9)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_ppl_draws_command(saved_fit, tmp_path, capsys):
    d = saved_fit("eight_schools")
    capsys.readouterr()
    out = tmp_path / "more.csv"
    assert main(["draws", str(d), "--draws", "40", "--seed", "3", "--out", str(out)]) == 0
    rows = list(csv.reader(open(out)))
    assert rows[0][:4] == ["lp__", "log_q__", "mu", "tau"] and len(rows) == 41
    want = ppl.load_fit(str(d)).draw(40, seed=3)
    assert np.allclose([float(r[3]) for r in rows[1:]], want["tau"], rtol=0, atol=0)


def test_warm_start_from_a_saved_fit(saved_fit, capsys):
    d = saved_fit("eight_schools")
    capsys.readouterr()
    assert main(["fit", M + "/eight_schools.ppl", M + "/eight_schools.csv", "--init", str(d),
                 "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["init"] == f"warm start from {d}"
    old = ppl.load_fit(str(d)).summary(corrected=False)
    new = res["params_q"] or res["params"]          # q's own summaries on both sides (not PSIS-weighted)
    for k in ("mu", "tau", "theta[1]"):
        assert abs(new[k]["mean"] - old[k]["mean"]) < 0.1 * old[k]["sd"]
        assert new[k]["sd"] == pytest.approx(old[k]["sd"], rel=0.1)
    assert res["verdict"] in ("good", "fair")


def test_warm_start_needs_the_same_latents(saved_fit, capsys):
    d = saved_fit("eight_schools")
    capsys.readouterr()
    assert main(["fit", M + "/poisson.ppl", M + "/poisson.csv", "--init", str(d)]) == 2
    err = capsys.readouterr().err
    assert "--init" in err and "has no latent 'a'" in err


@pytest.mark.parametrize("cmd", [["draws"], ["loo"], ["summary"], ["plot"]])
def test_a_folder_ppl_did_not_write_is_a_located_error(tmp_path, capsys, cmd):
    (tmp_path / "x").mkdir()
    assert main(cmd + [str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "x") in err and "ppl fit --out" in err and "Traceback" not in err
