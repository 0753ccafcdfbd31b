"""The peers' normalizing flows on the posteriors a Gaussian cannot fit: NumPyro AutoIAFNormal and
AutoBNAFNormal, Pyro AutoIAFNormal, SVI with Adam and Trace_ELBO (one particle, their default).

    bench/.venv-peers/bin/python bench/systems/flow_peers.py SYSTEM MODEL STEPS SEED
        [--lr X] [--draws D] [--checkpoints N1,N2,...]

SYSTEM: numpyro-iaf (4 flows, hidden [40, 40]: the issue's setting), numpyro-bnaf (1 flow, hidden
factors [8, 8]: NumPyro's default), pyro-iaf (4 transforms, hidden [40, 40]).  MODEL:
eight_schools_centered (posteriordb's, Rubin's data) or banana (x1 ~ N(0, 2), x2 ~ N((x1^2 - 4) / 2, 1)).

Prints one JSON line: means and sds by ppl's names (constrained space) at the end and at each
checkpoint, with `seconds`: the process's time up to that checkpoint (start-up, imports, JIT
and steps; the checkpoints' own summaries excluded), so the first accurate checkpoint's `seconds`
is the time a run of that many steps would take.  NumPyro runs in its default float32; Pyro in
float64 (ppl's dtype).
"""
from __future__ import annotations

import argparse
import json
import time

T0 = time.perf_counter()

EIGHT_Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
EIGHT_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def parse():
    ap = argparse.ArgumentParser(prog="flow_peers.py")
    ap.add_argument("system", choices=["numpyro-iaf", "numpyro-bnaf", "pyro-iaf"])
    ap.add_argument("model", choices=["eight_schools_centered", "banana"])
    ap.add_argument("steps", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--draws", type=int, default=10000)
    ap.add_argument("--checkpoints", default="")
    a = ap.parse_args()
    a.checkpoints = sorted({int(c) for c in a.checkpoints.split(",") if c.strip()} | {a.steps})
    return a


def summarise(draws):
    import numpy as np
    out = {}
    for name, arr in draws.items():
        arr = np.asarray(arr, dtype=np.float64)
        flat = arr.reshape(arr.shape[0], -1)
        names = [name] if flat.shape[1] == 1 and arr.ndim == 1 else [f"{name}[{j + 1}]" for j in range(flat.shape[1])]
        for j, key in enumerate(names):
            m, s = float(flat[:, j].mean()), float(flat[:, j].std(ddof=1))
            out[key] = {"mean": m if np.isfinite(m) else None, "sd": s if np.isfinite(s) else None}
    return out


def run_numpyro(a):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoBNAFNormal, AutoIAFNormal

    def eight_schools_centered(y, sigma):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
        with numpyro.plate("J", y.shape[0]):
            theta = numpyro.sample("theta", dist.Normal(mu, tau))
            numpyro.sample("y", dist.Normal(theta, sigma), obs=y)

    def banana():
        x1 = numpyro.sample("x1", dist.Normal(0.0, 2.0))
        numpyro.sample("x2", dist.Normal(0.5 * (x1 * x1 - 4.0), 1.0))

    if a.model == "banana":
        model, args = banana, ()
    else:
        model, args = eight_schools_centered, (jnp.array(EIGHT_Y), jnp.array(EIGHT_SIGMA))
    if a.system == "numpyro-iaf":
        guide = AutoIAFNormal(model, num_flows=4, hidden_dims=[40, 40])
    else:
        guide = AutoBNAFNormal(model, num_flows=1, hidden_factors=[8, 8])
    svi = SVI(model, guide, numpyro.optim.Adam(a.lr or 1e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(a.seed), *args)

    @jax.jit
    def advance(state, n):
        return jax.lax.fori_loop(0, n, lambda i, s: svi.update(s, *args)[0], state)

    def draws(params):
        s = guide.sample_posterior(jax.random.PRNGKey(10_000 + a.seed), params, sample_shape=(a.draws,))
        return {k: s[k] for k in (("x1", "x2") if a.model == "banana" else ("mu", "tau", "theta"))}
    return _loop(a, state, lambda s, n: jax.block_until_ready(advance(s, n)),
                 lambda s: summarise(draws(svi.get_params(s)))), {"numpyro": numpyro.__version__,
                                                                  "jax": jax.__version__, "dtype": "float32"}


def run_pyro(a):
    import torch
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoIAFNormal
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pyro.set_rng_seed(a.seed)
    y, sigma = torch.tensor(EIGHT_Y), torch.tensor(EIGHT_SIGMA)

    def eight_schools_centered():
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("J", 8):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    def banana():
        x1 = pyro.sample("x1", dist.Normal(0.0, 2.0))
        pyro.sample("x2", dist.Normal(0.5 * (x1 * x1 - 4.0), 1.0))

    model = banana if a.model == "banana" else eight_schools_centered
    guide = AutoIAFNormal(model, hidden_dim=[40, 40], num_transforms=4)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": a.lr or 1e-3}), Trace_ELBO())
    names = ("x1", "x2") if a.model == "banana" else ("mu", "tau", "theta")

    def advance(state, n):
        for _ in range(n):
            svi.step()
        return state

    def draws(_):
        with torch.no_grad():
            pred = pyro.infer.Predictive(model, guide=guide, num_samples=a.draws, return_sites=names,
                                         parallel=True)
            s = pred()
        return summarise({k: s[k].reshape(a.draws, -1).squeeze(-1).numpy() for k in names})
    return _loop(a, None, advance, draws), {"pyro": pyro.__version__, "torch": torch.__version__,
                                            "dtype": "float64"}


def _loop(a, state, advance, summary):
    """Steps to each checkpoint; the time excluding the summaries themselves."""
    cps, done, spent = {}, 0, 0.0
    for c in a.checkpoints:
        state = advance(state, c - done)
        done = c
        t = time.perf_counter()
        seconds = t - T0 - spent
        cps[str(c)] = {"params": summary(state), "seconds": round(seconds, 3)}
        spent += time.perf_counter() - t
    return cps


def main():
    a = parse()
    cps, versions = (run_pyro if a.system.startswith("pyro") else run_numpyro)(a)
    last = cps[str(a.steps)]
    print(json.dumps({"system": a.system, "model": a.model, "steps": a.steps, "seed": a.seed, "lr": a.lr or 1e-3,
                      "params": last["params"], "seconds": last["seconds"], "checkpoints": cps,
                      "versions": versions}))


main()
