"""The loss doctor: the systematic checks for "my loss does not go down", run on a real batch.

Imports from fasttrain: config, formats.shards, system.errors, training.diagnosis, training.trainer.

    python -m fasttrain.doctor CONFIG.toml [--set SECTION.KEY=VALUE ...] [--overfit-steps N]

Builds the run as `python -m fasttrain.train` would start it (with model.init_from's weights, refused as train refuses
them), reads every token of both splits (an id beyond the vocabulary is bad input, whatever the headers say), then runs
training/diagnosis.py's checks on one training batch, each printing PASS or FAIL, what it measured and, failing, what to look at.
Nothing is written. Exit status: 0 if every check passes, 1 if one fails, 2 for bad input.
"""

from __future__ import annotations

from typing import Sequence

from fasttrain.config import add_config_arguments, config_from_args
from fasttrain.formats.shards import check_ids, find_shards
from fasttrain.system.errors import ArgumentParser, positive_int, run_cli
from fasttrain.training.diagnosis import diagnose, report
from fasttrain.training.trainer import Trainer


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fasttrain.doctor", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument(
        "--overfit-steps",
        type=positive_int,
        default=200,
        metavar="N",
        help="steps allowed to memorise one small batch (default 200)",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "data.prefetch=0")  # one batch is all it reads
    trainer = Trainer(cfg, quiet=True)
    trainer.plan.check_new_start()  # the weights a new run would start from are the ones checked
    t = trainer.cfg.train  # resolved: the context train.seq_len = 0 chose
    print(
        f"doctor: {args.config}: {trainer.model.num_params() / 1e6:.2f}M parameters, batch {t.batch_size} x "
        f"{t.seq_len} from {', '.join(str(s.dir) for s in trainer.sources)}, on {trainer.device} ({trainer.precision})"
    )
    for source in trainer.sources:  # data.dir, or every [[data.sources]] folder of a mixture
        for split in ("train", "val"):
            for shard in find_shards(source.dir, split):
                check_ids(shard, trainer.cfg.model.vocab_size)
    checks = diagnose(trainer, args.overfit_steps)
    print(report(checks))
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    run_cli(main)
