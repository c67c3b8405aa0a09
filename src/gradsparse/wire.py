"""Wire format: :class:`~gradsparse.message.SparseMessage` <-> bytes, with exact byte counts.

Every number of bytes that gradsparse reports as "sent" is the length of the message this
module would put on the wire (:func:`encoded_nbytes`, :func:`batch_encoded_nbytes`,
:func:`dense_nbytes`), so compression ratios, plots and the real ``torch.distributed`` engine
share one accounting.

Message layout (version 1, all multi-byte integers little-endian)
-----------------------------------------------------------------
======================  =========================================================================
field                   encoding
======================  =========================================================================
magic                   4 bytes ``b"GSPW"``
version                 u8, currently 1
index encoding id       u8: 0 raw32, 1 varint, 2 rice, 3 bitmap, 4 seed, 5 dense, 6 packed
value dtype id          u8: 0 float32, 1 float16, 2 bfloat16
flags                   u8: bit 0 = a seed follows; all other bits must be 0
ndim                    u8 (0 for a scalar, at most 255)
shape                   ndim unsigned LEB128 varints
nnz (k)                 unsigned LEB128 varint
parameter byte          u8, only for ``rice`` (the Rice parameter r) and ``packed`` (field width b)
seed                    u64 (fixed 8 bytes so sizes do not depend on the seed), only if flags bit 0
index payload length    unsigned LEB128 varint (bytes)
value payload length    unsigned LEB128 varint (bytes), always ``k * itemsize``
index payload           see below
value payload           k values, IEEE float32 / float16, or raw bfloat16 bit patterns (u16)
CRC32                   u32, ``zlib.crc32`` of every byte above
======================  =========================================================================

Index encodings (``d`` = number of entries of the dense tensor, indices ``i_0 < ... < i_{k-1}``)
-------------------------------------------------------------------------------------------------
The gap-based codes use ``g_j = i_j - i_{j-1} - 1 >= 0`` with ``i_{-1} = -1`` (so the first gap is
the first index itself, and adjacent indices give gap 0).

* ``raw32``  - k int32 values. Only for ``d < 2**31`` (encode raises ``ValueError`` otherwise).
* ``varint`` - the gaps as unsigned LEB128 varints (7 bits per byte, high bit = "more bytes"),
  byte aligned, canonical (no redundant trailing zero groups).
* ``rice``   - Golomb-Rice code of the gaps with parameter ``r``: quotient ``g >> r`` in unary,
  remainder ``g & (2**r - 1)`` in ``r`` bits. ``r`` is the *exact* minimiser of the payload bit
  count ``sum_j (g_j >> r) + k (r + 1)``; this count is convex in ``r``, and the smallest
  minimiser is ``min{r : sum_j ((g_j >> r) - (g_j >> (r + 1))) <= k}``, found by walking from the
  estimate ``floor(log2(ln 2 * (mean gap + 1)))``. Bit layout (a permutation of the usual
  interleaved Rice stream, same length, but decodable without a sequential loop): first the k
  remainders, ``r`` bits each, most significant bit first; then the k unary quotients, each as
  ``q`` zero bits followed by a one bit; then zero padding to a whole byte. Bits fill each byte
  from its most significant bit (``np.packbits`` order).
* ``packed`` - the gaps as fixed-width ``b``-bit fields with an escape, in groups of 8 (``b`` is
  the header's parameter byte, ``1 <= b <= 32``; ``E = 2**b - 1``). Field j holds
  ``f_j = min(g_j, E)``; ``f_j == E`` is an escape: the gap is ``E + t`` with ``t`` the next value
  of the exception stream. The payload is first the k fields, ``ceil(k b / 8)`` bytes: read as one
  little-endian integer, it equals ``sum_j f_j * 2**(j b)``, i.e. bit i (least significant = 0) of
  field j is bit ``(j b + i) % 8`` of byte ``(j b + i) // 8`` (``np.packbits(..., bitorder=
  "little")`` of each field's bits, least significant first). Each group of 8 fields is exactly
  ``b`` bytes, so every group starts on a byte boundary; the bits after field k - 1 up to the byte
  boundary are zero. Then the exception stream: ``t = g_j - E`` of each escaped field, in field
  order, as canonical unsigned LEB128 varints; it holds exactly one varint per escape and ends
  with the payload. ``b`` is the *exact* minimiser (smallest on ties, b = 1 when k = 0) over
  ``1..32`` of the payload bytes ``ceil(k b / 8) + sum_{g_j >= E} len(varint(g_j - E))``; since
  ``len(varint(t)) = 1 + sum_{m >= 1} [t >= 2**(7m)]``, every candidate's size follows from the
  counts of gaps at or above the thresholds ``2**b - 1 + {0, 2**7, 2**14, ...}`` (one table
  lookup or binary search per gap, no encoding).
* ``bitmap`` - d bits, bit ``i`` of the support at byte ``i // 8``, bit ``i % 8`` (least
  significant first, ``np.packbits(..., bitorder="little")``); padding bits are zero.
* ``seed``   - no index payload: the receiver regenerates the support from the header's seed with
  ``regenerate(seed, d, k)``, by default :func:`random_k_indices` (the random-k compressor uses
  that same function).
* ``dense``  - no index payload, ``k == d``: every entry is sent (an uncompressed tensor).

``index_encoding="auto"`` picks ``seed`` when the message has a seed; otherwise the smallest
total message among ``raw32`` (if ``d < 2**31``), ``varint``, ``rice``, ``packed``, ``bitmap``
and, when ``k == d``, ``dense`` (ties go to the first in that order). The byte-aligned mode (the
smaller of ``varint`` and ``packed``, for receivers that want whole-byte codes) stays within
1.35 x log2 C(d, k) for random supports below 1% density: varint alone peaks near 1.37 x around
0.3% (gaps of mean ~333 straddle its 1-byte/2-byte boundary), where ``packed`` is ~1.1 x.

Decoding validates everything (magic, version, enum ids, flags, lengths, CRC, index order and
range, padding, canonical varints, regenerated supports) and raises :class:`WireError` on any
inconsistency: a corrupted, truncated or extended message never decodes to a tensor.

Version history: ``packed`` (id 6) was added to version 1 without changing the version number.
It is a pure addition: messages with ids 0-5 are laid out and decoded exactly as before, and a
reader that predates it rejects id 6 as an unknown index encoding (it never misreads it).
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Callable

import numpy as np
import torch

from .message import SparseMessage

__all__ = [
    "WireError",
    "INDEX_ENCODINGS",
    "VALUE_DTYPES",
    "encode",
    "decode",
    "encoded_nbytes",
    "index_payload_nbytes",
    "batch_encoded_nbytes",
    "batch_encoded_nbytes_from_indices",
    "dense_nbytes",
    "index_entropy_bits",
    "random_k_indices",
    "rice_parameter",
    "packed_width",
]

MAGIC = b"GSPW"
VERSION = 1

_ENC_IDS = {"raw32": 0, "varint": 1, "rice": 2, "bitmap": 3, "seed": 4, "dense": 5, "packed": 6}
_ENC_NAMES = {v: k for k, v in _ENC_IDS.items()}
#: Names accepted by ``index_encoding`` (plus ``"auto"``).
INDEX_ENCODINGS: tuple[str, ...] = tuple(_ENC_IDS)
_AUTO_ORDER = ("raw32", "varint", "rice", "packed", "bitmap", "dense")
_PARAM_ENCODINGS = ("rice", "packed")  # the encodings whose header carries a parameter byte

# id -> (torch dtype, little-endian numpy wire dtype, itemsize)
_DTYPES: dict[int, tuple[torch.dtype, str, int]] = {
    0: (torch.float32, "<f4", 4),
    1: (torch.float16, "<f2", 2),
    2: (torch.bfloat16, "<i2", 2),
}
_DTYPE_IDS = {v[0]: k for k, v in _DTYPES.items()}
_DTYPE_ALIASES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
#: Value dtypes the wire carries.
VALUE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

_FIXED_HEADER = 9  # magic, version, encoding, dtype, flags, ndim
_CRC_BYTES = 4
_SEED_BYTES = 8
_FLAG_SEED = 0x01
_MAX_D = 1 << 62  # d must be < 2**62 (keeps every index and gap sum inside int64)
_RAW32_LIMIT = 1 << 31
_PACKED_MAX_B = 32  # packed field widths 1..32
_LN2 = math.log(2.0)


class WireError(ValueError):
    """A byte string is not a valid gradsparse wire message (corrupt, truncated, extended...)."""


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _uvarint_len(x: int) -> int:
    return max(1, (int(x).bit_length() + 6) // 7)


def _put_uvarint(out: bytearray, x: int) -> None:
    x = int(x)
    while True:
        b = x & 0x7F
        x >>= 7
        if x:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def _varint_lens_np(x: np.ndarray, vmax: int | None = None) -> np.ndarray:
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


def _resolve_dtype(dt) -> int:
    if isinstance(dt, str):
        key = dt.lower()
        if key not in _DTYPE_ALIASES:
            raise ValueError(f"unknown value dtype {dt!r}; allowed: fp32, fp16, bf16")
        dt = _DTYPE_ALIASES[key]
    if dt not in _DTYPE_IDS:
        raise ValueError(
            f"the wire carries float32, float16 or bfloat16 values, not {dt}; "
            "pass value_dtype= to cast"
        )
    return _DTYPE_IDS[dt]


def _value_bytes_to_id(value_bytes: int) -> int:
    if value_bytes == 4:
        return 0
    if value_bytes == 2:
        return 1
    raise ValueError(f"value_bytes must be 4 (fp32) or 2 (fp16/bf16), got {value_bytes!r}")


def _check_shape(shape) -> tuple[tuple[int, ...], int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) > 255:
        raise ValueError(f"the wire supports at most 255 dimensions, got {len(shape)}")
    if any(s < 0 or s >= (1 << 63) for s in shape):
        raise ValueError(f"dimensions must lie in [0, 2**63), got shape {shape}")
    d = math.prod(shape)
    if d >= _MAX_D:
        raise ValueError(f"tensor of {d} entries is too large for the wire (limit 2**62)")
    return shape, d


def _check_seed(seed) -> int | None:
    if seed is None:
        return None
    seed = int(seed)
    if not 0 <= seed < (1 << 64):
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def _check_indices(indices: torch.Tensor, d: int) -> np.ndarray:
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    idx = indices.detach().to("cpu", torch.int64).contiguous().numpy()
    if idx.size:
        if idx[0] < 0 or idx[-1] >= d:
            raise ValueError(f"indices must lie in [0, {d}); got range [{idx.min()}, {idx.max()}]")
        if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            raise ValueError("indices must be strictly increasing (sorted, unique)")
    return idx


def _gaps_np(idx: np.ndarray) -> np.ndarray:
    """g_j = i_j - i_{j-1} - 1 with i_{-1} = -1."""
    g = np.empty_like(idx)
    if idx.size:
        g[0] = idx[0]
        np.subtract(idx[1:], idx[:-1], out=g[1:])
        g[1:] -= 1
    return g


# ----------------------------------------------------------------------------------------------
# Rice parameter
# ----------------------------------------------------------------------------------------------


def _rice_r_estimate(sum_gaps: float, k: int) -> int:
    if k == 0:
        return 0
    v = _LN2 * (sum_gaps / k + 1.0)
    return max(0, int(math.floor(math.log2(v))))


def _rice_choose(gaps: np.ndarray) -> tuple[int, int]:
    """(r, payload bits) of the exact bit-minimising Rice parameter (smallest on ties)."""
    k = int(gaps.size)
    if k == 0:
        return 0, 0
    cache: dict[int, int] = {}

    def S(r: int) -> int:
        if r not in cache:
            cache[r] = int(np.sum(gaps >> r)) if r < 63 else 0
        return cache[r]

    r = _rice_r_estimate(float(S(0)), k)
    if S(r) - S(r + 1) > k:
        while S(r) - S(r + 1) > k:
            r += 1
    else:
        while r > 0 and S(r - 1) - S(r) <= k:
            r -= 1
    return r, S(r) + k * (r + 1)


def rice_parameter(indices: torch.Tensor | np.ndarray) -> int:
    """The Rice parameter ``encode`` uses for these sorted unique indices."""
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
    return _rice_choose(_gaps_np(idx))[0]


# ----------------------------------------------------------------------------------------------
# packed field width
# ----------------------------------------------------------------------------------------------


def _packed_thresholds(gmax: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct thresholds ``2**b - 1 + s`` (b = 1..32, s in {0, 2**7, ..., 2**56})
    that some gap <= ``gmax`` reaches, and ``pos[b - 1, m]``: the position in them of the
    threshold with ``s = 2**(7m)`` (``s = 0`` for m = 0), or their count if it exceeds ``gmax``."""
    esc = (np.int64(1) << np.arange(1, _PACKED_MAX_B + 1, dtype=np.int64)) - 1
    steps = np.zeros(9, dtype=np.int64)
    steps[1:] = np.int64(1) << (7 * np.arange(1, 9, dtype=np.int64))
    t = esc[:, None] + steps[None, :]  # < 2**57: no overflow
    reached = t <= gmax
    thr = np.unique(t[reached])
    pos = np.where(reached, np.searchsorted(thr, t), thr.size)
    return thr, pos


