"""NumPyro NUTS: the reference posteriors of the hierarchical (hier_*) models.

    bench/.venv-peers/bin/python bench/systems/numpyro_nuts.py MODEL [DATA_DIR]
        [--warmup 1000] [--samples 2000] [--chains 1] [--seed 0] [--out bench/results/nuts/MODEL.json]
        [--fixture tests/data/hier/MODEL.json]

Runs NUTS (float64, diagonal mass matrix adapted in warm-up, target accept 0.8,
max tree depth 10) on bench/data/MODEL/data.csv with the same model as ppl's
model.ppl (tests/hier_data.py's texts), and writes a JSON summary: mean and sd
(ddof=1, constrained space, ppl's 1-based names: `z[17]`) of every latent,
bulk ESS and split R-hat per parameter (worst over the group latents),
divergences, tree depths, and the wall time (warm-up and sampling, JIT compile
included in the warm-up).  Prints one JSON line like the other system scripts.
Chains run one after the other (`chain_method="sequential"`), one thread.

--fixture also writes the compact test fixture (generator parameters and seed,
data digest, model text, NUTS settings, means and sds rounded to 5 significant
digits) that tests/hier_data.py regenerates the data from.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

T0 = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, HERE)

ap = argparse.ArgumentParser(prog="numpyro_nuts.py")
ap.add_argument("model")
ap.add_argument("data_dir", nargs="?")
ap.add_argument("--warmup", type=int, default=1000)
ap.add_argument("--samples", type=int, default=2000)
ap.add_argument("--chains", type=int, default=1)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--target-accept", type=float, default=0.8)
ap.add_argument("--max-tree-depth", type=int, default=10)
ap.add_argument("--out", help="default bench/results/nuts/MODEL.json")
ap.add_argument("--fixture", help="also write the compact test fixture here")
args = ap.parse_args()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin  # noqa: E402
from numpyro.infer import MCMC, NUTS  # noqa: E402

import data as bench_data  # noqa: E402
import hier_data  # noqa: E402  (bench/data.py put tests/ on the path)
from numpyro_hier import arrays, hier_model  # noqa: E402

T_IMPORTS = time.perf_counter() - T0


def sig(x, n=5):
    return float(f"{x:.{n}g}")


def main():
    if args.model not in bench_data.HIER_MODELS:
        ap.error(f"not a hier model: {args.model} (one of {', '.join(bench_data.HIER_MODELS)})")
    bench_data.ensure(args.model, quiet=True)
    t = time.perf_counter()
    data, kw = arrays(args.model, jnp.float64)
    family, K, N = kw["family"], kw["K"], int(data[0].shape[0])
    t_data = time.perf_counter() - t

    kernel = NUTS(hier_model, target_accept_prob=args.target_accept, max_tree_depth=args.max_tree_depth)
    mcmc = MCMC(kernel, num_warmup=args.warmup, num_samples=args.samples, num_chains=args.chains,
                chain_method="sequential", progress_bar=False)
    key = jax.random.PRNGKey(args.seed)
    t = time.perf_counter()
    # warm-up and sampling timed apart (one chain: warmup() then run() continuing from its state)
    if args.chains == 1:
        mcmc.warmup(key, *data, **kw, extra_fields=("num_steps", "diverging"), collect_warmup=False)
        jax.block_until_ready(mcmc.post_warmup_state)
        t_warm = time.perf_counter() - t
        t = time.perf_counter()
        mcmc.run(mcmc.post_warmup_state.rng_key, *data, **kw, extra_fields=("num_steps", "diverging"))
    else:
        t_warm = None
        mcmc.run(key, *data, **kw, extra_fields=("num_steps", "diverging"))
    samples = mcmc.get_samples(group_by_chain=True)
    jax.block_until_ready(samples)
    t_sample = time.perf_counter() - t
    extra = mcmc.get_extra_fields(group_by_chain=True)
    steps = np.asarray(extra["num_steps"])
    div = int(np.asarray(extra["diverging"]).sum())

    params, diag = {}, {}
    for name, arr in samples.items():
        arr = np.asarray(arr, dtype=np.float64)              # (chains, draws, *shape)
        flat = arr.reshape(arr.shape[0], arr.shape[1], -1)
        ess = np.asarray(effective_sample_size(flat))
        rhat = np.asarray(split_gelman_rubin(flat)) if flat.shape[1] >= 4 else np.full(flat.shape[2], np.nan)
        allx = flat.reshape(-1, flat.shape[2])
        mean, sd = allx.mean(0), allx.std(0, ddof=1)
        shape = arr.shape[2:]
        names = [name] if not shape else [f"{name}[{i + 1}]" for i in range(flat.shape[2])]
        for j, key_ in enumerate(names):
            params[key_] = {"mean": float(mean[j]), "sd": float(sd[j])}
        diag[name] = {"ess_bulk_min": float(np.min(ess)), "ess_bulk_median": float(np.median(ess)),
                      "rhat_max": float(np.nanmax(rhat)) if np.isfinite(rhat).any() else None}
    wall = time.perf_counter() - T0
    settings = {"sampler": "numpyro NUTS", "numpyro_version": numpyro.__version__, "jax_version": jax.__version__,
                "dtype": "float64", "num_warmup": args.warmup, "num_samples": args.samples,
                "num_chains": args.chains, "seed": args.seed, "target_accept_prob": args.target_accept,
                "max_tree_depth": args.max_tree_depth, "dense_mass": False}
    rec = {"system": "numpyro_nuts", "model": args.model, "family": family, "K": K, "N": N, "settings": settings, "params": params, "diagnostics": diag,
           "divergences": div, "steps_per_draw": {"mean": float(steps.mean()), "max": int(steps.max())},
           "phases": {"imports": round(T_IMPORTS, 3), "data": round(t_data, 3),
                      "warmup (incl. jit)": None if t_warm is None else round(t_warm, 2),
                      "sampling" if t_warm is not None else "warmup+sampling": round(t_sample, 2)},
           "wall_seconds": round(wall, 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    out = args.out or os.path.join(BENCH, "results", "nuts", f"{args.model}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(out + ".tmp", out)
    if args.fixture:
        spec = hier_data.SPECS[args.model]
        meta = json.load(open(os.path.join(bench_data.DATA, args.model, "data.json")))
        fix = {"name": args.model, "family": family, "K": K, "N": N,
               "generator": spec, "data_sha256": meta["data_sha256"], "true": meta["true"],
               "model": hier_data.model_text(family),
               "nuts": dict(settings, divergences=div, wall_seconds=round(wall, 1),
                            steps_per_draw_mean=round(float(steps.mean()), 1),
                            diagnostics={k: {kk: (None if vv is None else round(vv, 3)) for kk, vv in v.items()}
                                         for k, v in diag.items()}),
               "globals": [k for k in params if "[" not in k],
               "locals": list(hier_data.LOCALS[family]),
               # name -> [mean, sd]
               "posterior": {k: [sig(v["mean"]), sig(v["sd"])] for k, v in params.items()}}
        os.makedirs(os.path.dirname(os.path.abspath(args.fixture)), exist_ok=True)
        with open(args.fixture, "w") as f:
            json.dump(fix, f, separators=(",", ":"))
            f.write("\n")
    summ = {k: params[k] for k in params if "[" not in k}
    sys.stdout.write(json.dumps({"system": "numpyro_nuts", "model": args.model, "globals": summ,
                                 "divergences": div, "wall_seconds": rec["wall_seconds"],
                                 "peak_rss_mb": rec["peak_rss_mb"], "out": out}) + "\n")


main()
