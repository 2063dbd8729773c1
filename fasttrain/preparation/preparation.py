"""Preparing data: a text corpus tokenized into train/val token shards (`prepare`), and the cache of prepared data a run
without data.dir trains from (`ensure_prepared`). Its command line is `python -m fasttrain.prepare --input PATH [PATH
...] --out DIR`.

Imports from fasttrain: formats.shards, formats.tokenizer, preparation.corpus, preparation.pipeline, preparation.split,
system.atomic, system.errors, system.run_lock.

Writes into DIR `train_000000.bin`, ... and `val_000000.bin`, ... (formats/shards.py), `tokenizer.json` and `meta.json`
(vocabulary size, counts, sources); every document is preceded by the end-of-text token, as in llm.c. The corpus is
streamed, tokenized in batches on `workers` threads (pipeline.py; tiktoken where it gives the same ids, encoder.py), so
memory stays bounded. Everything is written into DIR/.prepare-tmp and moved into place once complete: a failed run
leaves DIR as it was, and one killed while moving in is finished by the next. One process prepares a directory at a time
(a lock beside it).

The validation split holds out about F of the documents, each by a hash of its own text (split.py); an input of fewer
than two documents holds out the last F of the text instead, cut at a line end (meta.json's "split" says which).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
import uuid
from itertools import islice
from pathlib import Path
from typing import Any, Sequence

from fasttrain.formats.shards import PREPARATION, token_dtype
from fasttrain.formats.tokenizer import Tokenizer, fingerprint
from fasttrain.preparation.corpus import resolve_inputs
from fasttrain.preparation.pipeline import write_shards
from fasttrain.preparation.split import LONGEST_RUN, Sample, all_pieces, plan_split, split_documents, tokenizer_sample
from fasttrain.system.atomic import sync_directory, write_atomically
from fasttrain.system.errors import UsageError
from fasttrain.system.run_lock import holding

PREPARED = ("meta.json", "tokenizer.json", "train_*.bin", "val_*.bin", "*.bin.docs.npy")  # what --overwrite replaces
TMP_NAME = ".prepare-tmp"
COMPLETE = "COMPLETE"  # in TMP_NAME once the new data there is whole: a killed move is then finished, not undone


def prepare_locked(
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 4096,
    tokenizer_path: str | None = None,
    val_fraction: float = 0.1,
    overwrite: bool = False,
    shard_tokens: int = 100_000_000,
    text_field: str = "text",
    tokenizer_train_chars: int = 200_000_000,
    batch_chars: int = 1_000_000,
    workers: int = 0,
    quiet: bool = False,
) -> dict:
    """`prepare`, for a caller that holds `out_dir`'s lock and has finished an interrupted move."""
    out = Path(out_dir)
    sources = check_preparable(inputs, out, val_fraction, shard_tokens, tokenizer_path, overwrite)
    tmp = out / TMP_NAME
    created = not out.exists()  # removed again if this run fails, so DIR is left as it was
    try:
        if tmp.exists():  # left by a run killed before its preparation was complete
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UsageError(f"{out}: cannot write ({e.strerror})") from None

    try:
        start = time.perf_counter()
        split = plan_split(sources, text_field, val_fraction)
        if split.by == "end_of_text" and split.total_chars and not quiet:  # no text: its error comes, not this
            print(
                f"split: fewer than two documents, so the last {val_fraction:g} of the text "
                f"(from character {split.cut:,} of {split.total_chars:,}, at a line end) is held out for validation"
            )
        sample = Sample()
        if tokenizer_path:
            tokenizer = Tokenizer.load(tokenizer_path)
        else:
            tokenizer = Tokenizer.train(
                tokenizer_sample(sources, text_field, split, tokenizer_train_chars, sample), vocab_size
            )
        tokenizer_seconds = time.perf_counter() - start
        counts = write_shards(
            tmp,
            split_documents(sources, text_field, split),
            tokenizer,
            corpus_sample(sources, text_field),
            shard_tokens=shard_tokens,
            batch_chars=batch_chars,
            workers=workers or default_workers(),
            total_bytes=sum(s.size for s in sources),
            quiet=quiet,
        )
        seconds = time.perf_counter() - start
        check_counts(counts, inputs, val_fraction)
        tokenizer.save(tmp / "tokenizer.json")
        meta = {
            **describe(tokenizer, counts),
            "split": split.describe(),
            # What was asked for, so a config can tell whether this data is what it wants.
            "request": request_of(inputs, vocab_size, tokenizer_path, val_fraction, text_field),
            "files": len(sources),
            # The tokenizer the shards were written with: one swapped in later is refused (_check_consistent).
            "tokenizer_sha256": fingerprint(tmp / "tokenizer.json"),
            "tokenizer_learned_from": None if tokenizer_path else sample.describe(),
            "seconds": {"tokenizer": round(tokenizer_seconds, 3), "total": round(seconds, 3)},
        }
        meta = publish(out, meta)
    except OSError as e:  # a shard or the tokenizer that cannot be written: the disk is full, say
        raise UsageError(f"{out}: write failed ({e.strerror or e})") from None
    finally:
        if not (tmp / COMPLETE).exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    if not quiet:
        report(meta, tokenizer, out)
    return meta


