"""Asynchronous parameter server in virtual time (``engine: async``; paper 001, ALGORITHMS.md §6).

One server holds the model x_t and its version t (the number of updates applied). N workers:

1. worker q holds the last model it received, version tau_q; it computes a mini-batch gradient
   there (compute time ~ the compute law times its speed factor) and runs the algorithm's worker
   step on its own state (error-feedback memory, momentum), at step tau_q: its step size
   alpha_{tau_q} (``none``/``ef``/``ef-scaled``) and its random-k stream use tau_q;
2. the message travels to the server (network time = offset + Exponential(rate lambda), plus,
   optionally, latency + bytes / bandwidth from the message's exact wire size);
3. on arrival the server applies it at once — x_{t+1} = x_t - update, one *iteration* is one
   server update, with ``memory`` feedback the server's step size eta_t multiplies it — unless a
   rule rejects it (below); it records the staleness t - tau_q; applying takes ``server_time``
   (messages arriving meanwhile wait, in arrival order);
4. the server sends the new model back to that worker only (dense: d values; the same network
   law), which starts its next computation on arrival.

Rules that may reject an arriving message (each counted; see ``summary.json``):

* ``staleness_bound: s`` (stale-synchronous): a message that would be applied with staleness
  > s is not applied; the worker's state is restored to what it was before it formed that
  message (nothing is lost) and it waits for the current model, on which it recomputes. So no
  applied update is ever more than s versions stale.
* ``drop_older_than: L``: a message with staleness > L is discarded (what it carried is lost,
  as in FLSim's maximum-staleness cutoff); the worker gets the current model.
* Kardam's Lipschitz filter (Damaskinos et al., "Asynchronous Byzantine Machine Learning (the
  case of SGD)", ICML 2018, as summarised in its abstract; the full text was not available here):
  the empirical Lipschitz coefficient of worker q's message, ||s_q - s_q'|| / ||x_tau - x_tau'||
  against the same worker's previous accepted message s_q' (computed at x_tau'), is compared
  with the ``quantile`` (default (N - f)/N, f = ``byzantine``, default 1) of the last ``window``
  (default N) coefficients computed before it (accepted or not: so at most about a 1 - quantile
  share of honest messages is rejected and the server cannot stall); above it the message is
  rejected (``rejected: drop`` discards it, ``restore`` returns its content to the worker's
  memory). Kardam's staleness
  dampening is the algorithm's ``staleness`` setting (e^{-beta tau}, beta e^{-beta tau}, ...).

Randomness: one generator per purpose and worker (compute time, uplink delay, downlink delay),
seeded from (seed, purpose, worker): the k-th computation of worker q always takes the same time
and its k-th message the same delay, so the event trace does not change when only the algorithm
or its density changes (unless the size-dependent network term is on). Mini-batches come from
the engine's generator in event order (with one worker and zero delays: the synchronous
engine's batches). Events at equal times are ordered by worker id. Evaluation and metrics use
the server's model.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import wire
from ..algorithm import Algorithm, WorkerState, WorkerStepOutput
from ..comm import VirtualTimeNetwork
from ..compressors import stream_seed
from ..constraints import Interval, check_all
from ..messages import SparseBatch
from ..metrics import METRICS
from ..schedules import Schedule
from ..segments import SegmentedTensor
from ..tasks import Task
from .base import Engine, ModelCopy
from .synchronous import StepRecord

COMPUTE_LAWS = ("constant", "uniform", "exponential")
REJECTED_ACTIONS = ("drop", "restore")

_COMPUTE_DONE, _ARRIVAL, _MODEL_ARRIVAL = "compute_done", "arrival", "model_arrival"


@dataclass
class ComputeLaw:
    """Compute time of one mini-batch gradient: ``constant`` (``value``), ``uniform``
    [``low``, ``high``] or ``exponential`` (mean ``value``), times the worker's speed factor."""

    kind: str = "uniform"
    value: float = 1.0
    low: float = 0.9
    high: float = 1.1
    speeds: list[float] | None = None

    CONSTRAINTS: ClassVar[dict[str, Interval]] = {"value": Interval(0.0, None), "low": Interval(0.0, None),
                                                   "high": Interval(0.0, None)}

    def __post_init__(self) -> None:
        if self.kind not in COMPUTE_LAWS:
            raise ValueError(f"compute law must be one of {list(COMPUTE_LAWS)}, got {self.kind!r}")
        check_all("compute law", self.CONSTRAINTS, {"value": self.value, "low": self.low, "high": self.high})
        if self.kind == "uniform" and self.low > self.high:
            raise ValueError(f"compute law uniform needs low <= high, got [{self.low}, {self.high}]")
        for q, v in enumerate(self.speeds or []):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < math.inf):
                raise ValueError(f"compute law speeds[{q}] must be a finite number >= 0 (a factor on the "
                                 f"worker's compute time), got {v!r}")

    def longest(self) -> float:
        """A bound on one computation's time: the law's largest value (for ``exponential``, 50
        means: exceeded with probability e^-50) times the largest speed factor."""
        base = {"constant": self.value, "uniform": self.high, "exponential": 50.0 * self.value}[self.kind]
        return base * max(self.speeds or [1.0])

    def draw(self, gen: torch.Generator, worker: int) -> float:
        speed = 1.0 if self.speeds is None else float(self.speeds[worker])
        if self.kind == "constant":
            base = self.value
        elif self.kind == "uniform":
            base = self.low + (self.high - self.low) * float(torch.rand((), generator=gen, dtype=torch.float64))
        else:
            base = self.value * float(torch.empty((), dtype=torch.float64).exponential_(1.0, generator=gen))
        return base * speed


