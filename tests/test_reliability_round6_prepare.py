"""Issue 59 (reliability, round six), prepare: lone surrogates replaced and counted as invalid UTF-8 is, in every
source and however the work is divided; a whitespace-free document learned from in time linear in its length;
and --merge, --part and --learn-tokenizer-only refusing the options they would ignore. Each case runs
`python -m fasttrain.prepare` (its `main` by `run_cli`, or a process), and each failed before its fix."""

from __future__ import annotations

import json
import os
import random
import re
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fasttrain import prepare
from fasttrain.system.errors import run_cli
from tests.conftest import HANG_SECONDS
from tests.test_prepare import documents_in, shard_tokens

REPO = Path(__file__).resolve().parents[1]

# JSONL lines as a web crawl writes them: JSON escapes of lone surrogates (valid JSON, no valid text), and a
# proper pair, which is one character.
SURROGATE_LINES = [
    r'{"text": "bad \ud800 x"}',  # 1 lone surrogate
    r'{"text": "two \udfff\ud800 halves, in the wrong order"}',  # 2
    r'{"text": "a pair \ud83d\ude00 is one character"}',  # 0
]
SURROGATE_TEXTS = ["bad \ufffd x", "two \ufffd\ufffd halves, in the wrong order", "a pair \U0001f600 is one character"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m fasttrain.prepare argv`."""
    with pytest.raises(SystemExit) as done:
        run_cli(prepare.main, argv)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def all_documents(out: Path) -> list[str]:
    return documents_in(out, "train") + (documents_in(out, "val") if shard_tokens(out, "val").size else [])


def crawl(directory: Path) -> list[str]:
    """A JSONL file of 40 documents, one in four holding two lone surrogate escapes (20 in all, in lines all over
    the file, so in every part of 2), and a text file with 20 invalid UTF-8 sequences: 40 replaced in all."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        SURROGATE_LINES[1][:-2] + f' {i}"}}' if i % 4 == 0 else json.dumps({"text": f"document {i} of words " * 15})
        for i in range(40)
    ]
    (directory / "crawl.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "page.txt").write_bytes(b"a page \xff with \xc3 two bad bytes " * 10)
    return [str(directory / "crawl.jsonl"), str(directory / "page.txt")]


@pytest.mark.parametrize("tokenizer", ["learned", "given"])
def test_a_lone_surrogate_is_replaced_and_counted_as_invalid_utf8_is(tokenizer, pydoc_data, tmp_path, capsys):
    """Learning a tokenizer from a JSONL file holding \\ud800 ended in a UnicodeEncodeError traceback; encoding it
    with --tokenizer was a one-line error blaming the tokenizer. Now each becomes U+FFFD, counted."""
    lines = [json.dumps({"text": f"plain document {i} " * 10}) for i in range(6)] + SURROGATE_LINES
    (tmp_path / "crawl.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "page.txt").write_bytes(b"one invalid byte \xff here " * 5)
    how = ["--vocab-size", "300"] if tokenizer == "learned" else ["--tokenizer", str(pydoc_data / "tokenizer.json")]
    args = ["--input", str(tmp_path / "crawl.jsonl"), str(tmp_path / "page.txt"), "--out", str(tmp_path / "out")]
    code, out, err = run([*args, *how, "--val-fraction", "0.3"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["invalid_utf8_replaced"] == 1 + 2 + 5  # 3 surrogates, 5 bad bytes
    assert "replaced 8 invalid UTF-8 sequences or lone surrogates with U+FFFD" in out
    documents = all_documents(tmp_path / "out")
    assert all(text in documents for text in SURROGATE_TEXTS)
    if tokenizer == "learned":  # the learned tokenizer encodes what it learned from: nothing is lost
        assert "".join(documents).count("\ufffd") == 8


def test_parquet_with_invalid_utf8_is_replaced_and_counted(tmp_path, capsys):
    """A Parquet file written by another tool can hold invalid UTF-8 in a string column: pyarrow's decoding raised
    a UnicodeDecodeError traceback; now it is read as a text file is."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [b"good text " * 20, b"bad \xff byte " * 3, b"an encoded surrogate \xed\xa0\x80 too", b"more good " * 20]
    raw = pa.array(rows, type=pa.binary())
    pq.write_table(
        pa.table({"text": pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())}), tmp_path / "t.parquet"
    )
    args = ["--input", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "out"), "--vocab-size", "300"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["invalid_utf8_replaced"] == 3 + 3  # each \xff, and the surrogate's 3 bytes as UTF-8 decoders count
    assert "bad \ufffd byte " * 3 in all_documents(tmp_path / "out")


def test_the_replaced_count_is_the_same_for_any_workers_and_summed_over_parts(tmp_path, capsys):
    """One prepare, one with 2 workers, and 2 parts (tokenizer learned with --learn-tokenizer-only, which met the
    surrogates too) merged: the same tokens and the same count, the parts' counts summed."""
    inputs = crawl(tmp_path / "in")
    metas = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        code, _, err = run(["--input", *inputs, "--out", str(out), "--vocab-size", "400", "--workers", workers], capsys)
        assert code == 0, err
        metas[workers] = json.loads((out / "meta.json").read_text())
    out = tmp_path / "parts"
    code, _, err = run(["--input", *inputs, "--out", str(out), "--learn-tokenizer-only", "--vocab-size", "400"], capsys)
    assert code == 0, err
    parts = []
    for k in range(2):
        code, _, err = run(["--input", *inputs, "--out", str(out), "--part", f"{k}/2", "--workers", "1"], capsys)
        assert code == 0, err
        parts.append(json.loads((out / "parts" / f"{k}-of-2" / "part.json").read_text())["invalid_utf8_replaced"])
    code, merged, err = run(["--out", str(out), "--merge"], capsys)
    assert code == 0, err
    metas["parts"] = json.loads((out / "meta.json").read_text())
    assert all(p > 0 for p in parts) and sum(parts) == 40  # each part met some
    for meta in metas.values():
        assert meta["invalid_utf8_replaced"] == 40 and meta["tokens"] == metas["1"]["tokens"]
    for split in ("train", "val"):
        assert (shard_tokens(out, split) == shard_tokens(tmp_path / "w1", split)).all()
    assert "replaced 40 invalid UTF-8 sequences or lone surrogates" in merged


def test_learning_pieces_cut_every_long_run_and_nothing_else():
    from fasttrain.preparation.split import LONGEST_RUN, learning_pieces

    rng = random.Random(0)
    runs = [(" \n\t\u3000" if i % 2 else string.ascii_letters + "=9") for i in range(60)]
    text = "".join("".join(rng.choices(chars, k=rng.choice([1, 7, 511, 512, 513, 1024, 1025, 3000]))) for chars in runs)
    pieces, cut = learning_pieces(text)
    assert "".join(pieces) == text
    assert cut == sum(len(m[0]) > LONGEST_RUN for m in re.finditer(r"\S+|\s+", text)) > 0
    assert max(len(m[0]) for piece in pieces for m in re.finditer(r"\S+|\s+", piece)) <= LONGEST_RUN
    assert learning_pieces("x" * LONGEST_RUN) == (["x" * LONGEST_RUN], 0)


def blob(chars: int) -> str:
    """`chars` random letters: one pre-token of the trainer's split (what a hex-free blob or a DNA read is)."""
    return "".join(random.choices(string.ascii_letters, k=chars))


def long_runs_corpus(directory: Path, letters: int) -> tuple[list[str], list[str]]:
    """(inputs, their documents): a few of words, one of `letters` letters without a space, and one with a rule of
    '=' and a run of spaces of 100K characters each: 3 runs over LONGEST_RUN."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = [f"document {i} of words " * 30 for i in range(4)]
    docs += [blob(letters), "a rule\n" + "=" * 100_000 + "\n" + " " * 100_000 + "end"]
    (directory / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return [str(directory / "docs.jsonl")], docs


def test_a_whitespace_free_document_is_learned_from_in_linear_time(tmp_path, capsys):
    """Learning from one word of 500K letters and runs of 100K '=' and spaces took this prepare a minute here (time
    growing with the square of the longest; 3M letters, some 20 minutes); now they are cut into 512-character pieces for
    learning (1 s), said in the summary, and the shards still hold every document whole."""
    inputs, docs = long_runs_corpus(tmp_path / "in", 500_000)
    start = time.perf_counter()
    code, out, err = run(["--input", *inputs, "--out", str(tmp_path / "out"), "--val-fraction", "0"], capsys)
    seconds = time.perf_counter() - start
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tokenizer_learned_from"]["long_runs_cut"] == 3
    assert "cut 3 runs of over 512 characters (of whitespace, or without any) into pieces" in out
    assert documents_in(tmp_path / "out", "train") == docs  # lossless: the cut is the learning's alone
    assert seconds < 15, seconds  # about 1 s here, 2 cores shared


@pytest.mark.second_tier
@pytest.mark.subprocess
def test_a_multi_megabyte_single_token_document_prepares_in_seconds(tmp_path):
    """4M letters without a space, and --learn-tokenizer-only on them: each in seconds (12 s and 8 s here, on 2
    shared cores), where learning from them took half an hour or more before."""
    inputs, docs = long_runs_corpus(tmp_path / "in", 4_000_000)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "fasttrain.prepare", "--input", *inputs, "--val-fraction", "0"]
    for how in (["--out", str(tmp_path / "out")], ["--out", str(tmp_path / "parts"), "--learn-tokenizer-only"]):
        start = time.perf_counter()
        done = subprocess.run([*command, *how], env=env, capture_output=True, text=True, timeout=HANG_SECONDS)
        assert done.returncode == 0, done.stderr
        assert "cut 3 runs of over 512 characters" in done.stdout, done.stdout
        assert time.perf_counter() - start < 120
    assert documents_in(tmp_path / "out", "train") == docs


def parts_of(inputs: list[str], out: Path, tokenizer: Path, capsys) -> None:
    for k in range(2):
        code, _, err = run(
            ["--input", *inputs, "--out", str(out), "--part", f"{k}/2", "--tokenizer", str(tokenizer)], capsys
        )
        assert code == 0, err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "mode, options, refused",
    [
        (
            ["--merge"],
            ["--input", "x.jsonl", "--val-fraction", "0.2", "--vocab-size", "300"],
            "--input, --vocab-size, --val-fraction",
        ),
        (["--merge"], ["--val-fraction", "0.1"], "--val-fraction"),  # the default's value, still not taken
        (["--merge"], ["--workers", "2", "--overwrite"], "--overwrite, --workers"),
        (["--part", "0/2"], ["--vocab-size", "300"], "--vocab-size"),
        (["--part", "1/2"], ["--overwrite"], "--overwrite"),
        (["--learn-tokenizer-only"], ["--shard-tokens", "1000", "--workers", "1"], "--shard-tokens, --workers"),
    ],
)
def test_a_mode_refuses_the_options_it_does_not_take(mode, options, refused, pydoc_data, tmp_path, capsys):
    """--merge ignored --input, --val-fraction and --vocab-size (and --part its --vocab-size): each is now a
    one-line error naming them, exit 2, the parts as they were; with only what it takes, the merge still works."""
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    inputs, out = [str(tmp_path / "docs.jsonl")], tmp_path / "out"
    parts_of(inputs, out, pydoc_data / "tokenizer.json", capsys)
    before = snapshot(out)
    given = ["--input", *inputs] if "--merge" not in mode and "--input" not in options else []
    code, _, err = run([*given, "--out", str(out), *mode, *options], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{mode[0]}: does not take {refused}; it takes only --out" in err, err
    assert snapshot(out) == before
    code, _, err = run(["--out", str(out), "--merge"], capsys)
    assert code == 0 and (out / "meta.json").exists() and not (out / "parts").exists(), err
