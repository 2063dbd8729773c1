"""Prepared folders lose no data and are what they claim (issue 43): prepare never replaces files it did not
write, a damaged COMPLETE marker is recovered from, text a tokenizer cannot encode is counted, paths are
recorded absolute and compared resolved, and a data.dir that names nothing says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fasttrain import prepare, train
from fasttrain.config import DataConfig
from fasttrain.formats.shards import PREPARATION
from fasttrain.preparation.cache import ensure_prepared
from fasttrain.system.errors import run_cli
from tests.conftest import tiny_args


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `fasttrain prepare ARGS` as the command line does: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        run_cli(prepare.main, list(args))
    out, err = capsys.readouterr()
    return done.value.code, out, err


def small_corpus(directory: Path) -> Path:
    """Three documents of the embedded corpus, enough for a 300-token BPE."""
    from pydoc_data.topics import topics

    directory.mkdir(parents=True, exist_ok=True)
    for name in sorted(topics)[:3]:
        (directory / f"{name}.txt").write_text(topics[name])
    return directory


def test_prepare_overwrite_never_replaces_a_model_folders_tokenizer(tmp_path, capsys):
    """A Hugging Face model folder was called "a damaged or unfinished preparation", and --overwrite then
    replaced the model's tokenizer.json with a newly trained one. It is refused, with --overwrite or without."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "tokenizer.json").write_text('{"the model\'s": "own"}')
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    corpus = str(small_corpus(tmp_path / "corpus"))
    for flags in ([], ["--overwrite"]):
        code, _, err = cli(capsys, "--input", corpus, "--out", str(model), "--vocab-size", "300", *flags)
        assert code == 2 and "not a prepared folder" in err and "--overwrite" not in err, err
        assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_overwrite_replaces_a_preparation_and_keeps_the_files_beside_it(tmp_path, capsys):
    """A prepared folder is prepare's to replace (its meta.json says so), but only the files prepare writes."""
    out, corpus = tmp_path / "data", str(small_corpus(tmp_path / "corpus"))
    assert cli(capsys, "--input", corpus, "--out", str(out), "--vocab-size", "300")[0] == 0
    (out / "notes.txt").write_text("mine")
    assert cli(capsys, "--input", corpus, "--out", str(out), "--vocab-size", "280", "--overwrite")[0] == 0
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 280
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("marker", ["", '["meta.json", "tokeni', "{}"])
def test_a_damaged_complete_marker_is_discarded_and_the_old_data_kept(tmp_path, capsys, marker):
    """An empty or damaged .prepare-tmp/COMPLETE was a JSONDecodeError traceback in train and prepare, and
    prepare --overwrite could not get past it. The move it would mark never started, so the unfinished
    preparation is discarded (said in one line) and the data already there is used as it is."""
    out, corpus = tmp_path / "data", str(small_corpus(tmp_path / "corpus"))
    assert cli(capsys, "--input", corpus, "--out", str(out), "--vocab-size", "300")[0] == 0
    meta = (out / "meta.json").read_bytes()
    (out / ".prepare-tmp").mkdir()
    (out / ".prepare-tmp" / "train_000000.bin").write_bytes(b"half of a new shard")
    (out / ".prepare-tmp" / "COMPLETE").write_text(marker)

    prepared = ensure_prepared(DataConfig(dir=str(out)))
    assert "COMPLETE: damaged, so the move it marks never started" in capsys.readouterr().out
    assert prepared.meta["vocab_size"] == 300 and (out / "meta.json").read_bytes() == meta
    assert not (out / ".prepare-tmp").exists()

    (out / ".prepare-tmp").mkdir()
    (out / ".prepare-tmp" / "COMPLETE").write_text(marker)
    code, _, err = cli(capsys, "--input", corpus, "--out", str(out), "--vocab-size", "280", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 280


def test_text_a_wordlevel_tokenizer_cannot_encode_is_counted_and_warned(tmp_path, capsys):
    """A WordLevel tokenizer turned a fifth of the words into its unknown token, silently. The unknown tokens
    are counted in meta.json (as invalid UTF-8 is) and a warning line says how much text was lost."""
    words = ["the", "cat", "sat", "on", "mat"]
    tokenizer = {
        "model": {
            "type": "WordLevel",
            "vocab": {w: i for i, w in enumerate([*words, "[UNK]", "</s>"])},
            "unk_token": "[UNK]",
        },
        "pre_tokenizer": {"type": "Whitespace"},
    }
    (tmp_path / "wordlevel.json").write_text(json.dumps(tokenizer))
    docs = tmp_path / "docs.jsonl"
    # documents of different lengths: identical ones would all be validation, as the first document is
    docs.write_text("".join(json.dumps({"text": "the cat sat on the mat dog " * (20 + i)}) + "\n" for i in range(10)))
    code, out, err = cli(
        capsys, "--input", str(docs), "--out", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "wordlevel.json")
    )
    assert code == 0, err
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    unknown = sum(20 + i for i in range(10))  # "dog", once a repeat of each document
    assert meta["unknown_tokens"] == unknown
    total = meta["tokens"]["train"] + meta["tokens"]["val"]
    assert f"warning: {unknown} of the {total:,} tokens" in out and "unknown token [UNK]" in out, out


