"""RULER-style needle prompts: exact length, needle position and span, seeds, haystacks, errors."""

import pytest

from sparsetrace.errors import InputError
from sparsetrace.tasks.niah import NEEDLE, NOISE, niah_prompt


@pytest.mark.parametrize("length", [600, 1000, 1500])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_the_longest_prompt_that_fits(tiny_tokenizer, length, depth):
    prompt = niah_prompt(tiny_tokenizer, length, depth, seed=3)
    assert prompt.num_tokens <= length
    longer = niah_prompt(tiny_tokenizer, length + len(NOISE) + 2, depth, seed=3)  # byte tokenizer: 1 token a byte
    assert longer.haystack_sentences == prompt.haystack_sentences + 1, "one more sentence would not fit"
    start, end = prompt.needle_chars
    assert prompt.text[start:end] == NEEDLE.format(key=prompt.key, value=prompt.answer)
    a, b = prompt.needle_tokens
    assert tiny_tokenizer.decode(prompt.token_ids[a:b]) == prompt.text[start:end], "byte tokens: exact span"
    before = prompt.text[:start].count(NOISE)
    assert before == round(depth * prompt.haystack_sentences), "the needle sits at its depth"
    assert prompt.text.endswith(f"The special magic number for {prompt.key} mentioned in the provided text is")
    assert len(prompt.answer) == 7 and prompt.answer.isdigit()


def test_seeds_choose_the_needle(tiny_tokenizer):
    a, b = niah_prompt(tiny_tokenizer, 800, seed=1), niah_prompt(tiny_tokenizer, 800, seed=1)
    c = niah_prompt(tiny_tokenizer, 800, seed=2)
    assert (a.key, a.answer, a.text) == (b.key, b.answer, b.text)
    assert (a.key, a.answer) != (c.key, c.answer)


def test_user_haystack_replaces_the_noise(tiny_tokenizer):
    prompt = niah_prompt(tiny_tokenizer, 900, 0.5, haystack="Ships sail at dawn. Gulls cry!\n\nNets dry in the sun?")
    assert NOISE not in prompt.text
    assert "Ships sail at dawn. Gulls cry! Nets dry in the sun? Ships sail at dawn." in prompt.text


@pytest.mark.parametrize("kwargs,message", [
    ({"length": 50}, "cannot hold the template"),
    ({"depth": 1.5}, "outside [0, 1]"),
    ({"haystack": "  \n "}, "haystack text is empty"),
    ({"chat_template": True}, "no chat template"),
])
def test_bad_requests_name_the_fix(tiny_tokenizer, kwargs, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        niah_prompt(tiny_tokenizer, **({"length": 800} | kwargs))
