"""A Config written back as TOML: the text `load_config` reads back to an equal Config, and the resolved
config.toml a run directory records.

Imports from fasttrain: config.rules, config.sections, config.values, system.atomic.
"""

from __future__ import annotations

import os
from dataclasses import fields, is_dataclass
from pathlib import Path

from fasttrain.config.rules import _applies, _get
from fasttrain.config.sections import Config
from fasttrain.config.values import toml_value
from fasttrain.system.atomic import write_atomically


def config_to_toml(cfg: Config) -> str:
    """Render `cfg` as TOML text that `load_config` reads back to an equal Config (keys that do not
    apply are left out: they hold their defaults)."""
    return "\n\n".join(table for section in fields(cfg) for table in _tables(cfg, section.name)) + "\n"


def _tables(cfg: Config, name: str) -> list[str]:
    """The TOML table [name] ("section" or "section.table"), then those nested in it."""
    part, lines, nested = _get(cfg, name), [f"[{name}]"], []
    for f in fields(part):
        key = f"{name}.{f.name}"
        if _applies(cfg, key) is not None:
            continue
        if is_dataclass(getattr(part, f.name)):
            nested += _tables(cfg, key)
        else:
            lines.append(f"{f.name} = {toml_value(getattr(part, f.name))}")
    return ["\n".join(lines), *nested]


def save_config(cfg: Config, run_dir: str | os.PathLike[str]) -> Path:
    """Write `cfg` to `run_dir/config.toml` (creating `run_dir`), atomically, and return that path; UsageError if it
    cannot be written."""
    text = config_to_toml(cfg).encode("utf-8")
    return write_atomically(Path(run_dir) / "config.toml", lambda f: f.write(text))
