"""The pure-torch selection path for many segments (layer-wise top-k, and top-k of every row).

Segments (and rows) no longer than the sampling cutoff (``tuning.SAMPLING_CUTOFF``) are
selected in batches: padded to a common width per power-of-two size class, one ``torch.topk``
per class. Many large segments share one sample, one chunked pass (with a threshold per
segment) and one selection; a segment whose sampled threshold turns out too high is redone on
its own with the single-vector path (:mod:`.torch_path`).
"""

from __future__ import annotations

import math

import torch

from . import tuning
from .keys import KEY_INFO, magnitude_keys
from .torch_path import chunk_length, expand_words, kth_largest, mask_words, select_mask, topk_torch
from .workspace import thread_scratch


def layerwise_torch(flat: torch.Tensor, off: torch.Tensor, kt: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    flat = flat.contiguous()
    parts: list[torch.Tensor] = []
    big = (sizes > tuning.SAMPLING_CUTOFF) & (kt > 0)
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
                parts.append(topk_torch(flat[lo[j] : hi[j]], ks[j])[0] + lo[j])
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
    ``tuning.SAMPLING_CUTOFF`` long, ``0 < sk[j] <= ssz[j]``, CPU index tensors), as a list of tensors of
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
            key = magnitude_keys(flat[o0 : o0 + nr * w]).view(nr, w)
        else:
            col = torch.arange(w)
            pos = (o.unsqueeze(1) + col).clamp_(max=flat.numel() - 1)
            key = magnitude_keys(flat[pos.view(-1).to(dev)]).view(nr, w)
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


def _layerwise_big(flat: torch.Tensor, lo: list[int], hi: list[int], ks: list[int]) -> torch.Tensor:
    """Exact top-``ks[j]`` of each of the large segments ``[lo[j], hi[j])`` (ascending, disjoint),
    as ascending global indices: the single-vector algorithm run on all of them at once (one
    batched sample, one chunked pass with per-segment thresholds, one batched selection)."""
    dev = flat.device
    it, bits, nankey = KEY_INFO[flat.dtype]
    L = len(lo)
    n = [h - l_ for l_, h in zip(lo, hi)]
    tot = sum(n)
    # sample: m keys per segment (about 8 * tuning.SAMPLE_SIZE in all), one in each of m equal strata
    m = max(1, min(tuning.SAMPLE_SIZE, min(n) // 8, max(1024, 8 * tuning.SAMPLE_SIZE // L)))
    r = []
    for kj, nj in zip(ks, n):
        mu = kj * m / nj
        # 3 rather than 4 standard deviations: a segment whose threshold turns out too high
        # is redone on its own, which costs much less than a pass over everything
        r.append(min(m - 1, int(tuning.RANK_SCALE * (mu + 3.0 * math.sqrt(mu) + 2.0))))
    gen = torch.Generator().manual_seed(tuning.SAMPLING_SEED)
    stride = torch.tensor(n).div_(m, rounding_mode="floor").unsqueeze(1)
    spos = torch.randint(1 << 62, (m,), generator=gen).remainder(stride)  # same draws, every row
    spos += torch.arange(m) * stride
    spos += torch.tensor(lo).unsqueeze(1)
    samp = magnitude_keys(flat[spos.view(-1).to(dev)]).view(L, m)
    top = torch.topk(samp, max(r) + 1, dim=1).values
    thr = top[torch.arange(L, device=dev), torch.tensor(r, device=dev)].tolist()
    # one pass: runs of adjacent segments share a chunk (per-entry thresholds), long ones are cut
    C = chunk_length(tot, dev)
    kb = thread_scratch("key", C, it, dev)
    mb = thread_scratch("mask", C, torch.uint8, dev)
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
        mask_words(kc, t, mb, s, acc)
    pos = expand_words(acc, dev)
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
            T.append(kth_largest(key[cs[j] : cs[j + 1]], ks[j]))
    Tc = torch.repeat_interleave(torch.stack(T), torch.tensor(cnt, device=dev), output_size=key.numel())
    sel = key >= Tc
    if int(sel.sum()) != sum(ks[j] for j in range(L) if j not in redo):
        # ties at the threshold of some segments: there the first ones win
        cum = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.cumsum(sel, 0)])
        upto = cum[torch.tensor(cs, device=dev)].tolist()  # upto[j]: #selected before slice j
        for j in range(L):
            if j not in redo and upto[j + 1] - upto[j] != ks[j]:
                sel[cs[j] : cs[j + 1]] = select_mask(key[cs[j] : cs[j + 1]], T[j], ks[j])
    out = pos[sel]
    if redo:
        extra = [topk_torch(flat[lo[j] : hi[j]], ks[j])[0] + lo[j] for j in redo]
        out = torch.cat([out] + extra).sort().values
    return out