@dataclass
class NetworkLaw:
    """Time of one message: ``offset`` + Exponential(``rate``) (paper 001's "truncation with offset
    0.002"; ``rate: null`` for no random part), plus ``latency`` + bytes / ``bandwidth`` (bytes per
    unit of virtual time) when ``bandwidth`` is set (off by default)."""

    offset: float = 0.002
    rate: float | None = 1.0
    latency: float = 0.0
    bandwidth: float | None = None

    CONSTRAINTS: ClassVar[dict[str, Interval]] = {
        "offset": Interval(0.0, None), "latency": Interval(0.0, None),
        "rate": Interval(0.0, None, closed="neither", optional=True),
        "bandwidth": Interval(0.0, None, closed="neither", optional=True)}

    def __post_init__(self) -> None:
        check_all("network law", self.CONSTRAINTS, {"offset": self.offset, "latency": self.latency,
                                                    "rate": self.rate, "bandwidth": self.bandwidth})

    def longest(self, nbytes: int) -> float:
        """A bound on one message's time (the exponential part: 50 means, exceeded with
        probability e^-50)."""
        t = self.offset + (50.0 / self.rate if self.rate is not None else 0.0)
        if self.bandwidth is not None:
            t += self.latency + nbytes / self.bandwidth
        return t

    def draw(self, gen: torch.Generator, nbytes: int) -> float:
        t = self.offset
        if self.rate is not None:
            t += float(torch.empty((), dtype=torch.float64).exponential_(self.rate, generator=gen))
        if self.bandwidth is not None:
            t += self.latency + nbytes / self.bandwidth
        return t


@dataclass
class KardamFilter:
    """Kardam's Lipschitz filter (see the module docstring for the rule and its source)."""

    enabled: bool = False
    window: int | None = None
    byzantine: int = 1
    quantile: float | None = None
    rejected: str = "drop"

    CONSTRAINTS: ClassVar[dict[str, Interval]] = {
        "window": Interval(1, None, integer=True, optional=True), "byzantine": Interval(0, None, integer=True),
        "quantile": Interval(0.0, 1.0, closed="right", optional=True)}

    def __post_init__(self) -> None:
        if self.rejected not in REJECTED_ACTIONS:
            raise ValueError(f"kardam rejected must be one of {list(REJECTED_ACTIONS)}, got {self.rejected!r}")
        check_all("kardam", self.CONSTRAINTS, {"window": self.window, "byzantine": self.byzantine,
                                               "quantile": self.quantile})


@dataclass
class InFlight:
    """A worker's message on its way (or waiting at the busy server)."""

    worker: int
    version: int  # tau: the model version it was computed at
    output: WorkerStepOutput
    state_before: WorkerState  # the worker's state before it formed the message (for restore)
    samples: int
    grads: torch.Tensor  # [1, d] the raw gradient (diagnostics)
    params: torch.Tensor  # [d] the worker's model x_tau


