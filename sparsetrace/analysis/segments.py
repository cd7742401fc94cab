"""Units of a reasoning text (sentences, paragraphs or key blocks) with exact char -> token spans.

Sentences are split the way the thought-anchors code does (Bogdan et al. 2025, `utils.py`:
`split_solution_into_chunks`, mapped back to the text by `split_solution_keep_spacing`): a chunk
ends at a blank line or at `.`, `?` or `!` followed by whitespace; chunks are stripped; a chunk
under 10 characters is merged into the next one (the last into the previous one), a merged chunk
being measured as they build it, its pieces joined by one space ("Ok.\\n\\nWait!" counts 9 and is
merged again). A unit's span is the merged chunk's char span in the text, whitespace inside kept.

Differences from their code, so that no text is silently lost:

- **The final sentence is kept; theirs always drops it.** Their splitter strips the text, so the
  last `.` is never followed by whitespace and the text after the last boundary is never
  appended. Our sentences are theirs plus that final one (merged into the one before when it is
  under 10 characters). It is the unit where a chain of thought states its answer.
- Any whitespace after `.`, `?` or `!` ends a sentence (theirs: a space or a newline), and a blank
  line may hold spaces or tabs (theirs: `\\n\\n` exactly).

Which part of a text is split (`region`):

- "auto" (default): inside `<think> ... </think>` if the text has a `<think>` tag (as their
  splitter); else, for a ChatML transcript (`<|im_start|>assistant`), the assistant turns; else
  all of it.
- "think", "assistant", "all": that rule on its own; or a (start, end) char range.

Chat markup (`<|...|>` tokens with the role line after `<|im_start|>`, `<｜...｜>`, `<think>`)
is never part of a unit and always ends one, so no unit crosses a turn.

Token spans come from the tokenizer's offset mapping on the whole text (the same call `trace`
makes): a token belongs to the unit holding its first non-whitespace character; a unit's token
span runs from its first to its last such token (whitespace tokens inside it included). Tokens
in no unit (the prompt, markup, whitespace between units) get unit -1. A unit that receives no
token (all its characters inside a token anchored in the previous unit) is dropped.

Their token spans differ, and a user comparing numbers will meet it: their
`get_sentence_token_boundaries` takes `len(tokenizer.encode(text[:char]))` at each sentence's start
and end. The text before a sentence ends in the space that, in the whole text, is part of the
sentence's first token (" The"); encoded alone the space is a token of its own, so their span starts
one token late and that first token belongs to no sentence. This shifts most sentences (those after
a space) by one token; ours, from the offsets of the tokens the model reads, are exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..text import anchored_token_spans, chars_of_tokens, token_offsets

UNIT_KINDS = ("sentences", "paragraphs", "blocks")
REGIONS = ("auto", "think", "assistant", "all")
MIN_CHUNK_CHARS = 10  # thought-anchors merges shorter chunks into the next one

_MARKUP = re.compile(r"<\|im_start\|>[A-Za-z_]*\n?|<\|[^|<>\n]{1,40}\|>|<｜[^｜<>\n]{1,40}｜>|</?think>")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_ASSISTANT_TURN = re.compile(r"<\|im_start\|>assistant\n?(.*?)(?:<\|im_end\|>|$)", re.DOTALL)


@dataclass
class Unit:
    """One unit: its text, char span [char_start, char_end) and token span [token_start, token_end)."""

    index: int
    text: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    category: str = "unknown"
    score: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "text": self.text, "chars": [self.char_start, self.char_end],
                "tokens": [self.token_start, self.token_end], "category": self.category, "score": self.score}


def text_regions(text: str, region: str | tuple[int, int] = "auto") -> list[tuple[int, int]]:
    """The char ranges that are split into units (see the module docstring)."""
    if isinstance(region, tuple):
        start, end = region
        if not 0 <= start < end <= len(text):
            raise InputError(f"region {region} is not a char range inside the {len(text):,}-char text")
        return [(start, end)]
    if region not in REGIONS:
        raise InputError(f"region={region!r}; use one of {', '.join(REGIONS)} or a (start, end) char range")
    if region in ("auto", "think") and "<think>" in text:
        start = text.index("<think>") + len("<think>")
        end = text.find("</think>", start)
        return [(start, len(text) if end < 0 else end)]
    if region in ("auto", "assistant"):
        turns = [m.span(1) for m in _ASSISTANT_TURN.finditer(text) if m.end(1) > m.start(1)]
        if turns:
            return turns
    if region in ("think", "assistant"):
        missing = "<think> tag" if region == "think" else "ChatML assistant turn (<|im_start|>assistant)"
        raise InputError(f"region={region!r} but the text has no {missing}; use region 'all' or 'auto'")
    return [(0, len(text))]


def _plain_pieces(text: str, regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The regions cut at chat markup, markup removed."""
    pieces = []
    for start, end in regions:
        position = start
        for match in _MARKUP.finditer(text, start, end):
            pieces.append((position, match.start()))
            position = match.end()
        pieces.append((position, end))
    return [(a, b) for a, b in pieces if text[a:b].strip()]


