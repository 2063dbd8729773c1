"""Tokenizing a stream of documents into shards on every core: reading, encoding and writing overlap.

Imports from fasttrain: formats.shards, formats.tokenizer, preparation.corpus, preparation.encoder.

The calling thread gathers pieces into batches of about `batch_chars` characters, up to `workers` of them are encoded at
once on a thread pool (tiktoken and `tokenizers` release the GIL), and the calling thread writes their tokens in reading
order. At most 2 x `workers` batches are in flight, so memory stays flat, and the shards are the same for any number of
workers.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from fasttrain.formats.shards import SPLITS, ShardInfo, ShardWriter
from fasttrain.formats.tokenizer import Tokenizer
from fasttrain.preparation.corpus import Piece
from fasttrain.preparation.encoder import Encode, choose_encoder, splits_at_line_ends


class ShardSequence:
    """Appends tokens to `{split}_000000.bin`, `{split}_000001.bin`, ..., starting a new shard every `shard_tokens`."""

    def __init__(self, directory: Path, split: str, vocab_size: int, shard_tokens: int):
        self.directory, self.split, self.vocab_size, self.shard_tokens = directory, split, vocab_size, shard_tokens
        self.done: list[ShardInfo] = []
        self.writer: ShardWriter | None = None
        self.documents = 0
        self.text_bytes = 0  # UTF-8 bytes of the text behind the tokens, for bits per byte
        self.replaced = 0  # invalid UTF-8 sequences replaced in that text
        self.unknown = 0  # tokens that are the tokenizer's unknown token: text it could not encode, lost

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self.writer is None:
                name = f"{self.split}_{len(self.done):06d}.bin"
                self.writer = ShardWriter(self.directory / name, self.vocab_size)
            room = self.shard_tokens - self.writer.num_tokens
            self.writer.write(tokens[:room])
            tokens = tokens[room:]
            if self.writer.num_tokens == self.shard_tokens:
                self.done.append(self.writer.close())
                self.writer = None

    def close(self) -> list[ShardInfo]:
        if self.writer is not None:
            self.done.append(self.writer.close())
            self.writer = None
        return self.done

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.done) + (self.writer.num_tokens if self.writer else 0)


Batch = list[tuple[str, Piece, bool]]  # (split, piece, starts_document)


def _batches(pieces: Iterable[tuple[str, Piece, bool]], batch_chars: int) -> Iterator[Batch]:
    """The pieces gathered into batches of about `batch_chars` characters; empty documents add nothing."""
    batch, chars = [], 0
    for split, piece, starts in pieces:
        if starts and piece.ends_document and not piece.text:
            continue
        batch.append((split, piece, starts))
        chars += len(piece.text)
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def whole_documents(pieces: Iterable[tuple[str, Piece, bool]]) -> Iterator[tuple[str, Piece, bool]]:
    """`pieces` with each document's joined into one: for a tokenizer that would not encode a text cut into pieces as
    the whole (encoder.splits_at_line_ends), at the cost of holding the longest document in memory. A document the
    split cuts in two (one file's end held out: its validation part starts a document of its own) stays two."""
    held: list[Piece] = []
    first = ("", False)  # the held pieces' split and whether they start a document

    def joined() -> tuple[str, Piece, bool]:
        text = "".join(p.text for p in held)
        return first[0], Piece(text, held[-1].ends_document, sum(p.replaced for p in held)), first[1]

    for split, piece, starts in pieces:
        if held and (starts or split != first[0]):
            yield joined()
            held = []
        if not held:
            first = (split, starts)
        held.append(piece)
        if piece.ends_document:
            yield joined()
            held = []


def encode_into(
    pieces: Iterable[tuple[str, Piece, bool]],
    encode: Encode,
    outputs: dict[str, ShardSequence],
    tokenizer: Tokenizer,
    batch_chars: int,
    workers: int,
    progress: tqdm,
) -> None:
    """Tokenize every piece into its split's shards: each document starts with `tokenizer`'s end-of-text token."""
    eot, unk_id = np.array([tokenizer.eot_id], dtype=np.uint32), tokenizer.unk_id
    if not splits_at_line_ends(tokenizer.tok):
        pieces = whole_documents(pieces)

    def write(batch: Batch, encoded: list[np.ndarray]) -> None:
        for split, out in outputs.items():
            parts = []
            for (s, piece, starts), ids in zip(batch, encoded):
                if s != split:
                    continue
                if starts:
                    parts.append(eot)
                    out.documents += 1
                out.text_bytes += len(piece.text.encode("utf-8", "surrogatepass"))
                out.replaced += piece.replaced
                parts.append(ids)
                if unk_id is not None:
                    out.unknown += int(np.count_nonzero(ids == unk_id))
            if parts:
                out.write(np.concatenate(parts))
        progress.update(sum(len(piece.text) for _, piece, _ in batch))

    pool = ThreadPoolExecutor(max(workers, 1), thread_name_prefix="encode")
    pending: deque[tuple[Batch, Future]] = deque()
    try:
        for batch in _batches(pieces, batch_chars):
            pending.append((batch, pool.submit(encode, [piece.text for _, piece, _ in batch])))
            if len(pending) > 2 * workers:  # bounded: the reader waits for the oldest batch
                done, future = pending.popleft()
                write(done, future.result())
        while pending:
            done, future = pending.popleft()
            write(done, future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_shards(
    directory: Path,
    pieces: Iterable[tuple[str, Piece, bool]],
    tokenizer: Tokenizer,
    sample: list[str],
    *,
    shard_tokens: int,
    batch_chars: int,
    workers: int,
    total_bytes: int,
    quiet: bool,
) -> dict:
    """Tokenize `pieces` (split, piece, starts_document) into `directory`'s shards with the fastest encoder giving
    `tokenizer`'s ids on `sample`; returns meta.json's counts, leaving nothing half-written."""
    encode, encoder_name, note = choose_encoder(tokenizer, sample)
    if note and not quiet:
        print(note)
    outputs = {s: ShardSequence(directory, s, tokenizer.vocab_size, shard_tokens) for s in SPLITS}
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=quiet or None) as bar:
            encode_into(pieces, encode, outputs, tokenizer, batch_chars, workers, bar)
        shards = {s: [Path(i.path).name for i in outputs[s].close()] for s in SPLITS}
    finally:
        for o in outputs.values():
            o.abort()
    return {
        "tokens": {s: outputs[s].num_tokens for s in SPLITS},
        "documents": {s: outputs[s].documents for s in SPLITS},
        "text_bytes": {s: outputs[s].text_bytes for s in SPLITS},
        "shards": shards,
        "invalid_utf8_replaced": sum(o.replaced for o in outputs.values()),
        "unknown_tokens": sum(o.unknown for o in outputs.values()),
        "encoder": encoder_name,
    }
