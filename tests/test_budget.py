"""The memory budget (ppl.infer.budget): an oversized fit is refused before its first large allocation,
naming the latent (exit 1, located) or the option (exit 2) that drives the size, and saying what would
fit; an allocation failure that still happens is explained, not an internal error."""
from __future__ import annotations

import resource
import subprocess
import sys

import pytest

import ppl
from ppl.cli import main
from ppl.config import FitConfig
from ppl.errors import PplError, UsageError
from conftest import model_paths

EIGHT = model_paths("eight_schools")


def _run_process(args, tmp_path):
    """Run `ppl` in a new process -> (exit code, stderr, the process's peak RSS in bytes)."""
    code = ("import resource, sys\nfrom ppl.cli import main\nrc = main(sys.argv[1:])\n"
            "sys.stderr.write('\\nPEAK %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            "sys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    peak = int(p.stderr.rsplit("PEAK", 1)[1]) * 1024
    return p.returncode, p.stderr.rsplit("PEAK", 1)[0], peak


@pytest.mark.parametrize("text,name", [
    ("K = 2000000000\nz[K] ~ normal(0, 1)\nmu ~ normal(0, 1)\n", "z"),
    ("K = 200000\nz[K, K] ~ normal(0, 1)\n", "z"),
])
def test_oversized_latents_are_refused_at_once(text, name, tmp_path):
    (tmp_path / "big.ppl").write_text(text)
    rc, err, peak = _run_process(["fit", "big.ppl"], tmp_path)
    assert rc == 1, err
    assert f"big.ppl:2:1: error: this fit needs about" in err and f"'{name}' has" in err and "make it smaller" in err
    assert "Traceback" not in err and "internal error" not in err
    assert peak < 1e9


def _wide_regression(tmp_path, D=3000):
    import numpy as np
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, D))
    lines = [",".join(["y"] + [f"x{j}" for j in range(D)])]
    lines += [",".join([repr(float(rng.normal()))] + [repr(float(v)) for v in row]) for row in X]
    (tmp_path / "wide.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "wide.ppl").write_text('data X: real[N, D] from "x*"\ndata y: real[N]\nbeta[D] ~ normal(0, 1)\n'
                                       'y ~ normal(X @ beta, 1)\n')
    return str(tmp_path / "wide.ppl"), str(tmp_path / "wide.csv")


def test_an_option_that_drives_the_size_is_a_usage_error(tmp_path, capsys):
    m, d = _wide_regression(tmp_path)
    assert main(["fit", m, d, "--method", "fullrank", "--max-memory", "200M"]) == 2
    err = capsys.readouterr().err
    assert "--method fullrank keeps 3000^2 numbers: use --method meanfield or lowrank" in err, err
    assert main(["fit", *EIGHT, "--draws", "50000000", "--max-memory", "1G"]) == 2
    assert "use fewer --draws" in capsys.readouterr().err
    assert main(["fit", m, d, "--method", "meanfield", "--mc-samples", "5000000", "--max-memory", "1G"]) == 2
    assert "use fewer --mc-samples" in capsys.readouterr().err


def test_python_callers_see_keywords(tmp_path):
    m, d = _wide_regression(tmp_path)
    with pytest.raises(UsageError, match="method='fullrank' keeps 3000\\^2 numbers"):
        ppl.load(m).fit(d, method="fullrank", max_memory="200M")
    with pytest.raises(PplError, match="'beta' has 3,000 elements"):
        ppl.load(m).fit(d, method="meanfield", max_memory=100_000)


@pytest.mark.parametrize("value,ok", [("4G", 4_000_000_000), ("512M", 512_000_000), ("1.5GB", 1_500_000_000),
                                      ("2000", 2000), ("lots", None), ("-1G", None)])
def test_max_memory_values(value, ok):
    if ok is None:
        with pytest.raises(UsageError, match="max_memory="):
            FitConfig.from_python(max_memory=value)
    else:
        assert FitConfig.from_python(max_memory=value).max_memory == ok


def test_an_ordinary_fit_is_not_refused(capsys):
    assert main(["fit", *EIGHT, "--max-memory", "2G"]) == 0


def test_an_allocation_failure_is_explained(monkeypatch, capsys):
    import ppl.infer.fit as F

    def boom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:114] . DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 320000000008 bytes")
    monkeypatch.setattr(F, "draw_and_diagnose", boom)
    assert main(["fit", *EIGHT]) == 1
    err = capsys.readouterr().err
    assert "ran out of memory" in err and "internal error" not in err and "--max-memory" in err


def test_progress_shows_time_rate_and_time_left():
    import io
    from ppl.report import Progress
    buf = io.StringIO()
    bar = Progress(buf)
    import time
    bar(1, 1000, -12.5)
    time.sleep(0.15)
    bar(100, 1000, -11.0)
    bar.phase("mode search")
    for _ in range(3):
        bar.tick(12.0)
        time.sleep(0.11)
    bar.close()
    text = buf.getvalue()
    assert "step    100/1000" in text and "steps/s" in text and "left" in text and "ELBO -11" in text
    assert "mode search: 2 evaluations" in text or "mode search: 3 evaluations" in text


def test_a_fit_reports_its_phases_to_a_progress_display():
    import io
    from ppl.report import Progress
    buf = io.StringIO()
    seen = []

    class Recording(Progress):
        def phase(self, name):
            seen.append(name)
            super().phase(name)
    ppl.load(EIGHT[0]).fit(EIGHT[1], progress=Recording(buf))
    assert seen == ["mode search", "optimise", "draws"]


def test_a_data_file_too_large_for_memory_is_refused(tmp_path, monkeypatch, capsys):
    import ppl.infer.budget as B
    monkeypatch.setattr(B, "available_memory", lambda: 100)       # bytes: less than the CSV needs
    assert main(["check", *EIGHT]) == 1
    err = capsys.readouterr().err
    assert "eight_schools.csv: error: the data files take" in err and "use fewer rows or columns" in err


def test_a_long_fit_is_announced_with_its_phases(monkeypatch):
    import io
    import ppl.infer.fit as F
    from ppl.report import Progress
    monkeypatch.setattr(F, "LONG_FIT", 0.0)            # every fit counts as long here
    buf = io.StringIO()
    ppl.load(EIGHT[0]).fit(EIGHT[1], progress=Progress(buf))
    first = buf.getvalue().split("\n")[0]
    assert "this fit may take about" in first and "mode search ~" in first and "optimisation ~" in first \
        and "draws ~" in first
