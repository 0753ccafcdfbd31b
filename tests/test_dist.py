"""Data-parallel fits (ppl/dist.py): two gloo processes on 127.0.0.1 (a free port, every collective
with a timeout) compute the one-process log density, gradient and Hessian on the same draws, with N
odd so the ranks own unequal rows -- sliced from the whole data, or read by each process alone (its
byte range of the CSV, or its own file by a `{rank}` pattern); `ppl fit --procs 2` gives the
one-process answer and, where each process read its own rows, the one-process outputs (data.json,
fit.nc's data and predictive groups); encoder fits (amortize) are the one-process fits; a row-mixing
model is refused where each process reads its own rows; a rank that fails ends the fit with its
located message and exit 1 within seconds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import need

import ppl
from ppl import dist
from ppl.backend.log_joint import LogJoint
from ppl.backend.runtime import Runtime
from ppl.errors import UsageError
from ppl.plan import plan as make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOCAL = """data y: real[N]
data x: real[N]
mu ~ normal(0, 5)
beta ~ normal(0, 2)
tau ~ half_normal(2)
z[N] ~ normal(mu + beta * x, tau)
y ~ normal(z, 0.5)
"""
MIXTURE = """data y: real[N]
mu: ordered[2] ~ normal(0, 2)
sigma[2] ~ half_normal(2)
theta ~ beta(5, 5)
z[N] ~ categorical([theta, 1 - theta])
y ~ normal(mu[z], sigma[z])
"""
REGRESSION = """data y: real[N]
data x: real[N]
mu ~ normal(0, 5)
beta ~ normal(0, 2)
sigma ~ half_normal(2)
y ~ normal(mu + beta * x, sigma)
"""
RADON_LIKE = """data y: real[N]
data x: real[N]
mu_a ~ normal(0, 10)
sigma_a ~ half_normal(5)
a[3] ~ normal(mu_a, sigma_a)
b ~ normal(0, 10)
sigma_y ~ half_normal(5)
y ~ normal(a[1] + a[2] * x + b * x * x, sigma_y)
"""
LEVELS = """data y: real[N]
data x: real[N]
data g: level[N] of K
x2 = x * x
mu_a ~ normal(0, 5)
a[K] ~ normal(mu_a, 1)
b ~ normal(0, 2)
sigma ~ half_normal(2)
y ~ normal(a[g] + b * x2, sigma)
"""
ENCODED = LOCAL + "amortize z from y, x hidden [8]\n"
ENCODED_AND_ROWS = """data y: real[N]
data x: real[N]
mu ~ normal(0, 5)
tau ~ half_normal(2)
z[N] ~ normal(mu, tau)
w[N] ~ normal(0, 1)
y ~ normal(z + 0.3 * w * x, 0.5)
amortize z from y linear
"""
ALL_ROWS = dict(seed=2, draws=200, method="meanfield", steps=30)     # an encoder fit without batch_size
MINIBATCH = dict(seed=2, draws=200, method="meanfield", batch_size=16, epochs=4)
PER_PROCESS = dict(MINIBATCH, batch_size=8)      # two processes' batches of 8: the one-process batch of 16
ROWS = dict(MINIBATCH, epochs=500)               # per-row latents: windows of 50 epochs; the test stops the fit
PASS_CHUNK = 14_000       # minibatch.CHUNK_ELEMENTS giving the final pass's 2000 draws chunks of 7 rows (one
                          # holds rows of both processes)
N = 31       # odd: rank 0 owns 16 rows, rank 1 owns 15


def _data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=N)
    y = np.where(rng.random(N) < 0.4, -1.0, 2.0) + 0.5 * x + rng.normal(size=N)
    return {"y": y.tolist(), "x": x.tolist()}


def _program(text):
    model = ppl.loads(text, "m.ppl").check(_data() if "data x" in text else {"y": _data()["y"]})
    return LogJoint(model, make_plan(model, "auto"), Runtime.make("cpu", "float64", 0))


def _own_rows_program(text, path):
    """The compiled model of this process's own rows of the CSV at `path` (ppl.data: its byte range)."""
    model = ppl.loads(text, "m.ppl").check(path)
    own = model.row_share
    program = LogJoint(model, make_plan(model, "auto"), Runtime.make("cpu", "float64", 0))
    program.use_shard(own.lo, own.hi, dist.current().leader, dist.current().world, local=True)
    return program, own


