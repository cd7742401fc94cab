"""Causal interventions: span knockout, head knockout, text removal, against an independent dense reference."""

import pytest
import torch
from reference import dense_attention
from tiny_models import WINDOW, tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from sparsetrace import InputError, Intervention, StreamConfig, response_logprobs
from sparsetrace.tracer import run_trace

PROMPT = "The river town kept its bridge. A key: violet-42 opens the gate. Later the tide rose and fell again. "
RESPONSE = "The key was violet-42."
FULL_K = StreamConfig(k=16, block_size=16)  # covers every key block of these inputs (< 16 blocks)

# The reference model: plain softmax attention written out in full (tests/unit/reference.py), with
# the knockout built token by token from the intervention's definition, not from the package's code.
_SPEC: dict = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                         softcap=None, **kwargs):
    batch, heads, tokens, _ = query.shape
    iv: Intervention = _SPEC["intervention"]
    allowed = torch.ones(batch, heads, tokens, tokens, dtype=torch.bool)
    if iv.knockout and (iv.layers is None or module.layer_idx in iv.layers):
        for h in range(heads):
            if iv.heads is not None and h not in iv.heads:
                continue
            for a, b in iv.knockout:
                for t in range(b, tokens):
                    allowed[:, h, t, a:b] = False
    out, _ = dense_attention(query, key, value, scaling=scaling, sliding_window=sliding_window, softcap=softcap,
                             allowed=allowed)
    for layer, head in iv.heads_out:
        if layer == module.layer_idx:
            out[:, head] = 0.0 if iv.head_mode == "zero" else out[:, head].mean(dim=1, keepdim=True)
    return out.transpose(1, 2).to(query.dtype), None


AttentionInterface.register("test_reference", _reference_attention)
AttentionMaskInterface.register("test_reference", lambda *args, **kwargs: None)


def _reference_logprobs(model, ids, response_len, iv):
    """float [R]: log p of the last response_len tokens of ids under the reference model with `iv`."""
    previous = model.config._attn_implementation
    _SPEC["intervention"] = iv
    model.set_attn_implementation("test_reference")
    try:
        with torch.no_grad():
            logits = model(input_ids=ids[None, :-1], use_cache=False).logits[0, -response_len:].float()
    finally:
        model.set_attn_implementation(previous)
    return torch.log_softmax(logits, -1).gather(-1, ids[-response_len:, None])[:, 0]


def _ids(tokenizer, prompt=PROMPT, response=RESPONSE):
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    return torch.tensor(p + r), len(p), len(r)


