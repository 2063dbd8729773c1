"""Preparation: corpus reading, tokenizer, shard format, splits, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

import fasttrain.preparation.corpus as corpus
from fasttrain.config import DataConfig, load_config, resolve, save_config
from fasttrain.formats.shards import HEADER_BYTES, MAGIC, VERSION, ShardWriter, read_header
from fasttrain.formats.tokenizer import EOT, Tokenizer
from fasttrain.preparation.cache import ensure_prepared
from fasttrain.preparation.preparation import prepare
from fasttrain.preparation.split import document_hash
from fasttrain.prepare import main
from fasttrain.system.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def shard_tokens(directory: Path, split: str) -> np.ndarray:
    infos = [read_header(p) for p in sorted(directory.glob(f"{split}_*.bin"))]
    return np.concatenate([np.fromfile(i.path, dtype=i.dtype, offset=HEADER_BYTES) for i in infos]).astype(np.int64)


def documents_in(directory: Path, split: str) -> list[str]:
    """Decode a split back into its documents: each one starts with the end-of-text token."""
    tok = Tokenizer.load(directory / "tokenizer.json")
    tokens = shard_tokens(directory, split)
    starts = np.flatnonzero(tokens == tok.eot_id)
    assert starts.size and starts[0] == 0
    return [tok.decode(doc[1:]) for doc in np.split(tokens, starts[1:])]


def test_embedded_corpus_round_trips(pydoc_data):
    from pydoc_data.topics import topics

    train, val = documents_in(pydoc_data, "train"), documents_in(pydoc_data, "val")
    assert sorted(train + val) == sorted(topics.values())  # every document, exactly, in one split
    meta = json.loads((pydoc_data / "meta.json").read_text())
    assert meta["documents"] == {"train": len(train), "val": len(val)}
    assert meta["tokens"] == {s: shard_tokens(pydoc_data, s).size for s in ("train", "val")}
    # Each document by the hash of its text, the first always held out, the second always kept.
    ordered = [topics[k] for k in sorted(topics)]
    assert val == [d for i, d in enumerate(ordered) if i == 0 or (i != 1 and document_hash(d)[0] < 0.1)]
    assert meta["split"]["by"] == "document_hash" and 5 <= len(val) <= 12
    assert meta["vocab_size"] == 512 and meta["token_dtype"] == "uint16"


def test_stdlib_docstrings_corpus():
    first = list(islice(corpus.resolve_inputs(["builtin:docstrings"])[0].pieces(), 3))
    assert len(first) == 3 and all(p.ends_document and p.text for p in first)
    assert first[0].text.startswith("Record of phased-in incompatible language changes")  # __future__


def test_stdlib_sources_corpus():
    """A document per module, its whole source, the tests left out; the progress size is the files' bytes."""
    (source,) = corpus.resolve_inputs(["builtin:sources"])
    modules, root = corpus._stdlib_modules(), Path(sysconfig.get_paths()["stdlib"])
    assert any(p.name == "ast.py" for p in modules)
    left_out = {"test", "idlelib", "site-packages", "pydoc_data"}  # pydoc_data: builtin:pydoc's topics again
    assert not any(left_out & set(p.relative_to(root).parts) for p in modules)
    first = list(islice(source.pieces(), 2))
    assert all(p.ends_document for p in first)
    assert first[0].text == modules[0].read_bytes().decode()  # the bytes as they are, line ends untranslated
    assert source.size == sum(p.stat().st_size for p in modules)


def test_shard_header(pydoc_data):
    path = pydoc_data / "train_000000.bin"
    header = np.fromfile(path, dtype="<i4", count=256)
    tokens = shard_tokens(pydoc_data, "train")
    assert list(header[:6]) == [MAGIC, VERSION, tokens.size, 2, 512, tokens.max() + 1]
    assert not header[6:].any()
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size


def test_wide_vocabularies_use_uint32(tmp_path):
    with ShardWriter(tmp_path / "s.bin", vocab_size=1 << 16) as w:
        w.write(np.array([65535]))
    with ShardWriter(tmp_path / "t.bin", vocab_size=(1 << 16) + 1) as w:
        w.write(np.array([65536, 3]))
    assert read_header(tmp_path / "s.bin").dtype == np.uint16
    info = read_header(tmp_path / "t.bin")
    assert info.dtype == np.uint32 and info.num_tokens == 2 and info.id_bound == 65537
    assert np.fromfile(tmp_path / "t.bin", dtype=np.uint32, offset=HEADER_BYTES).tolist() == [65536, 3]


