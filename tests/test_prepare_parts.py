"""Preparing on many machines (parts and a merge) and on many threads gives what one prepare gives."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fasttrain.formats.prepared_folder import open_prepared
from fasttrain.formats.shards import PREPARATION
from fasttrain.preparation.corpus import resolve_inputs
from fasttrain.preparation.parts import merge, prepare_part, share
from fasttrain.preparation.preparation import prepare
from fasttrain.preparation.split import Sample, plan_split, tokenizer_sample
from fasttrain.prepare import main
from fasttrain.system.errors import UsageError
from tests.test_prepare import documents_in, shard_tokens


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """Two JSONL files (cut between lines by parts), ten text files (whole) and an empty one."""
    from pydoc_data.topics import topics

    src = tmp_path_factory.mktemp("corpus")
    docs = [topics[k] for k in sorted(topics)]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:40]))
    for i, d in enumerate(docs[40:50]):
        (src / f"t{i}.txt").write_text(d)
    (src / "t99.txt").write_text("")
    (src / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n\n" for d in docs[50:]))
    return [str(src / "a.jsonl"), str(src / "t*.txt"), str(src / "b.jsonl")]


def test_every_document_goes_to_exactly_one_part(corpus):
    sources = resolve_inputs(corpus)
    whole = [p.text for s in sources for p in s.pieces()]
    for n in (1, 2, 3, 7):
        parts = [p.text for k in range(n) for s, a, b in share(sources, k, n) for p in s.pieces("text", a, b)]
        assert parts == whole, n


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_parts_merged_are_one_prepare(corpus, tmp_path, n):
    whole = prepare(corpus, tmp_path / "whole", vocab_size=600, quiet=True)
    tokenizer = str(tmp_path / "whole" / "tokenizer.json")
    one = prepare(corpus, tmp_path / "given", tokenizer_path=tokenizer, quiet=True, shard_tokens=30_000)
    out = tmp_path / "parts"
    for k in reversed(range(n)):  # in any order, on any machine
        prepare_part(corpus, out, k, n, tokenizer_path=tokenizer, quiet=True, shard_tokens=30_000)
    meta = merge(out, quiet=True)
    assert not (out / "parts").exists() and open_prepared(out).meta == meta
    for split in ("train", "val"):  # the same documents in each split, with the same ids, in the same order
        assert np.array_equal(shard_tokens(out, split), shard_tokens(tmp_path / "whole", split))
    for key in ("tokens", "documents", "text_bytes", "split", "files", "invalid_utf8_replaced"):
        assert meta[key] == whole[key] == one[key], key
    assert meta["request"] == one["request"] and meta["parts"] == n


def test_a_learned_tokenizer_is_learned_once_before_the_parts(corpus, tmp_path, capsys):
    prepare(corpus, tmp_path / "whole", vocab_size=600, quiet=True)
    args = ["--input", *corpus, "--out", str(tmp_path / "out")]
    main([*args, "--learn-tokenizer-only", "--vocab-size", "600"])
    for k in range(2):
        main([*args, "--part", f"{k}/2", "--workers", "1"])
    main(["--out", str(tmp_path / "out"), "--merge"])
    meta = open_prepared(tmp_path / "out").meta
    assert meta["request"]["vocab_size"] == 600 and meta["request"]["tokenizer"] is None
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "whole" / "tokenizer.json").read_bytes()
    assert (
        meta["tokenizer_learned_from"]
        == json.loads((tmp_path / "whole" / "meta.json").read_text())["tokenizer_learned_from"]
    )
    assert "learned a BPE of 600 tokens" in capsys.readouterr().out


def test_workers_do_not_change_the_output(corpus, tmp_path):
    metas = {
        w: prepare(corpus, tmp_path / str(w), vocab_size=600, workers=w, batch_chars=3000, quiet=True) for w in (1, 2)
    }
    names = sorted(p.name for p in (tmp_path / "1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "2").iterdir())
    for name in names:
        if name != "meta.json":
            assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
    same = {"seconds": None, PREPARATION: None}  # its time, and its identity, new every preparation
    assert {**metas[1], **same} == {**metas[2], **same} and metas[1][PREPARATION] != metas[2][PREPARATION]


def test_a_killed_part_is_run_again_alone(corpus, tmp_path, pydoc_data):
    tokenizer = str(pydoc_data / "tokenizer.json")
    out = tmp_path / "out"
    prepare_part(corpus, out, 0, 2, tokenizer_path=tokenizer, quiet=True)
    done = {p: p.stat().st_mtime_ns for p in (out / "parts" / "0-of-2").iterdir()}
    (out / "parts" / ".1-of-2.tmp").mkdir()  # what a part killed mid-way leaves
    (out / "parts" / ".1-of-2.tmp" / "train_000000.bin").write_bytes(b"half")
    with pytest.raises(UsageError, match=r"part 1/2: unfinished \(killed while it ran\); run it again"):
        merge(out, quiet=True)
    with pytest.raises(UsageError, match="part 0/2: already complete"):
        prepare_part(corpus, out, 0, 2, tokenizer_path=tokenizer, quiet=True)
    prepare_part(corpus, out, 1, 2, tokenizer_path=tokenizer, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in (out / "parts" / "0-of-2").iterdir()} == done  # kept as it was
    merge(out, quiet=True)
    assert open_prepared(out).meta["parts"] == 2 and documents_in(out, "val")


def test_the_tokenizer_sample_is_spread_over_every_file(corpus):
    sources = resolve_inputs(corpus)
    split = plan_split(sources, "text", 0.1)
    total = sum(len(p.text) for s in sources for p in s.pieces())
    sample = Sample()
    texts = list(tokenizer_sample(sources, "text", split, total // 4, sample))
    assert sample.chars == sum(map(len, texts)) <= total // 4 + max(map(len, texts))
    last = {json.loads(line)["text"] for line in open(corpus[-1]) if line.strip()}
    first = {json.loads(line)["text"] for line in open(corpus[0])}
    assert set(texts) & first and set(texts) & last  # from all over, not only the first quarter
    assert sample.files >= 3 and 5 <= sample.documents < 40
    everything = Sample()
    list(tokenizer_sample(sources, "text", split, 10 * total, everything))
    assert everything.documents == 70 and everything.chars < total  # all 70 training documents, no validation
