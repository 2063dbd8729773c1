"""Run configuration: typed dataclasses, loaded from TOML with command-line overrides.

Imports from fasttrain: config.arguments, config.loading, config.prepared, config.rules, config.sections, config.values,
config.writing.

Each TOML section ([model], [data], ...) is one dataclass (sections.py). A value comes from the dataclass default, the
config file, then `--set section.key=value`, in increasing precedence. Everything is checked up front, so a typo fails
in a second, not an hour into a run, as a one-line `UsageError` naming where the value came from and the key:

    configs/tiny.toml: train.batch_size: must be > 0, got 0

`save_config` writes the resolved config into the run directory, so a run can always be reproduced.

The package, lowest first: values.py (the field types), sections.py (the dataclasses), rules.py (ranges, agreements),
loading.py (files, `extends`, `--set`), writing.py (back to TOML), prepared.py (completed with the prepared data),
arguments.py (the command line), shipped.py (the shipped configs, by name). Import from here: `from fasttrain.config
import Config, load_config`. It imports only system's errors and atomic, so every layer may read it.
"""

from fasttrain.config.arguments import (
    add_config_arguments,
    config_from_args,
    config_line,
    config_overrides,
    copied_run_note,
)
from fasttrain.config.loading import (
    MAX_CONFIG_BYTES,
    MAX_EXTENDS,
    OVERRIDE_SOURCE,
    extended_path,
    load_config,
    parse_config,
)
from fasttrain.config.prepared import check_vocab, resolve
from fasttrain.config.rules import MAX_PREFETCH, MAX_PROMPT_CHARS, MAX_SEED
from fasttrain.config.sections import (
    DEFAULT_INPUTS,
    DEFAULT_VOCAB,
    AdafactorConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    KernelsConfig,
    LogConfig,
    MixChange,
    ModelConfig,
    MuonConfig,
    OptimConfig,
    RecoveryConfig,
    ScheduleConfig,
    SGDConfig,
    SourceConfig,
    TrainConfig,
)
from fasttrain.config.values import Seconds, format_duration, parse_duration, toml_value
from fasttrain.config.writing import config_to_toml, save_config

__all__ = [
    "AdafactorConfig",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "KernelsConfig",
    "LogConfig",
    "MixChange",
    "ModelConfig",
    "MuonConfig",
    "OptimConfig",
    "RecoveryConfig",
    "SGDConfig",
    "ScheduleConfig",
    "Seconds",
    "SourceConfig",
    "TrainConfig",
    "DEFAULT_INPUTS",
    "DEFAULT_VOCAB",
    "MAX_CONFIG_BYTES",
    "MAX_EXTENDS",
    "MAX_PREFETCH",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "OVERRIDE_SOURCE",
    "add_config_arguments",
    "check_vocab",
    "config_from_args",
    "config_line",
    "config_overrides",
    "config_to_toml",
    "copied_run_note",
    "extended_path",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
    "resolve",
    "save_config",
    "toml_value",
]
