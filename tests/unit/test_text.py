"""`text`: shortening, char <-> token spans, block texts, a trace's tokenizer name."""

import pytest
import torch

from sparsetrace.errors import InputError
from sparsetrace.text import (
    anchored_token_spans,
    chars_of_tokens,
    decoded_blocks,
    recorded_tokenizer,
    shorten,
    token_anchors,
    token_offsets,
    token_span,
    tokens_of_chars,
)

TEXT = "Héllo  world.\nSecond  sentence here. Third!"


def test_shorten():
    assert shorten("a  b\n c", 10) == "a b c"
    assert shorten("abcdefgh", 5) == "abcd…" and len(shorten("x" * 100, 24)) == 24
    assert shorten("a  b\n cdef", 6, keep_whitespace=True) == "a  b\n…"


def test_token_offsets_and_spans_of_characters(tiny_tokenizer):
    ids, offsets = token_offsets(tiny_tokenizer, TEXT)
    assert ids.dtype == torch.int64 and len(ids) == len(offsets) == len(TEXT.encode())  # one token per byte
    assert offsets[1] == offsets[2] == (1, 2), "both bytes of é map to its character"
    start = TEXT.index("world")
    a, b = tokens_of_chars(offsets, start, start + 5)
    assert tiny_tokenizer.decode(ids[a:b]) == "world" and token_span(tiny_tokenizer, TEXT, start, start + 5) == (a, b)
    assert chars_of_tokens(offsets, a, b) == (start, start + 5)
    assert tokens_of_chars(offsets, 3, 3) == (0, 0) and chars_of_tokens(offsets, 5, 5) is None


def test_tokens_without_characters_overlap_nothing():
    offsets = [(0, 0), (0, 3), (3, 3), (3, 6)]  # a BOS and an empty token in the middle
    assert tokens_of_chars(offsets, 0, 6) == (1, 4) and tokens_of_chars(offsets, 0, 3) == (1, 2)
    assert chars_of_tokens(offsets, 0, 1) is None and chars_of_tokens(offsets, 0, 4) == (0, 6)


def test_a_slow_tokenizer_is_refused_for_offsets_and_counted_for_a_span(tiny_tokenizer):
    class Slow:
        is_fast = False

        def __call__(self, text, **kwargs):
            return {"input_ids": tiny_tokenizer(text, **kwargs)["input_ids"]}

    with pytest.raises(InputError, match="attribution needs a fast tokenizer"):
        token_offsets(Slow(), TEXT, subject="attribution needs")
    start = TEXT.index("world")
    assert token_span(Slow(), TEXT, start, start + 5) == token_span(tiny_tokenizer, TEXT, start, start + 5)


def test_anchored_token_spans(tiny_tokenizer):
    _, offsets = token_offsets(tiny_tokenizer, TEXT)
    first, second = (0, 13), (14, 36)  # "Héllo  world." and "Second  sentence here."
    anchor = token_anchors(TEXT, offsets)
    space = tokens_of_chars(offsets, 5, 6)[0]  # the token of the first space after "Héllo"
    assert anchor[0] == 0 and anchor[space] is None, "a whitespace token has no anchor"
    spans = anchored_token_spans(TEXT, offsets, [first, second, (36, 37)])
    assert spans[0] == (0, 14) and spans[1] == (15, 37), "token ranges: é is two tokens"
    assert spans[2] is None, "the space between sentences anchors no token"


def test_decoded_blocks_and_recorded_tokenizer(tiny_tokenizer):
    ids, _ = token_offsets(tiny_tokenizer, TEXT)
    blocks = decoded_blocks(ids, tiny_tokenizer, 8)
    assert len(blocks) == 6 and blocks[1] == tiny_tokenizer.decode(ids[8:16]) and "".join(blocks) == TEXT

    class Trace:
        model_info = {"name": "org/model", "tokenizer": ""}

    assert recorded_tokenizer(Trace()) == "org/model"
    Trace.model_info = {"name": "org/model", "tokenizer": "org/tok"}
    assert recorded_tokenizer(Trace()) == "org/tok"
