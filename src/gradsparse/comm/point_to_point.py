"""Wire frames over torch.distributed point-to-point messages (no RPC): the parameter server of
``engine: torch`` and the asynchronous parameter server of ``engine: torch_async``.

Every message is one header, then (when it has any) the frames of one
:class:`~gradsparse.messages.SparseBatch` as a uint8 tensor. The header is the same for both
engines, ``HEADER_FIELDS`` int64 values followed by the message's extra fields (a count both
sides know)::

    [MAGIC, kind, step, frame bytes, samples, extra...]

``kind`` is one of :data:`KINDS` (uplink message, downlink message, model, stop), ``step`` the
step (synchronous rounds) or the model version the message was computed at (asynchronous),
``samples`` the rows the sender's gradient used (asynchronous epochs). Gloo has no futures for
point-to-point work, so the calls block; the tag is the direction (worker to server, server to
worker, diagnostics), and the receiver checks the header's magic, kind and (when it knows it)
step, so messages of different rounds or kinds are never confused. ``recv(src=None)`` takes the
next message from any sender.

Charging (:class:`~gradsparse.comm.ledger.ByteLedger`): ``sent_bytes`` gets every header and
frame this process sends; diagnostics (:meth:`PointToPointChannel.send_tensor`, plain tensors a
worker sends so that the server can record metrics) go to ``diagnostic_bytes``. Messages of the
algorithm are charged where they pass: the server counts every uplink message it receives and
every downlink message it sends (its ledger is the run's whole ledger, as the simulator's), a
worker the uplink messages it sends and the downlink messages it receives (its share).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import wire
from ..messages import SparseBatch
from .channel import Channel
from .ledger import ByteLedger

__all__ = ["PointToPointChannel", "Header", "MAGIC", "KINDS", "HEADER_FIELDS"]

MAGIC = 0x67737770  # "gswp"
#: message kinds
KINDS = {"uplink": 1, "downlink": 2, "model": 3, "stop": 4}
KIND_NAMES = {v: k for k, v in KINDS.items()}
#: Gloo tags by direction: a receiver waiting for "a model or a stop" matches both
TAGS = {"uplink": 1, "downlink": 2, "model": 2, "stop": 2, "diagnostic": 3}
HEADER_FIELDS = 5


class Header(NamedTuple):
    kind: str
    step: int
    nbytes: int
    samples: int
    extra: tuple[int, ...]


class PointToPointChannel(Channel):
    """Messages between one server (rank ``server_rank``) and its workers (see the module
    docstring). ``role``: ``"server"`` or ``"worker"``."""

    def __init__(self, role: str, server_rank: int = 0, ledger: ByteLedger | None = None) -> None:
        super().__init__(ledger)
        if role not in ("server", "worker"):
            raise ValueError(f"role must be 'server' or 'worker', got {role!r}")
        self.role, self.server_rank = role, int(server_rank)

    # ---- sending -------------------------------------------------------------------------------
    def send(self, dst: int, kind: str, batch: SparseBatch | None = None, *, step: int = 0, samples: int = 0,
             extra: tuple[int, ...] | list[int] = (), value_dtype=None, charge_message: bool = True) -> int:
        """Send a header and the frames of ``batch`` (values in ``value_dtype``; ``None``: their
        own dtype) to rank ``dst``; returns the frame bytes. ``charge_message=False``: the bytes
        count as sent but not as a message of the algorithm (the initial model x_0, which the
        simulator's workers hold from the start)."""
        data = b"" if batch is None else wire.encode(batch, value_dtype=value_dtype)
        header = torch.tensor([MAGIC, KINDS[kind], int(step), len(data), int(samples), *[int(v) for v in extra]],
                              dtype=torch.int64)
        dist.send(header, dst, tag=TAGS[kind])
        if data:
            dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst, tag=TAGS[kind])
        self.ledger.add_sent(header.numel() * 8 + len(data))
        if batch is not None and charge_message:
            self._charge(kind, len(data), sent=True)
        return len(data)

    def send_tensor(self, t: torch.Tensor, dst: int) -> None:
        """A plain tensor for diagnostics (not part of the algorithm: ``diagnostic_bytes``)."""
        t = t.contiguous()
        dist.send(t, dst, tag=TAGS["diagnostic"])
        self.ledger.add_sent(t.numel() * t.element_size(), diagnostic=True)

    # ---- receiving -----------------------------------------------------------------------------
    def recv(self, kind: str | tuple[str, ...], src: int | None = None, *, step: int | None = None, n_extra: int = 0,
             max_d: int = wire.DEFAULT_MAX_D, charge_message: bool = True) -> tuple[int, Header, SparseBatch | None]:
        """The next message from ``src`` (``None``: any rank), which must be of ``kind`` (one
        kind, or several of one direction: a model or a stop). Returns the sender, the header and
        the decoded batch (``None`` for a message without frames)."""
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        tag = TAGS[kinds[0]]
        if any(TAGS[k] != tag for k in kinds):
            raise ValueError(f"kinds {kinds} travel in different directions")
        header = torch.zeros(HEADER_FIELDS + n_extra, dtype=torch.int64)
        got = dist.recv(header, src, tag=tag)
        src = int(got) if src is None else src
        magic, kind_id, got_step, nbytes, samples = (int(v) for v in header[:HEADER_FIELDS])
        if magic != MAGIC or KIND_NAMES.get(kind_id) not in kinds:
            raise RuntimeError(f"bad message header from rank {src}: magic {magic:#x}, kind {kind_id} "
                               f"(expected magic {MAGIC:#x}, kind {' or '.join(kinds)})")
        if step is not None and got_step != step:
            raise RuntimeError(f"message from rank {src} is for step {got_step}, expected step {step}")
        batch = None
        if nbytes:
            payload = torch.empty(nbytes, dtype=torch.uint8)
            dist.recv(payload, src, tag=tag)
            batch = wire.decode(payload.numpy(), max_d=max_d)
            if charge_message:
                self._charge(KIND_NAMES[kind_id], nbytes, sent=False)
        head = Header(KIND_NAMES[kind_id], got_step, nbytes, samples, tuple(int(v) for v in header[HEADER_FIELDS:]))
        return src, head, batch

    def recv_tensor(self, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        dist.recv(t, src, tag=TAGS["diagnostic"])
        return t

    # ---- charging ------------------------------------------------------------------------------
    def _charge(self, kind: str, nbytes: int, *, sent: bool) -> None:
        """Messages of the algorithm where they pass (see the module docstring)."""
        if kind == "uplink" and (sent or self.role == "server"):
            self.ledger.add(nbytes, 0, 1, 0)
        elif kind in ("downlink", "model") and (not sent or self.role == "server"):
            self.ledger.add(0, nbytes, 0, 1)
