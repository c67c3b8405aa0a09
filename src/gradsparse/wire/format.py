"""Frame layout of the gradsparse wire format: constants, header read/write, CRC, frame sizes.

A batch (:class:`~gradsparse.messages.SparseBatch`, n rows of length d) goes on the wire as the
concatenation of n *frames*, one per row, in row order. Every frame is self-delimiting (its header
gives the lengths of its payloads) and carries its own CRC, so a buffer of frames is parsed front
to back with no outer framing.

Frame layout (version 2, all multi-byte integers little-endian)
---------------------------------------------------------------
======================  =========================================================================
field                   encoding
======================  =========================================================================
magic                   4 bytes ``b"GSPW"``
version                 u8: the smallest version that can express the frame (2, or 3 for float64
                        values); the reader accepts 1, 2 and 3 (see the history below)
index encoding id       u8: 0 raw32, 1 varint, 2 rice, 3 bitmap, 4 seed, 5 dense, 6 packed
value dtype id          u8: 0 float32, 1 float16, 2 bfloat16, 3 float64 (since version 3)
flags                   u8: bit 0 = a seed follows; all other bits must be 0
ndim                    u8: 1 when written (a row is a vector of d entries)
shape                   ndim unsigned LEB128 varints; d = their product
count (k)               unsigned LEB128 varint: entries in the frame (d for ``dense``)
parameter byte          u8, only for ``rice`` (the Rice parameter r) and ``packed`` (field width b)
seed                    u64 (fixed 8 bytes so sizes do not depend on the seed), only if flags bit 0
index payload length    unsigned LEB128 varint (bytes)
value payload length    unsigned LEB128 varint (bytes), always ``k * itemsize``
index payload           see :mod:`gradsparse.wire.codecs`
value payload           k values, IEEE float32 / float16 / float64, or raw bfloat16 bit patterns (u16)
CRC32                   u32, ``zlib.crc32`` of every byte of the frame above
======================  =========================================================================

Frames written by older code may have ``ndim != 1`` (the shape of the tensor the message was a
sparse view of, 0 for a scalar): the reader *flattens* them, i.e. reads them as a row of
d = prod(shape) entries whose columns are the row-major flat positions (exactly what their
indices were), and the shape itself is dropped.

Index encodings (``d`` = row length, columns ``i_0 < ... < i_{k-1}``)
---------------------------------------------------------------------
The gap-based codes use ``g_j = i_j - i_{j-1} - 1 >= 0`` with ``i_{-1} = -1`` (so the first gap is
the first column itself, and adjacent columns give gap 0).

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
  field j is bit ``(j b + i) % 8`` of byte ``(j b + i) // 8``. Each group of 8 fields is exactly
  ``b`` bytes, so every group starts on a byte boundary; the bits after field k - 1 up to the byte
  boundary are zero. Then the exception stream: ``t = g_j - E`` of each escaped field, in field
  order, as canonical unsigned LEB128 varints; it holds exactly one varint per escape and ends
  with the payload. ``b`` is the *exact* minimiser (smallest on ties, b = 1 when k = 0) over
  ``1..32`` of the payload bytes ``ceil(k b / 8) + sum_{g_j >= E} len(varint(g_j - E))``.
* ``bitmap`` - d bits, bit ``i`` of the support at byte ``i // 8``, bit ``i % 8`` (least
  significant first, ``np.packbits(..., bitorder="little")``); padding bits are zero.
* ``seed``   - no index payload: the receiver regenerates the columns from the header's seed with
  ``regenerate(seed, d, k)``, by default :func:`gradsparse.random_support.random_k_indices` (the
  random-k compressor draws its columns with that same function).
* ``dense``  - no index payload, ``k == d``: every entry of the row is sent, in column order.

Choosing an encoding (``index_encoding="auto"``), and what a row is charged
----------------------------------------------------------------------------
Each row gets the smallest frame among ``raw32`` (if ``d < 2**31``), ``varint``, ``rice``,
``packed``, ``bitmap`` and ``dense`` (ties go to the first in that order). ``dense`` is a candidate
*whatever the row's count*: a row whose sparse frame would be larger than the dense frame is sent
dense (all d values, zeros off its support; it decodes to the same dense row), so no row is ever
charged more than :func:`~gradsparse.wire.sizing.dense_nbytes`. Rows of a ``dense`` batch go
dense; seeded (random-k) rows go ``seed``. A row with a seed keeps the seed in its frame (flags
bit 0) under every encoding, so a seeded row sent dense would be 8 bytes above ``dense_nbytes``;
for ``k <= d`` the ``seed`` frame is never larger, so ``auto`` never picks it. The byte count of
every row is :func:`~gradsparse.wire.sizing.encoded_nbytes`, equal to the frame's length.

Decoding validates everything (magic, version, enum ids, flags, lengths, CRC, column order and
range, padding, canonical varints, regenerated supports, the caller's bound ``max_d`` on d) and
raises :class:`WireError` on any inconsistency: a corrupted, truncated or extended frame never
decodes to a row. A buffer cut exactly at a frame boundary is a valid buffer of fewer rows: the
transport must know how many rows (or bytes) it expects.

Version history
---------------
``VERSION`` is bumped whenever an encoding id is added (or anything else changes how a frame is
read), and the reader states which ids each version may use.

* 1 - ids 0-5 (raw32, varint, rice, bitmap, seed, dense); ``dense`` only for full rows.
* 2 - adds ``packed`` (id 6; it first shipped inside version 1 without a bump, which this version
  corrects: a version-1 frame with id 6 is now rejected), and the rule above that ``auto`` may
  send a sparse row dense. Frames of ids 0-5 are laid out exactly as in version 1 (only the
  version byte, hence the CRC, differs); the reader accepts both versions.
* 3 - adds the value dtype id 3 (float64, 8 bytes per value), so a float64 model or message can
  travel exactly. Only frames with float64 values are written as version 3; every other frame is
  still written as version 2, byte for byte as before, so older readers keep reading them.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

import torch

__all__ = [
    "MAGIC",
    "VERSION",
    "READABLE_VERSIONS",
    "INDEX_ENCODINGS",
    "VALUE_DTYPES",
    "DEFAULT_MAX_D",
    "DEFAULT_MAX_ELEMENTS",
    "DEFAULT_MAX_BYTES",
    "WireError",
    "FrameHeader",
]

MAGIC = b"GSPW"
#: Version written by :func:`~gradsparse.wire.encode`. Bumped whenever an encoding id is added.
VERSION = 3
#: Versions the reader accepts.
READABLE_VERSIONS: tuple[int, ...] = (1, 2, 3)
#: The version written for frames that use nothing newer (see the version history).
BASE_WRITE_VERSION = 2

ENCODING_IDS = {"raw32": 0, "varint": 1, "rice": 2, "bitmap": 3, "seed": 4, "dense": 5, "packed": 6}
ENCODING_NAMES = {v: k for k, v in ENCODING_IDS.items()}
#: The first version whose frames may use each encoding id.
ENCODING_SINCE_VERSION = {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 2}
#: Names accepted by ``index_encoding`` (plus ``"auto"``).
INDEX_ENCODINGS: tuple[str, ...] = tuple(ENCODING_IDS)
#: Candidates of ``index_encoding="auto"`` for rows without a seed, in tie-breaking order.
AUTO_ORDER = ("raw32", "varint", "rice", "packed", "bitmap", "dense")
#: Candidates of ``index_encoding="auto"`` for seeded rows.
AUTO_ORDER_SEEDED = ("seed", "dense")
#: The encodings whose header carries a parameter byte.
PARAMETER_ENCODINGS = ("rice", "packed")
#: The explicit encodings: those with an index payload.
EXPLICIT_ENCODINGS = ("raw32", "varint", "rice", "packed", "bitmap")


class ValueDtype(NamedTuple):
    torch: torch.dtype
    numpy: str  # little-endian numpy dtype of the payload (bfloat16 as raw u16 bit patterns)
    itemsize: int


VALUE_DTYPE_TABLE: dict[int, ValueDtype] = {
    0: ValueDtype(torch.float32, "<f4", 4),
    1: ValueDtype(torch.float16, "<f2", 2),
    2: ValueDtype(torch.bfloat16, "<i2", 2),
    3: ValueDtype(torch.float64, "<f8", 8),
}
#: The first version whose frames may carry each value dtype id.
VALUE_DTYPE_SINCE_VERSION = {0: 1, 1: 1, 2: 1, 3: 3}
VALUE_DTYPE_IDS = {v.torch: k for k, v in VALUE_DTYPE_TABLE.items()}
VALUE_DTYPE_ALIASES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}
#: Value dtypes the wire carries.
VALUE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

FIXED_HEADER_NBYTES = 9  # magic, version, encoding, dtype, flags, ndim
CRC_NBYTES = 4
SEED_NBYTES = 8
FLAG_SEED = 0x01
MAX_D = 1 << 62  # d must be < 2**62 (keeps every index and gap sum inside int64)
RAW32_LIMIT = 1 << 31
PACKED_MAX_WIDTH = 32  # packed field widths 1..32
MAX_RICE_PARAMETER = 62
#: Default bound of :func:`~gradsparse.wire.decode` on the d a frame may claim.
DEFAULT_MAX_D = (1 << 31) - 1
#: decode's default bound on the entries of all frames together (indices and values allocated)
DEFAULT_MAX_ELEMENTS = 1 << 28
#: decode's default bound on the buffer's size in bytes
DEFAULT_MAX_BYTES = 1 << 32
#: Smallest possible frame: fixed header, ndim 0, k, both lengths, CRC.
MIN_FRAME_NBYTES = FIXED_HEADER_NBYTES + 3 + CRC_NBYTES


class WireError(ValueError):
    """A byte string is not valid gradsparse wire data (corrupt, truncated, extended...)."""


# ----------------------------------------------------------------------------------------------
# varints, dtypes, encodings
# ----------------------------------------------------------------------------------------------


def uvarint_len(x: int) -> int:
    """Bytes of the unsigned LEB128 varint of ``x``."""
    return (int(x).bit_length() + 6) // 7 or 1


def put_uvarint(out: bytearray, x: int) -> None:
    x = int(x)
    while True:
        b = x & 0x7F
        x >>= 7
        if x:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def resolve_value_dtype(dt) -> int:
    """The wire id of a value dtype given as a torch dtype or a name (fp32, fp16, bf16, ...)."""
    if isinstance(dt, str):
        key = dt.lower()
        if key not in VALUE_DTYPE_ALIASES:
            raise ValueError(f"unknown value dtype {dt!r}; allowed: fp32, fp16, bf16, fp64")
        dt = VALUE_DTYPE_ALIASES[key]
    if dt not in VALUE_DTYPE_IDS:
        raise ValueError(
            f"the wire carries float32, float16, bfloat16 or float64 values, not {dt}; "
            "pass value_dtype= to cast"
        )
    return VALUE_DTYPE_IDS[dt]


def value_dtype_of(dt) -> torch.dtype:
    """The torch dtype of a wire value dtype given as a name (fp32, fp16, bf16, fp64) or dtype."""
    return VALUE_DTYPE_TABLE[resolve_value_dtype(dt)].torch


def round_values(values: torch.Tensor, value_dtype) -> torch.Tensor:
    """``values`` as a receiver decodes them from frames carrying ``value_dtype``, in the values'
    own dtype: rounded to nearest (ties to even) in the wire dtype, and finite values beyond its
    largest finite value *saturated* to it (so a finite value never arrives as inf; fp16's range
    is +-65504). NaN and infinities pass unchanged. Returns ``values`` itself when the wire dtype
    holds every value of the values' dtype exactly (the same dtype, or float32 values on a
    float64 wire)."""
    target, source = value_dtype_of(value_dtype), values.dtype
    if source == target or not source.is_floating_point:
        return values
    wide, have = torch.finfo(target), torch.finfo(source)
    if wide.eps <= have.eps and wide.max >= have.max and wide.smallest_normal <= have.smallest_normal:
        return values
    if have.max > wide.max:
        over = (values.abs() > wide.max) & torch.isfinite(values)
        if bool(over.any()):  # saturate in float64, where the target's largest value is exact
            wider = values.to(torch.float64)
            return torch.where(over, wider.sign() * wide.max, wider).to(target).to(source)
    return values.to(target).to(source)


def check_value_bytes(value_bytes: int) -> int:
    if value_bytes not in (2, 4, 8):
        raise ValueError(f"value_bytes must be 4 (fp32), 2 (fp16/bf16) or 8 (fp64), got {value_bytes!r}")
    return int(value_bytes)


def check_index_encoding(index_encoding: str) -> str:
    if index_encoding != "auto" and index_encoding not in ENCODING_IDS:
        raise ValueError(
            f"unknown index encoding {index_encoding!r}; allowed: auto, {', '.join(INDEX_ENCODINGS)}"
        )
    return index_encoding


def check_d(d: int) -> int:
    d = int(d)
    if not 0 <= d < MAX_D:
        raise ValueError(f"row length d = {d} is outside the wire's range [0, 2**62)")
    return d


def check_seed(seed) -> int:
    seed = int(seed)
    if not 0 <= seed < (1 << 63):
        raise ValueError(f"seeds must lie in [0, 2**63), got {seed}")
    return seed


# ----------------------------------------------------------------------------------------------
# frame sizes
# ----------------------------------------------------------------------------------------------


def header_nbytes(d: int, k: int, encoding: str, seeded: bool, index_nbytes: int, value_nbytes: int) -> int:
    """Bytes of a 1-D frame's header (everything before the index payload)."""
    n = FIXED_HEADER_NBYTES + uvarint_len(d) + uvarint_len(k)
    if encoding in PARAMETER_ENCODINGS:
        n += 1
    if seeded:
        n += SEED_NBYTES
    return n + uvarint_len(index_nbytes) + uvarint_len(value_nbytes)


