"""ppl/summary.py: level labels, discrete latents as probabilities, --vars, --quantiles, --hdi."""
from __future__ import annotations

import numpy as np
import pytest

import ppl
from ppl.cli import main
from conftest import MODELS

M = str(MODELS)
from ppl.errors import UsageError
from ppl.summary import hdi, parse_vars, summarize


def test_level_labels_name_the_elements(saved_fit, capsys):
    d = saved_fit("radon")
    capsys.readouterr()
    assert main(["summary", str(d), "--vars", "a[Carver],sigma*"]) == 0
    body = capsys.readouterr().out.split("\n\n")[1].splitlines()
    assert [line.split()[0] for line in body[1:]] == ["sigma_a", "a[Carver]", "sigma_y"]
    fit = ppl.load_fit(str(d))
    k = fit.model.levels["county"].index("Carver")
    assert float(body[2].split()[1]) == pytest.approx(np.mean(fit.draws["a"][:, k]), abs=1e-3)
    text = (d / "summary.csv").read_text().splitlines()
    assert text[0] == "name,label,mean,sd,q5,q50,q95" and f"a[{k + 1}],a[Carver]," in "\n".join(text)


def test_discrete_latents_as_probabilities_and_hidden_by_default(saved_fit, capsys):
    d = saved_fit("mixture")
    capsys.readouterr()
    assert main(["summary", str(d)]) == 0
    out = capsys.readouterr().out
    assert "z[1]" not in out and "(z: 150 discrete elements not shown; --vars z shows them)" in out
    assert main(["summary", str(d), "--vars", "z"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("z[")]
    assert len(rows) == 150 and all(abs(float(r[1]) + float(r[2]) - 1) < 1e-9 for r in rows)
    fit = ppl.load_fit(str(d))
    assert float(rows[0][2]) == pytest.approx(np.mean(fit.draws["z"][:, 0] == 2))


def test_quantiles_and_hdi_columns():
    rng = np.random.default_rng(0)
    draws = {"x": rng.normal(0, 1, (40000, 1))}
    model = ppl.loads("x[1] ~ normal(0, 1)\n").check()
    s = summarize(model, draws, None, "0.025,0.975", 0.9)
    assert s.columns == ["mean", "sd", "q2.5", "q97.5", "hdi90_lo", "hdi90_hi"]
    v = s.rows[0].values
    assert v["q2.5"] == pytest.approx(-1.96, abs=0.05) and v["hdi90_hi"] == pytest.approx(1.645, abs=0.05)
    # an HDI is the narrowest interval: for a skewed sample it hugs the mode
    lo, hi = hdi(rng.exponential(1.0, 40000), 0.9)
    assert lo == pytest.approx(0.0, abs=0.01) and hi == pytest.approx(np.log(10), abs=0.05)


@pytest.mark.parametrize("argv,words", [
    (["--vars", "nope"], "--vars: nothing is called 'nope'"),
    (["--quantiles", "0.5,1.5"], "--quantiles takes probabilities between 0 and 1"),
    (["--quantiles", "abc"], "--quantiles takes probabilities between 0 and 1, got 'abc'"),
    (["--hdi", "2"], "--hdi takes a probability between 0 and 1"),
])
def test_summary_option_errors_are_usage_errors(saved_fit, capsys, argv, words):
    d = saved_fit("eight_schools")
    capsys.readouterr()
    assert main(["summary", str(d)] + argv) == 2
    assert words in capsys.readouterr().err


def test_fit_quantiles_checked_before_the_fit(capsys):
    assert main(["fit", M + "/eight_schools.ppl", M + "/eight_schools.csv", "--quantiles", "0"]) == 2


def test_parse_vars_keeps_brackets_whole():
    assert parse_vars("a[1,2], b ,c*") == ["a[1,2]", "b", "c*"]
    with pytest.raises(UsageError):
        parse_vars(" , ")
