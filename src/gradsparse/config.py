"""Run configuration: a YAML schema validated up front (pydantic).

A bad value raises :class:`ConfigError` whose message is one line naming the dotted key, the
value given and what is allowed. Nothing is written before validation succeeds.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .algorithm import VALUE_DTYPE_NAMES
from .comm.collectives import COLLECTIVES
from .compressors import COMPRESSORS
from .constraints import config_field
from .engines import ENGINES
from .engines.async_sim import COMPUTE_LAWS, REJECTED_ACTIONS, AsyncSimulator, ComputeLaw, KardamFilter, NetworkLaw
from .engines.sync_sim import GRADIENT_PATHS
from .engines.base import SAMPLINGS, WorkerData
from .engines.synchronous import GRADIENT_SHIFTS
from .feedback import FEEDBACKS
from .metrics import DEFAULT_METRICS, METRICS
from .momentum import MOMENTA, Momentum, make_momentum
from .schedules import Schedule
from .segments import Layout
from .staleness import DAMPENINGS, StalenessDampening
from .tasks.splits import SPLITS
from .topology import TOPOLOGIES


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


def _admits_bool(annotation) -> bool:
    """Whether a field's type takes true/false (``bool``, ``Any``, or a union holding one)."""
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_admits_bool(a) for a in get_args(annotation))


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) if get_args(annotation) == () else str(annotation).replace("typing.", "")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, v, info):
        """true/false is not a number: pydantic would read ``steps: true`` as 1 (and a list of
        booleans as 0/1 weights); only fields typed bool take them."""
        flags = isinstance(v, bool) or (isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v))
        if flags:
            ann = cls.model_fields[info.field_name].annotation
            if not _admits_bool(ann):
                raise ValueError(f"true/false is not allowed here; expected {_type_name(ann)}")
        return v

#: integers in a config must fit in a signed 64-bit integer (seeds, counts, steps)
INT_MAX = 2**63 - 1
#: what a run name may be: one path component under runs/, no leading dot (ASCII form; any
#: Unicode letter, mark or digit is allowed where this allows a letter: see :func:`check_run_name`)
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}$"
#: a run name is at most this many bytes in UTF-8 (a directory name, with room for .NAME.partial-PID)
NAME_MAX_BYTES = 200


def check_run_name(name: str) -> str:
    """A run name is one path component: letters, marks and digits of any script, ``_``, and
    ``.``, ``+``, ``-`` after the first character (so no ``/``, no leading dot, no ``..``), at
    most :data:`NAME_MAX_BYTES` bytes in UTF-8."""
    import unicodedata

    def word(c: str) -> bool:
        return c == "_" or unicodedata.category(c)[0] in "LN" or (unicodedata.category(c)[0] == "M")

    if not name:
        raise ValueError("a run name cannot be empty")
    if not (word(name[0]) and unicodedata.category(name[0])[0] != "M"):
        raise ValueError(f"a run name starts with a letter, digit or '_' (got {name[0]!r}): it is a folder name, "
                         "and no leading '.' or '-'")
    bad = [c for c in name if not (word(c) or c in ".+-")]
    if bad:
        raise ValueError(f"a run name is one folder name of letters, digits, '_', '.', '+', '-' (any script); "
                         f"{bad[0]!r} is not allowed")
    if len(name.encode("utf-8")) > NAME_MAX_BYTES:
        raise ValueError(f"a run name is at most {NAME_MAX_BYTES} bytes in UTF-8, got {len(name.encode('utf-8'))}")
    return name


#: a number in exponent form that YAML 1.1 (what PyYAML reads) takes for text: 1e-2, 1E3, 1.0e5,
#: 5.e3 (YAML 1.1 wants a dot and a signed exponent, e.g. 1.0e-2; YAML 1.2 and JSON read these as numbers)
EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
#: option names whose values are text even when they look like numbers (names, paths)
_TEXT_OPTION = re.compile(r"(^name$|path$|dir$|file$|dataset$)")


