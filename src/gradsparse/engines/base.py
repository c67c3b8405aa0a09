"""What an engine provides, and the pieces the simulated engines share.

An *engine* runs one :class:`~gradsparse.algorithm.Algorithm` on one task:

=====================  ======================================================================
``name``               the value of the config key ``engine``
``topologies``         which topologies it runs
``metrics``            which metric columns it can record
``step()``             one step (a synchronous round, or one server update) -> a record
``w``, ``t``           the model (flat ``[d]``, the server's / every worker's) and steps done
``channel``, ``ledger``  how messages travel (:mod:`gradsparse.comm`) and the
                       :class:`~gradsparse.comm.ByteLedger` it charges: bytes and messages sent
                       each way, summed per message
``worker_state``,      the algorithm's explicit state (:class:`~gradsparse.algorithm.WorkerState`,
``server_state``       :class:`~gradsparse.algorithm.ServerState`)
``state_dict()``,      everything needed to resume bit-exactly (plain tensors and numbers)
``load_state_dict()``
``full_loss()``, ``full_gradient()``, ``test_accuracy()``   evaluation of the current model
=====================  ======================================================================

:data:`ENGINES` (in :mod:`gradsparse.engines`) maps names to classes; the test fixture in
``tests/test_engines.py`` runs the same configs on every engine and demands the same parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..comm import ByteLedger  # noqa: F401 (re-exported: gradsparse.engines.ByteLedger)
from ..constraints import Interval, check_all
from ..metrics import ASYNC_METRICS, METRICS
from ..segments import Layout
from ..tasks import Task, split_workers


#: how workers' gradients may be shifted: none, or EF-GD*'s g_i(x) - g_i(x*) (paper 002)
GRADIENT_SHIFTS = ("none", "optimum")


class Engine(ABC):
    name: ClassVar[str]
    topologies: ClassVar[tuple[str, ...]] = ("all_to_all", "ps_uplink", "bidirectional", "downlink_only")
    metrics: ClassVar[frozenset[str]] = frozenset(METRICS) - frozenset(ASYNC_METRICS)
    #: whether the server sends workers the model itself (then downlink bytes differ from sync's)
    sends_model_down: ClassVar[bool] = False
    #: whether updates arrive with staleness (the asynchronous engines: ``staleness_histogram``,
    #: ``now``, ``rejected`` and the asynchronous metrics)
    is_asynchronous: ClassVar[bool] = False
    #: whether the step loop runs on several processes (engine torch: every rank), which must
    #: agree after every step whether to stop (:meth:`agree_to_stop`)
    agrees_to_stop: ClassVar[bool] = False

    # what an engine records in summary.json; engines that have them set them in their constructor
    #: the gradient path "auto" resolved to (the vectorized simulator), else None
    gradient_path: str | None = None
    #: whether the workers' memories take c g in the engine's own buffer (the vectorized simulator)
    uses_in_place_memory: bool = False
    #: the collective of a synchronous round (allgather, sharded, allreduce); None when asynchronous
    collective: str | None = None
    #: stagewise learning (paper 004) when the schedule is stagewise, else None
    stagewise = None

    task: Task
    layout: Layout
    w: torch.Tensor
    t: int
    ledger: ByteLedger

    @classmethod
    def synchronous_equivalent(cls, config: dict) -> dict | None:
        """A variant of ``config`` (a raw config dict) on which this engine must give exactly the
        synchronous engine's parameters (for the engine-equivalence test), or None when there is
        none. Synchronous engines: the config itself."""
        return config

    @abstractmethod
    def step(self): ...

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, sd: dict) -> None: ...

    @property
    def d(self) -> int:
        return self.layout.d

    def bind_total_steps(self, steps: int) -> None:
        """The run's length, told before the first step (the real asynchronous engine's server
        stops its workers after the last update); nothing by default."""

    def agree_to_stop(self, found, signum: int | None):
        """After a step: (the first non-finite value any process found, the signal any process
        got), the same on every process. One process: its own."""
        return found, signum

    def summary_counts(self) -> dict:
        """Counts this engine adds to summary.json (the real asynchronous engine: messages drained
        at the end); none by default."""
        return {}

    def _setup(self, task: Task, algorithm, schedule, *, n_workers: int, batch_size, split: str,
               shards_per_worker: int, seed: int, gradient_shift: str,
               sampling: str = "with_replacement", n_shards: int | None = None) -> None:
        """What every simulated engine starts from: the task's initial model (drawn from the engine's
        generator, seeded by ``seed``), its layout, the workers' data (:class:`WorkerData`, the same
        generator), the algorithm's initial state, EF-GD*'s optimum, zeroed counters."""
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or not (1 <= n_workers <= 100_000):
            raise ValueError(f"n_workers must be an integer in 1..100000, got {n_workers!r}")
        if gradient_shift not in GRADIENT_SHIFTS:
            raise ValueError(f"gradient_shift must be one of {list(GRADIENT_SHIFTS)}, got {gradient_shift!r}")
        self.task, self.alg, self.schedule = task, algorithm, schedule
        self.n_workers, self.seed = n_workers, seed
        self.gen = torch.Generator().manual_seed(seed)
        params0 = task.init_params(self.gen)
        self.layout = Layout.of(params0)
        self.w = self.layout.flatten(params0).clone()
        self.dtype = self.w.dtype
        self.data = WorkerData(task, n_workers, split, shards_per_worker, batch_size, self.gen, sampling, n_shards)
        self.x_star = None
        if gradient_shift == "optimum":
            # EF-GD* (paper 002, App. C.3.2): g_i(x) - g_i(x*), same samples at both points
            if task.x_star is None:
                raise ValueError(f"gradient_shift 'optimum' needs a task with a known optimum; {task.name!r} has none")
            self.x_star = self.layout.flatten(task.x_star).to(self.dtype)
        self.worker_state = algorithm.init_worker_state(self.layout, n_workers, self.dtype)
        self.server_state = algorithm.init_server_state(self.layout, self.dtype)
        self._grad = torch.func.grad(self._loss_flat)
        self.t = 0
        self.samples_seen = 0
        self.density_sum = 0.0
        self.total_error = 0.0
        #: accumulate the total error sum_t (1/N) sum_q ||e_q||^2 every step (the runner turns it
        #: off when the metric is not recorded)
        self.track_total_error = True

    # ---- evaluation of the current model (shared by every engine) --------------------------
    def _loss_flat(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.task.loss(self.layout.unflatten(w), x, y)

    def shifted(self, g: torch.Tensor, gradient_at) -> torch.Tensor:
        """The gradient a worker feeds to the algorithm: ``g`` (taken at the model on some
        samples), less the same samples' gradient at the optimum under EF-GD* (paper 002,
        App. C.3.2: g_i(x) - g_i(x*); ``gradient_at(x_star)`` computes it); ``g`` otherwise."""
        return g if self.x_star is None else g - gradient_at(self.x_star)

    @staticmethod
    def _chunks(n: int, size: int = 4096):
        for a in range(0, n, size):
            yield a, min(n, a + size)

    @torch.no_grad()
    def full_loss(self, w: torch.Tensor | None = None) -> float:
        w = self.w if w is None else w
        n = self.task.n_train
        total = 0.0
        for a, b in self._chunks(n):
            total += float(self._loss_flat(w, self.task.train_x[a:b], self.task.train_y[a:b])) * (b - a)
        return total / n

    def full_gradient(self, w: torch.Tensor | None = None) -> torch.Tensor:
        w = self.w if w is None else w
        n = self.task.n_train
        grad = torch.func.grad(self._loss_flat)
        g = torch.zeros(self.d, dtype=w.dtype)
        for a, b in self._chunks(n):
            g += grad(w, self.task.train_x[a:b], self.task.train_y[a:b]) * (b - a)
        return g / n

    @torch.no_grad()
    def test_accuracy(self, w: torch.Tensor | None = None) -> float | None:
        if self.task.predict is None:
            return None
        x, y = self.task.test_x, self.task.test_y
        if x is None:
            x, y = self.task.train_x, self.task.train_y
        params = self.layout.unflatten(self.w if w is None else w)
        correct = 0
        for a, b in self._chunks(int(x.shape[0])):
            correct += int((self.task.predict(params, x[a:b]).argmax(dim=-1) == y[a:b]).sum())
        return correct / int(x.shape[0])


#: how a worker draws its mini-batches from its shard (see :class:`WorkerData`)
SAMPLINGS = ("with_replacement", "reshuffle")


class WorkerData:
    """Which training rows each worker owns, and the mini-batches it draws.

    Split ``iid`` or ``shards`` (sort by label, cut into shards, a fixed number per worker), or
    the task's own assignment (``task.worker_data``). Each step every worker draws
    ``batch_size`` rows from its shard (``"full"``: the whole shard, exact local gradients):

    * ``sampling: with_replacement``: uniformly, with replacement;
    * ``sampling: reshuffle`` (random reshuffling, as in paper 003): each worker walks through a
      random permutation of its shard, ``batch_size`` rows at a time, and draws a fresh
      permutation when it has used every row (a batch that straddles the end takes the rest of
      the old permutation, then the start of the new one), so within each pass over its shard
      every row is used exactly once.

    All randomness comes from the engine's generator, so engines that share a seed draw the same
    batches; the permutations in use are part of :meth:`state_dict` (resume is exact).
    """

    #: the config's ``workers`` section (``count`` is ``n_workers`` here; ``batch_size`` may
    #: also be ``"full"``)
    CONSTRAINTS: ClassVar[dict[str, Interval]] = {
        "count": Interval(1, 100_000, integer=True), "shards_per_worker": Interval(1, None, integer=True),
        "n_shards": Interval(1, None, integer=True, optional=True), "batch_size": Interval(1, 1_000_000, integer=True)}

    def __init__(self, task: Task, n_workers: int, split: str, shards_per_worker: int,
                 batch_size: int | str, generator: torch.Generator, sampling: str = "with_replacement",
                 n_shards: int | None = None) -> None:
        check_all("workers", self.CONSTRAINTS, {"count": n_workers, "shards_per_worker": shards_per_worker,
                                                "n_shards": n_shards})
        if batch_size != "full":
            check_all("workers", self.CONSTRAINTS, {"batch_size": batch_size})
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {list(SAMPLINGS)}, got {sampling!r}")
        self.sampling = sampling
        if task.worker_data is not None:
            rows = [torch.as_tensor(r, dtype=torch.long) for r in task.worker_data]
            if len(rows) != n_workers:
                raise ValueError(
                    f"task {task.name!r} fixes {len(rows)} workers (one per local objective), "
                    f"but n_workers = {n_workers}; set workers.count = {len(rows)}"
                )
        else:
            labels = task.train_y if task.train_y.dim() == 1 else None
            rows = split_workers(task.n_train, labels, n_workers, split, shards_per_worker=shards_per_worker,
                                 n_shards=n_shards, generator=generator)
        self.rows = rows
        self.lens = torch.tensor([len(r) for r in rows], dtype=torch.long)
        if int(self.lens.min()) == 0:
            raise ValueError("a worker received no training rows; use fewer workers or another split")
        self.offsets = torch.cumsum(self.lens, 0) - self.lens
        self.rows_cat = torch.cat(rows)
        self.batch_size = batch_size
        self.generator = generator
        #: full local batches of different sizes cannot be stacked: gradients then come per worker
        self.ragged = batch_size == "full" and int(self.lens.min()) != int(self.lens.max())
        #: reshuffle: each worker's current permutation of its shard and how much of it is used
        self.permutations: list[torch.Tensor | None] = [None] * self.n_workers
        self.positions = [0] * self.n_workers

    def _reshuffled(self, q: int) -> torch.Tensor:
        """Worker q's next ``batch_size`` rows in its random-reshuffling order."""
        need, parts, n = self.batch_size, [], int(self.lens[q])
        while need:
            if self.permutations[q] is None or self.positions[q] == n:
                self.permutations[q] = torch.randperm(n, generator=self.generator)
                self.positions[q] = 0
            take = min(need, n - self.positions[q])
            parts.append(self.permutations[q][self.positions[q]:self.positions[q] + take])
            self.positions[q] += take
            need -= take
        local = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.rows_cat[self.offsets[q] + local]

    def state_dict(self) -> dict:
        return {"permutations": list(self.permutations), "positions": list(self.positions)}

    def load_state_dict(self, sd: dict) -> None:
        """Restore the reshuffling state (an empty dict, from an older checkpoint: nothing to do)."""
        if sd:
            self.permutations = list(sd["permutations"])
            self.positions = [int(p) for p in sd["positions"]]

    @property
    def n_workers(self) -> int:
        return len(self.rows)

    def samples_per_step(self) -> int:
        return int(self.lens.sum()) if self.batch_size == "full" else self.n_workers * self.batch_size

    def sample_worker(self, q: int) -> torch.Tensor:
        """Worker q's rows for one computation, drawn from the same generator as :meth:`sample`
        (for one worker the two draw the same rows)."""
        if self.batch_size == "full":
            return self.rows[q]
        if self.sampling == "reshuffle":
            return self._reshuffled(q)
        r = torch.rand(1, self.batch_size, generator=self.generator)[0]
        pos = self.offsets[q] + (r * self.lens[q]).long().clamp_max(self.lens[q] - 1)
        return self.rows_cat[pos]

    def sample(self) -> torch.Tensor | list[torch.Tensor]:
        """This step's rows: ``[N, b]`` indices, or a list of N index tensors when ragged."""
        if self.batch_size == "full":
            return list(self.rows) if self.ragged else torch.stack(self.rows)
        if self.sampling == "reshuffle":
            return torch.stack([self._reshuffled(q) for q in range(self.n_workers)])
        r = torch.rand(self.n_workers, self.batch_size, generator=self.generator)
        pos = self.offsets[:, None] + (r * self.lens[:, None]).long().clamp_max(self.lens[:, None] - 1)
        return self.rows_cat[pos]


class ModelCopy:
    """One worker's own copy of a task's ``nn.Module``: the gradient of the task's loss at a flat
    model ``w`` by ordinary autograd on the copy's parameters (what a worker process does; faster
    than ``torch.func.grad`` of the functional loss for one model)."""

    def __init__(self, task: Task, layout: Layout) -> None:
        import copy

        self.task, self.layout = task, layout
        self.model = copy.deepcopy(task.module).train()
        self.params = dict(self.model.named_parameters())
        for p in self.params.values():
            p.requires_grad_(True)

    def gradient(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # load the model this worker holds into its copy
            for name, view in self.layout.unflatten(w).items():
                self.params[name].copy_(view)
        self.model.zero_grad(set_to_none=True)
        self.task.loss(self.params, x, y).backward()
        return torch.cat([self.params[name].grad.reshape(-1) for name in self.layout.names])
