"""The model runs on sparse attention in every layer, for every supported architecture."""

import pytest
import torch
from tiny_models import ARCHITECTURES, WINDOW, tiny_model

from sparsetrace.backend import ATTENTION_NAME, sparse_attention
from sparsetrace.blocks import row_key_range
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError, UnsupportedModelError
from sparsetrace.models import describe_model

TOKENS = 150  # several sliding windows long


def _sparse_logits(model, ids, config, seen=None):
    def on_layer(record):
        if seen is not None:
            seen[record.layer] = record.selection

    with torch.no_grad(), sparse_attention(model, config, on_layer):
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_full_k_equals_the_models_own_attention(name):
    model = tiny_model(name)  # eager attention: softcap and sliding windows included
    ids = torch.randint(0, 97, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
    seen = {}
    sparse = _sparse_logits(model, ids, StreamConfig(k=16, block_size=16), seen)
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)
    assert sorted(seen) == list(range(model.config.num_hidden_layers)), "every layer ran sparse"
    assert model.config._attn_implementation == "eager", "the model's attention is restored"


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_full_k_mass_schedule_equals_the_models_own_attention(name):
    model = tiny_model(name)
    ids = torch.randint(0, 97, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
    sparse = _sparse_logits(model, ids, StreamConfig(k=16, block_size=16, k_schedule="mass"))
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_full_coverage_equals_the_models_own_attention(name):
    """p = 1 with k_max covering every block: each row keeps all it can see, on every architecture."""
    model = tiny_model(name)
    ids = torch.randint(0, 97, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
    seen = {}
    sparse = _sparse_logits(model, ids, StreamConfig(block_size=16, coverage=1.0, k_max=10), seen)
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)
    assert all(float(s.coverage.min()) > 1 - 1e-4 for s in seen.values()), "every row reports all of its attention"


@pytest.mark.parametrize("name", ["mistral", "gemma3", "qwen2"])
def test_sliding_layers_never_select_outside_their_window(name):
    model = tiny_model(name)
    windows = describe_model(model)["sliding_windows"]
    assert WINDOW in windows
    ids = torch.randint(0, 97, (1, TOKENS))
    seen = {}
    _sparse_logits(model, ids, StreamConfig(k=2, block_size=8), seen)
    for layer, window in enumerate(windows):
        first, last = row_key_range(TOKENS, 8, 8, window)
        idx = seen[layer].indices[0]
        valid = idx >= 0
        assert bool(((idx >= first[:, None]) | ~valid).all()) and bool(((idx <= last[:, None]) | ~valid).all())
        if window is not None:
            assert int(idx[..., 0].max()) > 0, "late rows of sliding layers have no sink inside the window"


def test_sparse_attention_changes_the_output():
    """A small k must actually change the logits (the sparse path is really used)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, TOKENS))
    with torch.no_grad():
        dense = model(ids).logits
    sparse = _sparse_logits(model, ids, StreamConfig(k=1, block_size=8, sinks=0, local=0))
    assert (sparse - dense).abs().max() > 1e-3


def test_attention_is_restored_after_an_error():
    model = tiny_model("llama", attn_implementation="sdpa")

    def fail(record):
        raise KeyError("boom")

    with pytest.raises(KeyError), torch.no_grad(), sparse_attention(model, StreamConfig(), fail):
        assert model.config._attn_implementation == ATTENTION_NAME
        model(torch.randint(0, 97, (1, 20)), use_cache=False)
    assert model.config._attn_implementation == "sdpa"


def test_padded_batches_are_refused():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    with pytest.raises(InputError, match="padded"), torch.no_grad():
        with sparse_attention(model, StreamConfig(), lambda *a: None):
            model(ids, attention_mask=mask, use_cache=False)


def test_kv_cache_is_refused():
    model = tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match="cache"), torch.no_grad():
        with sparse_attention(model, StreamConfig(), lambda *a: None):
            model.generate(torch.randint(0, 97, (1, 10)), max_new_tokens=2, do_sample=False)


def test_attention_sinks_are_refused_before_any_work():
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
    )
    model = GptOssForCausalLM(config).eval()
    with pytest.raises(UnsupportedModelError, match="sinks"):
        with sparse_attention(model, StreamConfig(), lambda *a: None):
            pass


def test_encoder_decoders_are_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        with sparse_attention(model, StreamConfig(), lambda *a: None):
            pass
