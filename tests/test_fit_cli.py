"""`ppl fit` (DESIGN §4): the JSON contract, --seed reproducibility, --tol 0
--steps N, --out DIR (three CSVs and run.json, atomic, never clobbering without
--force; more on --out in test_outdir.py),
the progress bar (only on a terminal, never with --format json), usage errors
(exit 2), the table header and --profile."""
from __future__ import annotations

import csv
import json
import math
import os
import pty
import subprocess
import sys
import threading

import pytest

from ppl.cli import main

from conftest import MODELS, ROOT

POISSON = [str(MODELS / "poisson.ppl"), str(MODELS / "poisson.csv")]
EIGHT = [str(MODELS / "eight_schools.ppl"), str(MODELS / "eight_schools.csv")]
MIXTURE = [str(MODELS / "mixture.ppl"), str(MODELS / "mixture.csv")]
QUICK = ["--steps", "150", "--draws", "200"]
KEYS = {"params", "elbo", "steps", "converged", "method", "estimator", "khat", "ess", "verdict", "seconds"}


def run(capsys, *argv):
    code = main(["fit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def fit_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def _cli(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "ppl", "fit", *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, **kw)


# ---- JSON ---------------------------------------------------------------------------------------------------
def test_json_keys_and_types(capsys):
    res = fit_json(capsys, *EIGHT, *QUICK)
    assert KEYS <= set(res), KEYS - set(res)
    assert isinstance(res["steps"], int) and isinstance(res["converged"], bool)
    assert res["method"] == "fullrank"
    assert res["estimator"] == "reparam"
    assert res["verdict"] in ("good", "fair", "unreliable")
    assert 0.0 <= res["ess"] <= 1.0
    assert isinstance(res["khat"], float) and isinstance(res["elbo"], float) and math.isfinite(res["elbo"])
    assert res["seconds"] > 0
    names = set(res["params"])
    assert {"mu", "tau", "theta[1]", "theta[8]", "theta_raw[1]"} <= names
    for k, v in res["params"].items():
        assert set(v) == {"mean", "sd", "q5", "q50", "q95"}, k
        assert v["q5"] <= v["q50"] <= v["q95"]


def test_json_stdout_is_one_object_and_nothing_else(capsys):
    code, out, err = run(capsys, *POISSON, *QUICK, "--format", "json")
    assert code == 0
    assert out.count("\n") == 1 and out.startswith("{") and out.rstrip().endswith("}")
    assert err == ""


def test_json_names_discrete_estimator(capsys):
    res = fit_json(capsys, *MIXTURE, *QUICK)
    assert res["estimator"] == "reparam + enumerate (z)"
    res = fit_json(capsys, *MIXTURE, *QUICK, "--estimator", "score")
    assert res["estimator"] == "reparam + score (z)"


# ---- reproducibility ----------------------------------------------------------------------------------------
def _strip(res):
    return {k: v for k, v in res.items() if k not in ("seconds", "process_seconds")}


def test_seed_reproducible_bit_for_bit(capsys):
    a = fit_json(capsys, *EIGHT, *QUICK, "--seed", "7")
    b = fit_json(capsys, *EIGHT, *QUICK, "--seed", "7")
    assert json.dumps(_strip(a), sort_keys=True) == json.dumps(_strip(b), sort_keys=True)
    c = fit_json(capsys, *EIGHT, *QUICK, "--seed", "8")
    assert c["params"] != a["params"]                 # the seed is used


def test_seed_reproducible_across_processes(capsys):
    a = fit_json(capsys, *POISSON, *QUICK, "--seed", "5")
    p = _cli(*POISSON, *QUICK, "--seed", "5", "--format", "json")
    assert p.returncode == 0, p.stderr
    assert json.dumps(_strip(a), sort_keys=True) == json.dumps(_strip(json.loads(p.stdout)), sort_keys=True)


def test_seed_reproducible_with_score_path(capsys):
    a = fit_json(capsys, *MIXTURE, *QUICK, "--estimator", "score", "--seed", "2")
    b = fit_json(capsys, *MIXTURE, *QUICK, "--estimator", "score", "--seed", "2")
    assert a["params"] == b["params"] and a["elbo"] == b["elbo"]


# ---- steps ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 137, 450])
def test_tol_zero_runs_exactly_n_steps(capsys, n):
    res = fit_json(capsys, *POISSON, "--tol", "0", "--steps", str(n), "--draws", "100")
    assert res["steps"] == n
    assert res["converged"] is False


def test_converges_before_the_cap(capsys):
    res = fit_json(capsys, *POISSON, "--steps", "5000", "--draws", "100")
    assert res["converged"] is True and res["steps"] < 5000 and res["steps"] % 100 == 0


# ---- --out DIR ----------------------------------------------------------------------------------------------
def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_out_writes_three_csvs(capsys, tmp_path):
    out = tmp_path / "res"
    res = fit_json(capsys, *EIGHT, "--tol", "0", "--steps", "120", "--draws", "250", "--out", str(out))
    assert {"draws.csv", "summary.csv", "elbo.csv"} <= set(os.listdir(out))
    names = list(res["params"])
    h, rows = _read_csv(out / "draws.csv")
    assert h == ["lp__", "log_q__"] + names and len(rows) == 250 and all(len(r) == len(h) for r in rows)
    vals = [[float(x) for x in r] for r in rows]
    assert all(math.isfinite(x) for r in vals for x in r)
    vals = [r[2:] for r in vals]
    # the summary is of these draws
    j = names.index("tau")
    col = [r[j] for r in vals]
    assert abs(sum(col) / len(col) - res["params"]["tau"]["mean"]) < 1e-9 * max(1, abs(res["params"]["tau"]["mean"]))
    h, rows = _read_csv(out / "summary.csv")
    assert h == ["name", "label", "mean", "sd", "q5", "q50", "q95"]
    assert [r[0] for r in rows] == names and [r[1] for r in rows] == names     # no level labels here
    for r in rows:
        assert float(r[2]) == pytest.approx(res["params"][r[0]]["mean"], rel=1e-12, abs=1e-12)
    h, rows = _read_csv(out / "elbo.csv")
    assert h == ["step", "elbo"] and len(rows) == 120
    assert [int(r[0]) for r in rows] == list(range(1, 121))
    # nothing left behind next to it
    assert sorted(os.listdir(tmp_path)) == ["res"]


def test_out_refuses_existing_dir(capsys, tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, stdout, err = run(capsys, *POISSON, *QUICK, "--out", str(out))
    assert code == 1
    assert "--force" in err and "Traceback" not in err
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["res"]


def test_out_force_replaces_what_ppl_wrote(capsys, tmp_path):
    out = tmp_path / "res"
    code, _, err = run(capsys, *POISSON, *QUICK, "--out", str(out))
    assert code == 0, err
    (out / "elbo.csv").write_text("old")
    code, stdout, err = run(capsys, *POISSON, *QUICK, "--out", str(out), "--force")
    assert code == 0, err
    assert {"draws.csv", "summary.csv", "elbo.csv", "run.json"} <= set(os.listdir(out))
    assert (out / "elbo.csv").read_text().startswith("step,elbo\n")
    assert sorted(os.listdir(tmp_path)) == ["res"]


def test_out_missing_parent(capsys, tmp_path):
    code, _, err = run(capsys, *POISSON, *QUICK, "--out", str(tmp_path / "no" / "such"))
    assert code == 1 and "Traceback" not in err
    assert not (tmp_path / "no").exists()


def test_out_not_created_on_usage_error(capsys, tmp_path):
    out = tmp_path / "res"
    code, _, _ = run(capsys, *MIXTURE, *QUICK, "--estimator", "reparam", "--out", str(out))
    assert code == 2 and not out.exists()


# ---- progress -------------------------------------------------------------------------------------------------
def test_no_progress_when_stderr_is_not_a_tty():
    p = _cli(*POISSON, "--tol", "0", "--steps", "300")
    assert p.returncode == 0
    assert p.stderr == ""
    assert "/300" not in p.stdout and "[#" not in p.stdout and "\r" not in p.stdout


def _run_with_tty_stderr(*argv):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ppl", "fit", *argv], stdout=subprocess.PIPE, stderr=slave,
                            cwd=ROOT, text=True)
    os.close(slave)
    chunks = []

    def reader():
        while True:
            try:
                b = os.read(master, 4096)
            except OSError:
                return
            if not b:
                return
            chunks.append(b)
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    out, _ = proc.communicate(timeout=300)
    t.join(timeout=10)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


def test_progress_on_a_tty_but_not_with_json():
    code, out, err = _run_with_tty_stderr(*POISSON, "--tol", "0", "--steps", "400")
    assert code == 0
    assert "/400" in err and "ELBO" in err                      # the bar, on the terminal
    assert "/400" not in out and "\r" not in out                # never on stdout
    code, out, err = _run_with_tty_stderr(*POISSON, "--tol", "0", "--steps", "400", "--format", "json")
    assert code == 0
    json.loads(out)
    assert err.strip() == "", repr(err)


# ---- usage errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    ["--method", "bogus"],
    ["--estimator", "bogus"],
    ["--steps", "-1"],
    ["--draws", "0"],
    ["--tol", "-0.5"],
    ["--steps", "many"],
    ["--mc-samples", "0"],
])
def test_usage_errors_exit_2(capsys, extra):
    code, out, err = run(capsys, *POISSON, *extra)
    assert code == 2, (extra, err)
    assert out == "" and "Traceback" not in err and err.strip()