INTERVENTIONS = [
    Intervention(knockout=[(33, 63)]),  # the key sentence, every layer and head
    Intervention(knockout=[(0, 20), (40, 50)], layers=[1, 2], heads=[0, 3]),
    Intervention(heads_out=[(0, 1), (2, 3)]),
    Intervention(heads_out=[(1, 0)], head_mode="mean"),
    Intervention(knockout=[(60, 90)], heads_out=[(2, 2)]),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3", "phi3"])
@pytest.mark.parametrize("forward", ["dense", "sparse"])
def test_interventions_equal_the_dense_reference(arch, forward, tiny_tokenizer):
    model = tiny_model(arch)
    ids, prompt_len, response_len = _ids(tiny_tokenizer)
    assert len(ids) > 2 * WINDOW  # sliding layers really slide
    result = response_logprobs(model, tiny_tokenizer, PROMPT, RESPONSE, INTERVENTIONS, forward=forward, config=FULL_K)
    assert result.response_ids.tolist() == ids[prompt_len:].tolist()
    torch.testing.assert_close(result.base, _reference_logprobs(model, ids, response_len, Intervention()),
                               atol=2e-4, rtol=0)
    for iv, row in zip(INTERVENTIONS, result.logprobs, strict=True):
        expected = _reference_logprobs(model, ids, response_len, iv)
        torch.testing.assert_close(row, expected, atol=2e-4, rtol=0)
        assert not torch.allclose(row, result.base, atol=1e-3), f"{iv.describe()} changed nothing"


def test_dense_reuses_the_unchanged_prefix(tiny_tokenizer):
    model = tiny_model("llama")
    ivs = [Intervention(knockout=[(40, 60)]), Intervention(heads_out=[(0, 0)])]
    result = response_logprobs(model, tiny_tokenizer, PROMPT, RESPONSE, ivs, forward="dense")
    assert result.reused == [60, 0]


def test_nothing_removed_equals_the_plain_pass(tiny_tokenizer):
    model = tiny_model("gemma3")
    ids, prompt_len, response_len = _ids(tiny_tokenizer)
    nothing = [Intervention(), Intervention(knockout=[(10, 20)], heads=[])]
    dense = response_logprobs(model, tiny_tokenizer, PROMPT, RESPONSE, nothing, forward="dense")
    with torch.no_grad():
        logits = model(input_ids=ids[None, :-1]).logits[0, -response_len:]
    plain = torch.log_softmax(logits.float(), -1).gather(-1, ids[prompt_len:, None])[:, 0]
    assert torch.equal(dense.base, plain)
    assert all(torch.equal(row, plain) for row in dense.logprobs)

    config = StreamConfig(k=2, block_size=16)
    sparse = response_logprobs(model, tiny_tokenizer, PROMPT, RESPONSE, nothing, forward="sparse", config=config)
    _, logits = run_trace(model, tiny_tokenizer, ids[:-1], config, logits_to_keep=response_len)
    traced = torch.log_softmax(logits, -1).gather(-1, ids[prompt_len:, None])[:, 0]
    assert torch.equal(sparse.base, traced)
    assert all(torch.equal(row, traced) for row in sparse.logprobs)


@pytest.mark.parametrize("forward", ["dense", "sparse"])
def test_text_removal_keeps_the_response_aligned(forward, tiny_tokenizer):
    model = tiny_model("qwen2")
    start = PROMPT.index("A key")
    end = PROMPT.index("Later")
    result = response_logprobs(model, tiny_tokenizer, PROMPT, RESPONSE, [Intervention(remove=[(start, end)])],
                               forward=forward, config=FULL_K)
    shortened = PROMPT[:start] + PROMPT[end:]
    ids, prompt_len, response_len = _ids(tiny_tokenizer, shortened)
    assert ids[prompt_len:].tolist() == result.response_ids.tolist()
    torch.testing.assert_close(result.logprobs[0], _reference_logprobs(model, ids, response_len, Intervention()),
                               atol=2e-4, rtol=0)
    if forward == "dense":
        assert result.reused == [start]  # byte-level tokens: one per character before the removed span


@pytest.mark.parametrize(
    ("intervention", "message"),
    [
        (dict(knockout=[(10, 500)]), "ends past"),
        (dict(heads_out=[(7, 0)]), "layer 7 does not exist"),
        (dict(heads_out=[(0, 9)]), "head 9 does not exist"),
        (dict(knockout=[(1, 5)], layers=[3]), "layer 3 does not exist"),
        (dict(remove=[(0, 10_000)]), "ends past"),
    ],
)
def test_bad_interventions_are_refused_before_any_pass(intervention, message, tiny_tokenizer, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(InputError, match=message):
        response_logprobs(model, tiny_tokenizer, PROMPT, RESPONSE, [Intervention(**intervention)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(knockout=[(5, 5)]), "empty"),
        (dict(head_mode="noise"), "head_mode"),
        (dict(remove=[(0, 3)], knockout=[(0, 2)]), "cannot be combined"),
        (dict(layers=[0]), "give knockout spans"),
    ],
)
def test_malformed_interventions_say_the_fix(kwargs, message):
    with pytest.raises(InputError, match=message):
        Intervention(**kwargs)


def test_a_response_past_the_context_is_refused(tiny_tokenizer, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(InputError, match="context"):
        response_logprobs(model, tiny_tokenizer, PROMPT, "x" * 1024, [Intervention(heads_out=[(0, 0)])])
    with pytest.raises(InputError, match="empty"):
        response_logprobs(model, tiny_tokenizer, PROMPT, "  ", [])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sparse_prefix_reuse_equals_whole_passes(arch, tiny_tokenizer, monkeypatch):
    import sparsetrace.ablation as ablation

    model = tiny_model(arch)
    config = StreamConfig(k=2, block_size=16)  # sparse: the reuse must give what a whole sparse pass gives
    ivs = [Intervention(knockout=[(40, 60)]), Intervention(remove=[(70, 80)]), Intervention(heads_out=[(1, 1)])]
    shared = response_logprobs(model, tiny_tokenizer, PROMPT, RESPONSE, ivs, config=config)
    assert shared.reused == [48, 64, 0]  # block-aligned, at or before the first affected position (60, 70)
    monkeypatch.setattr(ablation, "_common_prefix", lambda a, b: 0)  # nothing shared: whole passes
    monkeypatch.setattr(Intervention, "first_affected", lambda self, prompt_tokens: 0)
    whole = response_logprobs(model, tiny_tokenizer, PROMPT, RESPONSE, ivs, config=config)
    assert whole.reused == [0, 0, 0]
    torch.testing.assert_close(shared.logprobs, whole.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.base, whole.base, atol=0, rtol=0)
