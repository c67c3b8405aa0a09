import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsparse.compressors import (
    HardThreshold,
    Identity,
    RandomK,
    TopK,
    k_from_density,
    make_compressor,
    topk_mask_rows,
)
from gradsparse.wire import random_k_indices

vectors = st.integers(1, 300).flatmap(
    lambda d: st.tuples(
        st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=d, max_size=d),
        st.integers(0, d),
    )
)


@settings(max_examples=150, deadline=None)
@given(vectors)
def test_topk_keeps_exactly_the_k_largest_magnitudes(data):
    vals, k = data
    x = torch.tensor(vals, dtype=torch.float32)[None]
    m = topk_mask_rows(x, k)[0]
    assert int(m.sum()) == k
    mag = x[0].abs()
    if 0 < k < x.numel():
        assert mag[m].min() >= mag[~m].max()
    # tie rule: among equal magnitudes at the boundary, lower indices are kept
    order = sorted(range(x.numel()), key=lambda i: (-float(mag[i]), i))
    assert set(torch.nonzero(m).reshape(-1).tolist()) == set(order[:k])


@settings(max_examples=150, deadline=None)
@given(vectors)
def test_topk_contraction_bound(data):
    vals, k = data
    x = torch.tensor(vals, dtype=torch.float64)[None]
    d = x.numel()
    out, _ = TopK(k=k)(x)
    assert (x - out).square().sum() <= (1 - k / d) * x.square().sum() * (1 + 1e-12) + 1e-12


@settings(max_examples=150, deadline=None)
@given(vectors, st.floats(0.0, 100.0))
def test_hard_threshold_absolute_bound(data, lam):
    vals, _ = data
    x = torch.tensor(vals, dtype=torch.float64)[None]
    out, m = HardThreshold(lam)(x)
    assert (x - out).square().sum() <= x.numel() * lam**2 + 1e-9
    assert torch.equal(m[0], x[0].abs() >= lam)


def test_topk_ties_all_equal_and_rows():
    x = torch.ones(3, 10)
    m = topk_mask_rows(x, 4)
    assert torch.equal(m, torch.tensor([[True] * 4 + [False] * 6] * 3))
    x = torch.tensor([[0.0, -2.0, 2.0, 1.0, -2.0]])
    assert torch.nonzero(topk_mask_rows(x, 2)[0]).reshape(-1).tolist() == [1, 2]


def test_rounding_rule():
    # K = d - floor((1 - rho) d), at least 1
    assert k_from_density(0.001, 50890) == 50890 - math.floor(0.999 * 50890)
    assert k_from_density(0.001, 100) == 1
    assert k_from_density(1.0, 7) == 7
    with pytest.raises(ValueError, match="density"):
        k_from_density(0.0, 10)


def test_layerwise_differs_from_entire_and_respects_segments():
    x = torch.tensor([[10.0, 9.0, 8.0, 0.1, 0.2, 0.3]])
    ent = TopK(k=2)(x)[1][0]
    lw = TopK(density=1 / 3, scope="layerwise", layout=[3, 3])(x)[1][0]
    assert ent.tolist() == [True, True, False, False, False, False]
    assert lw.tolist() == [True, False, False, False, False, True]
    # hard-threshold is scope-free by construction
    assert HardThreshold(0.25)(x)[1][0].tolist() == [True, True, True, False, False, True]


def test_random_k_is_regenerable_from_seed_step_worker():
    comp = RandomK(k=5, seed=3)
    x = torch.randn(4, 50)
    out, m = comp(x, step=7, workers=torch.arange(4))
    for q in range(4):
        idx = random_k_indices(comp.message_seed(7, q), 50, 5)
        assert torch.nonzero(m[q]).reshape(-1).tolist() == idx.tolist()
        assert torch.equal(out[q][idx], x[q][idx])
    # different steps and workers draw different supports
    assert not torch.equal(m[0], m[1])
    assert not torch.equal(m, comp(x, step=8, workers=torch.arange(4))[1])


def test_random_k_scaling_unbiased_factor():
    x = torch.randn(1, 40)
    out, m = RandomK(k=10, seed=0, scale=True)(x)
    assert torch.allclose(out[m], x[m] * 4.0)


def test_random_k_expected_error_matches_formula():
    # E||x - C(x)||^2 = (1 - k/d)||x||^2 (unscaled random-k), Monte Carlo over steps
    torch.manual_seed(0)
    x = torch.randn(1, 64, dtype=torch.float64)
    comp = RandomK(k=16, seed=1)
    errs = [float((x - comp(x, step=t)[0]).square().sum()) for t in range(4000)]
    assert abs(sum(errs) / len(errs) / float(x.square().sum()) - 0.75) < 0.02


def test_identity_and_bad_options():
    x = torch.randn(2, 5)
    assert torch.equal(Identity()(x)[0], x)
    with pytest.raises(ValueError, match="unknown compressor 'topq'"):
        make_compressor("topq")
    with pytest.raises(ValueError, match="exactly one of k"):
        TopK()
    with pytest.raises(ValueError, match="k = 9 exceeds"):
        TopK(k=9).k_for(5)
    with pytest.raises(ValueError, match="lambda"):
        HardThreshold(-1.0)


def test_random_k_sparse_sampler_is_uniform_without_replacement():
    # k <= d/16 takes the first k distinct values of an i.i.d. sequence: every index should be
    # chosen with probability k/d; 4000 draws of 10 of 320 -> 125 expected per index
    d, k, n = 320, 10, 4000
    counts = torch.zeros(d)
    for s in range(n):
        idx = random_k_indices(s, d, k)
        assert idx.numel() == k and torch.unique(idx).numel() == k
        assert torch.all(idx[1:] > idx[:-1])
        counts[idx] += 1
    expected = n * k / d
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < d + 5 * math.sqrt(2 * d)  # chi-square with d - 1 dof, 5 sigma
    assert torch.equal(random_k_indices(7, 10**7, 100), random_k_indices(7, 10**7, 100))