@dataclass
class AsyncStepRecord(StepRecord):
    worker_id: int = 0
    staleness: int = 0
    virtual_time: float = 0.0


@dataclass(order=True)
class _Event:
    time: float
    worker: int
    seq: int
    kind: str = field(compare=False)


class AsyncSimulator(Engine):
    name = "async"
    topologies = ("ps_uplink",)
    sends_model_down = True
    is_asynchronous = True
    metrics = frozenset(METRICS)
    CONSTRAINTS: ClassVar[dict[str, Interval]] = {
        "server_time": Interval(0.0, None), "staleness_bound": Interval(0, None, integer=True, optional=True),
        "drop_older_than": Interval(0, None, integer=True, optional=True)}

    def __init__(
        self,
        task: Task,
        algorithm: Algorithm,
        schedule: Schedule,
        *,
        n_workers: int,
        batch_size: int | str = 1,
        split: str = "iid",
        shards_per_worker: int = 2,
        sampling: str = "with_replacement",
        n_shards: int | None = None,
        weights: list[float] | None = None,
        seed: int = 0,
        gradient_shift: str = "none",
        compute: ComputeLaw | None = None,
        network: NetworkLaw | None = None,
        server_time: float = 0.0,
        staleness_bound: int | None = None,
        drop_older_than: int | None = None,
        kardam: KardamFilter | None = None,
        update_cosine: bool = False,
    ) -> None:
        if algorithm.topology.kind not in self.topologies:
            raise ValueError(
                f"engine 'async' runs a parameter server that sends each worker the dense model: use topology "
                f"'ps_uplink' (got {algorithm.topology.kind!r}; a compressed downlink would need one server "
                "memory per worker, since each worker pulls a different model delta, and is not implemented)"
            )
        if schedule.kind == "stagewise":
            raise ValueError("engine 'async' does not run stagewise learning (its stages are synchronous restarts)")
        if weights is not None:
            raise ValueError("engine 'async' applies each message on arrival with weight 1; remove workers.weights")
        check_all("engine async", self.CONSTRAINTS, {"staleness_bound": staleness_bound,
                                                     "drop_older_than": drop_older_than, "server_time": server_time})
        self._setup(task, algorithm, schedule, n_workers=n_workers, batch_size=batch_size, split=split,
                    shards_per_worker=shards_per_worker, seed=seed, gradient_shift=gradient_shift,
                    sampling=sampling, n_shards=n_shards)
        self.compute = compute or ComputeLaw()
        if self.compute.speeds is not None and len(self.compute.speeds) != n_workers:
            raise ValueError(f"compute speeds has {len(self.compute.speeds)} entries for {n_workers} workers")
        self.network = network or NetworkLaw()
        self.server_time = float(server_time)
        self.staleness_bound, self.drop_older_than = staleness_bound, drop_older_than
        self.kardam = kardam or KardamFilter()
        if self.kardam.enabled and not 0 <= self.kardam.byzantine < n_workers:
            raise ValueError(f"kardam byzantine f = {self.kardam.byzantine} must be < workers.count = {n_workers} "
                             "(the filter keeps the (N - f)/N quantile of the workers' coefficients; f >= N leaves "
                             "no honest worker)")
        self.update_cosine = bool(update_cosine)

        # module tasks: gradients by autograd on one model copy (the workers compute one at a time)
        self._model = ModelCopy(task, self.layout) if task.module is not None else None
        self.one = torch.ones(1, dtype=self.dtype)
        self.streams = {
            purpose: [torch.Generator().manual_seed(stream_seed(seed, purpose, 0, q)) for q in range(n_workers)]
            for purpose in ("compute", "uplink_delay", "downlink_delay")
        }
        #: the model travels dense at its own precision (value_dtype is the messages' dtype)
        self.model_nbytes = wire.dense_nbytes(self.d, self.w.element_size())
        self.channel = self._make_channel()
        self.ledger = self.channel.ledger
        # server and workers
        self.now = 0.0
        self.server_busy_until = 0.0
        self.worker_models = [self.w.clone() for _ in range(n_workers)]
        self.worker_versions = [0] * n_workers
        self.worker_epochs = [0.0] * n_workers
        self.in_flight: dict[int, InFlight] = {}
        self.events: list[_Event] = []
        self._seq = 0
        for q in range(n_workers):
            self._schedule(self.compute.draw(self.streams["compute"][q], q), q, _COMPUTE_DONE)
        self.staleness_counts: dict[int, int] = {}
        self.rejected = {"staleness_bound": 0, "drop_older_than": 0, "kardam": 0}
        self.kardam_coefficients: list[float] = []
        self.kardam_previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.trace: list[tuple[float, int, str]] = []
        self.record_trace = False

    #: the largest virtual time a run may reach (a float with room to add one more delay)
    MAX_VIRTUAL_TIME = 1e300

    def check_horizon(self, steps: int) -> None:
        """Raise ValueError when ``steps`` server updates could take the virtual clock to
        infinity (or near it, where adding a delay no longer changes it): at most every update
        waits for one computation, two messages (the largest model or message: dense) and the
        server, each at the bound of its law (:meth:`ComputeLaw.longest`, :meth:`NetworkLaw.longest`)."""
        dense = max(self.model_nbytes, wire.dense_nbytes(self.d, 4))
        per_update = self.compute.longest() + 2 * self.network.longest(dense) + self.server_time
        horizon = (steps + self.n_workers) * per_update
        if not horizon < self.MAX_VIRTUAL_TIME:
            raise ValueError(
                f"the compute / network laws make {steps} updates last up to {horizon:.3g} units of virtual time "
                f"(one update: compute {self.compute.longest():.3g} + 2 x network {self.network.longest(dense):.3g} + "
                f"server {self.server_time:.3g}), beyond {self.MAX_VIRTUAL_TIME:g}: the clock would reach infinity; "
                "use smaller times (offset, latency, 1/rate, bytes/bandwidth, compute value/high x speeds)")

    def planned_messages(self, steps: int, message_nbytes: int | None = None) -> list[int]:
        """How many messages each worker forms (and keeps: a message undone by the staleness
        bound does not count) until the server's ``steps``-th update, by replaying the event
        trace from the current state without computing anything (the same draws, in the same
        order, from copies of the engine's generators).

        Exact when the trace does not depend on the messages: no Kardam filter (it rejects by
        content) and no size-dependent network term (``bandwidth``); with ``bandwidth`` every
        message is taken to be ``message_nbytes`` long (default: the dense frame), an estimate.
        A compressor that plans a budget per worker (``budget_threshold``) plans over these."""
        if self.kardam.enabled:
            raise ValueError("the Kardam filter rejects messages by their content, so the messages each worker "
                             "sends cannot be planned from the event trace")
        streams = {}
        for purpose, gens in self.streams.items():
            streams[purpose] = []
            for g in gens:
                copy = torch.Generator()
                copy.set_state(g.get_state())
                streams[purpose].append(copy)
        events = [_Event(e.time, e.worker, e.seq, e.kind) for e in self.events]
        heapq.heapify(events)
        seq = self._seq
        t, busy = self.t, self.server_busy_until
        versions = list(self.worker_versions)
        sent_at = {q: f.version for q, f in self.in_flight.items()}
        kept = [0] * self.n_workers
        uplink = self.model_nbytes if message_nbytes is None else int(message_nbytes)

        def push(at: float, q: int, kind: str) -> None:
            nonlocal seq
            heapq.heappush(events, _Event(at, q, seq, kind))
            seq += 1

        while t < steps:
            if not events:
                break
            ev = heapq.heappop(events)
            now, q = ev.time, ev.worker
            if ev.kind == _COMPUTE_DONE:
                kept[q] += 1
                sent_at[q] = versions[q]
                push(now + self.network.draw(streams["uplink_delay"][q], uplink), q, _ARRIVAL)
            elif ev.kind == _MODEL_ARRIVAL:
                push(now + self.compute.draw(streams["compute"][q], q), q, _COMPUTE_DONE)
            else:
                start = max(now, busy)
                if start > now:
                    push(start, q, _ARRIVAL)
                    continue
                staleness = t - sent_at.pop(q)
                end = now + self.server_time
                busy = end
                if self.staleness_bound is not None and staleness > self.staleness_bound:
                    kept[q] -= 1  # the worker's state (its budget's spend) is restored
                elif self.drop_older_than is not None and staleness > self.drop_older_than:
                    pass
                else:
                    t += 1
                versions[q] = t
                push(end + self.network.draw(streams["downlink_delay"][q], self.model_nbytes), q, _MODEL_ARRIVAL)
        return kept

    @classmethod
    def synchronous_equivalent(cls, config: dict) -> dict | None:
        """One worker, zero delays, a parameter server: then every message is applied at once
        with staleness 0, which is synchronous SGD on one worker."""
        algorithm = dict(config.get("algorithm", {}))
        topology = dict(algorithm.get("topology", {}))
        if topology.get("kind", "all_to_all") not in ("all_to_all", "ps_uplink"):
            return None
        if config.get("schedule", {}).get("kind") == "stagewise":
            return None
        algorithm["topology"] = {"kind": "ps_uplink"}
        workers = {k: v for k, v in config.get("workers", {}).items() if k != "weights"}
        workers["count"] = 1
        task = config.get("task", {})
        if task.get("name") == "toy_quadratic":  # one worker per local objective: keep one
            task = {**task, "options": {**task.get("options", {}), "centers": [1.0]}}
        return {**config, "task": task, "workers": workers, "algorithm": algorithm,
                "asynchronous": {"compute": {"kind": "constant", "value": 0.0}, "network": {"offset": 0.0, "rate": None}}}

    def _make_channel(self):
        """Messages in virtual time (:class:`~gradsparse.comm.VirtualTimeNetwork`): the network
        law with each worker's own delay streams."""
        return VirtualTimeNetwork(self.network, self.streams["uplink_delay"], self.streams["downlink_delay"],
                                  self.model_nbytes)

    # ---- events ----------------------------------------------------------------------------
    def _schedule(self, at: float, worker: int, kind: str) -> None:
        heapq.heappush(self.events, _Event(at, worker, self._seq, kind))
        self._seq += 1

    @property
    def epoch(self) -> float:
        return self.samples_seen / max(self.task.n_train, 1)

    def _worker_gradient(self, q: int) -> tuple[torch.Tensor, int]:
        rows = self.data.sample_worker(q)
        x, y = self.task.train_x[rows], self.task.train_y[rows]
        g = self._grad(self.worker_models[q], x, y) if self._model is None else self._model.gradient(self.worker_models[q], x, y)
        g = self.shifted(g, lambda x_star: self._grad(x_star, x, y))
        return g[None], int(rows.numel())

    def _compute_done(self, q: int) -> None:
        """Worker q finished its gradient: it forms its message and sends it."""
        msg = self._form_message(q)
        self.in_flight[q] = msg
        self._schedule(self.channel.send_uplink(q, int(msg.output.nbytes[0]), self.now), q, _ARRIVAL)

    def _form_message(self, q: int) -> "InFlight":
        """Worker q's gradient at the model it holds and its worker step on its own state."""
        grads, samples = self._worker_gradient(q)
        tau = self.worker_versions[q]
        lr = float(self.schedule(tau, self.worker_epochs[q]))
        rows = self.worker_state.rows(slice(q, q + 1))
        before = rows.clone()
        ids = torch.tensor([q])
        out = self.alg.worker_update_(grads, self.worker_models[q], rows, step=tau, lr=lr, workers=ids)
        return InFlight(q, tau, out, before, samples, grads, self.worker_models[q])

    def _send_model(self, q: int, at: float) -> None:
        self.worker_models[q] = self.w.clone()
        self.worker_versions[q] = self.t
        self.worker_epochs[q] = self.epoch
        self._schedule(self.channel.send_model(q, at), q, _MODEL_ARRIVAL)

    def _rejection(self, msg: InFlight, staleness: int) -> str | None:
        if self.staleness_bound is not None and staleness > self.staleness_bound:
            return "staleness_bound"
        if self.drop_older_than is not None and staleness > self.drop_older_than:
            return "drop_older_than"
        if self.kardam.enabled:
            sent = msg.output.message.to_dense(self.dtype)[0]
            prev = self.kardam_previous.get(msg.worker)
            if prev is not None:
                dx = float((msg.params - prev[1]).norm())
                coefficient = float((sent - prev[0]).norm()) / dx if dx > 0 else 0.0
                window = self.kardam.window or self.n_workers
                recent = self.kardam_coefficients[-window:]
                self.kardam_coefficients.append(coefficient)
                q = self.kardam.quantile or max(self.n_workers - self.kardam.byzantine, 1) / self.n_workers
                if recent and coefficient > float(torch.quantile(torch.tensor(recent, dtype=torch.float64), q)):
                    return "kardam"
            self.kardam_previous[msg.worker] = (sent, msg.params)
        return None

    def _restore(self, msg: InFlight, how: str) -> None:
        if how == "staleness_bound":  # as if the message had never been formed
            self.worker_state.rows(slice(msg.worker, msg.worker + 1)).copy_(msg.state_before)
        elif how == "kardam" and self.kardam.rejected == "restore" and self.worker_state.memory is not None:
            # the rejected content goes back into the worker's memory: nothing is lost
            row = self.worker_state.memory.flat[msg.worker : msg.worker + 1]
            msg.output.message.scatter_(row, msg.output.message.gather(row) + msg.output.message.values)

    def _arrival(self, q: int) -> AsyncStepRecord | None:
        """The server processes worker q's message (after any update in progress)."""
        start = max(self.now, self.server_busy_until)
        if start > self.now:  # the server is busy: the message waits
            self._schedule(start, q, _ARRIVAL)
            return None
        msg = self.in_flight.pop(q)
        staleness = self.t - msg.version
        rejected = self._rejection(msg, staleness)
        end = self.now + self.server_time
        self.server_busy_until = end
        if rejected is not None:
            self.rejected[rejected] += 1
            self._restore(msg, rejected)
            self._send_model(q, end)
            return None
        t = self.t
        lr = float(self.schedule(t, self.epoch))
        server_before = self.server_state
        server = self.alg.server_step(msg.output.message, self.server_state, step=t, lr=lr, weights=self.one,
                                      versions=torch.tensor([msg.version]), send_downlink=False)
        self.server_state = server.state
        params_before = self.w
        self.w = self.w - server.update
        self.t += 1
        self.samples_seen += msg.samples
        self.staleness_counts[staleness] = self.staleness_counts.get(staleness, 0) + 1
        self.density_sum += float(msg.output.message.counts.double().mean()) / self.d
        if self.track_total_error and self.worker_state.memory is not None:
            self.total_error += float(self.worker_state.memory.flat.double().square().sum()) / self.n_workers
        record = AsyncStepRecord(t, lr, params_before, msg.grads, msg.output, server, server_before,
                                 int(msg.output.nbytes[0]), self.model_nbytes, [True], q, staleness, self.now)
        record.update_cosine = self._update_cosine(msg, server.update, params_before) if self.update_cosine else None
        self._send_model(q, end)
        return record

    def _update_cosine(self, msg: InFlight, update: torch.Tensor, x: torch.Tensor) -> float:
        """Paper 001: cosine between the applied (stale, compressed) update and the fresh gradient
        at the server's model on a fresh mini-batch of the same worker (costs one gradient)."""
        rows = self.data.sample_worker(msg.worker)
        fresh = self._grad(x, self.task.train_x[rows], self.task.train_y[rows])
        den = float(update.norm() * fresh.norm())
        return float(update @ fresh) / den if den > 0 else math.nan

    def step(self) -> AsyncStepRecord:
        """Process events until the server has applied one update; returns its record."""
        while True:
            if not self.events:
                raise RuntimeError("the asynchronous engine ran out of events (every worker waiting)")
            ev = heapq.heappop(self.events)
            self.now = ev.time
            if self.record_trace:
                self.trace.append((ev.time, ev.worker, ev.kind))
            if ev.kind == _COMPUTE_DONE:
                self._compute_done(ev.worker)
            elif ev.kind == _MODEL_ARRIVAL:
                self._schedule(self.now + self.compute.draw(self.streams["compute"][ev.worker], ev.worker),
                               ev.worker, _COMPUTE_DONE)
            else:
                record = self._arrival(ev.worker)
                if record is not None:
                    return record

    # ---- diagnostics -------------------------------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        """Weights of the messages of one step (one message, weight 1)."""
        return self.one

    @property
    def worker_weights(self) -> torch.Tensor:
        """Weights of the workers' memories in averages over workers (1/N each)."""
        return torch.full((self.n_workers,), 1.0 / self.n_workers, dtype=self.dtype)

    def staleness_histogram(self) -> list[tuple[int, int]]:
        return sorted(self.staleness_counts.items())

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        def message(m: SparseBatch) -> dict:
            return {"d": m.d, "offsets": m.offsets, "values": m.values, "indices": m.indices,
                    "seeds": m.seeds, "dense": m.dense, "sorted_rows": m.sorted_rows, "fixed_k": m.fixed_k}

        def state(s: WorkerState) -> dict:
            return {"memory": None if s.memory is None else s.memory.flat.clone(),
                    "momentum": None if s.momentum is None else s.momentum.flat.clone(), "compressor": s.compressor}

        flights = {
            q: {"version": f.version, "message": message(f.output.message), "nbytes": f.output.nbytes,
                "accumulated_values": f.output.feedback.accumulated_values, "accumulated": f.output.feedback.accumulated,
                "state_after": state(f.output.state), "state_before": state(f.state_before), "samples": f.samples,
                "grads": f.grads, "params": f.params}
            for q, f in self.in_flight.items()
        }
        return {
            "engine": self.name, "t": self.t, "now": self.now, "server_busy_until": self.server_busy_until,
            "w": self.w.clone(),
            "algorithm": self.alg.state_dict(self.worker_state, self.server_state, layout=self.layout, n_workers=self.n_workers),
            "generator": self.gen.get_state(),
            "data": self.data.state_dict(),
            "streams": {p: [g.get_state() for g in gens] for p, gens in self.streams.items()},
            "events": [(e.time, e.worker, e.seq, e.kind) for e in self.events], "seq": self._seq,
            "worker_models": [m.clone() for m in self.worker_models], "worker_versions": list(self.worker_versions),
            "worker_epochs": list(self.worker_epochs), "in_flight": flights,
            "ledger": self.ledger.state_dict(), "samples_seen": self.samples_seen, "density_sum": self.density_sum,
            "total_error": self.total_error, "staleness_counts": dict(self.staleness_counts),
            "rejected": dict(self.rejected), "kardam_coefficients": list(self.kardam_coefficients),
            "kardam_previous": {q: (a.clone(), b.clone()) for q, (a, b) in self.kardam_previous.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        from ..feedback import FeedbackOutput

        if sd.get("engine") != self.name:
            raise ValueError(f"checkpoint of engine {sd.get('engine')!r} cannot resume engine 'async'")
        self.worker_state, self.server_state = self.alg.load_state_dict(sd["algorithm"], layout=self.layout,
                                                                        n_workers=self.n_workers)
        self.t, self.now, self.server_busy_until = int(sd["t"]), float(sd["now"]), float(sd["server_busy_until"])
        self.w = sd["w"].clone()
        self.gen.set_state(sd["generator"])
        self.data.load_state_dict(sd.get("data", {}))
        for p, states in sd["streams"].items():
            for g, s in zip(self.streams[p], states):
                g.set_state(s)
        self.events = [_Event(t, w, s, k) for t, w, s, k in sd["events"]]
        heapq.heapify(self.events)
        self._seq = int(sd["seq"])
        self.worker_models = [m.clone() for m in sd["worker_models"]]
        self.worker_versions, self.worker_epochs = list(sd["worker_versions"]), list(sd["worker_epochs"])

        def state(s: dict) -> WorkerState:
            seg = lambda t: None if t is None else SegmentedTensor(self.layout, t.clone())  # noqa: E731
            return WorkerState(seg(s["memory"]), seg(s["momentum"]), s["compressor"])

        self.in_flight = {}
        for q, f in sd["in_flight"].items():
            m = f["message"]
            msg = SparseBatch(m["d"], m["offsets"], m["values"], m["indices"], m["seeds"], m["dense"], m["sorted_rows"], m["fixed_k"])
            out = WorkerStepOutput(msg, f["nbytes"], state(f["state_after"]),
                                   FeedbackOutput(msg, f["accumulated_values"], f["accumulated"]), None)
            self.in_flight[int(q)] = InFlight(int(q), int(f["version"]), out, state(f["state_before"]), int(f["samples"]),
                                              f["grads"], f["params"])
        self.ledger.load_state_dict(sd["ledger"])
        self.samples_seen, self.density_sum = int(sd["samples_seen"]), float(sd["density_sum"])
        self.total_error = float(sd["total_error"])
        self.staleness_counts = {int(k): int(v) for k, v in sd["staleness_counts"].items()}
        self.rejected = dict(sd["rejected"])
        self.kardam_coefficients = list(sd["kardam_coefficients"])
        self.kardam_previous = {int(q): (a.clone(), b.clone()) for q, (a, b) in sd["kardam_previous"].items()}
