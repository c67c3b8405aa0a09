"""A parameter server over torch.distributed point-to-point messages (no RPC).

Rank 0 serves; rank q + 1 is worker q. Every message is the project's wire format
(:func:`gradsparse.wire.encode`: one self-delimiting frame per row) preceded by a small int64
header, sent with ``dist.send``/``dist.recv`` (Gloo has no futures for point-to-point work, so
the calls block; tags carry the step so messages of different rounds cannot be confused):

=========  ==================================================================================
uplink     header ``[MAGIC, step, frame bytes, charged bytes]`` then the frame bytes (uint8)
downlink   header ``[MAGIC, step, frame bytes, charged bytes, up_0 .. up_{N-1}]`` then the frame
           bytes; ``up_q`` (the charged size of every worker's message) lets every rank keep
           the same byte ledger
=========  ==================================================================================

"Charged bytes" is the algorithm's exact wire size (:meth:`Algorithm.message_nbytes`, values
at the config's ``value_dtype``); the frames on the socket carry the values' own dtype so the
run is exact (a float64 task sends 8-byte values and is charged fp32's 4 when that is the
config's value_dtype). The wire carries float32/float16/bfloat16 values: a float64 run sends
its frames with float32 values followed by the exact float64 values at the frame's support (a
sidecar, so the run equals the simulator exactly; not charged).

A synchronous round (:meth:`gradsparse.engines.torch_dist.TorchDistEngine.step` in
parameter-server mode): every worker sends its message; the server receives all N (in worker
order), runs the algorithm's server step and sends its one downlink message to each worker:
the aggregate A for ``ps_uplink`` (workers run the same momentum and step size on it), C_down(G)
for ``bidirectional``/``downlink_only`` (workers apply it as is). Diagnostics (each worker's
gradient and new memory/momentum rows, for the run directory's metrics) follow the uplink
frame as a plain tensor; they are not part of the ledger.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import wire
from ..messages import SparseBatch

__all__ = ["MAGIC", "send_message", "recv_message", "send_tensor", "recv_tensor"]

MAGIC = 0x67737073  # "gsps"


def _tag(step: int, kind: int) -> int:
    return (int(step) % 100_000) * 4 + kind


def send_message(batch: SparseBatch, dst: int, *, step: int, charged: int, extra: list[int] | None = None,
                 kind: int = 0) -> int:
    """Send one wire-format message with its header; returns the frame bytes sent."""
    exact = batch.values.dtype not in wire.VALUE_DTYPES
    data = wire.encode(batch, value_dtype="float32" if exact else None)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    header = torch.tensor([MAGIC, int(step), len(data), int(charged), *(extra or [])], dtype=torch.long)
    dist.send(header, dst, tag=_tag(step, kind))
    if len(data):
        dist.send(payload, dst, tag=_tag(step, kind))
    if exact:  # float64 values: the exact values at the decoded support follow as a sidecar
        dec = wire.decode(data)
        dist.send(batch.to_dense(batch.values.dtype).reshape(-1)[dec.flat_positions()].contiguous(), dst,
                  tag=_tag(step, kind))
    return len(data)


def recv_message(src: int, *, step: int, n_extra: int = 0, kind: int = 0,
                 dtype: torch.dtype = torch.float32) -> tuple[SparseBatch, int, list[int]]:
    """Receive a message sent by :func:`send_message`: (batch, charged bytes, extra header fields)."""
    header = torch.zeros(4 + n_extra, dtype=torch.long)
    dist.recv(header, src, tag=_tag(step, kind))
    magic, got_step, size, charged = (int(v) for v in header[:4])
    if magic != MAGIC or got_step != step:
        raise RuntimeError(f"parameter server: bad header from rank {src} (magic {magic:#x}, step {got_step}, "
                           f"expected step {step})")
    payload = torch.zeros(size, dtype=torch.uint8)
    if size:
        dist.recv(payload, src, tag=_tag(step, kind))
    batch = wire.decode(payload.numpy().tobytes())
    if dtype not in wire.VALUE_DTYPES:
        exact = torch.zeros(batch.nnz, dtype=dtype)
        dist.recv(exact, src, tag=_tag(step, kind))
        batch = batch.with_values(exact)
    return batch, charged, [int(v) for v in header[4:]]


def send_tensor(t: torch.Tensor, dst: int, *, step: int) -> None:
    dist.send(t.contiguous(), dst, tag=_tag(step, 2))


def recv_tensor(shape, dtype, src: int, *, step: int) -> torch.Tensor:
    t = torch.zeros(shape, dtype=dtype)
    dist.recv(t, src, tag=_tag(step, 2))
    return t
