"""Where ppl's time goes in the VAE's training epochs (bench/vae.py's `ppl` run), against the torch loop's.

    python bench/vae_profile.py DIGITS.csv [--epochs 4] [--mc-samples N] [--top 25]

Fits models/vae.ppl through the Python API as `ppl fit ... --batch-size 128 --holdout 0.1` does, with
minibatch.optimise (the epochs, nothing before or after) run under cProfile and torch.profiler; prints
the Python functions by their own time and by cumulative time, and the torch ops by self CPU time.
Then profiles the same number of epochs of bench/systems/vae_torch.py's loop (with as many draws per
row as ppl took) with torch.profiler, for the ops side by side.  One thread.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "systems"))


def profile_ppl(csv: str, epochs: int, mc_samples, top: int) -> int:
    import ppl
    from ppl.infer import fit as fit_mod
    from ppl.infer import minibatch
    original = minibatch.optimise
    seen = {}

    def wrapped(vi, config, S, lr, progress=None):
        seen["S"] = S
        prof = cProfile.Profile()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
            t0 = time.perf_counter()
            prof.enable()
            out = original(vi, config, S, lr, progress)
            prof.disable()
            seen["seconds"] = time.perf_counter() - t0
        seen["cprofile"], seen["torch"] = prof, tp
        return out

    minibatch.optimise = wrapped
    try:
        options = dict(batch_size=128, epochs=epochs, holdout=0.1, draws=100)
        if mc_samples:
            options["mc_samples"] = mc_samples
        f = ppl.load(str(ROOT / "models" / "vae.ppl")).fit(csv, **options)
    finally:
        minibatch.optimise = original
    print(f"== ppl: {f.steps} steps, {seen['S']} draws a row a step (an odd count: independent draws; even: "
          f"antithetic pairs), optimise {seen['seconds']:.2f} s under the profilers ({fit_mod.__name__})")
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(seen["cprofile"], stream=s).sort_stats(key).print_stats(top)
        print(f"-- Python functions by {key}\n" + "\n".join(s.getvalue().splitlines()[4:]))
    print("-- torch ops by self CPU time (ppl)")
    print(seen["torch"].key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return seen["S"]


def profile_torch(csv: str, epochs: int, S: int, top: int) -> None:
    from vae_common import PPL_WEIGHT_LR, LATENT, Data, Decoder, Encoder, ppl_lr, row_elbo_terms
    torch.set_default_dtype(torch.float64)
    data = Data(csv, 0.1, 0, torch.float64)
    gen = torch.Generator().manual_seed(0)
    enc, dec = Encoder(data.P, gen), Decoder(data.P, gen)
    opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=PPL_WEIGHT_LR)
    N, B, t = data.N, 128, 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        t0 = time.perf_counter()
        for _ in range(epochs):
            perm = torch.randperm(N, generator=gen)
            for i in range(0, N, B):
                idx = perm[i:i + B]
                eps = torch.randn((S, idx.shape[0], LATENT), generator=gen)
                loss = -(N / idx.shape[0]) * row_elbo_terms(enc, dec, data.x[idx], data.xs[idx], eps).mean(0).sum()
                for group in opt.param_groups:
                    group["lr"] = ppl_lr(t, PPL_WEIGHT_LR)
                opt.zero_grad()
                loss.backward()
                opt.step()
                t += 1
        dt = time.perf_counter() - t0
    print(f"== torch loop: {t} steps, {S} draws a row, {dt:.2f} s under torch.profiler")
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--mc-samples", type=int, default=None)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    S = profile_ppl(str(Path(a.csv).resolve()), a.epochs, a.mc_samples, a.top)
    profile_torch(str(Path(a.csv).resolve()), a.epochs, S, a.top)


if __name__ == "__main__":
    main()
