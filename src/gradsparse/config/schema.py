"""The run configuration's schema: one pydantic model per section of the YAML file, the whole
run being :class:`RunConfig`. Allowed values come from the component tables (compressors,
feedbacks, topologies, ...) and numeric bounds from the components' constraint tables
(:mod:`gradsparse.constraints`), so the schema and the constructors cannot disagree; rules that
tie several keys together are the sections' ``_check`` validators."""

from __future__ import annotations

import inspect
import math
import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..algorithm import VALUE_DTYPE_NAMES
from ..comm.collectives import COLLECTIVES
from ..compressors import COMPRESSORS
from ..constraints import config_field
from ..engines import ENGINES
from ..engines.async_sim import COMPUTE_LAWS, REJECTED_ACTIONS, AsyncSimulator, ComputeLaw, KardamFilter, NetworkLaw
from ..engines.base import SAMPLINGS, WorkerData
from ..engines.sync_sim import GRADIENT_PATHS
from ..engines.base import GRADIENT_SHIFTS
from ..feedback import FEEDBACKS
from ..metrics import DEFAULT_METRICS, METRICS
from ..momentum import MOMENTA, Momentum, make_momentum
from ..schedules import Schedule
from ..segments import Layout
from ..staleness import DAMPENINGS, StalenessDampening
from ..tasks import TASKS, is_user_task_name, unknown_task_message
from ..tasks.splits import SPLITS
from ..tasks.user import UserTaskError, parse_user_task_name
from ..topology import TOPOLOGIES
from .fields import INT_MAX, _choices, _options_of, _Strict, check_run_name


class TaskConfig(_Strict):
    """``name``: a built-in task (:data:`gradsparse.tasks.TASKS`) or the user's own,
    ``my_pkg.my_module:make_task`` or ``path/to/file.py:make_task`` (:mod:`gradsparse.tasks.user`;
    a relative file path is made absolute here, against the current directory, so the resolved
    config names the file that ran). Only the form is checked here; the import and the task's
    shape are checked when the task is built, before anything is written."""

    name: str = "toy_quadratic"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_task(cls, name):
        if name in TASKS:
            return name
        if not is_user_task_name(name):
            raise ValueError(unknown_task_message(name))
        try:
            where, function, is_file = parse_user_task_name(name)
        except UserTaskError as exc:
            raise ValueError(str(exc)) from None
        if is_file:
            return f"{os.path.abspath(os.path.expanduser(where))}:{function}"
        return name

    @field_validator("options")
    @classmethod
    def _seed_is_the_runs(cls, options):
        if "seed" in options:
            raise ValueError(f"seed={options['seed']!r}: a task's data are drawn from the run's seed; "
                             "set the top-level key 'seed' instead")
        return options