def numbers_in_exponent_form(node: Any, key: str = "") -> Any:
    """The raw config with every value written as a number in exponent form (``1e-2``, ``1E3``,
    ``1.0e5``) made a number, as YAML 1.2 reads it: an int when it is whole, written without a
    dot and fits in 64 bits (``1e4`` -> 10000), else a float. Names and paths stay text."""
    if isinstance(node, dict):
        return {k: numbers_in_exponent_form(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [numbers_in_exponent_form(v, key) for v in node]
    if isinstance(node, str) and not _TEXT_OPTION.search(key) and EXPONENT_NUMBER.fullmatch(node.strip()):
        text = node.strip()
        value = float(text)
        mantissa, exponent = re.split("[eE]", text)
        if "." not in mantissa and int(exponent) >= 0 and math.isfinite(value):
            whole = int(mantissa) * 10 ** int(exponent)
            if -INT_MAX - 1 <= whole <= INT_MAX:
                return whole
        return value
    return node


def _choices(table) -> Any:
    """``Literal`` of a component table's keys: the schema's allowed values come from the table."""
    return Literal[tuple(table)]


def _options_of(cls) -> dict[str, inspect.Parameter]:
    """The options a component's constructor takes (its config section's keys besides ``kind``)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if n not in ("self", "layout") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


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
        from .tasks import TASKS, is_user_task_name, unknown_task_message
        from .tasks.user import UserTaskError, parse_user_task_name

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


def _config_key(loc: tuple) -> str:
    """pydantic's error location as the dotted config key (``workers.weights[1]``); a union's
    member (int, float, literal['full'], ...) is pydantic's detail, not part of the key."""
    key = ""
    for p in loc:
        if isinstance(p, int):
            key += f"[{p}]"
        elif not (p.startswith(("function-after", "literal[")) or p in ("int", "float", "str", "bool")):
            key += f".{p}" if key else p
    return key


def _fmt_error(err: ValidationError) -> str:
    errors = err.errors()
    e = errors[0]
    loc = _config_key(e["loc"])
    # a union (``int | 'full'``) fails once per member: say every form that is allowed
    msgs = []
    for other in errors:
        if _config_key(other["loc"]) == loc and other["msg"] not in msgs:
            msgs.append(other["msg"])
    msg = " or ".join(m[len("Value error, "):] if m.startswith("Value error, ") else m for m in msgs)
    val = e.get("input")
    where = f"config key '{loc}'" if loc else "config"
    if e["type"] == "extra_forbidden":
        return f"{where}: unknown key (value {val!r}); check the spelling against the documented schema"
    if isinstance(val, dict):
        return f"{where}: {msg}"
    if isinstance(val, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", val.strip()):
        msg += f" (YAML reads {val} as text: write it with a dot, e.g. {float(val):.1e}, or as digits)"
    shown = repr(val)
    if len(shown) > 120:
        shown = shown[:100] + "..."
    return f"{where}: invalid value {shown}: {msg}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: the parser's problem and where (line/column, 1-based)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (the YAML
    spec forbids it; PyYAML would silently keep the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # the keys written here (a '<<' merge may be overridden)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def parse_yaml_value(text: str, key: str = "", label: str = "override") -> Any:
    """One value of ``--set key=VALUE`` (or of ``--grid``), read as YAML."""
    try:
        return _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label} {key}={text!r} is not valid YAML: {_yaml_problem(exc)}") from None


#: a raw config nests at most this deep and holds at most this many values (YAML aliases
#: expand: ``a: &a [*a]`` is infinitely deep, nine nested lists of nine aliases are 9**9 values)
MAX_DEPTH = 64
MAX_VALUES = 1_000_000


def check_numbers(node: Any, where: str = "", _seen: list | None = None, _depth: int = 0) -> None:
    """Every number in a raw config is finite and every integer fits in 64 bits (names the key);
    the config is not nested deeper than MAX_DEPTH nor holds more than MAX_VALUES values."""
    seen = [0] if _seen is None else _seen
    seen[0] += 1
    if seen[0] > MAX_VALUES:
        raise ConfigError(f"config holds more than {MAX_VALUES} values (YAML aliases expanding?); "
                          f"a config is a small mapping (at '{where or 'config'}')")
    if _depth > MAX_DEPTH:
        raise ConfigError(f"config key '{where[:80]}...' nests deeper than {MAX_DEPTH} levels "
                          "(a YAML alias that refers to itself?)")
    if isinstance(node, dict):
        for k, v in node.items():
            check_numbers(v, f"{where}.{k}" if where else str(k), seen, _depth + 1)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_numbers(v, f"{where}[{i}]", seen, _depth + 1)
    elif isinstance(node, bool):
        return
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"config key '{where or 'config'}': invalid value {node!r}: must be a finite number")
    elif isinstance(node, int) and not -INT_MAX - 1 <= node <= INT_MAX:
        raise ConfigError(
            f"config key '{where or 'config'}': invalid value {node}: integers must lie in -2**63..2**63-1"
        )


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
        node[parts[-1]] = parse_yaml_value(text, key.strip())
    return raw


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or a dict), apply overrides, validate. Raises ConfigError."""
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (or is not a regular file)")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
        if len(data) > 16 << 20:
            raise ConfigError(f"config file {str(path)!r} is {len(data)} bytes; a config is at most 16 MiB")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {str(path)!r} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})"
            ) from None
        if "\x00" in text:
            raise ConfigError(f"config file {str(path)!r} is binary (NUL byte at offset {text.index(chr(0))}), not YAML")
        try:
            raw = _load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(exc)}") from None
        except RecursionError:
            raise ConfigError(f"config file {str(path)!r} nests too deeply") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, not {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    check_numbers(raw)  # first: it bounds the depth and size that the next walk visits
    raw = numbers_in_exponent_form(raw)
    check_numbers(raw)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_fmt_error(err)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
