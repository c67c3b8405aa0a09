"""Index payload codecs: raw32, varint, rice, packed, bitmap, seed, dense.

Each codec turns the sorted unique columns of one row (int64 numpy, ``0 <= i < d``) into its
index payload and back; the gap codes (varint, rice, packed) work on the gaps
``g_j = i_j - i_{j-1} - 1`` (:func:`gaps`). The bit layouts are specified in
:mod:`gradsparse.wire.format`. Everything is vectorised (no Python loop over entries). Decoders
raise :class:`~gradsparse.wire.format.WireError` on any payload that the encoder could not have
produced, so every valid payload has exactly one spelling.

This module also holds the parameter choices (:func:`rice_parameter`, :func:`packed_width`) and
the size functions they are built on, which :mod:`gradsparse.wire.sizing` uses per row and in
batches.
"""

from __future__ import annotations

import bisect
import functools
import math
import struct
from typing import Callable

import numpy as np
import torch

from ..random_support import random_k_indices
from .format import PACKED_MAX_WIDTH, WireError

__all__ = ["rice_parameter", "packed_width"]

_LN2 = math.log(2.0)
#: the encodings whose payload codes the gaps
GAP_ENCODINGS = ("varint", "rice", "packed")


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------


def gaps(idx: np.ndarray) -> np.ndarray:
    """g_j = i_j - i_{j-1} - 1 with i_{-1} = -1."""
    g = np.empty_like(idx)
    if idx.size:
        g[0] = idx[0]
        np.subtract(idx[1:], idx[:-1], out=g[1:])
        g[1:] -= 1
    return g


def indices_from_gaps(g: np.ndarray, d: int) -> np.ndarray:
    if g.size == 0:
        return g.astype(np.int64)
    if int(np.minimum.reduce(g)) < 0 or int(np.maximum.reduce(g)) >= d:
        raise WireError("index gap out of range")
    # each gap + 1 <= d < 2**62: a float sum bounds the int64 cumsum before computing it
    if float(np.add.reduce(g, dtype=np.float64)) + g.size > d + 1e-6 * d + 1024:
        raise WireError("indices run past the end of the tensor")
    idx = np.cumsum(g + 1)
    idx -= 1
    if int(idx[-1]) >= d:
        raise WireError(f"index {int(idx[-1])} out of range for a tensor of {d} entries")
    return idx


def _as_int64(indices: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)


