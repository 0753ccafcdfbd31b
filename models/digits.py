"""Write the 8x8 handwritten digits that ship inside scikit-learn (`load_digits`: 1,797 images, no
download) as a CSV for models/vae.ppl: one row per image, columns px1..px64 (row-major pixels,
binarised as value > 7, i.e. 1 where the 0..16 grey level is above half) and `digit` (the label,
which the VAE does not read).  scikit-learn is a test/example extra (`pip install -e '.[test]'`),
never a dependency of ppl itself.

    python models/digits.py [OUT.csv]      (default: models/vae.csv, which ships with the repository)
"""
import csv
import os
import sys


def rows():
    from sklearn.datasets import load_digits
    d = load_digits()
    for image, label in zip(d.data, d.target):
        yield [int(v > 7) for v in image] + [int(label)]


def write(path: str) -> int:
    n = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"px{j + 1}" for j in range(64)] + ["digit"])
        for r in rows():
            w.writerow(r)
            n += 1
    return n


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "vae.csv")
    print(f"{out}: {write(out)} images")
