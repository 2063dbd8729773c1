"""Export: the safetensors format byte for byte, fasttrain's layout, and Hugging Face's Llama layout."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from benchmarks.studies.isa_spread import MAIN_JOB_SETS
from fasttrain import Trainer
from fasttrain.config import load_config
from fasttrain.export import export
from fasttrain.export import main as export_main
from fasttrain.model.transformer import Transformer
from fasttrain.model.weights import (
    hf_llama_tensors,
    load_exported,
    read_hf_llama_weights,
    read_safetensors,
    write_safetensors,
)
from fasttrain.system.errors import run_cli
from fasttrain.train import main as train_main
from tests.conftest import TINY_GQA, tiny_config


def random_tensors() -> dict[str, torch.Tensor]:
    return {
        "a.weight": torch.randn(3, 5),
        "b": torch.randn(7, dtype=torch.float64),
        "c": torch.randn(2, 3, 4).to(torch.bfloat16),
        "d": torch.randn(5).half(),  # 10 bytes: what follows is not 8-byte aligned, which the format allows
        "ids": torch.randint(-1000, 1000, (4,)),
        "mask": torch.rand(6) > 0.5,
        "scalar": torch.tensor(3.5),
    }


def test_safetensors_round_trip_every_dtype_through_the_reference_library(tmp_path):
    """Written and read by the safetensors library: what another reader loads, with the metadata kept,
    and the write atomic (no temporary file left beside it)."""
    import safetensors

    tensors = random_tensors()
    path = write_safetensors(tmp_path / "t.safetensors", tensors, {"format": "pt"})
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == tensors.keys()
    loaded = read_safetensors(path)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert json.loads(path.read_bytes()[8 : 8 + length])["__metadata__"] == {"format": "pt"}


@pytest.fixture(scope="module")
def trained(pydoc_data, tmp_path_factory):
    """A tiny run with grouped-query attention, trained a few steps so no weight is at its init value."""
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(tiny_config(pydoc_data, out, *TINY_GQA, "train.max_steps=3", "train.sample_tokens=0"), quiet=True)
    trainer.train()
    return trainer, out


def test_final_weights_load_without_the_trainer(trained):
    trainer, out = trained
    model = load_exported(out / "final")
    tokens = torch.randint(0, 512, (2, 16))
    model.eval(), trainer.model.eval()
    assert torch.equal(model(tokens), trainer.model(tokens))
    assert "output.weight" not in read_safetensors(out / "final" / "model.safetensors")  # tied: stored once


def test_export_cli_from_a_run_directory(trained, tmp_path, capsys):
    _, out = trained
    with pytest.raises(SystemExit) as exit_:
        run_cli(export_main, [str(out), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"])
    assert exit_.value.code == 0
    assert str(tmp_path / "bf16" / "model.safetensors") in capsys.readouterr().out
    assert all(t.dtype == torch.bfloat16 for t in read_safetensors(tmp_path / "bf16" / "model.safetensors").values())


@pytest.mark.parametrize(
    "where", ["RUN", "RUN/final", "RUN/checkpoints", "RUN/checkpoints/latest", "RUN/checkpoints/step_0000003.pt"]
)
def test_export_takes_every_run_path_that_sample_and_evaluate_take(trained, tmp_path, capsys, where):
    """`export RUN/final` once said there was no checkpoint there; every path names the same weights."""
    trainer, out = trained
    with pytest.raises(SystemExit) as exit_:
        run_cli(export_main, [where.replace("RUN", str(out)), "--out", str(tmp_path / "x")])
    assert exit_.value.code == 0, capsys.readouterr().err
    exported = read_safetensors(tmp_path / "x" / "model.safetensors")
    assert exported.keys() == read_safetensors(out / "final" / "model.safetensors").keys()
    assert all(torch.equal(exported[k], v) for k, v in trainer.model.state_dict().items() if k in exported)


@pytest.mark.parametrize(
    "tied,normed",
    [(True, False), (False, False), (False, True), (True, True)],
    ids=["tied", "untied", "untied-normed", "tied-normed"],  # untied-normed: base.toml's head and embedding
)
def test_hugging_face_llama_export_gives_the_same_logits(pydoc_data, tmp_path, tied, normed):
    """The Llama computes the model's logits and greedy tokens; model.embedding_norm folds into the table (exact:
    the same op on each row), which unties a tied head."""
    transformers = pytest.importorskip("transformers")
    trainer = Trainer(
        tiny_config(
            pydoc_data,
            tmp_path / "run",
            *TINY_GQA,
            "model.rope_theta=500.0",
            "model.norm_eps=1e-6",
            f"model.tie_embeddings={str(tied).lower()}",
            f"model.embedding_norm={str(normed).lower()}",
            "optim.embedding_lr=0.05",  # base.toml's rates: the rows move far from unit scale, so the fold matters
            "optim.head_lr=0.004",
            "train.max_steps=2",
            "train.sample_tokens=0",
        ),
        quiet=True,
    )
    trainer.train()
    export(tmp_path / "run", tmp_path / "hf", hf=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        expected = trainer.model.eval()(tokens)
        assert torch.allclose(hf(tokens).logits, expected, atol=1e-5, rtol=1e-4)
        prompt = tokens[:1, :8]
        greedy = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 8:]
        ours = prompt
        for _ in range(12):
            ours = torch.cat([ours, trainer.model(ours)[:, -1:].argmax(-1)], dim=1)
        assert greedy.tolist() == ours[0, 8:].tolist()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] == (tied and not normed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def f(x):\n    return x + 1"
    assert tokenizer(text)["input_ids"] == trainer.tokenizer.encode(text)


@pytest.mark.subprocess  # a whole run of the main job, as test_pinned_losses's
def test_the_main_jobs_model_exports_and_transformers_computes_its_logits(pydoc_data, tmp_path):
    """configs/base.toml's own model, trained as the main job (its recipe, its model options, a few steps), then
    `fasttrain export RUN --hf`: transformers loads it with no code of ours and computes final/'s logits. A model
    option added to base.toml that a Llama cannot hold fails here, not in a user's hands (issue 90)."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    assert (
        train_main(
            ["configs/base.toml", "--quiet", "--set", f"data.dir={pydoc_data}", f"train.out_dir={out}", *MAIN_JOB_SETS]
        )
        == 0
    )
    assert export_main([str(out), "--hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ours = load_exported(out / "final").eval()
    tokens = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-4)


def test_hf_export_without_the_tokenizer_writes_nothing(pydoc_data, tmp_path, capsys):
    """--hf needs the run's tokenizer: gone (final/'s, the run's copy and the data's), the export stops before
    the weights are written, not after."""
    data = tmp_path / "data"
    shutil.copytree(pydoc_data, data)
    Trainer(tiny_config(data, tmp_path / "run", "train.max_steps=2", "train.sample_tokens=0"), quiet=True).train()
    for copy in (data, tmp_path / "run", tmp_path / "run" / "final"):
        (copy / "tokenizer.json").unlink()
    with pytest.raises(SystemExit) as exit_:
        run_cli(export_main, [str(tmp_path / "run"), "--hf", "--out", str(tmp_path / "hf")])
    assert exit_.value.code == 2
    assert "tokenizer.json: no such tokenizer file" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("tied", [False, True])
def test_the_embedding_norm_folds_into_the_table_exactly(tmp_path, tied):
    """In fp64, the model the Llama layout describes (no embedding norm, the table normalised row by row, an untied
    head) gives the logits of the model with the norm to 1e-12: the fold is the norm itself, not an approximation of
    it, so what differs in fp32 is rounding. Read back as model.init_from reads a Llama."""
    shape = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4"]
    cfg = load_config(None, [*shape, "model.embedding_norm=true", f"model.tie_embeddings={str(tied).lower()}"]).model
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():
        model.embed.weight.mul_(torch.rand(512, 1, dtype=torch.float64) * 4)  # rows far from unit RMS
    write_safetensors(tmp_path / "model.safetensors", hf_llama_tensors(model.state_dict(), cfg))
    llama_cfg = load_config(None, [*shape, "model.tie_embeddings=false"]).model  # what the export's config.json says
    llama = Transformer(llama_cfg).double().eval()
    llama.load_state_dict(read_hf_llama_weights(tmp_path, llama_cfg))
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(llama(tokens), model(tokens), atol=1e-12, rtol=0)
