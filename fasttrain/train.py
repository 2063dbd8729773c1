"""Train a language model from a TOML config.

    python -m fasttrain.train configs/base.toml [--set SECTION.KEY=VALUE ...] [--resume auto|PATH]

With the default config and no other setup this prepares the embedded corpus
(cached for later runs), trains a small model, evaluates and samples it along the
way, saves checkpoints and the final weights, and prints where everything went.
Ctrl-C (or SIGTERM) saves a checkpoint and prints the command that resumes it, from any directory.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
from typing import Sequence

from fasttrain.config import Config, add_config_arguments, config_from_args, config_overrides
from fasttrain.system import distributed
from fasttrain.system.errors import ArgumentParser, run_cli
from fasttrain.training.trainer import Interrupted, Trainer


def main(argv: Sequence[str] | None = None) -> int:
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
    trainer = None
    try:
        trainer = Trainer(config_from_args(args), quiet=args.quiet)
        if args.resume:
            trainer.resume(args.resume)
        trainer.train(overwrite=args.overwrite)
    except Interrupted as e:
        raise Interrupted(f"{e}; resume with: {resume_command(args, trainer.cfg)}", e.exit_code) from None
    finally:
        # Free the model, its DDP wrapper and the loader now, while the interpreter is whole: left to the
        # collector at exit, a communication thread that touches a Python object then aborts the process.
        if trainer is not None:
            trainer.close()
        trainer = None
        gc.collect()
        distributed.stop()  # under torchrun: leave the process group, whatever happened
    return 0


def resume_command(args: argparse.Namespace, cfg: Config) -> str:
    """The command line that continues the run that `args` started with (resolved) config `cfg`, from
    any directory: the config file, train.out_dir and data.dir as absolute paths, the other --set
    items as they were, and `--resume auto`."""
    places = {"train.out_dir": cfg.train.out_dir, "data.dir": cfg.data.dir}
    sets = [item for _, item in config_overrides(args) if item.partition("=")[0].strip() not in places]
    sets += [f"{key}={os.path.abspath(path)}" for key, path in places.items()]  # a bare string, see load_config
    quiet = ["--quiet"] if args.quiet else []
    return shlex.join(["python", "-m", "fasttrain.train", os.path.abspath(args.config), *quiet, "--set", *sets,
                       "--resume", "auto"])


if __name__ == "__main__":
    run_cli(main)
