"""NumPyro's and Pyro's subsampled SVI on the minibatch logistic regression (bench/minibatch.py).

    bench/.venv-peers/bin/python bench/systems/subsample_svi.py numpyro|pyro CSV REF.json
        [--batch-size 1024] [--lr 0.01] [--every 500] [--max-steps 200000] [--max-seconds 900] [--seed 1]

The model is ppl's models/logistic.ppl: alpha ~ normal(0, 2.5), beta[D] ~ normal(0, 2.5),
y ~ bernoulli_logit(alpha + X @ beta), the likelihood inside `plate("N", N, subsample_size=B)` (each
step a fresh random batch, scaled by N/B by the library), AutoNormal, Adam(lr), Trace_ELBO with one
particle (the libraries' default).  The CSV is read with numpy's loadtxt (float32 for NumPyro, JAX's
default; float64 for Pyro, as ppl).  Every `--every` steps the guide's means and sds are compared with
the reference (REF.json: {"params": {name: {"mean", "sd"}}}); the run stops at the first checkpoint
where every mean is within 0.1 reference sd, and reports the wall time from the start of the fit to
it (the checkpoints' own time excluded), and the sds' largest relative error there.  Prints one JSON
line; peak RSS comes from the driver (wait4).
"""
from __future__ import annotations

import argparse
import json
import os
import time

T0 = time.perf_counter()
ap = argparse.ArgumentParser()
ap.add_argument("system", choices=["numpyro", "pyro"])
ap.add_argument("csv")
ap.add_argument("ref")
ap.add_argument("--batch-size", type=int, default=1024)
ap.add_argument("--lr", type=float, default=0.01)
ap.add_argument("--every", type=int, default=500)
ap.add_argument("--max-steps", type=int, default=200_000)
ap.add_argument("--max-seconds", type=float, default=900.0)
ap.add_argument("--seed", type=int, default=1)
a = ap.parse_args()

import numpy as np  # noqa: E402

ref = json.load(open(a.ref))["params"]
names = list(ref)
ref_mean = np.array([ref[k]["mean"] for k in names])
ref_sd = np.array([ref[k]["sd"] for k in names])


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
    dm = np.abs(mean - ref_mean) / ref_sd
    ds = np.abs(sd / ref_sd - 1)
    return float(dm.max()), float(ds.max())


out = {"system": a.system, "batch_size": a.batch_size, "lr": a.lr}
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
    svi = SVI(model, guide, Adam(a.lr), Trace_ELBO())
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
    from pyro.optim import Adam  # noqa: E402

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
    svi = SVI(model, guide, Adam({"lr": a.lr}), Trace_ELBO())
    t_fit = time.perf_counter()
    svi.step(X, y)
    state = None

    def chunk(state):
        for _ in range(a.every):
            svi.step(X, y)
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
            "init_seconds": init_seconds,
            "setup_seconds": time.perf_counter() - T0 - spent, "trace": trace,
            "params": {k: {"mean": float(m[i]), "sd": float(s[i])} for i, k in enumerate(names)}})
print(json.dumps(out))
