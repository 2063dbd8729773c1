"""Issue 43, the tools' part: a run keeps the tokenizer it trained with after its data folder is prepared again,
export refuses a folder holding another model, resolves links before it picks its default --out, and keeps a
Hugging Face source model's token ids and generation config. Each through the real entry point."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fasttrain import evaluate, export, sample
from fasttrain.preparation.preparation import prepare
from fasttrain.system.errors import UsageError, run_cli
from fasttrain.training.trainer import Trainer
from tests.conftest import tiny_config


def cli(main, args: list[str], capsys) -> tuple[int, str, str]:
    """The exit status, stdout and stderr of `main(args)` run as the command line runs it."""
    with pytest.raises(SystemExit) as done:
        run_cli(main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return done.value.code, out, err


def write_corpus(path: Path, edited: bool) -> None:
    """A JSONL corpus of 40 of the embedded corpus's topics; `edited`: each with " a " for " the ", which changes
    the tokenizer trained on it (and the number of rows, which a resume checks after the tokenizer)."""
    from pydoc_data.topics import topics

    docs = [topics[k][:800] for k in sorted(topics)[:40]]
    if edited:  # every document: the first is validation, and the tokenizer learns from a sample of the rest
        docs = [doc.replace(" the ", " a ") for doc in docs]
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))


@pytest.fixture(scope="module")
def reprepared(tmp_path_factory) -> tuple[Path, Path, bytes]:
    """A 2-step run on a corpus file, then the file edited and its data folder prepared again with the same
    settings and as many tokens (so a resume accepts the folder and the loader's position): a new tokenizer.
    The data folder, the run and the tokenizer the run trained with."""
    tmp = tmp_path_factory.mktemp("reprepared")
    corpus, data, run = tmp / "corpus.jsonl", tmp / "data", tmp / "run"
    write_corpus(corpus, edited=False)
    prepare([str(corpus)], data, vocab_size=512, quiet=True)
    trained_with = (data / "tokenizer.json").read_bytes()
    Trainer(tiny_config(data, run, "train.max_steps=2", "train.sample_tokens=0"), quiet=True).train()
    write_corpus(corpus, edited=True)
    prepare([str(corpus)], data, vocab_size=512, overwrite=True, quiet=True)
    assert (data / "tokenizer.json").read_bytes() != trained_with
    return data, run, trained_with


@pytest.mark.parametrize("where", ["RUN", "RUN/checkpoints/latest"])
@pytest.mark.parametrize("hf", [False, True], ids=["fasttrain", "hf"])
def test_export_copies_the_tokenizer_the_run_trained_with(reprepared, tmp_path, capsys, where, hf):
    """Once the data's current tokenizer.json was copied, though final/ held the one the model trained with."""
    _, run, trained_with = reprepared
    code, _, err = cli(export.main, [where.replace("RUN", str(run)), "--out", tmp_path / "x", *(["--hf"] * hf)], capsys)
    assert code == 0, err
    assert (tmp_path / "x" / "tokenizer.json").read_bytes() == trained_with


def test_a_checkpoint_scores_with_the_tokenizer_the_run_trained_with(reprepared, tmp_path, capsys):
    """A checkpoint once tokenized with the data folder's current tokenizer: the same model scored the same
    text differently from its checkpoint than from its final weights (" the" and " s" swap ids here)."""
    _, run, _ = reprepared
    (tmp_path / "held_out.txt").write_text("Set the value of the attribute; the s of the list is the s.\n")
    scores = []
    for source in (run / "final", run / "checkpoints" / "step_0000002.pt"):
        code, out, err = cli(evaluate.main, [source, "--input", tmp_path / "held_out.txt", "--device", "cpu"], capsys)
        assert code == 0, err
        scores.append(out.split("(")[0])  # the metrics, without the source named after them
    assert scores[0] == scores[1]


def test_evaluate_split_val_refuses_a_data_folder_prepared_again(reprepared, capsys):
    """Its val split is token ids of another tokenizer now: scoring them would be a wrong number."""
    data, run, _ = reprepared
    code, _, err = cli(evaluate.main, [run, "--split", "val", "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{data / 'tokenizer.json'}: differs from {run / 'final' / 'tokenizer.json'}" in err


def test_resuming_on_a_data_folder_prepared_again_is_refused(reprepared):
    """The run carries its tokenizer (RUN/tokenizer.json): continuing on other token ids is refused, naming both
    files, before anything in the run directory changes."""
    data, run, trained_with = reprepared
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    trainer = Trainer(tiny_config(data, run, "train.max_steps=4", "train.sample_tokens=0"), quiet=True)
    with pytest.raises(UsageError, match="differs from") as refused:  # at resume, before the loader's rows
        trainer.resume("auto")
        trainer.train()
    trainer.close()
    assert str(data / "tokenizer.json") in str(refused.value) and str(run / "tokenizer.json") in str(refused.value)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert (run / "tokenizer.json").read_bytes() == trained_with


@pytest.fixture(scope="module")
def run(pydoc_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    Trainer(tiny_config(pydoc_data, out, "train.max_steps=2", "train.sample_tokens=0"), quiet=True).train()
    return out


def test_hf_export_into_a_sharded_model_folder_is_refused(run, tmp_path, capsys):
    """Its index and shards were left beside the new model.safetensors, and fasttrain's own model.init_from
    read the stale index. Nothing in the folder changes."""
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (folder / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, _, err = cli(export.main, [run, "--hf", "--out", folder], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "holds model-00001-of-00002.safetensors and 1 more, which this export would not replace" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("hf", [False, True], ids=["fasttrain", "hf"])
def test_an_export_replaces_a_previous_export_of_its_layout(run, tmp_path, capsys, hf):
    """What the refusal above leaves allowed: exporting again over the same layout's files."""
    for _ in range(2):
        code, _, err = cli(export.main, [run, "--out", tmp_path / "x", *(["--hf"] * hf)], capsys)
        assert code == 0, err


@pytest.mark.parametrize("link", ["checkpoint", "final", "latest"])
def test_export_through_a_link_exports_into_the_run_directory(run, tmp_path, capsys, monkeypatch, link):
    """Through a link to a checkpoint the default --out was ./export in the working directory, through a link
    to final/ links/export, and a link to checkpoints/latest was refused (its pointer read beside the link)."""
    target = {
        "checkpoint": run / "checkpoints" / "step_0000002.pt",
        "final": run / "final",
        "latest": run / "checkpoints" / "latest",
    }[link]
    (tmp_path / "links").mkdir()
    os.symlink(target, tmp_path / "links" / link)
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(run / "export", ignore_errors=True)
    code, _, err = cli(export.main, [Path("links") / link], capsys)
    assert code == 0, err
    assert (run / "export" / "model.safetensors").is_file()
    assert not (tmp_path / "export").exists() and not (tmp_path / "links" / "export").exists()


def test_sample_takes_a_weights_file(run, capsys):
    """`sample RUN/final/model.safetensors` was refused as not a loadable checkpoint: it is its directory."""
    args = ["--prompt", "def", "--temperature", "0", "--max-new-tokens", "4"]
    code, from_file, err = cli(sample.main, [run / "final" / "model.safetensors", *args], capsys)
    assert code == 0, err
    assert from_file == cli(sample.main, [run / "final", *args], capsys)[1]


def test_hf_export_keeps_the_source_models_token_ids_and_generation_config(pydoc_data, tmp_path, capsys):
    """A run continued from a Hugging Face Llama exported its bos and eos ids as the end-of-text token's and
    left out its generation_config.json; its GGUF export did so too (GGUF holds one eos: the list's first)."""
    transformers = pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    source = tmp_path / "hf"
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=3,
        eos_token_id=[4, 5],
    )
    transformers.LlamaForCausalLM(config).save_pretrained(source)
    shutil.copy(pydoc_data / "tokenizer.json", source / "tokenizer.json")
    assert (source / "generation_config.json").is_file()
    data = tmp_path / "data"
    prepare(["builtin:pydoc"], data, tokenizer_path=str(source / "tokenizer.json"), quiet=True)
    Trainer(
        tiny_config(
            data,
            tmp_path / "run",
            f"model.init_from={json.dumps(str(source))}",
            "data.vocab_size=0",
            f"data.tokenizer={json.dumps(str(source / 'tokenizer.json'))}",
            "train.max_steps=1",
            "train.sample_tokens=0",
        ),
        quiet=True,
    ).train()
    code, _, err = cli(export.main, [tmp_path / "run", "--hf", "--out", tmp_path / "back"], capsys)
    assert code == 0, err
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (3, [4, 5])
    generation_config = "generation_config.json"
    assert (tmp_path / "back" / generation_config).read_bytes() == (source / generation_config).read_bytes()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    assert back.generation_config.eos_token_id == [4, 5]
    code, _, err = cli(export.main, [tmp_path / "run", "--gguf", "--out", tmp_path / "model.gguf"], capsys)
    assert code == 0, err
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    ids = [reader.fields[f"tokenizer.ggml.{key}_token_id"].contents() for key in ("bos", "eos")]
    assert ids == [3, 4]


def test_resume_through_a_link_to_latest(pydoc_data, run, tmp_path):
    """The link's pointer was looked for beside the link: refused as not a loadable checkpoint."""
    os.symlink(run / "checkpoints" / "latest", tmp_path / "latest")
    trainer = Trainer(tiny_config(pydoc_data, run, "train.max_steps=2", "train.sample_tokens=0"), quiet=True)
    try:
        assert trainer.resume(tmp_path / "latest") == run / "checkpoints" / "step_0000002.pt"
    finally:
        trainer.close()
