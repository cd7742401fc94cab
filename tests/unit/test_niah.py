"""RULER's needle prompts: exact structure and length, needle position and span, seeds, haystacks, the
legacy form, prompts from text and from RULER's jsonl, errors."""

import json

import pytest
import torch

from sparsetrace.errors import InputError
from sparsetrace.tasks.niah import (
    _KEY_WORDS,
    NEEDLE,
    NOISE,
    NiahPrompt,
    answer_end,
    needle_value,
    niah_prompt,
    ruler_prompts,
    ruler_words,
)

# RULER's niah template and answer prefix (scripts/data/synthetic/constants.py at c3f5e3b) after the replacements
# its niah.py makes for one needle and one query ('Some' -> 'A', 'are all' / 'are' -> 'is', 'numbers' -> 'number'),
# written out here so that a change to ours cannot pass unnoticed
RULER_SINGLE = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz "
                "you about the number afterwards.\n{context}\nWhat is the special magic number for {key} mentioned "
                "in the provided text? The special magic number for {key} mentioned in the provided text is")


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


def _is_ruler_key(key: str) -> bool:
    adjectives, nouns = map(set, ruler_words())
    return any(key[:i] in adjectives and key[i + 1:] in nouns for i, c in enumerate(key) if c == "-")


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_the_default_is_rulers_prompt(tiny_tokenizer, depth):
    prompt = niah_prompt(tiny_tokenizer, 1200, depth, seed=5)
    count = prompt.haystack_sentences
    units = [NOISE] * count
    units.insert(round(depth * count), NEEDLE.format(key=prompt.key, value=prompt.answer))
    assert prompt.text == RULER_SINGLE.format(context="\n".join(units), key=prompt.key), "singular, joined by \\n"
    assert prompt.form == "ruler" and _is_ruler_key(prompt.key), "an adjective-noun pair from wonderwords"
    assert 1_000_000 <= int(prompt.answer) <= 9_999_999

    def budgeted(text: str) -> int:  # RULER: tokens without special tokens + 128 to generate <= max_seq_length
        return len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) + 128

    assert budgeted(prompt.text) <= 1200 < budgeted(prompt.text) + len(NOISE) + 1, "one more unit would not fit"


def test_ruler_keys_come_from_the_whole_vocabulary(tiny_tokenizer):
    adjectives, nouns = ruler_words()
    assert len(adjectives) * len(nouns) > 6_000_000, "RULER's millions of keys, not 400"
    keys = {niah_prompt(tiny_tokenizer, 700, seed=seed).key for seed in range(20)}
    assert len(keys) == 20 and all(map(_is_ruler_key, keys))


def test_the_legacy_form_is_the_earlier_prompt(tiny_tokenizer):
    prompt = niah_prompt(tiny_tokenizer, 1000, 0.5, seed=0, form="legacy")
    assert prompt.key == "tide-step" and prompt.form == "legacy"
    assert prompt.text.startswith("Some special magic numbers are hidden within the following text.")
    assert f"{NOISE} {NOISE}" in prompt.text and prompt.text.count("\n") == 2, "joined by spaces"
    assert prompt.num_tokens <= 1000 < prompt.num_tokens + len(NOISE) + 1, "no generation budget"
    assert {*prompt.key.split("-")} <= set(_KEY_WORDS)


def _ruler_row(prompt: NiahPrompt) -> dict:
    """The jsonl row RULER's niah.py writes for a prompt: the text split where the answer prefix starts."""
    cut = prompt.text.rfind(" The special magic")
    return {"index": 0, "input": prompt.text[:cut], "outputs": [prompt.answer], "length": prompt.num_tokens + 128,
            "answer_prefix": prompt.text[cut:]}