def _packed_choose_rows(g: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (b, packed payload bytes) at each row's smallest byte-minimising width (row i holds
    the next ``k[i]`` gaps of ``g``, row-major). With ``E = 2**b - 1`` the payload is
    ``ceil(k b / 8) + sum_{g >= E} (1 + sum_{m=1..8} [g >= E + 2**(7m)])`` bytes, so one count of
    the gaps at or above each threshold (the number of thresholds below each gap, then a per-row
    histogram) gives the exact size of every width at once."""
    n = k.size
    if g.size == 0:
        return np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    gmax = int(g.max())
    # beyond the first width whose escape value exceeds every gap, only the field bytes grow
    widths = np.arange(1, min(gmax.bit_length() + 1, _PACKED_MAX_B) + 1, dtype=np.int64)
    thr, pos = _packed_thresholds(gmax)
    pos = pos[: widths.size]
    nt = thr.size
    # above[j] = number of thresholds <= g_j: from a table over 0..gmax when that table is not
    # much larger than the gaps (one gather per gap), else by binary search
    if gmax < 4 * g.size + 65536:
        table = np.cumsum(np.bincount(thr, minlength=gmax + 1))
        above = table[g]
    else:
        above = np.searchsorted(thr.astype(g.dtype), g, side="right")
    if n == 1:
        hist = np.bincount(above, minlength=nt + 1)[None, :]
    else:
        above += np.repeat(np.arange(0, n * (nt + 1), nt + 1, dtype=above.dtype), k)
        hist = np.bincount(above, minlength=n * (nt + 1)).reshape(n, nt + 1)
    # ge[:, i] = gaps >= thr[i] (those with more than i thresholds below); column nt stays 0
    ge = np.zeros((n, nt + 1), dtype=np.int64)
    ge[:, :nt] = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    esc_bytes = ge[:, pos].sum(axis=2)  # [n, widths]: exception-stream bytes of every width
    size = (k.astype(np.int64)[:, None] * widths[None, :] + 7) // 8 + esc_bytes
    best = np.argmin(size, axis=1)  # first minimum: the smallest width on ties
    return widths[best], size[np.arange(n), best]


def _packed_choose(gaps: np.ndarray) -> tuple[int, int]:
    """(b, payload bytes) of the exact byte-minimising packed width (smallest on ties)."""
    k = np.array([gaps.size], dtype=np.int64)
    b, nbytes = _packed_choose_rows(gaps, k)
    return int(b[0]), int(nbytes[0])


def packed_width(indices: torch.Tensor | np.ndarray) -> int:
    """The field width b that ``encode`` uses for these sorted unique indices (``packed``)."""
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
    return _packed_choose(_gaps_np(idx))[0]


# ----------------------------------------------------------------------------------------------
# payload codecs (vectorised; no Python loop over indices)
# ----------------------------------------------------------------------------------------------


def _varint_encode(g: np.ndarray) -> bytes:
    if g.size == 0:
        return b""
    lens = _varint_lens_np(g)
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


def _varint_decode(b: np.ndarray, k: int, what: str = "varint index payload") -> np.ndarray:
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


def _rice_encode(g: np.ndarray, r: int) -> bytes:
    k = g.size
    if k == 0:
        return b""
    q = g >> r
    nrem = k * r
    unary_pos = np.cumsum(q + 1) - 1  # position of each terminating one bit
    total = nrem + int(unary_pos[-1]) + 1
    bits = np.zeros(total, dtype=np.uint8)
    if 0 < r <= 57:
        bits[:nrem] = np.unpackbits(_msb_pack(g & ((1 << r) - 1), r))[:nrem]
    elif r:
        shifts = np.arange(r - 1, -1, -1, dtype=np.int64)
        bits[:nrem] = (((g & ((1 << r) - 1))[:, None] >> shifts[None, :]) & 1).reshape(-1)
    bits[nrem + unary_pos] = 1
    return np.packbits(bits).tobytes()


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


def _msb_fields(b: np.ndarray, k: int, r: int) -> np.ndarray:
    """Inverse of :func:`_msb_pack` (r <= 57): the k consecutive r-bit fields at the start of the
    byte stream ``b``, as int64. Field 8m + c starts at byte m r + (c r) // 8, so for each c the
    8-byte windows holding its fields are one strided view (stride r bytes), read as big-endian
    64-bit words and shifted."""
    ng = -(-k // 8)
    pad = np.zeros(max(b.size, ng * r) + 8, dtype=np.uint8)
    pad[: b.size] = b
    out = np.empty((ng, 8), dtype=np.int64)
    mask = np.uint64((1 << r) - 1)
    for c in range(8):
        off, sh = divmod(c * r, 8)
        win = np.lib.stride_tricks.as_strided(pad[off:], shape=(ng, 8), strides=(r, 1))
        words = win.copy().view(">u8").reshape(ng)
        out[:, c] = (words >> np.uint64(64 - r - sh)) & mask
    return out.reshape(-1)[:k]


def _rice_decode(b: np.ndarray, k: int, r: int, d: int) -> np.ndarray:
    if k == 0:
        if b.size:
            raise WireError("rice index payload is not empty for k = 0")
        return np.zeros(0, dtype=np.int64)
    nrem = k * r
    nbits = b.size * 8
    if nrem + k > nbits:
        raise WireError("rice index payload too short")
    bits = np.unpackbits(b)
    ones = np.flatnonzero(bits[nrem:])
    if ones.size != k:
        raise WireError(f"rice index payload holds {ones.size} codes, header says {k}")
    used = nrem + int(ones[-1]) + 1
    if (used + 7) // 8 != b.size:
        raise WireError("rice index payload has trailing bytes")
    q = np.diff(ones, prepend=-1) - 1
    if int(q.max()) > ((d - 1) >> r if d else 0):
        raise WireError("rice index gap exceeds the tensor size")
    g = q << r
    if 0 < r <= 57:
        g |= _msb_fields(b, k, r)
    elif r:
        rb = bits[:nrem].reshape(k, r).astype(np.int64)
        rem = np.zeros(k, dtype=np.int64)
        for j in range(r):
            rem = (rem << 1) | rb[:, j]
        g |= rem
    return g


def _packed_encode(g: np.ndarray, b: int) -> bytes:
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
    return fields.tobytes() + _varint_encode(g[sel] - esc)


def _packed_decode(p: np.ndarray, k: int, b: int, d: int) -> np.ndarray:
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
    t = _varint_decode(p[nf:], where.size, "packed exception stream")
    if where.size:
        if int(t.max()) > d - 1 - esc:
            raise WireError("packed index gap exceeds the tensor size")
        g[where] += t
    return g


def _bitmap_encode(idx: np.ndarray, d: int) -> bytes:
    nbytes = (d + 7) // 8
    if idx.size * 8 > d:  # dense support: pack a boolean mask
        m = np.zeros(d, dtype=bool)
        m[idx] = True
        return np.packbits(m, bitorder="little").tobytes()
    # sparse support: OR the bits of each byte (distinct bits, so a sum is an OR)
    w = np.left_shift(1, idx & 7).astype(np.float64)
    return np.rint(np.bincount(idx >> 3, weights=w, minlength=nbytes)).astype(np.uint8).tobytes()


def _bitmap_decode(b: np.ndarray, k: int, d: int) -> np.ndarray:
    if d % 8 and b.size and (int(b[-1]) >> (d % 8)):
        raise WireError("bitmap padding bits are not zero")
    nzb = np.flatnonzero(b)
    if nzb.size * 4 < b.size:  # sparse: only unpack the bytes that hold set bits
        r, c = np.nonzero(np.unpackbits(b[nzb][:, None], axis=1, bitorder="little"))
        idx = nzb[r] * 8 + c
    else:
        idx = np.flatnonzero(np.unpackbits(b, bitorder="little"))
    if idx.size != k:
        raise WireError(f"bitmap holds {idx.size} indices, header says {k}")
    return idx


def _indices_from_gaps(g: np.ndarray, d: int) -> np.ndarray:
    if g.size == 0:
        return g.astype(np.int64)
    if int(g.min()) < 0 or int(g.max()) >= d:
        raise WireError("index gap out of range")
    # each gap + 1 <= d < 2**62: a float sum bounds the int64 cumsum before computing it
    if float(np.sum(g, dtype=np.float64)) + g.size > d + 1e-6 * d + 1024:
        raise WireError("indices run past the end of the tensor")
    idx = np.cumsum(g + 1) - 1
    if int(idx[-1]) >= d:
        raise WireError(f"index {int(idx[-1])} out of range for a tensor of {d} entries")
    return idx


# ----------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------


def _header_nbytes(shape, k, enc: str, seed_present: bool, idx_nbytes: int, val_nbytes: int) -> int:
    n = _FIXED_HEADER + sum(_uvarint_len(s) for s in shape) + _uvarint_len(k)
    if enc in _PARAM_ENCODINGS:
        n += 1
    if seed_present:
        n += _SEED_BYTES
    return n + _uvarint_len(idx_nbytes) + _uvarint_len(val_nbytes)


def _total_nbytes(shape, k, enc, seed_present, idx_nbytes, val_nbytes) -> int:
    return (
        _header_nbytes(shape, k, enc, seed_present, idx_nbytes, val_nbytes)
        + idx_nbytes + val_nbytes + _CRC_BYTES
    )


def _index_sizes(idx: np.ndarray, d: int, has_seed: bool, which) -> dict[str, tuple[int, int]]:
    """{encoding: (index payload bytes, parameter byte: rice r / packed b / 0)} for the requested
    encodings that apply."""
    k = idx.size
    out: dict[str, tuple[int, int]] = {}
    g = None
    for enc in which:
        if enc == "raw32":
            if d < _RAW32_LIMIT:
                out[enc] = (4 * k, 0)
        elif enc == "varint":
            g = _gaps_np(idx) if g is None else g
            out[enc] = (int(_varint_lens_np(g, d).sum()), 0)
        elif enc == "rice":
            g = _gaps_np(idx) if g is None else g
            r, bits = _rice_choose(g)
            out[enc] = ((bits + 7) // 8, r)
        elif enc == "packed":
            g = _gaps_np(idx) if g is None else g
            b, nbytes = _packed_choose(g)
            out[enc] = (nbytes, b)
        elif enc == "bitmap":
            out[enc] = ((d + 7) // 8, 0)
        elif enc == "seed":
            if has_seed:
                out[enc] = (0, 0)
        elif enc == "dense":
            if k == d:
                out[enc] = (0, 0)
    return out


def _plan(msg: SparseMessage, index_encoding: str, value_dtype):
    """Validate ``msg`` and decide encoding, parameter byte (rice r / packed b) and sizes."""
    shape, d = _check_shape(msg.shape)
    idx = _check_indices(msg.indices, d)
    k = idx.size
    vid = _resolve_dtype(msg.values.dtype if value_dtype is None else value_dtype)
    seed = _check_seed(msg.seed)
    val_nbytes = k * _DTYPES[vid][2]
    if index_encoding == "auto":
        cands = ("seed",) if seed is not None else _AUTO_ORDER
    elif index_encoding in _ENC_IDS:
        cands = (index_encoding,)
    else:
        raise ValueError(
            f"unknown index encoding {index_encoding!r}; allowed: auto, {', '.join(INDEX_ENCODINGS)}"
        )
    sizes = _index_sizes(idx, d, seed is not None, cands)
    if not sizes:
        enc = cands[0]
        if enc == "raw32":
            raise ValueError(f"raw32 indices need d < 2**31, got d = {d}; use varint, rice or packed")
        if enc == "seed":
            raise ValueError("the seed encoding needs a message with a seed (msg.seed is None)")
        raise ValueError(f"the dense encoding needs k == d, got k = {k}, d = {d}")
    best = None
    for enc in cands:
        if enc in sizes:
            ib, param = sizes[enc]
            tot = _total_nbytes(shape, k, enc, seed is not None, ib, val_nbytes)
            if best is None or tot < best[0]:
                best = (tot, enc, param, ib)
    tot, enc, param, ib = best
    return shape, d, idx, vid, seed, enc, param, ib, val_nbytes, tot


def encoded_nbytes(
    msg: SparseMessage, index_encoding: str = "auto", value_dtype: torch.dtype | str | None = None
) -> int:
    """Exact ``len(encode(msg, index_encoding=..., value_dtype=...))`` without building bytes."""
    return _plan(msg, index_encoding, value_dtype)[-1]


def index_payload_nbytes(indices: torch.Tensor, d: int) -> dict[str, int]:
    """Index payload bytes of each applicable explicit encoding (raw32, varint, rice, packed, bitmap)."""
    idx = _check_indices(indices, d)
    which = ("raw32", "varint", "rice", "packed", "bitmap")
    return {e: v[0] for e, v in _index_sizes(idx, d, False, which).items()}


def dense_nbytes(d: int, value_bytes: int = 4) -> int:
    """Bytes of an uncompressed 1-D tensor of ``d`` values (the ``dense`` encoding).

    Equals ``len(encode(SparseMessage((d,), arange(d), values), index_encoding="dense"))``.
    """
    _value_bytes_to_id(value_bytes)
    d = int(d)
    vb = d * value_bytes
    return _total_nbytes((d,), d, "dense", False, 0, vb)


def index_entropy_bits(d: int, k: int) -> float:
    """log2 C(d, k): bits needed to name one k-subset of d coordinates."""
    if not 0 <= k <= d:
        raise ValueError(f"need 0 <= k <= d, got k = {k}, d = {d}")
    return (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / _LN2


# ----------------------------------------------------------------------------------------------
# random-k support
# ----------------------------------------------------------------------------------------------


def random_k_indices(seed: int, d: int, k: int) -> torch.Tensor:
    """Sorted k-of-d indices, uniform without replacement, fixed by ``seed``.

    For k <= d/16: the first k distinct values of an i.i.d. uniform sequence drawn from
    ``torch.Generator().manual_seed(seed)`` (a uniform k-subset, O(k log k) — no O(d) permutation,
    so regenerating a 0.1% support of d = 25M costs milliseconds). Otherwise
    ``torch.randperm(d)[:k]`` from the same generator. Sorted ascending. The random-k compressor
    and the wire's default regenerator both call this function.
    """
    d, k = int(d), int(k)
    if not 0 <= k <= d:
        raise ValueError(f"random-k needs 0 <= k <= d, got k = {k}, d = {d}")
    if k == 0:  # nothing to draw (and no randperm of a possibly huge d)
        return torch.zeros(0, dtype=torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    if 16 * k > d:
        return torch.sort(torch.randperm(d, generator=gen)[:k]).values
    draws = torch.zeros(0, dtype=torch.int64)
    while True:
        extra = torch.randint(0, d, (k + k // 8 + 16,), generator=gen, dtype=torch.int64)
        draws = torch.cat([draws, extra])
        # one stable sort: each distinct value (ascending) with the position of its first draw
        srt, order = torch.sort(draws, stable=True)
        new_value = torch.ones(srt.numel(), dtype=torch.bool)
        torch.ne(srt[1:], srt[:-1], out=new_value[1:])
        values, first = srt[new_value], order[new_value]
        if values.numel() >= k:
            # keep the k values drawn first: those whose first draw is among the k earliest
            # (first positions are distinct, so the cut is exact); values stay ascending
            cut = torch.kthvalue(first, k).values if values.numel() > k else first.max()
            return values[first <= cut]
# ----------------------------------------------------------------------------------------------
# encode / decode
# ----------------------------------------------------------------------------------------------


def encode(
    msg: SparseMessage,
    *,
    index_encoding: str = "auto",
    value_dtype: torch.dtype | str | None = None,
    verify_seed: bool = False,
) -> bytes:
    """Serialise ``msg``.

    index_encoding: ``"auto"`` or one of :data:`INDEX_ENCODINGS` (see the module docstring).
    value_dtype:    float32/float16/bfloat16 (a ``torch.dtype`` or ``"fp32"``, ``"fp16"``,
                    ``"bf16"``); ``None`` keeps ``msg.values.dtype``, which must be one of them.
    verify_seed:    with the ``seed`` encoding, check that ``msg.indices`` equals
                    ``random_k_indices(msg.seed, d, k)`` (costs one ``randperm(d)``).
    Raises ``ValueError`` for invalid messages (unsorted or out-of-range indices, ...).
    """
    shape, d, idx, vid, seed, enc, param, ib, val_nbytes, tot = _plan(msg, index_encoding, value_dtype)
    k = idx.size
    if enc == "seed" and verify_seed:
        expect = random_k_indices(seed, d, k).numpy()
        if not np.array_equal(expect, idx):
            raise ValueError("msg.indices are not random_k_indices(msg.seed, d, k)")

    if enc == "raw32":
        ipay = idx.astype("<i4").tobytes()
    elif enc == "varint":
        ipay = _varint_encode(_gaps_np(idx))
    elif enc == "rice":
        ipay = _rice_encode(_gaps_np(idx), param)
    elif enc == "packed":
        ipay = _packed_encode(_gaps_np(idx), param)
    elif enc == "bitmap":
        ipay = _bitmap_encode(idx, d)
    else:  # seed, dense
        ipay = b""
    if len(ipay) != ib:  # pragma: no cover - internal consistency
        raise AssertionError(f"{enc} payload is {len(ipay)} bytes, predicted {ib}")

    tdt, npdt, _ = _DTYPES[vid]
    vals = msg.values.detach().to("cpu", tdt).contiguous()
    if tdt == torch.bfloat16:
        vpay = vals.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    else:
        vpay = vals.numpy().astype(npdt, copy=False).tobytes()

    head = bytearray(MAGIC)
    head += bytes((VERSION, _ENC_IDS[enc], vid, _FLAG_SEED if seed is not None else 0, len(shape)))
    for s in shape:
        _put_uvarint(head, s)
    _put_uvarint(head, k)
    if enc in _PARAM_ENCODINGS:
        head.append(param)
    if seed is not None:
        head += struct.pack("<Q", seed)
    _put_uvarint(head, len(ipay))
    _put_uvarint(head, len(vpay))
    crc = zlib.crc32(vpay, zlib.crc32(ipay, zlib.crc32(head)))
    out = b"".join((head, ipay, vpay, struct.pack("<I", crc)))
    if len(out) != tot:  # pragma: no cover - internal consistency
        raise AssertionError(f"encoded {len(out)} bytes, predicted {tot}")
    return out


class _Reader:
    def __init__(self, mv: memoryview, end: int, pos: int):
        self.mv, self.end, self.pos = mv, end, pos

    def u8(self, what: str) -> int:
        if self.pos >= self.end:
            raise WireError(f"message truncated while reading {what}")
        v = self.mv[self.pos]
        self.pos += 1
        return v

    def uvarint(self, what: str) -> int:
        x = shift = 0
        for i in range(10):
            b = self.u8(what)
            x |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                if i and b == 0:
                    raise WireError(f"non-canonical varint in {what}")
                if x >= (1 << 64):
                    raise WireError(f"{what} overflows 64 bits")
                return x
        raise WireError(f"varint in {what} longer than 10 bytes")

    def u64(self, what: str) -> int:
        if self.pos + 8 > self.end:
            raise WireError(f"message truncated while reading {what}")
        v = struct.unpack_from("<Q", self.mv, self.pos)[0]
        self.pos += 8
        return v


def decode(
    data: bytes | bytearray | memoryview,
    regenerate: Callable[[int, int, int], torch.Tensor] | None = None,
) -> SparseMessage:
    """Parse and validate a message made by :func:`encode`.

    regenerate: ``(seed, d, k) -> sorted indices`` used for the ``seed`` encoding; defaults to
    :func:`random_k_indices`. Returns a :class:`SparseMessage` whose values have the wire dtype
    and whose ``meta`` records ``index_encoding``, ``rice_r`` (``None`` unless rice), ``packed_b``
    (``None`` unless packed) and ``nbytes``.
    Raises :class:`WireError` on any invalid input.
    """
    try:
        mv = memoryview(data)
    except TypeError as e:
        raise WireError(f"decode needs a bytes-like object, got {type(data).__name__}") from e
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    n = len(mv)
    if n < _FIXED_HEADER + _CRC_BYTES:
        raise WireError(f"message of {n} bytes is shorter than the smallest valid message")
    if bytes(mv[:4]) != MAGIC:
        raise WireError(f"bad magic {bytes(mv[:4])!r} (expected {MAGIC!r}): not a gradsparse message")
    version = mv[4]
    if version != VERSION:
        raise WireError(f"unsupported wire version {version} (this build reads {VERSION})")
    enc_id, vid, flags, ndim = mv[5], mv[6], mv[7], mv[8]
    if enc_id not in _ENC_NAMES:
        raise WireError(f"unknown index encoding id {enc_id}")
    if vid not in _DTYPES:
        raise WireError(f"unknown value dtype id {vid}")
    if flags & ~_FLAG_SEED:
        raise WireError(f"unknown flag bits 0x{flags:02x}")
    enc = _ENC_NAMES[enc_id]

    rd = _Reader(mv, n - _CRC_BYTES, _FIXED_HEADER)
    shape = tuple(rd.uvarint("shape") for _ in range(ndim))
    d = 1
    for s in shape:
        d *= s
        if d >= _MAX_D:
            raise WireError(f"shape {shape} too large")
    k = rd.uvarint("nnz")
    r = rd.u8("rice parameter") if enc == "rice" else None
    pb = rd.u8("packed field width") if enc == "packed" else None
    seed = rd.u64("seed") if flags & _FLAG_SEED else None
    ib = rd.uvarint("index payload length")
    vb = rd.uvarint("value payload length")
    head_end = rd.pos
    expected = head_end + ib + vb + _CRC_BYTES
    if n != expected:
        kind = "truncated" if n < expected else "has trailing bytes"
        raise WireError(f"message {kind}: header describes {expected} bytes, got {n}")
    crc_stored = struct.unpack_from("<I", mv, n - _CRC_BYTES)[0]
    crc = zlib.crc32(mv[: n - _CRC_BYTES])
    if crc != crc_stored:
        raise WireError(f"CRC32 mismatch (stored 0x{crc_stored:08x}, computed 0x{crc:08x}): corrupted message")

    # semantic checks
    if k > d:
        raise WireError(f"nnz {k} exceeds the tensor size {d}")
    tdt, npdt, isz = _DTYPES[vid]
    if vb != k * isz:
        raise WireError(f"value payload is {vb} bytes, expected {k} x {isz}")
    expect_ib = {"raw32": 4 * k, "bitmap": (d + 7) // 8, "seed": 0, "dense": 0}.get(enc)
    if expect_ib is not None and ib != expect_ib:
        raise WireError(f"{enc} index payload is {ib} bytes, expected {expect_ib}")
    if enc == "raw32" and d >= _RAW32_LIMIT:
        raise WireError(f"raw32 indices with d = {d} >= 2**31")
    if enc == "rice" and r > 62:
        raise WireError(f"rice parameter {r} out of range")
    if enc == "packed" and not 1 <= pb <= _PACKED_MAX_B:
        raise WireError(f"packed field width {pb} out of range [1, {_PACKED_MAX_B}]")
    if enc == "seed" and seed is None:
        raise WireError("seed encoding without a seed")
    if enc == "dense" and k != d:
        raise WireError(f"dense encoding with k = {k} != d = {d}")

    ipay = np.frombuffer(mv[head_end : head_end + ib], dtype=np.uint8)
    if enc == "raw32":
        idx = np.frombuffer(ipay, dtype="<i4").astype(np.int64)
        if k and (idx[0] < 0 or idx[-1] >= d or (k > 1 and not np.all(idx[1:] > idx[:-1]))):
            raise WireError("raw32 indices are not strictly increasing within [0, d)")
    elif enc == "varint":
        idx = _indices_from_gaps(_varint_decode(ipay, k), d)
    elif enc == "rice":
        idx = _indices_from_gaps(_rice_decode(ipay, k, r, d), d)
    elif enc == "packed":
        idx = _indices_from_gaps(_packed_decode(ipay, k, pb, d), d)
    elif enc == "bitmap":
        idx = _bitmap_decode(ipay, k, d)
    elif enc == "dense":
        idx = np.arange(d, dtype=np.int64)
    else:  # seed
        regen = random_k_indices if regenerate is None else regenerate
        got = regen(seed, d, k)
        idx = np.asarray(got.cpu() if isinstance(got, torch.Tensor) else got)
        if idx.ndim != 1 or idx.shape[0] != k or (k and not np.issubdtype(idx.dtype, np.integer)):
            raise WireError(f"regenerator returned {idx.shape} {idx.dtype}, expected {k} integer indices")
        idx = idx.astype(np.int64)
        if k and (idx[0] < 0 or idx[-1] >= d or (k > 1 and not np.all(idx[1:] > idx[:-1]))):
            raise WireError("regenerated indices are not strictly increasing within [0, d)")

    raw = np.frombuffer(mv[head_end + ib : head_end + ib + vb], dtype=npdt)
    if tdt == torch.bfloat16:
        values = torch.from_numpy(raw.astype(np.int16)).view(torch.bfloat16)  # raw bit patterns
    else:
        values = torch.from_numpy(raw.astype(raw.dtype.newbyteorder("="), copy=True))
    indices = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    meta = {"index_encoding": enc, "rice_r": r, "packed_b": pb, "nbytes": n}
    return SparseMessage(shape, indices, values, seed=seed, meta=meta)


# ----------------------------------------------------------------------------------------------
# batched exact sizes (simulator accounting)
# ----------------------------------------------------------------------------------------------


def _segsum(ptr: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Exact int64 per-row sums of integer weights ``w`` (row i is the slice ptr[i]:ptr[i+1])."""
    n = ptr.size - 1
    out = np.zeros(n, dtype=np.int64)
    nonempty = np.flatnonzero(ptr[1:] > ptr[:-1])
    if nonempty.size:
        out[nonempty] = np.add.reduceat(w, ptr[nonempty], dtype=np.int64)
    return out


