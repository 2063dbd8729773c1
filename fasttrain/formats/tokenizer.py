"""Byte-level BPE tokenizer: train one on a corpus, or load an existing tokenizer.json.

Imports from fasttrain: system.atomic, system.errors.

Byte-level: every string encodes and decode(encode(t)) == t. An end-of-text token separates documents; a loaded
tokenizer must have one under a usual name (<|endoftext|>, <|end_of_text|>, </s>). A loaded tokenizer of another kind
(WordLevel, WordPiece) may map unknown text to `unk_id`, which prepare counts, or fail on it: a UsageError naming the
file.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from fasttrain.system.atomic import write_atomically
from fasttrain.system.errors import UsageError

EOT = "<|endoftext|>"
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>")
MAX_VOCAB_SIZE = 1 << 20  # 4x the largest vocabularies in use; the BPE trainer allocates ~70 bytes per id up front


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the id of its end-of-text token."""

    def __init__(self, tok: tokenizers.Tokenizer, source: str = "trained"):
        eot = next((i for i in map(tok.token_to_id, EOT_NAMES) if i is not None), None)
        if eot is None:
            raise UsageError(f"{source}: tokenizer has no end-of-text token (one of {', '.join(EOT_NAMES)})")
        self.tok = tok
        self.source = source
        self.eot_id: int = eot
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        unk = getattr(tok.model, "unk_token", None)  # WordLevel, WordPiece, BPE; a byte-level BPE never emits it
        self.unk_id: int | None = tok.token_to_id(unk) if unk else None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn a byte-level BPE of `vocab_size` tokens (including the end-of-text token) from `texts`."""
        if vocab_size <= 256:
            raise UsageError(f"vocab size {vocab_size} is too small: byte-level BPE needs 256 bytes + end-of-text")
        if vocab_size > MAX_VOCAB_SIZE:  # the tokenizers library allocates for it up front and aborts the process
            raise UsageError(f"vocab size {vocab_size} is too large: at most {MAX_VOCAB_SIZE} (2^20)")
        tok = tokenizers.Tokenizer(models.BPE())
        # No prefix space and no normalizer: the text is encoded byte for byte, so decoding is exact.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer.json at `path`, or in directory `path` (a Hugging Face model's, say)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such tokenizer file")
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"{path}: not a valid tokenizer.json ({reason})") from None
        return cls(tok, source=path)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer.json at `path` atomically. Written here, not by tokenizers (whose failed
        write, such as on a full disk, is a bare Exception): a failure is a UsageError naming `path`."""
        text = self.tok.to_str(pretty=True).encode("utf-8")
        write_atomically(path, lambda f: f.write(text), "save the tokenizer")

    def encode(self, text: str) -> list[int]:
        """The ids of `text`; UsageError naming the file if the tokenizer cannot encode it (see encode_batch)."""
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # a bare Exception, as in encode_batch
            raise self._cannot_encode(e) from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel across the tokenizers library's threads."""
        try:
            encoded = self.tok.encode_batch(list(texts), add_special_tokens=False)
        except Exception as e:  # a bare Exception, e.g. a WordLevel vocabulary without its unknown token
            raise self._cannot_encode(e) from None
        return [e.ids for e in encoded]

    def _cannot_encode(self, e: Exception) -> UsageError:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return UsageError(
            f"{self.source}: cannot encode the text ({reason}); this needs a tokenizer that encodes "
            "any text, such as a byte-level BPE"
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def fingerprint(path: str | os.PathLike) -> str:
    """The sha256 of the tokenizer.json at `path` (hex): prepare records it in meta.json, so a tokenizer swapped
    in later, even one of the same size, is told apart from the one the shards were written with."""
    try:
        with open(path, "rb") as f:  # tokenizer.json files are a few MB at most
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
