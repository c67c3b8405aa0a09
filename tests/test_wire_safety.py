"""Decoding hostile wire input (issue 23): every malformed buffer is a WireError, a seed flag is
checked against the frame's columns, seeds >= 2**63 are refused, and the cost of decoding stays
linear in the buffer (small frames without numpy, seeded rows regenerated together)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from gradsparse import wire
from gradsparse.random_support import random_k_indices
from gradsparse.wire import WireError, codecs, frames
from gradsparse.wire import format as wf

from test_wire import EXPLICIT, SETTINGS, _check_valid_batch, _recrc, row


def test_a_seed_flag_on_a_varint_frame_must_match_its_columns():
    """The audit's case: a varint frame of support [0] carrying a seed flag decoded to a seeded
    row, and encoding it again sent the seed alone, whose support is another one."""
    d, seed = 100, 3
    assert random_k_indices(seed, d, 1).tolist() != [0]
    forged = wire.encode(row([0], torch.ones(1), d, seed=seed), index_encoding="varint")
    with pytest.raises(WireError, match="not the support that seed regenerates"):
        wire.decode(forged)
    with pytest.raises(WireError):
        wire.decode(forged, regenerate=random_k_indices)  # the caller's regenerator is checked too
    # a seeded row whose explicit columns are its seed's support decodes, and stays that row
    idx = random_k_indices(seed, d, 7)
    for enc in EXPLICIT:
        buf = wire.encode(row(idx, torch.arange(7.0), d, seed=seed), index_encoding=enc)
        out = wire.decode(buf)
        assert out.seeds.tolist() == [seed] and torch.equal(out.indices, idx)
        again = wire.decode(wire.encode(out))  # auto: the seed alone
        assert torch.equal(again.indices, idx) and torch.equal(again.values, out.values)


@pytest.mark.parametrize("regenerate", [None, random_k_indices])
def test_a_seed_of_2_63_or_more_is_a_wire_error(regenerate):
    for enc, k, ipay in (("seed", 1, b""), ("varint", 1, b"\x00")):
        frame = wf.write_frame(100, k, enc, 0, None, 2**63, ipay, b"\0" * 4 * k)
        with pytest.raises(WireError, match="2\\*\\*63"):
            wire.decode(frame, regenerate=regenerate)
        with pytest.raises(WireError, match="2\\*\\*63"):
            wire.frame_headers(frame)


@st.composite
def small_payloads(draw):
    """An index payload of at most SMALL_PAYLOAD bytes: a valid one, or one with bytes flipped,
    added or cut."""
    enc = draw(st.sampled_from(EXPLICIT))
    d = draw(st.integers(1, 400))
    k = draw(st.integers(0, min(d, 12)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    idx = np.sort(rng.choice(d, k, replace=False)).astype(np.int64)
    g = codecs.gaps(idx)
    param = {"rice": codecs.rice_choose(g)[0], "packed": codecs.packed_choose(g)[0]}.get(enc)
    payload = bytearray(codecs.encode_index_payload(enc, idx, d, param))
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["flip", "add", "cut", "param"]))
        if what == "flip" and payload:
            payload[draw(st.integers(0, len(payload) - 1))] ^= draw(st.integers(1, 255))
        elif what == "add":
            payload.insert(draw(st.integers(0, len(payload))), draw(st.integers(0, 255)))
        elif what == "cut" and payload:
            del payload[draw(st.integers(0, len(payload) - 1))]
        elif what == "param" and param is not None:
            param = draw(st.integers(0, 32)) if enc == "rice" else draw(st.integers(1, 32))
    if enc == "raw32" and len(payload) != 4 * k:  # the header fixes raw32's length
        payload = payload[: 4 * k].ljust(4 * k, b"\0")
    if enc == "bitmap" and len(payload) != (d + 7) // 8:
        payload = payload[: (d + 7) // 8].ljust((d + 7) // 8, b"\0")
    k = draw(st.sampled_from([k, max(0, k - 1), k + 1])) if draw(st.booleans()) else k
    return enc, bytes(payload[: codecs.SMALL_PAYLOAD]), min(k, d), d, param


@SETTINGS
@given(small_payloads())
def test_small_payload_decoder_accepts_exactly_what_the_numpy_decoder_accepts(case):
    enc, payload, k, d, param = case
    if enc == "raw32" and len(payload) != 4 * k:
        return
    try:
        want = codecs.decode_index_payload(enc, np.frombuffer(payload, dtype=np.uint8), k, d, param, None, None)
    except WireError:
        want = None
    try:
        got = codecs.decode_small_index_payload(enc, payload, k, d, param)
    except WireError:
        got = None
    if want is None:
        assert got is None
    else:
        assert got is not None and np.array_equal(np.asarray(got, dtype=np.int64), want)


def test_seeded_rows_are_regenerated_together_and_equal_one_by_one(monkeypatch):
    d = 5000
    rows = []
    for q in range(300):
        k = [1, 3, 400][q % 3]  # 400 > d / 16: the sampler's other branch
        seed = 1000 + q
        rows.append(wire.encode(row(random_k_indices(seed, d, k), torch.full((k,), float(q)), d, seed=seed),
                                index_encoding="varint" if q % 7 == 0 else "auto"))
    buf = b"".join(rows)
    calls = []
    real = frames.random_k_indices_rows

    def counting(seeds, d_, k_):
        calls.append(k_)
        return real(seeds, d_, k_)

    monkeypatch.setattr(frames, "random_k_indices_rows", counting)  # the decoder's sampler
    together = wire.decode(buf)
    assert sorted(calls) == [1, 3, 400]  # one call per count, not one per frame
    one_by_one = wire.decode(buf, regenerate=random_k_indices)
    assert torch.equal(together.indices, one_by_one.indices) and torch.equal(together.offsets, one_by_one.offsets)
    assert torch.equal(together.values, one_by_one.values) and torch.equal(together.seeds, one_by_one.seeds)


def test_many_one_entry_frames_decode_with_the_small_decoders(monkeypatch):
    """A buffer of many one-entry frames costs a few Python operations per frame: the numpy
    payload decoders (tens of microseconds per call) are not called."""
    d = 400  # a bitmap payload is d / 8 bytes: small too
    buf = b"".join(wire.encode(row([q % d], torch.ones(1), d), index_encoding=enc)
                   for q in range(400) for enc in ("varint", "rice", "packed", "raw32", "bitmap"))

    def numpy_path(*a, **k):
        raise AssertionError("a small frame went through the numpy decoder")

    monkeypatch.setattr(codecs, "decode_index_payload", numpy_path)
    out = wire.decode(buf)
    assert out.n == 2000 and out.indices.tolist() == [q % d for q in range(400) for _ in range(5)]


@SETTINGS
@given(st.integers(0, 2**62), st.integers(1, 300), st.sampled_from(EXPLICIT + ("seed",)), st.data())
def test_forged_seeded_frames_are_wire_errors_or_consistent(seed, d, enc, data):
    k = data.draw(st.integers(0, d))
    idx = random_k_indices(seed, d, k)
    buf = bytearray(wire.encode(row(idx, torch.randn(k), d, seed=seed), index_encoding=enc))
    h = wire.frame_headers(bytes(buf))[0]
    # mostly the column payload (what the seed flag vouches for), else any byte
    lo, hi = (h.index_start, h.value_start - 1) if h.value_start > h.index_start and data.draw(st.booleans()) \
        else (0, len(buf) - 5)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(lo, hi))
        buf[pos] ^= data.draw(st.integers(1, 255))
    try:
        out = wire.decode(_recrc(buf))
    except WireError:
        return
    _check_valid_batch(out)
    if out.seeds is not None and not out.dense:  # what a seeded row says is what its seed says
        for q in range(out.n):
            a, b = int(out.offsets[q]), int(out.offsets[q + 1])
            assert torch.equal(out.indices[a:b], random_k_indices(int(out.seeds[q]), out.d, b - a))