def frame_nbytes(d: int, k: int, encoding: str, seeded: bool, index_nbytes: int, value_nbytes: int) -> int:
    """Bytes of a whole 1-D frame: header, payloads and CRC."""
    return (
        header_nbytes(d, k, encoding, seeded, index_nbytes, value_nbytes)
        + index_nbytes + value_nbytes + CRC_NBYTES
    )


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def write_frame(
    d: int, k: int, encoding: str, value_dtype_id: int, parameter: int | None, seed: int | None,
    index_payload: bytes, value_payload: bytes,
) -> bytes:
    """One 1-D frame (header, payloads, CRC), of the smallest version that can express it
    (:data:`BASE_WRITE_VERSION`, or the version that introduced its value dtype)."""
    version = max(BASE_WRITE_VERSION, VALUE_DTYPE_SINCE_VERSION[value_dtype_id])
    head = bytearray(MAGIC)
    head += bytes((version, ENCODING_IDS[encoding], value_dtype_id, FLAG_SEED if seed is not None else 0, 1))
    put_uvarint(head, d)
    put_uvarint(head, k)
    if encoding in PARAMETER_ENCODINGS:
        head.append(parameter)
    if seed is not None:
        head += struct.pack("<Q", seed)
    put_uvarint(head, len(index_payload))
    put_uvarint(head, len(value_payload))
    crc = zlib.crc32(value_payload, zlib.crc32(index_payload, zlib.crc32(head)))
    return b"".join((head, index_payload, value_payload, struct.pack("<I", crc)))


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


