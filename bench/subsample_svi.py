"""NumPyro's and Pyro's subsampled SVI on the minibatch logistic regression, under a step-size
schedule (bench/minibatch.py runs it).

    bench/.venv-peers/bin/python bench/subsample_svi.py numpyro|pyro CSV REF.json
        [--batch-size 1024] [--lr 0.01] [--schedule constant|exp|sqrt] [--decay-steps 1000]
        [--every 100] [--max-steps 200000] [--max-seconds 900] [--seed 1]

Input: the CSV (x1..xD, y) and the reference posterior (REF.json: {"params": {name: {"mean", "sd"}}}).
Output: one JSON line: the first checkpoint where every mean is within 0.1 reference sd ("hit": its
steps, its wall seconds from the start of the fit, its errors), the trace of checkpoints, the last
guide.

The model is ppl's models/logistic.ppl: alpha ~ normal(0, 2.5), beta[D] ~ normal(0, 2.5),
y ~ bernoulli_logit(alpha + X @ beta), the likelihood inside `plate("N", N, subsample_size=B)` (each
step a fresh random batch, scaled by N/B by the library), AutoNormal, Adam, Trace_ELBO with one
particle (the libraries' defaults).  The step size at step t (from 0) is lr times
  constant: 1;   exp: 0.1 ** (t / decay_steps);   sqrt: 1 / sqrt(1 + t / 100)  (ppl's own schedule).
NumPyro: Adam(step_size=schedule), float32 (JAX's default), jitted chunks of `--every` steps; Pyro:
torch Adam under a LambdaLR scheduler stepped after every SVI step, float64 (as ppl).  The CSV is
read with numpy's loadtxt.  Every `--every` steps the guide's means and sds are compared with the
reference (the checkpoints' own time excluded from the fit's seconds).  Peak RSS comes from the driver.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

T0 = time.perf_counter()
ap = argparse.ArgumentParser()
ap.add_argument("system", choices=["numpyro", "pyro"])
ap.add_argument("csv")
ap.add_argument("ref")
ap.add_argument("--batch-size", type=int, default=1024)
ap.add_argument("--lr", type=float, default=0.01)
ap.add_argument("--schedule", choices=["constant", "exp", "sqrt"], default="constant")
ap.add_argument("--decay-steps", type=float, default=1000.0, help="exp: steps per tenfold drop")
ap.add_argument("--every", type=int, default=100)
ap.add_argument("--max-steps", type=int, default=200_000)
ap.add_argument("--max-seconds", type=float, default=900.0)
ap.add_argument("--seed", type=int, default=1)
a = ap.parse_args()

import numpy as np  # noqa: E402

ref = json.load(open(a.ref))["params"]
names = list(ref)
ref_mean = np.array([ref[k]["mean"] for k in names])
ref_sd = np.array([ref[k]["sd"] for k in names])


def factor(t, exp=math.exp, sqrt=math.sqrt):
    """The schedule's factor at step t (exp, sqrt: math's or jax.numpy's, so NumPyro can trace it)."""
    if a.schedule == "exp":
        return exp(-math.log(10.0) * t / a.decay_steps)
    if a.schedule == "sqrt":
        return 1.0 / sqrt(1.0 + t / 100.0)
    return 1.0 + 0.0 * t


def load(dtype):
    with open(a.csv) as f:
        header = f.readline().strip().split(",")
    arr = np.loadtxt(a.csv, delimiter=",", skiprows=1, dtype=dtype, ndmin=2)
    xs = [j for j, h in enumerate(header) if h.startswith("x")]
    X = np.ascontiguousarray(arr[:, xs])
    y = np.ascontiguousarray(arr[:, header.index("y")])
    del arr
    return X, y


def errors(mean, sd):
    return float((np.abs(mean - ref_mean) / ref_sd).max()), float(np.abs(sd / ref_sd - 1).max())


out = {"system": a.system, "batch_size": a.batch_size, "lr": a.lr, "schedule": a.schedule,
       "decay_steps": a.decay_steps}
