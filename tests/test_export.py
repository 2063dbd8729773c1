"""Export: the safetensors format byte for byte, fasttrain's layout, and Hugging Face's Llama layout."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from fasttrain import Trainer
from fasttrain.export import export
from fasttrain.export import main as export_main
from fasttrain.model.weights import load_exported, read_safetensors, write_safetensors
from fasttrain.system.errors import run_cli
from tests.conftest import tiny_config


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


def test_safetensors_layout_matches_the_format(tmp_path):
    tensors = random_tensors()
    path = write_safetensors(tmp_path / "t.safetensors", tensors, {"format": "pt"})
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0 and data[8:9] == b"{"
    header = json.loads(data[8:8 + length])
    assert header.pop("__metadata__") == {"format": "pt"}
    body = data[8 + length:]
    codes = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.int64: "I64", torch.bool: "BOOL"}
    end = 0
    for name, t in tensors.items():
        info = header[name]
        assert info["dtype"] == codes[t.dtype] and info["shape"] == list(t.shape)
        begin, stop = info["data_offsets"]
        assert begin == end  # no holes, in order
        assert body[begin:stop] == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        end = stop
    assert end == len(body)
    loaded = read_safetensors(path)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())


def test_safetensors_interoperates_with_the_reference_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = random_tensors()
    ours = write_safetensors(tmp_path / "ours.safetensors", tensors)
    assert all(torch.equal(v, tensors[k]) for k, v in st.load_file(ours).items())
    st.save_file(tensors, tmp_path / "theirs.safetensors")
    assert all(torch.equal(v, tensors[k]) for k, v in read_safetensors(tmp_path / "theirs.safetensors").items())


@pytest.fixture(scope="module")
def trained(pydoc_data, tmp_path_factory):
    """A tiny run with grouped-query attention, trained a few steps so no weight is at its init value."""
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(tiny_config(pydoc_data, out, "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
                                  "train.max_steps=3", "train.sample_tokens=0"), quiet=True)
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


@pytest.mark.parametrize("where", ["RUN", "RUN/final", "RUN/checkpoints", "RUN/checkpoints/latest",
                                   "RUN/checkpoints/step_0000003.pt"])
def test_export_takes_every_run_path_that_sample_and_evaluate_take(trained, tmp_path, capsys, where):
    """`export RUN/final` once said there was no checkpoint there; every path names the same weights."""
    trainer, out = trained
    with pytest.raises(SystemExit) as exit_:
        run_cli(export_main, [where.replace("RUN", str(out)), "--out", str(tmp_path / "x")])
    assert exit_.value.code == 0, capsys.readouterr().err
    exported = read_safetensors(tmp_path / "x" / "model.safetensors")
    assert exported.keys() == read_safetensors(out / "final" / "model.safetensors").keys()
    assert all(torch.equal(exported[k], v) for k, v in trainer.model.state_dict().items() if k in exported)


@pytest.mark.parametrize("tied", [True, False])
def test_hugging_face_llama_export_gives_the_same_logits(pydoc_data, tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    trainer = Trainer(tiny_config(pydoc_data, tmp_path / "run", "model.d_model=64", "model.n_heads=4",
                                  "model.n_kv_heads=2", "model.rope_theta=500.0", "model.norm_eps=1e-6",
                                  f"model.tie_embeddings={str(tied).lower()}", "train.max_steps=2",
                                  "train.sample_tokens=0"), quiet=True)
    trainer.train()
    export(tmp_path / "run", tmp_path / "hf", hf=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        expected = trainer.model.eval()(tokens)
        assert torch.allclose(hf(tokens).logits, expected, atol=1e-5, rtol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def f(x):\n    return x + 1"
    assert tokenizer(text)["input_ids"] == trainer.tokenizer.encode(text)


def test_hf_export_without_the_tokenizer_writes_nothing(pydoc_data, tmp_path, capsys):
    """--hf needs the run's tokenizer: gone, the export stops before the weights are written, not after."""
    data = tmp_path / "data"
    shutil.copytree(pydoc_data, data)
    Trainer(tiny_config(data, tmp_path / "run", "train.max_steps=2", "train.sample_tokens=0"), quiet=True).train()
    (data / "tokenizer.json").unlink()
    with pytest.raises(SystemExit) as exit_:
        run_cli(export_main, [str(tmp_path / "run"), "--hf", "--out", str(tmp_path / "hf")])
    assert exit_.value.code == 2
    assert "tokenizer.json: no such tokenizer file" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
