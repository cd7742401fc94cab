"""`models.forward_logits`, `greedy_decode` and `sample_decode` against plain forward passes and `generate`."""

import pytest
import torch
from tiny_models import tiny_model

from sparsetrace.errors import InputError
from sparsetrace.models import eos_token_ids, forward_logits, greedy_decode, kv_cache, sample_decode

IDS = torch.randint(0, 250, (70,), generator=torch.Generator().manual_seed(3))


def argmax_loop(model, ids, n):
    """Greedy decoding the slow way: a whole forward pass (no cache) per token. Returns (tokens, logits)."""
    seq, rows = ids, []
    with torch.no_grad():
        for _ in range(n):
            rows.append(model(seq[None]).logits[0, -1])
            seq = torch.cat([seq, rows[-1].argmax()[None]])
    return seq[len(ids):], torch.stack(rows)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3"])
def test_greedy_decode_is_the_step_by_step_argmax(name):
    """The cached decoder gives the argmax loop's tokens and logits (sliding-window layers too) and
    `generate(do_sample=False)`'s tokens."""
    model = tiny_model(name)
    seen = []
    tokens, logits = greedy_decode(model, IDS, 12, on_token=seen.append)
    expected, expected_logits = argmax_loop(model, IDS, 12)
    assert tokens.dtype == torch.int64 and tokens.tolist() == expected.tolist() == seen
    assert logits.dtype == torch.float32 and logits.shape == (12, 260)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        generated = model.generate(IDS[None], max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(IDS):]
    assert generated.tolist() == tokens.tolist()


def test_greedy_decode_stops_after_a_stop_token_and_goes_on_from_a_prefilled_pass():
    model = tiny_model("llama")
    tokens, logits = greedy_decode(model, IDS, 10)
    stop = tokens[4].item()
    first = tokens.tolist().index(stop)
    stopped, _ = greedy_decode(model, IDS, 10, stop=[stop])
    assert stopped.tolist() == tokens[: first + 1].tolist(), "the stop token ends the continuation, included"
    cache = kv_cache(model)
    last = forward_logits(model, IDS, cache=cache)[-1]
    again, again_logits = greedy_decode(model, IDS, 10, prefilled=(last, cache))
    assert torch.equal(again, tokens) and torch.equal(again_logits, logits)
    with pytest.raises(InputError, match="max_new_tokens=0"):
        greedy_decode(model, IDS, 0)


def test_forward_logits_keeps_the_last_positions_and_fills_the_cache():
    model = tiny_model("gemma3")
    with torch.no_grad():
        full = model(IDS[None]).logits[0]
    torch.testing.assert_close(forward_logits(model, IDS, keep=3), full[-3:], atol=1e-5, rtol=1e-5)
    cache = kv_cache(model)
    forward_logits(model, IDS[:50], cache=cache)
    torch.testing.assert_close(forward_logits(model, IDS[50:], keep=20, cache=cache), full[50:], atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("settings", [dict(temperature=0.8, top_p=0.9), dict(temperature=0.0, repetition_penalty=1.3)])
def test_sample_decode_draws_what_generate_draws(settings):
    model = tiny_model("llama")
    seen = []
    torch.manual_seed(5)
    tokens = sample_decode(model, IDS, 15, **settings, on_token=seen.append)
    sampling = {"do_sample": True} if settings["temperature"] > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    torch.manual_seed(5)
    with torch.no_grad():
        generated = model.generate(IDS[None], max_new_tokens=15, **(settings | sampling))[0, len(IDS):]
    assert tokens.tolist() == generated.tolist() == seen and len(seen) == 15


def test_eos_token_ids(tiny_tokenizer):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = 7
    assert eos_token_ids(model, tiny_tokenizer) == [7]
    model.generation_config.eos_token_id = [7, 9]
    assert eos_token_ids(model) == [7, 9]
    model.generation_config.eos_token_id = None
    assert eos_token_ids(model) == [] and eos_token_ids(model, tiny_tokenizer) == [256]