def test_rulers_jsonl_round_trip(tiny_tokenizer, tmp_path):
    made = [niah_prompt(tiny_tokenizer, 900, depth, seed=seed) for seed, depth in ((1, 0.2), (2, 0.9))]
    path = tmp_path / "validation.jsonl"
    path.write_text("\n".join(json.dumps(_ruler_row(p)) for p in made) + "\n")
    read = ruler_prompts(tiny_tokenizer, path)
    for ours, theirs in zip(made, read, strict=True):
        assert (theirs.text, theirs.answer, theirs.key) == (ours.text, ours.answer, ours.key)
        assert theirs.needle_chars == ours.needle_chars and theirs.needle_tokens == ours.needle_tokens
        assert torch.equal(theirs.token_ids, ours.token_ids) and theirs.form == "text"
        assert theirs.depth == round(ours.needle_tokens[0] / ours.num_tokens, 3)


def test_a_prompt_from_any_text_finds_its_needle(tiny_tokenizer):
    text = "Ships sail at dawn.\nThe key is under the mat. Gulls cry! Where is the key? It is under the"
    prompt = NiahPrompt.from_text(tiny_tokenizer, text, needle="The key is under the mat.", answer="mat")
    assert text[slice(*prompt.needle_chars)] == "The key is under the mat."
    assert tiny_tokenizer.decode(prompt.token_ids[slice(*prompt.needle_tokens)]) == "The key is under the mat."
    by_answer = NiahPrompt.from_text(tiny_tokenizer, "Noise here. Some noise! The code is 4217. More noise.",
                                     answer="4217")
    assert by_answer.text[slice(*by_answer.needle_chars)] == "The code is 4217."
    ruler = niah_prompt(tiny_tokenizer, 800, 0.5, seed=4)
    assert NiahPrompt.from_text(tiny_tokenizer, ruler.text).needle_chars == ruler.needle_chars, "the asked value"


def test_needle_value_is_the_value_the_question_asks_for():
    text = ("One of the special magic numbers for red-fox is: 1111111.\nOne of the special magic numbers for "
            "blue-owl is: 2222222.\nWhat is the special magic number for blue-owl mentioned in the provided text?")
    assert needle_value(text) == "2222222"
    assert needle_value("One of the special magic uuids for a b is: 3f2a-77.") == "3f2a-77"
    assert needle_value("Nothing to find here.") is None


def test_answer_end_cuts_where_the_value_is_complete(tiny_tokenizer):
    tokens = torch.tensor(tiny_tokenizer(" 123 and more")["input_ids"])
    assert answer_end(tiny_tokenizer, tokens, "123") == 4
    assert answer_end(tiny_tokenizer, tokens, "999") == len(tokens), "never complete: all of them"
    assert answer_end(tiny_tokenizer, tokens, "999", stop=[int(tokens[1])]) == 2, "the end of text stops it"


@pytest.mark.parametrize("row,message", [
    ("not json", "line 1 is not JSON"),
    (json.dumps({"input": "x"}), "lacks the fields input"),
    (json.dumps({"input": "x 1", "outputs": ["1", "2"], "answer_prefix": ""}), "has 2 outputs"),
    (json.dumps({"input": "no value here", "outputs": ["1234567"], "answer_prefix": " is"}),
     "'1234567' is not in the prompt text"),
    ("", "holds no prompts"),
])
def test_bad_jsonl_names_the_fix(tiny_tokenizer, tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(row + "\n")
    with pytest.raises(InputError, match=message) as error:
        ruler_prompts(tiny_tokenizer, path)
    assert len(str(error.value).splitlines()) == 1
    with pytest.raises(InputError, match="no such file"):
        ruler_prompts(tiny_tokenizer, tmp_path / "missing.jsonl")


@pytest.mark.parametrize("kwargs,message", [
    ({"needle": "not in it."}, "needle 'not in it.' is not in the prompt text"),
    ({}, "no answer to look for"),
    ({"answer": "zzz"}, "'zzz' is not in the prompt text"),
])
def test_from_text_names_the_fix(tiny_tokenizer, kwargs, message):
    with pytest.raises(InputError, match=message):
        NiahPrompt.from_text(tiny_tokenizer, "Some text. And more text.", **kwargs)


def test_an_unknown_form_is_refused(tiny_tokenizer):
    with pytest.raises(InputError, match="form='ruler2'; use 'ruler'"):
        niah_prompt(tiny_tokenizer, 800, form="ruler2")
