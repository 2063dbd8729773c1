"""Where documents come from: the user's files, or the corpus embedded in CPython.

Imports from fasttrain: formats.shards, system.errors.

An input is a path, a glob, a directory (its text files, recursively), a JSONL file (a document per line, in a text
field), a Parquet file (a document per row, in a text column; the `parquet` extra), or an embedded corpus:

    builtin:pydoc       the Python documentation topics shipped with CPython
                        (`pydoc_data.topics`, ~465 KB of English, 79 documents)
    builtin:docstrings  the docstrings of the standard library's modules, read
                        with `ast` from the sources, never imported
    builtin:sources     the standard library's sources, a document per module
                        (~10 MB of Python; tests, IDLE, lib2to3, pydoc_data left out)

A plain text file is one document. Documents stream as `Piece`s of about `CHUNK_BYTES` at most (Parquet
PARQUET_BATCH_ROWS rows at a time), so no file is read whole; a text file's are cut at line ends where the tokenizer's
split cuts too, so its tokens are its whole text's (`_line_cut`; a byte-level split's: for a tokenizer that marks the
start of each text, pipeline.whole_documents joins them again). Invalid UTF-8 and lone surrogates (a JSON escape
such as \\ud800) are replaced with U+FFFD and counted, not fatal: real corpora have a few bad bytes (`Piece.of`).
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from fasttrain.formats.shards import refuse_special_file
from fasttrain.system.errors import UsageError

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("pydoc", "docstrings", "sources")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl", ".parquet")  # what a directory contributes
CHUNK_BYTES = 1 << 20
CUT_SEARCH_BYTES = 1 << 16  # how far back from a chunk's end _line_cut looks first for a line end no pre-token spans
LOOKAHEAD_CHUNKS = 4  # the chunks read on without one (indented code, blank lines) before a piece is cut at any
_SAFE_LINE_END = re.compile(rb"[\x21-\x7e]\n(?=[\x21-\x7e])")
PARQUET_BATCH_ROWS = 1024  # rows decoded at once: bounded memory even in a file of one huge row group
# Any surrogate code point in a str: UTF-8 encodes none (json.loads joins an escaped pair into the character it means).
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class Piece:
    """Part of a document: `text`, whether the document ends with it, and how much text it replaced (invalid UTF-8
    sequences and lone surrogates, each by one U+FFFD)."""

    text: str
    ends_document: bool
    replaced: int = 0

    @classmethod
    def of(cls, data: bytes | str, ends_document: bool, replaced: int = 0) -> Piece:
        """`data` as text UTF-8 can carry: invalid UTF-8 in bytes, or lone surrogates in a str (a JSON escape such as
        \\ud800), replaced with U+FFFD and counted on top of `replaced`; all text comes through here."""
        if isinstance(data, bytes):
            text = data.decode("utf-8", errors="replace")
            # Each invalid sequence became one U+FFFD; genuine U+FFFD characters are
            # exactly the bytes EF BF BD, so the difference counts the damage.
            found = text.count("\ufffd") - data.count(b"\xef\xbf\xbd") if "\ufffd" in text else 0
        elif data.isascii():  # most text, at no cost: the search below reads about 450 MB/s
            text, found = data, 0
        else:
            text, found = _LONE_SURROGATE.subn("\ufffd", data)
        return cls(text, ends_document, replaced + found)


@dataclass
class Source:
    """One file or embedded corpus to read."""

    name: str  # a path, or builtin:NAME
    size: int  # bytes on disk (an estimate for the embedded corpora), for progress

    @property
    def divisible(self) -> bool:
        """Whether parts may share this source by byte ranges (a JSONL file, cut between lines)."""
        return self.name.endswith(".jsonl") and not self.name.startswith(BUILTIN_PREFIX)

    def pieces(self, text_field: str = "text", start: int = 0, end: int | None = None) -> Iterator[Piece]:
        """The source's pieces; of a JSONL file, only the lines that start in bytes [start, end)."""
        if self.name.startswith(BUILTIN_PREFIX):
            for doc in _builtin_documents(self.name[len(BUILTIN_PREFIX) :]):
                yield Piece.of(doc, True)  # a docstring can hold a surrogate escape, a source file invalid UTF-8
        elif self.name.endswith(".jsonl"):
            yield from self._jsonl_pieces(text_field, start, end)
        elif self.name.endswith(".parquet"):
            yield from self._parquet_pieces(text_field)
        else:
            yield from self._text_pieces()

    def _text_pieces(self) -> Iterator[Piece]:
        with _open(self.name) as f:
            carry, block = b"", f.read(CHUNK_BYTES)
            while True:
                data = carry + block
                block = f.read(CHUNK_BYTES)
                if not block:  # read a chunk ahead: the last is one piece with what it carries, not cut again
                    yield Piece.of(data, True)
                    return
                cut = _line_cut(data)
                carry = data[cut:]
                if cut:
                    yield Piece.of(data[:cut], False)

    def _jsonl_pieces(self, text_field: str, start: int, end: int | None) -> Iterator[Piece]:
        with _open(self.name) as f:
            pos = start
            if start:  # the line that began before `start` belongs to the range before
                f.seek(start - 1)
                pos += len(f.readline()) - 1
            lineno = 0
            while end is None or pos < end:
                line = f.readline()
                if not line:
                    return
                lineno += 1  # counted from `start`: a range after the first names its lines by byte offset
                where = f"{self.name}:{lineno}" if not start else f"{self.name} (the line at byte {pos})"
                pos += len(line)
                if not line.strip():
                    continue
                piece = Piece.of(line, True)
                try:
                    record = json.loads(piece.text)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{where}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise UsageError(f"{where}: no {text_field!r} field (choose one with --text-field)")
                if not isinstance(record[text_field], str):
                    kind = type(record[text_field]).__name__
                    raise UsageError(f"{where}: field {text_field!r} is {kind}, expected a string")
                yield Piece.of(record[text_field], True, piece.replaced)

    def _parquet_pieces(self, text_field: str) -> Iterator[Piece]:
        import pyarrow as pa

        f = _parquet_file(self.name)
        schema = f.schema_arrow
        if text_field not in schema.names:
            raise UsageError(
                f"{self.name}: no {text_field!r} column (it has {', '.join(schema.names)}; "
                "choose one with --text-field)"
            )
        kind = schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UsageError(f"{self.name}: column {text_field!r} is {kind}, expected strings")
        batches = f.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field])
        # Read as bytes, decoded here: a file written by another tool can hold invalid UTF-8, which pyarrow's own
        # decoding raises on (a UnicodeDecodeError) where a text file's is replaced and counted.
        as_bytes = pa.large_binary() if pa.types.is_large_string(kind) else pa.binary()
        while True:
            try:  # a footer can be whole while a column chunk is damaged: found only when it is read
                batch = next(batches, None)
            except (OSError, ValueError) as e:
                raise UsageError(f"{self.name}: damaged Parquet data ({str(e).splitlines()[0]})") from None
            if batch is None:
                return
            for data in batch.column(0).cast(as_bytes).to_pylist():
                yield Piece.of(data or b"", True)  # a null is an empty document, which adds nothing


