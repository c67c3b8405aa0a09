"""The pure-torch selection path for one vector (what CUDA tensors and non-float32 inputs get).

It follows the compiled path's plan with device-agnostic torch ops: a threshold key from a
stratified sample, then one pass in chunks (on CPU ``tuning.CHUNK_LENGTH`` entries, so that the
scratch stays in cache; elsewhere the whole vector) that writes integer keys
(:mod:`.keys`) and a 0/1 byte mask to small reused buffers and keeps only the 8-byte words of
the mask that hold a candidate (``nonzero`` over words is 8 times cheaper than over entries),
then an exact selection among the candidates (for many of them a histogram of the keys' top
bits first, so that only one bucket is ranked; ties to the lowest index). A pass that finds
fewer than k candidates is redone with a lower threshold. Vectors of at most
``tuning.SAMPLING_CUTOFF`` entries are selected directly. Many segments at once:
:mod:`.torch_segments`.
"""

from __future__ import annotations

import math

import torch

from . import tuning
from .keys import KEY_INFO, magnitude_keys
from .workspace import thread_scratch


def exact_from_keys(key: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact top-k positions (ascending) of an integer key vector; 0 < k < n."""
    T = torch.topk(key, k, sorted=False).values.min()
    m = torch.gt(key, T, out=mask) if mask is not None else key > T
    gt = m.nonzero().view(-1)
    need = k - gt.numel()
    m = torch.eq(key, T, out=mask) if mask is not None else key == T
    eq = m.nonzero().view(-1)[:need]
    return torch.cat([gt, eq]).sort().values


def kth_largest(key: torch.Tensor, k: int) -> torch.Tensor:
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


def select_mask(key: torch.Tensor, T: torch.Tensor, k: int) -> torch.Tensor:
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
    return select_mask(key, kth_largest(key, k), k).nonzero().view(-1)


_ADD_CHUNKS_OK: dict[torch.dtype, bool] = {}


def add_in_chunks(e: torch.Tensor) -> bool:
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
            ok = ok and torch.equal(whole.view(KEY_INFO[e.dtype][0]), parts.view(KEY_INFO[e.dtype][0]))
        _ADD_CHUNKS_OK[e.dtype] = ok
    return ok


def chunk_length(n: int, device: torch.device) -> int:
    """Elements per pass chunk: on CPU a slice whose scratch stays in cache, elsewhere all of it.
    Always a multiple of 8 (the candidate masks are scanned as 8-byte words)."""
    c = n if device.type != "cpu" else min(n, max(8, tuning.CHUNK_LENGTH))
    return (c + 7) & ~7


def _scratch_fn(scratch, device: torch.device):
    if scratch is not None:
        return scratch
    return lambda name, n, dtype: thread_scratch(name, n, dtype, device)


def _filter_keys(flat: torch.Tensor, T: int, scratch, add=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending positions and bit patterns (as ``KEY_INFO`` integers) of the entries of ``flat``
    whose raw key (sign bit cleared, NaN payloads kept, so that every NaN has a key above +inf's)
    is >= ``T``.

    One pass in chunks: each chunk's keys and a 0/1 byte mask go to small reused scratch buffers
    (in cache on CPU), the mask is scanned as 8-byte words and only the words that hold a
    candidate are kept; they are expanded to positions once at the end. ``add = (g, alpha)``
    first applies ``flat.add_(g, alpha=alpha)`` chunk by chunk."""
    it, bits, _ = KEY_INFO[flat.dtype]
    n = flat.numel()
    dev = flat.device
    C = chunk_length(n, dev)
    kb = scratch("key", C, it)
    mb = scratch("mask", C, torch.uint8)
    xi = flat.view(it)
    acc: tuple[list, list] = ([], [])
    for s in range(0, n, C):
        e = min(n, s + C)
        if add is not None:
            flat[s:e].add_(add[0][s:e], alpha=add[1])
        mask_words(torch.bitwise_and(xi[s:e], bits, out=kb[: e - s]), T, mb, s, acc)
    pos = expand_words(acc, dev)
    return pos, xi.index_select(0, pos)


def mask_words(v: torch.Tensor, thr, mb: torch.Tensor, s: int, acc: tuple) -> None:
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


def expand_words(acc: tuple, dev: torch.device) -> torch.Tensor:
    """Ascending positions of the set bytes of the words collected by :func:`mask_words`."""
    ws, bs = acc
    if not ws:
        return torch.empty(0, dtype=torch.long, device=dev)
    W = ws[0] if len(ws) == 1 else torch.cat(ws)
    B = bs[0] if len(bs) == 1 else torch.cat(bs)
    p = B.view(torch.uint8).nonzero().view(-1)  # byte j of word i is entry W[i] + j
    return W.index_select(0, p >> 3).add_(p & 7)


def topk_torch(
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
    m = min(tuning.SAMPLE_SIZE, n // 8)
    mu = k * m / n if n else 0.0
    r = int(tuning.RANK_SCALE * (mu + 4.0 * math.sqrt(mu) + 2.0))
    if add is not None and (k == 0 or k == n or n <= tuning.SAMPLING_CUTOFF or r >= m):
        flat.add_(add[0], alpha=add[1])
        add = None
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=dev), None
    if k == n:
        return torch.arange(n, device=dev), None
    if n <= tuning.SAMPLING_CUTOFF:
        return exact_from_keys(magnitude_keys(flat), k), None
    _, bits, nankey = KEY_INFO[flat.dtype]
    scratch = _scratch_fn(scratch, dev)
    if r < m:
        gen = torch.Generator().manual_seed(tuning.SAMPLING_SEED)
        stride = n // m  # stratified: one position in each of m equal strata
        pos = (torch.arange(0, m * stride, stride) + torch.randint(stride, (m,), generator=gen)).to(dev)
        sv = flat[pos]
        if add is not None:  # the sample of a = e + alpha*g (its rounding only affects the speed)
            sv.add_(add[0][pos], alpha=add[1])
        samp = magnitude_keys(sv)
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
    return exact_from_keys(magnitude_keys(flat), k), None