def test_shard_writer_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "train_000000.bin", 512) as w:
            w.write(np.arange(10))
            raise RuntimeError("crash mid-shard")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain ascii",
        "héllo wörld — ünïcödé",
        "tabs\tand\n\nnewlines\r\n",
        "emoji 😀🚀 and CJK 漢字",
        "  leading and trailing spaces  ",
        "\x00\x01 control",
        EOT + " the special token as text",
    ],
)
def test_tokenizer_round_trip(pydoc_data, text):
    tok = Tokenizer.load(pydoc_data / "tokenizer.json")
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_vocab_and_errors(tmp_path):
    tok = Tokenizer.train(["some text to learn from " * 50, "and another document"], vocab_size=300)
    assert tok.vocab_size <= 300 and tok.tok.token_to_id(EOT) == tok.eot_id
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not a valid tokenizer.json"):
        Tokenizer.load(bad)
    no_eot = json.loads(tok.tok.to_str())
    no_eot["added_tokens"] = []
    no_eot["model"]["vocab"].pop(EOT)
    bad.write_text(json.dumps(no_eot))
    with pytest.raises(UsageError, match="no end-of-text token"):
        Tokenizer.load(bad)


def test_files_directories_globs_and_jsonl(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs = {f"doc {i}: " + "lorem ipsum dolor sit amet " * (i + 1) for i in range(12)}
    ordered = sorted(docs)
    for i, d in enumerate(ordered[:4]):
        (src / f"a{i}.txt").write_text(d)
    for i, d in enumerate(ordered[4:8]):
        (src / "sub" / f"b{i}.md").write_text(d)
    (src / "sub" / "ignored.bin").write_bytes(b"\xff\xfe not text")
    with open(tmp_path / "docs.jsonl", "w") as f:
        for d in ordered[8:]:
            f.write(json.dumps({"id": 1, "body": d}) + "\n\n")
    out = tmp_path / "out"
    meta = prepare(
        [str(src / "a*.txt"), str(src / "sub"), str(tmp_path / "docs.jsonl")],
        out,
        vocab_size=300,
        val_fraction=0.2,
        text_field="body",
        quiet=True,
    )
    assert meta["files"] == 4 + 4 + 1
    assert set(documents_in(out, "train") + documents_in(out, "val")) == docs
    assert meta["documents"]["val"] >= 1 and meta["invalid_utf8_replaced"] == 0


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good text \xff\xfe then more \xc3 and a real \xef\xbf\xbd here")
    (tmp_path / "b.txt").write_text("a second document " * 20)
    meta = prepare(
        [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
        tmp_path / "out",
        vocab_size=300,
        val_fraction=0.5,
        quiet=True,
    )
    assert meta["invalid_utf8_replaced"] == 3
    texts = documents_in(tmp_path / "out", "train") + documents_in(tmp_path / "out", "val")
    assert "good text \ufffd\ufffd then more \ufffd and a real \ufffd here" in texts


def test_large_files_stream_in_pieces(tmp_path, monkeypatch):
    """A file bigger than a read chunk is cut at line ends (or UTF-8 boundaries) yet decodes back exactly."""
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 64)
    lines = [("ünïcode line %d " % i) * (i % 7) for i in range(300)] + ["é" * 500]  # one line longer than a chunk
    text = "\n".join(lines)
    (tmp_path / "big.txt").write_text(text)
    (tmp_path / "small.txt").write_text("another document " * 30)
    pieces = list(corpus.resolve_inputs([str(tmp_path / "big.txt")])[0].pieces())
    assert len(pieces) > 10 and "".join(p.text for p in pieces) == text
    assert [p.ends_document for p in pieces].count(True) == 1
    prepare(
        [str(tmp_path / "big.txt"), str(tmp_path / "small.txt")],
        tmp_path / "out",
        vocab_size=400,
        val_fraction=0.4,
        quiet=True,
        batch_chars=1000,
    )
    assert documents_in(tmp_path / "out", "train") + documents_in(tmp_path / "out", "val") in (
        [text, "another document " * 30],
        ["another document " * 30, text],
    )


@pytest.mark.parametrize("chunk", [1 << 20, 48])
def test_a_text_file_is_tokenized_as_one_text(pydoc_data, tmp_path, monkeypatch, chunk):
    """A text file's tokens are its whole text's, as transformers tokenizes it: read in chunks cut after a line end,
    each chunk encoded apart, "\n" and the next line's indent were two pre-tokens (a file without a final line end
    had its last line tokenized apart, evaluate --input off transformers' ids); cut where no pre-token spans."""
    monkeypatch.setattr(corpus, "CHUNK_BYTES", chunk)
    text = "".join(f"def f{i}(x):\n    return x + {i}\n\nclass C:\n    pass\n" for i in range(8))
    text += "class D:\n" + "    x = 1\n" * 12 + "y = 2\n  # end\n    call"  # 120 bytes where no cut is safe
    (tmp_path / "code.txt").write_text(text)
    tokenizer = str(pydoc_data / "tokenizer.json")
    prepare([str(tmp_path / "code.txt")], tmp_path / "out", tokenizer_path=tokenizer, val_fraction=0.0, quiet=True)
    tok = Tokenizer.load(tokenizer)
    assert shard_tokens(tmp_path / "out", "train").tolist() == [tok.eot_id, *tok.encode(text)]


@pytest.mark.parametrize("marks_starts", ["normalizer", "metaspace"])
def test_a_text_file_is_one_text_to_a_tokenizer_that_marks_where_a_text_starts(tmp_path, monkeypatch, marks_starts):
    """A tokenizer that marks the start of each text it encodes (Llama 2's and Mistral's normalizer prepends "▁", a
    Metaspace pre-tokenizer does the same) got a space at every read chunk's cut of a text file (1 MiB: 48 bytes here),
    where the shards must hold the whole text's tokens: such a tokenizer encodes each document whole."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    monkeypatch.setattr(corpus, "CHUNK_BYTES", 48)
    text = "".join(f"alpha beta {i}\ngamma delta\n" for i in range(40))
    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    if marks_starts == "normalizer":
        raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.train_from_iterator([text], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    raw.save(str(tmp_path / "tok.json"))
    (tmp_path / "t.txt").write_text(text)
    prepare([str(tmp_path / "t.txt")], tmp_path / "out", tokenizer_path=str(tmp_path / "tok.json"), val_fraction=0.0)
    tok = Tokenizer.load(tmp_path / "tok.json")
    assert shard_tokens(tmp_path / "out", "train").tolist() == [tok.eot_id, *tok.encode(text)]
    # One file with its end held out: two documents, each its own text's tokens, none of the held-out end in train
    meta = prepare(
        [str(tmp_path / "t.txt")], tmp_path / "held", tokenizer_path=str(tmp_path / "tok.json"), val_fraction=0.2
    )
    train, val = (shard_tokens(tmp_path / "held", s).tolist() for s in ("train", "val"))
    cut = text.index("\n", meta["split"]["cut_at_char"]) + 1  # at the line end after the split's point
    assert train == [tok.eot_id, *tok.encode(text[:cut])] and val == [tok.eot_id, *tok.encode(text[cut:])]


def test_one_big_file_holds_out_the_end_of_its_text(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 256)  # the cut falls inside one of many pieces
    text = "\n".join(f"line {i}: " + "word " * (i % 13) for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    meta = prepare([str(tmp_path / "one.txt")], tmp_path / "out", vocab_size=300, val_fraction=0.2)
    train, val = (documents_in(tmp_path / "out", s) for s in ("train", "val"))
    assert len(train) == len(val) == 1 and train[0] + val[0] == text
    assert train[0].endswith("\n") and val[0].startswith("line ")  # cut at a line end
    assert 0.19 < len(val[0]) / len(text) < 0.21
    assert meta["split"] == {"by": "end_of_text", "cut_at_char": meta["split"]["cut_at_char"], "total_chars": len(text)}
    assert "last 0.2 of the text" in capsys.readouterr().out


def test_parquet_row_groups_give_the_tokens_of_the_same_jsonl(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setattr(corpus, "PARQUET_BATCH_ROWS", 4)  # several batches per row group, too
    docs = [f"document {i}: " + "ünïcode words " * (i % 9) for i in range(40)] + [None, ""]
    pq.write_table(pa.table({"id": list(range(42)), "body": docs}), tmp_path / "docs.parquet", row_group_size=10)
    assert pq.ParquetFile(tmp_path / "docs.parquet").num_row_groups == 5
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d or ""}) + "\n" for d in docs))
    metas = {
        kind: prepare(
            [str(tmp_path / f"docs.{kind}")],
            tmp_path / kind,
            vocab_size=300,
            val_fraction=0.2,
            text_field="body",
            quiet=True,
        )
        for kind in ("parquet", "jsonl")
    }
    for split in ("train", "val"):
        assert np.array_equal(shard_tokens(tmp_path / "parquet", split), shard_tokens(tmp_path / "jsonl", split))
    counts = metas["parquet"]["documents"]
    assert counts == metas["jsonl"]["documents"] and counts["train"] + counts["val"] == 40  # null and "" add nothing


def test_config_text_field_is_part_of_the_request(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": f"document {i} " * 9}) + "\n" for i in range(6)))
    wanted = DataConfig(
        dir=str(tmp_path / "out"), inputs=[str(tmp_path / "docs.jsonl")], vocab_size=300, text_field="body"
    )
    assert ensure_prepared(wanted, quiet=True).meta["request"]["text_field"] == "body"
    with pytest.raises(
        UsageError,
        match=r"holds data prepared with text_field='body', not what \[data\] asks for "
        r"\(data.text_field = 'content'\)",
    ):
        ensure_prepared(
            DataConfig(dir=wanted.dir, inputs=wanted.inputs, vocab_size=300, text_field="content"), quiet=True
        )
    # Left at its default, text_field is the folder's, as every other preparation key is.
    assert ensure_prepared(DataConfig(dir=wanted.dir), quiet=True).meta["request"]["text_field"] == "body"


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "docs.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    with pytest.raises(
        UsageError, match=r'docs.parquet: reading Parquet needs pyarrow: pip install -e "\.\[parquet\]"'
    ):
        prepare([str(tmp_path / "docs.parquet")], tmp_path / "out", quiet=True)


def test_shards_roll_over_and_an_existing_tokenizer_is_reused(pydoc_data, tmp_path):
    out = tmp_path / "out"
    meta = prepare(
        ["builtin:pydoc"], out, tokenizer_path=str(pydoc_data / "tokenizer.json"), shard_tokens=10_000, quiet=True
    )
    assert len(meta["shards"]["train"]) == -(-meta["tokens"]["train"] // 10_000) > 1
    assert all(read_header(out / n).num_tokens == 10_000 for n in meta["shards"]["train"][:-1])
    for split in ("train", "val"):  # same tokenizer, same split: the same tokens, just cut into more files
        assert np.array_equal(shard_tokens(out, split), shard_tokens(pydoc_data, split))


def test_overwrite_replaces_and_failure_keeps_old_data(pydoc_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(["builtin:pydoc"], out, vocab_size=300, quiet=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(UsageError, match="already holds prepared data"):
        prepare(["builtin:pydoc"], out, vocab_size=400, quiet=True)

    def crash(self, texts):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(Tokenizer, "encode_batch", crash)
    with pytest.raises(RuntimeError):
        prepare(["builtin:pydoc"], out, vocab_size=400, overwrite=True, quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no temp files
    monkeypatch.undo()

    meta = prepare(["builtin:pydoc"], out, vocab_size=400, overwrite=True, shard_tokens=50_000, quiet=True)
    assert meta["vocab_size"] == 400
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json", "tokenizer.json"] + meta["shards"]["train"] + meta["shards"]["val"]
    )


def _write(name, content):
    def make(d: Path):
        p = d / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
        return [str(p)]

    return make


BAD = [
    ("missing file", lambda d: [str(d / "nope.txt")], [], "nope.txt: no such file or directory"),
    ("glob matching nothing", lambda d: [str(d / "*.zzz")], [], r"\*.zzz: matches no files"),
    ("empty directory", lambda d: [str(d)], [], "directory holds no text files"),
    ("empty file", _write("empty.txt", ""), [], "empty.txt: no text found"),
    ("unknown embedded corpus", lambda d: ["builtin:nope"], [], "builtin:nope: no such embedded corpus"),
    ("invalid JSON line", _write("x.jsonl", '{"text": "ok"}\n{"text": \n'), [], r"x.jsonl:2: invalid JSON"),
    ("JSONL without the field", _write("x.jsonl", '{"body": "ok"}\n'), [], r"x.jsonl:1: no 'text' field"),
    ("JSONL field not a string", _write("x.jsonl", '{"text": 3}\n'), [], r"x.jsonl:1: field 'text' is int"),
    ("one line cannot be split", _write("one.txt", "a single document"), [], "nothing was held out"),
    ("vocab size too small", _write("a.txt", "text"), ["--vocab-size", "100"], "vocab size 100 is too small"),
    (
        "val fraction out of range",
        _write("a.txt", "text"),
        ["--val-fraction", "1.5"],
        r"--val-fraction: must be in \[0, 1\)",
    ),
    ("non-numeric flag", _write("a.txt", "text"), ["--vocab-size", "lots"], "invalid int value: 'lots'"),
    ("missing tokenizer", _write("a.txt", "text"), ["--tokenizer", "nope.json"], "nope.json: no such tokenizer file"),
    ("malformed tokenizer", _write("a.txt", "text"), ["--tokenizer", "__file__"], "not a valid tokenizer.json"),
    (
        "both tokenizer options",
        _write("a.txt", "text"),
        ["--tokenizer", "t.json", "--vocab-size", "300"],
        "not allowed with",
    ),
    ("output is a file", _write("a.txt", "text"), ["--out", "__file__"], "exists and is not a directory"),
]


@pytest.mark.parametrize("inputs, flags, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_one_line_error(tmp_path, inputs, flags, message, capsys):
    src = tmp_path / "src"
    src.mkdir()
    args = ["--input", *inputs(src)]
    flags = [str(src / "a.txt") if f == "__file__" else f for f in flags]
    if "--out" not in flags:
        flags += ["--out", str(tmp_path / "out")]
    with pytest.raises(UsageError, match=message) as e:
        main(args + flags)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    if "no text found" in message:  # nothing to split: it said so of the empty file's 0 characters, then refused
        assert "split:" not in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_text("text")
    p.chmod(0)
    with pytest.raises(UsageError, match="secret.txt: cannot read"):
        main(["--input", str(p), "--out", str(tmp_path / "out")])


@pytest.mark.subprocess
def test_command_line_exit_codes(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "fasttrain.prepare", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    ok = run("--out", str(tmp_path / "d"), "--vocab-size", "300")
    assert ok.returncode == 0 and "tokens/s" in ok.stdout and (tmp_path / "d" / "meta.json").exists()
    # a bad --input with an --out under tmp_path: a refused prepare leaves its lock file beside --out
    missing = run("--input", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    for bad in (run("--out", str(tmp_path / "d")), missing, run()):
        assert bad.returncode == 2
        assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


@pytest.fixture
def pydoc_default(monkeypatch):
    """The default inputs cut to the topics, the smaller of the two (what these tests check is how a [data] setting
    prepares, not the corpus): ~1 s to prepare instead of ~8."""
    from fasttrain.preparation import cache

    monkeypatch.setattr(cache, "DEFAULT_INPUTS", ("builtin:pydoc",))


def test_config_drives_preparation_and_the_saved_config_has_the_vocab_size(pydoc_data, tmp_path, pydoc_default):
    data = tmp_path / "data"
    cfg = load_config(None, [f'data.dir="{data}"', "data.vocab_size=300"])
    prepared = ensure_prepared(cfg.data, quiet=True)
    assert prepared.vocab_size == prepared.meta["vocab_size"] == 300 and prepared.dir == str(data)
    resolved = resolve(cfg, prepared.dir, prepared.vocab_size)
    assert resolved.model.vocab_size == 300 and cfg.model.vocab_size == 0  # the checked config is not edited
    saved = load_config(save_config(resolved, tmp_path / "run"))
    assert saved == resolved and saved.model.vocab_size == 300

    stamp = (data / "meta.json").stat().st_mtime_ns
    ensure_prepared(load_config(None, [f'data.dir="{data}"', "data.vocab_size=300"]).data, quiet=True)
    assert (data / "meta.json").stat().st_mtime_ns == stamp  # prepared data is reused, not redone

    with pytest.raises(UsageError, match=r"data: holds data prepared with vocab_size=300, not what \[data\] asks for"):
        ensure_prepared(load_config(None, [f'data.dir="{data}"', "data.vocab_size=400"]).data, quiet=True)
    tokenizer = pydoc_data / "tokenizer.json"
    small_model = load_config(
        None, [f'data.dir="{tmp_path / "d2"}"', f'data.tokenizer="{tokenizer}"', "model.vocab_size=300"]
    )
    prepared = ensure_prepared(small_model.data, quiet=True)
    with pytest.raises(UsageError, match="model.vocab_size = 300 is smaller than the 512 tokens of"):
        resolve(small_model, prepared.dir, prepared.vocab_size)


def test_links_to_a_parent_neither_repeat_nor_hang_and_each_file_is_read_once(tmp_path):
    """A recursive glob through `d/loop -> .` read each file 41 times and put the same documents in train
    and val; with two such links it never ended. Linked directories are not entered, and a file reached
    twice (named twice, or through a file link) is one source."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha\n")
    (d / "sub" / "b.txt").write_text("beta\n")
    os.symlink(".", d / "loop")
    os.symlink("..", d / "sub" / "up")
    os.symlink(d / "a.txt", d / "alias.txt")
    want = [str(d / "a.txt"), str(d / "sub" / "b.txt")]
    for inputs in ([f"{d}/**/*.txt"], [str(d)], [str(d / "a.txt"), f"{d}/**/*.txt", str(d)]):
        assert [s.name for s in corpus.resolve_inputs(inputs)] == want, inputs
    prepared = prepare([f"{d}/**/*.txt"], tmp_path / "out", vocab_size=300, quiet=True)
    assert prepared["documents"]["train"] + prepared["documents"]["val"] == 2


