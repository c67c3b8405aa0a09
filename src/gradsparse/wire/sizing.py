"""Exact frame sizes without building bytes.

Every number of bytes that gradsparse reports as "sent" is the length of the frame
:func:`gradsparse.wire.encode` would put on the wire for that row: :func:`encoded_nbytes` gives it
for every row of a :class:`~gradsparse.messages.SparseBatch` at once (vectorised: no Python loop
over rows or entries; a step of 100 rows of ~50 entries costs a few hundred microseconds), and
``sum(encoded_nbytes(b)) == len(encode(b))`` holds exactly for the same ``index_encoding`` and
``value_dtype``. :func:`dense_nbytes` is the size of a dense row, the most ``auto`` ever charges.

The batched machinery works on the rows' gaps (:func:`gradsparse.wire.codecs.gaps`), laid out row
after row: fixed-count batches build them from the ``[n, k]`` column matrix (one sort along rows
when the columns are not known to be sorted), ragged batches from the flat column array and the
row offsets. Varint sizes are counts of gaps above the byte thresholds, Rice sizes a per-row walk
of the parameter from its estimate, packed sizes a per-row histogram of gaps against the escape
thresholds (:func:`gradsparse.wire.codecs.packed_choose_rows`); all exact.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from . import codecs
from .format import (
    AUTO_ORDER,
    AUTO_ORDER_SEEDED,
    CRC_NBYTES,
    EXPLICIT_ENCODINGS,
    FIXED_HEADER_NBYTES,
    PARAMETER_ENCODINGS,
    RAW32_LIMIT,
    SEED_NBYTES,
    VALUE_DTYPE_TABLE,
    check_d,
    check_index_encoding,
    check_value_bytes,
    frame_nbytes,
    resolve_value_dtype,
    uvarint_len,
)

__all__ = [
    "encoded_nbytes",
    "dense_nbytes",
    "index_payload_nbytes",
    "index_entropy_bits",
]

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# one row (what encode uses to choose)
# ----------------------------------------------------------------------------------------------


class RowPlan(NamedTuple):
    encoding: str
    parameter: int | None  # rice r / packed b
    index_nbytes: int
    nbytes: int  # the whole frame


def _index_sizes(idx: np.ndarray, d: int, which, g: np.ndarray | None = None) -> dict[str, tuple[int, int | None]]:
    """{encoding: (index payload bytes, parameter)} of the explicit encodings in ``which`` that
    apply to the sorted unique columns ``idx`` (``g``: their gaps, computed when needed and not
    given). The gap codes share the gaps and their largest value."""
    out: dict[str, tuple[int, int | None]] = {}
    if g is None and any(enc in codecs.GAP_ENCODINGS for enc in which):
        g = codecs.gaps(idx)
    gmax = int(np.maximum.reduce(g)) if g is not None and g.size else 0
    for enc in which:
        if enc == "raw32":
            if d < RAW32_LIMIT:
                out[enc] = (4 * idx.size, None)
        elif enc == "varint":
            out[enc] = (codecs.varint_nbytes(g, gmax), None)
        elif enc == "rice":
            r, bits = codecs.rice_choose(g)
            out[enc] = ((bits + 7) // 8, r)
        elif enc == "packed":
            b, nbytes = codecs.packed_choose(g, gmax)
            out[enc] = (nbytes, b)
        elif enc == "bitmap":
            out[enc] = ((d + 7) // 8, None)
    return out


def _dense_frame_nbytes(d: int, value_bytes: int, seeded: bool) -> int:
    return frame_nbytes(d, d, "dense", seeded, 0, d * value_bytes)


def row_candidates(index_encoding: str, seeded: bool, dense_row: bool = False) -> tuple[str, ...]:
    """The encodings one row may get, in tie-breaking order."""
    if index_encoding == "auto":
        return ("dense",) if dense_row else (AUTO_ORDER_SEEDED if seeded else AUTO_ORDER)
    return (index_encoding,)


def plan_row(
    idx: np.ndarray, d: int, seeded: bool, value_bytes: int, index_encoding: str, dense_row: bool = False,
    g: np.ndarray | None = None,
) -> RowPlan:
    """Encoding, parameter and sizes of one row's frame (sorted unique columns ``idx``, whose
    gaps ``g`` are computed when needed and not given; a ``dense_row`` holds all d columns and
    goes dense under ``auto``)."""
    cands = row_candidates(index_encoding, seeded, dense_row)
    if cands == ("seed",) and not seeded:
        raise ValueError("the seed encoding needs a batch with seeds (random-k rows)")
    if cands == ("raw32",) and d >= RAW32_LIMIT:
        raise ValueError(f"raw32 indices need d < 2**31, got d = {d}; use varint, rice or packed")
    k = idx.size
    vbytes = k * value_bytes
    sizes = _index_sizes(idx, d, [c for c in cands if c in EXPLICIT_ENCODINGS], g)
    # the bytes of every sparse frame of this row but its index payload, the payload's length and
    # the parameter byte (see frame_nbytes)
    common = (FIXED_HEADER_NBYTES + uvarint_len(d) + uvarint_len(k) + (SEED_NBYTES if seeded else 0)
              + uvarint_len(vbytes) + vbytes + CRC_NBYTES)
    best: RowPlan | None = None
    for enc in cands:
        if enc == "dense":
            plan = RowPlan("dense", None, 0, _dense_frame_nbytes(d, value_bytes, seeded))
        elif enc == "seed":
            plan = RowPlan("seed", None, 0, common + uvarint_len(0))
        elif enc in sizes:
            ib, param = sizes[enc]
            plan = RowPlan(enc, param, ib, common + (enc in PARAMETER_ENCODINGS) + uvarint_len(ib) + ib)
        else:
            continue
        if best is None or plan.nbytes < best.nbytes:
            best = plan
    return best


# ----------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------


def _sizes_from_gaps(
    k: np.ndarray, g: np.ndarray, d: int, value_bytes: int, index_encoding: str, seeded: bool
) -> torch.Tensor:
    """Exact frame sizes of n rows of length d: row i holds k[i] entries whose gaps are the next
    k[i] entries of ``g`` (row after row; ``g`` may be empty when no candidate needs gaps)."""
    n = k.size
    if index_encoding == "auto":
        cands: tuple[str, ...] = AUTO_ORDER_SEEDED if seeded else AUTO_ORDER
    else:
        cands = (index_encoding,)
    if cands == ("seed",) and not seeded:
        raise ValueError("the seed encoding needs seeded rows (random-k)")
    if cands == ("raw32",) and d >= RAW32_LIMIT:
        raise ValueError(f"raw32 indices need d < 2**31, got d = {d}")
    k = k.astype(np.int64, copy=False)
    vbytes = k * value_bytes
    # every frame but a dense one: header without the parameter byte and index length, payload
    # of values, CRC
    base = (FIXED_HEADER_NBYTES + uvarint_len(d) + codecs.varint_lengths(k)
            + codecs.varint_lengths(vbytes) + vbytes + CRC_NBYTES + (SEED_NBYTES if seeded else 0))
    ptr = None
    best = None
    for enc in cands:
        if enc == "dense":
            tot = np.full(n, _dense_frame_nbytes(d, value_bytes, seeded), dtype=np.int64)
        else:
            if enc == "raw32":
                if d >= RAW32_LIMIT:
                    continue
                ib = 4 * k
            elif enc == "bitmap":
                ib = np.full(n, (d + 7) // 8, dtype=np.int64)
            elif enc == "seed":
                ib = np.zeros(n, dtype=np.int64)
            else:
                if ptr is None:
                    ptr = np.zeros(n + 1, dtype=np.int64)
                    np.cumsum(k, out=ptr[1:])
                if enc == "varint":
                    ib = k.copy()
                    extra_bytes = None  # per gap: number of bytes beyond the first
                    t = 7
                    while t < 63 and (1 << t) < d:
                        ge = (g >= (1 << t)).view(np.int8)
                        extra_bytes = ge if extra_bytes is None else extra_bytes + ge
                        t += 7
                    if extra_bytes is not None:
                        ib += codecs.segment_sums(ptr, extra_bytes)
                elif enc == "rice":
                    ib = (codecs.rice_bits_rows(ptr, g, k) + 7) // 8
                else:  # packed
                    ib = codecs.packed_choose_rows(g, k)[1]
            tot = base + codecs.varint_lengths(ib) + ib
            if enc in PARAMETER_ENCODINGS:
                tot += 1
        best = tot if best is None else np.minimum(best, tot)
    return torch.from_numpy(best)


def _row_gaps(cols: np.ndarray, d: int) -> np.ndarray:
    """Gaps of the sorted rows of ``cols`` ([n, k]), flattened; int32 when d < 2**31."""
    g = cols.copy()
    g[:, 1:] -= cols[:, :-1]
    g[:, 1:] -= 1
    if cols.shape[1] > 1 and g[:, 1:].min() < 0:
        raise ValueError("columns must be unique within each row")
    return g.astype(np.int32 if d < RAW32_LIMIT else np.int64, copy=False).reshape(-1)


def _check_range(idx: np.ndarray, d: int) -> None:
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= d):
        raise ValueError(f"columns must lie in [0, {d}); got range [{int(idx.min())}, {int(idx.max())}]")


def sort_rows(idx: np.ndarray, ptr: np.ndarray, d: int, values: np.ndarray | None = None):
    """Columns of a ragged batch sorted within each row (and ``values`` permuted along when
    given): returns (columns, values)."""
    n = ptr.size - 1
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(ptr))
    if n * d < (1 << 62):
        key = rows * d + idx
        if values is None:
            key.sort()
            return key - rows * d, None
        order = np.argsort(key, kind="stable")
        return idx[order], values[order]
    order = np.lexsort((idx, rows))
    return idx[order], None if values is None else values[order]


def _ragged_gaps(idx: np.ndarray, ptr: np.ndarray, d: int) -> np.ndarray:
    """Gaps of a ragged batch whose rows are sorted; int32 when d < 2**31."""
    g = np.empty_like(idx)
    if idx.size:
        g[0] = idx[0]
        np.subtract(idx[1:], idx[:-1], out=g[1:])
        g[1:] -= 1
        starts = ptr[:-1][ptr[1:] > ptr[:-1]]
        g[starts] = idx[starts]
        if int(g.min()) < 0:
            raise ValueError("columns must be unique within each row")
    return g.astype(np.int32 if d < RAW32_LIMIT else np.int64, copy=False)


def encoded_nbytes(batch, index_encoding: str = "auto", value_dtype=None) -> torch.LongTensor:
    """Exact byte size of each row's frame: int64 ``[n]`` with ``sum == len(encode(batch, ...))``.

    index_encoding: ``"auto"`` (per row the smallest frame, dense included; see
    :mod:`gradsparse.wire.format`) or one of :data:`~gradsparse.wire.INDEX_ENCODINGS`, applied
    to every row (``"dense"``: every row dense; ``"seed"``: needs ``batch.seeds``).
    value_dtype: as for :func:`~gradsparse.wire.encode` (``None``: the batch's values dtype).
    Vectorised over rows; validates the columns it reads (range, unique within a row) but not
    the values (encode also rejects values that overflow the wire dtype).
    """
    check_index_encoding(index_encoding)
    vid = resolve_value_dtype(batch.values.dtype if value_dtype is None else value_dtype)
    vb = VALUE_DTYPE_TABLE[vid].itemsize
    d = check_d(batch.d)
    n = batch.n
    seeded = batch.seeds is not None
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if index_encoding == "dense" or (index_encoding == "auto" and batch.dense):
        return torch.full((n,), _dense_frame_nbytes(d, vb, seeded), dtype=torch.long)
    if index_encoding == "seed" or (index_encoding == "auto" and seeded):
        k = batch.counts.cpu().numpy()
        return _sizes_from_gaps(k, np.zeros(0, dtype=np.int64), d, vb, index_encoding, seeded)
    if batch.dense:  # an explicit encoding of full rows: every gap is 0
        k = np.full(n, d, dtype=np.int64)
        g = np.zeros(n * d, dtype=np.int32 if d < RAW32_LIMIT else np.int64)
        return _sizes_from_gaps(k, g, d, vb, index_encoding, seeded)
    idx = batch.indices.detach().to("cpu", torch.int64)
    if n == 1:  # one row: what encode itself computes to choose (the batched machinery costs more)
        cols = idx.numpy()
        _check_range(cols, d)
        if not batch.sorted_rows and cols.size > 1:
            cols = np.sort(cols)
        g = codecs.gaps(cols)
        if cols.size > 1 and int(np.minimum.reduce(g[1:])) < 0:
            raise ValueError("columns must be unique within each row")
        return torch.tensor([plan_row(cols, d, seeded, vb, index_encoding, g=g).nbytes], dtype=torch.long)
    if batch.fixed_k is not None:
        kk = batch.fixed_k
        cols = idx.numpy().reshape(n, kk)
        _check_range(cols, d)
        if not batch.sorted_rows and kk > 1:
            cols = np.sort(cols, axis=1)
        g = _row_gaps(cols, d) if kk else np.zeros(0, dtype=np.int64)
        return _sizes_from_gaps(np.full(n, kk, dtype=np.int64), g, d, vb, index_encoding, seeded)
    ptr = batch.offsets.detach().to("cpu", torch.int64).numpy()
    cols = idx.numpy()
    _check_range(cols, d)
    if not batch.sorted_rows:
        cols = sort_rows(cols, ptr, d)[0]
    return _sizes_from_gaps(np.diff(ptr), _ragged_gaps(cols, ptr, d), d, vb, index_encoding, seeded)


# ----------------------------------------------------------------------------------------------
# single numbers
# ----------------------------------------------------------------------------------------------


def dense_nbytes(d: int, value_bytes: int = 4) -> int:
    """Bytes of the frame of a dense row of ``d`` values (the ``dense`` encoding, no seed): the
    most ``index_encoding="auto"`` charges for any row. value_bytes: 4 (fp32) or 2 (fp16/bf16)."""
    check_value_bytes(value_bytes)
    return _dense_frame_nbytes(check_d(d), value_bytes, False)


def index_payload_nbytes(indices: torch.Tensor | np.ndarray, d: int) -> dict[str, int]:
    """Index payload bytes of one row's columns (any order, unique) under each applicable explicit
    encoding: {raw32 (if d < 2**31), varint, rice, packed, bitmap: bytes}."""
    d = check_d(d)
    idx = np.sort(np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1))
    _check_range(idx, d)
    if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
        raise ValueError("columns must be unique")
    return {e: v[0] for e, v in _index_sizes(idx, d, EXPLICIT_ENCODINGS).items()}


def index_entropy_bits(d: int, k: int) -> float:
    """log2 C(d, k): the information-theoretic bound, in bits, on naming one k-subset of d
    columns (what any index payload of a uniformly random support needs on average)."""
    if not 0 <= k <= d:
        raise ValueError(f"need 0 <= k <= d, got k = {k}, d = {d}")
    return (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / _LN2
