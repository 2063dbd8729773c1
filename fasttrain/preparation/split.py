"""Which text is validation, and which text the tokenizer is learned from.

Imports from fasttrain: preparation.corpus.

Both are decided by each document's own text, never its place in the stream, so one prepare and N parts merged
(parts.py) agree. A document's hash is BLAKE2b of its first piece (a plain text file over corpus.CHUNK_BYTES: its first
MiB): the first 8 bytes, as a fraction of 2^64, put it in validation when below --val-fraction; the next 8 choose the
tokenizer's sample. So that neither split is empty, the corpus's first document (and any of the same text) is always
validation and its second always train; every part reads the first two to know them. Identical documents land in one
split, so none leaks from train into validation.

A corpus of fewer than two documents holds out the last F of its text instead, cut at a line end; meta.json's "split"
says which ("document_hash", or "end_of_text"; "documents" in folders prepared before the hash rule, read as they are).

The tokenizer learns from its sample with runs of whitespace or other characters longer than LONGEST_RUN cut into pieces
that long (`learning_pieces`): the BPE trainer's time grows with the square of its longest word. The shards hold every
text whole.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np

from fasttrain.preparation.corpus import Piece, Source

_SCALE = float(1 << 64)

# The longest run the tokenizer learns from. The trainer splits text into words (GPT-2's pattern: a run of
# letters, of digits, of other non-space characters, or of whitespace, with at most one leading space), and its
# time grows with the square of the longest: here one word of 100K random letters took 1.7 s to learn, 300K 13 s
# (300K spaces 24 s), 3M some 20 minutes. A word is never longer than a run of whitespace or of other characters
# plus a space, so runs cut at 512 keep learning about linear in the sample (1M letters cut: 1.7 s, 2M 3.8 s, 4M
# 8.6 s, 8M 19 s). Nothing useful is lost: a token of 512 characters would be one string recurring verbatim about
# as often as the vocabulary's rarest merge, which only runs of one repeated character (padding, a rule of '=')
# come near, and those still get tokens of up to 512 characters.
LONGEST_RUN = 512
# What the trainer's pattern calls whitespace (\s: Unicode's White_Space), as a table indexed by code point;
# every code point past its end is not whitespace.
_WHITE_SPACE = np.zeros(0x3002, dtype=bool)
_WHITE_SPACE[[*range(0x9, 0xE), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F]] = True
_WHITE_SPACE[[0x205F, 0x3000]] = True


def document_hash(first_piece: str) -> tuple[float, float]:
    """(split value, sample value), each uniform in [0, 1), from a document's first piece."""
    digest = hashlib.blake2b(first_piece.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") / _SCALE, int.from_bytes(digest[8:], "little") / _SCALE


@dataclass(frozen=True)
class Split:
    """How the validation split is made: "document_hash" (whole documents, by their hash), or "end_of_text"
    when there are too few documents for that, holding out what follows character `cut` (at a line end)."""

    by: Literal["document_hash", "end_of_text"]
    val_fraction: float
    total_chars: int = 0  # end_of_text: the whole text's length, counted beforehand
    first: float = -1.0  # document_hash: the split values of the corpus's first two documents, held out / kept
    second: float = -1.0

    def holds_out(self, value: float) -> bool:
        """Whether a document whose hash's split value is `value` is validation."""
        return value == self.first or (value != self.second and value < self.val_fraction)

    @property
    def cut(self) -> int:
        return math.ceil((1 - self.val_fraction) * self.total_chars)

    def describe(self) -> dict:
        """For meta.json."""
        if self.by == "document_hash":
            return {
                "by": self.by,
                "hash": "blake2b-128 of the document's first piece; val when its first 8 bytes / 2^64 < val_fraction",
                "first_document": "val",
                "second_document": "train",
            }
        return {"by": self.by, "cut_at_char": self.cut, "total_chars": self.total_chars}


def plan_split(sources: Sequence[Source], text_field: str, val_fraction: float) -> Split:
    """By documents if the input holds two non-empty ones or more, else by the end of the text. Reads only until the
    second document in the usual case; a corpus of one document is read through once to count its characters."""
    if val_fraction == 0:
        return Split("document_hash", 0.0)
    documents, chars, length, values, first_piece = 0, 0, 0, [], None
    for src in sources:
        for piece in src.pieces(text_field):
            first_piece = piece.text if first_piece is None else first_piece
            length += len(piece.text)
            if piece.ends_document:
                if length:
                    documents += 1
                    values.append(document_hash(first_piece)[0])
                chars, length, first_piece = chars + length, 0, None
                if documents >= 2:
                    return Split("document_hash", val_fraction, first=values[0], second=values[1])
    return Split("end_of_text", val_fraction, chars)


def split_documents(sources: Sequence[Source], text_field: str, split: Split) -> Iterator[tuple[str, Piece, bool]]:
    """(split, piece, starts_document) for every piece of every source, in order (see `split_pieces`)."""
    return split_pieces(all_pieces(sources, text_field), split)


def split_pieces(pieces: Iterator[Piece], split: Split) -> Iterator[tuple[str, Piece, bool]]:
    """(split, piece, starts_document) for every piece, in order. By document hash: a document is validation when its
    hash's split value is below `val_fraction`, or it is the corpus's first, and not when its second
    (`Split.holds_out`). By the end of the text: the piece holding character `split.cut` is cut at its next line end,
    and what follows is validation, a document of its own."""
    if split.by == "end_of_text":
        yield from _split_end_of_text(pieces, split.cut)
        return
    which, starts = "train", True
    for piece in pieces:
        if starts:
            which = "val" if split.holds_out(document_hash(piece.text)[0]) else "train"
        yield which, piece, starts
        starts = piece.ends_document


def _split_end_of_text(pieces: Iterator[Piece], cut: int) -> Iterator[tuple[str, Piece, bool]]:
    seen, starts, held_out = 0, True, False
    for piece in pieces:
        if not held_out and seen + len(piece.text) > cut:
            at = piece.text.find("\n", max(cut - seen, 0)) + 1  # 0: no line end here, cut in a later piece
            if at:
                yield "train", Piece(piece.text[:at], False, piece.replaced), starts
                held_out, starts = True, True
                piece = Piece(piece.text[at:], piece.ends_document)
                if not piece.text:  # the cut fell at the piece's end: validation starts with the next one
                    continue
        seen += len(piece.text)
        yield ("val" if held_out else "train"), piece, starts
        starts = piece.ends_document


def all_pieces(sources: Sequence[Source], text_field: str) -> Iterator[Piece]:
    """Every piece of every source, in order."""
    for src in sources:
        yield from src.pieces(text_field)


@dataclass
class Sample:
    """What the tokenizer was learned from, for meta.json."""

    documents: int = 0
    chars: int = 0
    files: int = 0
    long_runs_cut: int = 0  # runs longer than LONGEST_RUN, cut for learning (see learning_pieces)

    def describe(self) -> dict:
        return {
            "documents": self.documents,
            "chars": self.chars,
            "files": self.files,
            "long_runs_cut": self.long_runs_cut,
        }


def learning_pieces(text: str) -> tuple[list[str], int]:
    """`text` cut for the tokenizer to learn from: runs of whitespace or other characters longer than LONGEST_RUN in
    pieces that long; and how many runs were cut. ~350 MB/s in numpy, 10x a regex."""
    if len(text) <= LONGEST_RUN:
        return [text], 0
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    space = _WHITE_SPACE[np.minimum(codes, _WHITE_SPACE.size - 1)]
    starts = np.concatenate(([0], np.flatnonzero(space[1:] != space[:-1]) + 1))
    lengths = np.diff(starts, append=codes.size)
    long = np.flatnonzero(lengths > LONGEST_RUN).tolist()
    if not long:
        return [text], 0
    cuts = [c for i in long for c in range(int(starts[i]) + LONGEST_RUN, int(starts[i] + lengths[i]), LONGEST_RUN)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])], len(long)


def tokenizer_sample(
    sources: Sequence[Source], text_field: str, split: Split, max_chars: int, sample: Sample
) -> Iterator[str]:
    """Training text to learn the tokenizer from, about `max_chars` spread over the input, streamed: documents whose
    hash's sample value is below max_chars / the input's size; long runs cut. Counts into `sample`."""
    total = sum(src.size for src in sources)
    # One document (split by the end of its text) is taken from its start, as far as max_chars goes.
    rate = max_chars / total if total and split.by == "document_hash" else 1.0
    current, files = 0, set()

    def pieces() -> Iterator[Piece]:
        nonlocal current
        for current, src in enumerate(sources):
            yield from src.pieces(text_field)

    take = False
    for which, piece, starts in split_pieces(pieces(), split):
        if sample.chars >= max_chars:
            return
        if starts:
            take = which == "train" and (rate >= 1 or document_hash(piece.text)[1] < rate)
            sample.documents += take and bool(piece.text)
        if which == "train" and take and piece.text:
            sample.chars += len(piece.text)
            files.add(current)
            sample.files = len(files)
            pieces_learned, cut = learning_pieces(piece.text)
            sample.long_runs_cut += cut
            yield from pieces_learned
