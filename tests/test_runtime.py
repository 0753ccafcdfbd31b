"""The run-time seam: the row axis from the checker, per-row data in a Batch with its scale, data-only
sub-expressions cached per batch, and the compiled model's answer on a batch against the full data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ppl
from ppl.backend.log_joint import LogJoint
from ppl.backend.runtime import Batch, Runtime
from ppl.plan import plan
from conftest import model_paths

DT = torch.float64


@pytest.mark.parametrize("name,symbol,per_row", [
    ("eight_schools", "J", {"y", "sigma", "theta_raw", "theta"}),
    ("radon", "N", {"log_radon", "floor", "county"}),
    ("logistic", "N", {"X", "y"}),
    ("mixture", "N", {"y", "z"}),
    ("poisson", "N", {"deaths", "exposure", "age"}),
])
def test_row_axis_of_the_shipped_models(name, symbol, per_row):
    m = ppl.load(model_paths(name)[0]).check(model_paths(name)[1])
    assert m.rows.symbol == symbol and set(m.rows.per_row) == per_row and not m.rows.mixes_rows
    assert m.rows.size == m.dims[symbol]


ROWS = """
data y: real[N]
data x: real[N]
data X: real[N, D]
data g: level[N] of K
a[K] ~ normal(0, 1)
b[D] ~ normal(0, 1)
z[N] ~ normal(0, 1)
s ~ normal(sum(y), 1)
e1 = exp(x) * 2 + a[g]
e2 = X @ b
e3 = softmax(X)
t1 = mean(x)
t2 = cumsum(x)
t3 = y[1]
t4 = [x, y]
y ~ normal(e1 + e2 + z + t1, 1)
"""


def test_row_axis_rules():
    data = {"y": [1.0, 2.0, 3.0], "x": [0.1, 0.2, 0.3], "X": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
            "g": [1, 2, 1], "K": 2}
    m = ppl.loads(ROWS, "rows.ppl").check(data)
    assert set(m.rows.per_row) == {"y", "x", "X", "g", "z", "e1", "e2", "e3"}
    assert set(m.rows.mixes_rows) == {"s", "t1", "t2", "t3", "t4"}


POISSON = """
data deaths: int[N]
data exposure: real[N]
data age: real[N]
a ~ normal(0, 5)
b ~ normal(0, 1)
deaths ~ poisson_log(log(exposure) + a + b * age)
"""


def _poisson(n=11, seed=0):
    rng = np.random.default_rng(seed)
    age = rng.normal(size=n)
    exposure = rng.uniform(0.5, 2.0, n)
    deaths = rng.poisson(exposure * np.exp(0.3 + 0.5 * age))
    model = ppl.loads(POISSON, "p.ppl").check({"deaths": deaths.tolist(), "exposure": exposure.tolist(),
                                               "age": age.tolist()})
    return model, LogJoint(model, plan(model), Runtime(dtype=DT))


def test_per_row_data_come_with_the_batch_and_globals_are_folded():
    model, lj = _poisson()
    assert set(lj.row_data) == {"deaths", "exposure", "age"} and "N" in lj.known
    theta = torch.randn(5, lj.dim, dtype=DT, generator=torch.Generator().manual_seed(1))
    full = lj.log_prob(theta)
    assert torch.equal(full, lj.log_prob(theta, batch=Batch.rows(lj.row_data, torch.arange(11), 11)))
    # the data-only sub-expression log(exposure) is made once per batch and kept in its cache
    cached = [v for v in lj.batch.cache.values() if torch.is_tensor(v) and v.shape == (1, 11)]
    assert any(torch.allclose(v, torch.log(lj.row_data["exposure"])) for v in cached)


def test_scaled_batches_average_to_the_full_objective_and_gradient():
    """Per-row terms times N/B, global terms once: over an epoch of batches (a ragged last one),
    the batch objectives weighted by B/N add up to the full objective, and so do their gradients."""
    model, lj = _poisson(n=11)
    theta = torch.randn(4, lj.dim, dtype=DT, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    full = lj.log_prob(theta).sum()
    g_full, = torch.autograd.grad(full, theta)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(3))
    total, g_total = 0.0, torch.zeros_like(theta)
    for idx in (perm[:4], perm[4:8], perm[8:]):           # 4, 4, 3 rows
        b = Batch.rows(lj.row_data, idx, 11)
        assert b.scale == pytest.approx(11 / len(idx))
        v = lj.log_prob(theta, batch=b).sum()
        g, = torch.autograd.grad(v, theta)
        w = len(idx) / 11
        total = total + w * float(v.detach())
        g_total += w * g
    assert total == pytest.approx(float(full.detach()), rel=1e-12)
    torch.testing.assert_close(g_total, g_full, rtol=1e-10, atol=1e-12)


def test_enumerated_latent_terms_are_per_row_and_scaled():
    data = {"y": [-2.1, -1.7, 2.2, 1.9, -2.5, 2.4, 0.3]}
    from pathlib import Path
    src = Path(model_paths("mixture")[0]).read_text()
    m = ppl.loads(src, "mix.ppl").check(data)
    lj = LogJoint(m, plan(m), Runtime(dtype=DT))
    theta = torch.randn(3, lj.dim, dtype=DT, generator=torch.Generator().manual_seed(4))
    full = lj.log_prob(theta)
    parts = [Batch.rows(lj.row_data, torch.tensor(ix), 7) for ix in ([0, 1, 2], [3, 4, 5], [6])]
    total = sum((len(b.data["y"][0]) / 7) * lj.log_prob(theta, batch=b) for b in parts)
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-10)


def test_float32_runtime_fits_eight_schools():
    f = ppl.load(model_paths("eight_schools")[0]).fit(model_paths("eight_schools")[1], dtype="float32", seed=1)
    s = f.summary()
    assert f.draws["mu"].dtype == np.float32
    assert abs(s["mu"]["mean"] - 4.4) < 0.6 and 2.8 < s["mu"]["sd"] < 3.8
