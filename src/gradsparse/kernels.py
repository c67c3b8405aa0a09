"""Fast CPU kernels for sparsification: exact top-k by magnitude and fused error-feedback steps.

Everything here works on a flat view of a floating tensor and returns flat (row-major) indices.

Ordering and tie rule (all exact functions)
-------------------------------------------
Entries are ranked by magnitude ``|x_i|``; **among equal magnitudes the lower index wins**. The
selected set is therefore exactly the first ``k`` positions of
``torch.sort(x.abs(), descending=True, stable=True).indices``. ``+0.0`` and ``-0.0`` have equal
magnitude. ``+inf`` and ``-inf`` rank above every finite value.

NaN policy: a NaN (any sign or payload) ranks **above +inf**, and all NaNs tie with each other
(lower index first) -- the same order that a stable descending sort of ``x.abs()`` gives. No
extra pass is spent looking for NaNs, so nothing is raised. The hard-threshold step follows its
formula ``|a_i| >= lam`` literally: a NaN never passes the test and stays in the memory.

Paths
-----
A small C library (``gradsparse/_kernels.c``, built as the optional extension
``gradsparse._kernels_c`` by ``pip install -e .`` when a C compiler is present) implements the
float32 CPU case with one fused pass over the data (see the file's header for the algorithm:
sample a threshold with a fixed-seed generator, filter candidates in one pass, select exactly
among them). It is loaded with :mod:`ctypes`. Every function also has a pure-torch path, used
automatically when the library is missing, for other dtypes and devices, when the environment
variable ``GRADSPARSE_NO_EXT=1`` is set, or when a function is called with ``use_ext=False``
(``use_ext=True`` demands the compiled path and raises if it cannot be used). Both paths return
identical results.

The pure-torch path (what CUDA tensors get) follows the same plan with device-agnostic torch
ops: a threshold key from a stratified sample, then one pass in chunks (on CPU ~1M entries, so
that the scratch stays in cache; elsewhere the whole vector) that writes integer keys and a 0/1
byte mask to small reused buffers and keeps only the 8-byte words of the mask that hold a
candidate (``nonzero`` over words is 8 times cheaper than over entries), then an exact selection
among the candidates (for many of them a histogram of the keys' top bits first, so that only one
bucket is ranked; ties to the lowest index). A pass that finds fewer than k candidates is redone
with a lower threshold. On CPU nothing of the vector's size is allocated, except when k is so
close to d that all keys are ranked directly. Many segments (layer-wise) share one sample, one
pass and one selection.

Error feedback
--------------
:class:`EFStep` owns reusable work buffers: after the first call with a given size, a step
allocates only its O(k) outputs. ``a = e + alpha * g`` is computed exactly as
``e.add_(g, alpha=alpha)`` does on this torch (a fused multiply-add, single rounding, with
``alpha`` rounded to the tensor's dtype); the compiled path checks this agreement when it loads
and otherwise falls back to torch for the EF steps.

Approximate thresholds
----------------------
:func:`sampled_threshold` (deep-gradient-compression style) and :func:`fitted_threshold`
(distribution fit, inverted tail) estimate a threshold whose count ``|{i: |x_i| >= thr}|`` is
only close to ``k``; :func:`threshold_hit_rate` measures how often it lands in ``[0.7k, 1.3k]``.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import math
import operator
import os
import statistics
import threading
from typing import Callable, Sequence

import torch

__all__ = [
    "topk_indices",
    "topk_indices_layerwise",
    "topk_mask_rows",
    "EFStep",
    "hard_threshold_ef_",
    "topk_ef_",
    "sampled_threshold",
    "fitted_threshold",
    "threshold_count_ratios",
    "threshold_hit_rate",
    "make_test_vector",
    "has_extension",
    "extension_path",
]

_SEED = 0x5EED  # fixed sampling seed: results never depend on it, only the running time does
_SMALL_N = 65536  # pure-torch path: below this, select directly without sampling
_SAMPLE_M = 32768
_CHUNK = 1 << 20  # pure-torch path on CPU: elements per pass chunk (scratch stays in cache)
_RANK_SCALE = [1.0]  # testing hook, see _set_rank_scale

# ---------------------------------------------------------------------------------------------
# loading the optional compiled library


class _Lib:
    lib: ctypes.CDLL | None = None
    path: str | None = None
    error: str | None = None
    ef_exact: bool = False
    loaded: bool = False
    lock = threading.Lock()
    ws: int | None = None  # module-level workspace, guarded by lock


def _find_library() -> str | None:
    try:
        spec = importlib.util.find_spec("gradsparse._kernels_c")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and os.path.exists(spec.origin):
        return spec.origin
    here = os.path.dirname(os.path.abspath(__file__))
    cands = sorted(glob.glob(os.path.join(here, "_kernels_c*.so")) + glob.glob(os.path.join(here, "_kernels_c*.pyd")))
    return cands[0] if cands else None


def _load() -> None:
    if _Lib.loaded:
        return
    _Lib.loaded = True
    path = _find_library()
    if path is None:
        _Lib.error = "extension gradsparse._kernels_c is not built"
        return
    try:
        lib = ctypes.CDLL(path)
        if lib.gs_abi_version() != 2:  # 2: gs_topk_segments accepts opos = NULL
            raise OSError("unexpected ABI version")
    except (OSError, AttributeError) as exc:  # pragma: no cover - depends on the build
        _Lib.error = f"cannot load {path}: {exc}"
        return
    vp, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.gs_ws_new.restype = vp
    lib.gs_ws_new.argtypes = []
    lib.gs_ws_free.argtypes = [vp]
    lib.gs_ws_free.restype = None
    lib.gs_ws_stats.argtypes = [vp, vp]
    lib.gs_ws_stats.restype = None
    lib.gs_force_generic.argtypes = [i32]
    lib.gs_force_generic.restype = None
    lib.gs_uses_avx2.argtypes = []
    lib.gs_uses_avx2.restype = i32
    lib.gs_set_rank_scale.argtypes = [ctypes.c_double]
    lib.gs_set_rank_scale.restype = None
    lib.gs_set_fma.argtypes = [i32]
    lib.gs_set_fma.restype = None
    lib.gs_topk.argtypes = [vp, vp, i64, i64, vp, i32]
    lib.gs_topk.restype = i32
    lib.gs_topk_ef.argtypes = [vp, vp, vp, f32, i64, i64, vp, vp, i32]
    lib.gs_topk_ef.restype = i32
    lib.gs_ht_pass.argtypes = [vp, vp, vp, f32, f32, i64, i32]
    lib.gs_ht_pass.restype = i64
    lib.gs_ht_gather.argtypes = [vp, vp, vp]
    lib.gs_ht_gather.restype = None
    lib.gs_topk_segments.argtypes = [vp, vp, vp, vp, vp, i64, vp, i32]
    lib.gs_topk_segments.restype = i32
    _Lib.lib = lib
    _Lib.path = path
    _Lib.ws = lib.gs_ws_new()
    _Lib.ef_exact = _probe_fma(lib)


def _probe_fma(lib: ctypes.CDLL) -> bool:
    """Make the C update a = e + alpha*g round exactly like torch's ``e.add_(g, alpha=alpha)``."""
    gen = torch.Generator().manual_seed(1234)
    n = 4099  # odd length: exercises torch's vector body and scalar tail
    e0 = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen)
    ws = lib.gs_ws_new()
    try:
        for alpha in (0.37, -1.7e-3):
            ref = e0.clone().add_(g, alpha=alpha)
            ok = False
            for fma in (1, 0):
                lib.gs_set_fma(fma)
                e = e0.clone()
                lib.gs_ht_pass(ws, e.data_ptr(), g.data_ptr(), alpha, math.inf, n, 1)
                if torch.equal(e, ref):
                    ok = True
                    break
            if not ok:
                lib.gs_set_fma(1)
                return False
        return True
    finally:
        lib.gs_ws_free(ws)


