"""The real default model (SmolLM2-135M-Instruct) traced end to end."""

import math
from importlib import resources

import pytest
import torch

from sparsetrace import StreamConfig, load_trace, trace
from sparsetrace.cli import main

pytestmark = pytest.mark.integration

SAMPLE = resources.files("sparsetrace").joinpath("data/sample.txt").read_text()


def test_full_k_trace_gives_the_dense_models_logits(default_model):
    model, tokenizer = default_model
    ids = tokenizer(SAMPLE, return_tensors="pt")["input_ids"][0, :700]
    with torch.inference_mode():
        dense = model(ids[None], use_cache=False).logits[0, -1]
    tr = trace(model, tokenizer, input_ids=ids, config=StreamConfig(k=11, block_size=64))
    assert tr.stats()["sparsity"] == 0.0, "k covers every block"
    assert (tr.next_token_logits - dense).abs().max().item() < 1e-4
    assert model.config._attn_implementation == "sdpa", "the model is restored"


def test_sample_trace_through_the_cli_round_trips(default_model, tmp_path, capsys):
    path = tmp_path / "sample.sptrace"
    assert main(["trace", "--sample", "-o", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "sparsity" in out and "compression" in out
    tr = load_trace(path)
    model, tokenizer = default_model
    assert torch.equal(tr.token_ids, tokenizer(SAMPLE, return_tensors="pt")["input_ids"][0])
    assert (tr.num_layers, tr.num_heads, tr.config.k, tr.config.block_q) == (30, 9, 8, 64)
    stats = tr.stats()
    n_q = math.ceil(tr.num_tokens / 64)
    # every row keeps min(k, searchable) selected blocks: searchable = i - 1 for row i (sink 0, local i)
    selected_per_head = sum(min(8, max(i - 1, 0)) for i in range(n_q))
    assert stats["selected_blocks"] == 30 * 9 * selected_per_head
    assert 0.6 < stats["sparsity"] < 0.8 and stats["dense_to_trace_ratio"] > 1000
    again = tmp_path / "again.sptrace"
    tr.save(again)
    reloaded = load_trace(again)
    for layer in (0, 29):
        for a, b in zip(tr.blocks(layer), reloaded.blocks(layer), strict=True):
            assert torch.equal(a, b)
    assert torch.equal(tr.next_token_logits, reloaded.next_token_logits)
