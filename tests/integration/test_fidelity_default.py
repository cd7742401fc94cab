"""Fidelity on the real default model: recall vs the oracle, behaviour, min-k, and full k = dense."""

from importlib import resources

import pytest
import torch

from sparsetrace import StreamConfig, trace
from sparsetrace.blocks import num_blocks
from sparsetrace.fidelity import check, min_k
from sparsetrace.models import forward_logits

pytestmark = pytest.mark.integration

SAMPLE = resources.files("sparsetrace").joinpath("data/sample.txt").read_text()


def test_check_on_the_sample(default_model):
    """Measured: the continuation ". The", kept; KL 0.0027 (next token), 0.0058 (mean); recall / oracle
    0.999 on average, 0.997 in the worst layer; 16% of token pairs pruned."""
    model, tokenizer = default_model
    report = check(model, tokenizer, SAMPLE, StreamConfig(), max_tokens=1024, progress=False)
    assert report.tokens == 1025 and len(report.recall) == 30
    assert [tokenizer.decode([t]) for t in report.continuation] == [".", " The"], "the default model's next tokens"
    assert report.match and report.sparse_predictions == report.continuation and report.top1_agreement == 1.0
    assert 0 < report.kl_next_token < 0.02 and 0 < report.kl_mean < 0.03, "sparse, and close to dense"
    assert all(r <= o + 1e-5 for r, o in zip(report.recall, report.oracle_recall, strict=True))
    ratio = report.recall_ratio
    assert sum(ratio) / len(ratio) > 0.99 and min(ratio) > 0.98, "the default estimator keeps what the oracle keeps"
    assert 0.1 < report.stats["sparsity"] < 0.3


def test_full_k_is_dense_attention(default_model):
    """k covering every key block keeps all of the dense attention and the dense model's logits."""
    model, tokenizer = default_model
    full = StreamConfig(k=num_blocks(1025, 64))
    report = check(model, tokenizer, SAMPLE, full, max_tokens=1024, progress=False)
    assert all(abs(r - 1) < 1e-5 for r in report.recall + report.oracle_recall)
    assert report.stats["sparsity"] == 0.0 and report.match and report.top1_agreement == 1.0
    assert report.kl_next_token < 1e-5 and report.kl_mean < 1e-5
    traced = trace(model, tokenizer, SAMPLE, full, max_tokens=1024)
    dense = forward_logits(model, traced.token_ids)[-1].float()
    torch.testing.assert_close(traced.next_token_logits, dense, atol=1e-3, rtol=1e-4)
    assert tokenizer.decode([int(dense.argmax())]) == "."


def test_min_k_on_a_short_prompt(default_model):
    model, tokenizer = default_model
    config = StreamConfig(block_size=32)
    result = min_k(model, tokenizer, SAMPLE, config, max_tokens=512, progress=False)
    assert result.min_k is not None
    assert result.passed[result.min_k] and (result.min_k == 1 or not result.passed[result.min_k - 1])
    assert check(model, tokenizer, SAMPLE, config.with_k(result.min_k), max_tokens=512, progress=False).match
