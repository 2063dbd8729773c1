"""kernels.patch_hf_model on tiny random transformers models: the same loss and gradients as unpatched,
the logits never built when labels are given, and returned when asked for."""

from __future__ import annotations

import copy

import pytest
import torch

from fasttrain_kernels import RMSNorm, patch_hf_model

transformers = pytest.importorskip("transformers")


def tiny(family: str = "llama", tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
    config = configs[family](
        vocab_size=300,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return transformers.AutoModelForCausalLM.from_config(config).float()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 300, (3, 21))  # an odd length: rows are not a multiple of any block
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt not trained on
    labels[2, 15:] = -100  # padding
    return ids, labels


@pytest.mark.parametrize("family, tied", [("llama", False), ("llama", True), ("qwen2", False)])
@pytest.mark.parametrize("items", [None, 29], ids=["mean", "num_items_in_batch"])
def test_the_patched_model_has_the_same_loss_and_gradients(family, tied, items):
    ref = tiny(family, tied)
    ours = patch_hf_model(copy.deepcopy(ref))
    norms = [m for m in ours.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * 2 + 1  # two per block and the final one
    ids, labels = batch()
    extra = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    expected, got = ref(ids, labels=labels, **extra), ours(ids, labels=labels, **extra)
    assert got.logits is None  # never built
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    expected.loss.backward()
    got.loss.backward()
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_logits_come_back_when_asked_for_or_without_labels():
    ref, ours = tiny(), patch_hf_model(tiny())
    ids, labels = batch()
    with torch.no_grad():
        wanted = ours(ids, labels=labels, return_logits=True)
        torch.testing.assert_close(wanted.logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wanted.loss, ref(ids, labels=labels).loss, rtol=1e-5, atol=1e-5)
        assert ours(ids).loss is None and ours(ids).logits.shape == (3, 21, 300)
        generated = ours.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
        assert torch.equal(generated, ref.generate(ids[:1, :4], max_new_tokens=3, do_sample=False))


def test_a_model_of_another_family_is_refused():
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not one of llama, mistral, qwen2, qwen3"):
        patch_hf_model(transformers.GPT2LMHeadModel(config))


def test_patching_twice_is_a_no_op():
    """The second call wrapped the first: return_logits reached only the outer forward, and the logits were None."""
    ref, ours = tiny(), patch_hf_model(patch_hf_model(tiny()))
    ids, labels = batch()
    with torch.no_grad():
        wanted = ours(ids, labels=labels, return_logits=True)
        torch.testing.assert_close(wanted.logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(ids, labels=labels).loss, ref(ids, labels=labels).loss, rtol=1e-5, atol=1e-5)


def test_return_dict_false_returns_a_tuple_as_transformers_does():
    """It was an AttributeError (the inner model returned a tuple); now the loss comes first, as unpatched."""
    ref, ours = tiny(), patch_hf_model(tiny())
    ids, labels = batch()
    with torch.no_grad():
        got, expected = ours(ids, labels=labels, return_dict=False), ref(ids, labels=labels, return_dict=False)
    assert isinstance(got, tuple)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)


def test_every_label_ignored_is_nan_as_unpatched():
    """The kernels' mean over no counted target is 0; transformers' loss is 0 / 0, nan, and so is the patched one."""
    ref, ours = tiny(), patch_hf_model(tiny())
    ids, _ = batch()
    ignored = torch.full_like(ids, -100)
    with torch.no_grad():
        assert ref(ids, labels=ignored).loss.isnan() and ours(ids, labels=ignored).loss.isnan()


def test_a_positional_mask_and_the_kv_cache_come_through_as_unpatched():
    """The patched forward named past_key_values, which transformers 5.24 renamed to cache: every call with labels
    failed there. The mask still goes second, and the cache comes back under this transformers' own name."""
    ref, ours = tiny(), patch_hf_model(tiny())
    ids, labels = batch()
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0  # the padding labels[2, 15:] ignores
    with torch.no_grad():
        got = ours(ids, mask, labels=labels, use_cache=True)
        expected = ref(ids, mask, labels=labels, use_cache=True)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    assert set(got.keys()) == set(expected.keys()) - {"logits"}
    (cache_name,) = set(got.keys()) - {"loss"}
    assert got[cache_name].get_seq_length() == expected[cache_name].get_seq_length() == ids.shape[1]
    with pytest.raises(TypeError):  # labels is a keyword, as in every transformers call: never taken as a mask
        ours(ids, mask, None, None, None, labels)
