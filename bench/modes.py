"""Ill-conditioned flat-prior regressions (tests/ill_conditioned.py): `ppl fit` at its defaults, as a
user runs it, against the exact posterior.

    python3 bench/modes.py [--ppl "CMD"]... [--seeds 1,2] [--only years,earnings] [--extra "--method fullrank"]

`--ppl` is the command that runs ppl (default: `.venv/bin/ppl` of this checkout, else `ppl`); it may be
several words (`"env PYTHONPATH=/path python -m ppl"`), and `LABEL=CMD` names it; given several times,
the versions run interleaved (case by case, seed by seed), so they see the same machine load.  Each
case is written to bench/data/modes/NAME/ (model.ppl, data.csv) and fitted once per seed with one
thread (OMP_NUM_THREADS=1).  Prints one row per parameter: the mean's error in exact posterior sds,
the sd ratio, the fit's own seconds and the whole process's, the fit's start note; and a last line
per version: how many parameters are within 0.1 sd and 15%.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import ill_conditioned  # noqa: E402

MEAN_TOL, SD_TOL = 0.1, 0.15


def write_case(case, root):
    d = os.path.join(root, case.name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "model.ppl"), "w") as f:
        f.write(case.src)
    cols = list(case.data)
    with open(os.path.join(d, "data.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(zip(*(case.data[c] for c in cols)))
    return d


def main():
    ap = argparse.ArgumentParser()
    default = os.path.join(ROOT, ".venv", "bin", "ppl")
    ap.add_argument("--ppl", action="append")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--only", default="")
    ap.add_argument("--extra", default="")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    ppls = [p.split("=", 1) if "=" in p.split()[0] else (p, p) for p in (a.ppl or [default if os.path.exists(default) else "ppl"])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows, good, total = [], {}, {}
    print(f"{'version':<8} {'model':<20} {'param':<7} {'err/sd':>7} {'sd ratio':>8} {'fit s':>6} {'proc s':>7}  start")
    for case in ill_conditioned.cases():
        if only and case.name not in only:
            continue
        d = write_case(case, os.path.join(BENCH, "data", "modes"))
        for seed in a.seeds.split(","):
            for label, ppl in ppls:
                cmd = shlex.split(ppl) + ["fit", os.path.join(d, "model.ppl"), os.path.join(d, "data.csv"),
                                          "--format", "json", "--seed", seed] + shlex.split(a.extra)
                t0 = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                secs = time.perf_counter() - t0
                total[label] = total.get(label, 0) + len(case.exact)
                if p.returncode != 0:
                    print(f"{label:<8} {case.name:<20} exit {p.returncode}: {p.stderr.strip()[-300:]}")
                    continue
                got = json.loads(p.stdout)
                for k, (m, s) in case.exact.items():
                    g = got["params"][k]
                    err, ratio = (g["mean"] - m) / s, g["sd"] / s
                    ok = abs(err) <= MEAN_TOL and abs(ratio - 1) <= SD_TOL
                    good[label] = good.get(label, 0) + ok
                    rows.append(dict(version=label, model=case.name, seed=seed, param=k, err=err, ratio=ratio,
                                     seconds=secs, fit_seconds=got.get("seconds"), init=got.get("init"),
                                     fixed_draws=got.get("fixed_draws"), khat=got.get("khat"),
                                     summary=got.get("summary")))
                    print(f"{label:<8} {case.name:<20} {k:<7} {err:>7.2f} {ratio:>8.2f} {got.get('seconds', 0):>6.2f} "
                          f"{secs:>7.2f}  {got.get('init')}; {got.get('fixed_draws')} fixed draws, "
                          f"{got.get('evaluations')} evals, k-hat {got.get('khat')}{'' if ok else '  <-'}")
    for label, _ in ppls:
        print(f"{label}: {good.get(label, 0)}/{total.get(label, 0)} parameters within {MEAN_TOL} sd and "
              f"{100 * SD_TOL:.0f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