def _check_batch_args(d: int, value_bytes: int, index_encoding: str) -> None:
    _value_bytes_to_id(value_bytes)
    if d >= _MAX_D:
        raise ValueError(f"d = {d} too large for the wire")
    if index_encoding != "auto" and index_encoding not in _ENC_IDS:
        raise ValueError(
            f"unknown index encoding {index_encoding!r}; allowed: auto, {', '.join(INDEX_ENCODINGS)}"
        )
    if index_encoding == "raw32" and d >= _RAW32_LIMIT:
        raise ValueError(f"raw32 indices need d < 2**31, got d = {d}")


def _needs_gaps(index_encoding: str) -> bool:
    return index_encoding in ("auto", "varint", "rice", "packed")


def _batch_sizes(k: np.ndarray, g: np.ndarray, d: int, value_bytes: int,
                 index_encoding: str) -> torch.Tensor:
    """Exact sizes of n 1-D messages of length d: row i holds k[i] entries whose gaps (as in
    ``_gaps_np``) are the next k[i] entries of ``g`` (row-major; ``g`` may be empty when the
    encoding does not need gaps)."""
    _check_batch_args(d, value_bytes, index_encoding)
    n = k.size
    if index_encoding == "auto":
        cands: tuple[str, ...] = _AUTO_ORDER
    else:
        cands = (index_encoding,)
    seeded = index_encoding == "seed"
    k = k.astype(np.int64)
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(k, out=ptr[1:])
    if index_encoding == "dense" and np.any(k != d):
        raise ValueError("the dense encoding needs every row to be full (k == d)")


    def vlen(x: np.ndarray) -> np.ndarray:
        return _varint_lens_np(x, 1 << 63 if x.size == 0 else None)

    vbytes = k * value_bytes
    base = (_FIXED_HEADER + _uvarint_len(d) + vlen(k) + vlen(vbytes) + vbytes + _CRC_BYTES
            + (_SEED_BYTES if seeded else 0))
    big = np.iinfo(np.int64).max
    best = np.full(n, big, dtype=np.int64)
    for enc in cands:
        extra = 0
        if enc == "raw32":
            if d >= _RAW32_LIMIT:
                continue
            ib = 4 * k
        elif enc == "varint":
            ib = k.copy()
            extra_bytes = None  # per gap: number of bytes beyond the first
            t = 7
            while t < 63 and (1 << t) < d:
                ge = (g >= (1 << t)).view(np.int8)
                extra_bytes = ge if extra_bytes is None else extra_bytes + ge
                t += 7
            if extra_bytes is not None:
                ib += _segsum(ptr, extra_bytes)
        elif enc == "rice":
            ib = (_batch_rice_bits(ptr, g, k) + 7) // 8
            extra = 1
        elif enc == "packed":
            ib = _packed_choose_rows(g, k)[1]
            extra = 1
        elif enc == "bitmap":
            ib = np.full(n, (d + 7) // 8, dtype=np.int64)
        elif enc == "seed":
            ib = np.zeros(n, dtype=np.int64)
        else:  # dense
            ib = np.where(k == d, 0, big // 4)
        tot = base + extra + vlen(ib) + ib
        if enc == "dense":
            tot = np.where(k == d, tot, big)
        best = np.minimum(best, tot)
    return torch.from_numpy(best)


def _batch_rice_bits(ptr: np.ndarray, g: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Per-row Rice payload bits at each row's smallest bit-minimising r (as in encode):
    r = min{r : D(r) <= k} with D(r) = S(r) - S(r + 1), S(r) = sum_j (g_j >> r), found by
    walking every row from its estimate (D is non-increasing in r)."""
    if g.size == 0:
        return np.zeros(k.size, dtype=np.int64)
    s0 = _segsum(ptr, g).astype(np.float64)
    r = np.floor(np.log2(_LN2 * (s0 / np.maximum(k, 1) + 1.0))).astype(np.int64)
    r = np.maximum(r, 0)
    r[k == 0] = 0
    rmax = 8 * g.itemsize - 2
    whole: dict[int, np.ndarray] = {}  # scalar r -> S(r) of every row

    def S(rv: np.ndarray) -> np.ndarray:
        rv = np.minimum(rv, rmax)
        vals = np.unique(rv[k > 0])
        if vals.size <= 4:  # usual case (similar rows): a few whole-array shifts, no gather
            out = np.zeros(k.size, dtype=np.int64)
            for v in vals.tolist():
                if v not in whole:
                    whole[v] = _segsum(ptr, g >> v if v else g)
                sel = rv == v
                out[sel] = whole[v][sel]
            return out
        return _segsum(ptr, g >> np.repeat(rv.astype(g.dtype), k))

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


def batch_encoded_nbytes(
    mask: torch.Tensor,
    value_bytes: int = 4,
    index_encoding: str = "auto",
) -> torch.LongTensor:
    """Exact ``encoded_nbytes`` of the n messages whose supports are the rows of ``mask``.

    mask: bool ``[n, d]`` (each row is one 1-D message of ``d`` entries without a seed, except for
    ``index_encoding="seed"``, which counts the header's 8-byte seed and no index payload).
    value_bytes: 4 (fp32) or 2 (fp16 / bf16). Returns an int64 tensor ``[n]``.
    Vectorised: one ``flatnonzero`` of the mask, then per-row reductions by cumulative sums.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [n, d], got shape {tuple(mask.shape)}")
    n, d = mask.shape
    m = mask.detach().to("cpu")
    if m.dtype != torch.bool:
        m = m != 0
    _check_batch_args(d, value_bytes, index_encoding)
    flat = np.flatnonzero(m.contiguous().numpy().reshape(-1))  # row-major positions
    if d == 0:
        return _batch_sizes(np.zeros(n, dtype=np.int64), flat, d, value_bytes, index_encoding)
    ptr = np.searchsorted(flat, np.arange(n + 1, dtype=np.int64) * d)
    k = np.diff(ptr)
    g = np.zeros(0, dtype=np.int64)
    if _needs_gaps(index_encoding) and flat.size:
        # gaps straight from the flat positions; a row's first gap is its first column
        dt = np.int32 if d < _RAW32_LIMIT else np.int64  # gaps < d
        g = np.empty(flat.size, dtype=np.int64)
        g[0] = flat[0]
        np.subtract(flat[1:], flat[:-1], out=g[1:])
        g[1:] -= 1
        nonempty = np.flatnonzero(k)
        g[ptr[nonempty]] = flat[ptr[nonempty]] - nonempty * d
        g = g.astype(dt, copy=False)
    return _batch_sizes(k, g, d, value_bytes, index_encoding)


def batch_encoded_nbytes_from_indices(
    indices: torch.Tensor,
    d: int,
    value_bytes: int = 4,
    index_encoding: str = "auto",
) -> torch.LongTensor:
    """As :func:`batch_encoded_nbytes` for supports given as indices ``[n, k]`` (any order,
    unique within a row), e.g. straight from ``torch.topk``; avoids scanning an ``[n, d]`` mask."""
    if indices.dim() != 2:
        raise ValueError(f"indices must be [n, k], got shape {tuple(indices.shape)}")
    n, k = indices.shape
    d = int(d)
    _check_batch_args(d, value_bytes, index_encoding)
    cols = np.sort(indices.detach().to("cpu", torch.int64).numpy(), axis=1)
    if k and (cols[:, 0].min() < 0 or cols[:, -1].max() >= d):
        raise ValueError(f"indices must lie in [0, {d})")
    g = np.zeros(0, dtype=np.int64)
    if k > 1 or _needs_gaps(index_encoding):
        g = cols.copy()
        g[:, 1:] -= cols[:, :-1]
        g[:, 1:] -= 1
        if k > 1 and g[:, 1:].min() < 0:
            raise ValueError("indices must be unique within each row")
        g = g.astype(np.int32 if d < _RAW32_LIMIT else np.int64, copy=False).reshape(-1)
    return _batch_sizes(np.full(n, k, dtype=np.int64), g, d, value_bytes, index_encoding)
