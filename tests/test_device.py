"""--device: auto picks the CPU where there is no GPU and says so; on a GPU (tests skipped without one)
the fit runs there, float64 and float32, and agrees with the CPU's."""
from __future__ import annotations

import os

import pytest
import torch

import ppl
from conftest import MODELS

EIGHT = os.path.join(MODELS, "eight_schools")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_auto_picks_the_cpu_without_a_gpu_and_says_so():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    f = ppl.load(EIGHT + ".ppl").fit(EIGHT + ".csv", device="auto", seed=1, draws=200)
    assert f.device == "cpu (auto: no CUDA device)"
    from ppl import report
    assert "on cpu (auto: no CUDA device)" in report.table(f, 1.0, None, None, None)


@gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_fit_on_the_gpu_agrees_with_the_cpu(dtype):
    cpu = ppl.load(EIGHT + ".ppl").fit(EIGHT + ".csv", seed=1, draws=4000)
    f = ppl.load(EIGHT + ".ppl").fit(EIGHT + ".csv", device="cuda", dtype=dtype, seed=1, draws=4000)
    assert f.device.startswith("cuda")
    a, b = cpu.summary(), f.summary()
    for k in ("mu", "tau", "theta[1]"):
        assert abs(a[k]["mean"] - b[k]["mean"]) < 0.1 * a[k]["sd"] and abs(b[k]["sd"] / a[k]["sd"] - 1) < 0.1
