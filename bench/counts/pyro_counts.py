"""Pyro on the count-latent models (bench/counts): SVI with TraceGraph_ELBO and hand-written guides, as
Pyro's users write them (Pyro cannot enumerate an unbounded count, and has no automatic guide for one).

    bench/.venv-peers/bin/python bench/counts/pyro_counts.py MODEL DATA.json [--guide poisson|shifted]
        [--steps 3000] [--lr 0.05] [--particles 16] [--draws 4000] [--seed 1]

Guides: each count n[i] gets a Poisson(rate[i]) (`poisson`: the guide the Pyro examples show for a count),
or y[i] + Poisson(rate[i]) where the model says n[i] >= y[i] (`shifted`: what a user writes once the
Poisson guide has failed on draws below y); continuous latents get a LogNormal (rates) or a Beta (the
zero-inflation probability), z[i] a Bernoulli.  Count sites carry Pyro's decaying-average baseline (the
SVI tutorial's advice for non-reparameterisable sites); TraceGraph_ELBO Rao-Blackwellises over the plate.
Prints one JSON line: {"system", "model", "guide", "status", "error", "params": {name: {mean, sd}},
"seconds": {"fit", "draws", "total"}, "steps"}; a failed fit (an exception, a NaN loss) is reported, not
hidden.
"""
from __future__ import annotations

import argparse
import json
import math
import time

T0 = time.perf_counter()

import torch  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from pyro.distributions import constraints  # noqa: E402
from pyro.infer import SVI, TraceGraph_ELBO  # noqa: E402
from pyro.optim import Adam  # noqa: E402

BASE = {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.95}}


