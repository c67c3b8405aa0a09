"""Run configuration: a YAML schema validated up front (pydantic).

A bad value raises :class:`ConfigError` whose message is one line naming the dotted key, the
value given and what is allowed. Nothing is written before validation succeeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .metrics import DEFAULT_METRICS, METRICS


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Strict):
    name: str = "toy_quadratic"
    options: dict[str, Any] = Field(default_factory=dict)


class WorkersConfig(_Strict):
    count: int = Field(3, ge=1, le=100_000)
    split: Literal["iid", "shards"] = "iid"
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


class CompressorConfig(_Strict):
    kind: Literal["identity", "topk", "hard_threshold", "randomk"] = "topk"
    k: int | None = Field(None, ge=0)
    density: float | None = Field(None, gt=0.0, le=1.0)
    scope: Literal["entire", "layerwise"] = "entire"
    threshold: float | None = Field(None, ge=0.0)
    seed: int = 0
    scale: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.kind in ("topk", "randomk") and (self.k is None) == (self.density is None):
            raise ValueError(f"{self.kind} needs exactly one of k or density")
        if self.kind == "hard_threshold" and self.threshold is None:
            raise ValueError("hard_threshold needs threshold (lambda >= 0)")
        # keep only the fields this kind uses, so the resolved config says what actually ran
        # (switching kind with --set leaves the other kind's fields behind otherwise)
        unused = {
            "identity": ("k", "density", "threshold"),
            "topk": ("threshold",),
            "hard_threshold": ("k", "density"),
            "randomk": ("threshold",),
        }[self.kind]
        for name in unused:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, None)
        return self

    def options(self) -> dict:
        if self.kind == "identity":
            return {}
        if self.kind == "topk":
            return {"k": self.k, "density": self.density, "scope": self.scope}
        if self.kind == "hard_threshold":
            return {"threshold": self.threshold}
        return {"k": self.k, "density": self.density, "seed": self.seed, "scale": self.scale}


class MomentumConfig(_Strict):
    kind: Literal["none", "gradient", "update"] = "none"
    beta: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    masking: bool = False


class TopologyConfig(_Strict):
    kind: Literal["all_to_all", "ps_uplink", "bidirectional", "downlink_only"] = "all_to_all"
    down_compressor: CompressorConfig | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.kind in ("bidirectional", "downlink_only") and self.down_compressor is None:
            raise ValueError(
                f"topology {self.kind} needs down_compressor "
                "(e.g. --set 'algorithm.topology.down_compressor={kind: topk, k: 1}')"
            )
        return self


class AlgorithmConfig(_Strict):
    compressor: CompressorConfig = Field(default_factory=lambda: CompressorConfig(kind="identity"))
    feedback: Literal["none", "ef", "ef-scaled", "memory"] = "ef"
    momentum: MomentumConfig = Field(default_factory=MomentumConfig)
    weight_decay: float = Field(0.0, ge=0.0)
    gradient_shift: Literal["none", "optimum"] = "none"
    topology: TopologyConfig = Field(default_factory=TopologyConfig)

    @model_validator(mode="after")
    def _downlink_only(self):
        # downlink-only means: workers send alpha g uncompressed, no worker memory (paper 003)
        if self.topology.kind == "downlink_only":
            object.__setattr__(self, "compressor", CompressorConfig(kind="identity"))
            object.__setattr__(self, "feedback", "none")
        return self


class ScheduleConfig(_Strict):
    kind: Literal[
        "constant", "step_decay", "inverse_power", "momentum_aware", "strongly_convex", "stagewise"
    ] = "constant"
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
        if isinstance(v, float) and v <= 0:
            raise ValueError("lr must be > 0 or '1/L'")
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

    @model_validator(mode="after")
    def _check(self):
        bad = [n for n in self.names if n not in METRICS]
        if bad:
            raise ValueError(f"unknown metric {bad[0]!r}; allowed: {', '.join(METRICS)}")
        return self


class SimulatorConfig(_Strict):
    gradient_path: Literal["auto", "vmap", "grouped"] = "auto"
    in_place_memory: bool = True


class RunConfig(_Strict):
    name: str = "run"
    seed: int = 0
    task: TaskConfig = Field(default_factory=TaskConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    value_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
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


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML scalars/lists)."""
    raw = dict(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, text = item.split("=", 1)
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
