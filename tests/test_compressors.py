import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsparse.compressors import (
    ApproximateTopK,
    CompressionContext,
    HardThreshold,
    Identity,
    RandomK,
    TopK,
    k_from_density,
    make_compressor,
    random_k_indices,
    stream_seed,
)
from gradsparse.segments import Layout


def topk_mask_rows(x, k):
    return TopK(k=k).compress(x).support_mask()


def dense(comp, x, context=None):
    """(compressed rows, support mask) of one compressor call, from its SparseBatch."""
    msg = comp.compress(x, context)
    return msg.to_dense(), msg.support_mask()

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
    out, _ = dense(TopK(k=k), x)
    assert (x - out).square().sum() <= (1 - k / d) * x.square().sum() * (1 + 1e-12) + 1e-12


@settings(max_examples=150, deadline=None)
@given(vectors, st.floats(0.0, 100.0))
def test_hard_threshold_absolute_bound(data, lam):
    vals, _ = data
    x = torch.tensor(vals, dtype=torch.float64)[None]
    out, m = dense(HardThreshold(lam), x)
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
    ent = dense(TopK(k=2), x)[1][0]
    layout = Layout(("a", "b"), ((3,), (3,)))
    lw = dense(TopK(density=1 / 3, scope="layerwise", layout=layout), x)[1][0]
    assert ent.tolist() == [True, True, False, False, False, False]
    assert lw.tolist() == [True, False, False, False, False, True]
    # hard-threshold is scope-free by construction
    assert dense(HardThreshold(0.25), x)[1][0].tolist() == [True, True, True, False, False, True]


def test_random_k_is_regenerable_from_seed_step_worker():
    comp = RandomK(k=5, seed=3)
    x = torch.randn(4, 50)
    ctx = CompressionContext(7, torch.tensor([2, 0, 3, 1]), "uplink")
    msg = comp.compress(x, ctx)
    out, m = msg.to_dense(), msg.support_mask()
    for q, worker in enumerate([2, 0, 3, 1]):
        seed = stream_seed(3, "uplink", 7, worker)
        assert int(msg.seeds[q]) == seed  # the receiver's seed is in the message
        idx = random_k_indices(seed, 50, 5)
        assert torch.nonzero(m[q]).reshape(-1).tolist() == idx.tolist()
        assert torch.equal(out[q][idx], x[q][idx])
    # different steps, workers and streams draw different supports
    assert not torch.equal(m[0], m[1])
    assert not torch.equal(m, dense(comp, x, CompressionContext(8, ctx.workers))[1])
    assert not torch.equal(m, dense(comp, x, CompressionContext(7, ctx.workers, "downlink"))[1])


def test_random_k_scaling_unbiased_factor():
    x = torch.randn(1, 40)
    out, m = dense(RandomK(k=10, seed=0, scale=True), x)
    assert torch.allclose(out[m], x[m] * 4.0)


def test_random_k_expected_error_matches_formula():
    # E||x - C(x)||^2 = (1 - k/d)||x||^2 (unscaled random-k), Monte Carlo over steps
    torch.manual_seed(0)
    x = torch.randn(1, 64, dtype=torch.float64)
    comp = RandomK(k=16, seed=1)
    errs = [float((x - dense(comp, x, CompressionContext(t))[0]).square().sum()) for t in range(4000)]
    assert abs(sum(errs) / len(errs) / float(x.square().sum()) - 0.75) < 0.02


def test_identity_and_bad_options():
    x = torch.randn(2, 5)
    msg = Identity().compress(x)
    assert msg.dense and torch.equal(msg.to_dense(), x)
    with pytest.raises(ValueError, match="unknown compressor 'topq'"):
        make_compressor("topq")
    with pytest.raises(ValueError, match="exactly one of k"):
        TopK()
    with pytest.raises(ValueError, match="k = 9 exceeds"):
        TopK(k=9).k_for(5)
    with pytest.raises(ValueError, match="hard-threshold threshold must be a finite number >= 0, got -1.0"):
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


def test_every_compressor_returns_one_message_type():
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    for comp in (Identity(), TopK(k=4), HardThreshold(1.0), RandomK(k=4), ApproximateTopK(k=4, exact=True)):
        msg = comp.compress(x, CompressionContext(0))
        assert msg.n == 3 and msg.d == 40
        assert int(msg.counts.sum()) == msg.nnz == msg.values.numel()
        # values are x at the support (random-k unscaled)
        torch.testing.assert_close(msg.to_dense()[msg.support_mask()], x[msg.support_mask()])


