"""Output files (ppl.outdir): `ppl fit --out DIR` never loses a user's file
(only a folder ppl wrote is replaced, never the current directory, an input,
a symlink or a regular file; OS failures are located errors with nothing
half-written left), `ppl graph -o FILE` writes the format its suffix names,
and a malformed `--set` is a usage error (exit 2)."""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil

import pytest

import ppl.outdir as outdir
from ppl.cli import main
from ppl.errors import PplError

from conftest import MODELS

MODEL, DATA = MODELS / "eight_schools.ppl", MODELS / "eight_schools.csv"
FAST = ["--steps", "50", "--draws", "100", "--format", "json"]
HAVE_DOT = shutil.which("dot") is not None


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def fit(capsys, *argv):
    return run(capsys, "fit", "eight_schools.ppl", "eight_schools.csv", *FAST, *argv)


def snapshot(root):
    """Every file under root with its bytes (and every directory), to prove nothing changed."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root) + "/"] = None
        for name in files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def assert_refused(code, err, path, *words):
    assert code == 1, err
    assert err.startswith(f"{path}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err
    for w in words:
        assert w in err, err


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory with the model, its data and an unrelated file of the user's."""
    shutil.copy(MODEL, tmp_path)
    shutil.copy(DATA, tmp_path)
    (tmp_path / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def no_fit(monkeypatch):
    """A refusal must come before the fit runs."""
    import ppl.infer.fit
    monkeypatch.setattr(ppl.infer.fit, "fit", lambda *a, **k: pytest.fail("the fit ran before the refusal"))


def ppl_dir(path, **files):
    """A directory written by ppl (through outdir itself), holding `files`."""
    outdir.write_dir(str(path), {k.replace("_", "."): v for k, v in files.items()}, force=False)
    return path


# ---- ppl fit --out: what is refused, whatever --force says --------------------------------------------------
@pytest.mark.parametrize("out,words", [
    (".", ["is the current directory"]),
    ("..", ["contains the current directory"]),
    ("eight_schools.csv", ["is the input file 'eight_schools.csv'"]),
    ("eight_schools.ppl", ["is the input file 'eight_schools.ppl'"]),
    ("notes.txt", ["exists and is not a directory"]),
])
def test_out_refused_and_every_file_kept(capsys, work, no_fit, out, words):
    before = snapshot(work.parent)
    code, stdout, err = fit(capsys, "--out", out, "--force")
    assert_refused(code, err, out, *words, "choose a new --out directory")
    assert stdout == "" and snapshot(work.parent) == before


def test_out_containing_an_input_refused(capsys, work, no_fit):
    (work / "data").mkdir()
    shutil.move("eight_schools.csv", "data/eight_schools.csv")
    before = snapshot(work)
    code, _, err = run(capsys, "fit", "eight_schools.ppl", "data/eight_schools.csv", *FAST, "--out", "data", "--force")
    assert_refused(code, err, "data", "contains the input file 'data/eight_schools.csv'")
    assert snapshot(work) == before


def test_out_root_and_home_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    os.mkdir(tmp_path / "sub")
    monkeypatch.chdir(tmp_path / "sub")
    for target, words in [("/", "is the root directory"), (str(tmp_path), "is your home directory")]:
        with pytest.raises(PplError) as ei:
            outdir.check_target(target, True)
        assert words in ei.value.render()
    outdir.check_target(str(tmp_path / "new"), False)          # a new folder under home is fine


def test_out_foreign_directory_refused_with_force(capsys, work, no_fit):
    (work / "res").mkdir()
    (work / "res" / "keep.txt").write_text("mine")
    before = snapshot(work)
    code, _, err = fit(capsys, "--out", "res", "--force")
    assert_refused(code, err, "res", "has no ppl run.json, so ppl did not write it")
    assert snapshot(work) == before


@pytest.mark.parametrize("extra", ["notes.txt", "subdir/"])
def test_ppl_directory_with_a_foreign_entry_refused(capsys, work, no_fit, extra):
    ppl_dir(work / "res", draws_csv=b"old")
    if extra.endswith("/"):
        (work / "res" / extra).mkdir()
    else:
        (work / "res" / extra).write_text("mine")
    before = snapshot(work)
    code, _, err = fit(capsys, "--out", "res", "--force")
    name = extra.rstrip("/")
    assert_refused(code, err, "res", f"holds '{name}', which ppl did not write; refusing to replace it")
    assert snapshot(work) == before


def test_forged_or_broken_marker_refused(work):
    for text in ['{"kind": "something-else", "files": []}', "not json", '{"kind": "ppl-fit-output"}']:
        shutil.rmtree(work / "res", ignore_errors=True)
        (work / "res").mkdir()
        (work / "res" / "run.json").write_text(text)
        with pytest.raises(PplError) as ei:
            outdir.check_target("res", True)
        assert "ppl did not write it" in ei.value.render()
        assert os.listdir(work / "res") == ["run.json"]


def test_symlinked_out_dir_refused(capsys, work, no_fit):
    ppl_dir(work / "real", draws_csv=b"old")
    os.symlink("real", work / "link")
    before = snapshot(work)
    code, _, err = fit(capsys, "--out", "link", "--force")
    assert_refused(code, err, "link", "is a symbolic link")
    assert snapshot(work) == before and os.path.islink(work / "link")


def test_existing_ppl_directory_needs_force(capsys, work, no_fit):
    ppl_dir(work / "res", draws_csv=b"old")
    before = snapshot(work)
    code, _, err = fit(capsys, "--out", "res")
    assert_refused(code, err, "res", "exists; use --force to replace it")
    assert snapshot(work) == before


def test_ppl_directory_replaced_with_force(capsys, work):
    ppl_dir(work / "res", draws_csv=b"old", elbo_png=b"old")
    code, stdout, err = fit(capsys, "--out", "res", "--force")
    assert code == 0, err
    res = json.loads(stdout)
    names = set(os.listdir(work / "res"))
    assert names - {"elbo.png", "fit.nc"} == {"draws.csv", "summary.csv", "elbo.csv", "run.json", "fit.npz",
                                              "model.ppl", "data.json"}
    assert (work / "res" / "draws.csv").read_bytes().startswith(b"lp__,log_q__,mu,tau,")
    if importlib.util.find_spec("matplotlib") is None:
        assert "elbo.png" not in names                    # the old one went with the old folder
    else:
        assert (work / "res" / "elbo.png").read_bytes()[:4] == b"\x89PNG"
    rec = json.loads((work / "res" / "run.json").read_text())
    assert rec["kind"] == "ppl-fit-output" and rec["ppl"] and rec["created"]
    assert set(rec["files"]) | {"run.json"} == names
    assert rec["method"] == res["method"] and rec["verdict"] == res["verdict"] and rec["seed"] == 0
    assert rec["steps"] == 50 and rec["inputs"] == ["eight_schools.ppl", "eight_schools.csv"]
    assert sorted(os.listdir(work)) == ["eight_schools.csv", "eight_schools.ppl", "notes.txt", "res"]
    # what ppl wrote can be replaced again
    code, _, err = fit(capsys, "--out", "res", "--force")
    assert code == 0, err


# ---- ppl fit --out: OS failures ----------------------------------------------------------------------------
@pytest.mark.parametrize("out,words", [
    ("/proc/nope", "cannot create a directory in /proc"),
    ("notes.txt/sub", "the parent directory"),
    ("no/such/dir", "does not exist"),
])
def test_out_unwritable_is_a_located_error(capsys, work, no_fit, out, words):
    before = snapshot(work)
    code, _, err = fit(capsys, "--out", out)
    assert_refused(code, err, out, words)
    assert snapshot(work) == before


def test_full_disk_keeps_the_old_output(capsys, work, monkeypatch):
    ppl_dir(work / "res", draws_csv=b"old")
    before = snapshot(work)
    put = outdir._put

    def full(path, data):
        if os.path.basename(path) == "summary.csv":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        put(path, data)
    monkeypatch.setattr(outdir, "_put", full)
    code, stdout, err = fit(capsys, "--out", "res", "--force")
    assert_refused(code, err, "res", "cannot write the output directory: No space left on device")
    assert snapshot(work) == before                       # the old folder intact, no temp dir beside it


def _failing_replace(monkeypatch, fail):
    real = os.replace

    def replace(src, dst):
        if fail(str(src), str(dst)):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(src, dst)
    monkeypatch.setattr(outdir.os, "replace", replace)


def test_failed_swap_rolls_back(tmp_path, monkeypatch):
    ppl_dir(tmp_path / "res", draws_csv=b"old")
    before = snapshot(tmp_path)
    _failing_replace(monkeypatch, lambda src, dst: ".ppl-new-" in src)     # the new folder cannot go in
    with pytest.raises(PplError) as ei:
        outdir.write_dir(str(tmp_path / "res"), {"draws.csv": b"new"}, force=True)
    assert "cannot write the output directory: Input/output error" in ei.value.render()
    assert snapshot(tmp_path) == before


def test_failed_rollback_says_where_the_old_folder_is(tmp_path, monkeypatch):
    ppl_dir(tmp_path / "res", draws_csv=b"old")
    _failing_replace(monkeypatch, lambda src, dst: ".ppl-new-" in src or os.path.basename(dst) == "res")
    with pytest.raises(PplError) as ei:
        outdir.write_dir(str(tmp_path / "res"), {"draws.csv": b"new"}, force=True)
    msg = ei.value.render()
    kept = msg.split("is kept at ")[1].strip()
    assert open(os.path.join(kept, "draws.csv"), "rb").read() == b"old"        # not lost
    assert [n for n in os.listdir(tmp_path) if ".ppl-new-" in n] == []


def test_write_dir_on_a_new_folder(tmp_path):
    outdir.write_dir(str(tmp_path / "res"), {"a.csv": b"1\n"}, force=False, record={"kind": "other", "x": 1.5,
                                                                                     "bad": float("nan")})
    assert sorted(os.listdir(tmp_path)) == ["res"]
    assert sorted(os.listdir(tmp_path / "res")) == ["a.csv", "run.json"]
    rec = json.loads((tmp_path / "res" / "run.json").read_text())
    assert rec["kind"] == "ppl-fit-output" and rec["files"] == ["a.csv"] and rec["x"] == 1.5 and rec["bad"] is None
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "res").stat().st_mode & 0o777 == 0o777 & ~umask      # not mkdtemp's 0700


