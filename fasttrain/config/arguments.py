"""The command-line face of a config: the positional config (a file or a shipped config's name), `--set`,
`--device` and `--seed`, and the Config they name.

Imports from fasttrain: config.loading, config.sections, config.shipped, system.errors.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from fasttrain.config.loading import OVERRIDE_SOURCE, _build, _read_layers
from fasttrain.config.sections import Config
from fasttrain.system.errors import UsageError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the positional `config` path, repeatable `--set SECTION.KEY=VALUE`, and `--device` and `--seed`
    (the flags sample and evaluate have too, here short for --set train.device / train.seed)."""
    parser.add_argument(
        "config",
        nargs="?",
        action=_ConfigPath,
        help="a TOML config file, or a shipped config by name (fasttrain configs lists them)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        action=_SetItems,
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override config values; VALUE is TOML or a bare string, e.g. --set train.batch_size=8 train.device=cpu",
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (--set train.device=D)")
    parser.add_argument("--seed", type=int, help="seeds everything (--set train.seed=S)")


class _ConfigPath(argparse.Action):
    """The positional config path. argparse calls this with None when no positional was left for it, which
    must not undo the path a --set took (see _SetItems)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            return
        if namespace.config is not None:
            parser.error(f"two config files: {namespace.config} and {values}")
        namespace.config = values


class _SetItems(argparse.Action):
    """--set's items, added to earlier --sets'. nargs="+" takes the config path too in `--set a=b base.toml`: with none
    given yet, a last item that is a file, ends in .toml or names a shipped config (`base`) is the config."""

    def __call__(self, parser, namespace, values, option_string=None):
        from fasttrain.config import shipped  # here, as in config_from_args

        items, last = list(values), values[-1]
        if namespace.config is None and "=" not in last and (last.endswith(".toml") or _a_file(last, shipped.folder())):
            namespace.config, items = last, items[:-1]
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), *items])


def _a_file(name: str, shipped: os.PathLike[str]) -> bool:
    """Whether `name` is a file, or the name of a config in the folder `shipped` (os.path.isfile: False, not an
    error, for a name no path can be: too long, holding a NUL)."""
    return os.path.isfile(name) or os.path.isfile(os.path.join(shipped, f"{name}.toml"))


def config_from_args(args: argparse.Namespace, *more: str) -> Config:
    """Load the Config named by arguments that `add_config_arguments` parsed; `more` overrides come last.
    Errors name the flag a value came from (--set, --device, --seed)."""
    if args.config is None:
        raise UsageError(
            "the following arguments are required: config (a TOML file or a shipped config's name, "
            "e.g. base; see --help)"
        )
    from fasttrain.config import shipped  # here: `python -m fasttrain.config.shipped` runs that module as __main__

    return _build(_read_layers(shipped.locate(args.config)[0]), config_overrides(args, *more))


def config_overrides(args: argparse.Namespace, *more: str) -> list[tuple[str, str]]:
    """The overrides `args` stand for, each with the flag it came from: the --set items, then --device and
    --seed as the train.device and train.seed items they stand for, then `more` (the tool's own, as --set)."""
    flags = [
        (f"--{name}", f"train.{name}={value}")
        for name, value in (("device", args.device), ("seed", args.seed))
        if value is not None
    ]
    return [*[(OVERRIDE_SOURCE, item) for item in args.set], *flags, *[(OVERRIDE_SOURCE, item) for item in more]]


def config_line(spec: str) -> str:
    """Which file the config argument `spec` named, in one line: a shipped config's file, or a file here, named
    as the shipped config it hides where it has a shipped config's name (a local `base` wins over the shipped)."""
    from fasttrain.config import shipped

    path, is_shipped = shipped.locate(spec)
    if is_shipped:
        return f"config: {spec} (shipped, {path})"
    hidden = f" (a file here, not the shipped {spec!r})" if spec in shipped.available() else ""
    return f"config: {os.path.abspath(path)}{hidden}"


def copied_run_note(args: argparse.Namespace, cfg: Config, resuming: bool = False) -> tuple[Config, str | None]:
    """`cfg` as the run of `args` uses it, and a note, when the config of `args` is a run directory's config.toml
    recording another train.out_dir and no --set chose one: the run folder was moved or copied. `resuming` (--resume
    auto): the run where the folder now is, its train.teacher paths inside the recorded folder taken along (a
    distilled run's student); else the config as it is, writing into the original."""
    from fasttrain.config import shipped

    path, is_shipped = shipped.locate(args.config)
    here = os.path.dirname(os.path.abspath(path))
    is_run = os.path.isfile(os.path.join(here, "metrics.jsonl")) or os.path.isdir(os.path.join(here, "checkpoints"))
    if is_shipped or os.path.basename(path) != "config.toml" or not is_run:
        return cfg, None
    if any(item.partition("=")[0].strip() == "train.out_dir" for _, item in config_overrides(args)):
        return cfg, None
    was = os.path.abspath(cfg.train.out_dir)
    if os.path.realpath(was) == os.path.realpath(here):
        return cfg, None
    if not resuming:
        return cfg, (
            f"{path} is the config of the run in {here}, but its train.out_dir is {cfg.train.out_dir}: this run "
            f"reads and writes there (--set train.out_dir={here} for the run in this folder)"
        )
    inside = (
        [
            p if os.path.commonpath([was, os.path.abspath(p)]) != was else os.path.join(here, os.path.relpath(p, was))
            for p in cfg.train.teacher.split(os.pathsep)
        ]
        if cfg.train.teacher
        else []
    )
    moved = replace(cfg, train=replace(cfg.train, out_dir=here, teacher=os.pathsep.join(inside)))
    return moved, f"{path} records train.out_dir = {cfg.train.out_dir}: the run goes on in {here}, where it now is"
