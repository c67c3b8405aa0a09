"""The synchronous round shared by the simulated synchronous engines.

One round at step t: the step size alpha_t = schedule(t, epoch); (stagewise learning: restart at
a new stage's anchor with fresh state); every worker computes its gradient at the shared model
and runs the algorithm's worker step; the server step aggregates the N messages; every worker
applies the same update. The engines differ only in how the workers' side is computed
(:meth:`SynchronousEngine.worker_round`): the vectorized simulator does all N workers in one
call, the loop engine one model copy at a time.

Bytes: each worker step returns each message's size and the server step its message's size; the
round hands them (and the messages) to the engine's channel (:class:`~gradsparse.comm.SimulatedRounds`),
which charges the ledger with what the chosen ``collective`` sends
(:mod:`gradsparse.comm.collectives`): ``allgather`` by the topology's synchronous rule
(``Topology.synchronous_traffic``), ``sharded`` the owners' parts and reduced shards,
``allreduce`` the k values of a shared random-k support. ``sharded`` and ``allreduce`` deliver
the aggregate itself, so it is rounded to the value dtype as it travels; ``sharded`` with topology
``bidirectional`` compresses the downlink per owner slice (top-k over the plan's pieces).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field

import torch

from .. import wire
from ..algorithm import Algorithm, ServerState, ServerStepOutput, WorkerStepOutput
from ..comm import SimulatedRounds
from ..comm.collectives import ShardPlan, check_collective
from ..compressors import RandomK, TopK
from ..schedules import Schedule, StagewiseLearning
from ..tasks import Task
from .base import Engine
from .grouped_grad import GradientFactors



def configure_collective(alg: Algorithm, collective: str, layout, n_workers: int) -> tuple[ShardPlan | None, int | None]:
    """Check that ``alg`` can travel by ``collective`` over ``n_workers`` ranks (a ValueError
    that names what to change otherwise) and return (the shard plan, k values per rank).
    ``sharded`` + ``bidirectional``: the down compressor becomes top-k at the same density over
    every owner's slice of every segment (what each owner applies to its own shard)."""
    topo, kind = alg.topology, alg.topology.kind
    if collective == "allgather":
        return None, None
    if collective == "sharded":
        if kind not in ("all_to_all", "bidirectional"):
            raise ValueError(f"collective sharded runs topology all_to_all or bidirectional (owners compress their "
                             f"slice of the sum), not {kind!r}")
        plan = ShardPlan.of_layout(layout, n_workers)
        if kind == "bidirectional":
            down = topo.down_compressor
            if not isinstance(down, TopK) or down.density is None:
                raise ValueError("collective sharded with topology bidirectional: each owner compresses its own slice, "
                                 "so the down compressor must be top-k with a density (down_compressor: {kind: topk, "
                                 f"density: RHO}}), got {down.describe()}")
            if alg.momentum.side == "server":
                raise ValueError("collective sharded with topology bidirectional keeps no server momentum (each owner "
                                 "holds only its slice of the sum); use momentum kind update, or collective allgather")
            # the owners' rule (rebuilt from the density, so building again for another P is the same)
            topo.down_compressor = TopK(density=down.density, scope="layerwise", layout=plan.piece_layout())
        return plan, None
    if collective == "allreduce":
        comp = alg.compressor
        if kind != "all_to_all":
            raise ValueError(f"collective allreduce runs topology all_to_all, not {kind!r}")
        if not (isinstance(comp, RandomK) and comp.shared_support):
            raise ValueError("collective allreduce sums the values of one support shared by every worker: it needs "
                             f"compressor randomk with shared_support: true, got {comp.describe()}")
        return None, comp.k_for(layout.d)
    raise AssertionError(collective)  # pragma: no cover - check_collective ran first


