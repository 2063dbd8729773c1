"""A Config from its layers, lowest first: the defaults, the config files of an `extends` chain (base
first), then `--set SECTION.KEY=VALUE` overrides; each value checked as it is set, the whole validated once
all are in (fasttrain/config/rules.py).

Imports from fasttrain: config.rules, config.sections, config.values, system.atomic, system.errors.
"""

from __future__ import annotations

import os
import sys
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from fasttrain.config.rules import _check_applicable, _validate
from fasttrain.config.sections import Config
from fasttrain.config.values import _coerce, _show, _unknown
from fasttrain.system.atomic import read_regular
from fasttrain.system.errors import UsageError

OVERRIDE_SOURCE = "--set"  # how errors name values that came from the command line
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KiB; a bound keeps /dev/zero or a mistaken data file out
MAX_EXTENDS = 32  # config files in one `extends` chain


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """A validated Config from defaults, the TOML file at `path` (None: none; `extends` a base file first), then
    `overrides` (`section.key=value`, a TOML literal or a bare string). One-line UsageErrors naming the source and
    key."""
    return _build(_read_layers(path) if path is not None else [], [(OVERRIDE_SOURCE, item) for item in overrides])


def parse_config(text: str, source: str) -> Config:
    """A validated Config from TOML text, such as the one a checkpoint carries; `source` names it in errors."""
    return _build([(_parse_toml(text, source), source)], ())


def _build(layers: Sequence[tuple[dict[str, Any], str]], overrides: Sequence[tuple[str, str]]) -> Config:
    """Defaults, then each parsed TOML document of `layers` (with the source it came from), then
    `overrides` (each `section.key=value` with the flag it came from: --set, --seed, ...); validated."""
    cfg = Config()
    sources: dict[str, str] = {}  # "section.key" -> where its value came from
    for doc, source in layers:
        for section, table in doc.items():
            if not isinstance(table, dict):
                got = f"{_show(table)} ({type(table).__name__})"
                raise UsageError(f"{source}: {section}: expected a [section] table, got {got}")
            part = _section(cfg, section, source)  # checked even when the table is empty
            for key, value in table.items():
                _assign(part, section, key, value, source, sources)
    for source, item in overrides:
        section, key, value = _parse_override(item, source)
        _assign(_section(cfg, section, source), section, key, value, source, sources)
    _validate(cfg, sources)
    _check_applicable(cfg, sources, [source for _, source in layers] + [source for source, _ in overrides])
    return cfg


def _read_layers(path: str | os.PathLike[str], chain: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    """The TOML documents that make up the config file at `path`, each with its path, base first:
    those of the file it `extends` (if any), then its own. `chain`: the files that led here."""
    source = os.fspath(path)
    doc = _read_toml(path)
    base = doc.pop("extends", None)
    if base is None:
        return [(doc, source)]
    if not isinstance(base, str) or not base:
        raise UsageError(
            f"{source}: extends: expected the path of a config file, got {_show(base)} ({type(base).__name__})"
        )
    here = (*chain, os.path.realpath(path))
    if len(here) >= MAX_EXTENDS:
        raise UsageError(f"{source}: extends = {_show(base)}: a chain of more than {MAX_EXTENDS} config files")
    base_path = Path(path).parent / base
    if os.path.realpath(base_path) in here:
        raise UsageError(
            f"{source}: extends = {_show(base)} comes back to {base_path}: configs cannot extend each other in a circle"
        )
    try:
        return [*_read_layers(base_path, here), (doc, source)]
    except UsageError as e:
        if chain:  # the first file in the chain names the problem once
            raise
        raise UsageError(f"{source}: extends = {_show(base)}: {e}") from None


def extended_path(path: str | os.PathLike[str]) -> str | None:
    """What the config file at `path` `extends` (a path relative to it), None if it extends nothing."""
    base = _read_toml(path).get("extends")
    return base if isinstance(base, str) else None


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed TOML document at `path`; UsageError if it is missing, unreadable or malformed."""
    source = os.fspath(path)
    raw = read_regular(path, MAX_CONFIG_BYTES, "config file")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark, which some editors write: not TOML
    except UnicodeDecodeError as e:
        raise UsageError(f"{source}: invalid TOML: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return _parse_toml(text, source)


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # the message has the line and column
        raise UsageError(f"{source}: invalid TOML: {' '.join(str(e).split())}") from None


def _parse_override(item: str, source: str) -> tuple[str, str, Any]:
    """Split `section.key=value` into its parts, the value parsed as a TOML literal or kept as text."""
    name, eq, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not (eq and dot and section) or "" in key.split("."):
        raise UsageError(f"{source} {item}: expected SECTION.KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return section, key, value


def _section(cfg: Config, section: str, source: str) -> Any:
    """The dataclass holding `cfg`'s [section]; UsageError if there is no such section."""
    names = [f.name for f in fields(cfg)]
    if section not in names:
        raise _unknown(source, "section", section, names, lambda s: f"[{s}]")
    return getattr(cfg, section)


# The keys that name files or folders, each a path (train.teacher: several, os.pathsep between them; data.inputs: a
# list), where a leading ~ is the home folder: a shell leaves `--set train.out_dir=~/runs` as it is
PATH_KEYS = (
    "data.dir",
    "data.inputs",
    "data.tokenizer",
    "model.init_from",
    "train.out_dir",
    "train.teacher",
    "schedule.progress_from",
    "eval.include_path",
)


def home_expanded(name: str, value: Any) -> Any:
    """`value` of the key `name` with a leading ~ of each path expanded, where the key is one of PATH_KEYS or
    data.sources (each table's dir)."""
    if name == "data.sources":
        return [replace(source, dir=os.path.expanduser(source.dir)) for source in value]
    if name not in PATH_KEYS:
        return value
    if isinstance(value, list):
        return [os.path.expanduser(v) for v in value]
    return os.pathsep.join(os.path.expanduser(p) for p in value.split(os.pathsep)) if value else value


def _assign(part: Any, section: str, key: str, value: Any, source: str, sources: dict[str, str]) -> None:
    """Set `part.<key>` (part is the [section] dataclass) to `value` if the key and type check out. A key naming a
    nested table ([optim.muon]) takes a table of its keys, or is dotted (`muon.lr`) to one."""
    types = get_type_hints(type(part))
    head, dot, rest = key.partition(".")
    if head not in types or (dot and not is_dataclass(types[head])):
        elsewhere = [name for name, tp in get_type_hints(Config).items() if head in get_type_hints(tp)]
        if not dot and elsewhere and elsewhere[0] != section.partition(".")[0]:  # `[train] lr`: optim's key
            raise UsageError(
                f"{source}: unknown key {section}.{key}; it is a key of [{elsewhere[0]}]: {elsewhere[0]}.{key}"
            )
        raise _unknown(source, "key", key, list(types), lambda k: f"{section}.{k}")
    name = f"{section}.{head}"
    if is_dataclass(types[head]):
        table = {rest: value} if dot else value
        if not isinstance(table, dict):
            raise UsageError(
                f"{source}: {name}: expected a [{name}] table, got {_show(value)} ({type(value).__name__})"
            )
        for k, v in table.items():
            _assign(getattr(part, head), name, k, v, source, sources)
        return
    setattr(part, head, home_expanded(name, _coerce(value, types[head], f"{source}: {name}")))
    sources.pop(name, None)  # re-inserted: the dict's order is the order values were last set in
    sources[name] = source  # so later range and combination errors can name it