def _value_grad_hessian(program):
    g = torch.Generator().manual_seed(7)
    theta = (0.3 * torch.randn((3, program.dim), generator=g, dtype=torch.float64)).requires_grad_(True)
    value = program.log_prob(theta)
    grad, = torch.autograd.grad(value.sum(), theta)
    point = theta[0].detach().clone()
    hess = torch.autograd.functional.hessian(lambda t: program.log_prob(t.unsqueeze(0)).sum(), point)
    return value.detach().numpy(), grad.numpy(), hess.numpy()


def _block_gradients(program):
    """The gradient in each block given as its own autograd leaf (the estimators' path), in a model
    whose graph differs between processes (only the first adds the priors)."""
    g = torch.Generator().manual_seed(11)
    theta = 0.3 * torch.randn((4, program.dim), generator=g, dtype=torch.float64)
    blocks = [u.detach().clone().requires_grad_(True) for u in program.split(theta)]
    value = program.evaluate(None, blocks=blocks).total
    return [x.numpy() for x in torch.autograd.grad(value.sum(), blocks)]


def _skewed_csv(tmp_path) -> str:
    """The regression's rows, the first 24 written short and the last 7 long: each process's byte range
    then holds far from half the rows (rank 0: more than 20 of 31)."""
    d = _data()
    lines = [f"{a:.3f},{b:.3f}\n" if i < 24 else f"{a:.17e},{b:.17e}\n" for i, (a, b) in enumerate(zip(d["y"], d["x"]))]
    path = tmp_path / "skewed.csv"
    path.write_text("y,x\n" + "".join(lines))
    return str(path)


def _group_worker(rank, world, port, out, model, data, skewed):
    """Everything the in-process tests compare, in one group of two (one start-up of the workers)."""
    torch.set_num_threads(1)
    dist.init(rank, world, port, timeout=60)
    try:
        results = {}
        for key, text in (("local", LOCAL), ("mixture", MIXTURE)):
            program = _program(text)
            lo, hi = dist.share(program.model.rows.size, rank, world)
            program.use_shard(lo, hi, rank == 0, world)
            results[key] = _value_grad_hessian(program) + (hi - lo,)
        results["blocks"] = _block_gradients(_own_rows_program(RADON_LIKE, data)[0])
        for key, text in (("own-local", LOCAL), ("own-mixture", MIXTURE)):
            program, own = _own_rows_program(text, data)
            results[key] = _value_grad_hessian(program) + ((own.lo, own.hi, own.n, own.how),)
        rows = torch.arange(2.0 * (program.batch.size or 0)).reshape(1, -1, 2) + 100 * rank
        results["gather"] = dist.gather_rows(rows, 1)
        results["flat"] = dist.all_reduce_flat([torch.ones(2) * (rank + 1), torch.full((2, 3), 10.0 * rank)])
        f = ppl.load(model).fit(data, seed=2, draws=200, steps=200, method="fullrank")
        results["adam"] = (f.summary(), f.elbo, f.device)
        saved = os.path.join(os.path.dirname(out), f"saved-{rank}")
        for when in ("save", "save-gathered"):
            try:
                f.save(saved)
                results[when] = dist.all_gather_object(saved)
            except UsageError as e:
                results[when] = dist.all_gather_object(str(e))
            if when == "save":
                f.gather_data()
        f = ppl.loads(REGRESSION, "r.ppl").fit(_data(), **PER_PROCESS)
        results["minibatch"] = (f.summary(), f.elbo, f.steps, f.method_note)
        f = ppl.loads(REGRESSION, "r.ppl").fit(data, **PER_PROCESS)       # each process's own rows
        results["own-minibatch"] = (f.summary(), f.elbo, f.steps, f.device)
        from ppl.infer import minibatch
        for key, rows, chunk in (("local-minibatch", _data(), minibatch.CHUNK_ELEMENTS),
                                 ("own-local-minibatch", data, PASS_CHUNK)):
            minibatch.CHUNK_ELEMENTS = chunk
            f = ppl.loads(LOCAL, "m.ppl").fit(rows, **dict(ROWS, batch_size=8))
            results[key] = (f.summary(), f.elbo, f.steps, f.device)
        # passes over the rows in chunks of 5 rows (the anchor) and 1 row (the final pass): as many on
        # every process as the longest share needs, here far from N / 2
        minibatch.CHUNK_ELEMENTS = 5
        f = ppl.loads(REGRESSION, "r.ppl").fit(skewed, **PER_PROCESS)
        results["skewed-minibatch"] = (f.summary(), f.elbo, f.steps, f.model.row_share)
        # encoders: the one-process batch of 16; all rows a step (the CSV: read whole by every process)
        from ppl.infer import amortized
        minibatch.CHUNK_ELEMENTS = amortized.CHUNK_ELEMENTS = PASS_CHUNK
        for key, text, rows, options in (("encoder", ENCODED, _data(), PER_PROCESS),
                                         ("encoder-all-rows", ENCODED, data, ALL_ROWS),
                                         ("encoder-and-rows", ENCODED_AND_ROWS, _data(), PER_PROCESS)):
            f = ppl.loads(text, "m.ppl").fit(rows, **options)
            results[key] = (f.summary(), f.elbo, f.steps, f.method_note + "; " + f.device, f.encode()["z"])
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.close()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    model, data = _csv(tmp)
    out = str(tmp / "results.pt")
    mp.start_processes(_group_worker, args=(2, dist.free_port(), out, model, data, _skewed_csv(tmp)), nprocs=2,
                       join=True, start_method="spawn")
    return torch.load(out, weights_only=False), model, data, str(tmp / "skewed.csv")


