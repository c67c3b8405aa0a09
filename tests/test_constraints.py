"""Invalid-input tests generated from the components' constraint tables (gradsparse.constraints):
for every declared parameter, every value the table refuses is refused by the component's
constructor (one message naming the parameter and its bounds) and by the config schema (one
ConfigError naming the config key), and the values at the table's admitted ends are accepted by
both. A bound changed in one place only (the schema or the constructor) fails here."""

from __future__ import annotations

import math

import pytest

from types import SimpleNamespace

import torch

from gradsparse.algorithm import Algorithm
from gradsparse.compressors import COMPRESSORS
from gradsparse.config import ConfigError, load_config
from gradsparse.constraints import Interval, check
from gradsparse.engines.async_sim import AsyncSimulator, ComputeLaw, KardamFilter, NetworkLaw
from gradsparse.engines.base import WorkerData
from gradsparse.momentum import Momentum, make_momentum
from gradsparse.schedules import Schedule
from gradsparse.staleness import StalenessDampening
from gradsparse.tasks import make_task

#: rows enough for the largest admitted worker count, with labels for the shard split
_ROWS = SimpleNamespace(name="rows", worker_data=None, n_train=200_000, train_y=torch.zeros(200_000, dtype=torch.long))
_ASYNC = {"engine": "async", "algorithm": {"topology": {"kind": "ps_uplink"}}}


def _workers(name, v):
    n_workers = v if name == "count" else 1
    options = {"shards_per_worker": 1, "batch_size": 1, "n_shards": None, **({} if name == "count" else {name: v})}
    return WorkerData(_ROWS, n_workers, "shards", generator=torch.Generator().manual_seed(0), **options)


def _async_engine(name, v):
    return AsyncSimulator(make_task("toy_quadratic"), Algorithm(topology="ps_uplink"), Schedule(lr=0.1), n_workers=3,
                          **{name: v})

#: (config section, the component's table, build the component with one parameter set, the
#: config with that parameter set)
COMPONENTS = {
    "algorithm.momentum": (
        Momentum.CONSTRAINTS,
        lambda name, v: make_momentum("update", **{name: v}),
        lambda name, v: {"algorithm": {"momentum": {"kind": "update", name: v}}},
    ),
    "algorithm.staleness": (
        StalenessDampening.CONSTRAINTS,
        lambda name, v: StalenessDampening("exponential", **{name: v}),
        lambda name, v: {"engine": "async", "algorithm": {"topology": {"kind": "ps_uplink"},
                                                          "staleness": {"kind": "exponential", name: v}}},
    ),
    "workers": (
        WorkerData.CONSTRAINTS,
        _workers,
        lambda name, v: {"workers": {name: v}},
    ),
    "asynchronous.compute": (
        ComputeLaw.CONSTRAINTS,
        lambda name, v: ComputeLaw(kind="constant", **{name: v}),
        lambda name, v: {**_ASYNC, "asynchronous": {"compute": {"kind": "constant", name: v}}},
    ),
    "asynchronous.network": (
        NetworkLaw.CONSTRAINTS,
        lambda name, v: NetworkLaw(**{name: v}),
        lambda name, v: {**_ASYNC, "asynchronous": {"network": {name: v}}},
    ),
    "asynchronous.kardam": (
        KardamFilter.CONSTRAINTS,
        lambda name, v: KardamFilter(**{name: v}),
        lambda name, v: {**_ASYNC, "asynchronous": {"kardam": {name: v}}},
    ),
    "asynchronous": (
        AsyncSimulator.CONSTRAINTS,
        _async_engine,
        lambda name, v: {**_ASYNC, "asynchronous": {name: v}},
    ),
    "schedule": (
        Schedule.CONSTRAINTS,
        lambda name, v: Schedule(kind="constant", **{name: v}),
        lambda name, v: {"schedule": {"kind": "constant", **({} if name == "lr" else {"lr": 0.1}), name: v}},
    ),
}

CASES = [(section, name, value) for section, (table, _, _) in COMPONENTS.items()
         for name, interval in table.items() for value in interval.invalid_examples()]