def check_preparable(
    inputs: Sequence[str],
    out: Path,
    val_fraction: float,
    shard_tokens: int = 100_000_000,
    tokenizer_path: str | None = None,
    overwrite: bool = False,
) -> list:
    """Everything that can refuse preparing `inputs` into `out` before anything is read or written (options,
    inputs that name nothing, an `out` that is not ours to fill); returns the inputs' sources (corpus.Source)."""
    check_options(val_fraction, shard_tokens, tokenizer_path)
    sources = resolve_inputs(inputs)
    _check_writable(out, overwrite)
    return sources


def check_options(val_fraction: float, shard_tokens: int, tokenizer_path: str | None) -> None:
    """Refuse options out of range, and a tokenizer path that names nothing, before anything is read."""
    if not 0 <= val_fraction < 1:
        raise UsageError(f"--val-fraction: must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0 or shard_tokens >= 1 << 31:
        raise UsageError(f"--shard-tokens: must be in [1, 2^31), got {shard_tokens}")
    if tokenizer_path and not os.path.exists(tokenizer_path):  # before anything is read: say how to get one
        raise UsageError(
            f"{tokenizer_path}: no such tokenizer file; save a model's, e.g. python -c \"from tokenizers import "
            f"Tokenizer; Tokenizer.from_pretrained('gpt2').save('{tokenizer_path}')\", or train one: leave "
            "data.tokenizer (--tokenizer) unset and give data.vocab_size (--vocab-size)"
        )


def _check_writable(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, someone else's folder, or prepared data without --overwrite."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    existing = sorted(p for pattern in PREPARED for p in out.glob(pattern))
    if existing:
        _refuse_foreign(out, existing[0].name)
    if existing and not overwrite:
        if not (out / "meta.json").exists():  # shards without their description: not data that can be used
            raise UsageError(
                f"{out}: holds {existing[0].name} but no meta.json (a damaged or unfinished "
                f"preparation); prepare it again: fasttrain prepare --out {out} --overwrite"
            )
        raise UsageError(f"{out}: already holds prepared data ({existing[0].name}); pass --overwrite to replace it")


def check_counts(counts: dict, inputs: Sequence[str], val_fraction: float) -> None:
    """Refuse a preparation with no training text, or no validation text when some was asked for."""
    if counts["tokens"]["train"] == 0 and counts["tokens"]["val"] > 0:  # every document was the first's text
        raise UsageError(
            f"{', '.join(inputs)}: every document went to validation (the first document's text is always validation, "
            "and identical documents stay in one split); give documents of other text, or --val-fraction 0"
        )
    if counts["tokens"]["train"] == 0:
        raise UsageError(f"{', '.join(inputs)}: no text found")
    if val_fraction > 0 and counts["tokens"]["val"] == 0:  # by the end of the text, with no line end after the cut
        raise UsageError(
            f"--val-fraction {val_fraction}: nothing was held out (one document, with no line end in its "
            "last part to cut at); give more text or documents (one per file or JSONL line) or --val-fraction 0"
        )


def describe(tokenizer: Tokenizer, counts: dict) -> dict:
    """meta.json's description of the tokenizer and of the shards `counts` (from write_shards) hold."""
    return {
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "token_dtype": token_dtype(tokenizer.vocab_size).name,
        **counts,
    }


def publish(out: Path, meta: dict) -> dict:
    """Write `meta` into out/.prepare-tmp, whose shards and tokenizer are complete, and move it all into place; returns
    what meta.json holds: `meta` and an identity of this preparation (PREPARATION), new each time, so that a resumed
    run names data prepared again since its save (checkpoint.prepared_again)."""
    tmp = out / TMP_NAME
    meta = {**meta, PREPARATION: uuid.uuid4().hex}
    try:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        fsync_tree(tmp)
        # From here on the new data is the data: a killed move is finished, not undone. The marker lists the
        # new files, so a finishing move knows which files in `out` are already new ones. Written atomically:
        # a marker is whole or absent.
        names = sorted(p.name for p in tmp.iterdir())
        write_atomically(tmp / COMPLETE, lambda f: f.write(json.dumps(names).encode()), "write the COMPLETE marker")
        fsync_tree(tmp)
        _move_into_place(out, names)
    except OSError as e:
        unfinished = (tmp / COMPLETE).exists()
        raise UsageError(
            f"{out}: write failed ({e.strerror or e})"
            + ("; prepare it again to finish moving the new data into place" if unfinished else "")
        ) from None
    return meta


def report(meta: dict, tokenizer: Tokenizer, out: Path) -> None:
    """The one line that says what was prepared (and a warning for unknown tokens)."""
    counts, seconds = meta["tokens"], meta["seconds"]["total"]
    n = counts["train"] + counts["val"]
    replaced, unknown = meta["invalid_utf8_replaced"], meta["unknown_tokens"]
    print(
        f"prepared {counts['train']:,} train + {counts['val']:,} val tokens "
        f"({meta['documents']['train']:,} + {meta['documents']['val']:,} documents, vocab {tokenizer.vocab_size}) "
        f"in {seconds:.1f}s, {n / max(seconds, 1e-9):,.0f} tokens/s -> {out}"
        + (f"; replaced {replaced:,} invalid UTF-8 sequences or lone surrogates with U+FFFD" if replaced else "")
        + runs_cut(meta["tokenizer_learned_from"])
    )
    # Like invalid UTF-8, counted; unlike it, the text is gone, not one character. (Only a tokenizer with an
    # unknown token makes unknown tokens.)
    if unknown and tokenizer.unk_id is not None:
        print(
            f"warning: {unknown:,} of the {n:,} tokens ({unknown / n:.1%}) are {tokenizer.source}'s unknown "
            f"token {tokenizer.tok.id_to_token(tokenizer.unk_id)}: text it cannot encode, lost from the data "
            "(meta.json's unknown_tokens); a byte-level BPE encodes any text"
        )


def runs_cut(learned_from: dict | None) -> str:
    """What the summary line says of the long runs cut from the tokenizer's sample (split.learning_pieces): nothing
    when none were (or the tokenizer was given, or learned before runs were cut)."""
    cut = (learned_from or {}).get("long_runs_cut", 0)
    if not cut:
        return ""
    return (
        f"; cut {cut:,} run{'s' if cut > 1 else ''} of over {LONGEST_RUN} characters (of whitespace, or without any) "
        "into pieces to learn the tokenizer; the shards hold the text whole"
    )


def default_workers() -> int:
    """Encoding threads when --workers is not given: the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def corpus_sample(sources: Sequence, text_field: str, chars: int = 200_000) -> list[str]:
    """The first `chars` of the corpus, the pieces the encoder check compares ids on (the last one cut short: one
    document of megabytes would otherwise be encoded twice over before the first shard is written)."""
    taken, total = [], 0
    for piece in islice(all_pieces(sources, text_field), 1000):
        taken.append(piece.text[: chars - total])
        total += len(taken[-1])
        if total >= chars:
            break
    return taken


def prepare(inputs: Sequence[str], out_dir: str | os.PathLike, **options: Any) -> dict:
    """Tokenize `inputs` into shards in `out_dir` and return the contents of its meta.json. The tokenizer is loaded from
    `tokenizer_path`, or a byte-level BPE of `vocab_size` tokens is learned from (up to `tokenizer_train_chars` of) the
    training split (`options`: `prepare_locked`'s keywords). Bad input is a `UsageError` that leaves `out_dir` as it
    was, as is a second process preparing it meanwhile."""
    if not os.fspath(out_dir):  # Path("") is the working directory
        raise UsageError("--out: is empty; name the directory to prepare into")
    out = Path(out_dir)
    busy = lambda holder: f"{out}: another prepare ({holder}) is writing it; wait for it to end"  # noqa: E731
    with holding(lock_path(out), busy):
        finish_interrupted_move(out, options.get("quiet", False))
        return prepare_locked(inputs, out, **options)


def lock_path(out: Path) -> Path:
    """The lock of preparing `out`: beside it, so that `out` itself can be created and removed."""
    out = out.absolute()
    return out.parent / f".{out.name}.prepare-lock"


def fsync_tree(directory: Path) -> None:
    """Flush `directory`'s files and the directory itself to disk (what a COMPLETE marker promises)."""
    for path in [*directory.iterdir(), directory]:
        sync_directory(path)  # a file's descriptor is fsynced the same way


def _move_into_place(out: Path, names: list[str]) -> None:
    """Replace `out`'s data by the complete preparation in out/.prepare-tmp (`names`): old meta.json first, the old
    files the new set lacks, the new files, meta.json last. Repeatable if killed."""
    tmp = out / TMP_NAME
    waiting = sorted((p for p in tmp.iterdir() if p.name in names), key=lambda p: p.name == "meta.json")
    if waiting:  # a finished move has moved meta.json last: then the directory's meta.json is the new one
        (out / "meta.json").unlink(missing_ok=True)
    for old in (p for pattern in PREPARED for p in out.glob(pattern)):
        if old.name not in names:
            old.unlink()
    for p in waiting:
        os.replace(p, out / p.name)
    shutil.rmtree(tmp)


def finish_interrupted_move(out: Path, quiet: bool) -> None:
    """Finish the move a killed prepare left in out/.prepare-tmp; a COMPLETE marker that is no list of names was never
    followed by a move, so the preparation is discarded, said in one line."""
    marker = out / TMP_NAME / COMPLETE
    if not marker.exists():
        return
    try:
        try:
            names = json.loads(marker.read_text())
        except ValueError:
            names = None
        if isinstance(names, list) and all(isinstance(n, str) and "/" not in n for n in names):
            _move_into_place(out, names)
            return
        shutil.rmtree(out / TMP_NAME)
    except OSError as e:
        raise UsageError(f"{out}: cannot finish moving the data prepared there into place ({e.strerror})") from None
    if not quiet:
        print(
            f"note: {marker}: damaged, so the move it marks never started; discarded that unfinished "
            f"preparation ({out} holds its earlier data as it was)"
        )


def _refuse_foreign(out: Path, prepared_name: str) -> None:
    """Refuse to write into `out` (its `prepared_name` named like prepare's files) when it holds no meta.json and files
    prepare never writes (a model's config.json, say): they are not prepare's to replace."""
    if _is_prepare_meta(out / "meta.json"):
        return
    others = sorted(
        p.name
        for p in out.iterdir()
        if not p.name.startswith(".") and not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in PREPARED)
    )
    if others:
        raise UsageError(
            f"{out}: not a prepared folder (no meta.json of prepare's; it holds {others[0]}), so its "
            f"{prepared_name} is not prepare's to replace; prepare into another directory"
        )


def _is_prepare_meta(path: Path) -> bool:
    """Whether `path` is a meta.json prepare wrote (a JSON object with its "request"), damaged values or not."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "request" in meta


def request_of(
    inputs: Sequence[str], vocab_size: int, tokenizer_path: str | None, val_fraction: float, text_field: str
) -> dict:
    """What was asked for, paths made absolute: what they name must not depend on where the run started."""
    request = {
        "inputs": [_absolute(i) for i in inputs],
        "tokenizer": _absolute(tokenizer_path) if tokenizer_path else None,
        "vocab_size": None if tokenizer_path else vocab_size,
        "val_fraction": val_fraction,
    }
    if text_field != "text":  # recorded only when it is not the default, so earlier caches keep their keys
        request["text_field"] = text_field
    return request


def _absolute(spec: str) -> str:
    """An input or tokenizer path made absolute (relative to the working directory); builtin: specs as they are."""
    return spec if spec.startswith("builtin:") else os.path.abspath(spec)