def _parquet_file(path: str):
    """`path` opened as a pyarrow ParquetFile; a missing pyarrow or a damaged file is a UsageError."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f'{path}: reading Parquet needs pyarrow: pip install -e ".[parquet]"') from None
    try:
        # Read column chunks through a 1 MiB buffer, not whole: with the defaults, resident memory grew
        # with the file (+72 MB reading 43 MB of text, +158 MB reading 342 MB); this way it stays at +68 MB.
        return pq.ParquetFile(path, buffer_size=CHUNK_BYTES, pre_buffer=False)
    except (OSError, ValueError) as e:  # pyarrow's ArrowIOError is an OSError, its ArrowInvalid a ValueError
        raise UsageError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def _parquet_text_size(path: str) -> int:
    """The uncompressed bytes of a Parquet file's data (all columns: the text field is not known here)."""
    meta = _parquet_file(path).metadata
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None


def _line_cut(data: bytes) -> int:
    """Where to cut `data` so that the two parts encode as the whole would: after the last line end between two
    printable ASCII characters (where every byte-level BPE's split, GPT-2's and Llama 3's, ends one pre-token and starts
    the next; before an indent or a blank line it does not); 0, to read on, where there is none in less than
    LOOKAHEAD_CHUNKS chunks; else after the last line end, else at a UTF-8 character."""
    for start in (max(len(data) - CUT_SEARCH_BYTES, 0), 0):  # the last safe line end is most often near the end
        last = None
        for last in _SAFE_LINE_END.finditer(data, start):
            pass
        if last is not None:
            return last.start() + 2
    if len(data) < LOOKAHEAD_CHUNKS * CHUNK_BYTES:
        return 0
    cut = data.rfind(b"\n") + 1
    if cut == 0:  # one very long line: back off over UTF-8 continuation bytes instead
        cut = len(data)
        while cut > 0 and 0x80 <= data[cut - 1] < 0xC0:
            cut -= 1
        if cut > 0 and data[cut - 1] >= 0xC0:  # a lead byte whose continuation is cut off
            cut -= 1
        cut = cut or len(data)
    return cut