def corpus_files(directory: Path, word: str) -> list[str]:
    directory.mkdir(parents=True)
    for i in range(4):
        (directory / f"{i}.txt").write_text(f"{word} {i} " * 40 + "\n")
    return [str(directory / "*.txt")]


def test_a_prepare_killed_while_moving_new_data_into_place_is_finished_by_the_next(tmp_path, monkeypatch):
    """kill -9 between moving the old data out and the new in left neither (and the next prepare deleted the
    new data it found in .prepare-tmp). A complete preparation is now finished by the next prepare or run;
    until then the directory has no meta.json, so nothing reads it as prepared."""
    out = tmp_path / "d"
    prepare(corpus_files(tmp_path / "old", "old"), out, vocab_size=300, quiet=True)
    new_inputs = corpus_files(tmp_path / "new", "new")
    want = prepare(new_inputs, tmp_path / "ref", vocab_size=300, quiet=True)
    real_replace, moved = os.replace, []

    def killed_mid_move(src, dst):  # stands in for SIGKILL after two files of the move
        if Path(dst).parent == out and Path(src).parent.name == ".prepare-tmp":
            if len(moved) == 2:
                raise KeyboardInterrupt
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_mid_move)
    with pytest.raises(KeyboardInterrupt):
        prepare(new_inputs, out, vocab_size=300, overwrite=True, quiet=True)
    monkeypatch.undo()
    assert len(moved) == 2 and not (out / "meta.json").exists() and (out / ".prepare-tmp" / "COMPLETE").exists()
    cfg = load_config(None, [f'data.dir="{out}"', f"data.inputs={json.dumps(new_inputs)}", "data.vocab_size=300"])
    got = ensure_prepared(cfg.data, quiet=True)  # a run of the same data finishes the move
    assert got.meta["tokens"] == want["tokens"] and not (out / ".prepare-tmp").exists()
    for split in ("train", "val"):
        assert np.array_equal(shard_tokens(out, split), shard_tokens(tmp_path / "ref", split))