def test_reparam_on_a_discrete_latent_is_a_usage_error(capsys):
    code, out, err = run(capsys, *MIXTURE, "--estimator", "reparam")
    assert code == 2
    assert "'z'" in err and "discrete" in err and out == ""


# ---- table and --profile --------------------------------------------------------------------------------------
def test_table_header(capsys):
    code, out, err = run(capsys, *EIGHT, *QUICK)
    assert code == 0, err
    head = out.split("\n\n")[0]
    for word in ("method", "fullrank", "estimator", "reparam", "steps", "converged", "ELBO", "k-hat", "ESS", "time",
                 "verdict"):
        assert word in head, word
    body = out.split("\n\n")[1]
    assert body.split("\n")[0].split() == ["mean", "sd", "q5", "q50", "q95"]
    assert any(line.startswith("theta[8] ") for line in body.split("\n"))


def test_table_says_not_converged(capsys):
    code, out, _ = run(capsys, *POISSON, "--tol", "0", "--steps", "50", "--draws", "100")
    assert code == 0 and "not converged" in out and "50" in out


def test_profile_prints_the_stages(capsys):
    code, out, err = run(capsys, *POISSON, *QUICK, "--profile")
    assert code == 0
    for stage in ("parse", "compile", "init", "optimise", "draws", "khat", "total"):
        assert stage in err, stage
    for line in err.splitlines()[1:]:
        assert float(line.split()[1]) >= 0
    # with JSON, stdout stays pure JSON
    code, out, err = run(capsys, *POISSON, *QUICK, "--profile", "--format", "json")
    assert code == 0 and json.loads(out) and "optimise" in err
