"""Relaxed discrete latents (--estimator relaxed) against the score path, on one mixture model.

    python3 bench/relaxed.py [--rows 300] [--reps 64] [--seeds 1,2] [--skip-fits]

Model: a 3-component Gaussian mixture with known weights and unit sds, means latent (-4, 0, 4 in
the data), a categorical z per row; and the same model with a term over all rows
(`total ~ normal(sum(mu[z]), 10)`), which stops z from being summed out.

1. Gradient variance of q's logits (summed over the logits, over --reps independent gradients at
   S MC samples): the score path (Rao-Blackwellised, leave-one-out baseline, control variate; its
   first 4 gradients unrecorded while the control variate learns) against the relaxed estimator at
   T = 1, 0.3, 0.1, at two points: the start (q uniform, mu at the truth) and the optimum (q at the
   exact responsibilities).  Also |mean gradient|^2 (the signal), so the noise is read against it.
2. Fits at the defaults: enumerate (the exact reference), score, relaxed: seconds, steps, ELBO,
   q's error against the exact responsibilities, and the means' error in posterior sds.
One thread (OMP_NUM_THREADS=1); times only as ratios within one run.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ppl  # noqa: E402
from ppl.backend.log_joint import LogJoint  # noqa: E402
from ppl.config import FitConfig  # noqa: E402
from ppl.infer import relaxed as R  # noqa: E402
from ppl.infer.discrete import discrete_families  # noqa: E402
from ppl.infer.engine import VI  # noqa: E402
from ppl.infer.families import FAMILIES, Preconditioner  # noqa: E402
from ppl.infer.objectives import OBJECTIVES  # noqa: E402
from ppl.plan import plan  # noqa: E402

DT = torch.float64
W = [0.2, 0.3, 0.5]
MU = np.array([-4.0, 0.0, 4.0])
MIX = """
data y: real[N]
K = 3
w = [0.2, 0.3, 0.5]
mu: ordered[K] ~ normal(0, 5)
z[N] ~ categorical(w)
y ~ normal(mu[z], 1)
"""
SUMMED = MIX + "data total: real\ntotal ~ normal(sum(mu[z]), 10)\n"


def data(N, seed):
    rng = np.random.default_rng(seed)
    z = rng.choice(3, N, p=W)
    y = rng.normal(MU[z], 1.0)
    return {"y": y.tolist(), "total": float(y.sum())}


def responsibilities(y, mu_draws):
    lp = -0.5 * (np.asarray(y)[None, :, None] - mu_draws[:, None, :]) ** 2 + np.log(W)
    r = np.exp(lp - lp.max(-1, keepdims=True))
    return (r / r.sum(-1, keepdims=True)).mean(0)


def problem(src, d, estimator, logits, seed=0):
    model = ppl.loads(src, "m.ppl").check(d)
    p = plan(model, estimator)
    lj = LogJoint(model, p, DT)
    gen = torch.Generator().manual_seed(seed)
    mu0 = lj.unconstrain({"mu": torch.tensor(MU, dtype=DT)[None]})[0]
    fam = FAMILIES["meanfield"](Preconditioner(mu0, 0.05 * torch.ones(lj.dim, dtype=DT)), gen)
    dq = discrete_families(model, lj, p, gen)
    with torch.no_grad():
        dq["z"].param.copy_(logits)
    config = FitConfig()
    return VI(lj, fam, OBJECTIVES["elbo"](config), dq, p, config, "relaxed" if estimator == "relaxed" else "reparam")


def gradients(est, S, reps, warm=0):
    vi = est.vi
    out = []
    for r in range(warm + reps):
        for p in vi.parameters():
            p.grad = None
        est.gradient(S)
        if r >= warm:
            out.append(vi.discrete["z"].param.grad.reshape(-1).clone())
    g = torch.stack(out)
    return float(g.var(0).sum()), float((g.mean(0) ** 2).sum())


def variance_table(N, reps, seed):
    print(f"\n## logit-gradient variance, N = {N} rows, {reps} gradients each (sum over the {3 * N} logits)\n")
    print("| model | q at | S | score var | relaxed var T=1 | T=0.3 | T=0.1 | score/relaxed(T=1) | "
          "score/relaxed(T=0.1) | signal (score) | signal (relaxed T=0.1) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    d = data(N, seed)
    y = np.asarray(d["y"])
    exact = torch.tensor(np.log(responsibilities(y, MU[None])), dtype=DT)
    for name, src in (("mixture", MIX), ("mixture + sum over rows", SUMMED)):
        for where, logits in (("start (uniform)", torch.zeros((N, 3), dtype=DT)), ("exact", exact)):
            for S in (16, 64):
                vi_s = problem(src, d, "score", logits)
                v_s, m_s = gradients(vi_s.estimator, S, reps, R.WARM)
                row = []
                for T in (1.0, 0.3, 0.1):
                    vi_r = problem(src, d, "relaxed", logits)
                    est = R.Relaxed(vi_r)
                    est.temperature = (lambda T: lambda t=None: T)(T)
                    row.append(gradients(est, S, reps))
                print(f"| {name} | {where} | {S} | {v_s:.4g} | {row[0][0]:.4g} | {row[1][0]:.4g} | {row[2][0]:.4g} | "
                      f"{v_s / row[0][0]:.3g}x | {v_s / row[2][0]:.3g}x | {m_s:.4g} | {row[2][1]:.4g} |")


def fit_table(N, seeds):
    print(f"\n## fits at the defaults, N = {N} rows (mixture; q error: |q(z_n = k) - exact| over rows and k)\n")
    print("| model | estimator | seed | seconds | steps | ELBO | q err q95 | q err max | mu err (sd) max |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed in seeds:
        d = data(N, seed)
        y = np.asarray(d["y"])
        m = ppl.loads(MIX, "mix.ppl")
        ref = m.fit({"y": d["y"]}, estimator="auto", seed=seed, draws=400)
        r = responsibilities(y, ref.draws["mu"])
        a = ref.summary()
        print(f"| mixture | enumerate | {seed} | {ref.seconds:.2f} | {ref.steps} | {ref.elbo:.2f} | - | - | - |")
        for est in ("score", "relaxed"):
            f = m.fit({"y": d["y"]}, estimator=est, seed=seed, draws=400)
            q = torch.softmax(f.q.discrete["z"].param.detach(), -1).numpy()
            err = np.abs(q - r).max(-1)
            b = f.summary(corrected=False)
            mu_err = max(abs(b[k]["mean"] - a[k]["mean"]) / a[k]["sd"] for k in ("mu[1]", "mu[2]", "mu[3]"))
            print(f"| mixture | {est} | {seed} | {f.seconds:.2f} | {f.steps} | {f.elbo:.2f} | "
                  f"{np.quantile(err, 0.95):.3f} | {err.max():.3f} | {mu_err:.2f} |")
        ms = ppl.loads(SUMMED, "m.ppl")
        for est in ("auto", "score"):
            f = ms.fit(d, estimator=est, seed=seed, draws=400)
            q = torch.softmax(f.q.discrete["z"].param.detach(), -1).numpy()
            err = np.abs(q - r).max(-1)
            print(f"| + sum over rows | {est}: {f.estimator.split(';')[0]} | {seed} | {f.seconds:.2f} | {f.steps} | "
                  f"{f.elbo:.2f} | {np.quantile(err, 0.95):.3f} | {err.max():.3f} | (no exact reference) |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--reps", type=int, default=64)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--skip-fits", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    variance_table(a.rows, a.reps, 0)
    if not a.skip_fits:
        fit_table(a.rows, [int(s) for s in a.seeds.split(",")])
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