if a.system == "numpyro":
    import jax  # noqa: E402
    import jax.numpy as jnp  # noqa: E402
    import numpyro  # noqa: E402
    import numpyro.distributions as dist  # noqa: E402
    from numpyro.infer import SVI, Trace_ELBO  # noqa: E402
    from numpyro.infer.autoguide import AutoNormal  # noqa: E402
    from numpyro.optim import Adam  # noqa: E402

    t_load = time.perf_counter()
    X, y = load(np.float32)
    X, y = jnp.asarray(X), jnp.asarray(y)
    out["load_seconds"] = time.perf_counter() - t_load
    N, D = X.shape

    def model(X, y):
        alpha = numpyro.sample("alpha", dist.Normal(0.0, 2.5))
        beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([D]).to_event(1))
        with numpyro.plate("N", N, subsample_size=a.batch_size) as idx:
            numpyro.sample("y", dist.Bernoulli(logits=alpha + X[idx] @ beta), obs=y[idx])

    guide = AutoNormal(model)
    svi = SVI(model, guide, Adam(lambda t: a.lr * factor(t, jnp.exp, jnp.sqrt)), Trace_ELBO())
    t_fit = time.perf_counter()
    state = svi.init(jax.random.PRNGKey(a.seed), X, y)

    @jax.jit
    def chunk(state):
        return jax.lax.fori_loop(0, a.every, lambda i, s: svi.update(s, X, y)[0], state)

    def moments(state):
        p = svi.get_params(state)
        m = np.concatenate([np.atleast_1d(np.asarray(p["alpha_auto_loc"])), np.asarray(p["beta_auto_loc"])])
        s = np.concatenate([np.atleast_1d(np.asarray(p["alpha_auto_scale"])), np.asarray(p["beta_auto_scale"])])
        return m.astype(float), s.astype(float)
    block = lambda s: jax.block_until_ready(s)  # noqa: E731
else:
    import torch  # noqa: E402
    import pyro  # noqa: E402
    import pyro.distributions as dist  # noqa: E402
    from pyro.infer import SVI, Trace_ELBO  # noqa: E402
    from pyro.infer.autoguide import AutoNormal  # noqa: E402
    from pyro.optim import LambdaLR  # noqa: E402

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_load = time.perf_counter()
    X, y = load(np.float64)
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    out["load_seconds"] = time.perf_counter() - t_load
    N, D = X.shape
    pyro.set_rng_seed(a.seed)

    def model(X, y):
        alpha = pyro.sample("alpha", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 2.5))
        beta = pyro.sample("beta", dist.Normal(torch.zeros(D, dtype=X.dtype), 2.5).to_event(1))
        with pyro.plate("N", N, subsample_size=a.batch_size) as idx:
            pyro.sample("y", dist.Bernoulli(logits=alpha + X[idx] @ beta), obs=y[idx])

    guide = AutoNormal(model)
    scheduler = LambdaLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": a.lr}, "lr_lambda": factor})
    svi = SVI(model, guide, scheduler, Trace_ELBO())
    t_fit = time.perf_counter()
    svi.step(X, y)
    scheduler.step()
    state = None

    def chunk(state):
        for _ in range(a.every):
            svi.step(X, y)
            scheduler.step()
        return state

    def moments(state):
        m = torch.cat([guide.locs.alpha.detach().reshape(1), guide.locs.beta.detach()]).numpy()
        s = torch.cat([guide.scales.alpha.detach().reshape(1), guide.scales.beta.detach()]).numpy()
        return m.astype(float), s.astype(float)
    block = lambda s: s  # noqa: E731

steps, trace, hit = 0, [], None
spent = time.perf_counter() - t_fit          # the set-up of the fit (NumPyro: its init), then the steps
init_seconds = spent
while steps < a.max_steps and spent - init_seconds < a.max_seconds:
    t = time.perf_counter()
    state = block(chunk(state))
    spent += time.perf_counter() - t
    steps += a.every
    dm, ds = errors(*moments(state))
    trace.append([steps, round(spent, 3), dm, ds])
    if dm <= 0.1:
        hit = {"steps": steps, "seconds": spent, "mean_err": dm, "sd_err": ds}
        break
m, s = moments(state)
out.update({"N": int(N), "D": int(D), "hit": hit, "steps": steps, "fit_seconds": spent,
            "init_seconds": init_seconds, "setup_seconds": time.perf_counter() - T0 - spent, "trace": trace,
            "params": {k: {"mean": float(m[i]), "sd": float(s[i])} for i, k in enumerate(names)}})
print(json.dumps(out))
