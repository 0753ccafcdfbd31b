"""The categorical VAE of models/vae_cat.ppl (a code c in 1..K per row, relaxed under minibatches):
ppl's ELBO per row against the exact log p(x) per row, on the training rows and on held-out rows.

    python bench/vae_cat.py [models/vae_cat.csv] [--epochs E] [--seeds 0,1] [--holdout 0.1]
        [--estimator relaxed|auto] [--out bench/results/vae_cat.json]

With a categorical code and K small, p(x_n) = (1/K) sum_k p(x_n | c = k) is a finite sum, so for the
fitted decoder the log-likelihood log p(x_n) = logsumexp_k(...) is exact, and so is each row's ELBO
under the fitted q(c_n | x_n) = softmax(encoder(x_n)): sum_k q_nk (log p(x_n | k) + log(1/K) - log q_nk).
Their difference is KL(q(c_n | x_n) || p(c_n | x_n)) >= 0: how far the encoder's q is from the exact
posterior of the code.  Held-out rows (a seeded share, never seen by the fit) are scored by the
fitted encoder and decoder.  Also reported: ppl's own ELBO of the training rows (the final pass: exact
draws of q, Monte Carlo), per row, and the fit's wall time.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ppl  # noqa: E402


def read(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    head, body = rows[0], rows[1:]
    return head, body


def write(path, head, body):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        w.writerows(body)


def exact_scores(fit, X: np.ndarray):
    """-> (ELBO per row under the fitted q, exact log p(x) per row), each a mean over the rows of X."""
    K = int(fit.model.dims["K"]) if "K" in fit.model.dims else int(fit.model.values["K"])
    p = {k: torch.as_tensor(np.asarray(v), dtype=torch.float64) for k, v in fit.params.items()}
    logits = torch.relu(p["W1"] + p["b1"]) @ p["W2"] + p["b2"]                     # (K, P): one per code
    x = torch.as_tensor(X, dtype=torch.float64)
    lpx_k = (x[:, None, :] * torch.nn.functional.logsigmoid(logits) +
             (1 - x[:, None, :]) * torch.nn.functional.logsigmoid(-logits)).sum(-1) - np.log(K)   # (n, K)
    log_px = torch.logsumexp(lpx_k, -1)
    enc = fit.q.family.encoders["c"]
    with torch.no_grad():
        lq = torch.log_softmax(enc({"x": x.unsqueeze(0)}), -1)
    q = lq.exp()
    elbo = (q * (lpx_k - lq)).sum(-1)
    return float(elbo.mean()), float(log_px.mean()), float(q.max(-1).values.mean())


def run(csv_path, epochs, seed, holdout, estimator):
    head, body = read(csv_path)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(body))
    n_held = int(round(holdout * len(body)))
    held, train = [body[i] for i in perm[:n_held]], [body[i] for i in sorted(perm[n_held:])]
    cols = [i for i, h in enumerate(head) if h.startswith("px")]
    with tempfile.TemporaryDirectory() as d:
        tr = os.path.join(d, "train.csv")
        write(tr, head, train)
        model = ppl.load(str(ROOT / "models" / "vae_cat.ppl"))
        t0 = time.perf_counter()
        fit = model.fit(tr, batch_size=128, epochs=epochs, estimator=estimator, seed=seed, draws=100)
        seconds = time.perf_counter() - t0
    Xtr = np.asarray([[float(r[i]) for i in cols] for r in train])
    Xho = np.asarray([[float(r[i]) for i in cols] for r in held])
    e_tr, l_tr, conf_tr = exact_scores(fit, Xtr)
    e_ho, l_ho, conf_ho = exact_scores(fit, Xho)
    return {"seed": seed, "epochs": epochs, "steps": fit.steps, "seconds": seconds, "rows": len(train),
            "held_rows": len(held), "ppl_elbo_per_row": fit.elbo / len(train),
            "train_elbo_per_row": e_tr, "train_log_px_per_row": l_tr,
            "heldout_elbo_per_row": e_ho, "heldout_log_px_per_row": l_ho,
            "heldout_q_max_mean": conf_ho, "estimator": fit.estimator}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="?", default=str(ROOT / "models" / "vae_cat.csv"))
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--estimator", default="relaxed")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = []
    print(f"{'seed':>4} {'epochs':>6} {'steps':>6} {'time s':>7} {'ppl ELBO/row':>12} | {'train ELBO':>10} "
          f"{'log p(x)':>9} | {'held ELBO':>10} {'log p(x)':>9}")
    for s in (int(v) for v in a.seeds.split(",")):
        r = run(a.csv, a.epochs, s, a.holdout, a.estimator)
        out.append(r)
        print(f"{s:>4} {r['epochs']:>6} {r['steps']:>6} {r['seconds']:>7.1f} {r['ppl_elbo_per_row']:>12.3f} | "
              f"{r['train_elbo_per_row']:>10.3f} {r['train_log_px_per_row']:>9.3f} | "
              f"{r['heldout_elbo_per_row']:>10.3f} {r['heldout_log_px_per_row']:>9.3f}", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