def _set_rank_scale(v: float) -> None:
    """Testing hook: scale the sample rank that sets the first candidate threshold on both
    paths (0 makes the first threshold the sample maximum, which exercises the retry loop)."""
    _RANK_SCALE[0] = float(v)
    _load()
    if _Lib.lib is not None:
        _Lib.lib.gs_set_rank_scale(float(v))


def _force_generic(on: bool) -> None:
    """Testing hook: make the compiled path use its baseline-ISA loops instead of AVX2+FMA."""
    _load()
    if _Lib.lib is not None:
        _Lib.lib.gs_force_generic(1 if on else 0)


def _env_disabled() -> bool:
    return os.environ.get("GRADSPARSE_NO_EXT", "") not in ("", "0")


def has_extension() -> bool:
    """True when the compiled kernels are built, loadable and not disabled by GRADSPARSE_NO_EXT."""
    if _env_disabled():
        return False
    _load()
    return _Lib.lib is not None


def extension_path() -> str | None:
    """File the compiled kernels were loaded from (None when they are not available)."""
    _load()
    return _Lib.path


def _want_ext(use_ext: bool | None, ok: bool, what: str) -> bool:
    """Decide the path: ``ok`` says whether the inputs suit the compiled kernel."""
    if use_ext is False:
        return False
    avail = has_extension()
    if use_ext is True:
        if not avail:
            why = "disabled by GRADSPARSE_NO_EXT" if _env_disabled() else _Lib.error
            raise RuntimeError(f"{what}: compiled kernels requested (use_ext=True) but unavailable: {why}")
        if not ok:
            raise RuntimeError(f"{what}: compiled kernels need contiguous float32 CPU tensors")
        return True
    return avail and ok


def _nthreads() -> int:
    return max(1, min(64, torch.get_num_threads()))


def _c_ok(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ts)


# ---------------------------------------------------------------------------------------------
# magnitude keys (pure-torch path)

_KEYINFO: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800001),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000001),
    torch.float16: (torch.int16, 0x7FFF, 0x7C01),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F81),
}