class WorkersConfig(_Strict):
    count: int = config_field(3, WorkerData.CONSTRAINTS["count"])
    split: _choices(SPLITS) = "iid"
    shards_per_worker: int = config_field(2, WorkerData.CONSTRAINTS["shards_per_worker"])
    #: split shards: the number of label-sorted shards the rows are cut into (default
    #: shards_per_worker x count, every row used; paper 003: 200 shards of 300 MNIST rows)
    n_shards: int | None = config_field(None, WorkerData.CONSTRAINTS["n_shards"])
    #: per worker, 1..1,000,000 (drawn from the worker's shard as ``sampling`` says), or "full"
    batch_size: int | Literal["full"] = 1
    #: with_replacement: uniform draws; reshuffle: a fresh random permutation of the shard per pass
    sampling: _choices(SAMPLINGS) = "with_replacement"
    #: p_q: finite, >= 0, not all zero, summing to 1 (within 1e-6); they are rejected, not
    #: normalised, when they do not
    weights: list[float] | None = None

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v):
        allowed = WorkerData.CONSTRAINTS["batch_size"]
        if isinstance(v, int) and not allowed.admits(v):
            raise ValueError(f"batch_size must be {allowed.describe()} or 'full', got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.weights is not None:
            if len(self.weights) != self.count:
                raise ValueError(f"weights has {len(self.weights)} entries but count = {self.count}")
            neg = [p for p in self.weights if p < 0]
            if neg:
                raise ValueError(f"weights must be >= 0, got {neg[0]!r}")
            total = math.fsum(self.weights)
            if total == 0:
                raise ValueError("weights are all zero; give non-negative weights summing to 1")
            if abs(total - 1.0) > 1e-6:
                raise ValueError(
                    f"weights sum to {total!r}, not 1; they are not normalised for you: divide each by {total!r}"
                )
        return self


class CompressorConfig(BaseModel):
    """``kind`` from :data:`gradsparse.compressors.COMPRESSORS`; the other keys are that kind's
    constructor options (checked against its signature; defaults filled in so the resolved config
    says what ran)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    kind: _choices(COMPRESSORS) = "identity"

    @model_validator(mode="after")
    def _check(self):
        cls = COMPRESSORS[self.kind]
        allowed = _options_of(cls)
        given = dict(self.model_extra or {})
        unknown = [k for k in given if k not in allowed]
        if unknown:
            raise ValueError(
                f"compressor {self.kind!r} has no option {unknown[0]!r}; its options: {', '.join(allowed) or 'none'}"
            )
        for name, p in allowed.items():
            if name not in given and p.default is not inspect.Parameter.empty:
                self.__pydantic_extra__[name] = p.default
        try:  # the component validates its own values (a dummy layout: d is checked at build time)
            cls.from_config(self.options(), Layout.flat(1 << 40), base_lr=1.0)
        except (ValueError, TypeError, KeyError) as exc:
            named = [k for k in given if re.search(rf"(?<![\w-]){re.escape(k)}(?![\w-])", str(exc))]
            where = f"{self.kind} option {named[0]}={given[named[0]]!r}" if named else self.kind
            raise ValueError(f"{where}: {exc}") from None
        if type(given.get("k")) is int and given["k"] == 0:
            raise ValueError(f"{self.kind} option k=0: a message of no entries sends nothing and the model "
                             "never moves; k must be >= 1 (or give density)")
        return self

    def options(self) -> dict:
        return dict(self.model_extra or {})


class MomentumConfig(_Strict):
    kind: _choices(MOMENTA) = "none"
    beta: float = config_field(0.9, Momentum.CONSTRAINTS["beta"])
    nesterov: bool = False
    masking: bool = False

    def build(self):
        if self.kind == "none":
            if self.masking or self.nesterov:
                raise ValueError("momentum kind 'none' takes no nesterov or masking")
            return make_momentum("none")
        return make_momentum(self.kind, beta=self.beta, nesterov=self.nesterov, masking=self.masking)


class TopologyConfig(_Strict):
    kind: _choices(TOPOLOGIES) = "all_to_all"
    down_compressor: CompressorConfig | None = None

    @model_validator(mode="after")
    def _check(self):
        needs = TOPOLOGIES[self.kind].compresses_downlink
        if needs and self.down_compressor is None:
            raise ValueError(
                f"topology {self.kind} needs down_compressor "
                "(e.g. --set 'algorithm.topology.down_compressor={kind: topk, k: 1}')"
            )
        if not needs and self.down_compressor is not None:
            raise ValueError(f"topology {self.kind} sends no compressed downlink; remove down_compressor")
        return self


class StalenessConfig(_Strict):
    kind: _choices(DAMPENINGS) = "none"
    beta: float = config_field(0.2, StalenessDampening.CONSTRAINTS["beta"])


class AlgorithmConfig(_Strict):
    compressor: CompressorConfig = Field(default_factory=CompressorConfig)
    feedback: _choices(FEEDBACKS) = "ef"
    momentum: MomentumConfig = Field(default_factory=MomentumConfig)
    weight_decay: float = Field(0.0, ge=0.0)
    gradient_shift: _choices(GRADIENT_SHIFTS) = "none"
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    staleness: StalenessConfig = Field(default_factory=StalenessConfig)

    @model_validator(mode="after")
    def _check(self):
        if self.topology.kind == "downlink_only":
            # paper 003 Alg. 10/11: workers send alpha g uncompressed and keep no memory
            if self.compressor.kind != "identity":
                raise ValueError(
                    f"topology downlink_only sends alpha g uncompressed: set algorithm.compressor.kind "
                    f"to identity (got {self.compressor.kind!r})"
                )
            if self.feedback != "none":
                raise ValueError(
                    f"topology downlink_only keeps no worker memory: set algorithm.feedback to none (got {self.feedback!r})"
                )
        try:
            self.momentum.build()
        except ValueError as exc:
            raise ValueError(f"momentum: {exc}") from None
        return self


class ScheduleConfig(_Strict):
    kind: _choices(Schedule.KINDS) = "constant"
    lr: float | Literal["1/L"] = 0.01
    milestones: list[float] = Field(default_factory=list)
    warmup_epochs: float = config_field(0.0, Schedule.CONSTRAINTS["warmup_epochs"])
    warmup_start: float = config_field(0.0, Schedule.CONSTRAINTS["warmup_start"])
    power: float = config_field(0.5, Schedule.CONSTRAINTS["power"])
    beta: float = config_field(0.0, Schedule.CONSTRAINTS["beta"])
    mu: float = config_field(1.0, Schedule.CONSTRAINTS["mu"])
    stage_steps: list[int] = Field(default_factory=list)
    prox_gamma: float = config_field(1.0, Schedule.CONSTRAINTS["prox_gamma"])

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v):
        if isinstance(v, float) and not Schedule.CONSTRAINTS["lr"].admits(v):
            raise ValueError(f"lr must be {Schedule.CONSTRAINTS['lr'].describe()} or '1/L', got {v!r}")
        return v

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, v):
        bad = [m for m in v if m < 0]
        if bad:
            raise ValueError(f"milestones are epochs >= 0, got {bad[0]!r}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "stagewise" and not self.stage_steps:
            raise ValueError("stagewise needs stage_steps (list of steps per stage)")
        if any(s < 1 for s in self.stage_steps):
            raise ValueError(f"stage_steps must be positive, got {self.stage_steps}")
        return self


class ResidualRatioConfig(_Strict):
    steps: list[int] = Field(default_factory=list)
    ks: list[int] | None = None
    points: int = Field(25, ge=2, le=100_000)

    @model_validator(mode="after")
    def _check(self):
        bad = [k for k in self.ks or [] if k < 1]
        if bad:
            raise ValueError(f"ks are counts k >= 1 (capped at d), got {bad[0]!r}")
        bad = [s for s in self.steps if s < 1]
        if bad:
            raise ValueError(f"steps are step numbers >= 1, got {bad[0]!r}")
        return self


class MetricsConfig(_Strict):
    every: int = Field(10, ge=1)
    names: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS))
    residual_ratio: ResidualRatioConfig = Field(default_factory=ResidualRatioConfig)
    #: also write each worker's ||e_q|| at every recorded row to worker_error_norms.csv
    per_worker_error_norms: bool = False
    #: also write TensorBoard event files into the run directory (every column vs step and vs
    #: uplink bytes, staleness histograms, the config as text; needs the tensorboard package)
    tensorboard: bool = False

    @model_validator(mode="after")
    def _check(self):
        bad = [n for n in self.names if n not in METRICS]
        if bad:
            raise ValueError(f"unknown metric {bad[0]!r}; allowed: {', '.join(METRICS)}")
        return self


class SimulatorConfig(_Strict):
    gradient_path: _choices(GRADIENT_PATHS) = "auto"
    in_place_memory: bool = True


class ComputeLawConfig(_Strict):
    kind: _choices(COMPUTE_LAWS) = "uniform"
    value: float = config_field(1.0, ComputeLaw.CONSTRAINTS["value"])
    low: float = config_field(0.9, ComputeLaw.CONSTRAINTS["low"])
    high: float = config_field(1.1, ComputeLaw.CONSTRAINTS["high"])
    speeds: list[float] | None = None


class NetworkLawConfig(_Strict):
    offset: float = config_field(0.002, NetworkLaw.CONSTRAINTS["offset"])
    rate: float | None = config_field(1.0, NetworkLaw.CONSTRAINTS["rate"])
    latency: float = config_field(0.0, NetworkLaw.CONSTRAINTS["latency"])
    bandwidth: float | None = config_field(None, NetworkLaw.CONSTRAINTS["bandwidth"])


class KardamConfig(_Strict):
    enabled: bool = False
    window: int | None = config_field(None, KardamFilter.CONSTRAINTS["window"])
    byzantine: int = config_field(1, KardamFilter.CONSTRAINTS["byzantine"])
    quantile: float | None = config_field(None, KardamFilter.CONSTRAINTS["quantile"])
    rejected: _choices(REJECTED_ACTIONS) = "drop"


class TargetConfig(_Strict):
    metric: Literal["test_accuracy", "loss", "suboptimality"] = "test_accuracy"
    value: float = Field(allow_inf_nan=False)
    #: end the run at the first recorded row that reaches the target (status "completed",
    #: summary.json "stopped_at_target": true); runs that never reach it run all their steps
    stop: bool = False


class AsynchronousConfig(_Strict):
    """``engine: async`` only (see :mod:`gradsparse.engines.async_sim`)."""

    compute: ComputeLawConfig = Field(default_factory=ComputeLawConfig)
    network: NetworkLawConfig = Field(default_factory=NetworkLawConfig)
    server_time: float = config_field(0.0, AsyncSimulator.CONSTRAINTS["server_time"])
    staleness_bound: int | None = config_field(None, AsyncSimulator.CONSTRAINTS["staleness_bound"])
    drop_older_than: int | None = config_field(None, AsyncSimulator.CONSTRAINTS["drop_older_than"])
    kardam: KardamConfig = Field(default_factory=KardamConfig)
    update_cosine: bool = False
    #: steps_to_target / time_to_target in summary.json (first recorded row reaching it)
    target: TargetConfig | None = None


class RunConfig(_Strict):
    name: str = "run"
    seed: int = Field(0, ge=0, le=INT_MAX)
    engine: _choices(ENGINES) = "sync"
    task: TaskConfig = Field(default_factory=TaskConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    value_dtype: _choices(VALUE_DTYPE_NAMES) = "fp32"
    #: how an all-to-all round travels between ranks (engine torch) and what the simulators
    #: charge for it (gradsparse.comm.collectives): allgather | sharded | allreduce
    collective: _choices(COLLECTIVES) = "allgather"
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    asynchronous: AsynchronousConfig = Field(default_factory=AsynchronousConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    plots: bool = True
    progress: bool = True
    #: stop: end the run at the first non-finite value (summary status "diverged", exit 3);
    #: skip: drop a worker's non-finite message for that step and keep its memory finite
    on_nonfinite: Literal["stop", "skip"] = "stop"
    #: write checkpoint.pt every this many steps (atomically); it is always written at the end
    checkpoint_every: int | None = Field(None, ge=1)
    #: refuse a run whose up-front memory estimate exceeds this many GiB (null: the machine's
    #: memory from /proc/meminfo and the cgroup limit); memory_check: false turns the check off
    memory_limit_gb: float | None = Field(None, gt=0)
    memory_check: bool = True

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, v):
        return check_run_name(v)

    @model_validator(mode="after")
    def _check(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        self._check_collective()
        return self

    def _check_collective(self) -> None:
        """The collective's needs, named in one line (the engine checks them again for Python
        users; here they fail before anything is built)."""
        c, a = self.collective, self.algorithm
        if c == "allgather":
            return
        where = f"collective {c!r}"
        if self.engine in ("async", "torch_async"):
            raise ValueError(f"{where}: engine {self.engine!r} runs an asynchronous parameter server (point to "
                             "point); collectives apply to engines sync, loop and torch (use collective: allgather)")
        kind = a.topology.kind
        if c == "sharded":
            if kind not in ("all_to_all", "bidirectional"):
                raise ValueError(f"{where} runs topology all_to_all or bidirectional, not {kind!r}")
            down = a.topology.down_compressor
            if kind == "bidirectional" and (down.kind != "topk" or down.options().get("density") is None):
                raise ValueError(f"{where} with topology bidirectional: every owner compresses its own slice, so "
                                 "algorithm.topology.down_compressor must be {kind: topk, density: RHO}")
            if kind == "bidirectional" and a.momentum.kind == "gradient":
                raise ValueError(f"{where} with topology bidirectional keeps no server momentum (an owner holds "
                                 "only its slice of the sum): use momentum kind update, or collective allgather")
        if c == "allreduce":
            if kind != "all_to_all":
                raise ValueError(f"{where} runs topology all_to_all, not {kind!r}")
            comp = a.compressor
            if comp.kind != "randomk" or comp.options().get("shared_support") is not True:
                raise ValueError(f"{where} sums the values of one support shared by every worker: it needs "
                                 f"algorithm.compressor {{kind: randomk, shared_support: true}}, got kind {comp.kind!r}"
                                 + ("" if comp.kind != "randomk" else " with shared_support false"))
