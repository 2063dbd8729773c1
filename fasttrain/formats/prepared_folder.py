"""A prepared folder as a run reads it: its meta.json, tokenizer and shard headers checked against each
other before anything trains on them (`open_prepared`). fasttrain/preparation/preparation.py makes such folders.

Imports from fasttrain: formats.shards, formats.tokenizer, system.errors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from fasttrain.formats.shards import SPLITS, check_meta, find_shards, read_meta
from fasttrain.formats.tokenizer import Tokenizer, fingerprint
from fasttrain.system.errors import UsageError


@dataclass(frozen=True)
class PreparedData:
    """What `ensure_prepared` found: the directory of prepared data and its meta.json."""

    dir: str
    meta: dict

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, end-of-text included."""
        return int(self.meta["vocab_size"])

    @property
    def bits_per_nat(self) -> float:
        """Validation bits per byte of text for each nat of loss per token."""
        return self.meta["tokens"]["val"] / (self.meta["text_bytes"]["val"] * math.log(2))


def open_prepared(directory: str | os.PathLike) -> PreparedData:
    """The prepared folder `directory`, checked whole (meta.json, the tokenizer's sha256, vocabulary and end-of-text id,
    each shard's header); UsageError naming the file. Read a folder's counts through this."""
    directory = os.fspath(directory)
    path = Path(directory) / "meta.json"
    meta = read_meta(directory)
    if meta is None:
        raise UsageError(
            f"{directory}: no prepared data there (no meta.json); prepare it with fasttrain prepare --out {directory}"
        )
    check_meta(meta, path)
    _check_consistent(Path(directory), meta)
    return PreparedData(directory, meta)


def _check_consistent(directory: Path, meta: dict) -> None:
    """Refuse prepared data whose parts disagree, at start-up: before a run deletes anything (--overwrite)
    and before an evaluation, hours in, finds no val split or trains on shards of another preparation."""
    path = directory / "meta.json"
    tokenizer_file = directory / "tokenizer.json"
    recorded = meta.get("tokenizer_sha256")
    if recorded is not None and tokenizer_file.is_file() and fingerprint(tokenizer_file) != recorded:
        raise UsageError(
            f"{tokenizer_file}: not the tokenizer this data was prepared with (its sha256 is "
            f"{fingerprint(tokenizer_file)[:16]}..., meta.json records {recorded[:16]}...); "
            "put the original back or prepare the data again"
        )
    tokenizer = Tokenizer.load(tokenizer_file)
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise UsageError(
            f"{path}: vocab_size = {meta['vocab_size']} disagrees with tokenizer.json's "
            f"{tokenizer.vocab_size}; prepare the data again"
        )
    if tokenizer.eot_id != meta["eot_id"]:
        raise UsageError(
            f"{path}: eot_id = {meta['eot_id']} disagrees with tokenizer.json's end-of-text id "
            f"{tokenizer.eot_id}; prepare the data again"
        )
    for split in SPLITS:  # every run evaluates: no val shards is an error too
        shards = find_shards(directory, split)
        names, listed = [Path(s.path).name for s in shards], meta["shards"][split]
        for name in sorted(set(listed) - set(names)):
            raise UsageError(f"{directory / name}: missing (a {split} shard meta.json lists); prepare the data again")
        for name in sorted(set(names) - set(listed)):
            raise UsageError(
                f"{directory / name}: a {split} shard meta.json does not list (from another "
                "preparation?); remove it or prepare the data again"
            )
        for s in shards:
            if s.vocab_size != meta["vocab_size"] or s.dtype.name != meta["token_dtype"]:
                raise UsageError(
                    f"{s.path}: a shard of another preparation (its header says vocabulary {s.vocab_size}, {s.dtype} "
                    f"tokens; meta.json says {meta['vocab_size']}, {meta['token_dtype']}); prepare the data again"
                )
        total = sum(s.num_tokens for s in shards)
        if total != meta["tokens"][split]:
            raise UsageError(
                f"{directory}: its {split} shards hold {total:,} tokens, meta.json's tokens.{split} "
                f"says {meta['tokens'][split]:,}: shards of another preparation; prepare the data again"
            )
