"""Run configuration: a YAML schema validated up front (pydantic).

A bad value raises :class:`ConfigError` whose message is one line naming the dotted key, the
value given and what is allowed. Nothing is written before validation succeeds.

* :mod:`.schema`: one model per section of the YAML file (:class:`RunConfig` is the whole run);
  allowed values and numeric bounds come from the components' own tables;
* :mod:`.reading`: YAML files and ``--set`` overrides into a validated :class:`RunConfig`
  (:func:`load_config`), and back (:func:`dump_config`);
* :mod:`.fields`: the strict base of every section and the run name's rule.
"""

from .fields import INT_MAX, NAME_MAX_BYTES, NAME_PATTERN, check_run_name
from .reading import (MAX_DEPTH, MAX_VALUES, ConfigError, apply_overrides, check_numbers, dump_config, load_config,
                      numbers_in_exponent_form, parse_yaml_value)
from .schema import (AlgorithmConfig, AsynchronousConfig, CompressorConfig, ComputeLawConfig, KardamConfig,
                     MetricsConfig, MomentumConfig, NetworkLawConfig, ResidualRatioConfig, RunConfig, ScheduleConfig,
                     SimulatorConfig, StalenessConfig, TargetConfig, TaskConfig, TopologyConfig, WorkersConfig)

__all__ = ["ConfigError", "RunConfig", "load_config", "dump_config", "apply_overrides", "parse_yaml_value",
           "check_numbers", "numbers_in_exponent_form", "check_run_name", "INT_MAX", "NAME_PATTERN", "NAME_MAX_BYTES",
           "MAX_DEPTH", "MAX_VALUES", "TaskConfig", "WorkersConfig", "CompressorConfig", "MomentumConfig",
           "TopologyConfig", "StalenessConfig", "AlgorithmConfig", "ScheduleConfig", "ResidualRatioConfig",
           "MetricsConfig", "SimulatorConfig", "ComputeLawConfig", "NetworkLawConfig", "KardamConfig", "TargetConfig",
           "AsynchronousConfig"]
