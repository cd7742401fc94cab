"""Thought anchors: unit attention from the trace pass vs dense softmax, vertical scores and kurtosis
by hand, receiver heads, the category rules and labels files."""

import json

import numpy as np
import pytest
import torch
from reference import dense_attention, kept_token_mask
from tiny_models import tiny_model

from sparsetrace.analysis.anchors import (
    UnitAttention,
    head_kurtosis,
    receiver_heads,
    spearman,
    unit_scores,
    vertical_scores,
)
from sparsetrace.analysis.categories import LABELS, load_labels, normalise_label, tag_unit
from sparsetrace.analysis.segments import split_units, unit_of_tokens
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError
from sparsetrace.tracer import prepare_input, run_trace

TEXT = ("First we read the problem. Then we compute 3 + 4 = 7. Wait, is that right? "
        "Let me check: 3 + 4 is 7.\n\nSo the total is 7. The answer is 7. ") * 3


def traced_unit_attention(model, tokenizer, config, key_average="mean"):
    """A from the reducer, and a reference A from each layer's q and k through plain dense softmax."""
    units, _ = split_units(TEXT, tokenizer, "sentences", region="all")
    ids = prepare_input(model, tokenizer, TEXT, None, config)
    owner = unit_of_tokens(units, len(ids))
    info_layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    reducer = UnitAttention(owner, len(units), info_layers, heads, config.block_q, config.block_k)
    records = {}

    def keep(record):
        records[record.layer] = record

    run_trace(model, tokenizer, ids, config, on_layer=keep, on_probabilities=reducer)
    reference = np.zeros((info_layers, heads, len(units), len(units)))
    for layer, record in records.items():
        allowed = kept_token_mask(record.selection.indices.cpu(), len(ids), config.block_q, config.block_k)
        _, probs = dense_attention(record.query, record.key, record.key, scaling=record.scaling,
                                   sliding_window=record.sliding_window, allowed=allowed)
        for i, ui in enumerate(units):
            for j, uj in enumerate(units):
                block = probs[0, :, ui.token_start : ui.token_end, uj.token_start : uj.token_end]
                value = block.sum(dim=(-1, -2)) / ui.num_tokens
                if key_average == "mean":
                    value = value / uj.num_tokens
                reference[layer, :, i, j] = value.numpy()
    return reducer.matrix(key_average), reference, units


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])  # GQA 4/2 heads; mistral: sliding window
def test_full_k_unit_attention_equals_dense(arch, tiny_tokenizer):
    model = tiny_model(arch)
    matrix, reference, units = traced_unit_attention(model, tiny_tokenizer, StreamConfig(k=64, block_size=16),
                                                     key_average="sum")
    assert matrix.shape == reference.shape and len(units) > 10
    np.testing.assert_allclose(matrix, reference, atol=2e-5)
    assert np.abs(np.triu(matrix, 1)).max() < 1e-6, "no unit attends to a later unit"


def test_sparse_unit_attention_equals_dense_restricted_to_kept_blocks(tiny_tokenizer):
    model = tiny_model("llama", seed=1)
    config = StreamConfig(k=1, block_q=16, block_k=8)
    matrix, reference, _ = traced_unit_attention(model, tiny_tokenizer, config)
    np.testing.assert_allclose(matrix, reference, atol=2e-5)


def test_vertical_scores_by_hand():
    a = np.arange(36, dtype=float).reshape(6, 6)
    v = vertical_scores(a, proximity=2)
    # column j: mean of rows i >= j + 2
    assert v[0] == pytest.approx(np.mean([12, 18, 24, 30]))
    assert v[1] == pytest.approx(np.mean([19, 25, 31]))
    assert v[3] == pytest.approx(33.0)
    assert np.isnan(v[4]) and np.isnan(v[5])
    batched = vertical_scores(np.stack([a, 2 * a])[None], proximity=2)
    np.testing.assert_allclose(batched[0, 1], 2 * v, equal_nan=True)


def test_depth_control_ranks_within_rows():
    a = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [5, 0, 0, 0], [1, 9, 0, 0]], dtype=float)
    v = vertical_scores(a, proximity=2, control_depth=True)
    # row 2 counts j = 0 (rank 1 of 1 -> 1); row 3 counts j = 0, 1 (ranks 1, 2 of 2 -> 0.5, 1)
    assert v[0] == pytest.approx((1.0 + 0.5) / 2) and v[1] == pytest.approx(1.0)
    assert np.isnan(v[2])


def test_kurtosis_by_hand_and_receivers():
    vertical = np.full((2, 3, 5), np.nan)
    vertical[1, 0, :4] = [0, 0, 0, 1]        # Fisher kurtosis: m4 / m2^2 - 3 = 2.333... - 3
    vertical[1, 1, :4] = [0, 1, 0, 1]        # -2
    vertical[1, 2, :4] = [3, 3, 3, 3]        # constant: undefined
    vertical[0, 0, :4] = [0, 0, 0, 9]        # layer 0: as peaked as head (1, 0)
    kurt = head_kurtosis(vertical)
    assert kurt[1, 0] == pytest.approx(-2 / 3) and kurt[1, 1] == pytest.approx(-2.0)
    assert np.isnan(kurt[1, 2])
    assert receiver_heads(kurt, top=2) == [(0, 0), (1, 0)], "layer 0 counts, as in their scoring"
    assert receiver_heads(kurt, top=2, exclude_layer0=True) == [(1, 0), (1, 1)]
    # averaged over traces: the second trace makes head (1, 1) the stronger
    other = kurt.copy()
    other[1, 1] = 5.0
    assert receiver_heads([kurt, other], top=1) == [(1, 1)]
    np.testing.assert_allclose(unit_scores(vertical, [(1, 0), (1, 1)])[:4], [0, 0.5, 0, 1])


