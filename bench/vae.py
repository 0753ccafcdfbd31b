"""The VAE of models/vae.ppl on the binarised digits: ppl against a hand-written torch loop and Pyro
(issue 10, item 6).

    python bench/vae.py models/vae.csv --epochs E [--seeds 0,1] [--peers-python bench/.venv-peers/bin/python]
        [--systems ppl,ppl-s1,ppl-s1-lr,ppl-s16,torch,torch-s16,pyro] [--out bench/results/vae.json]
    python bench/vae.py --report [--out bench/results/vae.json]       # the table of a finished run

Per seed, interleaved (one process each, OMP_NUM_THREADS=1):
- `ppl`: `ppl fit models/vae.ppl CSV --batch-size 128 --epochs E --holdout 0.1 --seed S --format json
  --profile` as a user runs it (ppl.cli.main; its defaults for an encoder fit without global latents:
  one draw of z a row a step, Adam 0.1, the weights at 0.1 of it).  Whole-process wall time; the wall
  and CPU seconds of the epochs (minibatch.optimise, timed by a wrapper) over the epochs it ran (its
  convergence test may stop it before E), and each epoch's wall seconds (minibatch.Epochs.epoch,
  wrapped; the table's median epoch); the held-out ELBO per row from its JSON.
- `ppl-s1`: the same with `--mc-samples 1` (now ppl's default here: the same fit); `ppl-s1-lr`:
  `--mc-samples 1 --lr 0.1` (the same again: the step size no longer follows the draws for an encoder);
  `ppl-s16`: `--mc-samples 16` (the default before: 16 draws a row, as antithetic pairs).
- `torch`: bench/systems/vae_torch.py, the same architecture, one draw per row, Adam at ppl's default
  weight step 0.01 / sqrt(1 + t/100), for the epochs ppl ran; `torch-sN`: N draws per row (`torch-s16`).
- `pyro`: bench/systems/vae_pyro.py (pyro.module, plate with the batch's subsample, Trace_ELBO, Adam
  at the same schedule), run by the peers' python, for the epochs ppl ran.
The held-out split is ppl's (bench/systems/vae_common.py), so every system scores the same 180 rows.
Prints the table and writes every run's numbers to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("ppl", "ppl-s1", "ppl-s1-lr", "ppl-s16", "torch", "torch-s16", "pyro")
PPL_VARIANTS = {"ppl": (), "ppl-s1": ("--mc-samples", "1"), "ppl-s1-lr": ("--mc-samples", "1", "--lr", "0.1"),
                "ppl-s16": ("--mc-samples", "16")}
DRAWS = {"ppl": 1, "ppl-s1": 1, "ppl-s1-lr": 1, "ppl-s16": 16}


def _run(cmd, env) -> tuple:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p, dt


# `ppl fit` as a user runs it (ppl.cli.main), with minibatch.optimise (the epochs) timed in wall and CPU
# seconds: on a loaded machine the CPU seconds are the steadier measure of a process's own work
PPL_MAIN = """
import sys, time
from ppl.infer import minibatch
from ppl.cli import main
_optimise = minibatch.optimise
def timed(*a, **k):
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        return _optimise(*a, **k)
    finally:
        sys.stderr.write("OPTIMISE %r %r\\n" % (time.perf_counter() - t0, time.process_time() - c0))
minibatch.optimise = timed
_epoch = minibatch.Epochs.epoch
def epoch(self):
    t0 = time.perf_counter()
    yield from _epoch(self)
    sys.stderr.write("EPOCH %r\\n" % (time.perf_counter() - t0))
