"""Exactness and allocation tests for gradsparse.kernels, on the compiled and the torch paths."""

from __future__ import annotations

import contextlib
import math
import struct
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from gradsparse import kernels as K
from gradsparse.kernels import library, torch_path, tuning, workspace

NAN = float("nan")
INF = float("inf")

PATHS = [
    pytest.param(True, id="ext", marks=pytest.mark.skipif(not K.has_extension(), reason="C kernels not built or disabled")),
    pytest.param(False, id="torch"),
]


@pytest.fixture(params=PATHS)
def use_ext(request):
    return request.param


def ref_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: first k of a full stable sort by |x| descending (NaN first), sorted ascending."""
    return torch.sort(x.reshape(-1).abs(), descending=True, stable=True).indices[:k].sort().values


def bits_f32(vals: list[int]) -> torch.Tensor:
    return torch.tensor([v - (1 << 32) if v >= (1 << 31) else v for v in vals], dtype=torch.int32).view(torch.float32)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def retry_path():
    tuning.set_rank_scale(0.0)
    yield
    tuning.set_rank_scale(1.0)


def adversarial(name: str, n: int, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    if name == "randn":
        return torch.randn(n, generator=g)
    if name == "ties":
        return torch.randint(-3, 4, (n,), generator=g).float()
    if name == "all_equal":
        return torch.full((n,), -1.5)
    if name == "zeros":
        return torch.zeros(n)
    if name == "signed_zeros":
        x = torch.randint(0, 2, (n,), generator=g).float().mul_(2).sub_(1) * 0.0  # +0 and -0
        x[:: max(1, n // 7)] = torch.randn(len(range(0, n, max(1, n // 7))), generator=g)
        return x
    if name == "sparse":  # mostly zeros, some large values
        return torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.001)
    if name == "nan_inf":
        x = torch.randn(n, generator=g)
        m = torch.rand(n, generator=g)
        x[m < 0.002] = NAN
        x[(m >= 0.002) & (m < 0.004)] = -NAN
        x[(m >= 0.004) & (m < 0.006)] = INF
        x[(m >= 0.006) & (m < 0.008)] = -INF
        return x
    if name == "tiny_range":  # many exact ties around the threshold
        return (torch.randint(0, 50, (n,), generator=g).float() - 25) * 1e-3
    raise ValueError(name)


KINDS = ["randn", "ties", "all_equal", "zeros", "signed_zeros", "sparse", "nan_inf", "tiny_range"]


# ------------------------------------------------------------------------------ topk_indices


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 37, 5000, 300_000])
def test_topk_adversarial(use_ext, kind, n):
    x = adversarial(kind, n, seed=n)
    for k in sorted({0, 1, min(2, n), n // 1000, n // 100, n // 3, n - 1, n}):
        got = K.topk_indices(x, k, use_ext=use_ext)
        assert got.dtype == torch.long and got.shape == (k,)
        assert torch.equal(got, ref_topk(x, k)), (kind, n, k)


@pytest.mark.parametrize("kind", ["randn", "ties", "sparse", "nan_inf"])
def test_topk_medium(use_ext, kind):
    n = 2_000_000
    x = adversarial(kind, n, seed=7)
    order = torch.sort(x.abs(), descending=True, stable=True).indices
    for k in (1, n // 1000, n // 100):
        assert torch.equal(K.topk_indices(x, k, use_ext=use_ext), order[:k].sort().values), (kind, k)


@pytest.mark.parametrize("kind", ["randn", "ties", "tiny_range"])
def test_topk_retry_path(use_ext, kind, retry_path):
    """With the first threshold forced to the sample maximum the kernel must retry and stay exact."""
    x = adversarial(kind, 400_000, seed=3)
    for k in (10, 4000, 40_000):
        assert torch.equal(K.topk_indices(x, k, use_ext=use_ext), ref_topk(x, k)), (kind, k)


def test_topk_nan_policy(use_ext):
    # NaNs of any sign and payload rank above +inf and tie among themselves (lower index first)
    x = bits_f32([0x3F800000, 0x7FC00000, 0xFF800000, 0x7F800001, 0x00000000, 0xFFC12345, 0x80000000, 0x7F800000])
    #            1.0         nan         -inf        nan(sig)    +0          -nan        -0          +inf
    assert K.topk_indices(x, 2, use_ext=use_ext).tolist() == [1, 3]
    assert K.topk_indices(x, 3, use_ext=use_ext).tolist() == [1, 3, 5]
    assert K.topk_indices(x, 4, use_ext=use_ext).tolist() == [1, 2, 3, 5]  # -inf ties +inf: lower index
    assert K.topk_indices(x, 7, use_ext=use_ext).tolist() == [0, 1, 2, 3, 4, 5, 7]  # +0 before -0
    for k in range(9):
        assert torch.equal(K.topk_indices(x, k, use_ext=use_ext), ref_topk(x, k))


def test_topk_signed_zero_tie(use_ext):
    x = torch.tensor([-0.0, 0.0, -0.0, 0.0])
    assert K.topk_indices(x, 2, use_ext=use_ext).tolist() == [0, 1]


def test_topk_edge_cases(use_ext):
    e = torch.empty(0)
    assert K.topk_indices(e, 0, use_ext=use_ext).numel() == 0
    x = torch.randn(10)
    assert K.topk_indices(x, 0, use_ext=use_ext).numel() == 0
    assert torch.equal(K.topk_indices(x, 10, use_ext=use_ext), torch.arange(10))
    with pytest.raises(ValueError, match=r"k=11.*d=10"):
        K.topk_indices(x, 11, use_ext=use_ext)
    with pytest.raises(ValueError, match=r"k=1.*d=0"):
        K.topk_indices(e, 1, use_ext=use_ext)
    with pytest.raises(ValueError):
        K.topk_indices(x, -1, use_ext=use_ext)
    with pytest.raises(TypeError):
        K.topk_indices(torch.arange(5), 1, use_ext=use_ext)
    # any shape: flat row-major indices
    m = torch.randn(30, 40, generator=gen(1))
    assert torch.equal(K.topk_indices(m, 50, use_ext=use_ext), ref_topk(m, 50))
    # non-contiguous input
    t = torch.randn(400, 300, generator=gen(2)).t()
    assert torch.equal(K.topk_indices(t, 500, use_ext=use_ext), ref_topk(t, 500))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_topk_other_dtypes(dtype):
    x = (adversarial("nan_inf", 100_000, seed=5) * 4).round_().to(dtype)  # plenty of ties
    for k in (1, 100, 5000):
        assert torch.equal(K.topk_indices(x, k), ref_topk(x, k))


def test_paths_agree_and_env_var(monkeypatch):
    x = adversarial("ties", 500_000, seed=11)
    a = K.topk_indices(x, 2500, use_ext=False)
    if K.has_extension():
        assert torch.equal(K.topk_indices(x, 2500, use_ext=True), a)
    monkeypatch.setenv("GRADSPARSE_NO_EXT", "1")
    assert not K.has_extension()
    assert torch.equal(K.topk_indices(x, 2500), a)
    with pytest.raises(RuntimeError, match="GRADSPARSE_NO_EXT"):
        K.topk_indices(x, 2500, use_ext=True)


VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, 0.5, -0.5, 3.25, INF, -INF, NAN, 1e-30, -1e30])


@settings(max_examples=60, deadline=None)
@given(
    vals=st.lists(st.one_of(VALUES, st.floats(width=32, allow_nan=True)), min_size=0, max_size=300),
    frac=st.floats(0.0, 1.0),
    reps=st.integers(1, 200),
)
def test_topk_hypothesis(vals, frac, reps):
    x = torch.tensor(vals, dtype=torch.float32).repeat(reps)  # repetition makes ties and big inputs
    k = int(round(frac * x.numel()))
    exp = ref_topk(x, k)
    for ue in (True, False) if K.has_extension() else (False,):
        assert torch.equal(K.topk_indices(x, k, use_ext=ue), exp)


# ------------------------------------------------------------------------------ layer-wise


def ref_layerwise(x, offs, ks):
    parts = [ref_topk(x[offs[i] : offs[i + 1]], ks[i]) + offs[i] for i in range(len(ks))]
    return torch.cat(parts).sort().values if parts else torch.empty(0, dtype=torch.long)


def test_layerwise(use_ext):
    g = gen(4)
    sizes = [0, 1, 3, 100, 5000, 70_000, 300_000, 1_200_000, 7, 64] + torch.randint(1, 2000, (200,), generator=g).tolist()
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    x = adversarial("tiny_range", offs[-1], seed=9)
    x[5:20] = NAN
    x[offs[6] : offs[6] + 100] = -0.0
    ks = [0, 1, 2, 10, 100, 700, 3000, 12000, 7, 0] + [int(v) for v in torch.randint(0, 2000, (200,), generator=g)]
    ks = [min(k, s) for k, s in zip(ks, sizes)]
    got = K.topk_indices_layerwise(x, offs, ks, use_ext=use_ext)
    assert torch.equal(got, ref_layerwise(x, offs, ks))
    # tensor arguments, offsets not starting at 0 / not covering the end
    offs_t = torch.tensor(offs[3:8])
    got = K.topk_indices_layerwise(x, offs_t, torch.tensor(ks[3:7]), use_ext=use_ext)
    assert torch.equal(got, ref_layerwise(x, offs[3:8], ks[3:7]))


def test_layerwise_many_tiny(use_ext):
    sizes = torch.randint(1, 40, (3000,), generator=gen(8))
    offs = [0] + torch.cumsum(sizes, 0).tolist()
    x = adversarial("ties", offs[-1], seed=2)
    ks = [int(s) // 3 for s in sizes]
    assert torch.equal(K.topk_indices_layerwise(x, offs, ks, use_ext=use_ext), ref_layerwise(x, offs, ks))


def rows_with_ties(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    """[n, d] rows with heavy ties, NaNs of both signs, infinities and signed zeros."""
    g = gen(seed)
    if kind == "few_values":  # |x| in {0, .., 4}: thousands of ties at the threshold
        x = torch.randint(-4, 5, (n, d), generator=g).float()
    elif kind == "spread":  # ~2000 distinct magnitudes, still many ties
        x = (torch.randint(-1000, 1001, (n, d), generator=g).float()) * 1e-3
    else:
        x = torch.randn(n, d, generator=g)
    m = torch.rand(n, d, generator=g)
    x[m < 1e-4] = NAN
    x[(m >= 1e-4) & (m < 2e-4)] = -NAN
    x[(m >= 2e-4) & (m < 3e-4)] = INF
    x[(m >= 3e-4) & (m < 4e-4)] = -INF
    x[(m >= 4e-4) & (m < 0.01)] = -0.0
    return x


def ref_rows_flat(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Global ascending indices of the per-row top-k, from the rows' stable descending order."""
    n, d = x.shape
    return (order[:, :k].sort(dim=1).values + torch.arange(n).unsqueeze(1) * d).view(-1)