def test_share_splits_rows_contiguously_and_unequally():
    assert [dist.share(101, r, 2) for r in range(2)] == [(0, 51), (51, 101)]
    parts = [dist.share(10, r, 4) for r in range(4)]
    assert parts[0][0] == 0 and parts[-1][1] == 10 and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


@pytest.mark.parametrize("key", ["local", "mixture"], ids=["local-latents", "enumerated-mixture"])
def test_two_processes_give_the_one_process_density_gradient_and_hessian(key, two_processes):
    got = two_processes[0][key]
    want = _value_grad_hessian(_program({"local": LOCAL, "mixture": MIXTURE}[key]))
    assert got[3] == 16
    for a, b in zip(got[:3], want):
        assert np.max(np.abs(a - b)) <= 1e-10 * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


@pytest.mark.parametrize("key", ["own-local", "own-mixture"], ids=["local-latents", "enumerated-mixture"])
def test_own_rows_by_byte_range_give_the_one_process_density_gradient_and_hessian(key, two_processes):
    """Each process parsed only its byte range of the CSV (cut at line ends: unequal rows, N odd)."""
    got = two_processes[0][key]
    want = _value_grad_hessian(_program({"own-local": LOCAL, "own-mixture": MIXTURE}[key]))
    lo, hi, n, how = got[3]
    assert (lo, n) == (0, N) and 0 < hi < N and hi != N - hi and "row range" in how
    for a, b in zip(got[:3], want):
        assert np.max(np.abs(a - b)) <= 1e-10 * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


def test_gradients_in_separate_blocks_are_one_flat_all_reduce(two_processes):
    """Each block a leaf of its own (several of one shape): their gradients are summed over the
    processes in one collective, not one per block in autograd's order (which differs between
    processes whose graphs differ: gradients summed across blocks, or gloo aborting)."""
    got = two_processes[0]["blocks"]
    model, data = two_processes[1], two_processes[2]
    one = ppl.loads(RADON_LIKE, "m.ppl").check(data)
    want = _block_gradients(LogJoint(one, make_plan(one, "auto"), Runtime.make("cpu", "float64", 0)))
    assert len(got) == len(want) == 5
    for a, b in zip(got, want):
        assert np.max(np.abs(a - b)) <= 1e-10 * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


