"""NumPyro NUTS references for the bundled example models (models/*.ppl with their CSVs), for the
family table of bench/families.py.  Eight schools needs none: Rubin's data are posteriordb's, whose
NUTS reference is in ../shared/reference (the centred and non-centred models share mu, tau, theta).

    bench/.venv-peers/bin/python bench/systems/nuts_models.py [radon logistic poisson mixture]
        [--warmup 2000] [--samples 5000] [--chains 4] [--target-accept 0.9] [--out-dir bench/references]

float64, diagonal mass matrix, target accept 0.9 (radon, a centred hierarchy: 0.99, else it
diverges), chains one after the other; each model the same
as its .ppl (levels numbered as ppl numbers them: sorted labels -> 1..K; the mixture's ordered mu
with its normal(0, 10) prior restricted to the ordered set, its z summed out).  Writes
OUT_DIR/models_NAME.json: mean and sd (ddof=1) of every latent and deterministic by ppl's names,
min bulk ESS, max split R-hat and divergences; prints one JSON line per model.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MODELS = os.path.join(ROOT, "models")

ap = argparse.ArgumentParser(prog="nuts_models.py")
ap.add_argument("names", nargs="*", default=["radon", "logistic", "poisson", "mixture"])
ap.add_argument("--warmup", type=int, default=2000)
ap.add_argument("--samples", type=int, default=5000)
ap.add_argument("--chains", type=int, default=4)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--target-accept", type=float, default=0.9)
ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "references"))
args = ap.parse_args()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin  # noqa: E402
from numpyro.infer import MCMC, NUTS, init_to_value  # noqa: E402
from numpyro_models import logistic, mixture, poisson, radon  # noqa: E402


def columns(name):
    with open(os.path.join(MODELS, name + ".csv")) as f:
        rows = list(csv.DictReader(f))
    return {k: [r[k] for r in rows] for k in rows[0]}


def setup(name):
    c = columns(name)
    f = lambda k: jnp.asarray(np.array(c[k], dtype=float))   # noqa: E731
    if name == "radon":
        labels = sorted(set(c["county"]))
        county = jnp.asarray([labels.index(v) for v in c["county"]])
        return radon, (f("log_radon"), f("floor"), county, len(labels)), {}
    if name == "logistic":
        xs = [k for k in c if k.startswith("x")]
        X = jnp.stack([f(k) for k in xs], 1)
        return logistic, (X, f("y")), {}
    if name == "poisson":
        return poisson, (f("deaths"), f("exposure"), f("age")), {}
    if name == "mixture":
        return mixture, (f("y"),), {"init_strategy": init_to_value(values={"mu": jnp.array([-1.0, 1.0])})}
    raise SystemExit(f"unknown model {name}")


def flat(name, arr):
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 2:
        return {name: arr}
    out = {}
    for idx in np.ndindex(*arr.shape[2:]):
        out[f"{name}[{','.join(str(i + 1) for i in idx)}]"] = arr[(slice(None), slice(None)) + idx]
    return out


def main():
    os.makedirs(args.out_dir, exist_ok=True)
    for name in args.names:
        t0 = time.perf_counter()
        model, data, kw = setup(name)
        kernel = NUTS(model, target_accept_prob=args.target_accept, **kw)
        mcmc = MCMC(kernel, num_warmup=args.warmup, num_samples=args.samples, num_chains=args.chains,
                    chain_method="sequential", progress_bar=False)
        mcmc.run(jax.random.PRNGKey(args.seed), *data, extra_fields=("diverging",))
        s = mcmc.get_samples(group_by_chain=True)
        params, ess, rhat = {}, [], []
        for k, v in s.items():
            for key, x in flat(k, v).items():
                params[key] = {"mean": float(x.mean()), "sd": float(x.reshape(-1).std(ddof=1))}
                ess.append(float(effective_sample_size(x)))
                rhat.append(float(split_gelman_rubin(x)))
        out = {"model": name, "params": params, "min_ess": min(ess), "max_rhat": max(rhat),
               "target_accept": args.target_accept,
               "divergences": int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum()),
               "chains": args.chains, "warmup": args.warmup, "samples": args.samples,
               "seconds": round(time.perf_counter() - t0, 1), "numpyro": numpyro.__version__}
        with open(os.path.join(args.out_dir, f"models_{name}.json"), "w") as fh:
            json.dump(out, fh, indent=1)
        print(json.dumps({k: v for k, v in out.items() if k != "params"}), flush=True)


main()