def segment_sums(ptr: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Exact int64 per-row sums of integer weights ``w`` (row i is the slice ptr[i]:ptr[i+1])."""
    n = ptr.size - 1
    out = np.zeros(n, dtype=np.int64)
    nonempty = np.flatnonzero(ptr[1:] > ptr[:-1])
    if nonempty.size:
        out[nonempty] = np.add.reduceat(w, ptr[nonempty], dtype=np.int64)
    return out


def _row_summer(ptr: np.ndarray, k: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Per-row int64 sums of arrays laid out like the gaps: a 2-D reduction when every row has
    the same count (cheaper than ``reduceat``), else :func:`segment_sums`."""
    n = k.size
    kk = int(k[0]) if n else 0
    if n and kk and bool(np.all(k == kk)):
        return lambda w: w.reshape(n, kk).sum(axis=1, dtype=np.int64)
    return lambda w: segment_sums(ptr, w)


# ----------------------------------------------------------------------------------------------
# raw32
# ----------------------------------------------------------------------------------------------


def raw32_encode(idx: np.ndarray) -> bytes:
    return idx.astype("<i4").tobytes()


def raw32_decode(b: np.ndarray, k: int, d: int) -> np.ndarray:
    idx = np.frombuffer(b, dtype="<i4").astype(np.int64)
    if k and (idx[0] < 0 or idx[-1] >= d or (k > 1 and not np.all(idx[1:] > idx[:-1]))):
        raise WireError("raw32 indices are not strictly increasing within [0, d)")
    return idx


# ----------------------------------------------------------------------------------------------
# varint
# ----------------------------------------------------------------------------------------------


def varint_lengths(x: np.ndarray, vmax: int | None = None) -> np.ndarray:
    """Byte length of the LEB128 varint of each (non-negative int64) entry."""
    lens = np.ones(x.shape, dtype=np.int64)
    if x.size == 0:
        return lens
    vmax = int(x.max()) if vmax is None else vmax
    t = 7
    while t < 63 and (1 << t) <= vmax:
        lens += x >= (1 << t)
        t += 7
    return lens


def varint_nbytes(g: np.ndarray, gmax: int) -> int:
    """Bytes of the LEB128 varints of the (non-negative) values ``g`` whose largest is ``gmax``:
    one per value, plus one per value at or above each of 2**7, 2**14, ... (up to gmax)."""
    n = g.size
    t = 7
    while t < 63 and (1 << t) <= gmax:
        n += int(np.count_nonzero(g >= (1 << t)))
        t += 7
    return n


def varint_encode(g: np.ndarray) -> bytes:
    if g.size == 0:
        return b""
    lens = varint_lengths(g)
    ends = np.cumsum(lens)
    starts = ends - lens
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    gu = g.astype(np.uint64)
    maxlen = int(lens.max())
    for j in range(maxlen):
        sel = slice(None) if j == 0 else np.flatnonzero(lens > j)
        gj = gu[sel]
        byte = ((gj >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= np.where(lens[sel] > j + 1, np.uint8(0x80), np.uint8(0))
        out[starts[sel] + j] = byte
    return out.tobytes()


def varint_decode(b: np.ndarray, k: int, what: str = "varint index payload") -> np.ndarray:
    """The k canonical LEB128 varints (each at most 9 bytes, so < 2**63) that fill ``b`` exactly."""
    if k == 0:
        if b.size:
            raise WireError(f"{what} is not empty but should hold no value")
        return np.zeros(0, dtype=np.int64)
    term = np.flatnonzero(b < 0x80)
    if term.size != k:
        raise WireError(f"{what} holds {term.size} values, expected {k}")
    if term[-1] != b.size - 1:
        raise WireError(f"{what} ends inside a value")
    starts = np.empty(k, dtype=np.int64)
    starts[0] = 0
    starts[1:] = term[:-1] + 1
    lens = term - starts + 1
    if int(lens.max()) > 9:
        raise WireError(f"varint longer than 9 bytes in {what}")
    if np.any((lens > 1) & (b[term] == 0)):
        raise WireError(f"non-canonical varint in {what}")
    low = (b & 0x7F).astype(np.int64)
    pos = np.arange(b.size, dtype=np.int64) - np.repeat(starts, lens)
    low <<= 7 * pos
    return np.add.reduceat(low, starts)


# ----------------------------------------------------------------------------------------------
# rice: parameter choice, codec
# ----------------------------------------------------------------------------------------------


def rice_estimate(sum_gaps: float, k: int) -> int:
    if k == 0:
        return 0
    v = _LN2 * (sum_gaps / k + 1.0)
    return max(0, int(math.floor(math.log2(v))))


def rice_choose(g: np.ndarray) -> tuple[int, int]:
    """(r, payload bits) of the exact bit-minimising Rice parameter (smallest on ties)."""
    k = int(g.size)
    if k == 0:
        return 0, 0
    cache: dict[int, int] = {}

    def S(r: int) -> int:
        if r not in cache:
            cache[r] = int(np.add.reduce(g >> r if r else g)) if r < 63 else 0
        return cache[r]

    r = rice_estimate(float(S(0)), k)
    if S(r) - S(r + 1) > k:
        while S(r) - S(r + 1) > k:
            r += 1
    else:
        while r > 0 and S(r - 1) - S(r) <= k:
            r -= 1
    return r, S(r) + k * (r + 1)


def rice_parameter(indices: torch.Tensor | np.ndarray) -> int:
    """The Rice parameter ``encode`` uses for these sorted unique columns."""
    return rice_choose(gaps(_as_int64(indices)))[0]


def rice_bits_rows(ptr: np.ndarray, g: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Per-row Rice payload bits at each row's smallest bit-minimising r (as :func:`rice_choose`)
    for rows whose gaps are the slices ``g[ptr[i]:ptr[i+1]]``: r = min{r : D(r) <= k} with
    D(r) = S(r) - S(r + 1), S(r) = sum_j (g_j >> r), found by walking every row from its estimate
    (D is non-increasing in r)."""
    if g.size == 0:
        return np.zeros(k.size, dtype=np.int64)
    sums = _row_summer(ptr, k)
    zero_rows = bool((k == 0).any())
    s0 = sums(g).astype(np.float64)
    r = np.floor(np.log2(_LN2 * (s0 / np.maximum(k, 1) + 1.0))).astype(np.int64)
    r = np.maximum(r, 0)
    if zero_rows:
        r[k == 0] = 0
    rmax = 8 * g.itemsize - 2
    whole: dict[int, np.ndarray] = {}  # scalar r -> S(r) of every row

    def S(rv: np.ndarray) -> np.ndarray:
        rv = np.minimum(rv, rmax)
        live = rv[k > 0] if zero_rows else rv
        lo, hi = (int(live.min()), int(live.max())) if live.size else (0, 0)
        if hi - lo < 4:  # usual case (similar rows): a few whole-array shifts, no gather
            if lo == hi:  # rows of count 0 sum to 0 under any shift
                if lo not in whole:
                    whole[lo] = sums(g >> lo if lo else g)
                return whole[lo]
            out = np.zeros(k.size, dtype=np.int64)
            for v in range(lo, hi + 1):
                if v not in whole:
                    whole[v] = sums(g >> v if v else g)
                sel = rv == v
                out[sel] = whole[v][sel]
            return out
        return sums(g >> np.repeat(rv.astype(g.dtype), k))

    s_r, s_r1 = S(r), S(r + 1)
    # walk up while D(r) > k
    up = (s_r - s_r1) > k
    while up.any():
        r = r + up
        s_r = np.where(up, s_r1, s_r)
        s_r1 = S(r + 1)
        up = (s_r - s_r1) > k
    # walk down while r > 0 and D(r - 1) <= k
    s_m = S(np.maximum(r - 1, 0))
    down = (r > 0) & ((s_m - s_r) <= k)
    while down.any():
        r = r - down
        s_r = np.where(down, s_m, s_r)
        s_m = S(np.maximum(r - 1, 0))
        down = (r > 0) & ((s_m - s_r) <= k)
    return s_r + k * (r + 1)


def rice_encode(g: np.ndarray, r: int) -> bytes:
    k = g.size
    if k == 0:
        return b""
    q = g >> r
    nrem = k * r
    unary_pos = np.cumsum(q + 1) - 1  # position of each terminating one bit
    total = nrem + int(unary_pos[-1]) + 1
    bits = np.zeros(total, dtype=np.uint8)
    if r:
        bits[:nrem] = _msb_bits(g & ((1 << r) - 1), r)
    bits[nrem + unary_pos] = 1
    return np.packbits(bits).tobytes()


#: up to this many fields, :func:`_msb_bits` and :func:`_msb_fields` work field by field (a few
#: numpy calls in all); above, group by group (8 fields at once, fewer bytes touched per field)
_FIELDWISE_MAX = 1024


def _msb_bits(v: np.ndarray, r: int) -> np.ndarray:
    """The low r bits of each value (1 <= r <= 62), concatenated most significant bit first, as
    an array of k r bits (0/1 bytes). Few fields: each value's big-endian bytes unpacked and its
    last r bits kept; many fields (r <= 57): :func:`_msb_pack`, unpacked; else bit by bit."""
    k = v.size
    if k <= _FIELDWISE_MAX:
        width = 1 if r <= 8 else 2 if r <= 16 else 4 if r <= 32 else 8  # bytes holding r bits
        be = v.astype(f">u{width}").view(np.uint8).reshape(k, width)
        return np.unpackbits(be, axis=1)[:, 8 * width - r :].reshape(-1)
    if r <= 57:
        return np.unpackbits(_msb_pack(v, r))[: k * r]
    shifts = np.arange(r - 1, -1, -1, dtype=np.int64)
    return ((v[:, None] >> shifts[None, :]) & 1).reshape(-1).astype(np.uint8)


def _msb_pack(v: np.ndarray, r: int) -> np.ndarray:
    """The low r bits of each value (r <= 57), concatenated most significant bit first, as
    ceil(k r / 8) bytes with zero padding bits. Fields are built in groups of 8 (exactly r bytes a
    group) as big-endian 64-bit words, so no per-bit or per-field index arrays are needed."""
    k = v.size
    ng = -(-k // 8)
    f = np.zeros(ng * 8, dtype=np.uint64)
    f[:k] = v
    f = f.reshape(ng, 8)
    nw = -(-r // 8)  # 8 fields = r bytes = nw words or less
    words = np.zeros((ng, nw + 1), dtype=np.uint64)
    for j in range(8):
        w, s_ = divmod(j * r, 64)
        if s_ + r <= 64:
            words[:, w] |= f[:, j] << np.uint64(64 - s_ - r)
        else:  # the field straddles two words
            words[:, w] |= f[:, j] >> np.uint64(s_ + r - 64)
            words[:, w + 1] |= f[:, j] << np.uint64(128 - s_ - r)
    out = words.astype(">u8").view(np.uint8).reshape(ng, 8 * (nw + 1))[:, :r].reshape(-1)
    return out[: (k * r + 7) // 8]


def _msb_fields(b: np.ndarray, bits: np.ndarray, k: int, r: int) -> np.ndarray:
    """Inverse of :func:`_msb_bits` (1 <= r <= 62): the k consecutive r-bit fields at the start
    of the byte stream ``b`` (whose bits, unpacked, are ``bits``), as int64.

    Few fields: each field's bits packed into bytes, left-aligned in a big-endian 64-bit word and
    shifted down. Many fields (r <= 57): field 8m + c starts at byte m r + (c r) // 8, so for each
    c the 8-byte windows holding its fields are one strided view (stride r bytes), read as
    big-endian 64-bit words and shifted."""
    if k <= _FIELDWISE_MAX or r > 57:
        words = np.zeros((k, 8), dtype=np.uint8)
        words[:, : (r + 7) // 8] = np.packbits(bits[: k * r].reshape(k, r), axis=1)
        return (words.view(">u8").reshape(k) >> np.uint64(64 - r)).astype(np.int64)
    ng = -(-k // 8)
    pad = np.zeros(max(b.size, ng * r) + 8, dtype=np.uint8)
    pad[: b.size] = b
    out = np.empty((ng, 8), dtype=np.uint64)
    mask = np.uint64((1 << r) - 1)
    for c in range(8):
        off, sh = divmod(c * r, 8)
        words = np.ndarray((ng,), dtype=">u8", buffer=pad, offset=off, strides=(r,))
        np.bitwise_and(words >> np.uint64(64 - r - sh), mask, out=out[:, c])
    return out.reshape(-1)[:k].astype(np.int64)


def rice_decode(b: np.ndarray, k: int, r: int, d: int) -> np.ndarray:
    if k == 0:
        if b.size:
            raise WireError("rice index payload is not empty for k = 0")
        return np.zeros(0, dtype=np.int64)
    nrem = k * r
    nbits = b.size * 8
    if nrem + k > nbits:
        raise WireError("rice index payload too short")
    bits = np.unpackbits(b)
    ones = np.flatnonzero(bits[nrem:].view(bool))  # 0/1 bytes: as bool, nonzero is several times faster
    if ones.size != k:
        raise WireError(f"rice index payload holds {ones.size} codes, header says {k}")
    used = nrem + int(ones[-1]) + 1
    if (used + 7) // 8 != b.size:
        raise WireError("rice index payload has trailing bytes")
    q = gaps(ones)
    if int(np.maximum.reduce(q)) > ((d - 1) >> r if d else 0):
        raise WireError("rice index gap exceeds the tensor size")
    g = q << r
    if r:
        g |= _msb_fields(b, bits, k, r)
    return g


# ----------------------------------------------------------------------------------------------
# packed: width choice, codec
# ----------------------------------------------------------------------------------------------


def _all_packed_thresholds() -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct thresholds ``2**b - 1 + s`` (b = 1..32, s in {0, 2**7, ..., 2**56}) at
    which a gap's packed cost grows, and ``pos[b - 1, m]``: the position in them of the threshold
    with ``s = 2**(7m)`` (``s = 0`` for m = 0)."""
    esc = (np.int64(1) << np.arange(1, PACKED_MAX_WIDTH + 1, dtype=np.int64)) - 1
    steps = np.zeros(9, dtype=np.int64)
    steps[1:] = np.int64(1) << (7 * np.arange(1, 9, dtype=np.int64))
    t = esc[:, None] + steps[None, :]  # < 2**57: no overflow
    thr = np.unique(t)
    return thr, np.searchsorted(thr, t)


_PACKED_THRESHOLDS, _PACKED_THRESHOLD_POS = _all_packed_thresholds()


_PACKED_THRESHOLD_LIST = _PACKED_THRESHOLDS.tolist()


def _packed_thresholds(gmax: int) -> tuple[np.ndarray, np.ndarray]:
    """The thresholds that some gap <= ``gmax`` reaches (a prefix of the sorted table) and their
    positions ``pos[b - 1, m]`` as in :func:`_all_packed_thresholds`, or their count where the
    threshold exceeds ``gmax``."""
    return _packed_threshold_prefix(bisect.bisect_right(_PACKED_THRESHOLD_LIST, gmax))


@functools.lru_cache(maxsize=None)  # at most one entry per prefix length (<= 289)
def _packed_threshold_prefix(nt: int) -> tuple[np.ndarray, np.ndarray]:
    return _PACKED_THRESHOLDS[:nt], np.minimum(_PACKED_THRESHOLD_POS, nt)


def _thresholds_at_or_below(thr: np.ndarray, g: np.ndarray, gmax: int) -> np.ndarray:
    """For each gap, the number of the sorted thresholds ``thr`` (all <= ``gmax``) at or below
    it: from a cumulative table over 0..gmax when that table is not much larger than the gaps
    (one gather per gap), else by binary search."""
    if gmax < 8 * g.size + 4096:
        return np.cumsum(np.bincount(thr, minlength=gmax + 1))[g]
    return np.searchsorted(thr.astype(g.dtype), g, side="right")


def _packed_widths(gmax: int) -> np.ndarray:
    """The widths worth trying: beyond the first width whose escape value exceeds every gap, only
    the field bytes grow."""
    return _PACKED_WIDTHS[: min(gmax.bit_length() + 1, PACKED_MAX_WIDTH)]


_PACKED_WIDTHS = np.arange(1, PACKED_MAX_WIDTH + 1, dtype=np.int64)


def packed_choose_rows(g: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (b, packed payload bytes) at each row's smallest byte-minimising width (row i holds
    the next ``k[i]`` gaps of ``g``, row-major). With ``E = 2**b - 1`` the payload is
    ``ceil(k b / 8) + sum_{g >= E} (1 + sum_{m=1..8} [g >= E + 2**(7m)])`` bytes, so one count of
    the gaps at or above each threshold (the number of thresholds below each gap, then a per-row
    histogram) gives the exact size of every width at once."""
    n = k.size
    if g.size == 0:
        return np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    gmax = int(g.max())
    widths = _packed_widths(gmax)
    thr, pos = _packed_thresholds(gmax)
    pos = pos[: widths.size]
    nt = thr.size
    above = _thresholds_at_or_below(thr, g, gmax)
    if n == 1:
        hist = np.bincount(above, minlength=nt + 1)[None, :]
    else:
        above += np.repeat(np.arange(0, n * (nt + 1), nt + 1, dtype=above.dtype), k)
        hist = np.bincount(above, minlength=n * (nt + 1)).reshape(n, nt + 1)
    # ge[:, i] = gaps >= thr[i] (those with more than i thresholds below): the row's count less
    # those with at most i; column nt is 0
    ge = k.astype(np.int64)[:, None] - np.cumsum(hist, axis=1)
    esc_bytes = ge[:, pos].sum(axis=2)  # [n, widths]: exception-stream bytes of every width
    size = (k.astype(np.int64)[:, None] * widths[None, :] + 7) // 8 + esc_bytes
    best = np.argmin(size, axis=1)  # first minimum: the smallest width on ties
    return widths[best], size[np.arange(n), best]


def packed_choose(g: np.ndarray, gmax: int | None = None) -> tuple[int, int]:
    """(b, payload bytes) of the exact byte-minimising packed width (smallest on ties) of one
    row's gaps (largest ``gmax``, computed when not given): the sizes of
    :func:`packed_choose_rows`, from the number of gaps at or above each threshold, counted
    from a histogram of the gaps over 0..gmax when it is not much larger than the gaps, else
    by binary search in the sorted gaps."""
    k = g.size
    if k == 0:
        return 1, 0
    gmax = int(g.max()) if gmax is None else gmax
    widths = _packed_widths(gmax)
    thr, pos = _packed_thresholds(gmax)  # every threshold is >= 1
    ge = np.zeros(thr.size + 1, dtype=np.int64)  # the last entry: thresholds above gmax
    if gmax < 8 * k + 4096:
        ge[: thr.size] = k - np.cumsum(np.bincount(g, minlength=gmax + 1))[thr - 1]
    else:
        ge[: thr.size] = k - np.searchsorted(np.sort(g), thr)
    size = (k * widths + 7) // 8 + ge[pos[: widths.size]].sum(axis=1)
    best = int(size.argmin())  # first minimum: the smallest width on ties
    return best + 1, int(size[best])


def packed_width(indices: torch.Tensor | np.ndarray) -> int:
    """The field width b that ``encode`` uses for these sorted unique columns (``packed``)."""
    return packed_choose(gaps(_as_int64(indices)))[0]


def packed_encode(g: np.ndarray, b: int) -> bytes:
    k = g.size
    if k == 0:
        return b""
    esc = (1 << b) - 1
    ngroups = -(-k // 8)
    f = np.zeros(ngroups * 8, dtype=np.uint64)
    f[:k] = np.minimum(g, esc)
    f = f.reshape(ngroups, 8)
    # a group's 8 fields are one 8b-bit little-endian integer, built as ceil(b / 8) 64-bit words:
    # field j starts at bit j*b; a field that crosses a word boundary spills into the next word
    nw = -(-b // 8)
    words = np.zeros((ngroups, nw), dtype=np.uint64)
    for j in range(8):
        w, s = divmod(j * b, 64)
        words[:, w] |= f[:, j] << np.uint64(s)
        if s + b > 64:
            words[:, w + 1] |= f[:, j] >> np.uint64(64 - s)
    # the first b bytes of each group's words; the padding fields of the last group are zero,
    # so cutting the stream at ceil(k b / 8) bytes leaves zero padding bits
    fields = words.astype("<u8").view(np.uint8).reshape(ngroups, 8 * nw)[:, :b].reshape(-1)
    fields = fields[: (k * b + 7) // 8]
    sel = g >= esc
    return fields.tobytes() + varint_encode(g[sel] - esc)


def packed_decode(p: np.ndarray, k: int, b: int, d: int) -> np.ndarray:
    if k == 0:
        if p.size:
            raise WireError("packed index payload is not empty for k = 0")
        return np.zeros(0, dtype=np.int64)
    nf = (k * b + 7) // 8
    if p.size < nf:
        raise WireError(f"packed index payload of {p.size} bytes is shorter than its fields ({nf})")
    used = (k * b) % 8
    if used and int(p[nf - 1]) >> used:
        raise WireError("packed index padding bits are not zero")
    esc = (1 << b) - 1
    ngroups = -(-k // 8)
    buf = np.zeros(ngroups * b + 8, dtype=np.uint8)  # whole groups plus room for a word read
    buf[:nf] = p[:nf]
    # field j of every group: one unaligned little-endian 64-bit read at the group's byte
    # (j b) // 8 (a strided view, stride b bytes), shifted by (j b) % 8 and masked to b bits
    f = np.empty((ngroups, 8), dtype=np.uint64)
    mask = np.uint64(esc)
    for j in range(8):
        o = j * b
        word = np.ndarray((ngroups,), dtype="<u8", buffer=buf, offset=o >> 3, strides=(b,))
        f[:, j] = (word >> np.uint64(o & 7)) & mask
    g = f.reshape(-1)[:k].astype(np.int64)
    where = np.flatnonzero(g == esc)
    t = varint_decode(p[nf:], where.size, "packed exception stream")
    if where.size:
        if int(t.max()) > d - 1 - esc:
            raise WireError("packed index gap exceeds the tensor size")
        g[where] += t
    return g


# ----------------------------------------------------------------------------------------------
# bitmap
# ----------------------------------------------------------------------------------------------


def bitmap_encode(idx: np.ndarray, d: int) -> bytes:
    nbytes = (d + 7) // 8
    if idx.size * 8 > d:  # dense support: pack a boolean mask
        m = np.zeros(d, dtype=bool)
        m[idx] = True
        return np.packbits(m, bitorder="little").tobytes()
    # sparse support: OR the bits of each byte (distinct bits, so a sum is an OR)
    w = np.left_shift(1, idx & 7).astype(np.float64)
    return np.rint(np.bincount(idx >> 3, weights=w, minlength=nbytes)).astype(np.uint8).tobytes()


def bitmap_decode(b: np.ndarray, k: int, d: int) -> np.ndarray:
    if d % 8 and b.size and (int(b[-1]) >> (d % 8)):
        raise WireError("bitmap padding bits are not zero")
    nzb = np.flatnonzero(b != 0)
    if nzb.size * 4 < b.size:  # sparse: only unpack the bytes that hold set bits
        r, c = np.nonzero(np.unpackbits(b[nzb][:, None], axis=1, bitorder="little").view(bool))
        idx = nzb[r] * 8 + c
    else:
        idx = np.flatnonzero(np.unpackbits(b, bitorder="little").view(bool))
    if idx.size != k:
        raise WireError(f"bitmap holds {idx.size} indices, header says {k}")
    return idx.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------------------------
# seed, dense
# ----------------------------------------------------------------------------------------------


def default_regenerate(seed: int, d: int, k: int) -> torch.Tensor:
    """The columns of a seeded row: :func:`gradsparse.random_support.random_k_indices`."""
    return random_k_indices(seed, d, k)


def seed_decode(
    seed: int, k: int, d: int, regenerate: Callable[[int, int, int], torch.Tensor] | None
) -> np.ndarray:
    """The regenerated columns of a seeded row, checked (count, integers, sorted, in range)."""
    got = (default_regenerate if regenerate is None else regenerate)(seed, d, k)
    idx = np.asarray(got.cpu() if isinstance(got, torch.Tensor) else got)
    if idx.ndim != 1 or idx.shape[0] != k or (k and not np.issubdtype(idx.dtype, np.integer)):
        raise WireError(f"regenerator returned {idx.shape} {idx.dtype}, expected {k} integer indices")
    idx = idx.astype(np.int64)
    if k and (idx[0] < 0 or idx[-1] >= d or (k > 1 and not np.all(idx[1:] > idx[:-1]))):
        raise WireError("regenerated indices are not strictly increasing within [0, d)")
    return idx


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------


def encode_index_payload(
    encoding: str, idx: np.ndarray, d: int, parameter: int | None, g: np.ndarray | None = None
) -> bytes:
    """The index payload of sorted unique columns ``idx`` (b"" for seed and dense); ``g``: their
    gaps when already computed."""
    if encoding == "raw32":
        return raw32_encode(idx)
    if encoding in GAP_ENCODINGS and g is None:
        g = gaps(idx)
    if encoding == "varint":
        return varint_encode(g)
    if encoding == "rice":
        return rice_encode(g, parameter)
    if encoding == "packed":
        return packed_encode(g, parameter)
    if encoding == "bitmap":
        return bitmap_encode(idx, d)
    return b""


def decode_index_payload(
    encoding: str, payload: np.ndarray, k: int, d: int, parameter: int | None,
    seed: int | None, regenerate: Callable[[int, int, int], torch.Tensor] | None,
) -> np.ndarray:
    """The sorted unique int64 columns of one frame's index payload (checked)."""
    if encoding == "raw32":
        return raw32_decode(payload, k, d)
    if encoding == "varint":
        return indices_from_gaps(varint_decode(payload, k), d)
    if encoding == "rice":
        return indices_from_gaps(rice_decode(payload, k, parameter, d), d)
    if encoding == "packed":
        return indices_from_gaps(packed_decode(payload, k, parameter, d), d)
    if encoding == "bitmap":
        return bitmap_decode(payload, k, d)
    if encoding == "dense":
        return np.arange(d, dtype=np.int64)
    return seed_decode(seed, k, d, regenerate)


# ----------------------------------------------------------------------------------------------
# small frames: the same codecs in plain Python
# ----------------------------------------------------------------------------------------------
# A frame of a few entries costs numpy's per-call overhead many times over (tens of microseconds
# per frame), which made a buffer of many one-entry frames decode at a few kB/s. Up to
# SMALL_PAYLOAD bytes of index payload, these functions decode the payload with plain Python
# integers instead. They accept exactly the payloads the numpy decoders accept (same checks; a
# test compares the two on valid and mutated payloads) and raise WireError otherwise.

#: index payloads up to this many bytes are decoded by :func:`decode_small_index_payload`
SMALL_PAYLOAD = 64


def _small_varints(b: bytes, k: int, what: str) -> list[int]:
    if k == 0:
        if b:
            raise WireError(f"{what} is not empty but should hold no value")
        return []
    terms = sum(1 for c in b if c < 0x80)
    if terms != k:
        raise WireError(f"{what} holds {terms} values, expected {k}")
    if b[-1] >= 0x80:
        raise WireError(f"{what} ends inside a value")
    out, pos = [], 0
    for _ in range(k):
        x = shift = 0
        start = pos
        while True:
            c = b[pos]
            pos += 1
            x |= (c & 0x7F) << shift
            shift += 7
            if c < 0x80:
                break
        if pos - start > 9:
            raise WireError(f"varint longer than 9 bytes in {what}")
        if pos - start > 1 and c == 0:
            raise WireError(f"non-canonical varint in {what}")
        out.append(x)
    return out


def _small_from_gaps(g: list[int], d: int) -> list[int]:
    idx, i = [], -1
    for x in g:
        if x < 0 or x >= d:
            raise WireError("index gap out of range")
        i += x + 1
        if i >= d:
            raise WireError(f"index {i} out of range for a tensor of {d} entries")
        idx.append(i)
    return idx


def decode_small_index_payload(encoding: str, payload: bytes, k: int, d: int, parameter: int | None) -> list[int]:
    """The sorted unique columns of a small index payload (``len(payload) <= SMALL_PAYLOAD``) of
    an explicit encoding, as plain ints; the checks of :func:`decode_index_payload`."""
    if encoding == "raw32":
        idx = list(struct.unpack(f"<{k}i", payload))
        if k and (idx[0] < 0 or idx[-1] >= d or any(b <= a for a, b in zip(idx, idx[1:]))):
            raise WireError("raw32 indices are not strictly increasing within [0, d)")
        return idx
    if encoding == "varint":
        return _small_from_gaps(_small_varints(payload, k, "varint index payload"), d)
    if encoding == "rice":
        r = parameter
        if k == 0:
            if payload:
                raise WireError("rice index payload is not empty for k = 0")
            return []
        nrem, nbits = k * r, len(payload) * 8
        if nrem + k > nbits:
            raise WireError("rice index payload too short")
        word = int.from_bytes(payload, "big")  # bit i (MSB first) is bit nbits - 1 - i of the word
        ones = [i for i in range(nrem, nbits) if (word >> (nbits - 1 - i)) & 1]
        if len(ones) != k:
            raise WireError(f"rice index payload holds {len(ones)} codes, header says {k}")
        if (ones[-1] + 1 + 7) // 8 != len(payload):
            raise WireError("rice index payload has trailing bytes")
        limit = (d - 1) >> r if d else 0
        rems = (word >> (nbits - nrem)) if nrem else 0
        g, prev = [], nrem - 1
        for j, one in enumerate(ones):
            q = one - prev - 1
            prev = one
            if q > limit:
                raise WireError("rice index gap exceeds the tensor size")
            rem = (rems >> (r * (k - 1 - j))) & ((1 << r) - 1) if r else 0
            g.append((q << r) | rem)
        return _small_from_gaps(g, d)
    if encoding == "packed":
        b = parameter
        if k == 0:
            if payload:
                raise WireError("packed index payload is not empty for k = 0")
            return []
        nf = (k * b + 7) // 8
        if len(payload) < nf:
            raise WireError(f"packed index payload of {len(payload)} bytes is shorter than its fields ({nf})")
        used = (k * b) % 8
        if used and payload[nf - 1] >> used:
            raise WireError("packed index padding bits are not zero")
        esc = (1 << b) - 1
        fields = int.from_bytes(payload[:nf], "little")
        g = [(fields >> (j * b)) & esc for j in range(k)]
        where = [j for j in range(k) if g[j] == esc]
        t = _small_varints(payload[nf:], len(where), "packed exception stream")
        if where and max(t) > d - 1 - esc:
            raise WireError("packed index gap exceeds the tensor size")
        for j, x in zip(where, t):
            g[j] += x
        return _small_from_gaps(g, d)
    if encoding == "bitmap":
        if d % 8 and payload and payload[-1] >> (d % 8):
            raise WireError("bitmap padding bits are not zero")
        word = int.from_bytes(payload, "little")
        idx = [i for i in range(len(payload) * 8) if (word >> i) & 1]
        if len(idx) != k:
            raise WireError(f"bitmap holds {len(idx)} indices, header says {k}")
        return idx
    raise ValueError(f"no small decoder for {encoding!r}")  # pragma: no cover - internal
