"""The prepared-data format: token shards (llm.c's convention) and meta.json; writer and validating readers.

Imports from fasttrain: system.errors.

A shard is a header of 256 little-endian int32, then the tokens:

    header[0]  magic 20240520
    header[1]  version 1
    header[2]  number of tokens
    header[3]  bytes per token: 2 (uint16) or 4 (uint32, for vocabularies over 65536 ids)
    header[4]  vocabulary size of the tokenizer that wrote it (0: unknown)
    header[5]  largest token id in the shard + 1 (0: unknown)

llm.c's own shards (20240520 with uint16 tokens, 20240801 with uint32) leave header[3:] zero and read as well; a loader
scans them for their largest id.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterator, TypeGuard

import numpy as np

from fasttrain.system.errors import UsageError

MAGIC = 20240520
LLMC_UINT32_MAGIC = 20240801  # llm.c's Llama 3 shards: uint32 tokens, no width field
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every id below `vocab_size`."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass(frozen=True)
class ShardInfo:
    path: str
    num_tokens: int
    dtype: np.dtype
    vocab_size: int  # 0: unknown
    id_bound: int  # every token id is below this; 0: unknown

    @property
    def file_size(self) -> int:
        return HEADER_BYTES + self.num_tokens * self.dtype.itemsize


def read_header(path: str | os.PathLike) -> ShardInfo:
    """Read and check a shard's header against its file size; any problem is a `UsageError` naming the file."""
    path = os.fspath(path)
    refuse_special_file(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = os.path.getsize(path)
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise UsageError(f"{path}: truncated shard: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, num_tokens, width, vocab_size, id_bound = (int(v) for v in header[:6])
    if magic not in (MAGIC, LLMC_UINT32_MAGIC):
        raise UsageError(f"{path}: not a token shard (magic {magic}, expected {MAGIC})")
    if width == 0:  # an llm.c shard: the magic tells the width
        width = 4 if magic == LLMC_UINT32_MAGIC else 2
    if width not in (2, 4):
        raise UsageError(f"{path}: unsupported token width {width} bytes (expected 2 or 4)")
    if magic == MAGIC and version != VERSION:
        raise UsageError(f"{path}: unsupported shard version {version} (expected {VERSION})")
    if num_tokens < 0 or vocab_size < 0 or id_bound < 0:
        raise UsageError(f"{path}: corrupt header (negative count)")
    info = ShardInfo(path, num_tokens, np.dtype(np.uint16 if width == 2 else np.uint32), vocab_size, id_bound)
    if size != info.file_size:
        raise UsageError(
            f"{path}: {'truncated' if size < info.file_size else 'oversized'} shard: header says "
            f"{num_tokens} tokens ({info.file_size} bytes), file has {size} bytes"
        )
    return info


def token_blocks(info: ShardInfo, chunk: int = 1 << 24) -> Iterator[np.ndarray]:
    """The shard's tokens in order, `chunk` at a time (memory stays bounded for any shard size)."""
    with open(info.path, "rb") as f:
        f.seek(HEADER_BYTES)
        while block := f.read(chunk * info.dtype.itemsize):
            yield np.frombuffer(block, dtype=info.dtype)


def out_of_vocabulary(path: str, token: int, position: int, vocab_size: int) -> str:
    """The message for a token id the model has no embedding for (one wording for every check)."""
    return f"{path}: token id {token} at position {position} is beyond the vocabulary of {vocab_size}"


def check_ids(info: ShardInfo, vocab_size: int) -> None:
    """Read every token of the shard (not its header, which may lie) and refuse the first id >= `vocab_size`."""
    start = 0
    for block in token_blocks(info):
        bad = np.flatnonzero(block >= vocab_size)
        if bad.size:
            raise UsageError(out_of_vocabulary(info.path, int(block[bad[0]]), start + int(bad[0]), vocab_size))
        start += block.size


def refuse_special_file(path: str) -> None:
    """A FIFO, socket or device named as input is refused: reading one would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # opening it reports the problem, with the file's name
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UsageError(f"{path}: not a regular file (a FIFO, socket or device); give a file")


def scan_id_bound(info: ShardInfo) -> int:
    """Largest token id + 1, read from the data itself (for shards whose header does not say)."""
    return max((int(block.max()) + 1 for block in token_blocks(info)), default=0)


class ShardWriter:
    """Writes one shard, streamed, under a temporary name: `close()` fills in the header, fsyncs and renames it into
    place; `abort()` (or an exception in a `with` block) removes it."""

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.num_tokens = 0
        self.id_bound = 0
        self._f = open(self.tmp, "wb")
        self._f.write(bytes(HEADER_BYTES))  # placeholder, filled in by close()

    def write(self, tokens: np.ndarray) -> None:
        if tokens.size == 0:
            return
        self.id_bound = max(self.id_bound, int(tokens.max()) + 1)
        if self.id_bound > self.vocab_size:
            raise ValueError(f"token id {self.id_bound - 1} is outside the vocabulary of {self.vocab_size}")
        self._f.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.num_tokens += tokens.size

    def close(self) -> ShardInfo:
        if self.num_tokens >= 1 << 31:
            self.abort()
            raise ValueError(f"{self.path}: {self.num_tokens} tokens do not fit the header's int32 count")
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:6] = [MAGIC, VERSION, self.num_tokens, self.dtype.itemsize, self.vocab_size, self.id_bound]
        self._f.seek(0)
        self._f.write(header.tobytes())
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return ShardInfo(str(self.path), self.num_tokens, self.dtype, self.vocab_size, self.id_bound)

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._f.closed:
            self.close()


# meta.json's identity of the preparation that wrote the folder, new each time (preparation.publish): a resume names
# data prepared again since its save (checkpoint.prepared_again)
PREPARATION = "preparation"


def read_meta(directory: str | os.PathLike) -> dict | None:
    """The meta.json that prepare wrote into `directory`, or None if there is none. Only its vocab_size is checked
    here (the loader needs no more); `check_meta` checks the rest, for a prepared folder a run trains from."""
    path = Path(directory) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path}: expected a JSON object, got {_shown(meta)}; prepare the data again")
    vocab_size = meta.get("vocab_size", _MISSING)
    if not (_count(vocab_size) and vocab_size > 0):  # as check_meta has it: 512.5 is not 512, nor "512" or true
        raise UsageError(f"{path}: vocab_size = {_shown(vocab_size)}, expected an integer > 0; prepare the data again")
    return meta


SPLITS = ("train", "val")
# Text tokens per UTF-8 byte of text, beyond which the counts cannot be right: a byte-level BPE emits at most 1,
# a SentencePiece-style tokenizer about 2 at worst (a "▁" it prefixes, then the byte); 4 leaves room.
MAX_TOKENS_PER_BYTE = 4


def _count(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _text(v: object) -> bool:
    return isinstance(v, str) and bool(v)


def _fraction(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1  # nan fails the range too


def _file_names(v: object) -> bool:
    return isinstance(v, list) and all(_text(n) and "/" not in n for n in v)


# Every key of meta.json that is read later (a run's config.toml records the request), with what it must hold.
# Keys added since the first prepare (text_field, tokenizer_sha256) may be absent: older folders still load.
_META_KEYS: list[tuple[str, bool, Callable[[object], bool], str]] = [  # (key, required, test, what is expected)
    ("vocab_size", True, lambda v: _count(v) and v > 0, "an integer > 0"),
    ("eot_id", True, _count, "a token id"),
    ("token_dtype", True, lambda v: v in ("uint16", "uint32"), '"uint16" or "uint32"'),
    *[(f"{part}.{s}", True, _count, "a count >= 0") for part in ("tokens", "documents", "text_bytes") for s in SPLITS],
    *[(f"shards.{s}", True, _file_names, "a list of shard file names") for s in SPLITS],
    ("request", True, lambda v: isinstance(v, dict), "an object: what prepare was asked for"),
    ("request.inputs", True, lambda v: isinstance(v, list) and bool(v) and all(map(_text, v)), "a list of input paths"),
    ("request.tokenizer", True, lambda v: v is None or _text(v), "null or a tokenizer path"),
    ("request.vocab_size", True, lambda v: v is None or (_count(v) and v > 256), "null or an integer > 256"),
    ("request.val_fraction", True, _fraction, "a number in [0, 1)"),
    ("request.text_field", False, _text, "a field name"),
    ("tokenizer_sha256", False, lambda v: isinstance(v, str) and len(v) == 64, "a sha256 in hex"),
]
_MISSING = object()


def check_meta(meta: object, path: str | os.PathLike) -> dict:
    """`meta` (from `path`) as prepare writes it, or a UsageError naming the key and value: each key read later in type
    and range, counts agreeing; checked before a run deletes or records anything."""
    if not isinstance(meta, dict):
        raise UsageError(f"{path}: expected a JSON object, got {_shown(meta)}; prepare the data again")

    def get(key: str) -> object:
        value: object = meta
        for part in key.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        return value

    def refuse(key: str, why: str) -> None:
        raise UsageError(f"{path}: {key} = {_shown(get(key))}, {why}; prepare the data again")

    for key, required, ok, expected in _META_KEYS:
        value = get(key)
        if (value is _MISSING and required) or (value is not _MISSING and not ok(value)):
            refuse(key, f"expected {expected}")
    if meta["eot_id"] >= meta["vocab_size"]:
        refuse("eot_id", f"beyond the vocabulary of {meta['vocab_size']}")
    dtype = token_dtype(meta["vocab_size"])
    if meta["token_dtype"] != dtype.name:
        refuse("token_dtype", f"but a vocabulary of {meta['vocab_size']} is stored as {dtype}")
    if (meta["request"]["tokenizer"] is None) == (meta["request"]["vocab_size"] is None):
        refuse("request.vocab_size", "expected a vocab_size when no tokenizer was given, and none when one was")
    if meta["tokens"]["train"] == 0:
        refuse("tokens.train", "expected a count > 0")
    if meta["tokens"]["val"] == 0:  # prepared with --val-fraction 0, say: every run evaluates
        refuse("tokens.val", "but a run evaluates on the val split (prepare with --val-fraction above 0)")
    if meta["text_bytes"]["val"] == 0:
        refuse("text_bytes.val", "expected a count > 0 (validation bits per byte divide by it)")
    for s in SPLITS:
        tokens, documents, text_bytes = meta["tokens"][s], meta["documents"][s], meta["text_bytes"][s]
        if documents > tokens:  # each document starts with its end-of-text token
            refuse(f"documents.{s}", f"more than the {tokens} tokens.{s}, one end-of-text token each")
        if tokens - documents > MAX_TOKENS_PER_BYTE * text_bytes:
            refuse(
                f"text_bytes.{s}",
                f"too few for the {tokens - documents} text tokens of tokens.{s} "
                f"(at most {MAX_TOKENS_PER_BYTE} a byte)",
            )
    return meta


def _shown(value: object) -> str:
    if value is _MISSING:
        return "(missing)"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def find_shards(directory: str | os.PathLike, split: str) -> list[ShardInfo]:
    """Every `*{split}_*.bin` shard in `directory` (llm.c's names match too), headers checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such data directory (run python -m fasttrain.prepare --out {directory})")
    paths = sorted(directory.glob(f"*{split}_*.bin"))
    if not paths:
        raise UsageError(f"{directory}: no {split} shards ({split}_*.bin)")
    shards = [read_header(p) for p in paths]
    for s in shards:
        if s.dtype != shards[0].dtype:
            raise UsageError(
                f"{s.path}: {s.dtype} tokens, but {shards[0].path} has {shards[0].dtype}; one split, one width"
            )
    return shards