minibatch.Epochs.epoch = epoch
sys.exit(main(sys.argv[1:]))
"""


def run_ppl(csv: str, epochs: int, seed: int, env, system: str = "ppl") -> dict:
    extra = PPL_VARIANTS[system]
    cmd = [sys.executable, "-c", PPL_MAIN, "fit", str(ROOT / "models" / "vae.ppl"), csv, "--batch-size", "128",
           "--epochs", str(epochs), "--holdout", "0.1", "--seed", str(seed), "--format", "json",
           "--progress", "off", "--profile", *extra]
    p, dt = _run(cmd, env)
    out = json.loads(p.stdout)
    prof = {m.group(1).strip(): float(m.group(2))
            for m in re.finditer(r"^\s+([a-z+ ]+?)\s+([0-9.]+)", p.stderr, re.M)}
    wall, cpu = [float(v) for v in re.search(r"^OPTIMISE (\S+) (\S+)$", p.stderr, re.M).groups()]
    epoch_seconds = [float(v) for v in re.findall(r"^EPOCH (\S+)$", p.stderr, re.M)]
    m = re.search(r"(\d+) steps, (\d+) epochs", out["method_note"])
    steps, ran = int(m.group(1)), int(m.group(2))
    return {"system": system, "seed": seed, "epochs": ran, "epochs_asked": epochs,
            "steps": steps, "train_seconds": wall, "s_per_epoch": wall / ran, "cpu_s_per_epoch": cpu / ran,
            "heldout_elbo_per_row": out["holdout"]["elbo_per_row"],
            "heldout_elbo_per_row_start": out["holdout"]["elbo_per_row_start"], "process_seconds": dt,
            "profile": prof, "converged": out["converged"], "method_note": out["method_note"],
            "epoch_seconds": epoch_seconds}


def run_script(python: str, script: str, csv: str, epochs: int, seed: int, env, extra=()) -> dict:
    cmd = [python, str(ROOT / "bench" / "systems" / script), csv, "--epochs", str(epochs), "--seed", str(seed),
           *extra]
    p, dt = _run(cmd, env)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["process_seconds"] = dt
    return r


def median_epoch(r) -> float:
    """The median of a run's per-epoch wall seconds (NaN where not recorded): steadier than the mean on
    a machine whose load comes in bursts."""
    e = r.get("epoch_seconds") or []
    return float(sorted(e)[len(e) // 2]) if e else float("nan")


def table(runs) -> str:
    """One row per run; the ratios are each ppl variant's seconds per epoch over this run's, of the same
    seed, in CPU seconds (wall seconds in brackets, the median epoch's wall seconds in square brackets);
    the ELBO column is (the first variant's - this) / |this| (positive: ppl's held-out ELBO is higher)."""
    by = {(r["system"], r["seed"]): r for r in runs}
    variants = [v for v in PPL_VARIANTS if any(r["system"] == v for r in runs)]
    lines = ["| system | seed | epochs | draws/row | s/epoch wall | s/epoch CPU | median epoch s | "
             "held-out ELBO/row | " + "".join(f"{v} ÷ this, CPU (wall) [median] | " for v in variants) + f"{variants[0]}'s ELBO vs this | "
             "whole process s |", "|" + "---|" * (10 + len(variants))]
    for r in runs:
        cells = []
        for name in variants:
            p = by.get((name, r["seed"]))
            cells.append(f"{p['cpu_s_per_epoch'] / r['cpu_s_per_epoch']:.2f}x "
                         f"({p['s_per_epoch'] / r['s_per_epoch']:.2f}x) "
                         f"[{median_epoch(p) / median_epoch(r):.2f}x]" if p and p is not r else "")
        p = by.get((variants[0], r["seed"]))
        rel = f"{100 * (p['heldout_elbo_per_row'] - r['heldout_elbo_per_row']) / abs(r['heldout_elbo_per_row']):+.2f}%" \
            if p and r is not p else ""
        draws = DRAWS.get(r["system"], r.get("mc_samples", ""))
        lines.append(f"| {r['system']} | {r['seed']} | {r['epochs']} | {draws} | {r['s_per_epoch']:.3f} | "
                     f"{r['cpu_s_per_epoch']:.3f} | {median_epoch(r):.3f} | {r['heldout_elbo_per_row']:.3f} | "
                     f"{' | '.join(cells)} | "
                     f"{rel} | {r['process_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="?")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--report", action="store_true", help="print the table of --out's runs and stop")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--peers-python", default=str(ROOT / "bench" / ".venv-peers" / "bin" / "python"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vae.json"))
    a = ap.parse_args()
    if a.report:
        print(table(json.loads(Path(a.out).read_text())))
        return
    if a.csv is None or a.epochs is None:
        ap.error("CSV and --epochs are needed (or --report)")
    systems = a.systems.split(",")
    bad = [s for s in systems if s not in SYSTEMS and not re.fullmatch(r"torch-s[1-9][0-9]*", s)]
    if bad:
        raise SystemExit(f"unknown systems {bad}; choose from {', '.join(SYSTEMS)} (or torch-sN: N draws a row)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    csv = str(Path(a.csv).resolve())
    runs = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        E = a.epochs
        first = next((s for s in systems if s in PPL_VARIANTS), None)
        if first is not None:
            r = run_ppl(csv, a.epochs, seed, env, first)
            E = r["epochs"]                    # the others run as many epochs as ppl did
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("profile", "epoch_seconds")}), flush=True)
        todo = []
        if "torch" in systems:
            todo.append((sys.executable, "vae_torch.py", ()))
        todo += [(v, None, ()) for v in PPL_VARIANTS if v in systems and v != first]
        if "pyro" in systems:
            todo.append((a.peers_python, "vae_pyro.py", ()))
        todo += [(sys.executable, "vae_torch.py", ("--mc-samples", v[len("torch-s"):])) for v in systems
                 if v.startswith("torch-s")]
        for python, script, extra in todo:
            if python in PPL_VARIANTS:
                r = run_ppl(csv, a.epochs, seed, env, python)
            else:
                r = run_script(python, script, csv, E, seed, env, extra)
                if extra:
                    r["system"] = f"torch-s{extra[1]}"
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("profile", "epoch_seconds")}), flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(runs, indent=1))
    print(table(runs))


if __name__ == "__main__":
    main()
