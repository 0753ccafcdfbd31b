"""No input runs code.

Models that spell Python (`__import__`, `exec`, `eval`, `open`, attribute
access, `getattr`, `os.system`) are refused with exit 1 and a located message,
and a canary proves that nothing ran: the spelled code would create a file,
and the file must not exist afterwards.  Data files and `--set` values that
spell Python are only ever text.  Last, the ppl sources themselves never call
`eval`/`exec`/`compile`/`__import__`.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import ppl
from ppl.cli import main
from ppl.errors import PplError

ROOT = Path(__file__).resolve().parent.parent
LOCATED = re.compile(r"^(?P<path>\S+?):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.+)$")

# {c} is the canary path; each line is one model (with a latent, so it would otherwise be a model)
ATTACKS = {
    "import_system": 'x = __import__("os").system("touch {c}")',
    "import_bare": "x = __import__(os)",
    "exec_statement": "exec(\"open('{c}', 'w')\")",
    "exec_assign": "x = exec(\"open('{c}', 'w')\")",
    "eval_string": "x = eval(\"open('{c}', 'w')\")",
    "eval_name": "x = eval(mu)",
    "open_call": 'x = open("{c}", "w")',
    "open_name": "x = open(mu, mu)",
    "dunder_class": "x = mu.__class__",
    "dunder_chain": "x = mu.__class__.__base__.__subclasses__()",
    "getattr_string": 'x = getattr(mu, "__class__")',
    "getattr_name": "x = getattr(mu, mu)",
    "os_system": 'x = os.system("touch {c}")',
    "os_system_bare": "x = os.system(mu)",
    "lambda": "x = lambda: open('{c}', 'w')",
    "subscript_string": 'x = mu["__class__"]',
    "semicolon": "mu2 = mu; open('{c}', 'w')",
    "sample_exec": "y ~ exec(\"open('{c}', 'w')\")",
    "dist_eval": "y ~ eval(mu)",
    "type_import": "y: __import__ ~ normal(0, 1)",
    "compile_call": "x = compile(mu, mu, mu)",
    "builtins": "x = __builtins__(mu)",
}


def _model(tmp_path: Path, body: str) -> tuple[Path, Path]:
    canary = tmp_path / "pwned"
    src = tmp_path / "attack.ppl"
    src.write_text("mu ~ normal(0, 1)\n" + body.format(c=canary) + "\n")
    return src, canary


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("cmd", ["check", "graph"])
def test_python_spelled_in_a_model_is_refused(name, cmd, tmp_path, capsys, monkeypatch):
    src, canary = _model(tmp_path, ATTACKS[name])
    monkeypatch.chdir(tmp_path)
    code = main([cmd, str(src)])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert not canary.exists(), "the model ran code"
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.splitlines()
    m = LOCATED.match(lines[0])
    assert m and m.group("path") == str(src), err
    assert int(m.group("line")) >= 2            # the attack, not the harmless first line
    assert len(lines) >= 3 and "^" in lines[2], err


@pytest.mark.parametrize("name", ["import_system", "exec_statement", "eval_string", "open_call", "os_system"])
def test_refused_through_the_api_too(name, tmp_path):
    src, canary = _model(tmp_path, ATTACKS[name])
    with pytest.raises(PplError) as e:
        ppl.load(str(src)).check()
    assert not canary.exists()
    assert all(d.span is not None for d in e.value.diagnostics)


def test_python_names_are_plain_names(tmp_path, capsys):
    """Names like `__import__` or `eval` are ordinary ppl names; nothing Python is looked up."""
    src = tmp_path / "names.ppl"
    src.write_text("__import__ ~ normal(0, 1)\neval ~ half_normal(1)\n__class__ = __import__ * eval\n"
                   "exec ~ normal(__class__, eval)\n")
    assert main(["check", str(src)]) == 0
    g = ppl.load(str(src)).graph()
    assert {"__import__", "eval", "__class__", "exec"} <= set(g.nodes)


def test_a_pattern_is_only_a_glob(tmp_path, capsys):
    """The one string in the language, `from "pattern"`, is matched against column names, never run."""
    canary = tmp_path / "pwned"
    model = tmp_path / "m.ppl"
    model.write_text(f'data X: real[N, D] from "__import__(\'os\').system(\'touch {canary}\')"\n'
                     "b[D] ~ normal(0, 1)\n")
    data = tmp_path / "d.csv"
    data.write_text("x1,x2\n1,2\n")
    assert main(["check", str(model), str(data)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{model}:1:6: error: no CSV column matches")
    assert not canary.exists()


DATA_MODEL = """\
data x: real[N]
data g: level[N] of K
a[K] ~ normal(0, 1)
s ~ half_normal(1)
x ~ normal(a[g], s)
"""


def _data_attack(tmp_path):
    """(canary file, model file, a Python string that would create the canary if it were ever run)."""
    canary = tmp_path / "pwned"
    model = tmp_path / "m.ppl"
    model.write_text(DATA_MODEL)
    return canary, model, f"__import__('os').system('touch {canary}')"


def test_python_in_csv_cells_is_just_text(tmp_path, capsys):
    canary, model, attack = _data_attack(tmp_path)
    # as a level label it is a label like any other
    ok = tmp_path / "ok.csv"
    ok.write_text(f'x,g\n1.0,"{attack}"\n2.0,b\n')
    assert main(["check", str(model), str(ok)]) == 0
    # as a number it is not a number
    bad = tmp_path / "bad.csv"
    bad.write_text(f'x,g\n"{attack}",a\n2.0,b\n')
    assert main(["check", str(model), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:1: error: row 1, column 'x':" in err and "is not a number" in err
    assert not canary.exists()


def test_python_in_json_and_set_is_just_text(tmp_path, capsys):
    canary, model, attack = _data_attack(tmp_path)
    js = tmp_path / "d.json"
    js.write_text('{"x": ["%s", 1.0], "g": [1, 2]}' % attack.replace('"', '\\"'))
    assert main(["check", str(model), str(js)]) == 1
    assert "is not a number" in capsys.readouterr().err
    ok = tmp_path / "ok.csv"
    ok.write_text("x,g\n1.0,a\n2.0,b\n")
    assert main(["check", str(model), str(ok), "--set", f"K={attack}"]) == 2     # a malformed --set: usage
    err = capsys.readouterr().err
    assert err.startswith("ppl check: error: --set K=") and "is not a number" in err
    assert not canary.exists()


# ---- the sources never evaluate text ---------------------------------------------
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "execfile", "import_module"}


def _python_sources():
    return sorted(p for p in (ROOT / "ppl").rglob("*.py"))


def test_sources_never_call_eval_or_exec():
    bad = []
    for path in _python_sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            # `x.eval()` on an object (torch's Module.eval) is not Python's eval; the builtins are bare names,
            # or reached through builtins / importlib
            if isinstance(f, ast.Name) and name in FORBIDDEN_CALLS:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}(...)")
            elif isinstance(f, ast.Attribute) and name in FORBIDDEN_CALLS and \
                    isinstance(f.value, ast.Name) and f.value.id in ("builtins", "importlib", "__builtins__"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {f.value.id}.{name}(...)")
    assert not bad, "the sources evaluate text: " + ", ".join(bad)


def test_sources_grep_clean():
    """A plain text search as well, in case a call hides from the AST walk (e.g. in a string run later)."""
    pattern = re.compile(r"(?<![\w.])(eval|exec)\s*\(")
    hits = []
    for path in _python_sources():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, hits