@dataclass
class StepRecord:
    """What one synchronous round did.

    ``grads`` ([N, d] raw stochastic gradients) is built on first access when the round kept them
    in factored form. When the engine updated the memory in place, ``accumulated()`` works only
    until the next round overwrites that memory (it raises instead of returning changed values).
    """

    step: int
    lr: float
    params_before: torch.Tensor
    _grads: object  # [N, d] tensor, or GradientFactors
    worker: WorkerStepOutput
    server: ServerStepOutput
    server_state_before: ServerState
    uplink_bytes: int
    downlink_bytes: int
    _live: list = field(default_factory=lambda: [True])

    @property
    def nnz(self) -> torch.Tensor:
        """[N] entries in each worker's message."""
        return self.worker.message.counts

    @property
    def grads(self) -> torch.Tensor:
        if isinstance(self._grads, GradientFactors):
            self._grads = self._grads.dense(self.params_before.numel(), self.params_before.dtype)
        return self._grads

    def weighted_grad(self, p: torch.Tensor) -> torch.Tensor:
        """sum_q p_q g_q ([d]) of the raw gradients, without densifying factored ones."""
        if isinstance(self._grads, GradientFactors):
            return self._grads.weighted_sum(p, self.params_before.numel())
        return p.to(self._grads.dtype) @ self._grads

    def weighted_feedback_input(self, p: torch.Tensor) -> torch.Tensor:
        """sum_q p_q g~_q of what the workers fed to error feedback (gradient with weight decay and
        proximal term, or the momentum direction); the raw gradients on the in-place path."""
        if self.worker.feedback_input is None:
            return self.weighted_grad(p)
        return p.to(self.worker.feedback_input.dtype) @ self.worker.feedback_input

    def accumulated(self) -> torch.Tensor:
        """[N, d] the vectors the workers' compressor saw (a, p or v)."""
        if not self._live[0]:
            raise RuntimeError(
                f"the accumulated vectors of step {self.step} are gone: the engine updated the "
                "error-feedback memory in place at a later step; read them before stepping again"
            )
        return self.worker.accumulated()