def test_gather_rows_and_one_flat_all_reduce(two_processes):
    got = two_processes[0]
    hi = got["own-local"][3][1]
    want = torch.cat([torch.arange(2.0 * hi), torch.arange(2.0 * (N - hi)) + 100]).reshape(1, N, 2)
    assert torch.equal(got["gather"], want)
    a, b = got["flat"]
    assert torch.equal(a, torch.full((2,), 3.0)) and torch.equal(b, torch.full((2, 3), 10.0))


def test_200_adam_steps_on_two_processes_are_the_one_process_fit(two_processes):
    """Each process read its own rows of the CSV (the default where a byte range can be read alone)."""
    (summary, elbo, device), model, data = two_processes[0]["adam"], two_processes[1], two_processes[2]
    one = ppl.load(model).fit(data, seed=2, draws=200, steps=200, method="fullrank")
    assert "2 processes" in device and "each read its own rows" in device
    _same(summary, elbo, one)


def test_a_fit_of_own_rows_is_saved_on_the_first_process_after_gather_data(two_processes):
    """`Fit.save` under a group (the Python API under torchrun): each process holds its own rows, and
    refuses; after `gather_data` on every process the first's fit holds every row (it restores with
    the whole data), another's still its own."""
    for message in two_processes[0]["save"]:
        assert "holds only this process's rows of the data (rows " in message and " of 31)" in message
        assert "gather_data()" in message
    first, other = two_processes[0]["save-gathered"]
    assert "holds only this process's rows" in other, other
    f = ppl.load_fit(first)
    assert f.model.row_share is None and len(f.model.values["y"]) == N
    with open(two_processes[2]) as fh:
        assert np.array_equal(f.model.values["x"], np.loadtxt(fh, delimiter=",", skiprows=1)[:, 1])


def test_minibatches_of_own_rows_are_the_one_process_minibatches(two_processes):
    """`--batch-size B` is each process's (as DDP's): the one-process batch of 2B rows (global N, scale
    N / 2B), of which each process evaluates the rows it read."""
    summary, elbo, steps, device = two_processes[0]["own-minibatch"]
    one = ppl.loads(REGRESSION, "r.ppl").fit(two_processes[2], **MINIBATCH)
    assert steps == one.steps > 0 and "each read its own rows" in device
    _same(summary, elbo, one, ("mu", "beta", "sigma"))


def test_minibatches_on_two_processes_are_the_one_process_minibatches(two_processes):
    """Each process evaluates the rows it owns of the one-process batch of 2B rows (scale N / 2B of the
    whole batch); the control variate (each process's part of it, summed in the step's one all-reduce)
    and the final ELBO's pass are split the same way."""
    summary, elbo, steps, note = two_processes[0]["minibatch"]
    one = ppl.loads(REGRESSION, "r.ppl").fit(_data(), **MINIBATCH)
    assert steps == one.steps > 0
    assert "minibatches of 16 (8 a process) of 31 rows" in note, note
    _same(summary, elbo, one, ("mu", "beta", "sigma"))


@pytest.mark.parametrize("key", ["local-minibatch", "own-local-minibatch"], ids=["shares", "own-rows"])
def test_minibatches_with_per_row_latents_on_two_processes_are_the_one_process_minibatches(key, two_processes,
                                                                                          monkeypatch):
    """Per-row latents (RowLocal): every process draws the one-process batch's local noise and steps
    the rows it owns; the globals' gradient, the value and the rows' entropy are summed in the step's
    one all-reduce, the rows' q joined before the convergence test and at the end -- so rows of both
    processes' shares (z[1], z[16] | z[17], z[31]) and the final ELBO's pass (with own rows: in chunks
    of 7 rows, one of them holding rows of both processes) are one process's."""
    summary, elbo, steps, device = two_processes[0][key]
    if key == "own-local-minibatch":
        from ppl.infer import minibatch
        monkeypatch.setattr(minibatch, "CHUNK_ELEMENTS", PASS_CHUNK)
    one = ppl.loads(LOCAL, "m.ppl").fit(_data(), **ROWS)
    assert 0 < steps == one.steps < 500 * 2 and "2 processes" in device      # stopped by the convergence test
    assert ("each read its own rows" in device) == (key == "own-local-minibatch")
    _same(summary, elbo, one, ("mu", "beta", "tau", "z[1]", "z[16]", "z[17]", "z[31]"))


