"""ppl/plots.py: every plot kind on every bundled model's fit is a PNG of a sane size with something
drawn on it (the plot extra is in the test extra, so this runs in CI)."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from conftest import need

from ppl.cli import main
from ppl.plots import KINDS

need("matplotlib")

MODELS = ("eight_schools", "radon", "logistic", "mixture", "poisson")


def _png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", MODELS)
def test_every_kind_on_every_model(saved_fit, tmp_path, name, capsys):
    import matplotlib.image as mpimg
    d = saved_fit(name)
    for kind in KINDS:
        out = tmp_path / f"{name}-{kind}.png"
        assert main(["plot", str(d), "--kind", kind, "-o", str(out)]) == 0, (kind, capsys.readouterr().err)
        data = out.read_bytes()
        w, h = _png_size(data)
        assert 300 <= w <= 3000 and 200 <= h <= 4000, (kind, w, h)
        img = mpimg.imread(str(out))[..., :3]
        ink = np.mean(np.any(img < 0.9, axis=-1))          # share of pixels that are not (near) white
        assert 0.01 < ink < 0.6, (kind, ink)
        assert np.std(img) > 0.02


def test_plot_usage_errors(saved_fit, tmp_path, capsys):
    d = saved_fit("eight_schools")
    capsys.readouterr()
    assert main(["plot", str(d), "--kind", "violin"]) == 2
    assert "valid: trace, marginals, forest, ppc, pair" in capsys.readouterr().err
    assert main(["plot", str(d), "-o", str(tmp_path / "x.jpg")]) == 2
    assert main(["plot", str(d), "--vars", "nope", "-o", str(tmp_path / "x.png")]) == 2


def test_default_output_name_beside_the_fit(saved_fit, capsys):
    d = saved_fit("poisson")
    capsys.readouterr()
    assert main(["plot", str(d), "--kind", "forest"]) == 0
    assert capsys.readouterr().out.strip() == str(d) + "-forest.png"
