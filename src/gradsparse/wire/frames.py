"""A :class:`~gradsparse.messages.SparseBatch` <-> bytes: one frame per row, concatenated.

The frame layout, the encodings and the ``auto`` rule are specified in
:mod:`gradsparse.wire.format`; exact sizes without building bytes are in
:mod:`gradsparse.wire.sizing`.
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import torch

from ..messages import SparseBatch
from ..random_support import random_k_indices_rows
from . import codecs
from .format import (
    CRC_NBYTES,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_D,
    DEFAULT_MAX_ELEMENTS,
    VALUE_DTYPE_IDS,
    VALUE_DTYPE_TABLE,
    ValueDtype,
    WireError,
    FrameHeader,
    as_byte_view,
    check_d,
    check_index_encoding,
    check_seed,
    read_frame_header,
    resolve_value_dtype,
    round_values,
    write_frame,
)
from .sizing import plan_row, row_candidates, sort_rows

__all__ = ["encode", "decode", "decode_each", "frame_headers"]


def _wire_values(values: torch.Tensor, vdt: ValueDtype, overflow: str = "raise") -> np.ndarray:
    """The values cast to the wire dtype, as a numpy array of the payload's dtype (bfloat16 as
    raw u16 bit patterns). A finite value beyond the dtype's largest finite value raises (it would
    silently become +-inf); values that already are +-inf or NaN pass through."""
    v = values.detach().to("cpu")
    if v.dtype != vdt.torch:
        if v.is_complex() or v.dtype == torch.bool:
            raise ValueError(f"the wire carries real values, not {v.dtype}")
        limit = torch.finfo(vdt.torch).max
        over = v.abs() > limit
        if v.is_floating_point():
            over &= torch.isfinite(v)
        if overflow == "saturate":
            v = torch.where(over, v.sign() * limit, v)
        elif bool(over.any()):
            pos = int(torch.nonzero(over)[0, 0])
            raise ValueError(
                f"value {v[pos].item()!r} (entry {pos}) is outside the finite range of "
                f"{str(vdt.torch).removeprefix('torch.')} (|x| <= {limit:g}); it would be sent as "
                "inf. Scale the values or choose a wider value_dtype"
            )
        v = v.to(vdt.torch)
    v = v.contiguous()
    if vdt.torch == torch.bfloat16:
        return v.view(torch.int16).numpy().astype(vdt.numpy, copy=False)
    return v.numpy().astype(vdt.numpy, copy=False)


def encode(
    batch: SparseBatch,
    *,
    index_encoding: str = "auto",
    value_dtype: torch.dtype | str | None = None,
    verify_seed: bool = False,
    overflow: str = "raise",
) -> bytes:
    """Serialise ``batch``: the concatenation of one frame per row, in row order.

    index_encoding: ``"auto"`` (per row the smallest frame, the dense frame included: a row
                    whose sparse frame would be larger than the dense one is sent dense) or one
                    of :data:`~gradsparse.wire.INDEX_ENCODINGS`, applied to every row
                    (``"dense"`` sends every row dense; ``"seed"`` needs ``batch.seeds``).
    value_dtype:    float32/float16/bfloat16/float64 (a ``torch.dtype`` or ``"fp32"``, ``"fp16"``,
                    ``"bf16"``, ``"fp64"``); ``None`` keeps ``batch.values.dtype``, which must be
                    one of them. A finite value outside the target's range (|x| > 65504 for fp16)
                    raises ``ValueError``.
    verify_seed:    for rows sent with the ``seed`` encoding, check that their columns equal
                    ``random_k_indices(seed, d, count)``.
    overflow:       ``"raise"`` (default): a finite value beyond the value dtype's range raises
                    ``ValueError``; ``"saturate"``: it is sent as the largest finite value of its
                    sign (±65504 for fp16). Values that are already ±inf or NaN pass unchanged.
    Rows whose columns are not ascending are sorted (values permuted along); seeded rows keep
    their seed in the frame under every encoding. Raises ``ValueError`` for invalid batches
    (columns out of range or repeated within a row, negative seeds, ...).
    """
    check_index_encoding(index_encoding)
    if overflow not in ("raise", "saturate"):
        raise ValueError(f"overflow must be 'raise' or 'saturate', got {overflow!r}")
    vid = resolve_value_dtype(batch.values.dtype if value_dtype is None else value_dtype)
    vdt = VALUE_DTYPE_TABLE[vid]
    d = check_d(batch.d)
    n = batch.n
    seeds = None if batch.seeds is None else [check_seed(s) for s in batch.seeds.tolist()]
    if index_encoding == "seed" and seeds is None:
        raise ValueError("the seed encoding needs a batch with seeds (random-k rows)")
    values = _wire_values(batch.values, vdt, overflow)
    ptr = batch.offsets.detach().to("cpu", torch.int64).numpy()
    if values.size != (int(ptr[-1]) if n else 0):
        raise ValueError(f"batch has {values.size} values but its offsets describe {int(ptr[-1])}")
    cols = None
    if not batch.dense:
        cols = batch.indices.detach().to("cpu")
        if cols.dtype.is_floating_point or cols.dtype.is_complex or cols.dtype == torch.bool:
            raise ValueError(f"columns must be an integer tensor, got {cols.dtype}")
        cols = cols.to(torch.int64).numpy()
        if cols.size and (int(np.minimum.reduce(cols)) < 0 or int(np.maximum.reduce(cols)) >= d):
            raise ValueError(f"columns must lie in [0, {d}); got range [{int(cols.min())}, {int(cols.max())}]")
        if not batch.sorted_rows:
            cols, values = sort_rows(cols, ptr, d, values)
        if cols.size > 1:
            step = cols[1:] - cols[:-1]
            if n > 1:
                step[ptr[1:-1][(ptr[1:-1] > 0) & (ptr[1:-1] < cols.size)] - 1] = 1  # row boundaries
            if int(np.minimum.reduce(step)) <= 0:
                raise ValueError("columns must be unique within each row")
    full = np.arange(d, dtype=np.int64) if batch.dense else None
    frames = []
    for q in range(n):
        a, b = int(ptr[q]), int(ptr[q + 1])
        idx = full if batch.dense else cols[a:b]
        seed = None if seeds is None else seeds[q]
        cands = row_candidates(index_encoding, seed is not None, batch.dense)
        g = codecs.gaps(idx) if any(c in codecs.GAP_ENCODINGS for c in cands) else None  # shared
        plan = plan_row(idx, d, seed is not None, vdt.itemsize, index_encoding, batch.dense, g)
        if plan.encoding == "seed" and verify_seed:
            expect = codecs.default_regenerate(seed, d, idx.size).numpy()
            if not np.array_equal(expect, idx):
                raise ValueError(f"row {q}: columns are not random_k_indices(seed={seed}, d, k)")
        vals = values[a:b]
        count = idx.size
        if plan.encoding == "dense" and not batch.dense:
            row = np.zeros(d, dtype=values.dtype)  # +0.0 in every wire dtype
            row[idx] = vals
            vals, count = row, d
        ipay = codecs.encode_index_payload(plan.encoding, idx, d, plan.parameter, g)
        frame = write_frame(d, count, plan.encoding, vid, plan.parameter, seed, ipay, vals.tobytes())
        if len(frame) != plan.nbytes:  # pragma: no cover - internal consistency
            raise AssertionError(f"{plan.encoding} frame is {len(frame)} bytes, predicted {plan.nbytes}")
        frames.append(frame)
    return b"".join(frames)


def _check_limit(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _headers(mv: memoryview, max_d: int, max_elements: int = DEFAULT_MAX_ELEMENTS,
             max_bytes: int = DEFAULT_MAX_BYTES) -> list[FrameHeader]:
    _check_limit("max_d", max_d)
    _check_limit("max_elements", max_elements)
    _check_limit("max_bytes", max_bytes)
    if len(mv) == 0:
        raise WireError("empty buffer: it holds no frame (a batch needs at least one row)")
    if len(mv) > max_bytes:
        raise WireError(f"buffer of {len(mv)} bytes is above the decoder's bound max_bytes = {max_bytes}")
    out: list[FrameHeader] = []
    pos = 0
    elements = 0
    while pos < len(mv):
        h = read_frame_header(mv, pos, max_d)
        elements += h.count
        if elements > max_elements:
            raise WireError(
                f"frames claim {elements} entries (frame {len(out)} has {h.count}), above the decoder's bound "
                f"max_elements = {max_elements}"
            )
        if out:
            first = out[0]
            if h.d != first.d:
                raise WireError(f"frame {len(out)} has d = {h.d}, frame 0 has d = {first.d}: one buffer holds one batch")
            if h.value_dtype != first.value_dtype:
                raise WireError(
                    f"frame {len(out)} carries {h.value_dtype} values, frame 0 {first.value_dtype}: "
                    "one buffer holds one batch"
                )
            if (h.seed is None) != (first.seed is None):
                raise WireError(
                    "the buffer mixes seeded and unseeded frames; a batch's rows are all seeded "
                    "(random-k) or none is: decode such buffers separately"
                )
        out.append(h)
        pos = h.end
    return out


def frame_headers(data, *, max_d: int = DEFAULT_MAX_D, max_elements: int = DEFAULT_MAX_ELEMENTS,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> list[FrameHeader]:
    """The header of every frame of ``data`` (encoding, parameter, d, count, seed, offsets, ...),
    checked as :func:`decode` checks headers (CRC included) but without decoding the payloads."""
    return _headers(as_byte_view(data), max_d, max_elements, max_bytes)


def decode(
    data,
    regenerate: Callable[[int, int, int], torch.Tensor] | None = None,
    *,
    max_d: int = DEFAULT_MAX_D,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> SparseBatch:
    """Parse and validate the frames of ``data`` (any contiguous buffer-protocol object) into a
    :class:`~gradsparse.messages.SparseBatch`, one row per frame.

    regenerate: ``(seed, d, k) -> sorted columns`` for ``seed`` frames; defaults to
                :func:`gradsparse.random_support.random_k_indices` (then the supports of all
                seeded frames of one count are regenerated in one vectorized call).
    max_d:      the largest row length a frame may claim (default ``2**31 - 1``), checked before
                anything is allocated, so a short frame cannot make ``to_dense()`` of the result
                allocate an arbitrary d. Raise it to read longer rows (the format allows
                d < 2**62).
    max_elements: the most entries (indices/values) all frames together may claim (default
                ``2**28``), checked from the headers before any payload is decoded or any
                support regenerated.
    max_bytes:  the largest buffer accepted (default ``2**32``).
    The result has ``sorted_rows=True``, the values in the wire dtype, ``fixed_k`` set when every
    row has the same count, ``seeds`` when every frame carries a seed, and ``dense=True`` when
    every frame is dense-encoded (a sparse row sent dense comes back as a full row, zeros off its
    support). All frames must share d, the value dtype and seededness (a mix is a
    :class:`WireError`). A seed flag on a frame with explicit columns (``raw32``, ``varint``,
    ``rice``, ``packed``, ``bitmap``) says the row is a random-k row: its columns must be the
    support its seed regenerates (otherwise re-encoding the row, which sends the seed alone,
    would change its support). Frames of older writers with ``ndim != 1`` are flattened (see
    :mod:`gradsparse.wire.format`). An empty buffer is a :class:`WireError` (no frame gives d).
    Raises :class:`WireError` on any invalid input.

    Cost: linear in the buffer's size. Each frame costs a fixed few microseconds of Python
    (index payloads of at most :data:`~gradsparse.wire.codecs.SMALL_PAYLOAD` bytes are decoded
    without numpy), larger payloads run vectorized, and a seed frame regenerates its support
    over at most ``16 k`` columns (``k <= d / 16``: about ``1.1 k`` draws), i.e. at most 8
    columns per byte of its values; README "Wire format" gives the measured bytes-per-second
    floor.
    """
    mv = as_byte_view(data)
    headers = _headers(mv, max_d, max_elements, max_bytes)
    d = headers[0].d
    seeded = headers[0].seed is not None
    if seeded and any(h.seed >= (1 << 63) for h in headers):  # read_frame_header refuses them too
        raise WireError("a frame's seed is >= 2**63: it does not fit a SparseBatch's int64 seeds")
    parts: list = []  # numpy arrays of columns, or None for a seed frame filled in below
    small: list[int] = []  # columns of consecutive small frames, turned into one array
    explicit_seeded: list[tuple[int, np.ndarray | list]] = []  # (frame, columns) to check against the seed

    def flush() -> None:
        if small:
            parts.append(np.array(small, dtype=np.int64))
            small.clear()

    for i, h in enumerate(headers):
        enc = h.encoding
        if enc == "seed":
            flush()
            parts.append(None)
            continue
        if enc == "dense":
            flush()
            parts.append(np.arange(d, dtype=np.int64))
            continue
        nbytes = h.value_start - h.index_start
        if nbytes <= codecs.SMALL_PAYLOAD and h.count <= 8 * codecs.SMALL_PAYLOAD:
            got = codecs.decode_small_index_payload(enc, bytes(mv[h.index_start : h.value_start]), h.count, d,
                                                    h.parameter)
            small.extend(got)
        else:
            flush()
            payload = np.frombuffer(mv[h.index_start : h.value_start], dtype=np.uint8)
            got = codecs.decode_index_payload(enc, payload, h.count, d, h.parameter, None, None)
            parts.append(got)
        if seeded:
            explicit_seeded.append((i, got))
    flush()
    if seeded:
        supports = _regenerated_supports(headers, d, regenerate)
        for i, got in explicit_seeded:
            if not np.array_equal(np.asarray(got, dtype=np.int64), supports[i]):
                raise WireError(f"frame {i} carries seed {headers[i].seed} but its {headers[i].encoding} columns "
                                "are not the support that seed regenerates")
        it = iter(supports[i] for i, h in enumerate(headers) if h.encoding == "seed")
        parts = [next(it) if p is None else p for p in parts]
    offsets = torch.tensor(list(itertools.accumulate((h.count for h in headers), initial=0)), dtype=torch.long)
    seeds = torch.tensor([h.seed for h in headers], dtype=torch.long) if seeded else None
    dense = all(h.encoding == "dense" for h in headers)
    ks = {h.count for h in headers}
    indices = None
    if not dense:
        indices = torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0] if parts
                                   else np.zeros(0, dtype=np.int64))
    return SparseBatch(d, offsets, _all_values(mv, headers), indices, seeds, dense, True,
                       ks.pop() if len(ks) == 1 else None)


def _all_values(mv: memoryview, headers: list[FrameHeader]) -> torch.Tensor:
    """Every frame's value payload, in frame order, as one tensor of the wire dtype (one copy)."""
    vdt = VALUE_DTYPE_TABLE[VALUE_DTYPE_IDS[headers[0].value_dtype]]
    if len(headers) == 1:
        h = headers[0]
        raw = np.frombuffer(mv[h.value_start : h.end - CRC_NBYTES], dtype=vdt.numpy)
    else:
        raw = np.frombuffer(b"".join(mv[h.value_start : h.end - CRC_NBYTES] for h in headers), dtype=vdt.numpy)
    if vdt.torch == torch.bfloat16:
        return torch.from_numpy(raw.astype(np.int16)).view(torch.bfloat16)  # raw bit patterns
    return torch.from_numpy(raw.astype(raw.dtype.newbyteorder("="), copy=True))


