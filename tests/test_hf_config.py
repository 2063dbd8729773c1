"""model.init_from's config.json read with every value type-checked where it is read (issue 101 items 3 and 6): a
value of the wrong type is one line naming the file, the key and the value, never a traceback from float() or int(),
and a non-integral number is never taken as an integer."""

from __future__ import annotations

import json

import pytest

from fasttrain.config import ModelConfig
from fasttrain.model.ensemble import build_model
from fasttrain.model.llama import LLAMA_NUMBERS, hf_llama_config, hf_llama_model_config
from fasttrain.model.weights import export_weights
from fasttrain.system.errors import UsageError
from tests.conftest import tiny_config

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "vocab_size": 512,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 5000.0,
}


ABSENT = object()


def read(tmp_path, **changes) -> ModelConfig:
    """The [model] of the config.json LLAMA with `changes` (ABSENT: the key left out)."""
    config = {k: v for k, v in {**LLAMA, **changes}.items() if v is not ABSENT}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return hf_llama_model_config(tmp_path, ModelConfig())


def test_a_good_config_reads_with_its_types(tmp_path):
    m = read(tmp_path, hidden_size=64.0, rope_parameters={"rope_type": "default", "rope_theta": 250.0})
    assert (m.d_model, m.n_kv_heads, m.rope_theta, m.norm_eps) == (64, 2, 250.0, 1e-6)
    assert type(m.d_model) is int and type(m.rope_theta) is float
    # null, as transformers reads it: as many key and value heads as query heads
    assert read(tmp_path, num_key_value_heads=None).n_kv_heads == 4
    assert read(tmp_path, rope_theta=ABSENT).rope_theta == 10000.0  # transformers' default base


@pytest.mark.parametrize(
    "changes, key, shown",
    [
        ({"rope_theta": "abc"}, "rope_theta", '"abc"'),
        ({"rope_theta": None}, "rope_theta", "null"),
        ({"rope_theta": [5000]}, "rope_theta", "[5000]"),
        ({"rope_theta": True}, "rope_theta", "true"),
        ({"rope_theta": float("nan")}, "rope_theta", "NaN"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": "abc"}}, "rope_parameters.rope_theta", '"abc"'),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": None}}, "rope_parameters.rope_theta", "null"),
        ({"num_key_value_heads": "two"}, "num_key_value_heads", '"two"'),
        ({"num_key_value_heads": [2]}, "num_key_value_heads", "[2]"),
        ({"num_key_value_heads": 1.5}, "num_key_value_heads", "1.5"),
        ({"hidden_size": 64.9}, "hidden_size", "64.9"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers", "2.5"),
        ({"vocab_size": "512"}, "vocab_size", '"512"'),
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps", '"1e-6"'),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings", '"false"'),
        ({"head_dim": "16"}, "head_dim", '"16"'),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line_naming_file_key_and_value(tmp_path, changes, key, shown):
    with pytest.raises(UsageError) as e:
        read(tmp_path, **changes)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: {key} = {shown} ("), message
    assert "\n" not in message


@pytest.mark.parametrize("bos", ["1", [1, "2"], True, -1])
def test_export_hf_refuses_bos_and_eos_ids_of_the_wrong_type_and_writes_nothing(pydoc_data, tmp_path, bos):
    """A model continued from a Llama keeps its bos/eos ids in the --hf export's config.json: type-checked as read."""
    source = tmp_path / "llama"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({**LLAMA, "bos_token_id": bos}))
    cfg = tiny_config(pydoc_data, tmp_path / "run", f'model.init_from="{source}"', "model.vocab_size=512")
    state = build_model(cfg.model).state_dict()
    with pytest.raises(UsageError) as e:
        export_weights(state, cfg, tmp_path / "out", hf=True, tokenizer=pydoc_data / "tokenizer.json")
    assert str(e.value).startswith(f"{source / 'config.json'}: bos_token_id = {json.dumps(bos)}"), e.value
    assert not (tmp_path / "out").exists()


def test_the_config_json_an_export_writes_reads_back_to_the_same_numbers(tmp_path):
    """One table (llama.LLAMA_NUMBERS) writes config.json and reads it: every number of the shape comes back."""
    model = ModelConfig(
        vocab_size=300, d_model=96, n_layers=3, n_heads=6, n_kv_heads=2, ffn_hidden=160, max_seq_len=48,
        norm_eps=1e-6, rope_theta=123.0, tie_embeddings=True,
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf_llama_config(model, 0, "float32")))
    back = hf_llama_model_config(tmp_path, ModelConfig(mlp="relu2", qk_norm=True, logit_softcap=15.0))
    assert all(getattr(back, n.ours) == getattr(model, n.ours) for n in LLAMA_NUMBERS if n.ours)
    assert (back.mlp, back.qk_norm, back.logit_softcap, back.tie_embeddings) == ("swiglu", False, 0.0, True)
