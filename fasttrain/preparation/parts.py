"""Preparing one corpus on many machines: N parts, each prepared alone, then merged into one folder.

Imports from fasttrain: formats.shards, formats.tokenizer, preparation.corpus, preparation.pipeline,
preparation.preparation, preparation.split, system.errors, system.run_lock.

    fasttrain prepare --input ... --out DIR --learn-tokenizer-only --vocab-size V   # once, if none is given
    fasttrain prepare --input ... --out DIR --part K/N [--tokenizer T]              # K = 0 .. N-1, anywhere
    fasttrain prepare --out DIR --merge                                            # once all N are done

Part K takes the documents that start in the K-th N-th of the inputs' bytes end to end (a JSONL file cut between lines,
any other file whole in the part of its first byte), so every document is in exactly one part, in the inputs' order. The
split and the tokenizer's sample go by each document's own text (split.py), so the merged parts hold what one prepare of
the same inputs would.

A part writes into DIR/parts/.K-of-N.tmp, renamed DIR/parts/K-of-N once complete (a killed part's .tmp is reported by
the merge and replaced by a re-run), with its shards, tokenizer.json and part.json (the inputs' identity, the
tokenizer's sha256, the options, its counts), under DIR/parts/.K-of-N.lock. The merge holds every part's lock and DIR's,
checks all N are there, complete and made alike, links the shards into DIR under the names one prepare would give,
writes meta.json through prepare's complete-then-move, and removes DIR/parts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from contextlib import ExitStack
from itertools import chain
from pathlib import Path
from typing import Iterator, Sequence

from fasttrain.formats.shards import SPLITS
from fasttrain.formats.tokenizer import Tokenizer, fingerprint
from fasttrain.preparation import preparation as prep
from fasttrain.preparation.corpus import Piece, Source, resolve_inputs
from fasttrain.preparation.pipeline import write_shards
from fasttrain.preparation.split import Sample, plan_split, split_pieces, tokenizer_sample
from fasttrain.system.errors import UsageError
from fasttrain.system.run_lock import holding

PARTS = "parts"
LEARNED = "tokenizer.json"  # in DIR/parts: the tokenizer --learn-tokenizer-only learned for every part
LEARNED_META = "tokenizer-meta.json"
MANIFEST = "part.json"
_NAME = re.compile(r"(\d+)-of-(\d+)")


def parse_part(spec: str) -> tuple[int, int]:
    """K/N as given to --part: K in [0, N), N >= 1."""
    match = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise UsageError(f"--part {spec}: expected K/N with 0 <= K < N (part K of N, counted from 0), e.g. 0/4")
    return int(match[1]), int(match[2])


def share(sources: Sequence[Source], k: int, n: int) -> list[tuple[Source, int, int | None]]:
    """Part k of n's (source, start, end): the documents starting in bytes [k/n, (k+1)/n) of all the
    inputs end to end; a file that is not JSONL goes whole to the part holding its first byte."""
    total = sum(s.size for s in sources)
    lo, hi = k * total // n, (k + 1) * total // n
    taken, offset = [], 0
    for src in sources:
        first, last = offset, offset + src.size
        if src.divisible:
            start, end = max(lo, first), min(hi, last)
            if start < end:
                taken.append((src, start - first, end - first if end < last else None))
        elif lo <= first < hi or (k == n - 1 and first >= total):
            taken.append((src, 0, None))
        offset = last
    return taken


def identity(sources: Sequence[Source]) -> list[dict]:
    """What the inputs were, to tell whether parts read the same files: paths, sizes and modification times."""

    def one(src: Source) -> dict:
        if src.name.startswith("builtin:"):
            return {"path": src.name, "python": sys.version.split()[0]}
        st = os.stat(src.name)
        return {"path": os.path.abspath(src.name), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    return [one(s) for s in sources]


def _lock(out: Path, k: int, n: int) -> Path:
    return out / PARTS / f".{k}-of-{n}.lock"


def _refuse_merged(out: Path, what: str) -> None:
    if (out / "meta.json").exists():
        raise UsageError(
            f"{what}: {out} already holds prepared data (merged, or prepared whole); it is "
            "not changed: prepare the parts into another --out"
        )


def learn_tokenizer(
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    val_fraction: float,
    text_field: str,
    tokenizer_train_chars: int = 200_000_000,
    quiet: bool = False,
) -> Path:
    """Learn the BPE every part will use, from the training split's sample spread over all the inputs, into
    DIR/parts/tokenizer.json (with what it learned from beside it). Returns its path."""
    out = Path(out_dir)
    prep.check_options(val_fraction, 1, None)
    sources = resolve_inputs(inputs)
    _refuse_merged(out, "--learn-tokenizer-only")
    start = time.perf_counter()
    split = plan_split(sources, text_field, val_fraction)
    sample = Sample()
    tokenizer = Tokenizer.train(tokenizer_sample(sources, text_field, split, tokenizer_train_chars, sample), vocab_size)
    parts = out / PARTS
    with holding(parts / ".tokenizer.lock", lambda h: f"{parts}: another prepare ({h}) is learning its tokenizer"):
        tokenizer.save(parts / LEARNED)
        learned = {
            "request": prep.request_of(inputs, vocab_size, None, val_fraction, text_field),
            "learned_from": sample.describe(),
            "seconds": round(time.perf_counter() - start, 3),
        }
        (parts / LEARNED_META).write_text(json.dumps(learned, indent=2) + "\n")
    if not quiet:
        print(
            f"learned a BPE of {tokenizer.vocab_size} tokens from {sample.chars:,} characters of "
            f"{sample.documents:,} documents in {sample.files} files -> {parts / LEARNED}"
            + prep.runs_cut(sample.describe())
        )
    return parts / LEARNED


def prepare_part(
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    k: int,
    n: int,
    *,
    tokenizer_path: str | None = None,
    val_fraction: float = 0.1,
    shard_tokens: int = 100_000_000,
    text_field: str = "text",
    batch_chars: int = 1_000_000,
    workers: int = 0,
    quiet: bool = False,
) -> dict:
    """Prepare part k of n of `inputs` into DIR/parts/k-of-n; returns its manifest."""
    out, name = Path(out_dir), f"part {k}/{n}"
    prep.check_options(val_fraction, shard_tokens, tokenizer_path)
    parts = out / PARTS
    learned, learned_from = (None, None) if tokenizer_path else _learned_request(out, name)
    sources = resolve_inputs(inputs)
    request = _part_request(inputs, learned, name, parts, tokenizer_path, val_fraction, text_field)
    _refuse_merged(out, name)  # before the lock, which would make DIR/parts again
    busy = lambda holder: f"{name}: another prepare ({holder}) is writing it; wait for it to end"  # noqa: E731
    with holding(_lock(out, k, n), busy):
        _refuse_merged(out, name)
        final, tmp = parts / f"{k}-of-{n}", parts / f".{k}-of-{n}.tmp"
        if final.exists():
            raise UsageError(f"{name}: already complete in {final}; remove that folder to prepare it again")
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's: begun again
        tmp.mkdir(parents=True)
        try:
            start = time.perf_counter()
            tokenizer = Tokenizer.load(tokenizer_path or parts / LEARNED)
            split = plan_split(sources, text_field, val_fraction)  # the whole input's: the same in every part
            taken = share(sources, k, n)
            pieces: Iterator[Piece] = chain.from_iterable(s.pieces(text_field, a, b) for s, a, b in taken)
            counts = write_shards(
                tmp,
                split_pieces(pieces, split),
                tokenizer,
                prep.corpus_sample(sources, text_field),
                shard_tokens=shard_tokens,
                batch_chars=batch_chars,
                workers=workers or prep.default_workers(),
                total_bytes=sum(s.size for s, _, _ in taken),
                quiet=quiet,
            )
            tokenizer.save(tmp / "tokenizer.json")
            manifest = {
                "part": k,
                "parts": n,
                **counts,
                "inputs": identity(sources),
                "files": len(taken),
                "tokenizer_sha256": fingerprint(tmp / "tokenizer.json"),
                "request": request,
                "shard_tokens": shard_tokens,
                "split": split.describe(),
                "tokenizer_learned_from": learned_from,
                "seconds": round(time.perf_counter() - start, 3),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            prep.fsync_tree(tmp)
            os.rename(tmp, final)
        except OSError as e:
            raise UsageError(f"{name}: write failed in {tmp} ({e.strerror or e}); run the part again") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        t = counts["tokens"]
        print(
            f"{name}: {t['train']:,} train + {t['val']:,} val tokens from {len(taken)} inputs in "
            f"{manifest['seconds']:.1f}s -> {final}"
        )
    return manifest


def _part_request(
    inputs: Sequence[str],
    learned: dict | None,
    name: str,
    parts: Path,
    tokenizer_path: str | None,
    val_fraction: float,
    text_field: str,
) -> dict:
    """What part `name` records it was asked for: the request of the tokenizer learned in `parts` (`learned`),
    UsageError unless these inputs and options are the ones it was learned for; else the one they make."""
    if learned is None:
        return prep.request_of(inputs, 0, tokenizer_path, val_fraction, text_field)
    if {**learned, "vocab_size": 0} != {**prep.request_of(inputs, 0, None, val_fraction, text_field)}:
        raise UsageError(
            f"{name}: {parts / LEARNED} was learned from other inputs or options "
            f"({json.dumps(learned)[:120]}); learn it again for these"
        )
    return learned


def _learned_request(out: Path, name: str) -> tuple[dict, dict]:
    """What the tokenizer --learn-tokenizer-only learned in `out`/parts was asked for (its request) and the
    sample it learned from, as its tokenizer-meta.json records them, for part `name`; UsageError if there is no
    such tokenizer or the record cannot be read."""
    parts = out / PARTS
    if not (parts / LEARNED).is_file():
        raise UsageError(
            f"{name}: no tokenizer; every part needs the same one: give --tokenizer, or learn one first, once: "
            f"fasttrain prepare --input ... --out {out} --learn-tokenizer-only --vocab-size N"
        )
    try:
        learned = json.loads((parts / LEARNED_META).read_text())
        return learned["request"], learned["learned_from"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"{name}: {parts / LEARNED_META} unreadable ({type(e).__name__}); learn the tokenizer "
            "again with --learn-tokenizer-only"
        ) from None


# What every part must agree on, with how a disagreement is named.
_SAME = (
    ("inputs", "other inputs"),
    ("tokenizer_sha256", "another tokenizer"),
    ("request", "other options"),
    ("shard_tokens", "other options"),
    ("split", "another split"),
)


def merge(out_dir: str | os.PathLike, *, quiet: bool = False) -> dict:
    """Merge DIR/parts' N complete parts into DIR's one prepared folder; returns its meta.json."""
    out = Path(out_dir)
    parts = out / PARTS
    busy = lambda holder: f"{out}: another prepare ({holder}) is writing it; wait for it to end"  # noqa: E731
    with holding(prep.lock_path(out), busy), ExitStack() as locks:
        prep.finish_interrupted_move(out, quiet)
        _refuse_merged(out, "--merge")
        n = _count_parts(parts)
        for k in range(n):  # no part is being written while the merge reads it, nor starts before it ends
            written = lambda h, k=k: f"part {k}/{n}: still being written ({h}); merge once it has ended"  # noqa: E731
            locks.enter_context(holding(_lock(out, k, n), written))
        manifests = [_read_part(parts, k, n) for k in range(n)]
        for m in manifests[1:]:
            for key, what in _SAME:
                if _compared(m, key) != _compared(manifests[0], key):
                    raise UsageError(
                        f"part {m['part']}/{n}: made from {what} than part 0/{n} "
                        f"({_difference(_compared(m, key), _compared(manifests[0], key), key)}); "
                        "prepare it again like the others"
                    )
        first = manifests[0]
        counts = {
            key: {s: sum(m[key][s] for m in manifests) for s in SPLITS} for key in ("tokens", "documents", "text_bytes")
        }
        request = first["request"]
        prep.check_counts(counts, request["inputs"], request["val_fraction"])
        tmp = out / prep.TMP_NAME
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            names: dict[str, list[str]] = {s: [] for s in SPLITS}
            for m in manifests:  # linked, not moved: the parts stay whole until the merge is complete
                for s in SPLITS:
                    for shard in m["shards"][s]:
                        names[s].append(f"{s}_{len(names[s]):06d}.bin")
                        os.link(parts / f"{m['part']}-of-{n}" / shard, tmp / names[s][-1])
            shutil.copyfile(parts / f"0-of-{n}" / "tokenizer.json", tmp / "tokenizer.json")
            tokenizer = Tokenizer.load(tmp / "tokenizer.json")
            meta = {
                **prep.describe(tokenizer, {**counts, "shards": names}),
                "split": first["split"],
                "request": request,
                "files": len(first["inputs"]),
                "invalid_utf8_replaced": sum(m["invalid_utf8_replaced"] for m in manifests),
                "unknown_tokens": sum(m["unknown_tokens"] for m in manifests),
                "encoder": "+".join(sorted({m["encoder"] for m in manifests})),
                "tokenizer_sha256": first["tokenizer_sha256"],
                "tokenizer_learned_from": first["tokenizer_learned_from"],
                "parts": n,
                "seconds": {"parts": [m["seconds"] for m in manifests], "total": sum(m["seconds"] for m in manifests)},
            }
            meta = prep.publish(out, meta)
        except OSError as e:
            raise UsageError(
                f"{out}: merge failed ({e.strerror or e}); the parts are as they were, merge again"
            ) from None
        finally:
            if not (tmp / prep.COMPLETE).exists():
                shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(parts)  # its shards are linked into DIR now
    if not quiet:
        prep.report(meta, tokenizer, out)
    return meta


def _compared(manifest: dict, key: str) -> object:
    """A manifest's `key` as parts must agree on it: the tokenizer by its sha256, not the path it had."""
    value = manifest[key]
    return {k: v for k, v in value.items() if k != "tokenizer"} if key == "request" else value