def _strip(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Char spans of the sentences of text[start:end] (the thought-anchors rule, module docstring)."""
    end = len(text) if end is None else end
    chunks, chunk_start, i = [], start, start
    while i < end:
        boundary = None
        if text[i] == "\n" and _BLANK_LINE.match(text, i, end):
            boundary = i + 1
        elif text[i] in ".?!" and i + 1 < end and text[i + 1].isspace():
            boundary = i + 1
        if boundary is not None:
            span = _strip(text, chunk_start, boundary)
            if span:
                chunks.append(span)
            chunk_start = boundary
        i += 1
    span = _strip(text, chunk_start, end)
    if span:
        chunks.append(span)
    if not chunks:
        return []
    merged, (a, b) = _merge_short(chunks[:-1]), chunks[-1]  # theirs, then the final sentence they drop
    if merged and b - a < MIN_CHUNK_CHARS:
        merged[-1] = (merged[-1][0], b)
    else:
        merged.append((a, b))
    return merged


def _merge_short(chunks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Their merge: a chunk under 10 characters joins the next (the last joins the previous), and a
    merged chunk is measured as they build it, its stripped pieces joined by one space."""
    merged = [(a, b, b - a) for a, b in chunks]  # (start, end, length as they measure it)
    i = 0
    while i < len(merged):
        a, b, length = merged[i]
        if length >= MIN_CHUNK_CHARS or len(merged) == 1:
            i += 1
        elif i == len(merged) - 1:
            start, _, before = merged[i - 1]
            merged[i - 1] = (start, b, before + 1 + length)
            merged.pop(i)
        else:
            _, end, after = merged[i + 1]
            merged[i + 1] = (a, end, length + 1 + after)
            merged.pop(i)
    return [(a, b) for a, b, _ in merged]


def paragraph_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Char spans of the paragraphs (separated by blank lines) of text[start:end]."""
    end = len(text) if end is None else end
    spans, position = [], start
    for match in _BLANK_LINE.finditer(text, start, end):
        spans.append(_strip(text, position, match.start()))
        position = match.end()
    spans.append(_strip(text, position, end))
    return [s for s in spans if s]


def split_units(
    text: str,
    tokenizer,
    kind: str = "sentences",
    *,
    region: str | tuple[int, int] = "auto",
    block_size: int = 64,
) -> tuple[list[Unit], Tensor]:
    """Split `text` into units with exact token spans.

    Args:
        kind: "sentences", "paragraphs", or "blocks" (token blocks of `block_size` tokens: the
            trace's key blocks when block_size = block_k; inside the region, markup included).
    Returns:
        the units (in text order, re-indexed from 0), and the token ids int64 [T].
    """
    if kind not in UNIT_KINDS:
        raise InputError(f"units={kind!r}; use one of {', '.join(UNIT_KINDS)}")
    ids, offsets = token_offsets(tokenizer, text)
    regions = text_regions(text, region)
    if kind == "blocks":
        return _block_units(text, ids, offsets, regions, block_size), ids
    split = sentence_spans if kind == "sentences" else paragraph_spans
    spans = [span for a, b in _plain_pieces(text, regions) for span in split(text, a, b)]
    units = []
    for (a, b), tokens in zip(spans, anchored_token_spans(text, offsets, spans), strict=True):
        if tokens:
            units.append(Unit(len(units), text[a:b], a, b, *tokens))
    if not units:
        raise InputError("no units found in the text's region; check the text (or use region 'all')")
    return units, ids


def _block_units(text, ids, offsets, regions, block_size) -> list[Unit]:
    inside = [t for t, (a, b) in enumerate(offsets) if any(a < e and b > s for s, e in regions)]
    if not inside:
        raise InputError("no tokens in the text's region; check the text (or use region 'all')")
    first, last = inside[0], inside[-1] + 1
    units = []
    for start in range(first, last, block_size):
        end = min(start + block_size, last)
        a, b = chars_of_tokens(offsets, start, end) or (0, 0)
        units.append(Unit(len(units), text[a:b], a, b, start, end))
    return units


def unit_of_tokens(units: list[Unit], num_tokens: int) -> Tensor:
    """int64 [T]: the unit of every token (-1 = none)."""
    owner = torch.full((num_tokens,), -1, dtype=torch.long)
    for unit in units:
        owner[unit.token_start : unit.token_end] = unit.index
    return owner
