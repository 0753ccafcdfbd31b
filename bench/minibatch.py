"""Minibatch logistic regression at 10^6 and 10^7 rows (issue 10 items 1 and 6, issue 11 item 3):
ppl's `--batch-size` fit against its full-batch fit, NumPyro's and Pyro's subsampled SVI; wall time,
accuracy against the Laplace posterior, peak memory.

    python bench/minibatch.py [--rows 1000000,10000000] [--dir /tmp/ppl-minibatch] [--batch-size 1024]
        [--systems ppl,ppl-e2,ppl-full,numpyro,pyro] [--peers-python bench/.venv-peers/bin/python]
        [--peer-runs 0.01:constant,0.001:constant,0.01:exp,0.01:sqrt] [--max-seconds 600] [--write-only]

Data: `write_csv` makes DIR/logistic_N.csv (x1..x10, y; seeded; never committed; 10^7 rows is 0.87 GB).
Reference: the Laplace posterior N(mode, H^-1) by Newton's method on the full data in numpy (at
N = 10^6 the posterior's skew is O(N^-1/2): the Laplace answer is the exact one to well under 0.1 sd),
cached in DIR/ref_N.json.  ppl's full-batch fit (`--method fullrank`, defaults) is run at 10^6 and
compared with it as well.

Each system runs as its own process, one after the other, one thread each (OMP_NUM_THREADS=1, and
XLA's single-threaded Eigen for NumPyro); peak RSS from getrusage of the waited-for child.  ppl runs `ppl fit` to its own
convergence (its time is the whole fit: data, start, optimisation, the final pass); the peers run
bench/subsample_svi.py, once per `--peer-runs` entry (Adam's step size and its schedule: constant,
exp or sqrt), which stops at the first checkpoint (every 100 steps) where every mean is within 0.1
reference sd (their time: the fit from its set-up to that checkpoint, data loading excluded; also
without the set-up, NumPyro's JIT).  Each peer's best run (the earliest to 0.1 sd) is its time.  "to 0.1 sd" is ppl's fit (compile, start, optimisation, final pass: --profile's phases
after the data are read) against the peers' fit from its set-up to the checkpoint; "seconds" is each
whole process (imports and data loading included).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
D_COLS = 10


def write_csv(path: Path, N: int, D: int = D_COLS, seed: int = 1) -> None:
    """x1..xD standard normal (5 decimals), y ~ bernoulli(logistic(0.3 + X beta)), beta ~ 0.5 N(0, 1)."""
    rng = np.random.default_rng(seed)
    beta = 0.5 * rng.normal(size=D)
    tmp = path.with_suffix(".part")
    with open(tmp, "w") as f:
        f.write(",".join([f"x{i + 1}" for i in range(D)] + ["y"]) + "\n")
        for i in range(0, N, 100_000):
            n = min(100_000, N - i)
            X = rng.normal(size=(n, D))
            y = (rng.random(n) < 1 / (1 + np.exp(-(0.3 + X @ beta)))).astype(int)
            np.savetxt(f, np.column_stack([X, y]), delimiter=",", fmt=["%.5f"] * D + ["%d"])
    tmp.rename(path)


def laplace_reference(csv: Path, out: Path) -> dict:
    """Mode and covariance (inverse negative Hessian) of models/logistic.ppl's posterior, by Newton."""
    if out.exists():
        return json.loads(out.read_text())
    sys.path.insert(0, str(ROOT))
    import ppl
    vals = ppl.load(str(ROOT / "models" / "logistic.ppl")).check(str(csv)).values
    X, y = np.asarray(vals["X"]), np.asarray(vals["y"])
    N, D = X.shape
    prior_prec = 1 / 2.5 ** 2
    w = np.zeros(D + 1)
    for _ in range(50):
        g = -prior_prec * w
        H = prior_prec * np.eye(D + 1)
        for i in range(0, N, 1_000_000):
            Xi = np.column_stack([np.ones(min(N, i + 1_000_000) - i), X[i:i + 1_000_000]])
            eta = Xi @ w
            p = 1 / (1 + np.exp(-eta))
            g += Xi.T @ (y[i:i + 1_000_000] - p)
            H += (Xi * (p * (1 - p))[:, None]).T @ Xi
        step = np.linalg.solve(H, g)
        w += step
        if np.abs(step).max() < 1e-12:
            break
    cov = np.linalg.inv(H)
    sd = np.sqrt(np.diag(cov))
    names = ["alpha"] + [f"beta[{i + 1}]" for i in range(D)]
    ref = {"N": int(N), "method": "Laplace (Newton on the full data)",
           "params": {k: {"mean": float(w[i]), "sd": float(sd[i])} for i, k in enumerate(names)}}
    out.write_text(json.dumps(ref, indent=1))
    return ref


