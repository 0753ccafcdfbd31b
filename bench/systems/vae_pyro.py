"""Pyro's VAE with models/vae.ppl's architecture (bench/systems/vae_common.py), for bench/vae.py; run with
the peers' venv (bench/setup.sh).

    bench/.venv-peers/bin/python bench/systems/vae_pyro.py DIGITS.csv --epochs E --seed S
        [--lr0 0.01] [--batch-size 128] [--holdout 0.1] [--dtype float64]

The model and guide register the decoder and encoder with pyro.module; the rows sit in
pyro.plate("data", N, subsample=idx) with idx a batch of B rows of each epoch's permutation (the
same batches an epoch of ppl or the torch loop sees; ppl scales the batch by N/B as the plate does);
SVI with Trace_ELBO (one particle: one draw per row) and pyro.optim.Adam, its step size set each
step to ppl's lr0 / sqrt(1 + t / 100).  Prints one JSON line (the fields of vae_torch.py).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vae_common import LATENT, arguments, Data, Decoder, Encoder, heldout_elbo, ppl_lr  # noqa: E402


def main() -> None:
    t_process = time.perf_counter()
    a = arguments()
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    dtype = a.torch_dtype
    pyro.set_rng_seed(a.seed)
    pyro.clear_param_store()
    data = Data(a.csv, a.holdout, a.seed, dtype)
    gen = torch.Generator().manual_seed(a.seed)
    enc, dec = Encoder(data.P, gen), Decoder(data.P, gen)
    start = heldout_elbo(enc, dec, data, a.seed)
    N = data.N
    zero, one = torch.zeros(()), torch.ones(())

    def model(x, xs, idx):
        pyro.module("decoder", dec)
        with pyro.plate("data", N, subsample=idx):
            z = pyro.sample("z", dist.Normal(zero, one).expand([idx.shape[0], LATENT]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

    def guide(x, xs, idx):
        pyro.module("encoder", enc)
        with pyro.plate("data", N, subsample=idx):
            mu, log_sd = enc(xs)
            pyro.sample("z", dist.Normal(mu, torch.exp(log_sd)).to_event(1))

    lr = {"value": a.lr0}
    optim = Adam(lambda module_name, param_name: {"lr": lr["value"]})
    svi = SVI(model, guide, optim, loss=Trace_ELBO())
    B = a.batch_size
    t = 0
    # pyro.optim makes its torch.optim.Adam's at the first step, and the first torch.optim.Adam of a
    # process imports torch._dynamo (~5 s): a one-time cost of the process, done here, not in epoch 1
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    per_epoch = []
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.epochs):
        te = time.perf_counter()
        perm = torch.randperm(N, generator=gen)
        for i in range(0, N, B):
            idx = perm[i:i + B]
            lr["value"] = ppl_lr(t, a.lr0)
            for o in optim.optim_objs.values():          # the per-parameter torch optimisers made so far
                for group in o.param_groups:
                    group["lr"] = lr["value"]
            svi.step(data.x[idx], data.xs[idx], idx)
            t += 1
        per_epoch.append(time.perf_counter() - te)
    train, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    end = heldout_elbo(enc, dec, data, a.seed)
    print(json.dumps({"system": "pyro", "seed": a.seed, "epochs": a.epochs, "steps": t, "mc_samples": 1,
                      "lr0": a.lr0, "dtype": a.dtype, "train_seconds": train, "s_per_epoch": train / a.epochs,
                      "cpu_s_per_epoch": train_cpu / a.epochs,
                      "epoch_seconds": per_epoch,
                      "heldout_elbo_per_row": end, "heldout_elbo_per_row_start": start,
                      "pyro": pyro.__version__,
                      "process_seconds_after_imports": time.perf_counter() - t_process}))


if __name__ == "__main__":
    main()