class FrameHeader(NamedTuple):
    """What a frame's header says, and where its parts lie in the buffer."""

    version: int
    encoding: str
    value_dtype: torch.dtype
    d: int
    count: int
    #: the rice parameter r or the packed field width b; None for other encodings
    parameter: int | None
    seed: int | None
    #: offsets in the buffer: frame start, index payload start, value payload start, frame end
    start: int
    index_start: int
    value_start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def index_nbytes(self) -> int:
        return self.value_start - self.index_start


_FIXED_HEADER = struct.Struct("<4s5B")


def _uvarint_at(mv: memoryview, pos: int, end: int, what: str) -> tuple[int, int]:
    """The canonical unsigned LEB128 varint at ``pos`` (at most 10 bytes, < 2**64) and the
    position after it (:meth:`_Reader.uvarint` reads through it)."""
    x = shift = 0
    for i in range(10):
        if pos >= end:
            raise WireError(f"frame truncated while reading {what}")
        b = mv[pos]
        pos += 1
        x |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            if i and b == 0:
                raise WireError(f"non-canonical varint in {what}")
            if x >= (1 << 64):
                raise WireError(f"{what} overflows 64 bits")
            return x, pos
    raise WireError(f"varint in {what} longer than 10 bytes")


class _Reader:
    def __init__(self, mv: memoryview, end: int, pos: int):
        self.mv, self.end, self.pos = mv, end, pos

    def u8(self, what: str) -> int:
        if self.pos >= self.end:
            raise WireError(f"frame truncated while reading {what}")
        v = self.mv[self.pos]
        self.pos += 1
        return v

    def uvarint(self, what: str) -> int:
        x, self.pos = _uvarint_at(self.mv, self.pos, self.end, what)
        return x

    def u64(self, what: str) -> int:
        if self.pos + 8 > self.end:
            raise WireError(f"frame truncated while reading {what}")
        v = struct.unpack_from("<Q", self.mv, self.pos)[0]
        self.pos += 8
        return v