def run(cmd, env_extra=None, timeout=None) -> dict:
    """One process: its stdout, stderr, wall seconds and return code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
           **(env_extra or {})}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return {"out": out, "err": err, "seconds": time.perf_counter() - t0, "rc": p.returncode,
            "peak_mb": float("nan")}


def run_measured(cmd, timeout=None) -> dict:
    """As `run`, with the child's own peak RSS and wall time, measured by a small parent process
    (getrusage(RUSAGE_CHILDREN) after it has waited for the child)."""
    wrapper = [sys.executable, "-c",
               "import os, resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], stdout=sys.stdout, stderr=sys.stderr); "
               "sys.stderr.write('\\nPEAK_KB %d WALL %.3f\\n' % (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
               "time.perf_counter() - t)); sys.exit(p.returncode)"] + cmd
    r = run(wrapper, timeout=timeout)
    for line in r["err"].splitlines():
        if line.startswith("PEAK_KB"):
            parts = line.split()
            r["peak_mb"], r["seconds"] = int(parts[1]) / 1024, float(parts[3])
    return r


def errors(params: dict, ref: dict):
    names = list(ref["params"])
    dm = max(abs(params[k]["mean"] - ref["params"][k]["mean"]) / ref["params"][k]["sd"] for k in names)
    ds = max(abs(params[k]["sd"] / ref["params"][k]["sd"] - 1) for k in names)
    return dm, ds


def ppl_fit(csv: Path, extra, timeout) -> dict:
    cmd = [sys.executable, "-m", "ppl", "fit", str(ROOT / "models" / "logistic.ppl"), str(csv),
           "--format", "json", "--progress", "off", "--seed", "1", "--profile"] + extra
    r = run_measured(cmd, timeout)
    if r["rc"] != 0:
        return {"error": r["err"][-2000:], **{k: r[k] for k in ("seconds", "peak_mb")}}
    o = json.loads(r["out"])
    phases = {}
    for line in r["err"].splitlines():          # --profile: "  phase   seconds"
        parts = line.split()
        if len(parts) >= 2 and line.startswith("  ") and parts[0] != "total":
            try:
                phases[" ".join(parts[:-1])] = float(parts[-1])
            except ValueError:
                pass
    fit_s = sum(phases.get(k, 0.0) for k in ("compile", "init", "optimise", "draws", "khat"))
    params = {}
    for k, v in o["params"].items():
        if isinstance(v, dict) and "mean" in v:
            params[k] = v
        elif isinstance(v, list):
            params.update({f"{k}[{i + 1}]": e for i, e in enumerate(v)})
    return {"seconds": r["seconds"], "fit_seconds": fit_s, "phases": phases, "peak_mb": r["peak_mb"],
            "params": params, "elbo": o.get("elbo"),
            "steps": o.get("steps"), "method_note": o.get("method_note", o.get("method"))}


def peer_fit(system: str, csv: Path, ref_path: Path, a, lr: float, schedule: str = "constant",
             decay_steps: str = "1000") -> dict:
    cmd = [a.peers_python, str(ROOT / "bench" / "subsample_svi.py"), system, str(csv), str(ref_path),
           "--batch-size", str(a.batch_size), "--lr", str(lr), "--schedule", schedule,
           "--decay-steps", decay_steps, "--max-seconds", str(a.max_seconds)]
    r = run_measured(cmd, timeout=a.max_seconds * 3 + 600)
    if r["rc"] != 0:
        return {"error": r["err"][-2000:], "seconds": r["seconds"], "peak_mb": r["peak_mb"]}
    o = json.loads(r["out"].strip().splitlines()[-1])
    o.update({"process_seconds": r["seconds"], "peak_mb": r["peak_mb"]})
    return o


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1000000,10000000")
    ap.add_argument("--dir", default="/tmp/ppl-minibatch")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--systems", default="ppl,ppl-e2,numpyro,pyro")
    ap.add_argument("--peer-runs", default="0.01:constant,0.001:constant,0.01:exp,0.01:sqrt",
                    help="the peers' Adam step sizes and schedules tried, LR:SCHEDULE[:DECAY_STEPS],...")
    ap.add_argument("--peers-python", default=str(ROOT / "bench" / ".venv-peers" / "bin" / "python"))
    ap.add_argument("--max-seconds", type=float, default=600.0)
    ap.add_argument("--ppl-extra", default="", help="more `ppl fit` options for the `ppl` run, e.g. '--epochs 1'")
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--out", default=None, help="JSON results (default DIR/results.json)")
    a = ap.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    systems = a.systems.split(",")
    results = {}
    for N in [int(x) for x in a.rows.split(",")]:
        csv = d / f"logistic_{N}.csv"
        if not csv.exists():
            write_csv(csv, N)
        if a.write_only:
            continue
        ref_path = d / f"ref_{N}.json"
        ref = laplace_reference(csv, ref_path)
        data_mb = N * (D_COLS + 1) * 8 / 2 ** 20
        res = results[N] = {"data_mb_float64": data_mb, "csv_mb": csv.stat().st_size / 2 ** 20, "runs": {}}
        for s in systems:
            if s == "ppl":
                r = ppl_fit(csv, ["--batch-size", str(a.batch_size)] + a.ppl_extra.split(), a.max_seconds * 3)
                s = f"ppl {a.ppl_extra}".strip()
            elif s == "ppl-e2":                         # two epochs (the default runs to its own test)
                if N > 1_000_000:
                    continue
                r = ppl_fit(csv, ["--batch-size", str(a.batch_size), "--epochs", "2"], a.max_seconds * 3)
            elif s == "ppl-full":
                if N > 1_000_000:
                    continue
                r = ppl_fit(csv, ["--method", "fullrank"], a.max_seconds * 3)
            else:
                for spec in a.peer_runs.split(","):
                    lr, schedule, *decay = spec.split(":")
                    r = peer_fit(s, csv, ref_path, a, float(lr), schedule, *decay)
                    r["lr"], r["schedule"] = float(lr), schedule + (f"/{decay[0]}" if decay else "")
                    res["runs"][f"{s} {r['schedule']} lr={lr}"] = r
                    print(N, s, spec, {k: r.get(k) for k in ("hit", "fit_seconds", "peak_mb", "error")}, flush=True)
                continue
            if "params" in r:
                r["mean_err"], r["sd_err"] = errors(r["params"], ref)
            res["runs"][s] = r
            print(N, s, {k: r.get(k) for k in ("seconds", "peak_mb", "mean_err", "sd_err", "steps", "error")},
                  flush=True)
        (Path(a.out) if a.out else d / "results.json").write_text(json.dumps(results, indent=1))
    if results:
        report(results)


def report(results: dict) -> None:
    for N, res in results.items():
        print(f"\nN = {int(N):,}, D = {D_COLS}: data {res['data_mb_float64']:.0f} MB as float64, "
              f"CSV {res['csv_mb']:.0f} MB")
        print(f"{'run':<26}{'seconds':>10}{'to 0.1 sd':>11}{'mean err':>10}{'sd err':>8}{'peak MB':>9}")
        for name, r in res["runs"].items():
            if "error" in r:
                print(f"{name:<26} failed: {r['error'][-200:]!r}")
                continue
            if "hit" in r:
                h = r["hit"]
                to = f"{h['seconds']:.1f}" if h else "never"
                me, se = (h["mean_err"], h["sd_err"]) if h else (r["trace"][-1][2], r["trace"][-1][3])
                print(f"{name:<26}{r['process_seconds']:>10.1f}{to:>11}{me:>10.3f}{se:>8.3f}{r['peak_mb']:>9.0f}")
            else:
                to = f"{r['fit_seconds']:.1f}" if r.get("fit_seconds") and r["mean_err"] <= 0.1 else ""
                print(f"{name:<26}{r['seconds']:>10.1f}{to:>11}{r['mean_err']:>10.3f}{r['sd_err']:>8.3f}"
                      f"{r['peak_mb']:>9.0f}")
        ratios(res["runs"])


def ratios(runs: dict) -> None:
    """ppl's fit seconds (when accurate) over each peer's best time to 0.1 sd (with and without its
    set-up); a bound (<) when no run of that peer got there within its cap."""
    mine = [(n, r) for n, r in runs.items() if n.startswith("ppl") and r.get("fit_seconds")
            and r.get("mean_err", 1e9) <= 0.1]
    for n, r in mine:
        for peer in ("numpyro", "pyro"):
            tried = [x for k, x in runs.items() if k.startswith(peer + " ") and "error" not in x]
            if not tried:
                continue
            hits = [x for x in tried if x.get("hit")]
            if hits:
                best = min(hits, key=lambda x: x["hit"]["seconds"])
                t, t_steps, how = best["hit"]["seconds"], best["hit"]["seconds"] - best["init_seconds"], "="
                label = f"{best['schedule']} lr={best['lr']:g}"
            else:
                t = max(x["fit_seconds"] for x in tried)
                t_steps, how, label = t - max(x["init_seconds"] for x in tried), "<", "never within its cap"
            print(f"{n} / {peer} ({label}): {how} {r['fit_seconds'] / t:.3f} "
                  f"({how} {r['fit_seconds'] / t_steps:.3f} against its steps alone)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        report(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