def test_one_prepare_per_directory_and_a_run_waits_for_it(tmp_path, capsys):
    """Two prepares of one directory moved each other's files away ("write failed"), or one exited 0 with
    only meta.json left. A prepare while another holds the directory is one line naming it; a run that
    needs the same data waits, then uses what the first prepared."""
    out = tmp_path / "d"
    inputs = corpus_files(tmp_path / "src", "word")
    lock = tmp_path / ".d.prepare-lock"
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom fasttrain.system.run_lock import holding\n"
        "with holding(Path(sys.argv[1]), str):\n    print('locked', flush=True)\n    time.sleep(float(sys.argv[2]))"
    )
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(lock), "600"], cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UsageError, match=rf"{out}: another prepare \(pid {holder.pid} on host .*\) is writing it"):
            prepare(inputs, out, vocab_size=300, quiet=True)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(lock), "1.5"], cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        cfg = load_config(None, [f'data.dir="{out}"', f"data.inputs={json.dumps(inputs)}", "data.vocab_size=300"])
        assert ensure_prepared(cfg.data).meta["documents"]["train"] > 0
        assert f"data: waiting for pid {holder.pid}" in capsys.readouterr().out
    finally:
        holder.wait()


def test_a_bpe_that_learns_fewer_ids_than_asked_records_a_config_that_loads_back(tmp_path):
    """A small corpus gives the BPE fewer merges than data.vocab_size asks for: the resolved config (what a
    run records in config.toml and its checkpoints) takes the tokenizer's size and must validate again."""
    (tmp_path / "a.txt").write_text("abc abd abe\n" * 50)
    (tmp_path / "b.txt").write_text("abd abc\n" * 20)
    inputs = f'data.inputs=["{tmp_path / "a.txt"}", "{tmp_path / "b.txt"}"]'
    cfg = load_config(None, [inputs, f'data.dir="{tmp_path / "data"}"', "data.vocab_size=300"])
    prepared = ensure_prepared(cfg.data, quiet=True)
    assert 256 < prepared.vocab_size < 300
    resolved = resolve(cfg, prepared.dir, prepared.vocab_size)
    assert load_config(save_config(resolved, tmp_path / "run")) == resolved


