"""Units: the thought-anchors sentence rule and its edge cases, regions, markup, exact token spans."""

import pytest

from sparsetrace.analysis.segments import (
    paragraph_spans,
    sentence_spans,
    split_units,
    text_regions,
    unit_of_tokens,
)
from sparsetrace.errors import InputError


def sentences(text, **kwargs):
    return [text[a:b] for a, b in sentence_spans(text, **kwargs)]


def test_sentence_rule():
    text = ("We add the numbers. Is it 7? Yes! It is seven now.\n\nNext paragraph starts here\nand ends here. "
            "3.5 is a decimal.")
    assert sentences(text) == ["We add the numbers.", "Is it 7? Yes!", "It is seven now.",
                               "Next paragraph starts here\nand ends here.", "3.5 is a decimal."]


def test_short_chunks_merge_into_the_next_and_the_last_into_the_previous():
    assert sentences("Ok. So. This is a long sentence. Fine.") == ["Ok. So. This is a long sentence. Fine."]
    assert sentences("A long first sentence. Hi.") == ["A long first sentence. Hi."]


def test_merges_measure_as_theirs_and_the_final_sentence_is_kept():
    text = "First sentence here.\n\nOk.\n\nWait! Let me check the result again. The end is here."
    # their split_solution_into_chunks: ['First sentence here.', 'Ok. Wait! Let me check the result again.']:
    # "Ok. Wait!" is 9 characters as they join it, so it merges once more; they drop the final sentence
    assert sentences(text) == ["First sentence here.", "Ok.\n\nWait! Let me check the result again.",
                               "The end is here."]
    # their short last chunk joins the one before it; then our final sentence follows
    assert sentences("A long first sentence. Yes. The final sentence.") == ["A long first sentence. Yes.",
                                                                            "The final sentence."]


def test_no_punctuation_unicode_and_other_whitespace():
    assert sentences("no punctuation at all just words") == ["no punctuation at all just words"]
    text = "Ça coûte 5 €. Größe ist 3!\tDas Ergebnis: 日本語のテキスト。 Ende gut."
    assert sentences(text) == ["Ça coûte 5 €.", "Größe ist 3!", "Das Ergebnis: 日本語のテキスト。 Ende gut."]


def test_paragraphs():
    text = "One. Two.\n\n  Three lines\nhere.\n \nFour."
    assert [text[a:b] for a, b in paragraph_spans(text)] == ["One. Two.", "Three lines\nhere.", "Four."]


def test_regions_think_tags_and_chat_turns():
    think = "Problem: add 3 and 4.<think>First I add them. 3 + 4 = 7.</think>The answer is 7."
    (a, b), = text_regions(think)
    assert think[a:b] == "First I add them. 3 + 4 = 7."
    unclosed = "prompt <think>Reasoning without end. Still going"
    assert unclosed[text_regions(unclosed)[0][0]:] == "Reasoning without end. Still going"
    chat = "<|im_start|>user\nAdd 3 and 4.<|im_end|>\n<|im_start|>assistant\nIt is 7. Done here.<|im_end|>\n"
    assert [chat[a:b] for a, b in text_regions(chat)] == ["It is 7. Done here."]
    assert text_regions(chat, "all") == [(0, len(chat))]
    with pytest.raises(InputError, match="no <think> tag"):
        text_regions(chat, "think")
    with pytest.raises(InputError, match="char range"):
        text_regions(chat, (5, 10_000))


def test_units_never_hold_markup_and_spans_are_exact(tiny_tokenizer):
    text = ("<|im_start|>user\nWhat is 3 + 4? Tell me.<|im_end|>\n<|im_start|>assistant\n"
            "We add them: 3 + 4 = 7.\n\nSo the answer is 7.<|im_end|>")
    units, ids = split_units(text, tiny_tokenizer, "sentences", region="all")
    assert [u.text for u in units] == ["user\nWhat is 3 + 4? Tell me."[5:], "We add them: 3 + 4 = 7.",
                                       "So the answer is 7."]
    assert not any("<|" in u.text for u in units)
    for u in units:  # byte tokenizer: one token per byte, so spans are checkable by hand
        assert tiny_tokenizer.decode(ids[u.token_start : u.token_end]) == u.text
        assert text[u.char_start : u.char_end] == u.text
    owner = unit_of_tokens(units, len(ids))
    assert owner[units[1].token_start] == 1 and owner[0] == -1
    auto, _ = split_units(text, tiny_tokenizer)
    assert [u.text for u in auto] == [u.text for u in units[1:]] and auto[0].index == 0


def test_unicode_token_spans(tiny_tokenizer):
    text = "Größe ist 3 Meter. 日本語のテキストです. Fertig jetzt."
    units, ids = split_units(text, tiny_tokenizer)
    assert [u.text for u in units] == ["Größe ist 3 Meter.", "日本語のテキストです.", "Fertig jetzt."]
    for u in units:
        assert tiny_tokenizer.decode(ids[u.token_start : u.token_end]) == u.text


def test_block_units_and_bad_kind(tiny_tokenizer):
    text = "x" * 50
    units, _ = split_units(text, tiny_tokenizer, "blocks", block_size=16)
    assert [(u.token_start, u.token_end) for u in units] == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert units[1].text == "x" * 16
    with pytest.raises(InputError, match="sentences, paragraphs, blocks"):
        split_units(text, tiny_tokenizer, "words")
