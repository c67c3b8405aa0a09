"""``engine: torch_async``: the asynchronous parameter server of ``engine: async`` as real
processes exchanging messages over torch.distributed (Gloo point-to-point, no RPC).

Started with one process more than workers (``gradsparse launch CONFIG --nproc N+1``): rank 0
is the server, rank q + 1 is worker q. The protocol is the simulator's (ALGORITHMS.md §6,
:mod:`gradsparse.engines.async_sim`), in real time instead of virtual time:

1. the server sends every worker the model x_0 (dense, with its version 0 and epoch; not
   charged in the byte ledger, as the simulator's workers hold x_0 from the start);
2. worker q computes a mini-batch gradient at the model it holds (version tau_q), runs the
   algorithm's worker step on its own state (memory, momentum) at step tau_q, and sends its
   message (the project's wire format, with a header) followed by diagnostics (its gradient and
   new memory row, for the server's metrics; not in the byte ledger);
3. the server takes messages in the order they arrive (``recv`` from any source), applies each
   at once with the simulator's rules (staleness dampening, ``drop_older_than``, Kardam's filter
   with ``rejected: drop``), records the staleness t - tau_q, and sends the new model back to
   that worker only;
4. after the run's last update the server tells every worker to stop, receiving (and counting,
   not applying) the message each still had on its way.

The ``asynchronous.compute`` / ``network`` laws are not used: compute and network times are the
real ones, so a run with several workers depends on timing (the order of arrivals) and is not
bitwise repeatable; ``virtual_time`` is wall-clock seconds since the server started. With one
worker it is sequential SGD and equals ``engine: async`` (and ``sync``) with one worker
(tests/test_torch_async.py). Worker 0 draws mini-batches from the engine's generator (as the
simulator does), worker q > 0 from its own stream seeded by (seed, "data", q).
Not supported here: ``staleness_bound`` and Kardam's ``rejected: restore`` (both would have the
server rewrite a worker's state in another process).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .. import wire
from ..algorithm import WorkerStepOutput
from ..compressors import stream_seed
from ..metrics import METRICS
from .async_sim import AsyncSimulator, InFlight
from .torch_dist import _init_from_env

__all__ = ["TorchAsyncEngine"]

MAGIC = 0x67736173  # "gsas"
TAG_UP, TAG_DOWN = 11, 12
CONTINUE, STOP = 0.0, 1.0

#: metrics the server can record (the per-step compression diagnostics need every worker's
#: accumulated vector, which stays in the worker's process)
SERVER_METRICS = frozenset(m for m in METRICS if m not in {
    "xi", "rho_hat", "rho_hat_max", "gamma_hat_up", "compression_ratio_up", "compression_ratio_up_max",
    "gamma_hat_down", "compression_ratio_down", "worker_error_sq", "grad_norm_sq", "update_cosine"})


class TorchAsyncEngine(AsyncSimulator):
    name = "torch_async"
    metrics = SERVER_METRICS

    def __init__(self, task, algorithm, schedule, **kw) -> None:
        if kw.get("staleness_bound") is not None:
            raise ValueError("engine 'torch_async' does not run staleness_bound (the server would have to restore a "
                             "worker's state in another process); use drop_older_than, or engine 'async'")
        kardam = kw.get("kardam")
        if kardam is not None and kardam.enabled and kardam.rejected == "restore":
            raise ValueError("engine 'torch_async' runs Kardam's filter with rejected: drop only")
        if kw.get("update_cosine"):
            raise ValueError("engine 'torch_async' does not record update_cosine (it needs worker data on the server)")
        super().__init__(task, algorithm, schedule, **kw)
        _init_from_env()
        self.rank, world = dist.get_rank(), dist.get_world_size()
        if world != self.n_workers + 1:
            raise ValueError(f"engine 'torch_async' needs workers.count + 1 = {self.n_workers + 1} processes "
                             f"(rank 0 serves), got {world}: gradsparse launch CONFIG --nproc {self.n_workers + 1}")
        self.events.clear()  # real time: no event queue
        self.total_steps: int | None = None
        self._started = False
        self._t0 = time.perf_counter()
        self.drained_messages = 0
        if self.rank > 0 and self.rank - 1 > 0:  # worker 0 keeps the engine's generator (as the simulator)
            self.data.generator.manual_seed(stream_seed(int(kw.get("seed", 0)), "data", 0, self.rank - 1))

    def bind_total_steps(self, steps: int) -> None:
        """The run's length: after that many updates the server stops the workers."""
        self.total_steps = int(steps)

    @classmethod
    def synchronous_equivalent(cls, config: dict) -> dict | None:
        return None  # out of process: the engine fixture cannot step it (tests/test_torch_async.py does)

    # ---- server -------------------------------------------------------------------------------
    def step(self):
        """Server: take arriving messages until one update has been applied; returns its record."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 (the server) steps engine 'torch_async'; workers run serve_as_worker()")
        if not self._started:
            self._started = True
            for q in range(self.n_workers):  # x_0, which the simulator's workers hold from the start: not charged
                self._send_model(q, 0.0, charge=False)
        while True:
            q = self._receive()
            self.now = time.perf_counter() - self._t0
            record = self._arrival(q)
            if record is not None:
                if self.total_steps is not None and self.t >= self.total_steps:
                    self._drain(except_worker=q)
                return record

    def _receive(self) -> int:
        header = torch.zeros(5, dtype=torch.long)
        src = dist.recv(header, tag=TAG_UP)  # any worker
        magic, version, size, charged, samples = (int(v) for v in header)
        if magic != MAGIC:
            raise RuntimeError(f"engine torch_async: bad message header from rank {src} (magic {magic:#x})")
        payload = torch.zeros(size, dtype=torch.uint8)
        if size:
            dist.recv(payload, src, tag=TAG_UP)
        batch = wire.decode(payload.numpy().tobytes(), max_d=self.d)
        batch = batch.with_values(batch.values.to(self.dtype))
        has_memory = self.worker_state.memory is not None
        diagnostics = torch.zeros(self.d * (2 if has_memory else 1), dtype=self.dtype)
        dist.recv(diagnostics, src, tag=TAG_UP)
        q = src - 1
        if has_memory:
            self.worker_state.memory.flat[q].copy_(diagnostics[self.d:])
        out = WorkerStepOutput(batch, torch.tensor([charged]), None, None)
        self.in_flight[q] = InFlight(q, version, out, None, samples, diagnostics[: self.d][None], self.worker_models[q])
        self.ledger.add(charged, 0, 1, 0)
        return q

    def _send_model(self, q: int, at: float, charge: bool = True) -> None:
        stop = self.total_steps is not None and self.t >= self.total_steps
        dist.send(torch.tensor([STOP if stop else CONTINUE, float(self.t), self.epoch], dtype=torch.float64),
                  q + 1, tag=TAG_DOWN)
        if stop:
            return
        self.worker_models[q] = self.w.clone()
        self.worker_versions[q] = self.t
        self.worker_epochs[q] = self.epoch
        dist.send(self.w.contiguous(), q + 1, tag=TAG_DOWN)
        if charge:
            self.ledger.add(0, self.model_nbytes, 0, 1)

    def _drain(self, except_worker: int) -> None:
        """After the last update: every other worker has one message on its way; receive it
        (counted in the ledger, not applied) and tell that worker to stop."""
        for _ in range(self.n_workers - 1):
            q = self._receive()
            self.in_flight.pop(q)
            self.drained_messages += 1
            self._send_model(q, self.now)

    # ---- worker -------------------------------------------------------------------------------
    def serve_as_worker(self) -> int:
        """Worker q = rank - 1: receive a model, compute and send a message, until told to stop;
        returns the number of messages sent."""
        q, sent = self.rank - 1, 0
        while True:
            header = torch.zeros(3, dtype=torch.float64)
            dist.recv(header, 0, tag=TAG_DOWN)
            if float(header[0]) == STOP:
                return sent
            model = torch.zeros(self.d, dtype=self.dtype)
            dist.recv(model, 0, tag=TAG_DOWN)
            self.worker_models[q], self.worker_versions[q], self.worker_epochs[q] = model, int(header[1]), float(header[2])
            self._compute_done(q)  # the simulator's worker computation and step on this worker's state
            self.events.clear()
            msg = self.in_flight.pop(q)
            self._send(msg)
            sent += 1

    def _send(self, msg: InFlight) -> None:
        data = wire.encode(msg.output.message.with_values(msg.output.message.values.float()))
        dist.send(torch.tensor([MAGIC, msg.version, len(data), int(msg.output.nbytes[0]), msg.samples],
                               dtype=torch.long), 0, tag=TAG_UP)
        if data:
            dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, tag=TAG_UP)
        parts = [msg.grads[0]]
        if self.worker_state.memory is not None:
            parts.append(self.worker_state.memory.flat[msg.worker])
        dist.send(torch.cat(parts).to(self.dtype).contiguous(), 0, tag=TAG_UP)
