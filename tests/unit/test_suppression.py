"""Attention suppression (the thought-anchors causal check) on tiny models, against an independent reference."""

import json

import numpy as np
import pytest
import torch
from reference import dense_attention
from test_cli import run
from tiny_models import tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import sparsetrace as st
from sparsetrace.analysis.segments import split_units
from sparsetrace.errors import InputError
from sparsetrace.tasks.suppression import suppression_matrix

TEXT = ("First we read the problem. Then we compute 3 + 4 = 7. Wait, is that right? "
        "Let me check the sum. So the total is 7. The answer is 7.")
FULL_K = st.StreamConfig(k=16, block_size=16)  # covers every key block (< 16 blocks of 16 tokens)

# The reference: plain softmax attention written out in full (tests/unit/reference.py), with the
# suppression built token by token from its definition: queries t >= b may not read keys in [a, b).
_SPAN: dict = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                         softcap=None, **kwargs):
    batch, heads, tokens, _ = query.shape
    allowed = torch.ones(batch, heads, tokens, tokens, dtype=torch.bool)
    if _SPAN.get("span") is not None:
        a, b = _SPAN["span"]
        for t in range(b, tokens):
            allowed[:, :, t, a:b] = False
    out, _ = dense_attention(query, key, value, scaling=scaling, sliding_window=sliding_window, softcap=softcap,
                             allowed=allowed)
    return out.transpose(1, 2).to(query.dtype), None


AttentionInterface.register("test_suppression_reference", _reference_attention)
AttentionMaskInterface.register("test_suppression_reference", lambda *args, **kwargs: None)


def _reference_log_probs(model, ids, span):
    previous = model.config._attn_implementation
    _SPAN["span"] = span
    model.set_attn_implementation("test_suppression_reference")
    try:
        with torch.no_grad():
            logits = model(input_ids=ids[None], use_cache=False).logits[0].double()
    finally:
        model.set_attn_implementation(previous)
    return torch.log_softmax(logits, -1)


def _units(tokenizer):
    units, ids = split_units(TEXT, tokenizer, "sentences", region="all")
    return units, ids


def check_zero_before_positive_after(result, units):
    n = len(units)
    assert n == 6 and result.effects.shape == (n, n)
    assert result.spans == [(u.token_start, u.token_end) for u in units]
    i, j = np.indices((n, n))
    assert np.all(result.effects[j <= i] == 0.0), "a unit cannot affect itself or earlier units"
    assert np.all(result.effects[j > i] > 0.0)
    assert np.isnan(result.log_effects[j <= i]).all() and np.isfinite(result.log_effects[j > i]).all()


def test_sparse_effects_vanish_before_and_appear_after(tiny_tokenizer):
    model = tiny_model("llama")
    units, _ = _units(tiny_tokenizer)
    result = suppression_matrix(model, tiny_tokenizer, TEXT, "sentences", forward="sparse", region="all",
                                config=st.StreamConfig(k=2, block_size=16))
    check_zero_before_positive_after(result, units)
    scores = result.scores
    assert np.isnan(scores[-1]) and np.all(scores[:-1] > 0)
    np.testing.assert_allclose(scores[0], result.effects[0, 1:].mean())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding-window layers, softcap-free, GQA
def test_rows_equal_an_independent_reference(arch, tiny_tokenizer):
    model = tiny_model(arch)
    units, ids = _units(tiny_tokenizer)
    dense = suppression_matrix(model, tiny_tokenizer, ids, units, forward="dense")
    sparse = suppression_matrix(model, tiny_tokenizer, ids, units, forward="sparse", config=FULL_K)
    check_zero_before_positive_after(dense, units)
    assert dense.reused == [b for _, b in dense.spans[:-1]]  # each dense pass starts after the suppressed unit
    base = _reference_log_probs(model, ids, None)
    for i in (0, 2):
        a, b = units[i].token_start, units[i].token_end
        suppressed = _reference_log_probs(model, ids, (a, b))
        kl = (base.exp() * (base - suppressed)).sum(-1)  # per position
        assert torch.all(kl[:b] == 0), "positions before the end of the suppressed unit do not change"
        expected = np.zeros(len(units))
        for j, u in enumerate(units):
            if j > i:
                expected[j] = kl[u.token_start : u.token_end].mean().item()
        np.testing.assert_allclose(dense.effects[i], expected, rtol=2e-3, atol=1e-7)
        np.testing.assert_allclose(sparse.effects[i], expected, rtol=2e-3, atol=1e-7)
    # sparse with k covering every key block is the dense matrix
    np.testing.assert_allclose(sparse.effects, dense.effects, rtol=2e-3, atol=1e-7)


def test_temperature_and_spans(tiny_tokenizer):
    model = tiny_model("qwen2")
    units, ids = _units(tiny_tokenizer)
    spans = [(u.token_start, u.token_end) for u in units]
    cold = suppression_matrix(model, tiny_tokenizer, ids, spans, forward="dense", temperature=0.6)
    warm = suppression_matrix(model, tiny_tokenizer, ids, spans, forward="dense")
    assert cold.temperature == 0.6 and not np.allclose(cold.effects, warm.effects)
    data = json.loads(json.dumps(warm.to_dict()))
    assert data["scores"][-1] is None and data["effects"][1][0] == 0 and data["base_dtype"] == "float32"


@pytest.mark.parametrize(
    ("units", "message"),
    [
        ([(0, 20)], "at least 2"),
        ("paragraphs", "at least 2"),
        ([(0, 20), (10, 30)], "overlaps"),
    ],
)
def test_too_few_units_are_refused_before_any_pass(units, message, tiny_tokenizer, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(InputError, match=message):
        suppression_matrix(model, tiny_tokenizer, TEXT, units, region="all")
    with pytest.raises(InputError, match="forward="):
        suppression_matrix(model, tiny_tokenizer, TEXT, forward="exact")


REASONING = ("First we read the problem carefully. Then we compute 3 + 4 = 7 and 7 * 2 = 14. "
             "Wait, is that right? Let me check the sum again. So the total is 14 here.\n\nThe answer is 14.")


def test_anchors_causal_cli_writes_the_fields(capsys, tmp_path, model_folder):
    path = tmp_path / "cot.txt"
    path.write_text(REASONING)
    out = tmp_path / "anchors"
    code, stdout, err = run(capsys, "anchors", str(path), "-o", str(out), "--model", model_folder, "--k", "2",
                            "--block-size", "16", "--top-heads", "3", "--proximity", "1", "--no-progress",
                            "--dense-check", "never", "--causal", "--causal-forward", "dense")
    assert code == 0, err
    assert "causal" in stdout and "Spearman(causal" in stdout
    data = json.loads((out / "anchors.json").read_text())
    causal = data["texts"][0]["causal"]
    n = data["texts"][0]["num_units"]
    assert causal["forward"] == "dense" and len(causal["effects"]) == n and len(causal["scores"]) == n
    assert n == 6 and -1 <= causal["spearman_vs_receiver_scores"] <= 1
    assert data["settings"]["causal"] == "dense"
    assert (out / "suppression.png").stat().st_size > 0