def test_unset_data_dir_prepares_into_a_cache_keyed_by_the_request(tmp_path, monkeypatch, pydoc_default):
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, ["data.vocab_size=300"])
    assert cfg.data.dir == ""
    prepared = ensure_prepared(cfg.data, quiet=True)
    first = Path(prepared.dir)
    assert first.parent == tmp_path / "cache" and first.name.startswith("pydoc-") and prepared.vocab_size == 300
    again = ensure_prepared(load_config(None, ["data.vocab_size=300"]).data, quiet=True)
    assert again.dir == prepared.dir  # the same request finds the same directory
    other = ensure_prepared(load_config(None, ["data.vocab_size=310"]).data, quiet=True)
    assert Path(other.dir).parent == first.parent and other.dir != prepared.dir


def test_the_cache_folder_is_named_by_whole_words(tmp_path, monkeypatch):
    """The name was the input path's last 40 characters cut wherever they fell ("-tt-corpora-...", "ure-novel-txt"):
    it is the path's last whole words that fit, then the request's hash."""
    from fasttrain.preparation.cache import cache_dir
    from fasttrain.preparation.preparation import request_of

    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))

    def name_of(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("some text\n")
        folder = cache_dir(request_of([str(path)], 300, None, 0.1, "text"))
        readable, digest = folder.name.rsplit("-", 1)
        assert folder.parent == tmp_path / "cache" and len(digest) == 12
        return readable

    # tmp_path's own folder (this test's name) is too long to join them: the name starts at a word
    assert name_of(tmp_path / "tt" / "corpora" / "english" / "literature" / "novel.txt") == (
        "tt-corpora-english-literature-novel-txt"
    )
    assert (
        name_of(tmp_path / "a" / "english-literature-of-the-nineteenth-century.txt")
        == "literature-of-the-nineteenth-century-txt"
    )
    assert name_of(tmp_path / ("x" * 60 + ".txt")) == "txt"
    assert cache_dir(request_of(["builtin:pydoc"], 4096, None, 0.1, "text")).name.startswith("pydoc-")


def test_a_cache_setting_that_names_a_file_says_so(tmp_path, monkeypatch):
    """FASTTRAIN_CACHE set to a regular file was "cannot write (File exists)" about a lock inside it."""
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    message = "^" + re.escape(f"FASTTRAIN_CACHE = {tmp_path / 'cache'}: is a file, not a folder")
    with pytest.raises(UsageError, match=message):
        ensure_prepared(load_config(None, ["data.vocab_size=300"]).data, quiet=True)
    assert (tmp_path / "cache").read_text() == "not a folder"


@pytest.mark.parametrize(
    "make, said",
    [
        (lambda t: (t / "cache").symlink_to(t / "cache"), "is a symbolic link loop"),
        (lambda t: (t / "a").symlink_to(t / "a") or t / "a" / "cache", "is under a symbolic link loop"),
        (lambda t: (t / "cache").symlink_to(t / "gone"), "is a symbolic link to nothing"),
        (lambda t: (t / "f").write_text("x") and t / "f" / "cache", "is under a file, not a folder"),
    ],
    ids=["loop", "under-a-loop", "dangling", "under-a-file"],
)
def test_a_cache_setting_that_is_no_folder_says_what_it_is(tmp_path, monkeypatch, make, said):
    """FASTTRAIN_CACHE on a symbolic link loop was "prepare-lock: cannot write (File exists)"."""
    root = make(tmp_path) or tmp_path / "cache"
    monkeypatch.setenv("FASTTRAIN_CACHE", str(root))
    with pytest.raises(UsageError, match="^" + re.escape(f"FASTTRAIN_CACHE = {root}: {said}; set FASTTRAIN_CACHE")):
        ensure_prepared(load_config(None, ["data.vocab_size=300"]).data, quiet=True)


def test_the_cache_follows_what_the_inputs_hold(tmp_path, monkeypatch):
    """The cache was keyed by the request alone: an edited file, a file added to a named directory, or another Python's
    standard library (the embedded corpora) trained on the data prepared before. Each is now a directory of its own."""
    from fasttrain.preparation import corpus

    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "texts").mkdir()
    text = tmp_path / "texts" / "a.txt"
    text.write_text("the first text of the corpus\n" * 300)
    settings = [f'data.inputs=["{tmp_path / "texts"}"]', "data.vocab_size=300"]
    first = ensure_prepared(load_config(None, settings).data, quiet=True)
    assert ensure_prepared(load_config(None, settings).data, quiet=True).dir == first.dir  # nothing changed: reused
    text.write_text("another text, the one now in the file\n" * 300)
    edited = ensure_prepared(load_config(None, settings).data, quiet=True)
    assert edited.dir != first.dir and edited.meta["text_bytes"] != first.meta["text_bytes"]
    (tmp_path / "texts" / "b.txt").write_text("a second file\n" * 300)
    assert ensure_prepared(load_config(None, settings).data, quiet=True).dir != edited.dir

    builtin = corpus.fingerprint(["builtin:pydoc"])
    assert corpus.fingerprint(["builtin:pydoc"]) == builtin
    monkeypatch.setattr(corpus.sys, "version", "3.99.0 (another Python)")
    assert corpus.fingerprint(["builtin:pydoc"]) != builtin