def test_hard_threshold_may_send_nothing_and_counts_vary():
    x = torch.tensor([[0.1, 0.2], [3.0, -4.0], [0.0, 5.0]])
    msg = HardThreshold(1.0).compress(x)
    assert msg.counts.tolist() == [0, 2, 1]
    assert msg.fixed_k is None
    torch.testing.assert_close(msg.to_dense(), torch.tensor([[0.0, 0.0], [3.0, -4.0], [0.0, 5.0]]))


def test_topk_ranks_nan_above_inf_in_every_dtype():
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([[1.0, float("inf"), float("nan"), -float("inf"), 2.0]], dtype=dtype)
        assert TopK(k=1).compress(x).indices.tolist() == [2]
        assert sorted(TopK(k=2).compress(x).indices.tolist()) == [1, 2]  # +inf beats -inf by index


def test_approximate_topk_is_close_and_exact_variant_is_exact():
    x = torch.randn(2, 20000, generator=torch.Generator().manual_seed(1))
    approx = ApproximateTopK(density=0.01, sample_fraction=0.2).compress(x, CompressionContext(3))
    k = k_from_density(0.01, 20000)
    assert all(0.5 * k <= c <= 1.5 * k for c in approx.counts.tolist())
    exact = ApproximateTopK(density=0.01, exact=True).compress(x, CompressionContext(3))
    assert torch.equal(exact.support_mask(), TopK(density=0.01).compress(x).support_mask())
    # deterministic: the sample comes from the message's random stream
    again = ApproximateTopK(density=0.01, sample_fraction=0.2).compress(x, CompressionContext(3))
    assert torch.equal(approx.indices, again.indices)


def test_threshold_rule_topk_volume_by_hand_and_through_the_config():
    """lambda = 1/(2 sqrt K) (paper 002's rule of thumb): 0.5, 0.25, 0.1, 0.05, 5e-4 at K = 1,
    4, 25, 100, 10^6, the same from a config section as from the function; K must be a
    positive integer."""
    from gradsparse.compressors import threshold_for_topk_volume

    layout = Layout.flat(400)
    for k, lam in ((1, 0.5), (4, 0.25), (25, 0.1), (100, 0.05), (10**6, 5e-4)):
        assert threshold_for_topk_volume(k) == pytest.approx(lam, rel=1e-15)
        got = make_compressor("hard_threshold", layout, 0.5, threshold={"rule": "topk_volume", "k": k}).threshold
        assert got == threshold_for_topk_volume(k)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="integer k >= 1"):
            threshold_for_topk_volume(bad)
    with pytest.raises(ValueError, match="unknown threshold rule"):
        make_compressor("hard_threshold", layout, 0.5, threshold={"rule": "guess"})


def test_threshold_rule_precision_bounds_the_error_feedback_memory_by_epsilon():
    """The precision rule's meaning (paper 002): with lambda chosen so that d lr^2 lambda^2 =
    epsilon, hard-threshold error feedback (ef-scaled: compress (e + lr g) / lr) leaves every
    memory entry below lr lambda in magnitude, so ||e||^2 <= epsilon at every step -- and
    gradients just below lambda in every coordinate reach the bound (0.99^2 of it)."""
    from gradsparse.feedback import make_feedback

    d, lr, eps = 50, 0.3, 1e-3
    comp = make_compressor("hard_threshold", Layout.flat(d), lr, threshold={"rule": "precision", "epsilon": eps})
    lam = comp.threshold
    fb = make_feedback("ef-scaled")
    # one step of gradients at 0.99 lambda everywhere: nothing passes, e = 0.99 lr lambda per entry
    out, memory = fb.update(torch.full((1, d), 0.99 * lam, dtype=torch.float64), fb.init(Layout.flat(d), 1, dtype=torch.float64), lr=lr,
                            compressor=comp, context=CompressionContext(0))
    assert out.message.nnz == 0
    assert float(memory.flat.square().sum()) == pytest.approx(0.99**2 * eps, rel=1e-9)
    memory = fb.init(Layout.flat(d), 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    seen = 0.0
    for t in range(200):
        grads = torch.randn(4, d, generator=g, dtype=torch.float64) * lam * (0.5 + (t % 3))
        out, memory = fb.update(grads, memory, lr=lr, compressor=comp, context=CompressionContext(t))
        energy = memory.flat.square().sum(1)
        assert float(energy.max()) <= eps * (1 + 1e-9), t
        seen = max(seen, float(energy.max()))
    assert seen > 0.2 * eps  # the memories did fill up (about d (lr lambda)^2 / 3): the bound was tested
    with pytest.raises(ValueError, match="epsilon > 0"):
        make_compressor("hard_threshold", Layout.flat(d), lr, threshold={"rule": "precision", "epsilon": 0.0})