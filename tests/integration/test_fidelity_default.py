"""Fidelity on the real default model: recall vs the oracle, behaviour, min-k."""

from importlib import resources

import pytest

from sparsetrace import StreamConfig
from sparsetrace.fidelity import check, min_k

pytestmark = pytest.mark.integration

SAMPLE = resources.files("sparsetrace").joinpath("data/sample.txt").read_text()


def test_check_on_the_sample(default_model):
    model, tokenizer = default_model
    report = check(model, tokenizer, SAMPLE, StreamConfig(), max_tokens=1024, progress=False)
    assert report.tokens == 1025 and len(report.recall) == 30
    assert all(r <= o + 1e-5 for r, o in zip(report.recall, report.oracle_recall, strict=True))
    ratio = report.recall_ratio
    assert sum(ratio) / len(ratio) > 0.95, "the default estimator keeps most of what the oracle keeps"
    assert 0 <= report.top1_agreement <= 1 and report.kl_next_token >= -1e-6


def test_min_k_on_a_short_prompt(default_model):
    model, tokenizer = default_model
    config = StreamConfig(block_size=32)
    result = min_k(model, tokenizer, SAMPLE, config, max_tokens=512, progress=False)
    assert result.min_k is not None
    assert result.passed[result.min_k] and (result.min_k == 1 or not result.passed[result.min_k - 1])
    assert check(model, tokenizer, SAMPLE, config.with_k(result.min_k), max_tokens=512, progress=False).match