def test_a_runs_config_naming_a_cache_its_inputs_left_says_so(tmp_path, monkeypatch):
    """A run's config.toml records data.dir as the cache folder it trained from; a new run from that file, after its
    input files were edited, planned on the text prepared before with no note. It says so, naming how to prepare
    them as they are."""
    from fasttrain.compute.distributed import World
    from fasttrain.config.prepared import resolve
    from fasttrain.planning.plan import plan_run

    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "texts").mkdir()
    text = tmp_path / "texts" / "a.txt"
    text.write_text("the first text of the corpus\n" * 300)
    settings = [f'data.inputs=["{tmp_path / "texts"}"]', "data.vocab_size=300", "model.vocab_size=0"]
    settings += ["train.max_steps=2", "train.max_time=0", "train.device=cpu", "train.batch_size=2", "train.seq_len=32"]
    settings += [f"train.out_dir={tmp_path / 'run'}", "model.max_seq_len=32"]
    cfg = load_config(None, settings)
    prepared = ensure_prepared(cfg.data, quiet=True)
    recorded = resolve(cfg, prepared.dir, prepared.vocab_size, prepared.meta["request"])  # as config.toml holds it
    assert Path(recorded.data.dir).parent == tmp_path / "cache"

    def notes() -> list[str]:
        return [n for n in plan_run(recorded, World(), torch.device("cpu")).notes if "data.dir = " in n]

    assert notes() == []  # the inputs as they were: the cache is theirs
    text.write_text("another text, the one now in the file\n" * 300)
    (note,) = notes()
    assert note.startswith(f"data.dir = {recorded.data.dir}: the cache of data.inputs as they were") and (
        '--set data.dir="" prepares them as they are' in note
    )


