"""Which text is validation, and which text the tokenizer is learned from.

Both are decided by each document's own text, never by where it falls in the stream: one prepare and N
parts merged (fasttrain/data/parts.py) hold out the same documents and learn from the same sample. A
document's hash is BLAKE2b of its first piece (the whole document, except a plain text file over
corpus.CHUNK_BYTES, whose first piece is its first MiB): its first 8 bytes, as a fraction of 2^64, put it
in validation when below --val-fraction; the next 8 choose the tokenizer's sample. So that neither split
is ever empty, the corpus's first document (and any document of the same text) is always validation and
its second always train, whatever their hashes; every part reads the inputs' first two documents to know
them. Identical documents land in one split, so a duplicated document never leaks from train into
validation.

A corpus of fewer than two documents (one big text file) holds out the last F of its text instead, cut
at a line end; meta.json's "split" says which was done ("document_hash", or "end_of_text"). Folders
prepared before the hash rule say "documents": their validation was the first documents to keep the held
out share of the text at F; they are read as they are.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

from fasttrain.data.corpus import Piece, Source

_SCALE = float(1 << 64)


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
    """By documents if the input holds two non-empty ones or more, else by the end of the text.

    Reads only until the second document in the usual case; a corpus of one document is read
    through once to count its characters (cheap next to tokenizing it).
    """
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
    """(split, piece, starts_document) for every piece, in order.

    By document hash: a document is validation when its hash's split value is below `val_fraction`
    (`document_hash`), or it is the corpus's first document, and not when it is its second (`Split.holds_out`). By the end of the text: the piece holding character `split.cut` is cut at its next
    line end, and what follows is validation, starting as a document of its own (after an end-of-text token).
    """
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

    def describe(self) -> dict:
        return {"documents": self.documents, "chars": self.chars, "files": self.files}


def tokenizer_sample(
    sources: Sequence[Source], text_field: str, split: Split, max_chars: int, sample: Sample
) -> Iterator[str]:
    """Training-split text to learn the tokenizer from: about `max_chars` characters spread over the whole
    input, streamed (memory bounded by the tokenizer trainer, not by the corpus). Each training document is
    taken when its hash's sample value is below max_chars / the input's size, so every file contributes
    about its share; a corpus smaller than `max_chars` is taken whole. Counts what it took into `sample`."""
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
            yield piece.text
