"""Thought anchors on the real default model: a short chain of thought it writes itself, end to end."""

import numpy as np
import pytest

import sparsetrace as st
from sparsetrace.generation import generate_reasoning

pytestmark = pytest.mark.integration

PROBLEM = "A train travels 60 km in 1.5 hours, then 40 km in 0.5 hours. What is its average speed? Think step by step."


def test_generated_reasoning_anchors_against_dense(default_model):
    model, tokenizer = default_model
    generation = generate_reasoning(model, tokenizer, PROBLEM, max_new_tokens=100, progress=False)
    assert generation.new_tokens <= 100 and len(generation.reply_spans) == 1
    start, end = generation.reply_spans[0]
    assert generation.text[:start].rstrip().endswith("assistant")
    result = st.anchors(model, tokenizer, generation.text, st.StreamConfig(k=2, block_size=16),
                        regions=[generation.reply_spans[0]], proximity=1, top_heads=10, dense_check="always",
                        progress=False)
    units = result.units
    assert len(units) >= 3 and all(start <= u.char_start < u.char_end <= end for u in units)
    assert len(result.receiver_heads) == 10 and all(layer > 0 for layer, _ in result.receiver_heads)
    assert result.vertical_scores.shape == (30, 9, len(units))
    fidelity = result.texts[0].fidelity
    assert fidelity["sparsity"] > 0.3 and isinstance(fidelity["answer_preserved"], bool)
    assert fidelity["dense_predicts_text"] >= 0.9, "the text is (re-tokenised) the dense model's own greedy output"
    rho = result.dense["texts"][0]["spearman_scores"]
    assert rho is not None and np.isfinite(rho)