def _keys(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Integer keys ordered like |x| (sign bit cleared, every NaN mapped to one key above +inf)."""
    it, mask, nankey = _KEYINFO[x.dtype]
    if out is None:
        k = torch.bitwise_and(x.view(it), mask)
    else:
        k = torch.bitwise_and(x.view(it), mask, out=out)
    return k.clamp_(max=nankey)


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _KEYINFO:
        raise TypeError(f"{name} must be a floating tensor (float32/64/16, bfloat16), got {x.dtype}")


def _check_k(k: int, d: int, what: str = "") -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    if k < 0:
        raise ValueError(f"k must be >= 0{what}, got k={k}")
    if k > d:
        raise ValueError(f"k={k} exceeds the number of entries d={d}{what}")
    return k


def _exact_from_keys(key: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact top-k positions (ascending) of an integer key vector; 0 < k < n."""
    T = torch.topk(key, k, sorted=False).values.min()
    m = torch.gt(key, T, out=mask) if mask is not None else key > T
    gt = m.nonzero().view(-1)
    need = k - gt.numel()
    m = torch.eq(key, T, out=mask) if mask is not None else key == T
    eq = m.nonzero().view(-1)[:need]
    return torch.cat([gt, eq]).sort().values


def _kth_largest(key: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry (0-dim tensor) of a 1-D non-negative integer key tensor, 1 <= k <= n.

    Long inputs go through a histogram of the top 15 value bits first, so that only the keys in
    the bucket that holds the answer are ranked."""
    n = key.numel()
    if n > 65536:
        sh = key.element_size() * 8 - 16  # keys are >= 0: (key >> sh) < 2**15
        top = key >> sh
        cum = torch.bincount(top, minlength=1 << 15).flip(0).cumsum(0)  # cum[j]: #(top >= 2**15-1-j)
        j = int(torch.searchsorted(cum, k))
        if j > 0:
            k -= int(cum[j - 1])
        key = key[top == (1 << 15) - 1 - j]
        n = key.numel()
    if k <= n - k:  # whichever end of the ranking is shorter
        return torch.topk(key, k, sorted=False).values.min()
    return torch.topk(key, n - k + 1, largest=False, sorted=False).values.max()


def _select_mask(key: torch.Tensor, T: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest keys given their k-th largest ``T``; ties at ``T`` go to the
    lowest positions."""
    sel = key >= T
    if int(sel.sum()) != k:
        eq = key == T
        torch.gt(key, T, out=sel)
        need = k - sel.sum()
        sel |= eq & (torch.cumsum(eq, 0) <= need)
    return sel


def _pick(key: torch.Tensor, k: int) -> torch.Tensor | None:
    """Positions of the k largest of the (clamped) keys, ascending, ties to the lower position;
    None when k is the whole length. 0 < k <= len."""
    if k == key.numel():
        return None
    return _select_mask(key, _kth_largest(key, k), k).nonzero().view(-1)


_ADD_CHUNKS_OK: dict[torch.dtype, bool] = {}


def _add_in_chunks(e: torch.Tensor) -> bool:
    """Whether ``e.add_(g, alpha=alpha)`` may be applied chunk by chunk and give the bits of one
    whole call: true off CPU (the pass is one chunk there) and on CPU when torch's vectorised body
    and its scalar remainder loop round alike (both fused, or both not), which is checked once
    per dtype. Otherwise the torch EF paths add over the whole tensor first."""
    if e.device.type != "cpu":
        return True
    ok = _ADD_CHUNKS_OK.get(e.dtype)
    if ok is None:
        gen = torch.Generator().manual_seed(1234)
        n = 4099  # one call: vector body and a remainder; pieces of 7: remainders only
        a = (torch.randn(n, generator=gen) * torch.randn(n, generator=gen).exp()).to(e.dtype)
        b = torch.randn(n, generator=gen).to(e.dtype)
        ok = True
        for alpha in (0.37, -1.7e-3, 3.3333333):
            whole = a.clone().add_(b, alpha=alpha)
            parts = torch.cat([a[i : i + 7].clone().add_(b[i : i + 7], alpha=alpha) for i in range(0, n, 7)])
            ok = ok and torch.equal(whole.view(_KEYINFO[e.dtype][0]), parts.view(_KEYINFO[e.dtype][0]))
        _ADD_CHUNKS_OK[e.dtype] = ok
    return ok


def _chunk_len(n: int, device: torch.device) -> int:
    """Elements per pass chunk: on CPU a slice whose scratch stays in cache, elsewhere all of it.
    Always a multiple of 8 (the candidate masks are scanned as 8-byte words)."""
    c = n if device.type != "cpu" else min(n, max(8, _CHUNK))
    return (c + 7) & ~7


def _scratch_fn(scratch, device: torch.device):
    if scratch is not None:
        return scratch
    return lambda name, n, dtype: torch.empty(n, dtype=dtype, device=device)


def _filter_keys(flat: torch.Tensor, T: int, scratch, add=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending positions and bit patterns (as ``_KEYINFO`` integers) of the entries of ``flat``
    whose raw key (sign bit cleared, NaN payloads kept, so that every NaN has a key above +inf's)
    is >= ``T``.

    One pass in chunks: each chunk's keys and a 0/1 byte mask go to small reused scratch buffers
    (in cache on CPU), the mask is scanned as 8-byte words and only the words that hold a
    candidate are kept; they are expanded to positions once at the end. ``add = (g, alpha)``
    first applies ``flat.add_(g, alpha=alpha)`` chunk by chunk."""
    it, bits, _ = _KEYINFO[flat.dtype]
    n = flat.numel()
    dev = flat.device
    C = _chunk_len(n, dev)
    kb = scratch("key", C, it)
    mb = scratch("mask", C, torch.uint8)
    xi = flat.view(it)
    acc: tuple[list, list] = ([], [])
    for s in range(0, n, C):
        e = min(n, s + C)
        if add is not None:
            flat[s:e].add_(add[0][s:e], alpha=add[1])
        _mask_words(torch.bitwise_and(xi[s:e], bits, out=kb[: e - s]), T, mb, s, acc)
    pos = _expand_words(acc, dev)
    return pos, xi.index_select(0, pos)


def _mask_words(v: torch.Tensor, thr, mb: torch.Tensor, s: int, acc: tuple) -> None:
    """Scan the mask ``v >= thr`` of the chunk starting at position ``s`` (``thr`` a scalar or a
    list of ``(start, end, threshold)`` pieces of ``v``): append to ``acc`` the
    first positions and the contents of its 8-byte words (one 0/1 byte per entry) that hold a
    set byte. Few words do, and ``nonzero`` costs about the same per element whatever
    the element size, so this is 8 times cheaper than looking for the entries themselves.

    ``v`` (a scratch slice) is overwritten by the comparison, which is then converted into the
    uint8 scratch ``mb`` seen as bool: on CPU a comparison that writes bool directly is several
    times slower, one that writes uint8 allocates a temporary of ``v``'s size, and a float ->
    uint8 copy is not vectorised, while a copy to bool is."""
    L = v.numel()
    L8 = (L + 7) & ~7
    mc = mb[:L8]
    if isinstance(thr, list):  # (start, end, threshold) pieces covering v
        for a, b, t in thr:
            torch.ge(v[a:b], t, out=v[a:b])
    else:
        torch.ge(v, thr, out=v)
    mc[:L].view(torch.bool).copy_(v)
    if L8 != L:
        mc[L:].zero_()
    wv = mc.view(torch.int64)
    w = wv.nonzero().view(-1)
    if w.numel():
        acc[1].append(wv.index_select(0, w))
        acc[0].append(w.mul_(8).add_(s))  # position of each word's first entry


def _expand_words(acc: tuple, dev: torch.device) -> torch.Tensor:
    """Ascending positions of the set bytes of the words collected by :func:`_mask_words`."""
    ws, bs = acc
    if not ws:
        return torch.empty(0, dtype=torch.long, device=dev)
    W = ws[0] if len(ws) == 1 else torch.cat(ws)
    B = bs[0] if len(bs) == 1 else torch.cat(bs)
    p = B.view(torch.uint8).nonzero().view(-1)  # byte j of word i is entry W[i] + j
    return W.index_select(0, p >> 3).add_(p & 7)


def _topk_torch(
    flat: torch.Tensor, k: int, scratch=None, add=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact top-k of a contiguous 1-D floating tensor in torch: (ascending flat indices, their
    values or None). Lower index wins ties; NaN ranks above +inf.

    Sample a threshold key, collect the entries at or above it in one chunked pass (retrying
    lower when fewer than k are found), then select exactly among them. ``scratch(name, numel,
    dtype)`` supplies reusable work buffers (default: fresh ones). ``add = (g, alpha)``: first
    update ``flat.add_(g, alpha=alpha)`` in place (fused into the pass when there is one)."""
    n = flat.numel()
    dev = flat.device
    m = min(_SAMPLE_M, n // 8)
    mu = k * m / n if n else 0.0
    r = int(_RANK_SCALE[0] * (mu + 4.0 * math.sqrt(mu) + 2.0))
    if add is not None and (k == 0 or k == n or n <= _SMALL_N or r >= m):
        flat.add_(add[0], alpha=add[1])
        add = None
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=dev), None
    if k == n:
        return torch.arange(n, device=dev), None
    if n <= _SMALL_N:
        return _exact_from_keys(_keys(flat), k), None
    _, bits, nankey = _KEYINFO[flat.dtype]
    scratch = _scratch_fn(scratch, dev)
    if r < m:
        gen = torch.Generator().manual_seed(_SEED)
        stride = n // m  # stratified: one position in each of m equal strata
        pos = (torch.arange(0, m * stride, stride) + torch.randint(stride, (m,), generator=gen)).to(dev)
        sv = flat[pos]
        if add is not None:  # the sample of a = e + alpha*g (its rounding only affects the speed)
            sv.add_(add[0][pos], alpha=add[1])
        samp = _keys(sv)
    while r < m:
        T = int(torch.topk(samp, r + 1).values[-1])
        idx, raw = _filter_keys(flat, T, scratch, add)
        add = None
        if idx.numel() >= k:
            sel = _pick(torch.bitwise_and(raw, bits).clamp_(max=nankey), k)
            if sel is not None:
                idx, raw = idx.index_select(0, sel), raw.index_select(0, sel)
            return idx, raw.view(flat.dtype)
        r = 4 * r + 16
    if add is not None:
        flat.add_(add[0], alpha=add[1])
    return _exact_from_keys(_keys(flat), k), None


# ---------------------------------------------------------------------------------------------
# exact top-k


def topk_indices(x: torch.Tensor, k: int, *, use_ext: bool | None = None) -> torch.Tensor:
    """Exact top-``k`` entries of ``x`` by magnitude, as flat indices sorted ascending.

    ``x`` is any floating tensor (flattened row-major). Ties: among equal ``|x_i|`` the lower
    index wins; NaN ranks above +inf (see the module docstring). ``k = 0`` gives an empty
    tensor, ``k = d`` every index; ``k > d`` or ``k < 0`` raise :class:`ValueError`.

    Returns an int64 tensor of length ``k`` on ``x``'s device.
    """
    _check_float(x, "x")
    flat = x.reshape(-1)
    n = flat.numel()
    k = _check_k(k, n)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    if k == n:
        return torch.arange(n, device=x.device)
    if _want_ext(use_ext, _c_ok(flat), "topk_indices"):
        lib = _Lib.lib
        out = torch.empty(k, dtype=torch.long)
        with _Lib.lock:
            rc = lib.gs_topk(_Lib.ws, flat.data_ptr(), n, k, out.data_ptr(), _nthreads())
        if rc != 0:
            raise MemoryError("topk_indices: the compiled kernel ran out of memory")
        return out
    return _topk_torch(flat.contiguous(), k)[0]


def _as_long_list(v, name: str) -> torch.Tensor:
    t = torch.as_tensor(v)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.to(device="cpu", dtype=torch.long).contiguous()


def topk_indices_layerwise(
    x_flat: torch.Tensor,
    offsets: Sequence[int] | torch.Tensor,
    ks: Sequence[int] | torch.Tensor,
    *,
    use_ext: bool | None = None,
) -> torch.Tensor:
    """Exact top-``ks[l]`` of each segment ``x_flat[offsets[l]:offsets[l+1]]``.

    ``offsets`` has ``L + 1`` non-decreasing entries within ``[0, x_flat.numel()]`` (entries
    outside every segment are never selected); ``ks`` has ``L`` entries with
    ``0 <= ks[l] <= offsets[l+1] - offsets[l]``. Returns global flat indices of ``x_flat``, sorted
    ascending (length ``sum(ks)``). Same tie rule and NaN policy as :func:`topk_indices`, applied
    within each segment. Small segments are handled in bulk (in C: spread over threads; in torch:
    one batched segmented sort), never one Python call per segment.
    """
    _check_float(x_flat, "x_flat")
    flat = x_flat.reshape(-1)
    D = flat.numel()
    off = _as_long_list(offsets, "offsets")
    kt = _as_long_list(ks, "ks")
    if off.numel() < 1:
        raise ValueError("offsets must have at least one entry (L + 1 boundaries)")
    L = off.numel() - 1
    if kt.numel() != L:
        raise ValueError(f"ks has {kt.numel()} entries but offsets describes {L} segments")
    if int(off[0]) < 0 or int(off[-1]) > D:
        raise ValueError(f"offsets must lie within [0, {D}], got first {int(off[0])} and last {int(off[-1])}")
    sizes = off[1:] - off[:-1]
    # one check on the common path (a negative size makes kt > sizes for every kt >= 0)
    if L and bool(((kt < 0) | (kt > sizes)).any()):
        if bool((sizes < 0).any()):
            raise ValueError("offsets must be non-decreasing")
        bad = int(((kt < 0) | (kt > sizes)).nonzero()[0])
        raise ValueError(
            f"segment {bad}: k={int(kt[bad])} must lie within [0, d_l={int(sizes[bad])}] (the segment size)"
        )
    total = int(kt.sum()) if L else 0
    if total == 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    if _want_ext(use_ext, _c_ok(flat), "topk_indices_layerwise"):
        lib = _Lib.lib
        out = torch.empty(total, dtype=torch.long)
        with _Lib.lock:  # opos = None: the kernel takes the output positions from the prefix sums of ks
            rc = lib.gs_topk_segments(
                _Lib.ws, flat.data_ptr(), off.data_ptr(), kt.data_ptr(), None, L, out.data_ptr(), _nthreads()
            )
        if rc != 0:
            raise MemoryError("topk_indices_layerwise: the compiled kernel ran out of memory")
        return out
    return _layerwise_torch(flat, off, kt, sizes)


def _layerwise_big(flat: torch.Tensor, lo: list[int], hi: list[int], ks: list[int]) -> torch.Tensor:
    """Exact top-``ks[j]`` of each of the large segments ``[lo[j], hi[j])`` (ascending, disjoint),
    as ascending global indices: the single-vector algorithm run on all of them at once (one
    batched sample, one chunked pass with per-segment thresholds, one batched selection)."""
    dev = flat.device
    it, bits, nankey = _KEYINFO[flat.dtype]
    L = len(lo)
    n = [h - l_ for l_, h in zip(lo, hi)]
    tot = sum(n)
    # sample: m keys per segment (about 8 * _SAMPLE_M in all), one in each of m equal strata
    m = max(1, min(_SAMPLE_M, min(n) // 8, max(1024, 8 * _SAMPLE_M // L)))
    r = []
    for kj, nj in zip(ks, n):
        mu = kj * m / nj
        # 3 rather than 4 standard deviations: a segment whose threshold turns out too high
        # is redone on its own, which costs much less than a pass over everything
        r.append(min(m - 1, int(_RANK_SCALE[0] * (mu + 3.0 * math.sqrt(mu) + 2.0))))
    gen = torch.Generator().manual_seed(_SEED)
    stride = torch.tensor(n).div_(m, rounding_mode="floor").unsqueeze(1)
    spos = torch.randint(1 << 62, (m,), generator=gen).remainder(stride)  # same draws, every row
    spos += torch.arange(m) * stride
    spos += torch.tensor(lo).unsqueeze(1)
    samp = _keys(flat[spos.view(-1).to(dev)]).view(L, m)
    top = torch.topk(samp, max(r) + 1, dim=1).values
    thr = top[torch.arange(L, device=dev), torch.tensor(r, device=dev)].tolist()
    # one pass: runs of adjacent segments share a chunk (per-entry thresholds), long ones are cut
    C = _chunk_len(tot, dev)
    kb = torch.empty(C, dtype=it, device=dev)
    mb = torch.empty(C, dtype=torch.uint8, device=dev)
    xi = flat.view(it)
    acc: tuple[list, list] = ([], [])
    runs: list[tuple[int, int, int, int]] = []  # (start, end, first segment, last segment + 1)
    for j in range(L):
        if n[j] >= C:
            runs += [(s, min(hi[j], s + C), j, j + 1) for s in range(lo[j], hi[j], C)]
        elif runs and runs[-1][1] == lo[j] and hi[j] - runs[-1][0] <= C and runs[-1][3] == j:
            runs[-1] = (runs[-1][0], hi[j], runs[-1][2], j + 1)
        else:
            runs.append((lo[j], hi[j], j, j + 1))
    for s, e, a, b in runs:
        kc = torch.bitwise_and(xi[s:e], bits, out=kb[: e - s])
        t = thr[a] if b - a == 1 else [(lo[j] - s, hi[j] - s, thr[j]) for j in range(a, b)]
        _mask_words(kc, t, mb, s, acc)
    pos = _expand_words(acc, dev)
    key = xi.index_select(0, pos).bitwise_and_(bits).clamp_(max=nankey)
    # candidates are grouped by segment: slice j is [cs[j], cs[j + 1])
    cs = torch.searchsorted(pos, torch.tensor(lo + [hi[-1]], device=dev)).tolist()
    cnt = [cs[j + 1] - cs[j] for j in range(L)]
    T: list[torch.Tensor] = []
    redo: list[int] = []
    for j in range(L):
        if cnt[j] < ks[j]:  # the sample threshold was too high for this segment (rare)
            redo.append(j)
            T.append(torch.full((), nankey + 1, dtype=it, device=dev))  # selects none of them
        else:
            T.append(_kth_largest(key[cs[j] : cs[j + 1]], ks[j]))
    Tc = torch.repeat_interleave(torch.stack(T), torch.tensor(cnt, device=dev), output_size=key.numel())
    sel = key >= Tc
    if int(sel.sum()) != sum(ks[j] for j in range(L) if j not in redo):
        # ties at the threshold of some segments: there the first ones win
        cum = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.cumsum(sel, 0)])
        upto = cum[torch.tensor(cs, device=dev)].tolist()  # upto[j]: #selected before slice j
        for j in range(L):
            if j not in redo and upto[j + 1] - upto[j] != ks[j]:
                sel[cs[j] : cs[j + 1]] = _select_mask(key[cs[j] : cs[j + 1]], T[j], ks[j])
    out = pos[sel]
    if redo:
        extra = [_topk_torch(flat[lo[j] : hi[j]], ks[j])[0] + lo[j] for j in redo]
        out = torch.cat([out] + extra).sort().values
    return out


def _layerwise_torch(flat: torch.Tensor, off: torch.Tensor, kt: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    flat = flat.contiguous()
    dev = flat.device
    parts: list[torch.Tensor] = []
    big = (sizes > _SMALL_N) & (kt > 0)
    bl = big.nonzero().view(-1).tolist()
    if bl:
        lo = off[bl].tolist()
        hi = off[[b + 1 for b in bl]].tolist()
        ks = kt[bl].tolist()
        # alone: a whole segment, or a single large one; together: the others
        alone = [len(bl) == 1 or ks[j] == hi[j] - lo[j] for j in range(len(bl))]
        many = [j for j in range(len(bl)) if not alone[j]]
        for j in range(len(bl)):
            if alone[j]:
                parts.append(_topk_torch(flat[lo[j] : hi[j]], ks[j])[0] + lo[j])
        if many:
            parts.append(_layerwise_big(flat, [lo[j] for j in many], [hi[j] for j in many], [ks[j] for j in many]))
    small = ((~big) & (kt > 0)).nonzero().view(-1)
    if small.numel():
        ssz, sk, soff = sizes[small], kt[small], off[small]
        nseg = small.numel()
        tot = int(ssz.sum())
        seg_of = torch.repeat_interleave(torch.arange(nseg), ssz)
        start_cat = torch.cumsum(ssz, 0) - ssz
        local = torch.arange(tot) - torch.repeat_interleave(start_cat, ssz)
        gidx = (torch.repeat_interleave(soff, ssz) + local).to(dev)
        key = _keys(flat[gidx])
        # key descending, ties by position (stable), then grouped by segment (stable)
        p1 = torch.sort(key, descending=True, stable=True).indices.cpu()
        p2 = torch.sort(seg_of[p1], stable=True).indices
        perm = p1[p2]
        # after grouping, segment s occupies the same block [start_cat[s], +ssz[s]) again
        take = local < torch.repeat_interleave(sk, ssz)
        parts.append(gidx[perm[take].to(dev)])
    if len(parts) == 1 and not small.numel():
        return parts[0]
    return torch.cat(parts).sort().values


def topk_mask_rows(x: torch.Tensor, k: int, *, use_ext: bool | None = None) -> torch.Tensor:
    """Boolean mask ``[n, d]`` of the exact top-``k`` entries (by magnitude) of every row of ``x``.

    Same tie rule (lower column wins) and NaN policy as :func:`topk_indices`.
    """
    _check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [n, d], got shape {tuple(x.shape)}")
    n, d = x.shape
    k = _check_k(k, d, " (row length)")
    if k == 0 or n == 0:
        return torch.zeros(n, d, dtype=torch.bool, device=x.device)
    if k == d:
        return torch.ones(n, d, dtype=torch.bool, device=x.device)
    xc = x.contiguous()
    if _want_ext(use_ext, _c_ok(xc), "topk_mask_rows"):
        offs = torch.arange(0, n * d + 1, d, dtype=torch.long)
        idx = topk_indices_layerwise(xc.view(-1), offs, torch.full((n,), k, dtype=torch.long), use_ext=True)
        mask = torch.zeros(n * d, dtype=torch.bool)
        mask[idx] = True
        return mask.view(n, d)
    key = _keys(xc)
    T = torch.topk(key, k, dim=1).values[:, k - 1 : k]  # k-th largest key of every row
    gt = key > T
    need = k - gt.sum(dim=1, keepdim=True)
    eq = key == T
    return gt | (eq & (torch.cumsum(eq, dim=1) <= need))


# ---------------------------------------------------------------------------------------------
# error feedback


class EFStep:
    """Error-feedback steps with reusable work buffers (no O(d) allocation after warm-up).

    ``hard_threshold_ef_(e, g, lam, alpha)``::

        a = e + alpha * g          (in place in e, as e.add_(g, alpha=alpha))
        S = {i : |a_i| >= lam}     (lam rounded to e's dtype, like torch's comparison)
        e = a with e[S] = 0        -> returns (S ascending, a[S])

    ``topk_ef_(e, g, k, alpha)``: the same with ``S`` = exact top-``k`` of ``|a|`` (lower index
    wins ties, NaN largest). The sent coordinates are set to exactly ``+0.0`` in ``e`` (this is
    ``a - s`` for every finite entry).

    ``e`` must be a contiguous floating tensor (any shape; indices are flat) and ``g`` a tensor
    of the same shape and dtype. The compiled path (float32, CPU) makes one fused pass that reads
    ``g`` and ``e`` and writes ``e``; its candidate buffers live in a C workspace owned by this
    object and grow only when a step needs more room than any earlier one. The torch path makes
    the update chunk by chunk inside its single pass (when that rounds like one ``add_``, see
    ``_add_in_chunks``) and keeps scratch tensors of one chunk (on CPU; of ``e``'s size on other
    devices) keyed by name and dtype. The returned tensors are freshly allocated (O(k)) and owned
    by the caller.

    An instance is not meant to be shared by threads running concurrently (calls are serialised
    by a lock). Pickling keeps the configuration and drops the buffers.
    """

    def __init__(self, *, use_ext: bool | None = None) -> None:
        self.use_ext = use_ext
        self._ws: int | None = None
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    # -- checkpointing: buffers are scratch, not state
    def __getstate__(self) -> dict:
        return {"use_ext": self.use_ext}

    def __setstate__(self, state: dict) -> None:
        self.__init__(use_ext=state.get("use_ext"))

    def __del__(self) -> None:
        ws, self._ws = getattr(self, "_ws", None), None
        if ws is not None and _Lib.lib is not None:
            _Lib.lib.gs_ws_free(ws)

    def _c_ws(self) -> int:
        if self._ws is None:
            self._ws = _Lib.lib.gs_ws_new()
            if not self._ws:
                raise MemoryError("EFStep: cannot allocate the C workspace")
        return self._ws

    def _buf(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        b = self._bufs.get(key)
        if b is None or b.numel() != n:
            b = torch.empty(n, dtype=dtype, device=device)
            self._bufs[key] = b
        return b

    def workspace_info(self) -> dict:
        """Allocation counters, to check that warm steps allocate nothing of size O(d).

        ``c_allocs``/``c_bytes``: (re)allocations made so far and bytes held by the C workspace;
        ``buffers``: ``{name: (data_ptr, numel)}`` of the torch scratch tensors.
        """
        info: dict = {"c_allocs": 0, "c_bytes": 0}
        if self._ws is not None:
            st = (ctypes.c_int64 * 2)()
            _Lib.lib.gs_ws_stats(self._ws, ctypes.addressof(st))
            info["c_allocs"], info["c_bytes"] = int(st[0]), int(st[1])
        info["buffers"] = {k[0]: (b.data_ptr(), b.numel()) for k, b in self._bufs.items()}
        return info

    @staticmethod
    def _check(e: torch.Tensor, g: torch.Tensor) -> None:
        _check_float(e, "e")
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"g must be a torch.Tensor, got {type(g).__name__}")
        if g.shape != e.shape:
            raise ValueError(f"e and g must have the same shape, got {tuple(e.shape)} and {tuple(g.shape)}")
        if g.dtype != e.dtype or g.device != e.device:
            raise ValueError(f"e and g must share dtype and device, got {e.dtype}/{e.device} and {g.dtype}/{g.device}")
        if not e.is_contiguous():
            raise ValueError("e must be contiguous (it is updated in place)")

    def _use_c(self, e: torch.Tensor, g: torch.Tensor, what: str) -> bool:
        ok = _c_ok(e) and g.dtype == torch.float32 and g.device.type == "cpu"
        use = _want_ext(self.use_ext, ok, what)
        if use and not _Lib.ef_exact:
            if self.use_ext is True:
                raise RuntimeError(f"{what}: the compiled update does not round like torch's add_ here")
            return False
        return use

    def hard_threshold_ef_(
        self, e: torch.Tensor, g: torch.Tensor, lam: float, alpha: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: a = e + alpha*g; send entries with |a| >= lam; e = a with those zeroed."""
        self._check(e, g)
        lam, alpha = float(lam), float(alpha)
        n = e.numel()
        flat = e.view(-1)
        with self._lock:
            if self._use_c(e, g, "hard_threshold_ef_"):
                lib = _Lib.lib
                ws = self._c_ws()
                gc = g.contiguous()
                cnt = lib.gs_ht_pass(ws, flat.data_ptr(), gc.data_ptr(), alpha, lam, n, _nthreads())
                if cnt < 0:
                    raise MemoryError("hard_threshold_ef_: the compiled kernel ran out of memory")
                idx = torch.empty(cnt, dtype=torch.long)
                val = torch.empty(cnt, dtype=torch.float32)
                lib.gs_ht_gather(ws, idx.data_ptr(), val.data_ptr())
                return idx, val
            # chunk by chunk: a = e + alpha*g, |a| to a small scratch, the mask |a| >= lam
            # scanned as 8-byte words (see _filter_keys)
            gf = g.reshape(-1)
            dev = e.device
            fused = _add_in_chunks(e)
            if not fused:
                flat.add_(gf, alpha=alpha)
            C = _chunk_len(n, dev)
            ab = self._buf("abs", C, e.dtype, dev)
            mb = self._buf("mask", C, torch.uint8, dev)
            acc: tuple[list, list] = ([], [])
            for s in range(0, n, C):
                t = min(n, s + C)
                a = flat[s:t].add_(gf[s:t], alpha=alpha) if fused else flat[s:t]
                _mask_words(torch.abs(a, out=ab[: t - s]), lam, mb, s, acc)
            idx = _expand_words(acc, dev)
            val = flat.index_select(0, idx)
            flat.index_fill_(0, idx, 0)
            return idx, val

    def topk_ef_(
        self, e: torch.Tensor, g: torch.Tensor, k: int, alpha: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: a = e + alpha*g; send the exact top-k of |a|; e = a - s (sent entries +0.0)."""
        self._check(e, g)
        n = e.numel()
        k = _check_k(k, n)
        alpha = float(alpha)
        flat = e.view(-1)
        with self._lock:
            if self._use_c(e, g, "topk_ef_"):
                lib = _Lib.lib
                ws = self._c_ws()
                gc = g.contiguous()
                idx = torch.empty(k, dtype=torch.long)
                val = torch.empty(k, dtype=torch.float32)
                rc = lib.gs_topk_ef(ws, flat.data_ptr(), gc.data_ptr(), alpha, n, k, idx.data_ptr(), val.data_ptr(), _nthreads())
                if rc != 0:
                    raise MemoryError("topk_ef_: the compiled kernel ran out of memory")
                return idx, val
            dev = e.device
            scratch = lambda name, size, dt: self._buf(name, size, dt, dev)  # noqa: E731
            if _add_in_chunks(e):
                idx, val = _topk_torch(flat, k, scratch, (g.reshape(-1), alpha))
            else:
                idx, val = _topk_torch(flat.add_(g.reshape(-1), alpha=alpha), k, scratch)
            if val is None:
                val = flat.index_select(0, idx)
            flat.index_fill_(0, idx, 0)
            return idx, val


def hard_threshold_ef_(e: torch.Tensor, g: torch.Tensor, lam: float, alpha: float = 1.0, *, use_ext: bool | None = None):
    """One-off :meth:`EFStep.hard_threshold_ef_` (allocates its buffers; keep an EFStep in loops)."""
    return EFStep(use_ext=use_ext).hard_threshold_ef_(e, g, lam, alpha)


def topk_ef_(e: torch.Tensor, g: torch.Tensor, k: int, alpha: float = 1.0, *, use_ext: bool | None = None):
    """One-off :meth:`EFStep.topk_ef_` (allocates its buffers; keep an EFStep in loops)."""
    return EFStep(use_ext=use_ext).topk_ef_(e, g, k, alpha)


# ---------------------------------------------------------------------------------------------
# approximate thresholds


def sampled_threshold(
    x: torch.Tensor, k: int, sample_frac: float = 0.01, generator: torch.Generator | None = None
) -> float:
    """Threshold estimated from a random sample (deep gradient compression style).

    Draws ``m = ceil(sample_frac * d)`` positions uniformly with replacement and returns the
    ``ceil(k * m / d)``-th largest magnitude among them, so that about ``k`` entries of ``x``
    satisfy ``|x_i| >= thr``. ``generator`` defaults to a fresh one seeded with 0.
    """
    _check_float(x, "x")
    flat = x.reshape(-1)
    d = flat.numel()
    k = _check_k(k, d)
    if not 0.0 < sample_frac <= 1.0:
        raise ValueError(f"sample_frac must lie in (0, 1], got {sample_frac}")
    if d == 0 or k == 0:
        return math.inf
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    m = min(d, max(1, math.ceil(sample_frac * d)))
    pos = torch.randint(d, (m,), generator=generator).to(flat.device)
    s = flat[pos].abs().float()
    r = min(m, max(1, math.ceil(k * m / d)))
    return float(torch.topk(s, r).values[-1])


_FITS = ("gaussian", "exponential", "laplace", "lognormal", "gamma")


def fitted_threshold(x: torch.Tensor, k: int, dist: str = "gaussian") -> float:
    """Threshold from a distribution fitted to ``x`` by moments, its tail inverted at ``k/d``.

    - ``"gaussian"``: ``x ~ N(mean, std^2)``; solves ``P(|x| >= t) = k/d`` (two-sided tail, by
      bisection).
    - ``"exponential"`` (alias ``"laplace"``): ``|x| ~ Exp`` with mean ``mean|x|``:
      ``t = mean|x| * ln(d/k)``.
    - ``"lognormal"``: ``log|x|`` over the nonzero entries ``~ N(mu, s^2)``:
      ``t = exp(mu + s * Phi^{-1}(1 - k/nnz))``.
    - ``"gamma"``: ``|x| ~ Gamma`` with shape ``mean^2/var`` and scale ``var/mean`` of ``|x|``.
    """
    _check_float(x, "x")
    flat = x.reshape(-1)
    d = flat.numel()
    k = _check_k(k, d)
    if dist not in _FITS:
        raise ValueError(f"dist must be one of {_FITS}, got {dist!r}")
    if d == 0 or k == 0:
        return math.inf
    if k == d:
        return 0.0
    p = k / d
    a = flat.abs().double()
    if dist == "gaussian":
        mu = float(flat.double().mean())
        sd = float(flat.double().std()) if d > 1 else 0.0
        if sd == 0.0:
            return abs(mu)

        def tail(t: float) -> float:
            return 0.5 * math.erfc((t - mu) / (sd * math.sqrt(2))) + 0.5 * math.erfc((t + mu) / (sd * math.sqrt(2)))

        lo, hi = 0.0, abs(mu) + sd
        while tail(hi) > p:
            hi *= 2.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if tail(mid) > p:
                lo = mid
            else:
                hi = mid
        return hi
    if dist in ("exponential", "laplace"):
        return float(a.mean()) * math.log(d / k)
    if dist == "lognormal":
        nz = a[a > 0]
        if nz.numel() <= k:
            return 0.0
        la = nz.log()
        mu, s = float(la.mean()), float(la.std()) if nz.numel() > 1 else 0.0
        return math.exp(mu + s * statistics.NormalDist().inv_cdf(1.0 - k / nz.numel()))
    # gamma
    from scipy.special import gammainccinv

    mean, var = float(a.mean()), float(a.var())
    if mean <= 0.0 or var <= 0.0:
        return mean
    shape, scale = mean * mean / var, var / mean
    return float(scale * gammainccinv(shape, p))


def make_test_vector(dist: str, d: int, generator: torch.Generator) -> torch.Tensor:
    """Random float32 vectors for threshold studies: ``gaussian``, ``laplace``, ``student_t2``
    (Student-t, 2 degrees of freedom), ``lognormal`` (random sign times exp(N(0,1)))."""
    if dist == "gaussian":
        return torch.randn(d, generator=generator)
    sign = torch.randint(0, 2, (d,), generator=generator).float().mul_(2).sub_(1)
    if dist == "laplace":
        return torch.empty(d).exponential_(generator=generator).mul_(sign)
    if dist == "student_t2":
        z = torch.randn(d, generator=generator)
        return z.div_(torch.empty(d).exponential_(generator=generator).sqrt_())  # chi2_2 / 2 = Exp(1)
    if dist == "lognormal":
        return torch.randn(d, generator=generator).exp_().mul_(sign)
    raise ValueError(f"unknown dist {dist!r}; use gaussian, laplace, student_t2 or lognormal")


def _method_fn(method: str | Callable, sample_frac: float) -> Callable[[torch.Tensor, int, torch.Generator], float]:
    if callable(method):
        return method
    if method == "sampled":
        return lambda x, k, gen: sampled_threshold(x, k, sample_frac, gen)
    if method.startswith("fitted:"):
        dist = method.split(":", 1)[1]
        if dist not in _FITS:
            raise ValueError(f"unknown fit {dist!r}; use one of {_FITS}")
        return lambda x, k, gen: fitted_threshold(x, k, dist)
    raise ValueError(f"unknown method {method!r}; use 'sampled' or 'fitted:<dist>' or a callable")


def threshold_count_ratios(
    method: str | Callable,
    dist: str,
    d: int,
    k: int,
    trials: int = 20,
    seed: int = 0,
    sample_frac: float = 0.01,
) -> torch.Tensor:
    """Ratios ``|{i: |x_i| >= thr}| / k`` over ``trials`` random vectors of :func:`make_test_vector`.

    ``method``: ``"sampled"``, ``"fitted:<dist>"`` (see :func:`fitted_threshold`) or a callable
    ``(x, k, generator) -> thr``.
    """
    fn = _method_fn(method, sample_frac)
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(trials, dtype=torch.float64)
    for t in range(trials):
        x = make_test_vector(dist, d, gen)
        thr = fn(x, k, gen)
        out[t] = int((x.abs() >= thr).sum()) / k
    return out


def threshold_hit_rate(
    method: str | Callable,
    dist: str,
    d: int,
    k: int,
    trials: int = 20,
    seed: int = 0,
    band: tuple[float, float] = (0.7, 1.3),
    sample_frac: float = 0.01,
) -> float:
    """Fraction of ``trials`` in which the count selected by the threshold lies in
    ``[band[0] * k, band[1] * k]`` (see :func:`threshold_count_ratios`)."""
    r = threshold_count_ratios(method, dist, d, k, trials, seed, sample_frac)
    return float(((r >= band[0]) & (r <= band[1])).double().mean())
