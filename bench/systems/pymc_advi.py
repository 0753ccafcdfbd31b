"""PyMC: pm.fit(method='advi') (mean-field) or pm.fit(method='fullrank_advi'), PyMC's defaults otherwise.

    bench/.venv-peers/bin/python bench/systems/pymc_advi.py MODEL DATA_DIR STEPS SEED FAMILY
        [--mc-samples S (obj_n_mc, default 1)] [--lr X] [--optim adam|adagrad_window]
        [--draws D] [--checkpoints ...]

PyMC's default float64 and optimiser (adagrad_window, lr 0.001) unless --optim
adam / --lr say otherwise (the driver searches both: with one MC sample,
adagrad_window's step noise inflates the fitted sds, e.g. tau's by 2x on eight
schools, however long it runs).  The compile cache is
wherever PYTENSOR_FLAGS=compiledir=... points: the driver gives a cold run a
fresh empty directory and a warm run a shared, already-filled one.  The
mixture's assignment is summed out by pm.NormalMixture; `mu` uses PyMC's
ordered transform.  Means and sds come from approx.sample(draws) (the
Deterministic theta included), in constrained space.  The hier_* models
(thousands of group latents; tests/hier_data.TEXTS) are judged with --rule hier
against their NUTS references (bench/systems/numpyro_nuts.py).
"""
from __future__ import annotations

from common import Checkpoints, Phases, emit, parse_args, summarise  # noqa: E402

args = parse_args("pymc_advi", default_lr=None, default_S=1)
ph = Phases()

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pymc as pm  # noqa: E402
import pytensor  # noqa: E402

import data as bench_data  # noqa: E402

ph.mark("startup+imports")
warnings.filterwarnings("ignore")


def build_hier(d):
    fam, K, g, x = d["family"], int(d["K"]), d["g"], d["x"]
    with pm.Model() as model:
        mu = pm.Normal("mu", 0, 5)
        tau = pm.HalfNormal("tau", 2)
        if fam == "centred":
            a = pm.Normal("a", mu, tau, shape=K)
        else:
            z = pm.Normal("z", 0, 1, shape=K)
        b = pm.Normal("b", 0, 5)
        names = ["mu", "tau", "a" if fam == "centred" else "z", "b"]
        if fam == "slopes":
            tau_b = pm.HalfNormal("tau_b", 2)
            zb = pm.Normal("zb", 0, 1, shape=K)
            names += ["tau_b", "zb"]
        if fam == "centred":
            eta = a[g] + b * x
        elif fam == "slopes":
            eta = mu + tau * z[g] + (b + tau_b * zb[g]) * x
        else:
            eta = mu + tau * z[g] + b * x
        if fam == "poisson":
            pm.Poisson("y", mu=pm.math.exp(eta), observed=d["y"])
        elif fam == "bernoulli":
            pm.Bernoulli("y", logit_p=eta, observed=d["y"])
        else:
            sigma = pm.HalfNormal("sigma", 2)
            names.append("sigma")
            pm.Normal("y", eta, sigma, observed=d["y"])
    return model, names


def build(d):
    m = args.model
    if m in bench_data.HIER_MODELS:
        return build_hier(d)
    with pm.Model() as model:
        if m == "eight_schools":
            mu = pm.Normal("mu", 0, 5)
            tau = pm.HalfCauchy("tau", 5)
            theta_raw = pm.Normal("theta_raw", 0, 1, shape=len(d["y"]))
            theta = pm.Deterministic("theta", mu + tau * theta_raw)
            pm.Normal("y", theta, d["sigma"], observed=d["y"])
            names = ["mu", "tau", "theta_raw", "theta"]
        elif m == "logistic":
            alpha = pm.Normal("alpha", 0, 2.5)
            beta = pm.Normal("beta", 0, 2.5, shape=d["X"].shape[1])
            pm.Bernoulli("y", logit_p=alpha + pm.math.dot(d["X"], beta), observed=d["y"])
            names = ["alpha", "beta"]
        elif m == "radon":
            mu_a = pm.Normal("mu_a", 0, 10)
            sigma_a = pm.HalfNormal("sigma_a", 5)
            a = pm.Normal("a", mu_a, sigma_a, shape=int(d["K"]))
            b = pm.Normal("b", 0, 10)
            sigma_y = pm.HalfNormal("sigma_y", 5)
            pm.Normal("log_radon", a[d["county"]] + b * d["floor"], sigma_y, observed=d["log_radon"])
            names = ["mu_a", "sigma_a", "a", "b", "sigma_y"]
        elif m == "mixture":
            w = pm.Dirichlet("w", a=np.ones(2))
            mu = pm.Normal("mu", 0, 10, shape=2, transform=pm.distributions.transforms.ordered,
                           initval=np.array([-1.0, 1.0]))
            sigma = pm.HalfNormal("sigma", 2, shape=2)
            pm.NormalMixture("y", w=w, mu=mu, sigma=sigma, observed=d["y"])
            names = ["w", "mu", "sigma"]
        else:
            alpha = pm.Normal("alpha", 0, 10)
            beta = pm.Normal("beta", 0, 10, shape=d["X"].shape[1])
            sigma = pm.HalfNormal("sigma", 5)
            pm.Normal("y", alpha + pm.math.dot(d["X"], beta), sigma, observed=d["y"])
            names = ["alpha", "beta", "sigma"]
    return model, names


def main():
    with ph("data"):
        d = bench_data.arrays(args.model)
    with ph("build"):
        model, names = build(d)
    cps = Checkpoints(args)

    fns = {}

    def draws_now(approx):
        # one compiled, vectorised draw of every reported variable (Deterministics included), constrained
        if "f" not in fns:
            nodes = [approx.sample_node(model[k], size=args.draws) for k in names]
            fns["f"] = pm.pytensorf.compile([], nodes, random_seed=10_000 + args.seed)
        return dict(zip(names, (np.asarray(v) for v in fns["f"]())))

    def callback(approx, losses, i):
        if (i + 1) in cps:
            ph.mark("fit (compile + run)")
            stop = cps.record(i + 1, summarise(draws_now(approx)))
            ph.mark("checkpoints")
            if stop:
                raise StopIteration(f"accurate at {i + 1}")

    kw = {}
    if args.optim == "adam":
        kw["obj_optimizer"] = pm.adam(learning_rate=args.lr if args.lr is not None else 0.001)
    elif args.lr is not None:
        kw["obj_optimizer"] = pm.adagrad_window(learning_rate=args.lr)
    if args.mc_samples != 1:
        kw["obj_n_mc"] = args.mc_samples
    method = "advi" if args.family == "meanfield" else "fullrank_advi"
    with ph("fit (compile + run)"):
        with model:
            approx = pm.fit(n=args.steps, method=method, random_seed=args.seed, progressbar=False,
                            callbacks=[callback] if args.checkpoints else None, **kw)
    with ph("summarise"):
        trace = approx.sample(args.draws, random_seed=10_000 + args.seed, return_inferencedata=False)
        out = summarise({k: trace.get_values(k) for k in names})
    emit(args, "pymc", out, ph, cps, method=method, pymc_version=pm.__version__,
         compiledir=str(pytensor.config.compiledir), floatX=pytensor.config.floatX)


main()