def _glob(spec: str) -> list[str]:
    """The files `spec` matches (`**` spans directories), sorted. pathlib never enters a linked directory, where
    glob.glob does (a link to a parent repeated the tree without end)."""
    parts = Path(spec).parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:first]) if first else Path(".")
    return sorted(str(p) for p in root.glob(str(Path(*parts[first:]))) if p.is_file())


def resolve_inputs(inputs: Sequence[str], sizes: bool = True) -> list[Source]:
    """Expand inputs into the ordered list of sources to read; a missing input is a `UsageError`. A file
    reached more than once (named twice, or through a link) is read once, where it first appears. Without `sizes`
    every size is 0: no Parquet footer is read, no embedded corpus measured."""
    if not inputs:
        raise UsageError("no inputs given")
    sources: list[Source] = []
    seen: set[str] = set()  # real paths already among the sources
    for spec in inputs:
        if spec.startswith(BUILTIN_PREFIX):
            name = spec[len(BUILTIN_PREFIX) :]
            if name not in BUILTINS:
                known = ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
                raise UsageError(f"{spec}: no such embedded corpus (known: {known})")
            sources.append(Source(spec, size=_builtin_size(name) if sizes else 0))
            continue
        if glob.has_magic(spec):
            paths = _glob(spec)
            if not paths:
                raise UsageError(f"{spec}: matches no files")
        elif os.path.isdir(spec):
            paths = sorted(
                str(p)
                for p in Path(spec).rglob("*")
                if p.is_file() and p.name.endswith(TEXT_SUFFIXES) and not p.name.startswith(".")
            )
            if not paths:
                raise UsageError(f"{spec}: directory holds no text files ({', '.join(TEXT_SUFFIXES)})")
        elif os.path.exists(spec):
            refuse_special_file(spec)  # globs and directories contribute regular files only
            paths = [spec]
        else:
            raise UsageError(f"{spec}: no such file or directory")
        for p in paths:
            if os.path.realpath(p) in seen:  # one file reached twice (two inputs, a link): one document
                continue
            seen.add(os.path.realpath(p))
            if not os.access(p, os.R_OK):
                raise UsageError(f"{p}: cannot read (permission denied)")
            # Progress counts text: a Parquet file's is about its uncompressed size (read from its footer).
            size = (_parquet_text_size(p) if p.endswith(".parquet") else os.path.getsize(p)) if sizes else 0
            sources.append(Source(p, size=size))
    return sources


def fingerprint(inputs: Sequence[str]) -> str:
    """What `inputs` hold now, short of reading them, hashed: the Python (whose standard library the embedded corpora
    are) and each file's path, size and modification time. The cache of prepared data is keyed on it, so an edited,
    added or removed file, or another Python's standard library, is prepared afresh. `UsageError` as resolve_inputs."""
    digest = hashlib.sha256(sys.version.encode())
    for source in resolve_inputs(inputs, sizes=False):  # a run's every start keys its cache: read no footers
        builtin = source.name.removeprefix(BUILTIN_PREFIX)
        for path in _builtin_files(builtin) if builtin != source.name else [source.name]:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def _builtin_size(name: str) -> int:
    """The embedded corpus's bytes of UTF-8 text (the sources' counted, the others' as measured on one Python): for
    the progress bar, and a plan's estimate of its tokens before it is prepared (cache.pending)."""
    if name == "sources":
        return sum(path.stat().st_size for path in _stdlib_modules())
    return 466_000 if name == "pydoc" else 1_650_000


def _builtin_files(name: str) -> list[Path]:
    """The files embedded corpus `name` is read from."""
    if name != "pydoc":
        return _stdlib_modules()
    import pydoc_data.topics

    return [Path(pydoc_data.topics.__file__)]


def _builtin_documents(name: str) -> Iterator[str | bytes]:
    if name == "pydoc":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]
    elif name == "sources":
        for path in _stdlib_modules():
            yield path.read_bytes()  # bytes: Piece.of replaces and counts any invalid UTF-8
    else:
        yield from _stdlib_docstrings()


def _stdlib_modules() -> list[Path]:
    """The standard library's .py files, sorted, less tests, IDLE, lib2to3, packages and pydoc_data (builtin:pydoc)."""
    skip = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__", "pydoc_data"}
    found = []
    for folder, subfolders, files in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d not in skip]  # not entered: the tests alone are ~120 MB
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return sorted(found)


def _stdlib_docstrings() -> Iterator[str]:
    """One document per standard-library module: its docstrings, in source order."""
    for path in _stdlib_modules():
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue  # a file this Python cannot parse has no docstrings for us
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, kinds)]
        docs = [d for d in (ast.get_docstring(n) for n in nodes) if d]
        if docs:
            yield "\n\n".join(docs)