def test_paths_are_recorded_absolute_and_compared_resolved(tmp_path, monkeypatch, capsys):
    """data.inputs = ["./corpus"] was refused for a folder prepared from "corpus" (compared as strings), and
    meta.json recorded the inputs and tokenizer relative to where prepare ran."""
    monkeypatch.chdir(tmp_path)
    small_corpus(tmp_path / "corpus")
    assert cli(capsys, "--input", "corpus", "--out", "first", "--vocab-size", "300")[0] == 0
    assert cli(capsys, "--input", "corpus", "--out", "second", "--tokenizer", "first/tokenizer.json")[0] == 0
    request = json.loads((tmp_path / "second" / "meta.json").read_text())["request"]
    assert request["inputs"] == [str(tmp_path / "corpus")]
    assert request["tokenizer"] == str(tmp_path / "first" / "tokenizer.json")
    given = DataConfig(dir="second", inputs=["./corpus"], tokenizer="./first/../first/tokenizer.json")
    prepared = ensure_prepared(given)
    assert prepared.meta["request"] == request

    # A folder prepared before paths were recorded absolute holds them as given: compared from here, alike.
    old = json.loads((tmp_path / "first" / "meta.json").read_text())
    old["request"]["inputs"] = ["corpus"]
    (tmp_path / "first" / "meta.json").write_text(json.dumps(old))
    assert ensure_prepared(DataConfig(dir="first", inputs=[str(tmp_path / "corpus")], vocab_size=300)).vocab_size == 300


def test_a_data_dir_that_names_nothing_says_what_is_prepared_into_it(tmp_path, capsys, monkeypatch):
    """A typo in data.dir silently got the built-in corpus prepared into it; that is said in one line."""
    from fasttrain.preparation import cache

    monkeypatch.setattr(cache, "DEFAULT_INPUTS", ("builtin:pydoc",))  # the smaller of the defaults: a quicker test
    typo = tmp_path / "dta"
    ensure_prepared(DataConfig(dir=str(typo), vocab_size=300))
    out = capsys.readouterr().out
    assert (
        f"note: data.dir = {typo} does not exist, so the default data.inputs (builtin:pydoc) is prepared "
        "into it; if it should name a prepared folder, check the path"
    ) in out
    ensure_prepared(DataConfig(dir=str(typo), vocab_size=300))  # prepared now: nothing more to say
    assert "note:" not in capsys.readouterr().out
    killed = tmp_path / "killed"  # a prepare into it killed before its data was whole: only .prepare-tmp there
    (killed / ".prepare-tmp").mkdir(parents=True)
    ensure_prepared(DataConfig(dir=str(killed), vocab_size=300))
    assert f"note: data.dir = {killed} is empty, so the default data.inputs" in capsys.readouterr().out


def test_folders_prepared_before_the_tokenizer_hash_are_used_as_they_are(pydoc_data, tmp_path):
    """meta.json without tokenizer_sha256 (prepared before it was recorded): nothing to compare, nothing
    rewritten. With it, a tokenizer.json changed in any byte is another tokenizer."""
    old = tmp_path / "old"
    shutil.copytree(pydoc_data, old)
    meta = json.loads((old / "meta.json").read_text())
    assert len(meta.pop("tokenizer_sha256")) == 64
    (old / "meta.json").write_text(json.dumps(meta))
    before = (old / "meta.json").read_bytes()
    assert ensure_prepared(DataConfig(dir=str(old))).vocab_size == 512
    assert (old / "meta.json").read_bytes() == before


def test_a_resume_names_data_prepared_again_since_its_save(pydoc_data, tmp_path, capsys):
    """The loader checks its rows' counts, which data prepared again from edited text may keep: such a resume went on
    over other text without a word. Each prepare writes an identity into meta.json, each save records it, and a resume
    that finds another says so; the same preparation (copied, say) is no change."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(pydoc_data, data)
    assert json.loads((data / "meta.json").read_text())[PREPARATION]  # every prepare writes one
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, tiny_args(data, run, "train.max_steps=2", "checkpoint.interval=1", flags=["--quiet"]))
    assert done.value.code == 0
    note = f"resume: {data} was prepared again since this save"
    for steps, prepared_again in ((3, False), (4, True)):
        if prepared_again:  # as a prepare --overwrite of the edited text leaves it
            meta = json.loads((data / "meta.json").read_text())
            (data / "meta.json").write_text(json.dumps({**meta, PREPARATION: "another"}))
        args = tiny_args(data, run, f"train.max_steps={steps}", "checkpoint.interval=1", flags=["--resume", "auto"])
        with pytest.raises(SystemExit) as done:
            run_cli(train.main, args)
        out = capsys.readouterr().out
        assert done.value.code == 0 and (note in out) == prepared_again, out