#: regenerated columns held at once while regenerating many seeded rows (bounds the memory)
_REGENERATE_CHUNK = 1 << 22


def _regenerated_supports(headers: list[FrameHeader], d: int, regenerate) -> dict[int, np.ndarray]:
    """The support each seeded non-dense frame's seed regenerates (frame index -> columns). With
    the default regenerator, the rows of one count are drawn together
    (:func:`gradsparse.random_support.random_k_indices_rows`, vectorized over rows), in chunks of
    about :data:`_REGENERATE_CHUNK` columns."""
    todo = [(i, h) for i, h in enumerate(headers) if h.encoding != "dense"]
    out: dict[int, np.ndarray] = {}
    if regenerate is not None:
        for i, h in todo:
            out[i] = codecs.seed_decode(h.seed, h.count, d, regenerate)
        return out
    by_count: dict[int, list[int]] = {}
    for i, h in todo:
        by_count.setdefault(h.count, []).append(i)
    for k, frames in by_count.items():
        per_row = max(1, d if 16 * k > d else k + k // 8 + 16)
        step = max(1, _REGENERATE_CHUNK // per_row)
        for a in range(0, len(frames), step):
            chunk = frames[a : a + step]
            rows = random_k_indices_rows([headers[i].seed for i in chunk], d, k).numpy()
            for i, row in zip(chunk, rows):
                out[i] = row
    return out


def decode_each(data, *, max_d: int = DEFAULT_MAX_D, max_elements: int = DEFAULT_MAX_ELEMENTS) -> list[SparseBatch]:
    """The frames of ``data`` as one one-row batch each, in order, where the frames may have
    different row lengths and value dtypes (e.g. one frame per model parameter, as a DDP hook
    sends a bucket). Each frame is checked and decoded as :func:`decode` does; ``max_d`` bounds
    each frame's d and ``max_elements`` the entries of all frames together."""
    mv = as_byte_view(data)
    if len(mv) == 0:
        return []
    out, pos, elements = [], 0, 0
    while pos < len(mv):
        h = read_frame_header(mv, pos, max_d)
        elements += h.count
        if elements > max_elements:
            raise WireError(f"frames claim {elements} entries, above the decoder's bound max_elements = {max_elements}")
        out.append(decode(mv[h.start : h.end], max_d=max_d, max_elements=max_elements))
        pos = h.end
    return out


def sendable(message: SparseBatch, value_dtype: str | torch.dtype | None) -> SparseBatch:
    """``message`` with its values as a receiver decodes them from frames carrying
    ``value_dtype`` (:func:`gradsparse.wire.round_values`); the message itself when nothing
    changes (``value_dtype`` None, or values already exact in it)."""
    if value_dtype is None:
        return message
    values = round_values(message.values, value_dtype)
    return message if values is message.values else message.with_values(values)
