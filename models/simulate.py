"""Simulate the bundled example data (except eight schools, which is Rubin's real data).

Run from the repository root: python models/simulate.py   (fixed seeds; rewrites the CSVs)
"""
import csv
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def write(name, header, rows):
    with open(os.path.join(HERE, name), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([f"{x:.6g}" if isinstance(x, float) else x for x in r])


def radon(rng):
    # 12 counties named by strings, uneven sizes
    names = ["Aitkin", "Anoka", "Becker", "Beltrami", "Benton", "Blue Earth", "Brown", "Carlton", "Carver",
             "Cass", "Chippewa", "Chisago"]
    mu_a, sigma_a, b, sigma_y = 1.4, 0.35, -0.65, 0.75
    a = rng.normal(mu_a, sigma_a, len(names))
    rows = []
    for k, name in enumerate(names):
        for _ in range(rng.integers(3, 15)):
            floor = float(rng.random() < 0.3)
            rows.append([rng.normal(a[k] + b * floor, sigma_y), floor, name])
    rng.shuffle(rows)
    write("radon.csv", ["log_radon", "floor", "county"], rows)


def logistic(rng):
    n, d = 200, 3
    x = rng.normal(size=(n, d))
    beta = np.array([1.0, -0.5, 0.25])
    p = 1 / (1 + np.exp(-(0.3 + x @ beta)))
    y = (rng.random(n) < p).astype(int)
    write("logistic.csv", ["y", "x1", "x2", "x3"], [[int(y[i])] + [float(v) for v in x[i]] for i in range(n)])


def mixture(rng):
    n = 150
    z = rng.random(n) < 0.35
    y = np.where(z, rng.normal(-2.0, 0.7, n), rng.normal(2.5, 1.0, n))
    write("mixture.csv", ["y"], [[float(v)] for v in y])


def poisson(rng):
    n = 60
    age = np.round(rng.uniform(-2, 2, n), 3)
    exposure = np.round(rng.uniform(50, 500, n), 1)
    deaths = rng.poisson(exposure * np.exp(-4.0 + 0.4 * age))
    write("poisson.csv", ["deaths", "exposure", "age"],
          [[int(deaths[i]), float(exposure[i]), float(age[i])] for i in range(n)])


def ppca(rng):
    # probabilistic PCA (Tipping & Bishop 1999): y_n = z_n W + m + s eps, z_n ~ N(0, I_2), 5 columns
    n, k, d = 500, 2, 5
    W = np.array([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 1.5, -1.0, 0.5, 1.0]])
    m = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    y = rng.normal(size=(n, k)) @ W + m + 0.5 * rng.normal(size=(n, d))
    write("ppca.csv", [f"y{j + 1}" for j in range(d)], [[float(v) for v in row] for row in y])


if __name__ == "__main__":
    rng = np.random.default_rng(20261122)
    radon(rng)
    logistic(rng)
    mixture(rng)
    poisson(rng)
    ppca(rng)
