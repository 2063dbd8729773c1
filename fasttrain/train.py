"""Train a language model from a TOML config.

    python -m fasttrain.train configs/base.toml [--set SECTION.KEY=VALUE ...]

With the default config and no other setup this prepares the embedded corpus
(cached for later runs), trains a small model, evaluates and samples it along the
way, saves a final checkpoint and prints where everything went.
"""

from __future__ import annotations

from typing import Sequence

from fasttrain.config import add_config_arguments, config_from_args
from fasttrain.errors import ArgumentParser, run_cli
from fasttrain.trainer import Trainer


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fasttrain.train", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="print nothing; metrics.jsonl still gets everything")
    args = parser.parse_args(argv)
    Trainer(config_from_args(args), quiet=args.quiet).train()
    return 0


if __name__ == "__main__":
    run_cli(main)
