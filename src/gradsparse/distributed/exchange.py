"""Exchanging sparse messages between processes with torch.distributed collectives.

Used by the DDP communication hook (:mod:`gradsparse.ddp`) and by ``engine: torch``
(:mod:`gradsparse.engines.torch_dist`). Every call is a blocking collective issued by the
caller itself (never from a future's callback: on Gloo that hangs, see the hook's docstring).

* :func:`all_gather_rows` — each rank holds P one-row :class:`~gradsparse.messages.SparseBatch`
  messages (one per segment, the same P and the same lengths d_l on every rank); every rank gets,
  per segment, the N-row batch of all ranks' messages (row r = rank r).

  - every message has a fixed count k_l (top-k, random-k): ONE ``all_gather`` of a fixed-size
    int64 tensor holding the indices and the value bits of all P messages;
  - otherwise (hard-threshold: counts vary per rank and step): a size exchange (one
    ``all_gather`` of the P counts), then one ``all_gather`` of the payloads padded to the
    largest total (Gloo refuses uneven ``all_gather``). Padding is never part of a message, and
    :attr:`Exchange.payload_bytes` counts only real entries.

Values travel as their bit patterns inside the int64 tensor (float32 -> int32 -> int64 and back
is exact), so one collective carries indices and values together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..messages import SparseBatch

__all__ = ["Exchange", "all_gather_rows", "pack_values", "unpack_values"]

_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_values(values: torch.Tensor) -> torch.Tensor:
    """int64 tensor holding the bit pattern of each value (exact for 2-, 4- and 8-byte dtypes)."""
    return values.contiguous().view(_INT_OF[values.element_size()]).to(torch.int64)


def unpack_values(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    size = torch.empty(0, dtype=dtype).element_size()
    return bits.to(_INT_OF[size]).view(dtype)


@dataclass
class Exchange:
    """What one exchange moved: the gathered messages and the bytes this rank put on the
    collectives (its own real entries: 8-byte indices and the values' bytes; no padding)."""

    gathered: list[SparseBatch]
    payload_bytes: int
    collectives: int


def _gather(t: torch.Tensor, world: int, group) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return torch.stack(out)


def all_gather_rows(messages: list[SparseBatch], *, group=None, device=None) -> Exchange:
    """Gather P one-row messages from every rank (see the module docstring)."""
    world = dist.get_world_size(group)
    if not messages:
        return Exchange([], 0, 0)
    vdtype = messages[0].values.dtype
    device = device if device is not None else messages[0].values.device
    fixed = all(m.fixed_k is not None for m in messages)
    counts = [int(m.values.numel()) for m in messages]
    local_idx = torch.cat([m.indices.reshape(-1).to(device, torch.int64) for m in messages])
    local_val = pack_values(torch.cat([m.values.reshape(-1).to(device, vdtype) for m in messages]))
    total = int(local_idx.numel())
    payload = total * (8 + messages[0].values.element_size())
    if fixed:
        gathered = _gather(torch.cat([local_idx, local_val]), world, group)  # [N, 2K]
        all_counts = torch.tensor(counts, dtype=torch.long).expand(world, -1)
        width, n_coll = total, 1
    else:
        all_counts = _gather(torch.tensor(counts, dtype=torch.long, device=device), world, group).cpu()  # [N, P]
        width = int(all_counts.sum(1).max())
        n_coll = 1
        if width == 0:
            gathered = torch.zeros(world, 0, dtype=torch.long, device=device)
        else:
            buf = torch.zeros(2 * width, dtype=torch.long, device=device)
            buf[:total] = local_idx
            buf[width : width + total] = local_val
            gathered = _gather(buf, world, group)  # [N, 2M]
            n_coll = 2
    idx_part = gathered[:, :width]
    val_part = unpack_values(gathered[:, width:], vdtype) if width else torch.zeros(world, 0, dtype=vdtype, device=device)
    starts = torch.zeros(world, len(messages) + 1, dtype=torch.long)
    torch.cumsum(all_counts, 1, out=starts[:, 1:])
    out = []
    for l, m in enumerate(messages):
        c = all_counts[:, l]
        idx = torch.cat([idx_part[r, int(starts[r, l]) : int(starts[r, l + 1])] for r in range(world)])
        val = torch.cat([val_part[r, int(starts[r, l]) : int(starts[r, l + 1])] for r in range(world)])
        offsets = torch.zeros(world + 1, dtype=torch.long)
        torch.cumsum(c, 0, out=offsets[1:])
        out.append(SparseBatch(m.d, offsets.to(device), val, idx, None, False, m.sorted_rows,
                               m.fixed_k if fixed else None))
    return Exchange(out, payload, n_coll)