# ---- write_file (ppl graph -o) -----------------------------------------------------------------------------
def test_write_file_failures_leave_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "g.txt"
    target.write_bytes(b"old")
    with pytest.raises(PplError) as ei:
        outdir.write_file(str(tmp_path / "g.txt" / "x"), b"new")
    assert ei.value.render().startswith(f"{tmp_path}/g.txt/x: error: cannot write the file: ")
    with pytest.raises(PplError) as ei:
        outdir.write_file("/proc/nope.txt", b"new")
    assert ei.value.render().startswith("/proc/nope.txt: error: cannot write the file: ")
    _failing_replace(monkeypatch, lambda src, dst: True)
    with pytest.raises(PplError) as ei:
        outdir.write_file(str(target), b"new")
    assert "Input/output error" in ei.value.render()
    assert os.listdir(tmp_path) == ["g.txt"] and target.read_bytes() == b"old"


def test_graph_output_onto_an_input_refused(capsys, work):
    before = snapshot(work)
    code, out, err = run(capsys, "graph", "eight_schools.ppl", "--format", "text", "-o", "eight_schools.ppl")
    assert_refused(code, err, "eight_schools.ppl", "it is the input file")
    assert snapshot(work) == before


# ---- ppl graph -o: the format from the suffix ------------------------------------------------------------------
@pytest.mark.parametrize("name,check", [
    ("g.dot", lambda b: b.startswith(b"digraph model {")),
    ("g.gv", lambda b: b.startswith(b"digraph model {")),
    ("g.json", lambda b: "edges" in json.loads(b)),
    ("g.txt", lambda b: b"theta_raw" in b and not b.startswith(b"digraph")),
    pytest.param("g.png", lambda b: b[:8] == b"\x89PNG\r\n\x1a\n",
                 marks=pytest.mark.skipif(not HAVE_DOT, reason="Graphviz dot not installed")),
    pytest.param("G.SVG", lambda b: b"<svg" in b and b"theta_raw" in b,
                 marks=pytest.mark.skipif(not HAVE_DOT, reason="Graphviz dot not installed")),
])
def test_graph_format_from_suffix(capsys, tmp_path, name, check):
    code, out, err = run(capsys, "graph", MODEL, "-o", tmp_path / name)
    assert code == 0 and out == "" and err == "", err
    assert check((tmp_path / name).read_bytes())
    assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("argv,words", [
    (["-o", "g.weird"], ["cannot tell the format from the name 'g.weird'", ".png", ".svg", ".dot", ".json", ".txt"]),
    (["-o", "g"], ["cannot tell the format"]),
    (["--format", "text", "-o", "g.png"], ["--format text does not match the suffix of 'g.png'"]),
    (["--format", "png", "-o", "g.svg"], ["--format png does not match"]),
])
def test_graph_suffix_usage_errors(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "graph", MODEL, *argv)
    assert code == 2 and out == "" and err.startswith("ppl graph: error: "), err
    for w in words:
        assert w in err
    assert os.listdir(tmp_path) == []


def test_graph_explicit_format_with_an_unknown_suffix(capsys, tmp_path):
    code, _, err = run(capsys, "graph", MODEL, "--format", "dot", "-o", tmp_path / "g.out")
    assert code == 0, err
    assert (tmp_path / "g.out").read_text().startswith("digraph model {")


def test_graph_png_without_dot_gives_the_install_hint(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code, _, err = run(capsys, "graph", MODEL, "-o", tmp_path / "g.png")
    assert code == 1 and "apt-get install graphviz" in err
    assert os.listdir(tmp_path) == []


# ---- a malformed --set is a usage error ------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["check", "graph", "fit"])
@pytest.mark.parametrize("bad,msg", [
    ("N", "--set 'N' is not NAME=VALUE"),
    ("N=abc", "--set N=abc: 'abc' is not a number"),
    ("N=inf", "--set N=inf: the value must be a finite number"),
])
def test_malformed_set_exit_2(capsys, cmd, bad, msg):
    code, out, err = run(capsys, cmd, MODEL, DATA, "--set", bad)
    assert code == 2 and out == ""
    assert err == f"ppl {cmd}: error: {msg}\n"
