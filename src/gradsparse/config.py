"""Run configuration: a YAML schema validated up front (pydantic).

A bad value raises :class:`ConfigError` whose message is one line naming the dotted key, the
value given and what is allowed. Nothing is written before validation succeeds.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .algorithm import VALUE_DTYPE_NAMES
from .compressors import COMPRESSORS
from .engines import ENGINES
from .engines.sync_sim import GRADIENT_PATHS
from .engines.async_sim import COMPUTE_LAWS, REJECTED_ACTIONS
from .engines.synchronous import GRADIENT_SHIFTS
from .feedback import FEEDBACKS
from .metrics import DEFAULT_METRICS, METRICS
from .momentum import MOMENTA, make_momentum
from .schedules import Schedule
from .segments import Layout
from .staleness import DAMPENINGS
from .tasks.splits import SPLITS
from .topology import TOPOLOGIES


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _choices(table) -> Any:
    """``Literal`` of a component table's keys: the schema's allowed values come from the table."""
    return Literal[tuple(table)]


def _options_of(cls) -> dict[str, inspect.Parameter]:
    """The options a component's constructor takes (its config section's keys besides ``kind``)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if n not in ("self", "layout") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


class TaskConfig(_Strict):
    name: str = "toy_quadratic"
    options: dict[str, Any] = Field(default_factory=dict)


class WorkersConfig(_Strict):
    count: int = Field(3, ge=1, le=100_000)
    split: _choices(SPLITS) = "iid"
    shards_per_worker: int = Field(2, ge=1)
    batch_size: int | Literal["full"] = 1
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or 'full', got {self.batch_size}")
        if self.weights is not None and len(self.weights) != self.count:
            raise ValueError(f"weights has {len(self.weights)} entries but count = {self.count}")
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
            named = [k for k in given if k in str(exc)]
            where = f"{self.kind} option {named[0]}={given[named[0]]!r}" if named else self.kind
            raise ValueError(f"{where}: {exc}") from None
        return self

    def options(self) -> dict:
        return dict(self.model_extra or {})


class MomentumConfig(_Strict):
    kind: _choices(MOMENTA) = "none"
    beta: float = Field(0.9, ge=0.0, lt=1.0)
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
    beta: float = Field(0.2, gt=0.0)


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
    warmup_epochs: float = Field(0.0, ge=0.0)
    warmup_start: float = Field(0.0, ge=0.0)
    power: float = Field(0.5, ge=0.0)
    beta: float = Field(0.0, ge=0.0, lt=1.0)
    mu: float = Field(1.0, gt=0.0)
    stage_steps: list[int] = Field(default_factory=list)
    prox_gamma: float = Field(1.0, gt=0.0)

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v):
        if isinstance(v, float) and not (0 < v < float("inf")):
            raise ValueError("lr must be a finite number > 0 or '1/L'")
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
    points: int = Field(25, ge=2)


class MetricsConfig(_Strict):
    every: int = Field(10, ge=1)
    names: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS))
    residual_ratio: ResidualRatioConfig = Field(default_factory=ResidualRatioConfig)
    #: also write each worker's ||e_q|| at every recorded row to worker_error_norms.csv
    per_worker_error_norms: bool = False

    @model_validator(mode="after")
    def _check(self):
        bad = [n for n in self.names if n not in METRICS]
        if bad:
            raise ValueError(f"unknown metric {bad[0]!r}; allowed: {', '.join(METRICS)}")
        return self


class SimulatorConfig(_Strict):
    gradient_path: _choices(GRADIENT_PATHS) = "auto"
    in_place_memory: bool = True


class RunConfig(_Strict):
    name: str = "run"
    seed: int = 0
    engine: _choices(ENGINES) = "sync"
    task: TaskConfig = Field(default_factory=TaskConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    value_dtype: _choices(VALUE_DTYPE_NAMES) = "fp32"
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    plots: bool = True
    progress: bool = True

    @model_validator(mode="after")
    def _check(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        return self


def _fmt_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    val = e.get("input")
    where = f"config key '{loc}'" if loc else "config"
    if e["type"] == "extra_forbidden":
        return f"{where}: unknown key (value {val!r}); check the spelling against the documented schema"
    if isinstance(val, dict):
        return f"{where}: {msg}"
    return f"{where}: invalid value {val!r}: {msg}"

class ComputeLawConfig(_Strict):
    kind: _choices(COMPUTE_LAWS) = "uniform"
    value: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    low: float = Field(0.9, ge=0.0, allow_inf_nan=False)
    high: float = Field(1.1, ge=0.0, allow_inf_nan=False)
    speeds: list[float] | None = None


class NetworkLawConfig(_Strict):
    offset: float = Field(0.002, ge=0.0, allow_inf_nan=False)
    rate: float | None = Field(1.0, gt=0.0, allow_inf_nan=False)
    latency: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    bandwidth: float | None = Field(None, gt=0.0, allow_inf_nan=False)


class KardamConfig(_Strict):
    enabled: bool = False
    window: int | None = Field(None, ge=1)
    byzantine: int = Field(1, ge=0)
    quantile: float | None = Field(None, gt=0.0, le=1.0)
    rejected: _choices(REJECTED_ACTIONS) = "drop"


class TargetConfig(_Strict):
    metric: Literal["test_accuracy", "loss", "suboptimality"] = "test_accuracy"
    value: float = Field(allow_inf_nan=False)


class AsynchronousConfig(_Strict):
    """``engine: async`` only (see :mod:`gradsparse.engines.async_sim`)."""

    compute: ComputeLawConfig = Field(default_factory=ComputeLawConfig)
    network: NetworkLawConfig = Field(default_factory=NetworkLawConfig)
    server_time: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    staleness_bound: int | None = Field(None, ge=0)
    drop_older_than: int | None = Field(None, ge=0)
    kardam: KardamConfig = Field(default_factory=KardamConfig)
    update_cosine: bool = False
    #: steps_to_target / time_to_target in summary.json (first recorded row reaching it)
    target: TargetConfig | None = None



def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML scalars/lists)."""
    raw = dict(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, text = item.split("=", 1)
    asynchronous: AsynchronousConfig = Field(default_factory=AsynchronousConfig)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} is not a dotted key")
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: '{p}' holds a value, not a section")
            node[p] = child = dict(child)
            node = child
        node[parts[-1]] = _parse_scalar(text)
    return raw


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or a dict), apply overrides, validate. Raises ConfigError."""
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_fmt_error(err)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
