#!/usr/bin/env python3
"""Every family on every reference posterior: `ppl fit --method M` at its defaults on the six
posteriordb posteriors of ../shared/reference and the bundled models/ (plus the banana of
bench/flows.py), against NUTS (or exact) references: k-hat, ESS, the worst mean error (in
reference sds) and sd error (relative), how many parameters are within 0.25 sd and 30%, and the
time.

    python bench/families.py                        # meanfield,fullrank,flow,mixture,auto
    python bench/families.py --methods flow --models banana,eight_schools_centered
    python bench/families.py --report               # the table from bench/results/families.json

References: ../shared/reference/*/reference.json (NUTS, posteriordb); models/eight_schools and
eight_schools_centered: the posteriordb eight schools reference (Rubin's data; mu, tau and theta
are the same posterior in both parameterisations); models/radon, logistic, poisson, mixture:
NumPyro NUTS, bench/references/models_NAME.json (committed; `bench/.venv-peers/bin/python
bench/systems/nuts_models.py` remakes them); the banana's marginals are exact.  Each fit is one
`ppl` process (seed 1), timed whole; the methods of a model run one after the other, so that
machine load falls on them alike.  Run this with a python that has ppl's dependencies (the
project's .venv), or set PPL to a `ppl` executable.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "reference")
RESULTS = os.path.join(BENCH, "results", "families.json")
METHODS = ("meanfield", "fullrank", "flow", "mixture", "auto")
sys.path.insert(0, BENCH)
from flows import BANANA, ppl_command  # noqa: E402


def models():
    """name -> (ppl files, {param: {mean, sd}} or None when the reference is missing)."""
    out = {}
    if os.path.isdir(SHARED):
        for n in sorted(os.listdir(SHARED)):
            d = os.path.join(SHARED, n)
            if os.path.isdir(d):
                out[n] = ([os.path.join(d, f) for f in ("model.ppl", "data.csv", "scalars.json")],
                          _load(os.path.join(d, "reference.json")))
    eight = _load(os.path.join(SHARED, "eight_schools-eight_schools_noncentered", "reference.json"))
    for n in ("eight_schools", "eight_schools_centered", "radon", "logistic", "poisson", "mixture"):
        files = [os.path.join(ROOT, "models", n + ext) for ext in (".ppl", ".csv")]
        ref = eight if n.startswith("eight") else _load(os.path.join(BENCH, "references", f"models_{n}.json"))
        out[f"models/{n}"] = (files, ref)
    d = os.path.join(BENCH, "data", "banana")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "model.ppl"), "w") as f:
        f.write(BANANA)
    out["banana"] = ([os.path.join(d, "model.ppl")], {"x1": {"mean": 0.0, "sd": 2.0}, "x2": {"mean": 0.0, "sd": 3.0}})
    return out


def _load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {k: {"mean": v["mean"], "sd": v["sd"]} for k, v in json.load(f)["params"].items()}


def fit(files, method):
    exe, env = ppl_command()
    argv = exe + ["fit"] + files + ["--method", method, "--seed", "1", "--format", "json", "--draws", "4000"]
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][-300:], "process_seconds": round(wall, 2)}
    out = json.loads(r.stdout)
    keep = ("elbo", "khat", "ess", "verdict", "verdict_text", "method", "method_note", "seconds", "steps",
            "optimizer", "init")
    return dict({k: out.get(k) for k in keep}, process_seconds=round(wall, 2),
                params={k: {"mean": v["mean"], "sd": v["sd"]} for k, v in out["params"].items()})


def score(params, ref):
    """(worst |mean error| in sds, worst |sd ratio - 1|, parameters within 0.25 sd and 30%, count)."""
    wm = ws = 0.0
    ok = 0
    for k, r in ref.items():
        p = params.get(k)
        if p is None or p["mean"] is None or p["sd"] is None:
            wm = ws = float("inf")
            continue
        m, s = abs(p["mean"] - r["mean"]) / r["sd"], abs(p["sd"] / r["sd"] - 1)
        wm, ws = max(wm, m), max(ws, s)
        ok += m <= 0.25 and s <= 0.30
    return wm, ws, ok, len(ref)


def table(results, refs):
    lines = ["| model | method | k-hat | ESS | worst mean err (sd) | worst sd err | within 0.25 sd / 30% | "
             "verdict | fit s | process s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(results, key=lambda k: (k.split("|")[0], METHODS.index(k.split("|")[1])
                                              if k.split("|")[1] in METHODS else 99)):
        name, method = key.split("|")
        r = results[key]
        if "error" in r:
            lines.append(f"| {name} | {method} | error: {r['error'][:90]} | | | | | | | {r['process_seconds']} |")
            continue
        ref = refs.get(name)
        wm, ws, ok, n = score(r["params"], ref) if ref else (float("nan"),) * 2 + (0, 0)
        label = r["method"] if method == "auto" else method
        lines.append(f"| {name} | {label if method != 'auto' else 'auto: ' + label} | {r['khat']:.2f} | "
                     f"{100 * r['ess']:.0f}% | {wm:.2f} | {100 * ws:.0f}% | {ok}/{n} | {r['verdict']} | "
                     f"{r['seconds']:.2f} | {r['process_seconds']:.1f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(prog="families.py")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--models", default="", help="comma-separated names (default: all)")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    ms = models()
    results = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            results = json.load(f)
    if not a.report:
        names = [n for n in ms if not a.models or n in a.models.split(",") or n.split("/")[-1] in a.models.split(",")]
        for name in names:
            files, _ = ms[name]
            for method in a.methods.split(","):
                t = time.perf_counter()
                results[f"{name}|{method}"] = fit(files, method)
                print(f"{name:42s} {method:9s} {time.perf_counter() - t:6.1f} s", flush=True)
                os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
                with open(RESULTS + ".tmp", "w") as f:
                    json.dump(results, f, indent=1)
                shutil.move(RESULTS + ".tmp", RESULTS)
    print(table(results, {n: r for n, (_, r) in ms.items()}))


if __name__ == "__main__":
    main()