ROW_KS = [1, 5, 16, 17, 51, 509, 5089, 12_723]


def test_layerwise_rows_like_workers(use_ext):
    """The simulator's hot path: 100 rows of 50,890 as segments, k = 51, ties and NaNs."""
    x = rows_with_ties("few_values", 100, 50_890, seed=31)
    order = torch.sort(x.abs(), dim=1, descending=True, stable=True).indices
    offs = torch.arange(0, 100 * 50_890 + 1, 50_890)
    got = K.topk_indices_layerwise(x.view(-1), offs, torch.full((100,), 51), use_ext=use_ext)
    assert torch.equal(got, ref_rows_flat(x, order, 51))
    rows = K.topk_indices_rows(x, 51, use_ext=use_ext)
    assert torch.equal((rows + torch.arange(100).unsqueeze(1) * 50_890).view(-1), got)


@pytest.mark.skipif(not K.has_extension(), reason="C kernels not built or disabled")
@pytest.mark.parametrize("kind", ["few_values", "spread", "randn"])
def test_layerwise_rows_many_k(kind):
    """100 x 50,890 rows against a per-row reference, k from 1 to n/4 (every selection path)."""
    n, d = 100, 50_890
    x = rows_with_ties(kind, n, d, seed=len(kind))
    order = torch.sort(x.abs(), dim=1, descending=True, stable=True).indices
    offs = torch.arange(0, n * d + 1, d)
    for k in ROW_KS:
        got = K.topk_indices_layerwise(x.view(-1), offs, torch.full((n,), k), use_ext=True)
        assert torch.equal(got, ref_rows_flat(x, order, k)), (kind, k)


