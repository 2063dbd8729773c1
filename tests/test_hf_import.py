"""Continued pre-training from a Hugging Face Llama: model.init_from, prepare --tokenizer DIR, and the
round trip back out through export --hf. Every model here is a tiny random LlamaForCausalLM made in the
test (no download); the tests skip without transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fasttrain import export, prepare, train
from fasttrain.config import load_config
from fasttrain.planning.plan import init_shape
from fasttrain.plot import read_metrics
from fasttrain.system.errors import run_cli
from tests.conftest import tiny_args

transformers = pytest.importorskip("transformers")


def tiny_llama(directory: Path, tokenizer: Path, tied: bool, shards: bool) -> transformers.LlamaForCausalLM:
    """A random 2-layer Llama with grouped-query attention and a non-default RoPE base and eps, saved to
    `directory` (in several safetensors shards when `shards`) with `tokenizer` beside it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, max_shard_size="100KB" if shards else "1GB")
    shutil.copy(tokenizer, directory / "tokenizer.json")
    return model


def cli(main, args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        run_cli(main, args)
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    return out


@pytest.mark.parametrize("tied, shards", [(False, True), (True, False)], ids=["untied-sharded", "tied-one-file"])
def test_continue_from_a_hugging_face_llama_and_export_it_back(pydoc_data, tmp_path, capsys, tied, shards):
    """Its config.json gives the shape, its weights the start; after a step at a learning rate too small to
    move a weight, export --hf loads in transformers with the source model's logits."""
    source = tiny_llama(tmp_path / "hf", pydoc_data / "tokenizer.json", tied, shards)
    assert shards == (tmp_path / "hf" / "model.safetensors.index.json").exists()
    cli(
        prepare.main,
        ["--input", "builtin:pydoc", "--out", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "hf")],
        capsys,
    )  # the model's own tokenizer, named by its directory
    said = cli(
        train.main,
        tiny_args(
            tmp_path / "data",
            tmp_path / "run",
            f"model.init_from={tmp_path / 'hf'}",
            "data.inputs=[]",
            "data.vocab_size=0",
            "train.max_steps=1",
            "optim.lr=1e-30",
            "optim.embedding_lr=0",  # base.toml's table and head rates: optim.lr's too
            "optim.head_lr=0",
            "schedule.min_lr=0",
            "optim.weight_decay=0",
            "train.sample_tokens=0",
        ),
        capsys,
    )
    assert "note: model.init_from: the shape is" in said and "d_model 32 -> 64" in said
    cli(export.main, [str(tmp_path / "run"), "--hf", "--out", str(tmp_path / "back")], capsys)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        assert torch.allclose(back(tokens).logits, source(tokens).logits, atol=1e-4, rtol=1e-4)


def hf_dir(tmp_path: Path, **changes) -> str:
    """A Llama config.json with `changes` (no weights: the shape is read, and refused, first)."""
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    ).to_dict()
    (tmp_path / "hf").mkdir(exist_ok=True)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **changes}))
    return str(tmp_path / "hf")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "gpt2"}, 'config.json: model_type = "gpt2" (not "llama")'),
        ({"attention_bias": True}, "config.json: attention_bias = true (the linear layers here have no bias)"),
        ({"hidden_act": "gelu"}, 'config.json: hidden_act = "gelu" (the MLP here is SwiGLU, with silu)'),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "config.json: rope_scaling = "),
        ({"head_dim": 32}, "config.json: head_dim = 32 (must be hidden_size / num_attention_heads = 16 here)"),
        ({}, "hf: holds no model.safetensors or model.safetensors.index.json"),
    ],
    ids=["not-llama", "bias", "gelu", "scaled-rope", "head-dim", "no-weights"],
)
def test_what_cannot_be_mapped_is_one_line(pydoc_data, tmp_path, capsys, changes, message):
    with pytest.raises(SystemExit) as done:
        run_cli(
            train.main,
            tiny_args(
                pydoc_data,
                tmp_path / "run",
                f"model.init_from={hf_dir(tmp_path, **changes)}",
                "train.max_steps=2",
                "train.sample_tokens=0",
            ),
        )
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_a_llama_to_continue_from_trains_as_a_llama_and_says_what_it_replaced(tmp_path):
    """model.mlp = "relu2", model.qk_norm and model.embedding_norm are not the Llama's: the run takes its SwiGLU,
    plain attention and plain embedding, and the init_from note names each. zero_init_projections is only an
    init, which the Llama's weights replace."""
    beyond = ["model.mlp=relu2", "model.qk_norm=true", "model.embedding_norm=true"]
    cfg = load_config("configs/base.toml", [f"model.init_from={hf_dir(tmp_path)}", *beyond])
    shaped, note, _ = init_shape(cfg)
    assert shaped.mlp == "swiglu" and not shaped.qk_norm and not shaped.embedding_norm
    assert "mlp relu2 -> swiglu" in note and "qk_norm True -> False" in note and "embedding_norm True -> False" in note


def test_a_runs_hf_export_continues_the_same_model(pydoc_data, tmp_path, capsys):
    """export --hf, then a run with model.init_from of it, continues the model trained: base.toml's untied head and
    normalised embedding (folded into the table), validated before any update moves a weight (a step at 1e-30)
    within 1e-4 of the first run's last validation loss. A run's directory given to init_from says how to export."""
    common = ["train.eval_steps=4", "train.sample_tokens=0", "model.tie_embeddings=false", "model.embedding_norm=true"]
    first = [*common, "train.max_steps=6", "train.eval_interval=6", "optim.embedding_lr=0.05", "optim.head_lr=0.004"]
    cli(train.main, tiny_args(pydoc_data, tmp_path / "run", *first), capsys)
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, tiny_args(pydoc_data, tmp_path / "on", *common, f"model.init_from={tmp_path / 'run'}"))
    err = capsys.readouterr().err
    assert done.value.code == 2 and f"fasttrain export {tmp_path / 'run'} --hf --out DIR" in err, err
    cli(export.main, [str(tmp_path / "run"), "--hf", "--out", str(tmp_path / "hf")], capsys)
    still = ["train.max_steps=1", "train.eval_interval=1", "optim.lr=1e-30", "optim.embedding_lr=0", "optim.head_lr=0"]
    still += ["schedule.min_lr=0", "optim.weight_decay=0"]
    cli(
        train.main,
        tiny_args(pydoc_data, tmp_path / "on", *common, *still, f"model.init_from={tmp_path / 'hf'}"),
        capsys,
    )
    last, resumed = (
        [e["val_loss"] for e in read_metrics(run) if e["event"] == "eval"][-1]
        for run in (tmp_path / "run", tmp_path / "on")
    )
    assert resumed == pytest.approx(last, abs=1e-4)
