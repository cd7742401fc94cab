"""Units of a reasoning text (sentences, paragraphs or key blocks) with exact char -> token spans.

Sentences are split the way the thought-anchors work does (Bogdan et al. 2025, their
`split_solution_into_chunks`): a chunk ends at a blank line or at `.`, `?` or `!` followed by
whitespace; chunks are stripped; a chunk under 10 characters is merged into the next one (the
last into the previous one). Two deliberate differences, both so that no text is silently lost:
the trailing chunk without final punctuation is kept (as in the version that produced their
released data), and any whitespace (not only space and newline) ends a sentence.

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
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError

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
    return _merge_short(chunks)


def _merge_short(chunks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged = list(chunks)
    i = 0
    while i < len(merged):
        a, b = merged[i]
        if b - a >= MIN_CHUNK_CHARS or len(merged) == 1:
            i += 1
        elif i == len(merged) - 1:
            merged[i - 1] = (merged[i - 1][0], b)
            merged.pop(i)
        else:
            merged[i + 1] = (a, merged[i + 1][1])
            merged.pop(i)
    return merged


def paragraph_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Char spans of the paragraphs (separated by blank lines) of text[start:end]."""
    end = len(text) if end is None else end
    spans, position = [], start
    for match in _BLANK_LINE.finditer(text, start, end):
        spans.append(_strip(text, position, match.start()))
        position = match.end()
    spans.append(_strip(text, position, end))
    return [s for s in spans if s]


def token_offsets(tokenizer, text: str) -> tuple[Tensor, list[tuple[int, int]]]:
    """Token ids int64 [T] of `text` (as `trace` tokenizes it) and each token's char span."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("units need a fast tokenizer (with offset mapping); load the model's tokenizer with "
                         "use_fast=True")
    encoded = tokenizer(text, return_offsets_mapping=True)
    return torch.tensor(encoded["input_ids"], dtype=torch.long), [tuple(x) for x in encoded["offset_mapping"]]


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
    starts = [a for a, _ in spans]
    token_of_unit: list[list[int]] = [[] for _ in spans]
    for t, (a, b) in enumerate(offsets):
        anchor = next((c for c in range(a, b) if not text[c].isspace()), None)
        if anchor is None:
            continue
        u = bisect.bisect_right(starts, anchor) - 1
        if u >= 0 and anchor < spans[u][1]:
            token_of_unit[u].append(t)
    units = []
    for (a, b), tokens in zip(spans, token_of_unit, strict=True):
        if tokens:
            units.append(Unit(len(units), text[a:b], a, b, tokens[0], tokens[-1] + 1))
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
        chars = [c for t in range(start, end) for c in offsets[t] if offsets[t][1] > offsets[t][0]]
        a, b = (min(chars), max(chars)) if chars else (0, 0)
        units.append(Unit(len(units), text[a:b], a, b, start, end))
    return units


def unit_of_tokens(units: list[Unit], num_tokens: int) -> Tensor:
    """int64 [T]: the unit of every token (-1 = none)."""
    owner = torch.full((num_tokens,), -1, dtype=torch.long)
    for unit in units:
        owner[unit.token_start : unit.token_end] = unit.index
    return owner
