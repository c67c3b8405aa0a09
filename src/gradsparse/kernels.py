"""Exact top-k by magnitude and the fused error-feedback pass: the one implementation of both.

Every exact selection in gradsparse goes through this module, and every function here follows
one tie rule.

Tie rule
--------
Entries are ranked by magnitude ``|x_i|``, largest first. **NaN ranks above +inf** (a NaN of
any sign or payload; all NaNs tie with each other). **Among equal magnitudes, and among NaNs,
the lower index wins.** ``+0.0`` and ``-0.0`` have equal magnitude, and so do ``+inf`` and
``-inf``. The top-``k`` set is therefore exactly the first ``k`` positions of a stable
descending sort of ``|x|`` with every NaN moved to the front (in index order). Nothing is raised
for NaNs and no extra pass is spent looking for them.

Public API
----------
``topk_indices(x, k) -> LongTensor[k]``
    exact top-``k`` of a tensor (flattened row-major), flat indices in ascending order.
``topk_indices_layerwise(flat, offsets, ks) -> LongTensor[sum(ks)]``
    exact top-``ks[l]`` of each segment ``flat[offsets[l]:offsets[l+1]]``, global indices in
    ascending order.
``topk_indices_rows(x, k) -> LongTensor[n, k]``
    exact top-``k`` of every row of a 2-D ``x``, column indices, ascending within each row.
``accumulate_topk_(e, g, alpha, k) -> (indices, values)``
    in place ``a = e + alpha * g`` (``e`` already holds ``a`` when ``g`` is None), select the
    exact top-``k`` of ``|a|``, return their ascending flat indices and ``a``'s values there,
    and set ``e`` there to ``+0.0`` (so ``e`` becomes ``a - C(a)``).
``accumulate_threshold_(e, g, alpha, threshold) -> (indices, values)``
    the same with the selection ``{i : |a_i| >= threshold}`` (``threshold`` rounded to ``e``'s
    dtype, as torch's comparison does). **A NaN never passes the test** (every comparison with
    NaN is false) and stays in ``e``.
``sampled_threshold(x, k, sample_fraction=0.01, generator=None) -> float``
    an approximate threshold for about ``k`` entries, from a uniform sample (for approximate
    top-k compressors).
``has_extension()``, ``extension_path()``
    whether (and from where) the compiled kernels are used.

All selection functions accept any floating dtype (float16, bfloat16, float32, float64) on any
device and return int64 indices on the input's device; ``k`` may be 0 or the full length, and
``k`` outside ``[0, d]`` raises :class:`ValueError`. They take a keyword ``use_ext`` (default
None: automatic; False: the pure-torch path; True: demand the compiled path, raising
:class:`RuntimeError` when it cannot be used).

Paths
-----
A small C library (``gradsparse/_kernels.c``, built as the optional extension
``gradsparse._kernels_c`` by ``pip install -e .`` when a C compiler is present) implements the
contiguous float32 CPU case with one fused pass over the data (see the file's header for the
algorithm: sample a threshold with a fixed-seed generator, filter candidates in one pass, select
exactly among them). It is loaded with :mod:`ctypes`. Everything else -- other dtypes and
devices, a missing library, ``GRADSPARSE_NO_EXT=1`` in the environment, ``use_ext=False`` --
takes the pure-torch path. Both paths return identical results.

The pure-torch path (what CUDA tensors get) follows the same plan with device-agnostic torch
ops: a threshold key from a stratified sample, then one pass in chunks (on CPU ~1M entries, so
that the scratch stays in cache; elsewhere the whole vector) that writes integer keys and a 0/1
byte mask to small reused buffers and keeps only the 8-byte words of the mask that hold a
candidate (``nonzero`` over words is 8 times cheaper than over entries), then an exact selection
among the candidates (for many of them a histogram of the keys' top bits first, so that only one
bucket is ranked; ties to the lowest index). A pass that finds fewer than k candidates is redone
with a lower threshold. Segments (and rows) shorter than the sampling cutoff are selected in
batches: padded to a common width per power-of-two size class, one ``torch.topk`` per class.
Many large segments share one sample, one pass and one selection.

Error feedback and work buffers
-------------------------------
``a = e + alpha * g`` is computed exactly as ``e.add_(g, alpha=alpha)`` does on this torch (a
fused multiply-add, single rounding, with ``alpha`` rounded to the tensor's dtype); the compiled
path checks this agreement when it loads and otherwise leaves the updates with ``g`` to torch.
The work buffers live in **per-thread caches** (:class:`threading.local`): each thread gets its
own C workspace (candidate lists that grow only when a call needs more room than any earlier
one, freed when the thread ends) and its own torch scratch tensors (grow-only, keyed by name,
dtype and device; on CPU one chunk long, elsewhere as long as the largest input seen). So after
the first call of a given size a call allocates only its O(k) outputs (and O(k) temporaries),
and threads never share buffers. The returned tensors are freshly allocated and owned by the
caller.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import math
import operator
import os
import threading
from typing import Sequence

import torch

__all__ = [
    "topk_indices",
    "topk_indices_layerwise",
    "topk_indices_rows",
    "accumulate_topk_",
    "accumulate_threshold_",
    "sampled_threshold",
    "has_extension",
    "extension_path",
]

_SEED = 0x5EED  # fixed sampling seed: results never depend on it, only the running time does
_SMALL_N = 65536  # pure-torch path: below this, select directly without sampling
_SAMPLE_M = 32768
_CHUNK = 1 << 20  # pure-torch path on CPU: elements per pass chunk (scratch stays in cache)
_RANK_SCALE = [1.0]  # testing hook, see _set_rank_scale
_ABI = 3  # gs_abi_version() of the C library this module drives

# ---------------------------------------------------------------------------------------------
# loading the optional compiled library


class _Lib:
    lib: ctypes.CDLL | None = None
    path: str | None = None
    error: str | None = None
    ef_exact: bool = False
    loaded: bool = False


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
        if lib.gs_abi_version() != _ABI:  # 3: gs_topk_ef / gs_ht_pass accept g = NULL
            raise OSError(f"ABI version {lib.gs_abi_version()}, expected {_ABI} (rebuild: pip install -e .)")
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
    lib.gs_set_rank_scale.argtypes = [ctypes.c_double]
    lib.gs_set_rank_scale.restype = None
    lib.gs_set_fma.argtypes = [i32]
    lib.gs_set_fma.restype = None
    lib.gs_get_fma.argtypes = []
    lib.gs_get_fma.restype = i32
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
# per-thread work buffers


class _CWorkspace:
    """Owns one C workspace (freed with the object, i.e. when its thread's cache goes away)."""

    def __init__(self) -> None:
        self.ptr = _Lib.lib.gs_ws_new()
        if not self.ptr:
            raise MemoryError("cannot allocate the C workspace")
        self._free = _Lib.lib.gs_ws_free

    def __del__(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            self._free(ptr)


class _Cache(threading.local):
    def __init__(self) -> None:
        self.ws: _CWorkspace | None = None
        self.bufs: dict[tuple, torch.Tensor] = {}


_CACHE = _Cache()


def _ws() -> int:
    """This thread's C workspace (created on first use)."""
    c = _CACHE
    if c.ws is None:
        c.ws = _CWorkspace()
    return c.ws.ptr


def _scratch(name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A work tensor of at least ``n`` entries from this thread's cache (grow-only), sliced to n."""
    key = (name, dtype, torch.device(device))
    bufs = _CACHE.bufs
    b = bufs.get(key)
    if b is None or b.numel() < n:
        b = torch.empty(n, dtype=dtype, device=device)
        bufs[key] = b
    return b[:n]


def _workspace_info() -> dict:
    """Testing hook: this thread's buffer counters, to check that warm calls allocate nothing
    of size O(d). ``c_allocs``/``c_bytes``: (re)allocations so far and bytes held by the C
    workspace; ``buffers``: ``{(name, dtype, device): (data_ptr, numel)}`` of the torch scratch."""
    info: dict = {"c_allocs": 0, "c_bytes": 0}
    if _CACHE.ws is not None:
        st = (ctypes.c_int64 * 2)()
        _Lib.lib.gs_ws_stats(_CACHE.ws.ptr, ctypes.addressof(st))
        info["c_allocs"], info["c_bytes"] = int(st[0]), int(st[1])
    info["buffers"] = {k: (b.data_ptr(), b.numel()) for k, b in _CACHE.bufs.items()}
    return info


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
    return lambda name, n, dtype: _scratch(name, n, dtype, device)


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
    dtype)`` supplies work buffers (default: this thread's cached ones). ``add = (g, alpha)``: first
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

    ``x`` is any floating tensor (flattened row-major). Tie rule of the module: NaN above +inf,
    the lower index wins among equal magnitudes. ``k = 0`` gives an empty tensor, ``k = d`` every
    index; ``k > d`` or ``k < 0`` raise :class:`ValueError`.

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
        out = torch.empty(k, dtype=torch.long)
        rc = _Lib.lib.gs_topk(_ws(), flat.data_ptr(), n, k, out.data_ptr(), _nthreads())
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
    within each segment. ``x_flat`` may have any floating dtype. Small segments are handled in
    bulk (in C: spread over threads; in torch: one padded ``torch.topk`` per power-of-two size
    class), never one Python call per segment.
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
        # opos = None: the kernel takes the output positions from the prefix sums of ks
        rc = lib.gs_topk_segments(_ws(), flat.data_ptr(), off.data_ptr(), kt.data_ptr(), None, L, out.data_ptr(), _nthreads())
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
    kb = _scratch("key", C, it, dev)
    mb = _scratch("mask", C, torch.uint8, dev)
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
        parts += _layerwise_small(flat, off[small], sizes[small], kt[small])
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts).sort().values


def _layerwise_small(flat: torch.Tensor, soff: torch.Tensor, ssz: torch.Tensor, sk: torch.Tensor) -> list[torch.Tensor]:
    """Exact top-``sk[j]`` of the segments ``[soff[j], soff[j] + ssz[j])`` (each at most
    ``_SMALL_N`` long, ``0 < sk[j] <= ssz[j]``, CPU index tensors), as a list of tensors of
    ascending global indices (one per size class).

    The segments of one size class ``(2^(c-1), 2^c]`` are laid out as the rows of a matrix padded
    to the class's longest segment (pad key -1, below every real key; adjacent equal-length
    segments are a view, not a copy), and one ``torch.topk`` of ``k + 1`` keys per row ranks
    them. A row whose k-th and (k+1)-th keys differ has a unique top-k set: topk's indices are
    it. The other rows (a tie at the k-th key) take their keys ``> T`` plus their first
    ``k - #(> T)`` keys ``== T``, ``T`` the k-th key. Keys are integers, so NaNs (one key above
    +inf's) tie like any other value."""
    dev = flat.device
    cls = torch.ceil(torch.log2(ssz.double())).long()
    out: list[torch.Tensor] = []
    for c in torch.unique(cls).tolist():
        rows = (cls == c).nonzero().view(-1)
        o, sz, k = soff[rows], ssz[rows], sk[rows]
        nr = rows.numel()
        w = int(sz.max())
        uniform = bool((sz == w).all()) and (nr == 1 or bool((o[1:] - o[:-1] == w).all()))
        if uniform:  # rows of one contiguous block
            o0 = int(o[0])
            key = _keys(flat[o0 : o0 + nr * w]).view(nr, w)
        else:
            col = torch.arange(w)
            pos = (o.unsqueeze(1) + col).clamp_(max=flat.numel() - 1)
            key = _keys(flat[pos.view(-1).to(dev)]).view(nr, w)
            key.masked_fill_((col >= sz.unsqueeze(1)).to(dev), -1)
        kmax = int(k.max())
        kk = min(kmax + 1, w)
        vals, ids = torch.topk(key, kk, dim=1)  # descending
        kd = k.to(dev).unsqueeze(1)
        T = vals.gather(1, kd - 1)
        nxt = vals.gather(1, kd.clamp(max=kk - 1)).masked_fill_(kd >= kk, -1)  # k = w: no (k+1)-th
        tied = (T == nxt).view(-1)
        od = o.to(dev)
        parts: list[torch.Tensor] = []
        if not bool(tied.all()):
            u = (~tied).nonzero().view(-1)
            cu = ids[u, :kmax].masked_fill_(torch.arange(kmax, device=dev) >= kd[u], w).sort(dim=1).values
            valid = cu < w
            parts.append((od[u].unsqueeze(1) + cu)[valid])
        if bool(tied.any()):
            t = tied.nonzero().view(-1)
            kt, Tt = key[t], T[t]
            sel = kt > Tt
            need = kd[t] - (vals[t] > Tt).sum(dim=1, keepdim=True)  # every key > T is among the top kk
            eq = kt == Tt
            sel |= eq & (torch.cumsum(eq, dim=1) <= need)
            r, cc = sel.nonzero().unbind(1)
            parts.append(od[t][r] + cc)
        out.append(parts[0] if len(parts) == 1 else torch.cat(parts).sort().values)
    return out


def topk_indices_rows(x: torch.Tensor, k: int, *, use_ext: bool | None = None) -> torch.Tensor:
    """Exact top-``k`` of every row of a 2-D ``x`` ``[n, d]``: column indices ``[n, k]`` (int64),
    ascending within each row.

    Tie rule of the module within each row (NaN above +inf, lower column first). ``x`` is any
    floating dtype on any device (the compiled path takes contiguous float32 CPU input; a
    non-contiguous ``x`` is copied once). ``k`` may be 0 (``[n, 0]``) or ``d`` (every column);
    ``k`` outside ``[0, d]`` raises :class:`ValueError`. The rows are selected together (one
    layer-wise call over the row segments), never one Python call per row.
    """
    _check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [n, d], got shape {tuple(x.shape)}")
    n, d = x.shape
    k = _check_k(k, d, " (row length)")
    if k == 0 or n == 0:
        return torch.empty(n, k, dtype=torch.long, device=x.device)
    if k == d:
        return torch.arange(d, device=x.device).expand(n, d).contiguous()
    xc = x.contiguous().view(-1)
    offs = torch.arange(0, n * d + 1, d, dtype=torch.long)
    ks = torch.full((n,), k, dtype=torch.long)
    if _want_ext(use_ext, _c_ok(xc), "topk_indices_rows"):
        flat = torch.empty(n * k, dtype=torch.long)
        rc = _Lib.lib.gs_topk_segments(_ws(), xc.data_ptr(), offs.data_ptr(), ks.data_ptr(), None, n, flat.data_ptr(), _nthreads())
        if rc != 0:
            raise MemoryError("topk_indices_rows: the compiled kernel ran out of memory")
    else:
        flat = _layerwise_torch(xc, offs, ks, torch.full((n,), d, dtype=torch.long))
    out = flat.view(n, k)
    return out.sub_(offs[:-1].to(out.device).unsqueeze(1))


# ---------------------------------------------------------------------------------------------
# the fused error-feedback pass


def _check_ef(e: torch.Tensor, g: torch.Tensor | None, what: str) -> torch.Tensor | None:
    """Validate ``e`` (contiguous floating, updated in place) and ``g`` (None, or as many entries
    of the same dtype and device); returns ``g`` flat and contiguous."""
    _check_float(e, "e")
    if not e.is_contiguous():
        raise ValueError(f"{what}: e must be contiguous (it is updated in place)")
    if g is None:
        return None
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{what}: g must be a torch.Tensor or None, got {type(g).__name__}")
    if g.numel() != e.numel():
        raise ValueError(f"{what}: e and g must have the same number of entries (same shape), got {tuple(e.shape)} and {tuple(g.shape)}")
    if g.dtype != e.dtype or g.device != e.device:
        raise ValueError(f"{what}: e and g must share dtype and device, got {e.dtype}/{e.device} and {g.dtype}/{g.device}")
    return g.reshape(-1).contiguous()


def _use_c_ef(e: torch.Tensor, g: torch.Tensor | None, use_ext: bool | None, what: str) -> bool:
    use = _want_ext(use_ext, _c_ok(e), what)
    if use and g is not None and not _Lib.ef_exact:
        if use_ext is True:
            raise RuntimeError(f"{what}: the compiled update does not round like torch's add_ here")
        return False
    return use


def accumulate_topk_(
    e: torch.Tensor, g: torch.Tensor | None, alpha: float, k: int, *, use_ext: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One error-feedback step with exact top-k, in place in ``e``::

        a = e + alpha * g          (as e.add_(g, alpha=alpha); skipped when g is None)
        S = exact top-k of |a|     (the module's tie rule: NaN first, lower index wins)
        e = a with e[S] = +0.0     -> returns (S ascending int64 [k], a[S] [k], e's dtype)

    ``e`` is any contiguous floating tensor (indices are flat), ``g`` None or a tensor with as
    many entries and the same dtype and device. Bit for bit the same as ``e.add_(g,
    alpha=alpha)`` followed by :func:`topk_indices` and the gather and zeroing, on either path.
    The compiled path (float32 CPU) makes one fused pass that reads ``g`` and ``e`` and writes
    ``e``; the torch path fuses the update into its chunked pass when that rounds like one
    ``add_``. Work buffers: the per-thread caches (see the module docstring).
    """
    g = _check_ef(e, g, "accumulate_topk_")
    n = e.numel()
    k = _check_k(k, n)
    alpha = float(alpha)
    flat = e.view(-1)
    if _use_c_ef(e, g, use_ext, "accumulate_topk_"):
        idx = torch.empty(k, dtype=torch.long)
        val = torch.empty(k, dtype=torch.float32)
        gp = None if g is None else g.data_ptr()
        rc = _Lib.lib.gs_topk_ef(_ws(), flat.data_ptr(), gp, alpha, n, k, idx.data_ptr(), val.data_ptr(), _nthreads())
        if rc != 0:
            raise MemoryError("accumulate_topk_: the compiled kernel ran out of memory")
        return idx, val
    add = None
    if g is not None:
        if _add_in_chunks(e):
            add = (g, alpha)
        else:
            flat.add_(g, alpha=alpha)
    idx, val = _topk_torch(flat, k, None, add)
    if val is None:
        val = flat.index_select(0, idx)
    flat.index_fill_(0, idx, 0)
    return idx, val


def accumulate_threshold_(
    e: torch.Tensor, g: torch.Tensor | None, alpha: float, threshold: float, *, use_ext: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One error-feedback step with a hard threshold, in place in ``e``::

        a = e + alpha * g               (as e.add_(g, alpha=alpha); skipped when g is None)
        S = {i : |a_i| >= threshold}    (threshold rounded to e's dtype, like torch's comparison)
        e = a with e[S] = +0.0          -> returns (S ascending int64, a[S] in e's dtype)

    **NaN is never selected**: ``|NaN| >= threshold`` is false, so a NaN stays in ``e`` (and a
    NaN threshold selects nothing); ``threshold <= 0`` selects every other entry. Same inputs,
    bit-identity guarantee and buffers as :func:`accumulate_topk_`.
    """
    g = _check_ef(e, g, "accumulate_threshold_")
    lam, alpha = float(threshold), float(alpha)
    n = e.numel()
    flat = e.view(-1)
    if _use_c_ef(e, g, use_ext, "accumulate_threshold_"):
        lib = _Lib.lib
        ws = _ws()
        gp = None if g is None else g.data_ptr()
        cnt = lib.gs_ht_pass(ws, flat.data_ptr(), gp, alpha, lam, n, _nthreads())
        if cnt < 0:
            raise MemoryError("accumulate_threshold_: the compiled kernel ran out of memory")
        idx = torch.empty(cnt, dtype=torch.long)
        val = torch.empty(cnt, dtype=torch.float32)
        lib.gs_ht_gather(ws, idx.data_ptr(), val.data_ptr())
        return idx, val
    # chunk by chunk: a = e + alpha*g, |a| to a small scratch, the mask |a| >= lam scanned as
    # 8-byte words (see _mask_words)
    dev = e.device
    fused = g is not None and _add_in_chunks(e)
    if g is not None and not fused:
        flat.add_(g, alpha=alpha)
    C = _chunk_len(n, dev)
    ab = _scratch("abs", C, e.dtype, dev)
    mb = _scratch("mask", C, torch.uint8, dev)
    acc: tuple[list, list] = ([], [])
    for s in range(0, n, C):
        t = min(n, s + C)
        a = flat[s:t].add_(g[s:t], alpha=alpha) if fused else flat[s:t]
        _mask_words(torch.abs(a, out=ab[: t - s]), lam, mb, s, acc)
    idx = _expand_words(acc, dev)
    val = flat.index_select(0, idx)
    flat.index_fill_(0, idx, 0)
    return idx, val


# ---------------------------------------------------------------------------------------------
# approximate threshold


def sampled_threshold(
    x: torch.Tensor, k: int, sample_fraction: float = 0.01, generator: torch.Generator | None = None
) -> float:
    """A threshold ``thr`` such that about ``k`` entries of ``x`` have ``|x_i| >= thr``.

    Estimator (deep-gradient-compression style): draw ``m = ceil(sample_fraction * d)``
    positions uniformly with replacement (``torch.randint`` on the CPU ``generator``; default a
    fresh one seeded with 0, so the result is deterministic), and return the
    ``r = ceil(k * m / d)``-th largest magnitude among them (a NaN in the sample counts as
    +inf). The fraction of the sample at or above it is ``r / m ~ k / d``, so the expected count
    over ``x`` is about ``k``; its relative spread is about ``1 / sqrt(r)`` (see
    ``benchmarks/threshold_study.py`` for measured hit rates). ``k = 0`` (or ``d = 0``) gives
    ``+inf``; the result is exact in ``x``'s dtype (a float64 Python float of one of its
    magnitudes).
    """
    _check_float(x, "x")
    flat = x.reshape(-1)
    d = flat.numel()
    k = _check_k(k, d)
    if not 0.0 < sample_fraction <= 1.0:
        raise ValueError(f"sample_fraction must lie in (0, 1], got {sample_fraction}")
    if d == 0 or k == 0:
        return math.inf
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    m = min(d, max(1, math.ceil(sample_fraction * d)))
    pos = torch.randint(d, (m,), generator=generator).to(flat.device)
    s = torch.nan_to_num(flat[pos].abs().double(), nan=math.inf, posinf=math.inf)
    r = min(m, max(1, math.ceil(k * m / d)))
    return float(torch.topk(s, r).values[-1])