class Shifted(dist.TorchDistribution):
    """shift + Poisson(rate): a count guide that cannot go below `shift`."""
    arg_constraints = {"rate": constraints.positive}
    support = constraints.nonnegative_integer

    def __init__(self, rate, shift, validate_args=None):
        self.rate, self.shift = rate, shift
        self.base = dist.Poisson(rate)
        super().__init__(self.base.batch_shape, self.base.event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return Shifted(self.rate.expand(batch_shape), self.shift.expand(batch_shape))

    def sample(self, sample_shape=torch.Size()):
        return self.base.sample(sample_shape) + self.shift

    def log_prob(self, value):
        return self.base.log_prob(value - self.shift)


def count_guide(name, y, init, kind):
    rate = pyro.param(f"{name}_rate", init.clamp(min=0.5), constraint=constraints.positive)
    if kind == "shifted":
        return pyro.sample(name, Shifted(rate, y), infer=BASE)
    return pyro.sample(name, dist.Poisson(rate), infer=BASE)


def lognormal_guide(name, mean, sd):
    loc = pyro.param(f"{name}_loc", torch.tensor(math.log(mean)))
    scale = pyro.param(f"{name}_scale", torch.tensor(sd), constraint=constraints.positive)
    return pyro.sample(name, dist.LogNormal(loc, scale))


# ---- models and guides ------------------------------------------------------------------------------------
def thin_model(y):
    with pyro.plate("N", len(y)):
        n = pyro.sample("n", dist.Poisson(torch.tensor(20.0)))
        pyro.sample("y", dist.Binomial(n, torch.tensor(0.3)), obs=y)


def thin_guide(y, kind):
    with pyro.plate("N", len(y)):
        count_guide("n", y, y / 0.3 if kind == "poisson" else torch.full_like(y, 10.0), kind)


def noisy_model(y):
    with pyro.plate("N", len(y)):
        n = pyro.sample("n", dist.Poisson(torch.tensor(20.0)))
        pyro.sample("y", dist.Normal(n, 2.0), obs=y)


def noisy_guide(y, kind):
    with pyro.plate("N", len(y)):
        count_guide("n", torch.zeros_like(y), y.clamp(min=1.0), "poisson")


def rate_model(y):
    lam = pyro.sample("lam", dist.Gamma(3.0, 0.1))
    with pyro.plate("N", len(y)):
        n = pyro.sample("n", dist.Poisson(lam))
        pyro.sample("y", dist.Binomial(n, torch.tensor(0.5)), obs=y)


def rate_guide(y, kind):
    lognormal_guide("lam", float(2 * y.mean()) + 1.0, 0.2)
    with pyro.plate("N", len(y)):
        count_guide("n", y, 2 * y + 1 if kind == "poisson" else y.mean().expand(y.shape) + 1.0, kind)


def zip_model(y):
    theta = pyro.sample("theta", dist.Beta(1.0, 1.0))
    lam = pyro.sample("lam", dist.Gamma(2.0, 0.2))
    with pyro.plate("N", len(y)):
        z = pyro.sample("z", dist.Bernoulli(theta))
        n = pyro.sample("n", dist.Poisson(lam))
        pyro.sample("y", dist.Binomial(n, 1 - z), obs=y)


def zip_guide(y, kind):
    a = pyro.param("theta_a", torch.tensor(2.0), constraint=constraints.positive)
    b = pyro.param("theta_b", torch.tensor(2.0), constraint=constraints.positive)
    pyro.sample("theta", dist.Beta(a, b))
    lognormal_guide("lam", float(y[y > 0].mean()) if (y > 0).any() else 1.0, 0.3)
    with pyro.plate("N", len(y)):
        p = pyro.param("z_probs", torch.where(y > 0, 0.05, 0.5), constraint=constraints.unit_interval)
        pyro.sample("z", dist.Bernoulli(p), infer=BASE)
        count_guide("n", y, y + 1.0 if kind == "poisson" else torch.full_like(y, 1.0), kind)


MODELS = {"thin": (thin_model, thin_guide, ["n"]), "noisy": (noisy_model, noisy_guide, ["n"]),
          "rate": (rate_model, rate_guide, ["lam", "n"]), "zip": (zip_model, zip_guide, ["theta", "lam", "z", "n"])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("data")
    ap.add_argument("--guide", choices=["poisson", "shifted"], default="poisson")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--draws", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    pyro.set_rng_seed(a.seed)
    pyro.clear_param_store()
    with open(a.data) as f:
        y = torch.tensor(json.load(f)["y"], dtype=torch.float32)
    model, guide_fn, sites = MODELS[a.model]

    def guide(y):
        return guide_fn(y, a.guide)
    out = {"system": "pyro", "model": a.model, "guide": a.guide, "steps": a.steps, "status": "ok", "error": None,
           "params": {}, "seconds": {}}
    t0 = time.perf_counter()
    svi = SVI(model, guide, Adam({"lr": a.lr}),
              TraceGraph_ELBO(num_particles=a.particles, vectorize_particles=True, max_plate_nesting=1))
    losses = []
    try:
        for _ in range(a.steps):
            loss = svi.step(y)
            losses.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {len(losses)}")
    except Exception as e:  # noqa: BLE001  (the failure is the measurement)
        out["status"] = "failed"
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    out["steps_done"] = len(losses)
    out["seconds"]["fit"] = time.perf_counter() - t0
    if out["status"] == "ok":
        t1 = time.perf_counter()
        with torch.no_grad():
            with pyro.plate("draws", a.draws, dim=-2):
                tr = pyro.poutine.trace(guide).get_trace(y)
        for s in sites:
            v = tr.nodes[s]["value"].double().reshape(a.draws, -1)
            names = [s] if v.shape[1] == 1 and s in ("lam", "theta") else [f"{s}[{i + 1}]" for i in range(v.shape[1])]
            for j, nm in enumerate(names):
                out["params"][nm] = {"mean": float(v[:, j].mean()), "sd": float(v[:, j].std())}
        out["seconds"]["draws"] = time.perf_counter() - t1
    out["seconds"]["total"] = time.perf_counter() - T0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
