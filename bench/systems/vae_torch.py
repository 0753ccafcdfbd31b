"""A hand-written VAE training loop in plain torch (nn.Linear, torch.optim.Adam) with models/vae.ppl's
architecture (bench/systems/vae_common.py), for bench/vae.py.

    python bench/systems/vae_torch.py DIGITS.csv --epochs E --seed S [--mc-samples 1] [--lr0 0.01]
        [--batch-size 128] [--holdout 0.1] [--dtype float64]

Each epoch: a random permutation of the training rows in batches of B (the last one smaller); per
batch, S reparameterised draws per row, the loss -(N / B) sum over the batch of the draws' mean ELBO
(ppl's scaling of the per-row terms), one Adam step with lr0 / sqrt(1 + t / 100) (ppl's schedule).
Prints one JSON line: epochs, steps, training seconds (the loop alone), held-out ELBO per row at the
start and the end (200 draws per row, as ppl).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vae_common import LATENT, arguments, Data, Decoder, Encoder, heldout_elbo, ppl_lr, row_elbo_terms  # noqa: E402


def main() -> None:
    t_process = time.perf_counter()
    a = arguments([("--mc-samples", dict(type=int, default=1))])
    dtype = a.torch_dtype
    torch.manual_seed(a.seed)
    data = Data(a.csv, a.holdout, a.seed, dtype)
    gen = torch.Generator().manual_seed(a.seed)
    enc, dec = Encoder(data.P, gen), Decoder(data.P, gen)
    start = heldout_elbo(enc, dec, data, a.seed)
    opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=a.lr0)
    N, B, S = data.N, a.batch_size, a.mc_samples
    t = 0
    per_epoch = []
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.epochs):
        te = time.perf_counter()
        perm = torch.randperm(N, generator=gen)
        for i in range(0, N, B):
            idx = perm[i:i + B]
            x, xs = data.x[idx], data.xs[idx]
            eps = torch.randn((S, idx.shape[0], LATENT), generator=gen)
            loss = -(N / idx.shape[0]) * row_elbo_terms(enc, dec, x, xs, eps).mean(0).sum()
            for group in opt.param_groups:
                group["lr"] = ppl_lr(t, a.lr0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            t += 1
        per_epoch.append(time.perf_counter() - te)
    train, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    end = heldout_elbo(enc, dec, data, a.seed)
    print(json.dumps({"system": "torch", "seed": a.seed, "epochs": a.epochs, "steps": t, "mc_samples": S,
                      "lr0": a.lr0, "dtype": a.dtype, "train_seconds": train, "s_per_epoch": train / a.epochs,
                      "cpu_s_per_epoch": train_cpu / a.epochs,
                      "epoch_seconds": per_epoch,
                      "heldout_elbo_per_row": end, "heldout_elbo_per_row_start": start,
                      "process_seconds_after_imports": time.perf_counter() - t_process}))


if __name__ == "__main__":
    main()
