"""The cache of prepared data: where [data] settings' prepared folder is (`prepared_dir`: data.dir, else a
folder under $FASTTRAIN_CACHE or ~/.cache/fasttrain keyed by the settings), what is there (`find_prepared`),
what preparing it will make, estimated before it is made (`pending`), and the folder a run trains from, prepared
first if need be (`ensure_prepared`). Preparing itself is
fasttrain/preparation/preparation.py.

Imports from fasttrain: config, formats.prepared_folder, formats.shards, formats.tokenizer, preparation.corpus,
preparation.preparation, system.errors, system.run_lock.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from dataclasses import replace
from pathlib import Path

from fasttrain.config import DEFAULT_INPUTS, DEFAULT_VOCAB, DataConfig
from fasttrain.formats.prepared_folder import PreparedData, open_prepared
from fasttrain.formats.shards import read_meta
from fasttrain.formats.tokenizer import Tokenizer
from fasttrain.preparation import corpus, preparation
from fasttrain.system.errors import UsageError
from fasttrain.system.run_lock import holding

# Bytes of text per token of a byte-level BPE of a vocabulary's size trained on the corpus, measured on the embedded
# corpora (builtin:pydoc 2.14 at 512 tokens and 4.13 at 4096, builtin:docstrings 1.94 and 3.54, the default pydoc
# with sources 3.45 at 4096): a corpus not prepared yet is planned at these, log-linear between, held beyond.
BYTES_PER_TOKEN = ((512, 2.0), (4096, 3.8))


def cache_root() -> Path:
    """The folder the caches are in: $FASTTRAIN_CACHE, $XDG_CACHE_HOME/fasttrain or ~/.cache/fasttrain."""
    return Path(
        os.environ.get("FASTTRAIN_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fasttrain"
    )


def cache_dir(request: dict) -> Path:
    """Where data for `request` is cached when data.dir is unset: under `cache_root`, a directory per distinct
    request (absolute paths) and what its inputs hold now (`corpus.fingerprint`: an edited input file, or another
    Python's embedded corpus, is another directory). UsageError, saying what it is, if that root cannot be a folder."""
    root = cache_root()
    if what := _not_a_folder(root):  # else "cannot write (File exists)" about a lock in it
        setting = "FASTTRAIN_CACHE = " if os.environ.get("FASTTRAIN_CACHE") else "the cache folder "
        raise UsageError(f"{setting}{root}: {what}; set FASTTRAIN_CACHE to a folder")
    key = {**request, "contents": corpus.fingerprint(request["inputs"])}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(root) / f"{_readable_name(request['inputs'][0])}-{digest}"


def _not_a_folder(root: Path) -> str:
    """What `root` is, in words, where it cannot be the cache's folder: "is a file, not a folder", "is a symbolic link
    loop", "is under a file, not a folder", ...; "" where it is a folder, or nothing yet (it is made then)."""
    try:
        mode = os.stat(root).st_mode
    except FileNotFoundError:
        return "is a symbolic link to nothing" if os.path.islink(root) else ""
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"is {'' if os.path.islink(root) else 'under '}a symbolic link loop"
        if e.errno == errno.ENOTDIR:
            return "is under a file, not a folder"
        return f"cannot be read ({e.strerror or e})"
    return "" if stat.S_ISDIR(mode) else "is a file, not a folder"


def _readable_name(spec: str, limit: int = 40) -> str:
    """The readable part of a cache directory's name for the input `spec`: the last whole words (letters and digits) of
    its path that fit in `limit` characters, joined by "-" ("data" if none fit). Never a cut word, as the path's last
    characters were: the name is read in every note about the folder."""
    name = ""
    for word in reversed(re.findall(r"[A-Za-z0-9]+", spec.removeprefix("builtin:"))):
        longer = f"{word}-{name}" if name else word
        if len(longer) > limit:
            break
        name = longer
    return name or "data"


def finish_interrupted_sources(d: DataConfig, quiet: bool = False) -> None:
    """For each [[data.sources]] folder what ensure_prepared does for data.dir: finish the move into place that a
    killed `fasttrain prepare` left (its new data whole in .prepare-tmp), under the folder's lock."""
    for source in d.sources:
        out = Path(source.dir)
        if (out / preparation.TMP_NAME / preparation.COMPLETE).exists():
            with holding(preparation.lock_path(out)):
                preparation.finish_interrupted_move(out, quiet)


def ensure_prepared(d: DataConfig, quiet: bool = False) -> PreparedData:
    """Make sure prepared data for [data] `d` exists (`d.dir`, else the cache's `cache_dir`, prepared from `d.inputs`)
    and say what it holds: keys left at defaults take its values, others must agree (UsageError naming both). The folder
    is checked whole before anything is recorded or deleted; `d` is unchanged."""
    inputs, vocab_size = d.inputs or DEFAULT_INPUTS, d.vocab_size or DEFAULT_VOCAB
    directory = prepared_dir(d)

    def wait(holder: str) -> None:  # two runs preparing one cache: the second uses what the first made
        if not quiet:
            print(f"data: waiting for {holder}, which is preparing {directory}")

    with holding(preparation.lock_path(Path(directory)), wait=wait):
        preparation.finish_interrupted_move(Path(directory), quiet)
        if read_meta(directory) is None:
            if d.dir and not d.inputs and not quiet:  # a typo in data.dir would otherwise pass unnoticed
                state = "is empty" if Path(directory).is_dir() else "does not exist"
                # a folder holding only what a killed prepare left (.prepare-tmp) is as empty: nothing was prepared
                held = state == "is empty" and any(p.name != preparation.TMP_NAME for p in Path(directory).iterdir())
                if not held:
                    print(
                        f"note: data.dir = {directory} {state}, so the default data.inputs "
                        f"({', '.join(DEFAULT_INPUTS)}) is prepared into it; if it should name a prepared "
                        "folder, check the path"
                    )
            preparation.prepare_locked(
                inputs,
                directory,
                vocab_size=vocab_size,
                tokenizer_path=d.tokenizer or None,
                val_fraction=d.val_fraction,
                text_field=d.text_field,
                quiet=quiet,
            )
    data = find_prepared(d)[1]
    assert data is not None  # prepared above, by this process or the lock's holder
    return data


def prepared_dir(d: DataConfig) -> str:
    """The folder [data] `d` trains from: data.dir, or the cache directory of its request (`cache_dir`)."""
    inputs, vocab = d.inputs or DEFAULT_INPUTS, d.vocab_size or DEFAULT_VOCAB
    return d.dir or str(cache_dir(preparation.request_of(inputs, vocab, d.tokenizer, d.val_fraction, d.text_field)))


def stale_cache_note(d: DataConfig) -> str:
    """A note where data.dir names a cache folder (as a run's config.toml records it) that its data.inputs, as they
    are now, would not be prepared into: they changed after it was prepared, and the run trains on the text before.
    "" otherwise."""
    if not d.dir or not d.inputs or Path(d.dir).resolve().parent != cache_root().resolve():
        return ""
    now = prepared_dir(replace(d, dir=""))
    if Path(now).resolve() == Path(d.dir).resolve():
        return ""
    return (
        f"data.dir = {d.dir}: the cache of data.inputs as they were when it was prepared; they have changed since "
        f'(now {Path(now).name}), and this run trains on the text prepared before: --set data.dir="" prepares them '
        "as they are"
    )


def find_prepared(d: DataConfig) -> tuple[str, PreparedData | None]:
    """Where [data] `d`'s prepared data is (`prepared_dir`) and what it holds, checked whole (`open_prepared`) and
    against what `d` asks for (see ensure_prepared); None while nothing is prepared there. Reads, never writes."""
    directory = prepared_dir(d)
    if read_meta(directory) is None:
        return directory, None
    prepared = open_prepared(directory)
    found = {"text_field": "text", **prepared.meta["request"]}
    differ = [(key, value) for key, value in _given(d).items() if _comparable(key, found.get(key)) != value]
    if differ:
        raise UsageError(
            f"{directory}: holds data prepared with {', '.join(f'{k}={found.get(k)!r}' for k, _ in differ)}, not what "
            f"[data] asks for ({', '.join(f'data.{k} = {v!r}' for k, v in differ)}); leave those keys unset to train "
            "on this folder as it is, point data.dir elsewhere, or remove the directory"
        )
    return directory, prepared


def _given(d: DataConfig) -> dict:
    """The prepare settings [data] `d` sets: those not at their defaults, which defer to a prepared folder.
    Paths as `_comparable` makes them, so "./corpus" is the "corpus" a folder was prepared from."""
    defaults = DataConfig()
    given: dict = {}
    if d.inputs:
        given["inputs"] = _comparable("inputs", d.inputs)
    if d.tokenizer:
        given["tokenizer"] = _comparable("tokenizer", d.tokenizer)
    elif d.vocab_size:
        given["vocab_size"] = d.vocab_size
    if d.val_fraction != defaults.val_fraction:
        given["val_fraction"] = d.val_fraction
    if d.text_field != defaults.text_field:
        given["text_field"] = d.text_field
    return given


def _comparable(key: str, value: object) -> object:
    """A request value as compared between a config and a prepared folder: paths absolute with links resolved
    (meta.json of folders prepared before paths were recorded absolute may hold relative ones)."""

    def resolved(spec: str) -> str:
        return spec if spec.startswith("builtin:") else os.path.realpath(spec)

    if key == "inputs" and isinstance(value, list):
        return [resolved(i) for i in value]
    if key == "tokenizer" and isinstance(value, str):
        return resolved(value)
    return value


def pending(d: DataConfig) -> tuple[str, int, float, str]:
    """What preparing [data] `d`'s one folder will make, in words, its vocabulary size, and an estimate of its
    training tokens with how it was made, in words (the inputs' bytes, at BYTES_PER_TOKEN, less data.val_fraction);
    UsageError for what would refuse the preparation (inputs that name nothing, a folder not ours to fill, ...).
    Reads no text: the sizes of the files."""
    directory, inputs = prepared_dir(d), d.inputs or list(DEFAULT_INPUTS)
    sources = preparation.check_preparable(inputs, Path(directory), d.val_fraction, tokenizer_path=d.tokenizer or None)
    if d.tokenizer:
        vocab, tokenizer = Tokenizer.load(d.tokenizer).vocab_size, f"the tokenizer {d.tokenizer}"
    else:
        vocab = d.vocab_size or DEFAULT_VOCAB
        tokenizer = f"a {vocab}-token BPE trained on it"
    request = preparation.request_of(inputs, vocab, d.tokenizer, d.val_fraction, d.text_field)
    (v1, b1), (v2, b2) = BYTES_PER_TOKEN
    per_token = b1 + (b2 - b1) * min(max(math.log(vocab / v1) / math.log(v2 / v1), 0.0), 1.0)
    size = sum(s.size for s in sources)
    tokens = size / per_token * (1 - d.val_fraction)
    estimated = (
        f"~{tokens / 1e6:.2f}M training tokens, estimated from the inputs' {size / 1e6:.2f} MB at ~{per_token:.1f} "
        "bytes a token; the run plans them again on the prepared data"
    )
    return f"{', '.join(request['inputs'])} into {directory}, with {tokenizer}", vocab, tokens, estimated