def _compressor_options(kind: str, name: str, value) -> dict:
    """One option set to ``value``, plus the compressor's amount (a fixed count k = 1, or a byte
    budget's density 0.1) unless the option is the amount itself."""
    table = COMPRESSORS[kind].CONSTRAINTS
    if name in ("k", "density", "budget_bytes"):
        amount = {}
    elif "k" in table:
        amount = {"k": 1}
    elif "budget_bytes" in table:
        amount = {"density": 0.1}
    else:
        amount = {}
    return {**amount, name: value}


#: compressors: the config passes the options to the constructor, so the config's message is the
#: constructor's, behind the option's name (and a run additionally refuses k = 0: it never moves)
COMPRESSOR_CASES = [(kind, name, value) for kind, cls in sorted(COMPRESSORS.items())
                    for name, interval in cls.CONSTRAINTS.items() for value in interval.invalid_examples()]
ADMITTED = []
for _section, (_table, _, _) in COMPONENTS.items():
    for _name, _iv in _table.items():
        for _v in ([_iv.low if _iv.low_closed else _iv.low + 0.25] if _iv.low is not None else [1.0]) + \
                  ([_iv.high if _iv.high_closed else _iv.high - 0.25] if _iv.high is not None else []) + \
                  ([None] if _iv.optional else []):
            ADMITTED.append((_section, _name, _v))


def _ids(case):
    return f"{case[0]}.{case[1]}={case[2]!r}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_a_refused_value_is_refused_by_the_constructor_and_the_config(case):
    section, name, value = case
    table, build, raw = COMPONENTS[section]
    with pytest.raises(ValueError) as info:
        build(name, value)
    assert f"{name} must be {table[name].describe()}, got {value!r}" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config({"steps": 1, **raw(name, value)})
    assert f"{section}.{name}" in str(info.value)


@pytest.mark.parametrize("case", ADMITTED, ids=_ids)
def test_the_admitted_ends_are_accepted_by_both(case):
    section, name, value = case
    _, build, raw = COMPONENTS[section]
    build(name, value)
    cfg = load_config({"steps": 1, **raw(name, value)})
    got = cfg
    for part in f"{section}.{name}".split("."):
        got = getattr(got, part)
    assert got == value


@pytest.mark.parametrize("case", COMPRESSOR_CASES, ids=_ids)
def test_a_refused_compressor_option_is_refused_by_the_constructor_and_the_config(case):
    kind, name, value = case
    cls = COMPRESSORS[kind]
    with pytest.raises(ValueError) as info:
        cls(**_compressor_options(kind, name, value))
    said = f"{name} must be {cls.CONSTRAINTS[name].describe()}, got {value!r}"
    assert said in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config({"steps": 1, "algorithm": {"compressor": {"kind": kind, **_compressor_options(kind, name, value)}}})
    if isinstance(value, float) and not math.isfinite(value):  # refused by the config's number check, by key
        assert f"config key 'algorithm.compressor.{name}': invalid value {value}" in str(info.value)
    else:
        assert f"'algorithm.compressor': {kind} option {name}=" in str(info.value) and said in str(info.value)


def test_every_table_yields_cases():
    assert {(k, n) for k, n, _ in COMPRESSOR_CASES} >= {("topk", "k"), ("topk", "density"), ("hard_threshold", "threshold"),
                                                        ("randomk", "seed"), ("approximate_topk", "sample_fraction"),
                                                        ("budget_threshold", "gain"), ("budget_threshold", "burst")}
    assert {(s, n) for s, n, _ in CASES} == {(s, n) for s, (t, _, _) in COMPONENTS.items() for n in t}


def test_interval_describes_and_refuses_by_hand():
    half_open = Interval(0.0, 1.0, closed="left")
    assert half_open.describe() == "a finite number in [0, 1)"
    assert [half_open.admits(v) for v in (0.0, 0.5, 1.0, -0.1, math.nan, math.inf, True, "0.5")] == \
        [True, True, False, False, False, False, False, False]
    assert half_open.field_bounds() == {"allow_inf_nan": False, "ge": 0.0, "lt": 1.0}
    positive = Interval(0.0, None, closed="neither")
    assert positive.describe() == "a finite number > 0" and positive.invalid_examples()[:2] == [-0.5, 0.0]
    count = Interval(1, None, integer=True)
    assert count.describe() == "an integer >= 1" and not count.admits(1.5) and count.admits(3)
    with pytest.raises(ValueError, match=r"^schedule mu must be a finite number > 0, got 0$"):
        check("schedule", "mu", 0, positive)
