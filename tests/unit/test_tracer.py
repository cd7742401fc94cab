"""trace(): one sparse forward pass recorded as a Trace; input checks before any work."""

import pytest
import torch
from tiny_models import tiny_model

from sparsetrace import tracer as tracer_module
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError, MemoryRequestError
from sparsetrace.tracer import trace

TEXT = "Sparse traces keep the blocks that matter. " * 8  # 344 byte tokens


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_full_k_trace_reproduces_the_models_logits(llama, tiny_tokenizer):
    ids = tiny_tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        dense = llama(ids).logits[0, -1]
    tr = trace(llama, tiny_tokenizer, TEXT, StreamConfig(k=64, block_size=16))
    torch.testing.assert_close(tr.next_token_logits, dense, atol=1e-4, rtol=1e-4)
    assert tr.num_layers == 3 and tr.num_heads == 4 and tr.num_tokens == ids.shape[1]
    assert torch.equal(tr.token_ids, ids[0])
    assert tr.stats()["sparsity"] == pytest.approx(0.0, abs=1e-12)
    assert llama.config._attn_implementation == "eager"


def test_small_k_trace_keeps_k_blocks_per_row(llama, tiny_tokenizer):
    tr = trace(llama, tiny_tokenizer, TEXT, StreamConfig(k=2, block_size=16))
    idx, mass = tr.blocks(1)
    kept = (idx >= 0).sum(-1)
    assert int(kept[:, -1].min()) == 4, "sink + 2 selected + local on late rows"
    torch.testing.assert_close(mass.sum(-1), torch.ones(kept.shape))
    assert 0.5 < tr.stats()["sparsity"] < 1.0
    assert tr.extra["forward"] == "sparse" and tr.extra["seconds"] >= 0


def test_input_ids_and_max_tokens(llama, tiny_tokenizer):
    ids = torch.arange(100) % 250
    tr = trace(llama, tiny_tokenizer, input_ids=ids[None], config=StreamConfig(k=2, block_size=16), max_tokens=70)
    assert torch.equal(tr.token_ids, ids[:70])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"text": ""}, "empty"),
        ({"text": " \n\t"}, "empty"),
        ({"text": "a", "input_ids": [1, 2]}, "exactly one"),
        ({}, "exactly one"),
        ({"input_ids": []}, "no tokens"),
        ({"input_ids": torch.zeros(2, 5, dtype=torch.long)}, "one sequence"),
        ({"text": "abc", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_input_is_refused(llama, tiny_tokenizer, kwargs, match):
    with pytest.raises(InputError, match=match):
        trace(llama, tiny_tokenizer, **kwargs)


def test_text_longer_than_the_context(llama, tiny_tokenizer):
    long_text = "x" * (llama.config.max_position_embeddings + 5)
    with pytest.raises(InputError, match="longer than the model's 1,024-token context.*allow-long"):
        trace(llama, tiny_tokenizer, long_text)
    tr = trace(llama, tiny_tokenizer, long_text, StreamConfig(k=2, block_size=64), allow_long=True)
    assert tr.num_tokens == 1029


def test_memory_is_checked_before_any_work(llama, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(tracer_module, "available_memory", lambda: 1 << 20)

    def never(*args, **kwargs):
        raise AssertionError("the model must not run")

    monkeypatch.setattr(llama, "forward", never)
    with pytest.raises(MemoryRequestError, match="GiB but only 0.0 GiB"):
        trace(llama, tiny_tokenizer, TEXT)


def test_memory_estimate_grows_linearly(llama):
    cfg = StreamConfig()
    small, large = (tracer_module.estimate_memory(llama, t, cfg) for t in (10_000, 20_000))
    huge = tracer_module.estimate_memory(llama, 40_000, cfg)
    assert huge - large == pytest.approx(2 * (large - small), rel=0.01)


def test_progress_bar_over_layers(llama, tiny_tokenizer, capsys):
    trace(llama, tiny_tokenizer, TEXT, StreamConfig(k=2, block_size=16), progress=True)
    assert "3/3" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3"])
def test_dense_forward_keeps_the_models_output(name, tiny_tokenizer):
    model = tiny_model(name)
    ids = tiny_tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        dense = model(ids).logits[0, -1]
    tr = trace(model, tiny_tokenizer, TEXT, StreamConfig(k=2, block_size=16), forward="dense")
    torch.testing.assert_close(tr.next_token_logits, dense, atol=1e-5, rtol=1e-5)
    sparse = trace(model, tiny_tokenizer, TEXT, StreamConfig(k=2, block_size=16))
    assert torch.equal(tr.blocks(0)[0], sparse.blocks(0)[0]), "layer 0 sees the same q and k either way"
    for layer in range(3):
        recall_rows = tr.blocks(layer)[1].sum(-1)
        assert float(recall_rows.max()) <= 1 + 1e-5 and float(recall_rows.min()) > 0


def test_unknown_forward_is_refused(llama, tiny_tokenizer):
    with pytest.raises(InputError, match="forward"):
        trace(llama, tiny_tokenizer, TEXT, forward="fast")