@pytest.mark.parametrize("key", ["encoder", "encoder-all-rows", "encoder-and-rows"])
def test_encoder_fits_on_two_processes_are_the_one_process_fits(key, two_processes, monkeypatch):
    """Encoders (amortize): every process draws the one-process batch's noise (the encoders' too) and
    encodes the rows of it that it owns; the globals' and the encoders' weights' gradients, the value
    and the rows' entropy are summed in the step's one all-reduce, and the final ELBO's pass (in chunks
    of 7 rows here) is split the same way -- so the fit, the encoders' q of rows of both shares and
    the ELBO are one process's (a linear encoder beside per-row latents too; without batch_size every
    process reads the whole CSV)."""
    from ppl.infer import amortized, minibatch
    summary, elbo, steps, note, encoded = two_processes[0][key]
    monkeypatch.setattr(minibatch, "CHUNK_ELEMENTS", PASS_CHUNK)
    monkeypatch.setattr(amortized, "CHUNK_ELEMENTS", PASS_CHUNK)
    text = ENCODED_AND_ROWS if key == "encoder-and-rows" else ENCODED
    one = ppl.loads(text, "m.ppl").fit(two_processes[2] if key == "encoder-all-rows" else _data(),
                                       **(ALL_ROWS if key == "encoder-all-rows" else MINIBATCH))
    assert steps == one.steps > 0 and "2 processes" in note and "each read its own rows" not in note
    assert ("minibatches of 16 (8 a process) of 31 rows" in note) == (key != "encoder-all-rows"), note
    names = ("mu", "tau", "z[1]", "z[16]", "z[17]", "z[31]") + (("w[1]", "w[31]") if key == "encoder-and-rows"
                                                               else ("beta",))
    _same(summary, elbo, one, names)
    want = one.encode()["z"]
    for stat in ("mean", "sd"):
        assert encoded[stat].shape == (N,) and np.max(np.abs(encoded[stat] - want[stat])) < 1e-6


def test_encoders_under_procs_refuse_holdout_and_rank_files(tmp_path):
    """What an encoder fit does not split over processes is a usage error that says so."""
    _, data = _csv(tmp_path)
    model = tmp_path / "enc.ppl"
    model.write_text(ENCODED)
    p = _ppl("fit", str(model), data, "--procs", "2", "--holdout", "0.2")
    assert p.returncode == 2, p.stderr
    assert "--procs cannot split this fit over processes yet: encoders (amortize) with --holdout" in p.stderr
    assert "Traceback" not in p.stderr
    p = _ppl("fit", str(model), str(tmp_path / "part-{rank}.csv"), "--procs", "2")
    assert p.returncode == 2, p.stderr
    assert "encoders (amortize) reads the whole data on every process" in p.stderr and "Traceback" not in p.stderr


def _same(summary, elbo, one, names=("mu", "beta", "tau", "z[1]", "z[31]")):
    s = one.summary()
    for k in names:
        for stat in ("mean", "sd"):
            assert abs(summary[k][stat] - s[k][stat]) < 1e-6, (k, stat, summary[k][stat], s[k][stat])
    assert abs(elbo - one.elbo) < 1e-6


