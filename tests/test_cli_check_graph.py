"""CLI: `ppl check` and `ppl graph` in-process (exit codes, outputs, files), plus
a subprocess check that neither imports torch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from ppl import __version__
from ppl.cli import main

from conftest import MODEL_NAMES, MODELS, REFERENCE, ROOT, model_paths, reference_names, reference_paths

EIGHT = [str(MODELS / "eight_schools.ppl"), str(MODELS / "eight_schools.csv")]
EIGHT_EDGES = {("mu", "theta"), ("tau", "theta"), ("theta_raw", "theta"), ("theta", "y"), ("sigma", "y")}
HAVE_DOT = shutil.which("dot") is not None


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- top level ------------------------------------------------------------------------------
def test_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0 and out.strip() == f"ppl {__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["check", "--help"], ["graph", "--help"]])
def test_help(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 0 and out.startswith("usage: ppl")


def test_graph_help_lists_formats(capsys):
    code, out, _ = run(capsys, "graph", "--help")
    for fmt in ("text", "dot", "json", "png", "svg"):
        assert fmt in out


@pytest.mark.parametrize("argv", [
    [],                                               # no subcommand
    ["check"],                                        # no model
    ["frobnicate", "x.ppl"],                          # unknown subcommand
    ["check", *EIGHT, "--bogus"],                     # unknown option
    ["graph", *EIGHT, "--format", "bogus"],           # unknown format
    ["graph", *EIGHT, "--format", "png"],             # png needs -o
    ["graph", *EIGHT, "--format", "svg"],             # svg needs -o
])
def test_usage_errors_exit_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.strip()
    assert "Traceback" not in err


def test_png_without_output_says_so(capsys):
    code, _, err = run(capsys, "graph", *EIGHT, "--format", "png")
    assert code == 2 and "-o FILE" in err


# ---- ppl check ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_check_bundled_models_exit_0(capsys, name):
    code, out, err = run(capsys, "check", *model_paths(name))
    assert code == 0, err
    assert out.startswith(f"{model_paths(name)[0]}: ok (")
    assert err == ""


def test_check_eight_schools_summary(capsys):
    code, out, _ = run(capsys, "check", *EIGHT)
    assert code == 0
    assert out.strip() == f"{EIGHT[0]}: ok (3 latent, 1 observed; J=8)"


def test_check_without_data(capsys):
    code, out, _ = run(capsys, "check", EIGHT[0])
    assert code == 0 and out.strip() == f"{EIGHT[0]}: ok (3 latent, 1 observed)"


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="no ../shared/reference")
@pytest.mark.parametrize("name", reference_names())
def test_check_reference_models_exit_0(capsys, name):
    mpath, data = reference_paths(name)
    code, out, err = run(capsys, "check", mpath, *data)
    assert code == 0, err
    assert ": ok (" in out


def test_check_with_set(capsys, write):
    m = write("m.ppl", "data s: real<lower=0>\nmu ~ normal(0, s)\n")
    code, out, err = run(capsys, "check", m, "--set", "s=2")
    assert code == 0, err
    code, out, err = run(capsys, "check", m, "--set", "s=-2")
    assert code == 1 and "violates the bound lower=0" in err


def test_check_dump_ast_and_ir(capsys):
    code, out, _ = run(capsys, "check", EIGHT[0], "--dump", "ast")
    assert code == 0 and out.startswith("DataDecl @2:1") and "Assign @8:1" in out
    code, out, _ = run(capsys, "check", *EIGHT, "--dump", "ir")
    assert code == 0
    lines = {ln.split()[1]: ln.split()[0] for ln in out.splitlines()}
    assert lines == {"sigma": "data", "mu": "latent", "tau": "latent", "theta_raw": "latent",
                     "theta": "deterministic", "y": "observed"}


def test_check_model_error_exit_1_located(capsys, tmp_path, monkeypatch):
    src = (MODELS / "radon.ppl").read_text().replace("b * floor, sigma_y", "b * floo, sigma_y")
    (tmp_path / "radon.ppl").write_text(src)
    shutil.copy(MODELS / "radon.csv", tmp_path / "radon.csv")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "check", "radon.ppl", "radon.csv")
    assert code == 1 and out == ""
    assert err.splitlines() == [                                        # DESIGN §4, verbatim
        "radon.ppl:11:36: error: unknown name 'floo'; did you mean 'floor'?",
        "   11 | log_radon ~ normal(a[county] + b * floo, sigma_y)",
        "      |                                    ^^^^",
    ]


def test_check_several_errors_in_source_order(capsys, write):
    m = write("m.ppl", "a ~ normal(0, 1)\nc = a + zzz\nd ~ normall(0, 1)\ne = exx(1)\n")
    code, _, err = run(capsys, "check", m)
    assert code == 1
    heads = [ln for ln in err.splitlines() if ": error: " in ln]
    assert [h.split(":")[1] for h in heads] == ["2", "3", "4"]


def test_check_syntax_error_exit_1(capsys, write):
    m = write("m.ppl", "mu ~ normal(0, 1\n")
    code, _, err = run(capsys, "check", m)
    assert code == 1 and err.startswith(f"{m}:") and "error: unexpected end of file" in err
    assert "Traceback" not in err


def test_check_data_error_exit_1(capsys, write):
    d = write("d.csv", "y,sigma\n28,15\nn/a,10\n")
    code, _, err = run(capsys, "check", EIGHT[0], d)
    assert code == 1
    assert err.splitlines()[0] == f"{d}:3:1: error: row 2, column 'y': 'n/a' is not a number"


def test_check_missing_files_exit_1(capsys):
    code, _, err = run(capsys, "check", "/nonexistent/m.ppl")
    assert code == 1 and err.startswith("/nonexistent/m.ppl: error: cannot read model file")
    code, _, err = run(capsys, "check", EIGHT[0], "/nonexistent/d.csv")
    assert code == 1 and "/nonexistent/d.csv: error: cannot read data file" in err


def test_debug_shows_traceback(capsys, write):
    m = write("m.ppl", "mu ~ normal(0, zz)\n")
    code, _, err = run(capsys, "check", m)
    assert code == 1 and "Traceback" not in err
    code, _, err = run(capsys, "check", m, "--debug")
    assert code == 1 and "Traceback" in err and "unknown name 'zz'" in err


# ---- ppl graph ---------------------------------------------------------------------------------
def test_graph_text_default(capsys):
    code, out, _ = run(capsys, "graph", *EIGHT)
    assert code == 0
    assert out.splitlines()[0].startswith(f"model {EIGHT[0]}")
    assert any(ln.split()[:2] == ["deterministic", "theta[8]"] for ln in out.splitlines())


def test_graph_json_structure(capsys):
    code, out, err = run(capsys, "graph", *EIGHT, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    nodes = {d["name"]: d for d in doc["nodes"]}
    assert set(nodes) == {"y", "sigma", "mu", "tau", "theta_raw", "theta"}
    assert nodes["y"]["kind"] == "observed" and nodes["sigma"]["kind"] == "data"
    assert nodes["y"]["type"] == "real" and nodes["sigma"]["type"] == "real"
    for lat, sup in (("mu", "real"), ("tau", "(0, inf)"), ("theta_raw", "real")):
        assert nodes[lat]["kind"] == "latent" and nodes[lat]["support"] == sup
        assert nodes[lat]["estimator"] == "reparam"
    assert nodes["theta"]["kind"] == "deterministic"
    assert {tuple(e) for e in doc["edges"]} == EIGHT_EDGES
    assert doc["estimators"] == "reparam"


def test_graph_json_mixture_enumerate(capsys):
    code, out, _ = run(capsys, "graph", *model_paths("mixture"), "--format", "json")
    assert code == 0
    nodes = {d["name"]: d for d in json.loads(out)["nodes"]}
    assert nodes["z"]["estimator"] == "enumerate"
    code, out, _ = run(capsys, "graph", *model_paths("mixture"), "--format", "json", "--estimator", "score")
    assert code == 0
    assert {d["name"]: d for d in json.loads(out)["nodes"]}["z"]["estimator"] == "score"


def test_graph_estimator_reparam_on_discrete_exit_2(capsys):
    code, _, err = run(capsys, "graph", *model_paths("mixture"), "--estimator", "reparam")
    assert code == 2 and "'z' is discrete" in err


def test_graph_dot_text(capsys):
    code, out, _ = run(capsys, "graph", *EIGHT, "--format", "dot")
    assert code == 0
    assert out.startswith("digraph model {")
    for u, v in EIGHT_EDGES:
        assert f'"{u}" -> "{v}";' in out


def test_graph_output_file_text_and_json(capsys, tmp_path):
    out_file = tmp_path / "g.json"
    code, out, _ = run(capsys, "graph", *EIGHT, "--format", "json", "-o", str(out_file))
    assert code == 0 and out == ""
    assert {tuple(e) for e in json.loads(out_file.read_text())["edges"]} == EIGHT_EDGES
    assert sorted(os.listdir(tmp_path)) == ["g.json"]          # no temp file left behind


@pytest.mark.skipif(not HAVE_DOT, reason="Graphviz dot not installed")
def test_graph_png(capsys, tmp_path):
    out_file = tmp_path / "graph.png"
    code, out, err = run(capsys, "graph", *EIGHT, "--format", "png", "-o", str(out_file))
    assert code == 0, err
    assert out_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["graph.png"]


@pytest.mark.skipif(not HAVE_DOT, reason="Graphviz dot not installed")
def test_graph_svg(capsys, tmp_path):
    out_file = tmp_path / "graph.svg"
    code, out, err = run(capsys, "graph", *EIGHT, "--format", "svg", "-o", str(out_file))
    assert code == 0, err
    text = out_file.read_text()
    assert "<svg" in text and "theta_raw" in text and "half_cauchy(5)" in text


@pytest.mark.skipif(not HAVE_DOT, reason="Graphviz dot not installed")
def test_graph_output_replaces_existing_file(capsys, tmp_path):
    out_file = tmp_path / "graph.svg"
    out_file.write_text("old")
    code, _, _ = run(capsys, "graph", *EIGHT, "--format", "svg", "-o", str(out_file))
    assert code == 0 and "<svg" in out_file.read_text()
    assert sorted(os.listdir(tmp_path)) == ["graph.svg"]


def _assert_dot_missing_message(code, err):
    assert code == 1
    assert "Graphviz" in err and "apt-get install graphviz" in err
    assert "brew install graphviz" in err
    assert "Traceback" not in err


def test_graph_png_without_dot_which(capsys, tmp_path, monkeypatch):
    import ppl.graph
    monkeypatch.setattr(ppl.graph.shutil, "which", lambda name, *a, **k: None)
    out_file = tmp_path / "graph.png"
    out_file.write_bytes(b"old")
    code, out, err = run(capsys, "graph", *EIGHT, "--format", "png", "-o", str(out_file))
    _assert_dot_missing_message(code, err)
    assert out_file.read_bytes() == b"old"                     # untouched on failure
    assert sorted(os.listdir(tmp_path)) == ["graph.png"]


def test_graph_svg_without_dot_on_path(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    out_file = tmp_path / "graph.svg"
    code, out, err = run(capsys, "graph", *EIGHT, "--format", "svg", "-o", str(out_file))
    _assert_dot_missing_message(code, err)
    assert not out_file.exists()


def test_graph_unwritable_output_exit_1(capsys, tmp_path):
    code, _, err = run(capsys, "graph", *EIGHT, "--format", "json", "-o", str(tmp_path / "no" / "dir" / "g.json"))
    assert code == 1 and "cannot write" in err and "Traceback" not in err


def test_graph_output_onto_a_directory_leaves_no_temp_file(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    code, _, err = run(capsys, "graph", *EIGHT, "--format", "json", "-o", str(tmp_path / "out"))
    assert code == 1 and "cannot write" in err
    assert sorted(os.listdir(tmp_path)) == ["out"]             # whole or not at all
    assert os.listdir(tmp_path / "out") == []


def test_graph_output_file_has_the_usual_mode(capsys, tmp_path):
    out_file = tmp_path / "g.txt"
    code, _, _ = run(capsys, "graph", *EIGHT, "-o", str(out_file))
    assert code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out_file.stat().st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's 0600


def test_graph_model_error_exit_1(capsys, write):
    m = write("m.ppl", "mu ~ normal(0, 1)\ny ~ normal(mu, 1)\ny ~ normal(mu, 2)\n")
    code, out, err = run(capsys, "graph", m)
    assert code == 1 and out == "" and f"{m}:3:1: error:" in err


# ---- no torch, and quick ----------------------------------------------------------------------
def test_check_and_graph_never_import_torch():
    code = ("import ppl.cli, sys; "
            "ppl.cli.main(['check', 'models/radon.ppl', 'models/radon.csv']); "
            "ppl.cli.main(['graph', 'models/mixture.ppl', 'models/mixture.csv', '--format', 'json']); "
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False"
    assert p.stdout.startswith("models/radon.ppl: ok (")


def test_check_answers_quickly():
    exe = ROOT / ".venv" / "bin" / "ppl"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ppl"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd + ["check", "models/radon.ppl", "models/radon.csv"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("models/radon.ppl: ok (")
    assert elapsed < 10, f"ppl check took {elapsed:.1f}s"       # typically well under a second