@pytest.mark.subprocess
def test_a_tokenizer_that_cannot_be_written_is_one_line(tmp_path):
    """A failed tokenizer.json write (here past a file-size limit; a full disk alike) was tokenizers' bare
    Exception and a traceback; it is one line naming the file, and nothing is left in --out."""
    from pydoc_data.topics import topics

    (tmp_path / "small.txt").write_text("".join(topics[k] for k in sorted(topics))[:30_000])

    def limit_file_size() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))  # the shards fit, a 512-token tokenizer not

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fasttrain.prepare",
            "--input",
            str(tmp_path / "small.txt"),
            "--out",
            str(tmp_path / "out"),
            "--vocab-size",
            "512",
            "--shard-tokens",
            "2000",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.count("\n") == 1 and "tokenizer.json: cannot save the tokenizer (File too large)" in result.stderr
    )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_prepared_folder_is_the_data_by_itself(tmp_path, capsys):
    """prepare --input mine.txt --out data/mine, then train on data.dir alone: the base config once had to
    repeat the inputs and vocabulary size. A config that contradicts the folder names both values."""
    from pydoc_data.topics import topics

    from fasttrain import train
    from fasttrain.system.errors import run_cli

    (tmp_path / "mine.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    assert main(["--input", str(tmp_path / "mine.txt"), "--out", str(tmp_path / "mine"), "--vocab-size", "300"]) == 0
    run = [
        "configs/base.toml",
        "--device",
        "cpu",
        "--set",
        f"data.dir={tmp_path / 'mine'}",
        f"train.out_dir={tmp_path / 'run'}",
        "model.n_layers=1",
        "model.d_model=32",
        "model.n_heads=2",
        "train.batch_size=2",
        "train.seq_len=32",
        "train.max_steps=2",
        "train.sample_tokens=0",
        "train.tensorboard=false",
    ]
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, run)
    assert done.value.code == 0, capsys.readouterr().err
    recorded = load_config(tmp_path / "run" / "config.toml")  # what the folder holds, so it loads back alike
    assert recorded.data.inputs == [str(tmp_path / "mine.txt")] and recorded.data.vocab_size == 300
    assert recorded.model.vocab_size == json.loads((tmp_path / "mine" / "meta.json").read_text())["vocab_size"]
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, [*run, "data.vocab_size=4096", f"train.out_dir={tmp_path / 'other'}"])
    err = capsys.readouterr().err
    assert (
        done.value.code == 2
        and "holds data prepared with vocab_size=300, not what [data] asks for (data.vocab_size = 4096)" in err
    ), err
