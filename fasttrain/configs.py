"""List the configs that ship with fasttrain, one line each: `fasttrain train NAME` runs one.

Imports from fasttrain: config.shipped, system.errors.

    python -m fasttrain.configs          (fasttrain configs)

The names and their one-line summaries are fasttrain/config/shipped.py's; `fasttrain init NAME` writes a copy to edit.
"""

from __future__ import annotations

from typing import Sequence

from fasttrain.config import shipped
from fasttrain.system.errors import ArgumentParser, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fasttrain.configs", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    names = shipped.available()
    width = max(map(len, names), default=0)
    for name, summary in names.items():
        print(f"{name:<{width}}  {summary}")
    print(f"\n(in {shipped.folder()}; `fasttrain train NAME` runs one, `fasttrain init NAME` writes a copy to edit)")
    return 0


if __name__ == "__main__":
    run_cli(main)
