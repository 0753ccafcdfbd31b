"""FitConfig: every option checked once, for the command line and for Python alike; a bad option is a
usage error (exit 2) naming the option as the caller spelled it, before any data is read or fit run."""
from __future__ import annotations

import pytest

import ppl
from ppl.cli import main
from ppl.config import FitConfig
from ppl.errors import UsageError
from conftest import model_paths

EIGHT = model_paths("eight_schools")

CLI_CASES = [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive step size"),
    (["--lr", "0"], "--lr must be a positive step size"),
    (["--lr", "nan"], "--lr must be a number"),
    (["--tol", "-0.1"], "--tol must be a non-negative number"),
    (["--draws", "0"], "--draws must be at least 1"),
    (["--mc-samples", "0"], "--mc-samples must be at least 1"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--rank", "3"], "--rank applies to --method lowrank, not to --method auto"),
    (["--method", "meanfield", "--rank", "3"], "--rank applies to --method lowrank, not to --method meanfield"),
    (["--method", "lowrank", "--rank", "0"], "--rank must be at least 1"),
    (["--alpha", "0.3"], "--alpha applies to --objective renyi, not to --objective elbo"),
    (["--objective", "iwae", "--alpha", "0.3"], "--alpha applies to --objective renyi"),
    (["--method", "bogus"], "unknown method 'bogus' for --method (valid: auto, meanfield, fullrank, lowrank, flow, graph, mixture)"),
    (["--objective", "kl"], "unknown objective 'kl' for --objective"),
    (["--estimator", "score-all"], "unknown estimator 'score-all' for --estimator"),
    (["--estimator", "score"], "--estimator score applies to discrete latents, and the model has none"),
    (["--estimator", "enumerate"], "--estimator enumerate applies to discrete latents"),
    (["--optimizer", "dadvi", "--method", "flow"], "--optimizer dadvi needs --method meanfield or fullrank"),
    (["--optimizer", "dadvi", "--objective", "iwae"], "--optimizer dadvi needs"),
    (["--optimizer", "sgd"], "unknown optimizer 'sgd' for --optimizer (valid: auto, adam, dadvi, anneal)"),
    (["--init", "mode"], "unknown init 'mode' for --init (valid: laplace, zero)"),
    (["--dtype", "float16"], "unknown dtype 'float16' for --dtype"),
    (["--device", "tpu"], "unknown device 'tpu' for --device"),
]


@pytest.mark.parametrize("extra,message", CLI_CASES)
def test_cli_usage_errors(extra, message, capsys):
    code = main(["fit", *EIGHT, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("ppl fit: error: ") and message in err, err
    assert "Traceback" not in err and "internal error" not in err


def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["fit", *EIGHT, "--device", "cuda"]) == 2
    assert "no CUDA device is available here" in capsys.readouterr().err


PY_CASES = [
    (dict(draws=0), "draws= must be at least 1"),
    (dict(steps=0), "steps= must be at least 1"),
    (dict(lr=-1.0), "lr= must be a positive step size"),
    (dict(method="meanfield", rank=2), "rank= applies to method= lowrank, not to method='meanfield'"),
    (dict(alpha=0.5), "alpha= applies to objective= renyi"),
    (dict(steps=2.5), "steps= takes a whole number, got 2.5"),
    (dict(method=3), "method= takes a name, got 3"),
    (dict(sted=10), "unknown option sted="),
    (dict(estimator="score"), "estimator='score' applies to discrete latents"),
]


@pytest.mark.parametrize("options,message", PY_CASES)
def test_python_usage_errors_name_keywords(options, message):
    with pytest.raises(UsageError) as ei:
        ppl.load(EIGHT[0]).fit(EIGHT[1], **options)
    assert message in str(ei.value)
    assert "--" not in str(ei.value)                   # Python callers see keywords, not flags


def test_options_are_checked_before_the_data_are_read():
    with pytest.raises(UsageError, match="draws= must be at least 1"):
        ppl.load(EIGHT[0]).fit("/nonexistent/data.csv", draws=0)


def test_valid_configs():
    c = FitConfig.from_python(method="lowrank", rank=3, objective="renyi", alpha=0.3, steps=5.0)
    assert c.steps == 5 and c.rank == 3 and c.caller == "python"
    assert FitConfig().opt("mc_samples") == "mc_samples=" and FitConfig(caller="cli").opt("mc_samples") == "--mc-samples"