def _ppl(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ppl", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _csv(tmp_path):
    d = _data()
    path = tmp_path / "d.csv"
    path.write_text("y,x\n" + "".join(f"{a!r},{b!r}\n" for a, b in zip(d["y"], d["x"])))
    model = tmp_path / "local.ppl"
    model.write_text(LOCAL)
    return str(model), str(path)


def test_ppl_fit_procs_2_is_the_one_process_fit_and_writes_once(tmp_path):
    """The default path (the mode search, then fixed draws and L-BFGS) on the all-reduced log joint."""
    model, data = _csv(tmp_path)
    p = _ppl("fit", model, data, "--seed", "2", "--draws", "200", "--format", "json", "--procs", "2",
             "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    two = json.loads(p.stdout)
    assert "2 processes" in two["device"]
    _same(two["params"], two["elbo"], ppl.load(model).fit(data, seed=2, draws=200))
    # the first process wrote the outputs, whole: every row's latent is in the draws
    header = open(tmp_path / "out" / "draws.csv").readline().strip().split(",")
    assert "z[31]" in header and "z[1]" in header and "z[17]" in header


def test_ppl_fit_procs_2_batch_size_with_per_row_latents_is_the_one_process_fit(tmp_path):
    """`--batch-size 8` is each process's: the one-process fit with batches of 16, per-row latents too."""
    model, data = _csv(tmp_path)
    p = _ppl("fit", model, data, "--seed", "2", "--draws", "200", "--method", "meanfield", "--batch-size", "8",
             "--epochs", "4", "--format", "json", "--procs", "2")
    assert p.returncode == 0, p.stderr
    two = json.loads(p.stdout)
    assert "2 processes" in two["device"]
    _same(two["params"], two["elbo"], ppl.load(model).fit(data, **MINIBATCH))


def test_rank_pattern_gives_each_process_its_own_file(tmp_path):
    """'part-{rank}.csv': process r reads part-r.csv whole (16 and 15 rows); N is their sum."""
    model, data = _csv(tmp_path)
    lines = open(data).read().splitlines(True)
    (tmp_path / "part-0.csv").write_text("".join(lines[:1] + lines[1:17]))
    (tmp_path / "part-1.csv").write_text("".join(lines[:1] + lines[17:]))
    p = _ppl("fit", model, str(tmp_path / "part-{rank}.csv"), "--seed", "2", "--draws", "200", "--format",
             "json", "--procs", "2")
    assert p.returncode == 0, p.stderr
    two = json.loads(p.stdout)
    assert "its own file" in two["device"] and "rows 1..16 of 31" in two["device"]
    _same(two["params"], two["elbo"], ppl.load(model).fit(data, seed=2, draws=200))


def _level_files(tmp_path):
    """LEVELS's data: the whole file, and its rows 1..16 and 17..31 as part-0.csv and part-1.csv (every
    label in both, so each process's labels are the whole data's)."""
    rng = np.random.default_rng(5)
    effect = {"north": 1.0, "east": -1.0, "south": 0.5}
    rows = []
    for i in range(N):
        g = list(effect)[i % 3]
        x = rng.normal()
        rows.append(f"{effect[g] + 0.3 * x * x + rng.normal()!r},{x!r},{g}\n")
    head = "y,x,g\n"
    (tmp_path / "lv.csv").write_text(head + "".join(rows))
    (tmp_path / "part-0.csv").write_text(head + "".join(rows[:16]))
    (tmp_path / "part-1.csv").write_text(head + "".join(rows[16:]))
    model = tmp_path / "lv.ppl"
    model.write_text(LEVELS)
    return str(model), str(tmp_path / "lv.csv"), str(tmp_path / "part-{rank}.csv")


@pytest.mark.parametrize("how", ["byte-range", "rank-files"])
def test_own_rows_write_the_one_process_outputs(tmp_path, how):
    """Each process read its own rows (its byte range of one CSV; its own file, with level labels and a
    constant of the data): the first gathers every process's rows of the data after the fit, so --out
    holds what one process reading the whole data writes -- the same data.json, a fit that
    ppl.load_fit restores, fit.nc with the same groups, the same data and the same posterior
    predictive (drawn as one process draws it)."""
    xr = need("xarray")
    if how == "byte-range":
        model, whole = _csv(tmp_path)
        data = whole
    else:
        model, whole, data = _level_files(tmp_path)
    args = ("--seed", "2", "--draws", "200", "--format", "json")
    d1, d2 = tmp_path / "D1", tmp_path / "D2"
    one = _ppl("fit", model, whole, *args, "--procs", "1", "--out", str(d1))
    two = _ppl("fit", model, data, *args, "--procs", "2", "--out", str(d2))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert "each read its own rows" in json.loads(two.stdout)["device"]
    assert sorted(os.listdir(d2)) == sorted(os.listdir(d1))
    assert (d2 / "data.json").read_bytes() == (d1 / "data.json").read_bytes()
    assert json.loads((d2 / "run.json").read_text())["notes"] == json.loads((d1 / "run.json").read_text())["notes"]
    f1, f2 = ppl.load_fit(str(d1)), ppl.load_fit(str(d2))
    assert f2.model.levels == f1.model.levels and f2.model.dims == f1.model.dims
    s1, s2 = f1.summary(), f2.summary()
    assert s2.keys() == s1.keys()
    for k in s1:
        for stat in ("mean", "sd", "q5", "q50", "q95"):
            assert abs(s2[k][stat] - s1[k][stat]) < 1e-6, (k, stat, s2[k][stat], s1[k][stat])
    t1 = xr.open_datatree(d1 / "fit.nc", engine="h5netcdf")
    t2 = xr.open_datatree(d2 / "fit.nc", engine="h5netcdf")
    assert set(t2.children) == set(t1.children) >= {"posterior_predictive", "observed_data", "constant_data"}
    for group in ("observed_data", "constant_data", "posterior_predictive"):
        assert set(t2[group].data_vars) == set(t1[group].data_vars)
        for k in t1[group].data_vars:
            a, b = t1[group][k], t2[group][k]
            assert a.dims == b.dims and a.shape == b.shape, (group, k)
            if group == "posterior_predictive":     # the same noise on draws equal to 1e-6
                assert np.allclose(b.values, a.values, atol=1e-6), (group, k)
            else:
                assert np.array_equal(b.values, a.values), (group, k)
        for c in t1[group].coords:
            assert list(t2[group][c].values) == list(t1[group][c].values), (group, c)
    assert f2.predict()["y"].shape == (200, N)


def test_rank_files_must_agree_on_sizes_and_level_labels(tmp_path):
    (tmp_path / "lv-0.csv").write_text("y,g\n1.0,a\n2.0,b\n1.5,a\n")
    (tmp_path / "lv-1.csv").write_text("y,g\n1.0,a\n2.0,c\n")
    model = tmp_path / "lv.ppl"
    model.write_text("data y: real[N]\ndata g: level[N] of K\na[K] ~ normal(0, 1)\ny ~ normal(a[g], 1)\n")
    p = _ppl("fit", str(model), str(tmp_path / "lv-{rank}.csv"), "--procs", "2")
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("error:") == 1 and "lv.ppl:2:9: error: 'g' has other level labels in process 1's rows" \
        in p.stderr, p.stderr
    (tmp_path / "lv-1.csv").write_text("y,g\n1.0,2\n2.0,1\n")
    (tmp_path / "lv-0.csv").write_text("y,g\n1.0,1\n2.0,2\n1.5,3\n")
    p = _ppl("fit", str(model), str(tmp_path / "lv-{rank}.csv"), "--procs", "2", "--set", "K=3")
    assert p.returncode == 0, p.stderr                    # codes 1..K with K given: the same numbering


def test_rank_pattern_without_workers_is_a_usage_error(tmp_path):
    model, data = _csv(tmp_path)
    p = _ppl("fit", model, str(tmp_path / "part-{rank}.csv"))
    assert p.returncode == 2
    assert "{rank}" in p.stderr and "--procs" in p.stderr and "Traceback" not in p.stderr


def test_a_row_mixing_model_is_refused_when_each_process_reads_its_own_rows(tmp_path):
    _, data = _csv(tmp_path)
    model = tmp_path / "mix.ppl"
    model.write_text("data y: real[N]\ndata x: real[N]\nm = mean(x)\nmu ~ normal(0, 5)\n"
                     "sigma ~ half_normal(2)\ny ~ normal(mu + (x - m), sigma)\n")
    t0 = time.perf_counter()
    p = _ppl("fit", str(model), data, "--procs", "2")
    assert p.returncode == 1, p.stderr
    assert "mix.ppl:3:5: error: 'mean(x)' mixes the data rows (axis N)" in p.stderr, p.stderr
    assert "each process sees only its own rows" in p.stderr and "^^^^^^^" in p.stderr
    assert "Traceback" not in p.stderr and time.perf_counter() - t0 < 60


def _failing_worker(rank, world, port, argv, errdir, threads):
    """Rank 1 raises a located model error part-way through the fit (after a few evaluations)."""
    if rank == 1:
        from ppl.errors import Diagnostic, PplError, Source, Span
        calls = {"n": 0}
        real = LogJoint.evaluate

        def evaluate(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 5:
                src = Source("bad.ppl", "y ~ normal(z, 0.5)\n")
                raise PplError(Diagnostic(Span(src, 1, 1, 1, 2), "the density of 'y' is not finite here"))
            return real(self, *a, **k)
        LogJoint.evaluate = evaluate
    dist._worker(rank, world, port, argv, errdir, threads)


def test_a_failing_rank_ends_the_fit_with_its_message(tmp_path, capsys):
    model, data = _csv(tmp_path)
    t0 = time.perf_counter()
    code = dist.launch(["fit", model, data, "--seed", "1"], 2,
                       worker=_failing_worker)
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 1
    assert "bad.ppl:1:1: error: the density of 'y' is not finite here" in err
    assert took < 60                       # not the collectives' timeout (rank 0 waits in one)


def test_a_bad_value_in_a_later_process_s_rows_is_numbered_as_in_the_whole_file(tmp_path):
    """Each process checks its own rows: a value outside the support in process 1's share names the
    element (the row) of the whole file, as one process would."""
    rows = [(i % 2, 0.1 * i) for i in range(31)]
    rows[25] = (2, 2.5)                                   # row 26: y = 2 for a bernoulli
    data = tmp_path / "b.csv"
    data.write_text("y,x\n" + "".join(f"{a},{b!r}\n" for a, b in rows))
    model = tmp_path / "b.ppl"
    model.write_text("data y: int[N]\ndata x: real[N]\na ~ normal(0, 1)\nb ~ normal(0, 1)\n"
                     "y ~ bernoulli_logit(a + b * x)\n")
    one = _ppl("fit", str(model), str(data))
    two = _ppl("fit", str(model), str(data), "--procs", "2")
    assert one.returncode == 1 and two.returncode == 1, two.stderr
    assert "element 26 is 2" in one.stderr, one.stderr
    assert "element 26 is 2" in two.stderr and "Traceback" not in two.stderr, two.stderr
    # the first process, ended inside a collective by the second's error, adds no message of its own
    assert two.stderr.count("error:") == 1 and "internal error" not in two.stderr, two.stderr


def test_passes_over_unequal_own_rows_cover_every_row(two_processes, monkeypatch):
    """Byte ranges hold unequal rows (rank 0: more than 20 of 31, not ceil(31 / 2)); the passes over all
    rows (the control variate's anchor, the final ELBO and PSIS pass) make as many chunks on every
    process as the longest share needs, so none leaves rows out: the one-process fit."""
    from ppl.infer import minibatch
    summary, elbo, steps, own = two_processes[0]["skewed-minibatch"]
    assert own.hi - own.lo > 20
    monkeypatch.setattr(minibatch, "CHUNK_ELEMENTS", 5)
    one = ppl.loads(REGRESSION, "r.ppl").fit(two_processes[3], **MINIBATCH)
    assert steps == one.steps > 0
    _same(summary, elbo, one, ("mu", "beta", "sigma"))
