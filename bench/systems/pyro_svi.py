"""Pyro: SVI + AutoNormal (mean-field) or AutoMultivariateNormal (full-rank), JitTrace_ELBO, Adam.

    bench/.venv-peers/bin/python bench/systems/pyro_svi.py MODEL DATA_DIR STEPS SEED FAMILY
        [--mc-samples S (num_particles, default 1)] [--lr X (default 0.01)] [--draws D] [--checkpoints ...]

The models are written as a Pyro user would write them, in Pyro's default
float32.  The mixture's per-row assignment is summed out by the likelihood
(MixtureSameFamily), which is what ppl does by enumeration; `mu` is an
ordered vector (ImproperUniform on ordered_vector + a normal(0, 10) factor).
Means and sds come from draws of the guide in constrained space.
"""
from __future__ import annotations

from common import Checkpoints, Phases, emit, parse_args, summarise  # noqa: E402

args = parse_args("pyro_svi", default_lr=0.01, default_S=1)
ph = Phases()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from pyro.distributions import constraints  # noqa: E402
from pyro.infer import SVI, JitTrace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal  # noqa: E402
from pyro.infer.autoguide.initialization import init_to_median, init_to_value  # noqa: E402
from torch.distributions import biject_to  # noqa: E402

import data as bench_data  # noqa: E402

ph.mark("startup+imports")


def t(x, dtype=None):
    return torch.as_tensor(np.asarray(x), dtype=dtype or torch.get_default_dtype())


def eight_schools(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("J", y.shape[0]):
        theta_raw = pyro.sample("theta_raw", dist.Normal(0.0, 1.0))
        theta = mu + tau * theta_raw
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def logistic(X, y):
    alpha = pyro.sample("alpha", dist.Normal(0.0, 2.5))
    beta = pyro.sample("beta", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    with pyro.plate("N", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=alpha + X @ beta), obs=y)


def radon(log_radon, floor, county, K: int):
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, 10.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(5.0))
    with pyro.plate("K", K):
        a = pyro.sample("a", dist.Normal(mu_a, sigma_a))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(5.0))
    with pyro.plate("N", log_radon.shape[0]):
        pyro.sample("log_radon", dist.Normal(a[county] + b * floor, sigma_y), obs=log_radon)


def linreg(X, y):
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([X.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("N", X.shape[0]):
        pyro.sample("y", dist.Normal(alpha + X @ beta, sigma), obs=y)


def mixture(y):
    w = pyro.sample("w", dist.Dirichlet(torch.ones(2)))
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    pyro.factor("mu_prior", dist.Normal(0.0, 10.0).log_prob(mu).sum())
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    with pyro.plate("N", y.shape[0]):
        pyro.sample("y", dist.MixtureSameFamily(dist.Categorical(w), dist.Normal(mu, sigma)), obs=y)


def setup():
    d = bench_data.arrays(args.model)
    m = args.model
    if m == "eight_schools":
        return eight_schools, (t(d["y"]), t(d["sigma"])), {}
    if m == "logistic":
        return logistic, (t(d["X"]), t(d["y"])), {}
    if m == "radon":
        return radon, (t(d["log_radon"]), t(d["floor"]), t(d["county"], torch.long)), {"K": int(d["K"])}
    if m == "mixture":
        return mixture, (t(d["y"]),), {}
    return linreg, (t(d["X"]), t(d["y"])), {}


def derived(draws):
    if args.model == "eight_schools":
        draws["theta"] = draws["mu"][:, None] + draws["tau"][:, None] * draws["theta_raw"]
    return draws


def guide_draws(guide, n, gen):
    """Constrained draws of every latent site from the guide (no effect on Pyro's RNG stream)."""
    out = {}
    with torch.no_grad():
        if isinstance(guide, AutoNormal):
            for name, site in guide.prototype_trace.iter_stochastic_nodes():
                loc, scale = guide._get_loc_and_scale(name)
                u = loc + scale * torch.randn((n,) + tuple(loc.shape), generator=gen)
                out[name] = biject_to(site["fn"].support)(u).numpy()
        else:
            post = guide.get_posterior()
            L = post.scale_tril
            z = post.loc + torch.randn((n, post.loc.shape[-1]), generator=gen) @ L.T
            pos = 0
            for name, site in guide.prototype_trace.iter_stochastic_nodes():
                shape = tuple(guide._unconstrained_shapes[name])
                size = int(np.prod(shape)) if shape else 1
                u = z[:, pos:pos + size].reshape((n,) + shape)
                out[name] = biject_to(site["fn"].support)(u).numpy()
                pos += size
    return derived(out)


def main():
    with ph("data"):
        model, data_args, kw = setup()
    with ph("build"):
        pyro.set_rng_seed(args.seed)
        pyro.clear_param_store()
        # Pyro's default init (prior median); an ImproperUniform site has no median, so mu gets a start value
        init = init_to_value(values={"mu": torch.tensor([-1.0, 1.0])}, fallback=init_to_median) \
            if args.model == "mixture" else init_to_median
        Guide = AutoNormal if args.family == "meanfield" else AutoMultivariateNormal
        guide = Guide(model, init_loc_fn=init)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": args.lr}),
                  JitTrace_ELBO(num_particles=args.mc_samples, vectorize_particles=args.mc_samples > 1,
                                ignore_jit_warnings=True))
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    cps = Checkpoints(args)
    with ph("first step (jit trace)"):
        svi.step(*data_args, **kw)
    stop = 1 in cps and cps.record(1, summarise(guide_draws(guide, args.draws, gen)))
    with ph("fit"):
        for i in range(2, args.steps + 1):
            if stop:
                break
            svi.step(*data_args, **kw)
            if i in cps:
                ph.mark("fit")
                stop = cps.record(i, summarise(guide_draws(guide, args.draws, gen)))
                ph.mark("checkpoints")
    with ph("summarise"):
        out = summarise(guide_draws(guide, args.draws, gen))
    emit(args, "pyro", out, ph, cps, dtype=str(torch.get_default_dtype()),
         guide=type(guide).__name__, pyro_version=pyro.__version__)


main()
