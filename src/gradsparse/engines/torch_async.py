"""``engine: torch_async``: the asynchronous parameter server of ``engine: async`` as real
processes exchanging messages over torch.distributed (Gloo point-to-point, no RPC).

Started with one process more than workers (``gradsparse launch CONFIG --nproc N+1``): rank 0
is the server, rank q + 1 is worker q. The protocol is the simulator's (ALGORITHMS.md §6,
:mod:`gradsparse.engines.async_sim`), in real time instead of virtual time:

1. the server sends every worker the model x_0 (a dense wire frame at the model's precision,
   with its version 0 and the samples seen; sent, but not charged as a message of the
   algorithm, as the simulator's workers hold x_0 from the start);
2. worker q computes a mini-batch gradient at the model it holds (version tau_q), runs the
   algorithm's worker step on its own state (memory, momentum) at step tau_q, and sends its
   message's wire frames (values in the config's value dtype, exactly as the simulator computes
   them) followed by diagnostics (its gradient and new memory row, for the server's metrics;
   ``diagnostic_bytes``, not a message of the algorithm);
3. the server takes messages in the order they arrive (``recv`` from any source), applies each
   at once with the simulator's rules (staleness dampening, ``drop_older_than``, Kardam's filter
   with ``rejected: drop``), records the staleness t - tau_q, and sends the new model back to
   that worker only (a dense frame: the bytes the simulator charges for it);
4. after the run's last update the server tells every worker to stop, receiving (and counting,
   not applying) the message each still had on its way.

Messages travel through a :class:`~gradsparse.comm.PointToPointChannel` (one header, then the
frames), the same as the parameter server of ``engine: torch``. The ``asynchronous.compute`` /
``network`` laws are not used: compute and network times are the real ones, so a run with
several workers depends on timing (the order of arrivals) and is not bitwise repeatable;
``virtual_time`` is wall-clock seconds since the server started. With one worker it is
sequential SGD and equals ``engine: async`` (and ``sync``) with one worker, parameters and byte
ledger alike (tests/test_torch_async.py). Worker 0 draws mini-batches from the engine's generator (as the
simulator does), worker q > 0 from its own stream seeded by (seed, "data", q).
Not supported here: ``staleness_bound`` and Kardam's ``rejected: restore`` (both would have the
server rewrite a worker's state in another process).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..algorithm import WorkerStepOutput
from ..comm import PointToPointChannel
from ..compressors import stream_seed
from ..messages import SparseBatch
from ..metrics import METRICS
from .async_sim import AsyncSimulator, InFlight
from .torch_dist import _init_from_env

__all__ = ["TorchAsyncEngine"]

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
        #: what really carries the messages (the simulator's virtual-time channel is not used)
        self.transport = PointToPointChannel("server" if self.rank == 0 else "worker", ledger=self.ledger)
        if self.rank > 0 and self.rank - 1 > 0:  # worker 0 keeps the engine's generator (as the simulator)
            self.data.generator.manual_seed(stream_seed(int(kw.get("seed", 0)), "data", 0, self.rank - 1))

    def summary_counts(self) -> dict:
        return {"drained_messages": self.drained_messages}

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
        src, head, batch = self.transport.recv("uplink", max_d=self.d)  # any worker
        if batch is None:
            raise RuntimeError(f"engine torch_async: a message without frames from rank {src}")
        batch = batch.with_values(batch.values.to(self.dtype))
        has_memory = self.worker_state.memory is not None
        diagnostics = self.transport.recv_tensor(self.d * (2 if has_memory else 1), self.dtype, src)
        q = src - 1
        if has_memory:
            self.worker_state.memory.flat[q].copy_(diagnostics[self.d:])
        out = WorkerStepOutput(batch, torch.tensor([head.nbytes]), None, None)
        self.in_flight[q] = InFlight(q, head.step, out, None, head.samples, diagnostics[: self.d][None], self.worker_models[q])
        return q

    def _send_model(self, q: int, at: float, charge: bool = True) -> None:
        if self.total_steps is not None and self.t >= self.total_steps:
            self.transport.send(q + 1, "stop")
            return
        self.worker_models[q] = self.w.clone()
        self.worker_versions[q] = self.t
        self.worker_epochs[q] = self.epoch
        self.transport.send(q + 1, "model", SparseBatch.from_dense(self.w[None]), step=self.t, samples=self.samples_seen,
                          charge_message=charge)

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
            # x_0 is not a message of the algorithm (the simulator's workers hold it from the start)
            _, head, model = self.transport.recv(("model", "stop"), 0, max_d=self.d, charge_message=sent > 0)
            if head.kind == "stop":
                return sent
            self.worker_models[q] = model.to_dense(self.dtype)[0]
            self.worker_versions[q], self.worker_epochs[q] = head.step, head.samples / max(self.task.n_train, 1)
            self._send(self._form_message(q))  # the simulator's worker computation and step on its state
            sent += 1

    def _send(self, msg: InFlight) -> None:
        self.transport.send(0, "uplink", msg.output.message, step=msg.version, samples=msg.samples,
                          value_dtype=self.alg.value_dtype)
        parts = [msg.grads[0]]
        if self.worker_state.memory is not None:
            parts.append(self.worker_state.memory.flat[msg.worker])
        self.transport.send_tensor(torch.cat(parts).to(self.dtype), 0)
