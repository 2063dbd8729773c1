"""Train a language model from a TOML config.

    python -m fasttrain.train configs/base.toml [--set SECTION.KEY=VALUE ...] [--resume auto|PATH]

With the default config and no other setup this prepares the embedded corpus
(cached for later runs), trains a small model, evaluates and samples it along the
way, saves checkpoints and the final weights, and prints where everything went.
Ctrl-C (or SIGTERM) saves a checkpoint and prints the command that resumes it.
"""

from __future__ import annotations

import shlex
import sys
from typing import Sequence

from fasttrain import distributed
from fasttrain.config import add_config_arguments, config_from_args
from fasttrain.errors import ArgumentParser, run_cli
from fasttrain.trainer import Interrupted, Trainer


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(prog="python -m fasttrain.train", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="auto|PATH",
                       help="continue a saved run: auto = the latest checkpoint in train.out_dir; or a "
                            "checkpoint file or run directory")
    start.add_argument("--overwrite", action="store_true",
                       help="start a new run in a train.out_dir that holds another run's checkpoints, deleting them")
    parser.add_argument("--quiet", action="store_true", help="print nothing; metrics.jsonl still gets everything")
    args = parser.parse_args(argv)
    try:
        trainer = Trainer(config_from_args(args), quiet=args.quiet)
        if args.resume:
            trainer.resume(args.resume)
        trainer.train(overwrite=args.overwrite)
    except Interrupted as e:
        raise Interrupted(f"{e}; resume with: {resume_command(argv)}", e.exit_code) from None
    finally:
        distributed.stop()  # under torchrun: leave the process group, whatever happened
    return 0


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues the run `argv` started: its arguments with `--resume auto`."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next or arg in ("--resume", "--overwrite") or arg.startswith("--resume="):
            skip_next = arg == "--resume"
            continue
        kept.append(arg)
    return shlex.join(["python", "-m", "fasttrain.train", *kept, "--resume", "auto"])


if __name__ == "__main__":
    run_cli(main)