class SynchronousEngine(Engine):
    """Common state and round of the synchronous simulated engines (see the module docstring)."""

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
        collective: str = "allgather",
    ) -> None:
        self._setup(task, algorithm, schedule, n_workers=n_workers, batch_size=batch_size, split=split,
                    shards_per_worker=shards_per_worker, seed=seed, gradient_shift=gradient_shift,
                    sampling=sampling, n_shards=n_shards)
        if weights is None:
            self.weights = torch.full((n_workers,), 1.0 / n_workers, dtype=self.dtype)
        else:
            if len(weights) != n_workers or any(not (p >= 0) for p in weights):
                raise ValueError(f"weights must be {n_workers} non-negative numbers, got {weights!r}")
            self.weights = torch.tensor(weights, dtype=self.dtype)
        self.worker_ids = torch.arange(n_workers)
        self.collective = check_collective(collective)
        self.shard_plan, self.values_per_rank = configure_collective(self.alg, self.collective, self.layout, n_workers)
        self.channel = self._make_channel()
        self.ledger = self.channel.ledger
        self.stagewise = StagewiseLearning(schedule, self.w) if schedule.kind == "stagewise" else None
        self._live = [True]

    def _make_channel(self):
        """How this engine's messages travel (simulated rounds; real engines override)."""
        return SimulatedRounds(self.alg.topology, self.n_workers, collective=self.collective, plan=self.shard_plan,
                               value_dtype=self.alg.value_dtype, values_per_rank=self.values_per_rank)

    def transported_aggregate(self, message) -> torch.Tensor | None:
        """The aggregate as the collective delivers it (``sharded`` without a compressed downlink,
        ``allreduce``: sum_q p_q s_q rounded to the value dtype); ``None``: the server step forms
        it from the messages (``allgather``; ``sharded`` + ``bidirectional``, whose owners send
        C_down of the exact sum). Real engines return what their transport summed."""
        if self.collective == "allgather" or self.alg.topology.compresses_downlink:
            return None
        return wire.round_values(message.weighted_sum(self.weights), self.alg.value_dtype)

    def _renew_live_token(self) -> list:
        """Call before the memory buffer is overwritten in place: the previous round's record can
        no longer rebuild its accumulated vectors (it raises instead); returns this round's token."""
        self._live[0] = False
        self._live = [True]
        return self._live

    # ---- the round ------------------------------------------------------------------------
    @property
    def worker_weights(self) -> torch.Tensor:
        """Weights p_q of the workers' memories in averages over workers."""
        return self.weights

    @property
    def epoch(self) -> float:
        return self.samples_seen / max(self.task.n_train, 1)

    @abstractmethod
    def worker_round(self, w: torch.Tensor, t: int, lr: float) -> tuple[object, WorkerStepOutput, list]:
        """All workers' side of round t at model w: (gradients or their factors, the workers'
        output with the new state, a liveness token for in-place memories)."""

    def step(self) -> StepRecord:
        t = self.t
        if self.stagewise is not None:
            restart = self.stagewise.begin_step(t, self.w)
            if restart is not None:  # a fresh run of the algorithm from the new anchor
                self.w = restart
                self.worker_state = self.alg.init_worker_state(self.layout, self.n_workers, self.dtype)
                self.server_state = self.alg.init_server_state(self.layout, self.dtype)
        lr = float(self.schedule(t, self.epoch))
        w = self.w
        grads, worker, live = self.worker_round(w, t, lr)
        server_before = self.server_state
        server = self.alg.server_step(worker.message, self.server_state, step=t, lr=lr, weights=self.weights,
                                      aggregate=self.transported_aggregate(worker.message))
        server = self.delivered(server)
        self.worker_state, self.server_state = worker.state, server.state
        self.w = w - server.update
        up, down = self.channel.deliver_round(worker.nbytes, server.nbytes, worker.message, server.message)
        self.density_sum += float(worker.message.counts.double().mean()) / self.d
        if self.track_total_error and self.worker_state.memory is not None:
            self.total_error += float(self.worker_state.memory.flat.double().square().sum()) / self.n_workers
        self.t += 1
        return StepRecord(t, lr, w, grads, worker, server, server_before, up, down, live)

    def delivered(self, server: ServerStepOutput) -> ServerStepOutput:
        """The server step's output with the update as the transport delivered it (real engines
        whose owners compress their own slices); the simulators deliver it as computed."""
        return server

    # ---- gradients shared by the engines -----------------------------------------------------
    def feedback_gradients(self, grads: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The gradients the workers feed to the algorithm: + the stagewise proximal term."""
        if self.stagewise is not None:
            return grads + self.stagewise.proximal_gradient(w)
        return grads

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "engine": self.name,
            "t": self.t,
            "w": self.w.clone(),
            "algorithm": self.alg.state_dict(self.worker_state, self.server_state, layout=self.layout,
                                             n_workers=self.n_workers),
            "generator": self.gen.get_state(),
            "data": self.data.state_dict(),
            "samples_seen": self.samples_seen,
            "ledger": self.ledger.state_dict(),
            "density_sum": self.density_sum,
            "total_error": self.total_error,
            "stagewise": None if self.stagewise is None else self.stagewise.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        if tuple(sd["w"].shape) != (self.d,):
            raise ValueError(f"checkpoint model has {sd['w'].numel()} parameters, this task has d = {self.d}")
        self.worker_state, self.server_state = self.alg.load_state_dict(
            sd["algorithm"], layout=self.layout, n_workers=self.n_workers
        )
        self.t = int(sd["t"])
        self.w = sd["w"].clone().to(self.dtype)
        self.gen.set_state(sd["generator"])
        self.data.load_state_dict(sd.get("data", {}))
        self.samples_seen = int(sd["samples_seen"])
        self.ledger.load_state_dict(sd["ledger"])
        self.density_sum = float(sd["density_sum"])
        self.total_error = float(sd["total_error"])
        if (sd["stagewise"] is None) != (self.stagewise is None):
            raise ValueError("checkpoint and run disagree on stagewise learning")
        if self.stagewise is not None:
            self.stagewise.load_state_dict(sd["stagewise"])
