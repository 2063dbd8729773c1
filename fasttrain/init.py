"""Write a copy of a shipped config to edit.

Imports from fasttrain: config, config.shipped, system.atomic, system.errors.

    python -m fasttrain.init NAME [PATH] [--overwrite]      (fasttrain init gpt2-small my-run.toml)

PATH defaults to NAME.toml here; a directory (or a PATH ending in /) gets NAME.toml inside it. A config that extends another
(gpt-350m extends gpt2-small.toml) comes with that file too, beside it, so the copy runs as it is.
An existing file is replaced only with --overwrite (a base file already there with the same content is
left as it is).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from fasttrain import config
from fasttrain.config import shipped
from fasttrain.system.atomic import write_atomically
from fasttrain.system.errors import ArgumentParser, UsageError, run_cli


def copies(name: str, path: Path) -> list[tuple[Path, bytes]]:
    """(where, content) of every file `init` writes for shipped config `name` at `path`: the config, then each
    file it extends, named as the config names it, in the same directory."""
    source = shipped.file_of(name)
    files = [(path, source.read_bytes())]
    while (base := config.extended_path(source)) is not None:
        source = source.parent / base
        files.append((path.parent / base, source.read_bytes()))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fasttrain.init", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a shipped config (fasttrain configs lists them)")
    parser.add_argument("path", nargs="?", help="where to write it (default: NAME.toml here)")
    parser.add_argument("--overwrite", action="store_true", help="replace a file already there")
    args = parser.parse_args(argv)
    path = Path(args.path or f"{args.name}.toml")
    if path.is_dir() or (args.path or "").endswith(("/", os.sep)):  # a folder, or one to make ("runs/")
        path = path / f"{args.name}.toml"
    files = copies(args.name, path)
    for where, content in files:  # every refusal before the first write
        if where.is_dir():
            raise UsageError(f"{where}: is a directory")
        if where.exists() and not args.overwrite and (where == path or where.read_bytes() != content):
            raise UsageError(f"{where}: exists; give another PATH, or --overwrite to replace it")
    for where, content in files:
        write_atomically(where, lambda f: f.write(content), what="write")  # called before the loop goes on
    extra = f" (with {', '.join(str(w) for w, _ in files[1:])}, which it extends)" if files[1:] else ""
    print(f"wrote {path}{extra}; run it with: fasttrain train {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
