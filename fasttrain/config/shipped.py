"""The configs that ship with fasttrain, taken by name: `fasttrain train base` from any directory.

Imports from fasttrain: system.errors.

The files are the repository's top-level configs/, one copy of each: a wheel carries them as
fasttrain/config_files/ (pyproject.toml maps that package onto configs/), and a clone or an editable
install reads configs/ beside the package. A config argument is a file's path, which wins where both
exist, or a shipped config's name; `fasttrain configs` lists them (fasttrain/configs.py), `fasttrain init NAME` writes
a copy to edit (fasttrain/init.py), NAME.toml, which `fasttrain train NAME` then runs (saying so).
"""

from __future__ import annotations

import os
from pathlib import Path

from fasttrain.system.errors import UsageError

_PACKAGE = Path(__file__).resolve().parents[1]  # fasttrain/


def folder() -> Path:
    """Where the shipped configs are: the installed package's copy, else the clone's configs/."""
    installed = _PACKAGE / "config_files"
    return installed if installed.is_dir() else _PACKAGE.parent / "configs"


def available() -> dict[str, str]:
    """{name: the first sentence of its opening comment} of every shipped config, in name order."""
    found = {}
    for path in sorted(folder().glob("*.toml")):
        comment = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#") or not line.strip("# "):
                break
            comment.append(line.lstrip("#").strip())
        found[path.stem] = " ".join(comment).split(". ")[0].rstrip(".")
    return found


def file_of(name: str) -> Path:
    """The shipped config called `name`; UsageError listing the names when there is none."""
    if name not in available():
        raise UsageError(
            f"{name!r}: not a shipped config; one of {', '.join(available())} (`fasttrain configs` lists them)"
        )
    return folder() / f"{name}.toml"


def locate(spec: str) -> tuple[str, bool]:
    """The config file `spec` names and whether it is a shipped one; a file's path wins, then a shipped config's name
    with .toml here (what `fasttrain init NAME` wrote to edit). UsageError for a name that is also a directory here,
    and for one that is neither a file nor a shipped config."""
    names = available()
    for path in [spec, f"{spec}.toml"] if spec in names else [spec]:
        if os.path.isfile(path):
            return path, False
    if spec in names:
        if os.path.isdir(spec):
            raise UsageError(
                f"{spec}: is a directory here and the name of a shipped config; give the path of a "
                f"config file, or run from another directory for the shipped {spec!r}"
            )
        return str(folder() / f"{spec}.toml"), True
    if not os.path.lexists(spec) and os.sep not in spec and not spec.endswith(".toml"):
        raise UsageError(
            f"{spec}: neither a config file nor a shipped config; shipped: {', '.join(names)} "
            "(`fasttrain configs` lists them)"
        )
    return spec, False  # a path: what is wrong with it is said where it is read
