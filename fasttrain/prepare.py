"""Tokenize a text corpus into train/val token shards.

Imports from fasttrain: config, preparation.parts, preparation.preparation, system.errors.

    python -m fasttrain.prepare --input PATH [PATH ...] --out DIR
        [--vocab-size N | --tokenizer FILE|DIR] [--val-fraction F] [--overwrite] [--workers N]

On many machines: --learn-tokenizer-only once (unless --tokenizer is given), --part K/N on each, then
--merge once. The command line of fasttrain/preparation/preparation.py and fasttrain/preparation/parts.py, which say
what is written and how.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from fasttrain.config import DEFAULT_INPUTS, DEFAULT_VOCAB
from fasttrain.preparation.parts import learn_tokenizer, merge, parse_part, prepare_part
from fasttrain.preparation.preparation import prepare
from fasttrain.system.errors import ArgumentParser, run_cli

# The options besides --out that --merge, --learn-tokenizer-only and --part each take (a plain prepare takes all).
# Any other option given with them is refused, not ignored: `--merge --vocab-size 8192` would look as if it made
# something of 8192 tokens, and change nothing.
TAKES = {
    "merge": (),
    "learn_tokenizer_only": ("input", "vocab_size", "val_fraction", "text_field"),
    "part": ("input", "tokenizer", "val_fraction", "text_field", "shard_tokens", "workers"),
}
SETTINGS = ("input", "vocab_size", "tokenizer", "val_fraction", "overwrite", "text_field", "shard_tokens", "workers")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, given = parse_given(parser, argv)
    check_arguments(parser, args, given)
    # The options each mode shares with the others; TAKES has refused any that a mode does not take.
    common: dict[str, Any] = {"val_fraction": args.val_fraction, "text_field": args.text_field}
    shards = {"tokenizer_path": args.tokenizer, "shard_tokens": args.shard_tokens, "workers": args.workers, **common}
    if args.merge:
        merge(args.out)
    elif args.learn_tokenizer_only:
        learn_tokenizer(args.input, args.out, vocab_size=args.vocab_size, **common)
    elif args.part is not None:
        prepare_part(args.input, args.out, *parse_part(args.part), **shards)
    else:
        prepare(args.input, args.out, vocab_size=args.vocab_size, overwrite=args.overwrite, **shards)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: the inputs, the output folder, the tokenizer and the shards, and the modes of preparing on
    many machines."""
    parser = ArgumentParser(prog="python -m fasttrain.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input",
        nargs="+",
        default=list(DEFAULT_INPUTS),
        metavar="PATH",
        help="text files, globs, directories, JSONL or Parquet files, or builtin:pydoc / builtin:docstrings / "
        "builtin:sources (default: pydoc and sources, the Python docs and the standard library, shipped with CPython)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the shards, tokenizer and meta.json")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB,
        metavar="N",
        help=f"train a BPE of N tokens (default {DEFAULT_VOCAB})",
    )
    tok.add_argument(
        "--tokenizer",
        metavar="FILE|DIR",
        help="use this tokenizer.json (or a model directory's) instead of training one",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of the text held out for validation: whole documents, or the end "
        "of the text when there are fewer than two (default 0.1)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")
    parser.add_argument(
        "--text-field", default="text", help="JSONL field or Parquet column holding the text (default: text)"
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=100_000_000, metavar="N", help="tokens per shard (default 100M)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="threads that encode at once (default: one per core this process may use)",
    )
    many = parser.add_mutually_exclusive_group()
    many.add_argument(
        "--part",
        metavar="K/N",
        help="prepare part K of N (K from 0) of the inputs into "
        "OUT/parts/K-of-N, for --merge to join; the tokenizer must be given or learned first",
    )
    many.add_argument("--merge", action="store_true", help="join the N complete parts in OUT/parts into OUT")
    many.add_argument(
        "--learn-tokenizer-only",
        action="store_true",
        help="learn the BPE of --vocab-size that every --part will use, into OUT/parts/tokenizer.json",
    )
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, given: list[str]) -> None:
    """parser.error (exit status 2) for a negative --workers, --learn-tokenizer-only with a --tokenizer, or an
    option `given` to a mode that does not take it (TAKES)."""
    if args.workers < 0:
        parser.error(f"--workers: must be >= 0, got {args.workers}")
    if args.learn_tokenizer_only and args.tokenizer:
        parser.error("--learn-tokenizer-only: a --tokenizer is given already; pass it to each --part")
    for mode, takes in TAKES.items():
        refused = [option(name) for name in given if getattr(args, mode) and name not in takes]
        if refused:
            parser.error(
                f"{option(mode)}: does not take {', '.join(refused)}; it takes only "
                + ", ".join(option(name) for name in ("out", *takes))
            )


def parse_given(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The parsed arguments, defaults filled in, and which of SETTINGS the command line gave (even equal to the
    default): argparse fills a default only where the namespace lacks the name."""
    unset = object()
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(SETTINGS, unset)))
    given = [name for name in SETTINGS if getattr(parsed, name) is not unset]
    values = {name: parser.get_default(name) if value is unset else value for name, value in vars(parsed).items()}
    return argparse.Namespace(**values), given


def option(name: str) -> str:
    """The command-line spelling of an argument's name: vocab_size -> --vocab-size."""
    return "--" + name.replace("_", "-")


if __name__ == "__main__":
    run_cli(main)