def as_byte_view(data) -> memoryview:
    """A flat byte memoryview of ``data`` (any contiguous buffer-protocol object)."""
    try:
        mv = memoryview(data)
    except TypeError as e:
        raise WireError(f"decode needs a bytes-like object, got {type(data).__name__}") from e
    if not mv.c_contiguous:
        raise WireError("decode needs a contiguous buffer (got a strided view); copy it first")
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def read_frame_header(mv: memoryview, start: int, max_d: int) -> FrameHeader:
    """Parse and check the header of the frame at ``start``, and its CRC.

    Checks everything the header alone decides (magic, version, ids, flags, lengths against the
    buffer, CRC, count and payload sizes against d and the encoding, ``d <= max_d``); the payload
    codecs check the payloads.
    """
    n = len(mv)
    if n - start < MIN_FRAME_NBYTES:
        raise WireError(
            f"frame at byte {start} has {n - start} bytes, fewer than the smallest valid frame"
        )
    magic, version, enc_id, vid, flags, ndim = _FIXED_HEADER.unpack_from(mv, start)
    if magic != MAGIC:
        raise WireError(
            f"bad magic {magic!r} at byte {start} (expected {MAGIC!r}): not a gradsparse frame"
        )
    if version not in READABLE_VERSIONS:
        raise WireError(f"unsupported wire version {version} (this build reads {READABLE_VERSIONS})")
    if enc_id not in ENCODING_NAMES:
        raise WireError(f"unknown index encoding id {enc_id}")
    if version < ENCODING_SINCE_VERSION[enc_id]:
        raise WireError(
            f"index encoding id {enc_id} ({ENCODING_NAMES[enc_id]}) needs wire version >= "
            f"{ENCODING_SINCE_VERSION[enc_id]}, the frame is version {version}"
        )
    if vid not in VALUE_DTYPE_TABLE:
        raise WireError(f"unknown value dtype id {vid}")
    if version < VALUE_DTYPE_SINCE_VERSION[vid]:
        raise WireError(
            f"value dtype id {vid} ({str(VALUE_DTYPE_TABLE[vid].torch).removeprefix('torch.')}) needs wire "
            f"version >= {VALUE_DTYPE_SINCE_VERSION[vid]}, the frame is version {version}"
        )
    if flags & ~FLAG_SEED:
        raise WireError(f"unknown flag bits 0x{flags:02x}")
    enc = ENCODING_NAMES[enc_id]

    pos = start + FIXED_HEADER_NBYTES
    d = 1
    shape = []
    for _ in range(ndim):
        s, pos = _uvarint_at(mv, pos, n, "shape")
        shape.append(s)
        d *= s
        if d >= MAX_D:
            raise WireError(f"shape {tuple(shape)} too large")
    if d > max_d:
        raise WireError(f"frame claims d = {d}, above the decoder's bound max_d = {max_d}")
    k, pos = _uvarint_at(mv, pos, n, "count")
    rd = _Reader(mv, n, pos)
    param = rd.u8(f"{enc} parameter") if enc in PARAMETER_ENCODINGS else None
    seed = rd.u64("seed") if flags & FLAG_SEED else None
    if seed is not None and seed >= (1 << 63):
        raise WireError(f"seed {seed} is >= 2**63 (seeds lie in [0, 2**63): a SparseBatch holds them as int64)")
    ib, pos = _uvarint_at(mv, rd.pos, n, "index payload length")
    vb, pos = _uvarint_at(mv, pos, n, "value payload length")
    index_start = pos
    end = index_start + ib + vb + CRC_NBYTES
    if end > n:
        raise WireError(f"frame truncated: its header describes {end - start} bytes, {n - start} remain")
    crc_stored = struct.unpack_from("<I", mv, end - CRC_NBYTES)[0]
    crc = zlib.crc32(mv[start : end - CRC_NBYTES])
    if crc != crc_stored:
        raise WireError(f"CRC32 mismatch (stored 0x{crc_stored:08x}, computed 0x{crc:08x}): corrupted frame")

    # what the header alone decides
    if k > d:
        raise WireError(f"nnz {k} exceeds the row length {d}")
    vdt = VALUE_DTYPE_TABLE[vid]
    if vb != k * vdt.itemsize:
        raise WireError(f"value payload is {vb} bytes, expected {k} x {vdt.itemsize}")
    expect_ib = {"raw32": 4 * k, "bitmap": (d + 7) // 8, "seed": 0, "dense": 0}.get(enc)
    if expect_ib is not None and ib != expect_ib:
        raise WireError(f"{enc} index payload is {ib} bytes, expected {expect_ib}")
    if enc == "raw32" and d >= RAW32_LIMIT:
        raise WireError(f"raw32 indices with d = {d} >= 2**31")
    if enc == "rice" and param > MAX_RICE_PARAMETER:
        raise WireError(f"rice parameter {param} out of range")
    if enc == "packed" and not 1 <= param <= PACKED_MAX_WIDTH:
        raise WireError(f"packed field width {param} out of range [1, {PACKED_MAX_WIDTH}]")
    if enc == "seed" and seed is None:
        raise WireError("seed encoding without a seed")
    if enc == "dense" and k != d:
        raise WireError(f"dense encoding with k = {k} != d = {d}")
    return FrameHeader(version, enc, vdt.torch, d, k, param, seed, start, index_start, index_start + ib, end)
