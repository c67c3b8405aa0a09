"""Synchronous topologies (ALGORITHMS.md §5) and their traffic accounting.

- ``all_to_all``:    every worker receives every message (an allgather) and applies
                     w <- w - sum_q p_q s_q. No server state.
- ``ps_uplink``:     parameter server forms G = sum_q p_q s_q and sends G back (support up to N k).
- ``bidirectional``: server memory delta (starts at 0): G = sum_q p_q s_q + delta; sends
                     C_down(G); delta <- G - C_down(G).
- ``downlink_only``: workers send alpha g uncompressed (uplink identity, no worker memory);
                     the server proceeds as in ``bidirectional``.

Bytes are counted with the wire format's exact sizes (``gradsparse.wire``):
``uplink_bytes``   = bytes leaving the workers (each message once);
``downlink_bytes`` = bytes arriving at the workers: for all-to-all each worker receives the
                     N - 1 messages of the others; for a parameter server each of the N workers
                     receives the server's message.
"""

from __future__ import annotations

import torch

TOPOLOGIES = ("all_to_all", "ps_uplink", "bidirectional", "downlink_only")

VALUE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def check_topology(kind: str) -> None:
    if kind not in TOPOLOGIES:
        raise ValueError(f"unknown topology {kind!r}; allowed: {', '.join(TOPOLOGIES)}")


def has_downlink_compression(kind: str) -> bool:
    return kind in ("bidirectional", "downlink_only")


def message_nbytes(mask: torch.Tensor, *, dense: bool, seeded: bool, value_bytes: int) -> torch.Tensor:
    """Exact wire bytes of each row's message (rows of ``mask`` [n, d])."""
    from . import wire

    n, d = mask.shape
    if dense:
        return torch.full((n,), wire.dense_nbytes(d, value_bytes), dtype=torch.long)
    if seeded:
        return wire.batch_encoded_nbytes(mask, value_bytes=value_bytes, index_encoding="seed")
    sparse = wire.batch_encoded_nbytes(mask, value_bytes=value_bytes, index_encoding="auto")
    return torch.minimum(sparse, torch.full_like(sparse, wire.dense_nbytes(d, value_bytes)))


def indices_nbytes(indices: torch.Tensor, d: int, *, seeded: bool, value_bytes: int) -> torch.Tensor:
    """As :func:`message_nbytes` for fixed-count supports given as column indices ``[n, k]``."""
    from . import wire

    n, k = indices.shape
    if seeded:
        # a seeded support sends no indices: the size depends on k only
        one = torch.zeros(1, d, dtype=torch.bool)
        one[0, :k] = True
        return wire.batch_encoded_nbytes(one, value_bytes=value_bytes, index_encoding="seed").expand(n).clone()
    sparse = wire.batch_encoded_nbytes_from_indices(indices, d, value_bytes=value_bytes, index_encoding="auto")
    return torch.minimum(sparse, torch.full_like(sparse, wire.dense_nbytes(d, value_bytes)))


def traffic(
    kind: str,
    up_nbytes: torch.Tensor,
    down_nbytes_one: int,
    n_workers: int,
) -> tuple[int, int]:
    """(uplink, downlink) bytes of one synchronous step.

    ``up_nbytes``: bytes of each worker's message; ``down_nbytes_one``: bytes of the server's
    message (ignored for all-to-all).
    """
    up = int(up_nbytes.sum())
    if kind == "all_to_all":
        return up, (n_workers - 1) * up
    return up, n_workers * int(down_nbytes_one)