def _difference(value: object, first: object, key: str) -> str:
    """The first thing that differs between a part's `value` of `key` and part 0's `first`, in a few words."""
    if isinstance(value, dict) and isinstance(first, dict):
        for sub in sorted(set(value) | set(first)):
            if value.get(sub) != first.get(sub):
                return _difference(value.get(sub), first.get(sub), f"{key}.{sub}")
    if isinstance(value, list) and isinstance(first, list) and len(value) == len(first):
        for a, b in zip(value, first):
            if a != b:
                return _difference(a, b, key)
    return f"{key} {json.dumps(value)[:60]}, not {json.dumps(first)[:60]}"


def _count_parts(parts: Path) -> int:
    """N, from the part folders (finished or not) in DIR/parts; they must all say the same."""
    found = {
        int(m[2])
        for p in (parts.iterdir() if parts.is_dir() else ())
        if (m := _NAME.fullmatch(p.name.removeprefix(".").removesuffix(".tmp")))
    }
    if not found:
        raise UsageError(f"--merge: {parts}: no parts there; prepare them first with --part K/N")
    if len(found) > 1:
        raise UsageError(
            f"--merge: {parts}: holds parts of {' and of '.join(map(str, sorted(found)))}; keep one "
            "division (remove the other's folders)"
        )
    return found.pop()


def _read_part(parts: Path, k: int, n: int) -> dict:
    """Part k's manifest, if the part is complete."""
    folder = parts / f"{k}-of-{n}"
    if not folder.is_dir():
        command = f"fasttrain prepare --input ... --out {parts.parent} --part {k}/{n}"
        if (parts / f".{k}-of-{n}.tmp").exists():
            raise UsageError(f"part {k}/{n}: unfinished (killed while it ran); run it again: {command}")
        raise UsageError(f"part {k}/{n}: missing; run it: {command}")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(
            f"part {k}/{n}: {folder / MANIFEST} unreadable ({type(e).__name__}); run the part again"
        ) from None
    for s in SPLITS:
        for shard in manifest["shards"][s]:
            if not (folder / shard).is_file():
                raise UsageError(f"part {k}/{n}: {folder / shard} is missing; run the part again")
    return manifest
