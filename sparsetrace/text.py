"""Tokens, characters and text: the one owner of the mapping between them, and of short quotes.

Prompts (`tasks/`), units and sources (`analysis/`), the report and the command line all turn
character ranges into token ranges, label blocks with their text, or quote a piece of text on
one line. This module does it once for all of them. It sits at the package's top rather than in
`analysis/spans.py` (which builds a saved trace's text on it and parses user span specs) so that
tasks, the report and the CLI need no analysis module for a string helper. It knows tokenizers
only by their call and decode methods, and no model.

Offsets are a fast tokenizer's offset mapping: `offsets[t]` = (start, end) characters of token t;
a token without characters (start == end, a BOS say) overlaps nothing.

>>> shorten("a  long\\ntext", 6)
'a lon…'
>>> tokens_of_chars([(0, 0), (0, 3), (3, 4), (4, 8)], 2, 5)
(1, 4)
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import InputError

if TYPE_CHECKING:
    from .trace import Trace

Offsets = list[tuple[int, int]]


def shorten(text: str, width: int, *, keep_whitespace: bool = False) -> str:
    """`text` on one line (whitespace runs as one space, unless `keep_whitespace`), cut to `width`
    characters with an ellipsis marking the cut."""
    text = text if keep_whitespace else " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def token_offsets(
    tokenizer, text: str, *, add_special_tokens: bool = True, subject: str = "units need"
) -> tuple[Tensor, Offsets]:
    """Token ids int64 [T] of `text` (as `trace` tokenizes it) and each token's char span.

    Raises `InputError` for a slow tokenizer (it has no offsets); `subject` is the error's first words.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"{subject} a fast tokenizer (with offset mapping); load the model's tokenizer with "
                         "use_fast=True")
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return torch.tensor(encoded["input_ids"], dtype=torch.long), [tuple(x) for x in encoded["offset_mapping"]]


def tokens_of_chars(offsets: Offsets, start: int, end: int) -> tuple[int, int]:
    """The tokens [a, b) whose characters overlap [start, end); (0, 0) when none do."""
    hits = [t for t, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
    return (hits[0], hits[-1] + 1) if hits else (0, 0)


def token_span(tokenizer, text: str, start: int, end: int) -> tuple[int, int]:
    """[first, last + 1) of the tokens of `tokenizer(text)` that overlap characters [start, end)."""
    if getattr(tokenizer, "is_fast", False):
        return tokens_of_chars(token_offsets(tokenizer, text)[1], start, end)
    # slow tokenizers have no offsets: count the tokens of the prefixes (exact up to a merge at the edge)
    return len(tokenizer(text[:start])["input_ids"]), len(tokenizer(text[:end])["input_ids"])


def chars_of_tokens(offsets: Offsets, start: int, end: int) -> tuple[int, int] | None:
    """The characters [a, b) that tokens [start, end) cover, None when they have none."""
    chars = [c for a, b in offsets[start:end] if b > a for c in (a, b)]
    return (min(chars), max(chars)) if chars else None


def token_anchors(text: str, offsets: Offsets) -> list[int | None]:
    """Per token, its first non-whitespace character (None: only whitespace, or no characters), the
    character that decides which sentence or unit the token belongs to."""
    return [next((c for c in range(a, b) if not text[c].isspace()), None) for a, b in offsets]


def anchored_token_spans(
    text: str, offsets: Offsets, spans: list[tuple[int, int]]
) -> list[tuple[int, int] | None]:
    """Per char span [a, b) of `spans` (in order, disjoint): the tokens [first, last + 1) anchored in it
    (`token_anchors`), None when no token is. Whitespace tokens between them fall inside the range."""
    starts = [a for a, _ in spans]
    found: list[tuple[int, int] | None] = [None] * len(spans)
    for t, anchor in enumerate(token_anchors(text, offsets)):
        if anchor is None:
            continue
        j = bisect.bisect_right(starts, anchor) - 1
        if j >= 0 and anchor < spans[j][1]:
            found[j] = (t if found[j] is None else found[j][0], t + 1)
    return found


def decoded_blocks(token_ids: Tensor, tokenizer, size: int) -> list[str]:
    """Each block of `size` tokens of `token_ids` (int [T]) decoded on its own, in order."""
    ids = token_ids.tolist()
    return tokenizer.batch_decode([ids[start : start + size] for start in range(0, len(ids), size)])


def recorded_tokenizer(trace: Trace) -> str | None:
    """The tokenizer a trace names for its text: the one it records, else its model's (traces record
    the model's name always, the tokenizer's only since it was added, and "" for an unnamed one)."""
    return trace.model_info.get("tokenizer") or trace.model_info.get("name")