def test_their_definitions_by_hand():
    """The thought-anchors code's definitions worked out by hand (`_compute_averaged_matrix`,
    `get_vertical_scores`, `get_3d_ar_kurtosis`, `get_top_k_receiver_heads`), against ours."""
    # token attention of one head, 5 tokens; units: tokens [0, 2), [2, 3), [3, 5)
    p = torch.tensor([[1.0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0.2, 0.2, 0.6, 0, 0], [0.1, 0.3, 0.2, 0.4, 0],
                      [0.4, 0.1, 0.1, 0.2, 0.2]])
    reducer = UnitAttention(torch.tensor([0, 0, 1, 2, 2]), 3, 1, 1, block_q=8, block_k=8)
    probs = torch.zeros(1, 1, 1, 8, 8)
    probs[0, 0, 0, :5, :5] = p
    reducer(0, 0, probs, torch.zeros(1, 1, 1, 1, dtype=torch.long))
    # theirs: np.mean of each block, the future zeros of the diagonal blocks included
    # A[0, 0] = (1 + 0 + .5 + .5) / 4; A[2, 0] = (.1 + .3 + .4 + .1) / 4; A[2, 1] = (.2 + .1) / 2; A[2, 2] = .8 / 4
    their_mean = [[0.5, 0, 0], [0.2, 0.6, 0], [0.225, 0.15, 0.2]]
    np.testing.assert_allclose(reducer.matrix()[0, 0], their_mean, atol=1e-7)
    # "sum": per query token of unit i, the probability on all of unit j (rows sum to 1)
    np.testing.assert_allclose(reducer.matrix("sum")[0, 0], [[1.0, 0, 0], [0.4, 0.6, 0], [0.45, 0.15, 0.4]],
                               atol=1e-7)
    # vertical scores, proximity 1: column j over rows i >= j + 1
    np.testing.assert_allclose(vertical_scores(np.array(their_mean), proximity=1), [0.2125, 0.15, np.nan])

    # two layers, one head, 6 units, proximity 2 (only entries i - j >= 2 count)
    a = np.zeros((2, 1, 6, 6))
    a[0, 0, 2:, 0] = 0.4                                      # layer 0: vertical [.4, 0, 0, 0, nan, nan]
    a[1, 0, 2:, 0] = [0.1, 0.3, 0.2, 0.2]                     # layer 1: column means .2,
    a[1, 0, 3:, 1] = [0.1, 0.05, 0.15]                        # .1,
    a[1, 0, 4:, 2] = [0.3, 0.1]                               # .2,
    a[1, 0, 5, 3] = 0.1                                       # .1
    a[:, :, np.arange(6), np.arange(6)] = 0.9                 # too near: never counted
    vertical = vertical_scores(a, proximity=2)
    np.testing.assert_allclose(vertical[0, 0], [0.4, 0, 0, 0, np.nan, np.nan])
    np.testing.assert_allclose(vertical[1, 0], [0.2, 0.1, 0.2, 0.1, np.nan, np.nan])
    # Fisher kurtosis, bias=True: [.4, 0, 0, 0]: m2 = .03, m4 = .0021, m4 / m2^2 - 3 = -2/3; [.2, .1, .2, .1]: -2
    np.testing.assert_allclose(head_kurtosis(vertical)[:, 0], [-2 / 3, -2.0])
    # their top-k keeps layer 0: the receiver head is (0, 0), and each unit's score its vertical score
    assert receiver_heads(head_kurtosis(vertical), top=1) == [(0, 0)]
    np.testing.assert_allclose(unit_scores(vertical, [(0, 0)]), [0.4, 0, 0, 0, np.nan, np.nan])


def test_spearman_ignores_undefined_units():
    assert spearman(np.array([1, 2, 3, np.nan]), np.array([10, 20, 30, 0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, np.nan]), np.array([1.0, 2.0])) is None


@pytest.mark.parametrize("text, label", [
    ("The answer is 42.", "final_answer_emission"),
    ("Let me check that again.", "self_checking"),
    ("Wait, that seems wrong.", "uncertainty_management"),
    ("To solve this, we need to find the speed.", "plan_generation"),
    ("So the lamp burns 24 litres.", "result_consolidation"),
    ("16 * 1.5 = 24 litres", "active_computation"),
    ("Recall the formula for area.", "fact_retrieval"),
    ("The problem gives three trains.", "problem_setup"),
    ("Blue skies over the harbour.", "unknown"),
])
def test_rule_based_tags(text, label):
    assert tag_unit(text) == label


def test_labels_files(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(["Active Computation", {"function_tags": ["self-checking"]}, {"category": "unknown"}]))
    assert load_labels(path, 3) == ["active_computation", "self_checking", "unknown"]
    path.write_text(json.dumps({"1": "final_answer_emission"}))
    assert load_labels(path, 3) == ["unknown", "final_answer_emission", "unknown"]
    with pytest.raises(InputError, match="2 labels but the text has 3 units"):
        path.write_text(json.dumps(["unknown", "unknown"]))
        load_labels(path, 3)
    with pytest.raises(InputError, match="unknown category"):
        normalise_label("deduction")
    assert len(LABELS) == 9


def test_dense_forward_refuses_a_reducer(tiny_tokenizer):
    model = tiny_model("llama")
    config = StreamConfig(k=2, block_size=16)
    ids = prepare_input(model, tiny_tokenizer, TEXT, None, config)
    reducer = UnitAttention(torch.zeros(len(ids), dtype=torch.long), 1, 3, 4, 16, 16)
    with pytest.raises(InputError, match="sparse forward only"):
        run_trace(model, tiny_tokenizer, ids, config, forward="dense", on_probabilities=reducer)
