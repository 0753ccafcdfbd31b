"""Shared fixtures for the front-end tests: paths to the bundled models and
to the reference models in ../shared/reference (skipped when absent), and
small helpers to parse / check model text."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference"

MODEL_NAMES = ("eight_schools", "radon", "logistic", "mixture", "poisson")

# centred eight schools: a funnel (no usable mode), for the edge-case tests
CENTERED = """
data y: real[J]
data sigma: real<lower=0>[J]
mu ~ normal(0, 5)
tau ~ half_cauchy(5)
theta[J] ~ normal(mu, tau)
y ~ normal(theta, sigma)
"""


def reference_names():
    if not REFERENCE.is_dir():
        return []
    return sorted(p.name for p in REFERENCE.iterdir() if (p / "model.ppl").is_file())


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"no reference models at {REFERENCE}")
    return REFERENCE


def model_paths(name: str):
    """(model.ppl, data.csv) of a bundled model, as strings."""
    return str(MODELS / f"{name}.ppl"), str(MODELS / f"{name}.csv")


def reference_paths(name: str):
    """(model.ppl, [data.csv, scalars.json]) of a reference model; skips when shared/ is absent."""
    d = REFERENCE / name
    if not (d / "model.ppl").is_file():
        pytest.skip(f"no reference model {d}")
    return str(d / "model.ppl"), [str(d / "data.csv"), str(d / "scalars.json")]


def reference_scalars(name: str) -> dict:
    return json.loads((REFERENCE / name / "scalars.json").read_text())


@pytest.fixture
def check_text():
    """check_text(src, data=None, sets=()) -> checked Model of model text."""
    import ppl

    def run(src: str, data=None, sets=(), path: str = "m.ppl"):
        return ppl.loads(src, path).check(data, sets)
    return run


@pytest.fixture
def check_errors():
    """check_errors(src, data=None, sets=()) -> the list of Diagnostics a check raises."""
    import ppl
    from ppl.errors import PplError

    def run(src: str, data=None, sets=(), path: str = "m.ppl"):
        with pytest.raises(PplError) as ei:
            ppl.loads(src, path).check(data, sets)
        return ei.value.diagnostics
    return run


@pytest.fixture
def write(tmp_path):
    """write(name, text) -> path (str) of a new file in a temp dir."""
    def run(name: str, text: str) -> str:
        p = tmp_path / name
        p.write_text(text)
        return str(p)
    return run


@pytest.fixture(scope="session")
def saved_fit(tmp_path_factory):
    """name -> the --out directory of a default fit of models/NAME.ppl (fitted once per session)."""
    from ppl.cli import main
    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp("fits") / name
            args = ["fit", str(MODELS / f"{name}.ppl"), str(MODELS / f"{name}.csv"), "--out", str(out),
                    "--format", "json", "--progress", "off"]
            assert main(args) == 0
            cache[name] = out
        return cache[name]
    return get


def need(module: str):
    """Import an optional package the test extra installs: skipped where it is missing, except in CI
    (CI=true), where the README's test command installs it and a skip would hide a missing install."""
    import importlib
    import os
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread (as the engine itself uses for small data); two threads are 10x slower
    there.  A module takes it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
