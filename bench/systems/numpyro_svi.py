"""NumPyro: SVI + AutoNormal (mean-field), AutoMultivariateNormal (full-rank) or AutoLowRankMultivariateNormal
(lowrank), Trace_ELBO, Adam, jitted.

    bench/.venv-peers/bin/python bench/systems/numpyro_svi.py MODEL DATA_DIR STEPS SEED FAMILY
        [--mc-samples S (num_particles, default 1)] [--lr X (default 0.01)] [--draws D] [--checkpoints ...]
        [--rank R (lowrank; default NumPyro's, round(sqrt(latent dim)))] [--rule default|hier]

The hier_* models (thousands of group latents) are numpyro_hier.hier_model, the
same model NUTS runs for their references; with --checkpoints their accuracy
is judged by --rule hier (the issue's bar) and only the globals are kept per
checkpoint.

A plain run is `svi.run(key, steps, ..., progress_bar=False)`: the whole loop
is one jitted lax.scan, JIT compile included in the process time.  JAX's
default float32.  The mixture's assignment is summed out in the likelihood
(MixtureSameFamily); `mu` is an ordered vector (ImproperUniform + factor).
With --checkpoints the same updates run as jitted chunks between checkpoints.
"""
from __future__ import annotations

from common import Checkpoints, Phases, emit, parse_args, summarise  # noqa: E402

args = parse_args("numpyro_svi", default_lr=0.01, default_S=1)
ph = Phases()

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO, init_to_median, init_to_value  # noqa: E402
from numpyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal  # noqa: E402

import data as bench_data  # noqa: E402
import numpyro_hier  # noqa: E402
from numpyro_models import eight_schools, linreg, logistic, mixture, radon  # noqa: E402

ph.mark("startup+imports")


def setup():
    m = args.model
    if m in bench_data.HIER_MODELS:
        data_args, kw = numpyro_hier.arrays(m)
        return numpyro_hier.hier_model, data_args, kw
    d = bench_data.arrays(args.model)
    a = jnp.asarray
    if m == "eight_schools":
        return eight_schools, (a(d["y"]), a(d["sigma"])), {}
    if m == "logistic":
        return logistic, (a(d["X"]), a(d["y"])), {}
    if m == "radon":
        return radon, (a(d["log_radon"]), a(d["floor"]), a(d["county"])), {"K": int(d["K"])}
    if m == "mixture":
        return mixture, (a(d["y"]),), {}
    return linreg, (a(d["X"]), a(d["y"])), {}


def draws_of(guide, params, key):
    s = guide.sample_posterior(key, params, sample_shape=(args.draws,))
    out = {k: np.asarray(v) for k, v in s.items() if not k.startswith("_")}
    if args.model == "eight_schools":
        out["theta"] = out["mu"][:, None] + out["tau"][:, None] * out["theta_raw"]
    return out


def main():
    with ph("data"):
        model, data_args, kw = setup()
    with ph("build"):
        init = init_to_value(values={"mu": jnp.array([-1.0, 1.0])}) if args.model == "mixture" else init_to_median
        if args.family == "lowrank":
            guide = AutoLowRankMultivariateNormal(model, init_loc_fn=init, rank=args.rank)
        else:
            Guide = AutoNormal if args.family == "meanfield" else AutoMultivariateNormal
            guide = Guide(model, init_loc_fn=init)
        svi = SVI(model, guide, numpyro.optim.Adam(args.lr), Trace_ELBO(num_particles=args.mc_samples), **kw)
    key = jax.random.PRNGKey(args.seed)
    draw_key = jax.random.PRNGKey(10_000 + args.seed)
    cps = Checkpoints(args)
    if not args.checkpoints:
        with ph("fit (jit compile + run)"):
            res = svi.run(key, args.steps, *data_args, progress_bar=False)
            params = res.params
            jax.block_until_ready(params)
    else:
        with ph("fit (jit compile + run)"):
            state = svi.init(key, *data_args)

            @jax.jit
            def advance(state, n):
                return jax.lax.fori_loop(0, n, lambda i, s: svi.update(s, *data_args)[0], state)
            done, stop = 0, False
            for c in args.checkpoints:
                state = advance(state, c - done)
                done = c
                params = svi.get_params(state)
                ph.mark("fit (jit compile + run)")
                stop = cps.record(c, summarise(draws_of(guide, params, draw_key)))
                ph.mark("checkpoints")
                if stop:
                    break
            if done < args.steps and not stop:
                state = advance(state, args.steps - done)
            params = svi.get_params(state)
    with ph("summarise"):
        out = summarise(draws_of(guide, params, draw_key))
    rank = getattr(guide, "rank", None)
    emit(args, "numpyro", out, ph, cps, guide=type(guide).__name__, rank=None if rank is None else int(rank),
         dtype="float64" if jax.config.jax_enable_x64 else "float32", numpyro_version=numpyro.__version__)


main()
