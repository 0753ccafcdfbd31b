"""Fused log densities (DistSpec.lpdf, ppl.backend.dists) equal torch.distributions' log_prob
(DistSpec.build) for every registry entry that has one, with each parameter given as a tensor
(batched over samples) or as a Python float (how constant scalars reach the fused functions)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from ppl import distributions as DS
from ppl.backend import dists as D

DT = torch.float64
FUSED = sorted(name for name, spec in DS.REGISTRY.items() if spec.lpdf is not None)

# a value in each parameter constraint / support
PARAM_VALUES = {"real": [-0.7, 1.3], "positive": [0.4, 2.5], "unit_interval": [0.3, 0.8], "unit": [0.3, 0.6],
                "nonneg_int": [7.0, 12.0]}


def _support_values(support, gen, shape):
    u = torch.rand(shape, generator=gen, dtype=DT)
    if support == "real":
        return 6 * u - 3
    if support == "positive":
        return 0.05 + 4 * u
    if support == "boolean":
        return (u < 0.5).to(DT)
    if support in ("nonneg_int", "binomial"):      # (binomial: at most 7 successes, the fewest trials used)
        return torch.floor(8 * u)
    raise AssertionError(support)


@pytest.mark.parametrize("name", FUSED)
def test_fused_lpdf_equals_torch(name):
    spec = DS.REGISTRY[name]
    lpdf = spec.lpdf(D)
    gen = torch.Generator().manual_seed(0)
    S, N = 3, 5
    x = _support_values(spec.support, gen, (S, N))
    kinds = [k for _, k in spec.params]
    checked = 0
    for as_float in itertools.product([False, True], repeat=spec.arity):
        for pick in range(2):
            args, targs = [], []
            for kind, fl in zip(kinds, as_float):
                v = PARAM_VALUES[kind][pick]
                if fl:
                    args.append(float(v))
                    targs.append(torch.tensor(v, dtype=DT))
                else:   # varies over samples and elements
                    t = torch.full((S, 1), v, dtype=DT) * (1 + 0.1 * torch.arange(N, dtype=DT))
                    args.append(t)
                    targs.append(t)
            got = lpdf(x, *args)
            want = spec.build(D, *targs).log_prob(x)
            assert got.shape == torch.broadcast_shapes(x.shape, *[t.shape for t in targs])
            torch.testing.assert_close(got, want.expand(got.shape), rtol=1e-10, atol=1e-10)
            checked += 1
    assert checked == 2 ** (spec.arity + 1)


def test_binomial_beyond_its_trials_is_minus_inf_never_nan():
    k = torch.tensor([[0.0, 3.0, 5.0, 6.0]], dtype=DT)
    for lp in (D.binomial_lpmf(k, 5.0, 0.3), D.binomial_lpmf(k, torch.tensor([[5.0]], dtype=DT), 1.0),
               D.binomial_logit_lpmf(k, 5.0, torch.tensor(0.4, dtype=DT))):
        assert not torch.isnan(lp).any() and lp[0, 3] == -math.inf
    torch.testing.assert_close(D.binomial_lpmf(k, 5.0, 1.0)[0, :3], torch.tensor([-math.inf, -math.inf, 0.0],
                                                                                    dtype=DT))


def test_every_fused_density_is_covered():
    assert {"normal", "half_normal", "cauchy", "half_cauchy", "student_t", "lognormal", "gamma"} <= set(FUSED)


SUMMED = sorted(name for name, spec in DS.REGISTRY.items() if spec.lpdf_sum is not None)


@pytest.mark.parametrize("name", SUMMED)
@pytest.mark.parametrize("scale", ["float", "per_sample", "per_element"])
def test_summed_lpdf_equals_summed_torch_with_gradients(name, scale):
    """DistSpec.lpdf_sum: the per-sample sum of torch's log_prob, and the same gradients.  The first
    parameter varies in shape with the value; the others are floats, one per sample, or per element."""
    spec = DS.REGISTRY[name]
    kinds = [k for _, k in spec.params]
    gen = torch.Generator().manual_seed(1)
    S, N = 4, 7
    for x_shape, p_shape in (((1, N), (S, N)), ((S, N), (1, 1)), ((S,), (S,)), ((S, 2, 3), (S, 2, 3))):
        x = _support_values(spec.support, gen, x_shape)
        ev = x_shape[1:]
        first = PARAM_VALUES[kinds[0]][0] * (1 + 0.2 * torch.rand(p_shape, generator=gen, dtype=DT))
        args = [first.requires_grad_(True)]
        for k in kinds[1:]:
            v = PARAM_VALUES[k][1]
            if scale == "float":
                args.append(float(v))
            else:
                shape = (S,) + ((1,) * len(ev) if scale == "per_sample" else ev)
                args.append((v * (0.5 + torch.rand(shape, generator=gen, dtype=DT))).requires_grad_(True))
        got = spec.lpdf_sum(D)(x, *args)
        lp = spec.build(D, *[torch.as_tensor(a, dtype=DT) for a in args]).log_prob(x)
        want = lp.reshape(lp.shape[0], -1).sum(-1) if lp.dim() > 1 else lp
        torch.testing.assert_close(got.expand(S), want.expand(S), rtol=1e-10, atol=1e-10)
        leaves = [a for a in args if torch.is_tensor(a)]
        g1 = torch.autograd.grad(got.sum(), leaves)
        g2 = torch.autograd.grad(want.sum(), leaves)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
