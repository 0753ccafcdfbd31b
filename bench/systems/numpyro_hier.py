"""The hier_* models in NumPyro, exactly as tests/hier_data.TEXTS states them (shared by numpyro_nuts.py
and numpyro_svi.py).  `arrays(name)` gives the model's arguments from bench/data/NAME/data.csv."""
from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

import data as bench_data


def hier_model(y, x, g, family, K):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    with numpyro.plate("K", K):
        if family == "centred":
            a = numpyro.sample("a", dist.Normal(mu, tau))
        else:
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 5.0))
    if family == "slopes":
        tau_b = numpyro.sample("tau_b", dist.HalfNormal(2.0))
        with numpyro.plate("K2", K):
            zb = numpyro.sample("zb", dist.Normal(0.0, 1.0))
    if family in ("noncentred", "centred", "slopes"):
        sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    if family == "centred":
        eta = a[g] + b * x
    elif family == "slopes":
        eta = mu + tau * z[g] + (b + tau_b * zb[g]) * x
    else:
        eta = mu + tau * z[g] + b * x
    with numpyro.plate("N", y.shape[0]):
        if family == "poisson":
            numpyro.sample("y", dist.Poisson(jnp.exp(eta)), obs=y)
        elif family == "bernoulli":
            numpyro.sample("y", dist.Bernoulli(logits=eta), obs=y)
        else:
            numpyro.sample("y", dist.Normal(eta, sigma), obs=y)


def arrays(name, float_dtype=None):
    """((y, x, g (0-based)) as jax arrays (JAX's default precision unless given), {family, K}) for hier_model."""
    d = bench_data.arrays(name)
    family = d["family"]
    counts = family in ("poisson", "bernoulli")
    y = jnp.asarray(d["y"], dtype=jnp.int32 if counts else float_dtype)
    return (y, jnp.asarray(d["x"], dtype=float_dtype), jnp.asarray(d["g"], dtype=jnp.int32)), \
        {"family": family, "K": int(d["K"])}
