"""Thought anchors on the real default model: a short chain of thought it writes itself, end to end, whose
dense reference must equal the thought-anchors definitions on the model's own attention weights; and the
first 1,024 tokens of its longer chain of thought, where k = 8 must reproduce the dense ranking."""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import sparsetrace as st
from sparsetrace.analysis.anchors import spearman, unit_scores
from sparsetrace.generation import generate_reasoning

pytestmark = pytest.mark.integration

COT = Path(__file__).parents[2] / "benchmarks" / "texts" / "cot.txt"
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
    assert len(result.receiver_heads) == 10
    assert result.vertical_scores.shape == (30, 9, len(units))
    fidelity = result.texts[0].fidelity
    assert fidelity["sparsity"] > 0.3
    assert fidelity["dense_predicts_text"] >= 0.9, "the text is (re-tokenised) the dense model's own greedy output"

    # the dense reference is the thought-anchors pipeline on the model's own (eager) attention weights,
    # written out here from their definitions: block means, columns over rows i >= j + 1, top kurtosis
    text = result.texts[0]
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            weights = model(input_ids=text.trace.token_ids[None], output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    spans = [(u.token_start, u.token_end) for u in units]
    a = np.array([[[[w[0, h, i0:i1, j0:j1].double().mean().item() for j0, j1 in spans] for i0, i1 in spans]
                   for h in range(w.shape[1])] for w in weights])
    below = np.tril(np.ones((len(units), len(units)), dtype=bool), -1)
    vertical = np.where(below, a, 0).sum(-2)[..., :-1] / below.sum(0)[:-1]
    np.testing.assert_allclose(text.dense_vertical[..., :-1], vertical, rtol=1e-4, atol=1e-7)
    kurtosis = stats.kurtosis(vertical, axis=-1, fisher=True, bias=True)
    np.testing.assert_allclose(text.dense_kurtosis, kurtosis, rtol=1e-3, atol=1e-3)
    top = np.argsort(-kurtosis.ravel())[:10]
    assert result.dense["receiver_heads"] == [list(divmod(int(x), kurtosis.shape[1])) for x in top]


def test_k8_reproduces_the_dense_anchors(default_model):
    """The README's setting (b = 64, k = 8, defaults) on 1,024 tokens (30 sentences) of the model's own chain
    of thought; measured: Spearman 0.998 with dense, 18 of 20 receiver heads shared, 16% pruned."""
    model, tokenizer = default_model
    result = st.anchors(model, tokenizer, COT.read_text(), st.StreamConfig(k=8, block_size=64), max_tokens=1024,
                        dense_check="always", progress=False)
    text, dense = result.texts[0], result.dense
    assert len(result.units) == 30 and result.settings["key_average"] == "mean"
    assert dense["texts"][0]["spearman_scores"] > 0.95 and dense["receiver_overlap"] >= 15
    assert text.fidelity["answer_preserved"] is True and 0.1 < text.fidelity["sparsity"] < 0.3
    dense_scores = unit_scores(text.dense_vertical, [tuple(x) for x in dense["receiver_heads"]])
    assert np.nanargmax(result.scores) == np.nanargmax(dense_scores), "the same top anchor sentence"
    assert spearman(result.scores, dense_scores) == pytest.approx(dense["texts"][0]["spearman_scores"])