def ordered_segments(seed: int):
    """Segments whose order is adversarial for a streaming threshold (ascending, descending,
    constant, shuffled, ties), of sizes with and without sampling, with varied k."""
    g = gen(seed)
    sizes = [20_000] * 8 + [3000] * 8 + [300] * 8 + [40] * 8 + [70_000] * 2
    ks_cycle = [1, 3, 16, 17, 40, 200, 0, 10**9]  # 10**9 -> clipped to n (k = n)
    parts, ks = [], []
    for i, s in enumerate(sizes):
        base = torch.randint(-50, 51, (s,), generator=g).float() * 0.25
        mode = i % 5
        if mode == 0:
            v = base.abs().sort().values * torch.where(torch.rand(s, generator=g) < 0.5, -1.0, 1.0)  # ascending |x|
        elif mode == 1:
            v = base.abs().sort(descending=True).values
        elif mode == 2:
            v = torch.full((s,), -2.5)
        elif mode == 3:
            v = base
            v[:: max(1, s // 9)] = NAN
        else:
            v = torch.randn(s, generator=g)
        parts.append(v)
        k = ks_cycle[(i // 5 + i) % len(ks_cycle)]
        ks.append(min(k, s) if k != 10**9 else s)
    ks[-2:] = [700, 17_500]  # a sampled segment with n/4 (streaming, not select_small)
    x = torch.cat(parts)
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    return x, offs, ks


@pytest.mark.skipif(not K.has_extension(), reason="C kernels not built or disabled")
@pytest.mark.parametrize("mode", ["default", "one_thread", "generic_isa", "retry"])
def test_layerwise_adversarial_orders(mode):
    x, offs, ks = ordered_segments(seed=17)
    exp = ref_layerwise(x, offs, ks)
    nthreads = torch.get_num_threads()
    try:
        if mode == "one_thread":
            torch.set_num_threads(1)
        elif mode == "generic_isa":
            library.force_generic(True)
        elif mode == "retry":
            tuning.set_rank_scale(0.0)
        for rep in range(2):  # the second call reuses the warm workspace
            assert torch.equal(K.topk_indices_layerwise(x, offs, ks, use_ext=True), exp), (mode, rep)
        # the same data as many equal rows, the other segment layout
        rows = x[: 8 * 20_000].view(8, 20_000)
        order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices
        for k in (1, 16, 17, 51, 5000):
            row_offs = list(range(0, 8 * 20_000 + 1, 20_000))
            got = K.topk_indices_layerwise(rows.reshape(-1), row_offs, [k] * 8, use_ext=True)
            assert torch.equal(got, ref_rows_flat(rows, order, k)), (mode, k)
    finally:
        torch.set_num_threads(nthreads)
        library.force_generic(False)
        tuning.set_rank_scale(1.0)


@pytest.mark.skipif(not K.has_extension(), reason="C kernels not built or disabled")
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("layout", ["even", "dominant"])
def test_layerwise_large_k_per_segment(nthreads, layout):
    """Large segments: one per thread with > 65536 candidates (radix select of the list), or, for
    a segment much larger than the rest ("dominant", 2 threads), all threads on it in turn."""
    g = gen(23)
    sizes = [300_000, 300_000] if layout == "even" else [1_200_000, 60_000, 90_000]
    ks = [80_000, 90_000] if layout == "even" else [100_000, 600, 30_000]
    parts = [torch.randint(-6, 7, (sizes[0],), generator=g).float()] + [torch.randn(s, generator=g) for s in sizes[1:]]
    x = torch.cat(parts)
    x[::1001] = NAN
    offs = [0]
    for s_ in sizes:
        offs.append(offs[-1] + s_)
    prev = torch.get_num_threads()
    torch.set_num_threads(nthreads)
    try:
        got = K.topk_indices_layerwise(x, offs, ks, use_ext=True)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(got, ref_layerwise(x, offs, ks))


def test_layerwise_errors(use_ext):
    x = torch.randn(100)
    with pytest.raises(ValueError, match=r"segment 1: k=60"):
        K.topk_indices_layerwise(x, [0, 50, 100], [5, 60], use_ext=use_ext)
    with pytest.raises(ValueError, match="non-decreasing"):
        K.topk_indices_layerwise(x, [0, 60, 50], [1, 1], use_ext=use_ext)
    with pytest.raises(ValueError, match="segments"):
        K.topk_indices_layerwise(x, [0, 50, 100], [1], use_ext=use_ext)
    with pytest.raises(ValueError, match="within"):
        K.topk_indices_layerwise(x, [0, 101], [1], use_ext=use_ext)
    assert K.topk_indices_layerwise(x, [0], [], use_ext=use_ext).numel() == 0


# ------------------------------------------------------------------------------ rows


ROW_CASES = [(5, 1000, 10), (3, 200_000, 200), (16, 10, 3), (4, 7, 0), (4, 7, 7), (0, 5, 2), (7, 70_000, 1), (2, 3, 3)]


@pytest.mark.parametrize("n,d,k", ROW_CASES)
def test_rows(use_ext, n, d, k):
    x = torch.randint(-3, 4, (n, d), generator=gen(n * d)).float()
    if x.numel():
        x.view(-1)[::97] = NAN
        x.view(-1)[1::89] = -0.0
        x.view(-1)[2::101] = INF
    exp = torch.stack([ref_topk_sorted(x[i], k) for i in range(n)]) if n else torch.empty(0, k, dtype=torch.long)
    got = K.topk_indices_rows(x, k, use_ext=use_ext)
    assert got.dtype == torch.long and got.shape == (n, k) and torch.equal(got, exp)
    # the mask is one scatter away
    mask = torch.zeros(n, d, dtype=torch.bool).scatter_(1, got, True)
    assert int(mask.sum()) == n * k
    with pytest.raises(ValueError, match=rf"k={d + 1}"):
        K.topk_indices_rows(x, d + 1, use_ext=use_ext)
    with pytest.raises(ValueError, match="2-D"):
        K.topk_indices_rows(x.view(-1), 1, use_ext=use_ext)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(6, 300), (3, tuning.SAMPLING_CUTOFF + 77), (40, 25)])
def test_rows_other_dtypes(dtype, n, d):
    """float64 / float16 / bfloat16 rows (the pure-torch path) with ties, NaNs, infinities,
    signed zeros, k = 0 and k = d, against the stable-sort reference."""
    x = (rows_with_ties("few_values", n, d, seed=n + d) * 0.5).to(dtype)
    x[::2] = rows_with_ties("randn", n, d, seed=n)[::2].to(dtype)  # rows with and without boundary ties
    x[:, 1] = NAN  # a NaN column: every row has a NaN
    for k in sorted({0, 1, 2, 3, d // 10, d // 2, d - 1, d}):
        got = K.topk_indices_rows(x, k)
        exp = torch.stack([ref_topk_sorted(x[i], k) for i in range(n)])
        assert got.shape == (n, k) and torch.equal(got, exp), (dtype, n, d, k)


def test_rows_non_contiguous_and_edge_k(use_ext):
    x = torch.randn(300, 40, generator=gen(3)).t()  # [40, 300], not contiguous
    got = K.topk_indices_rows(x, 7, use_ext=use_ext)
    assert torch.equal(got, torch.stack([ref_topk(x[i], 7) for i in range(40)]))
    assert K.topk_indices_rows(x, 0, use_ext=use_ext).shape == (40, 0)
    assert torch.equal(K.topk_indices_rows(x, 300, use_ext=use_ext), torch.arange(300).expand(40, 300))
    assert K.topk_indices_rows(torch.empty(0, 5), 2, use_ext=use_ext).shape == (0, 2)


# ------------------------------------------------------------------------------ error feedback


def accumulate(e, g, alpha):
    return e.clone().add_(g, alpha=alpha)


def dense(idx, val, n):
    out = torch.zeros(n, dtype=val.dtype)
    out[idx] = val
    return out


@pytest.mark.parametrize("n", [1, 1000, 33, 1_000_000])
@pytest.mark.parametrize("alpha", [1.0, 0.1, -0.37, 1e-3])
def test_hard_threshold_ef(use_ext, n, alpha):
    g_ = gen(n)
    e = torch.randn(n, generator=g_) * 0.05
    g = torch.randn(n, generator=g_)
    a = accumulate(e, g, alpha)
    for lam in (float(a.abs().max()) + 1, float(a.abs().sort().values[int(0.99 * (n - 1))]), float(a.abs()[n // 2])):
        # lam equal to an entry's magnitude exercises the >= boundary
        e1 = e.clone()
        idx, val = K.accumulate_threshold_(e1, g, alpha, lam, use_ext=use_ext)
        mask = a.abs() >= lam
        assert torch.equal(idx, mask.nonzero().view(-1))
        assert torch.equal(val, a[mask])
        assert torch.equal(e1, a.masked_fill(mask, 0.0))
        assert torch.equal(dense(idx, val, n) + e1, a)  # sent + new memory == accumulated
        assert float(e1.abs().max()) < lam
    # lam <= 0 sends everything
    e1 = e.clone()
    idx, val = K.accumulate_threshold_(e1, g, alpha, 0.0, use_ext=use_ext)
    assert idx.numel() == n and torch.equal(val, a) and not e1.any()


def test_hard_threshold_nan_stays(use_ext):
    e = torch.tensor([1.0, NAN, -3.0, INF, 0.5] * 100)
    g = torch.zeros_like(e)
    idx, val = K.accumulate_threshold_(e, g, 1.0, 1.0, use_ext=use_ext)
    assert idx[:3].tolist() == [0, 2, 3]
    assert torch.isnan(e[1::5]).all() and (e[0::5] == 0).all() and (e[4::5] == 0.5).all()


@pytest.mark.parametrize("kind", ["randn", "ties", "nan_inf", "sparse"])
@pytest.mark.parametrize("n", [1000, 40_000, 1_000_000])
def test_topk_ef(use_ext, kind, n):
    e = adversarial(kind, n, seed=n + 1) * 0.1
    g = adversarial("randn" if kind != "ties" else "ties", n, seed=n + 2)
    for alpha, k in [(0.1, max(1, n // 1000)), (-0.37, n // 100), (1.0, 0), (0.5, n), (1e-3, 1)]:
        a = accumulate(e, g, alpha)
        e1 = e.clone()
        idx, val = K.accumulate_topk_(e1, g, alpha, k, use_ext=use_ext)
        ridx = ref_topk(a, k)
        assert torch.equal(idx, ridx), (kind, n, k)
        assert torch.equal(val.view(torch.int32), a[ridx].view(torch.int32))  # bitwise, NaN included
        exp_e = a.clone()
        exp_e[ridx] = 0.0
        assert torch.equal(e1.view(torch.int32), exp_e.view(torch.int32))
        if kind != "nan_inf":
            assert torch.equal(dense(idx, val, n) + e1, a)
            an = a.double().pow(2).sum()
            assert float(e1.double().pow(2).sum()) <= (1 - k / n) * float(an) * (1 + 1e-12) + 1e-30


def test_topk_ef_retry(use_ext, retry_path):
    n = 500_000
    e, g = torch.randn(n, generator=gen(1)), adversarial("ties", n, seed=2)
    a = accumulate(e, g, 0.25)
    idx, val = K.accumulate_topk_(e, g, 0.25, 5000, use_ext=use_ext)
    assert torch.equal(idx, ref_topk(a, 5000)) and torch.equal(val, a[idx])


def test_ef_update_matches_torch_add_bitwise(use_ext):
    """The fused kernel's a = e + alpha*g must round exactly like e.add_(g, alpha=alpha)."""
    for n in (7, 1003, 300_001):
        g_ = gen(n)
        e = torch.randn(n, generator=g_) * torch.exp(torch.randn(n, generator=g_) * 4)
        g = torch.randn(n, generator=g_) * torch.exp(torch.randn(n, generator=g_) * 4)
        for alpha in (0.1, -1.7e-3, 3.3333333, 1.0):
            e1 = e.clone()
            K.accumulate_topk_(e1, g, alpha, 0, use_ext=use_ext)
            assert torch.equal(e1, accumulate(e, g, alpha))


@pytest.mark.parametrize("kind", ["randn", "ties", "nan_inf", "signed_zeros"])
@pytest.mark.parametrize("n", [1, 1000, 40_000, 300_001])
def test_ef_without_g(use_ext, kind, n):
    """g = None: e already holds the accumulated vector; nothing is added (not even +0.0, which
    would turn -0.0 into +0.0), the rest as with g."""
    a = adversarial(kind, n, seed=n + 5)
    for k in sorted({0, 1, n // 100, n // 3, n}):
        e1 = a.clone()
        idx, val = K.accumulate_topk_(e1, None, 0.7, k, use_ext=use_ext)
        ridx = ref_topk_sorted(a, k)
        assert torch.equal(idx, ridx), (kind, n, k)
        assert torch.equal(val.view(torch.int32), a[ridx].view(torch.int32))
        exp_e = a.clone()
        exp_e[ridx] = 0.0
        assert torch.equal(e1.view(torch.int32), exp_e.view(torch.int32))
    finite = a.abs()[torch.isfinite(a)]
    for lam in (0.0, -1.0, float(finite[n // 2]) if finite.numel() > n // 2 else 1.0, INF, NAN):
        e2 = a.clone()
        idx, val = K.accumulate_threshold_(e2, None, 0.7, lam, use_ext=use_ext)
        mask = a.abs() >= lam
        assert torch.equal(idx, mask.nonzero().view(-1)), (kind, n, lam)
        assert torch.equal(val.view(torch.int32), a[mask].view(torch.int32))
        assert torch.equal(e2.view(torch.int32), a.masked_fill(mask, 0.0).view(torch.int32))
        assert torch.isnan(e2).sum() == torch.isnan(a).sum()  # NaN never selected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_ef_other_dtypes_and_threshold_rounding(dtype):
    """Any floating e (the torch path): bit-identical to add_ + the reference selection; the
    threshold is rounded to e's dtype like torch's comparison (1 + 2^-20 rounds to 1.0 in
    float16/bfloat16, so entries equal to 1.0 are selected)."""
    n = 100_003
    ib = {2: torch.int16, 8: torch.int64}[torch.empty(0, dtype=dtype).element_size()]
    e = (adversarial("nan_inf", n, seed=1) * 0.5).to(dtype)
    g = adversarial("ties", n, seed=2).to(dtype)
    a = accumulate(e, g, 0.25)
    e1 = e.clone()
    idx, val = K.accumulate_topk_(e1, g, 0.25, 1000)
    ridx = ref_topk_sorted(a, 1000)
    assert torch.equal(idx, ridx) and torch.equal(val.view(ib), a[ridx].view(ib))
    exp_e = a.clone()
    exp_e[ridx] = 0.0
    assert torch.equal(e1.view(ib), exp_e.view(ib))
    lam = 1.0 + 2.0**-20
    e2 = e.clone()
    idx, val = K.accumulate_threshold_(e2, g, 0.25, lam)
    mask = a.abs() >= lam
    assert torch.equal(idx, mask.nonzero().view(-1)) and torch.equal(val.view(ib), a[mask].view(ib))
    if dtype != torch.float64:
        assert bool((a[idx].abs() == 1.0).any())  # the rounded threshold is met with equality
    # a float32 threshold the same way: 1 + 2^-30 rounds to 1.0 in e's float32
    x = torch.tensor([1.0, -1.0, 0.5, NAN, INF] * 20)
    for ue in (True, False) if K.has_extension() else (False,):
        idx, _ = K.accumulate_threshold_(x.clone(), None, 1.0, 1.0 + 2.0**-30, use_ext=ue)
        assert idx.tolist() == (x.abs() >= 1.0 + 2.0**-30).nonzero().view(-1).tolist() == [i for i in range(100) if i % 5 in (0, 1, 4)]


def test_ef_validation(use_ext):
    e = torch.zeros(10)
    with pytest.raises(ValueError, match="same shape"):
        K.accumulate_topk_(e, torch.zeros(11), 1.0, 1, use_ext=use_ext)
    with pytest.raises(ValueError, match=r"k=11"):
        K.accumulate_topk_(e, torch.zeros(10), 1.0, 11, use_ext=use_ext)
    with pytest.raises(ValueError, match="contiguous"):
        K.accumulate_threshold_(torch.zeros(4, 4).t(), torch.zeros(4, 4), 1.0, 1.0, use_ext=use_ext)
    with pytest.raises(ValueError, match="dtype"):
        K.accumulate_threshold_(e, torch.zeros(10, dtype=torch.float64), 1.0, 1.0, use_ext=use_ext)
    with pytest.raises(TypeError):
        K.accumulate_topk_(torch.zeros(10, dtype=torch.long), None, 1.0, 1, use_ext=use_ext)


def max_alloc_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([ev.cpu_memory_usage for ev in prof.events()] + [0])


@pytest.mark.parametrize("with_g", [True, False])
def test_ef_no_O_d_allocation_after_warmup(use_ext, with_g):
    n, k = 1_000_000, 1000
    e0, g = torch.randn(n, generator=gen(1)), torch.randn(n, generator=gen(2))
    e = e0.clone()
    lam = 3.0
    gg = g if with_g else None

    def steps():  # same sizes every time: e restarts from e0 (copy_ allocates nothing)
        e.copy_(e0)
        K.accumulate_topk_(e, gg, 0.1, k, use_ext=use_ext)
        K.accumulate_threshold_(e, gg, 0.1, lam, use_ext=use_ext)
        K.topk_indices(e, k, use_ext=use_ext)

    def measure():  # in a fresh thread: its own, fresh, work buffers
        steps()
        steps()
        out["before"] = workspace.workspace_info()
        out["big"] = max_alloc_bytes(steps)
        for _ in range(3):
            steps()
        out["after"] = workspace.workspace_info()

    out: dict = {}
    t = threading.Thread(target=measure)
    t.start()
    t.join()
    before, big, after = out["before"], out["big"], out["after"]
    # torch-side allocations are O(k) (outputs, sample) -- an O(d) buffer would be >= n bytes
    assert big < n, big
    assert after["buffers"] == before["buffers"]  # scratch tensors reused (same data_ptr)
    assert after["c_allocs"] == before["c_allocs"]  # C workspace not grown
    assert after["c_bytes"] < 64 * k * 8 + (1 << 20)  # and it is O(k), not O(d)
    if use_ext:
        assert after["c_allocs"] > 0
    else:
        assert before["buffers"]
        assert all(numel <= tuning.CHUNK_LENGTH for _, numel in after["buffers"].values())  # one chunk each, on CPU


def test_work_buffers_are_per_thread(use_ext):
    """Each thread has its own C workspace and torch scratch: concurrent calls stay exact."""
    n, k = 300_000, 3000
    xs = [adversarial("ties", n, seed=s) for s in range(4)]
    exp = [ref_topk(x, k) for x in xs]
    es = [torch.randn(n, generator=gen(10 + s)) for s in range(4)]
    g = torch.randn(n, generator=gen(20))
    exp_ef = [ref_topk(accumulate(e, g, 0.5), k) for e in es]
    errors: list = []
    infos: dict = {}

    def work(i: int) -> None:
        try:
            for _ in range(3):
                assert torch.equal(K.topk_indices(xs[i], k, use_ext=use_ext), exp[i])
            idx, _ = K.accumulate_topk_(es[i].clone(), g, 0.5, k, use_ext=use_ext)
            assert torch.equal(idx, exp_ef[i])
            infos[i] = workspace.workspace_info()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    if not use_ext:  # distinct scratch tensors per thread
        ptrs = [ptr for info in infos.values() for ptr, _ in info["buffers"].values()]
        assert len(ptrs) == len(set(ptrs))


# ------------------------------------------------------------------------------ approximate thresholds


def test_sampled_threshold():
    x = torch.randn(200_000, generator=gen(0))
    t1 = K.sampled_threshold(x, 2000, 0.01, gen(5))
    t2 = K.sampled_threshold(x, 2000, sample_fraction=0.01, generator=gen(5))
    assert t1 == t2 and K.sampled_threshold(x, 2000) == K.sampled_threshold(x, 2000)  # deterministic
    cnt = int((x.abs() >= t1).sum())
    assert 1000 <= cnt <= 3000
    assert K.sampled_threshold(x, 0) == math.inf
    assert K.sampled_threshold(x, 200_000, 1.0) >= float(x.abs().min())  # k = d: the sample's minimum
    with pytest.raises(ValueError):
        K.sampled_threshold(x, 10, sample_fraction=0.0)
    # other dtypes; a NaN in the sample counts as +inf (it never makes the threshold NaN)
    y = x.to(torch.float16)
    y[::1000] = NAN  # 200 NaNs, about 10 in a 5% sample
    assert K.sampled_threshold(y, 100, 0.05, gen(1)) == math.inf  # r = 5 <= the sampled NaNs
    t = K.sampled_threshold(y, 5000, 0.05, gen(1))
    assert math.isfinite(t) and 3000 <= int((y.abs() >= t).sum()) <= 7000


def test_threshold_study_runs():
    """benchmarks/threshold_study.py (the study moved out of the library) runs on a tiny grid."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "threshold_study.py"
    if not path.exists():
        pytest.skip("no benchmarks/ folder next to the tests")
    spec = importlib.util.spec_from_file_location("threshold_study", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.hit_rates(20_000, trials=2, densities=(0.01,))
    assert {r["dist"] for r in rows} == set(mod.DISTS)
    assert all(0.0 <= r["hit_rate"] <= 1.0 for r in rows)
    x = mod.make_test_vector("gaussian", 100_000, gen(3))
    cnt = int((x.abs() >= mod.fitted_threshold(x, 1000, "gaussian")).sum())
    assert 700 <= cnt <= 1300


@pytest.mark.skipif(not K.has_extension(), reason="C kernels not built or disabled")
def test_compiled_generic_isa_loops(retry_path):
    """The baseline-ISA loops (used on CPUs without AVX2/FMA) give the same exact results."""
    assert library.Library.ef_exact  # the compiled EF update rounds like torch's add_ on this machine
    library.force_generic(True)
    try:
        x = adversarial("ties", 600_000, seed=21)
        assert torch.equal(K.topk_indices(x, 3000, use_ext=True), ref_topk(x, 3000))
        e, g = torch.randn(600_001, generator=gen(1)), torch.randn(600_001, generator=gen(2))
        a = accumulate(e, g, 0.3)
        e1 = e.clone()
        idx, val = K.accumulate_topk_(e1, g, 0.3, 6000, use_ext=True)
        assert torch.equal(idx, ref_topk(a, 6000)) and torch.equal(val, a[idx])
        e2 = e.clone()
        idx, val = K.accumulate_threshold_(e2, g, 0.3, 1.5, use_ext=True)
        mask = a.abs() >= 1.5
        assert torch.equal(idx, mask.nonzero().view(-1)) and torch.equal(e2, a.masked_fill(mask, 0.0))
    finally:
        library.force_generic(False)


@pytest.mark.skipif(not K.has_extension(), reason="C kernels not built or disabled")
def test_compiled_unfused_update_mode():
    """gs_set_fma(0) (for a torch whose add_ does not fuse) rounds the product, then the sum."""
    lib = library.Library.lib
    n = 300_001
    e, g = torch.randn(n, generator=gen(5)), torch.randn(n, generator=gen(6))
    alpha = 0.1
    unfused = e + g * torch.tensor(alpha, dtype=torch.float32)  # two roundings
    fused = e.clone().add_(g, alpha=alpha)
    assert not torch.equal(unfused, fused)  # the two really differ on this data
    prev = lib.gs_get_fma()
    for generic in (False, True):
        library.force_generic(generic)
        lib.gs_set_fma(0)
        try:
            e1, e2 = e.clone(), e.clone()
            K.accumulate_topk_(e1, g, alpha, 0, use_ext=True)
            idx, val = K.accumulate_threshold_(e2, g, alpha, 2.0, use_ext=True)
        finally:
            lib.gs_set_fma(prev)
            library.force_generic(False)
        assert torch.equal(e1, unfused)
        mask = unfused.abs() >= 2.0
        assert torch.equal(idx, mask.nonzero().view(-1)) and torch.equal(val, unfused[mask])


@pytest.mark.skipif(not K.has_extension(), reason="C kernels not built or disabled")
def test_library_found_in_the_package_folder_without_the_import_system(monkeypatch):
    """When gradsparse._kernels_c cannot be found as a module, the loader looks for the built file
    in the gradsparse package folder (not the kernels/ subpackage) and finds the same library."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gradsparse._kernels_c" else find_spec(name, *a)
    )
    assert library._find_library() == K.extension_path()


# ------------------------------------------------------------------------------ torch path, sampled
# Inputs longer than tuning.SAMPLING_CUTOFF take the pure-torch sampling path: a threshold key
# from a sample, a chunked pass that keeps the 8-byte words of the candidate mask, an exact
# selection among the candidates. These tests compare it with an independent reference (a stable sort of |x| with NaN
# above everything) on adversarial inputs, with small chunks (several chunks, ragged tails, words
# across chunk starts that are not multiples of 8) and with the first threshold forced to miss.

F32_SPECIAL_BITS = [
    0x00000000, 0x80000000,  # +0, -0
    0x7F800000, 0xFF800000,  # +inf, -inf
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF,  # NaNs: quiet, negative, signalling, payloads
    0x00000001, 0x80000003, 0x007FFFFF,  # denormals
    0x3F800000, 0xBF800000, 0x40000000, 0x7F7FFFFF, 0x3F000000,  # 1, -1, 2, max float, 0.5
]


def ref_topk_sorted(x: torch.Tensor, k: int) -> torch.Tensor:
    """Independent reference: stable sort by |x| (in float64) descending, then every NaN (any sign
    or payload) moved in front keeping index order; the first k, ascending."""
    flat = x.reshape(-1)
    nan = torch.isnan(flat)
    o1 = torch.sort(flat.abs().double().masked_fill(nan, 0.0), descending=True, stable=True).indices
    o2 = torch.sort(nan[o1].to(torch.uint8), descending=True, stable=True).indices
    return o1[o2][:k].sort().values


def _f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


PALETTE = st.lists(
    st.one_of(st.sampled_from(F32_SPECIAL_BITS), st.floats(width=32, allow_nan=False).map(_f32_bits)),
    min_size=1,
    max_size=8,
)
LAYOUTS = ["iid", "randn_plus", "sorted_up", "sorted_down", "runs"]


def palette_vector(bits: list[int], n: int, layout: str, seed: int) -> torch.Tensor:
    """n float32 entries drawn from a few bit patterns (so: heavy ties, NaNs of several payloads,
    infinities, signed zeros, denormals), laid out to be hard for a sampled threshold."""
    g = gen(seed)
    pal = bits_f32(bits)
    w = torch.rand(len(bits), generator=g) + 0.05  # uneven frequencies
    x = pal[torch.multinomial(w, n, replacement=True, generator=g)]
    if layout == "randn_plus":  # mostly distinct values, the palette sprinkled in
        base = torch.randn(n, generator=g)
        keep = torch.rand(n, generator=g) < 0.02
        x = torch.where(keep, x, base)
    elif layout in ("sorted_up", "sorted_down"):  # sorted by magnitude (NaNs at one end)
        mag = torch.nan_to_num(x.abs().double(), nan=math.inf)
        x = x[torch.sort(mag, descending=layout == "sorted_down", stable=True).indices]
    elif layout == "runs":  # long constant runs
        r = torch.randint(1, 5000, (n // 100 + 1,), generator=g)
        x = torch.repeat_interleave(x[: r.numel()], r)[:n]
        if x.numel() < n:
            x = torch.cat([x, pal[:1].expand(n - x.numel())])
    return x.contiguous()


def pick_k(n: int, how: str, frac: float) -> int:
    """k for a vector of n >= 2 entries: 1, n - 1, a sparse k (up to 5 %) or any k in [1, n-1]."""
    if how == "one":
        return 1
    if how == "d-1":
        return n - 1
    if how == "sparse":  # the densities the sampling is tuned for
        return max(1, int(frac * 0.05 * n))
    return max(1, min(n - 1, int(frac * n)))


@contextlib.contextmanager
def knobs(chunk: int, rank_scale: float = 1.0):
    """Temporarily set the torch path's chunk length and the sample-rank scale (0 makes the first
    threshold the sample maximum, so the pass finds too few candidates and retries)."""
    old = tuning.CHUNK_LENGTH
    tuning.CHUNK_LENGTH = chunk
    tuning.set_rank_scale(rank_scale)
    try:
        assert torch_path.chunk_length(1 << 30, torch.device("cpu")) == (chunk + 7) & ~7  # it took effect
        yield
    finally:
        tuning.CHUNK_LENGTH = old
        tuning.set_rank_scale(1.0)


def test_chunk_length_setting_reaches_every_torch_pass():
    """tuning.CHUNK_LENGTH, set at run time, sizes the chunked passes of the flat, layer-wise and
    hard-threshold torch paths: a fresh thread's scratch tensors are one (small) chunk long, not
    the input's length, and the results stay exact."""
    n, k, chunk = 200_000, 500, 4096
    x = torch.randn(n, generator=gen(3))
    offs = [0, 90_000, n]  # two segments above the sampling cutoff: one shared pass
    assert offs[1] > tuning.SAMPLING_CUTOFF and n - offs[1] > tuning.SAMPLING_CUTOFF
    out: dict = {}

    def work() -> None:  # in a fresh thread: its own, empty, scratch cache
        try:
            with knobs(chunk):
                out["flat"] = K.topk_indices(x, k, use_ext=False)
                out["segments"] = K.topk_indices_layerwise(x, offs, [k, k], use_ext=False)
                e = x.clone()
                out["threshold"] = K.accumulate_threshold_(e, None, 1.0, 2.5, use_ext=False)[0]
                out["info"] = workspace.workspace_info()
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert "error" not in out, out.get("error")
    assert torch.equal(out["flat"], ref_topk(x, k))
    assert torch.equal(out["segments"], ref_layerwise(x, offs, [k, k]))
    assert torch.equal(out["threshold"], (x.abs() >= 2.5).nonzero().view(-1))
    names = {name for name, _, _ in out["info"]["buffers"]}
    assert {"key", "mask", "abs"} <= names, names
    assert all(numel == chunk for _, numel in out["info"]["buffers"].values()), out["info"]["buffers"]


def test_rank_scale_setting_reaches_the_torch_path(monkeypatch):
    """tuning.set_rank_scale(0) makes the first sampled threshold the sample maximum, so the torch
    path's candidate pass finds too few and runs again (the retry the retry tests rely on);
    at the default scale one pass suffices here."""
    passes = []
    filter_keys = torch_path._filter_keys

    def counted(*args, **kwargs):
        passes.append(1)
        return filter_keys(*args, **kwargs)

    monkeypatch.setattr(torch_path, "_filter_keys", counted)
    x = torch.randn(200_000, generator=gen(4))
    for scale in (1.0, 0.0):
        passes.clear()
        with knobs(1 << 20, scale):
            assert torch.equal(K.topk_indices(x, 2000, use_ext=False), ref_topk(x, 2000))
        assert (len(passes) == 1) if scale == 1.0 else (len(passes) > 1), (scale, len(passes))


CHUNKS = st.sampled_from([4096, 12_340, 1 << 20])  # several chunks with ragged tails / one chunk
RANK_SCALES = st.sampled_from([1.0, 1.0, 0.0, 0.3])  # 0: first threshold = sample max (retries)


@settings(max_examples=80, deadline=None)
@given(
    bits=PALETTE,
    n=st.integers(tuning.SAMPLING_CUTOFF + 1, 3 * tuning.SAMPLING_CUTOFF),
    layout=st.sampled_from(LAYOUTS),
    how=st.sampled_from(["one", "d-1", "sparse", "any"]),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    chunk=CHUNKS,
    rank_scale=RANK_SCALES,
    dtype=st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_torch_sampled_path_matches_sort(bits, n, layout, how, frac, seed, chunk, rank_scale, dtype):
    x = palette_vector(bits, n, layout, seed).to(dtype)
    k = pick_k(n, how, frac)
    with knobs(chunk, rank_scale):
        got = K.topk_indices(x, k, use_ext=False)
    assert got.dtype == torch.long and torch.equal(got, ref_topk_sorted(x, k)), (layout, how, k, chunk, rank_scale)


@pytest.mark.parametrize("rank_scale", [1.0, 0.0])
def test_torch_sampled_path_pinned_cases(rank_scale):
    """Cases the sampling path must get right whatever the sample: all-equal vectors, -0/+0
    only, NaNs outnumbering k (the threshold is the NaN key), every NaN payload tying with the
    others, inf/-inf ties, and a k-th value shared by thousands of entries."""
    n = 100_003  # not a multiple of 8 nor of the chunk
    cases = {
        "all_equal": torch.full((n,), -2.5),
        "signed_zeros": torch.where(torch.rand(n, generator=gen(1)) < 0.5, -0.0, 0.0),
        "nan_payloads": palette_vector([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x3F800000], n, "iid", 2),
        "inf_ties": palette_vector([0x7F800000, 0xFF800000, 0x3F800000, 0x00000000], n, "iid", 3),
        "few_values": torch.randint(-3, 4, (n,), generator=gen(4)).float(),
        # 40 adjacent floats, many copies each: distinct keys that share their top bits
        "close_ties": (1.0 + torch.randint(0, 40, (n,), generator=gen(5)).double() * 2.0**-23).float(),
    }
    with knobs(10_000, rank_scale):
        for name, x in cases.items():
            for k in (1, 2, 7, 100, 1000, 5000, n // 3, 70_000, n - 1):  # 70_000: > 65536 candidates
                assert torch.equal(K.topk_indices(x, k, use_ext=False), ref_topk_sorted(x, k)), (name, k)
        # the lower index wins every tie: on an all-equal vector the answer is a prefix
        assert torch.equal(K.topk_indices(cases["all_equal"], 5000, use_ext=False), torch.arange(5000))


@settings(max_examples=40, deadline=None)
@given(
    bits=PALETTE,
    sizes=st.lists(
        st.one_of(st.integers(tuning.SAMPLING_CUTOFF + 1, 2 * tuning.SAMPLING_CUTOFF), st.integers(0, 300)), min_size=2, max_size=6
    ),
    lead=st.integers(0, 13),
    layout=st.sampled_from(LAYOUTS),
    kinds=st.lists(st.sampled_from(["zero", "one", "d-1", "all", "sparse", "any"]), min_size=6, max_size=6),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    chunk=st.sampled_from([4096, 50_000, 1 << 20]),  # cut segments / whole segments / runs of them
    rank_scale=RANK_SCALES,
)
def test_torch_layerwise_sampled_matches_sort(bits, sizes, lead, layout, kinds, frac, seed, chunk, rank_scale):
    """Several large segments at once (batched sample, per-segment thresholds in shared chunks,
    batched selection), mixed with small ones, at offsets that are not multiples of 8."""
    offs = [lead]
    for s in sizes:
        offs.append(offs[-1] + s)
    x = palette_vector(bits, offs[-1] + 5, layout, seed)
    ks = []
    for s, kind in zip(sizes, kinds):
        k = {"zero": 0, "one": min(1, s), "d-1": max(0, s - 1), "all": s}.get(kind)
        ks.append(k if k is not None else min(s, pick_k(max(s, 2), kind, frac)))
    with knobs(chunk, rank_scale):
        got = K.topk_indices_layerwise(x, offs, ks, use_ext=False)
    exp = [ref_topk_sorted(x[offs[i] : offs[i + 1]], ks[i]) + offs[i] for i in range(len(ks))]
    assert torch.equal(got, torch.cat(exp).sort().values), (sizes, ks, chunk, rank_scale)


@settings(max_examples=60, deadline=None)
@given(
    bits=PALETTE,
    sizes=st.lists(st.one_of(st.integers(0, 40), st.integers(0, 5000), st.just(tuning.SAMPLING_CUTOFF)), min_size=1, max_size=40),
    kfrac=st.lists(st.floats(0.0, 1.0), min_size=40, max_size=40),
    lead=st.integers(0, 13),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
)
def test_torch_layerwise_small_segments_match_sort(bits, sizes, kfrac, lead, layout, seed, dtype):
    """Segments up to the sampling cutoff (the padded per-size-class selection): sizes mixed
    across classes, k from 0 to the whole segment, segments starting at odd offsets."""
    offs = [lead]
    for s_ in sizes:
        offs.append(offs[-1] + s_)
    x = palette_vector(bits, offs[-1] + 3, layout, seed).to(dtype)
    ks = [int(round(f * s_)) for f, s_ in zip(kfrac, sizes)]
    got = K.topk_indices_layerwise(x, offs, ks, use_ext=False)
    exp = [ref_topk_sorted(x[offs[i] : offs[i + 1]], ks[i]) + offs[i] for i in range(len(ks))]
    assert torch.equal(got, torch.cat(exp).sort().values), (sizes, ks)


@settings(max_examples=40, deadline=None)
@given(
    bits=PALETTE,
    n=st.integers(tuning.SAMPLING_CUTOFF + 1, 2 * tuning.SAMPLING_CUTOFF),
    layout=st.sampled_from(LAYOUTS),
    how=st.sampled_from(["one", "d-1", "sparse", "any"]),
    frac=st.floats(0.0, 1.0),
    alpha=st.sampled_from([1.0, 0.1, -0.37]),
    seed=st.integers(0, 2**16),
    chunk=CHUNKS,
    rank_scale=RANK_SCALES,
    dtype=st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_torch_ef_steps_sampled_match_reference(bits, n, layout, how, frac, alpha, seed, chunk, rank_scale, dtype):
    """The torch paths of accumulate_topk_ / accumulate_threshold_ fuse a = e + alpha*g into the
    chunked pass: same a (bitwise), same selection, same values and memory as the plain formulas."""
    e = palette_vector(bits, n, layout, seed).to(dtype)
    g = torch.where(torch.rand(n, generator=gen(seed + 1)) < 0.5, 0.0, torch.randn(n, generator=gen(seed + 2)))
    g = g.to(dtype)
    a = accumulate(e, g, alpha)
    ib = {2: torch.int16, 4: torch.int32, 8: torch.int64}[e.element_size()]
    k = pick_k(n, how, frac)
    e1 = e.clone()
    with knobs(chunk, rank_scale):
        idx, val = K.accumulate_topk_(e1, g, alpha, k, use_ext=False)
    ridx = ref_topk_sorted(a, k)
    assert torch.equal(idx, ridx), (layout, how, k)
    assert torch.equal(val.view(ib), a[ridx].view(ib))
    exp_e = a.clone()
    exp_e[ridx] = 0.0
    assert torch.equal(e1.view(ib), exp_e.view(ib))
    # hard threshold at a magnitude that occurs (ties at lam), at 0 (everything but NaN), above all
    mags = a.abs()[~torch.isnan(a)]
    lams = [0.0, float(mags[seed % mags.numel()]) if mags.numel() else 1.0, math.inf]
    for lam in lams:
        e2 = e.clone()
        with knobs(chunk):
            idx, val = K.accumulate_threshold_(e2, g, alpha, lam, use_ext=False)
        mask = a.abs() >= lam
        assert torch.equal(idx, mask.nonzero().view(-1)), lam
        assert torch.equal(val.view(ib), a[mask].view(ib))
        assert torch.equal(e2.view(ib), a.masked_fill(mask, 0.0).view(ib))


# ------------------------------------------------------------------------------ rows: NaN above +inf

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_rows_nan_above_inf_with_ties(use_ext, dtype):
    """The case the old torch fallback of compressors.topk_indices_rows got wrong: when the k-th
    and (k+1)-th magnitudes of a row tie, its tie repair counted only entries ``> thr`` as
    selected, and ``NaN > thr`` is False, so a NaN was dropped (while +inf was kept) in favour of
    a lower tie; NaN ties at the boundary went undetected (``NaN == NaN`` is False)."""
    if use_ext and dtype != torch.float32:
        pytest.skip("the compiled path is float32 only")
    x = torch.tensor(
        [
            [INF, NAN, 1.0, 1.0, 0.5],  # k=3: inf, nan and the first 1.0 -> [0, 1, 2]
            [1.0, 1.0, NAN, 1.0, -INF],  # k=3: nan, -inf and the first 1.0 -> [0, 2, 4]
            [1.0, NAN, -NAN, NAN, 2.0],  # k=3: the three NaNs -> [1, 2, 3]
            [NAN, INF, 0.0, -0.0, 0.0],  # k=3: nan, inf, then +0 (lower index) -> [0, 1, 2]
        ],
        dtype=dtype,
    )
    got = K.topk_indices_rows(x, 3, use_ext=use_ext)
    assert got.dtype == torch.long and got.tolist() == [[0, 1, 2], [0, 2, 4], [1, 2, 3], [0, 1, 2]]
    assert K.topk_indices_rows(x[2:3], 2, use_ext=use_ext).tolist() == [[1, 2]]  # NaN ties: lower index


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("d", [40, tuning.SAMPLING_CUTOFF + 1000])
def test_nan_above_inf_every_path(use_ext, dtype, d):
    """NaN ranks above +inf (lower index first among NaNs) for flat, layer-wise and row top-k, on
    both sides of the sampling cutoff, with finite ties at the boundary."""
    if use_ext and dtype != torch.float32:
        pytest.skip("the compiled path is float32 only")
    n = 3
    x = torch.ones(n, d, dtype=dtype)
    x[:, 5] = INF
    x[:, 7] = NAN
    x[:, 11] = -INF
    x[:, d - 3] = -NAN
    x[:, d - 1] = NAN
    for k in (1, 2, 3, 4, 6):
        exp_row = sorted([7, d - 3, d - 1, 5, 11, 0, 1, 2][:k])
        assert K.topk_indices_rows(x, k, use_ext=use_ext).tolist() == [exp_row] * n, k
        assert K.topk_indices(x[0], k, use_ext=use_ext).tolist() == exp_row, k
        offs = torch.arange(0, n * d + 1, d)
        got = K.topk_indices_layerwise(x.reshape(-1), offs, [k] * n, use_ext=use_ext)
        assert got.tolist() == [i * d + c for i in range(n) for c in exp_row], k
        assert torch.equal(got, ref_topk_sorted_rows(x, k))


def ref_topk_sorted_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    n, d = x.shape
    return torch.cat([ref_topk_sorted(x[i], k) + i * d for i in range(n)])
