"""The text of a saved trace, and spans of it named the way a user names them.

A trace stores token ids, not text. `trace_text` decodes them with the model's tokenizer (the
trace records its name, `resolve_tokenizer` loads it without the weights) and gives every token
its character span, so that character ranges and search strings map to token ranges:

- exact: the decoded text, when it re-tokenizes to the trace's own tokens (the usual case: the
  trace was made from that text); offsets come from the tokenizer's offset mapping.
- pieces: otherwise, each token decoded on its own and the pieces concatenated (a byte split
  inside a multi-byte character shows as U+FFFD); offsets are the pieces' positions.

A span spec (`parse_span`) is one of

    tokens:A-B      tokens A .. B-1 (Python slice convention, B exclusive)
    chars:A-B       the tokens overlapping characters A .. B-1 of the text
    text:STRING     the first occurrence of STRING (also for strings that start with "tokens:")
    STRING          the same, when it does not start with "tokens:" or "chars:"
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError, SparsetraceError
from ..text import recorded_tokenizer, shorten, token_offsets, tokens_of_chars
from ..trace import Trace

_RANGE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")
SPAN_HELP = "tokens:A-B, chars:A-B, or a string to search for (text:STRING when it starts with tokens: or chars:)"


@dataclass(frozen=True)
class TraceText:
    """The text of a trace: `offsets[t]` = (start, end) char span of token t in `text`."""

    text: str
    offsets: list[tuple[int, int]]
    exact: bool

    def of_tokens(self, start: int, end: int) -> str:
        """The text of tokens [start, end)."""
        end = min(end, len(self.offsets))
        if end <= start:
            return ""
        return self.text[self.offsets[start][0] : self.offsets[end - 1][1]]

    def tokens_of_chars(self, start: int, end: int) -> tuple[int, int]:
        """The tokens [a, b) whose characters overlap [start, end); empty when none do."""
        return tokens_of_chars(self.offsets, start, end)


@dataclass(frozen=True)
class Span:
    """A token range [start, end) of a trace, with how the user named it and its text (if known)."""

    start: int
    end: int
    spec: str
    text: str | None = None
    occurrences: int | None = None  # for search strings: how often the string occurs

    @property
    def tokens(self) -> tuple[int, int]:
        return (self.start, self.end)

    def to_dict(self) -> dict:
        out = {"spec": self.spec, "tokens": [self.start, self.end], "text": self.text}
        if self.occurrences is not None:
            out["occurrences"] = self.occurrences
        return out


def resolve_tokenizer(trace: Trace, name: str | None = None):
    """The tokenizer `name` (default: the one the trace records), loaded without model weights.

    Raises `InputError` naming `--tokenizer` when it cannot be loaded."""
    from ..models import load_tokenizer

    name = name or recorded_tokenizer(trace)
    if not name:
        raise InputError("the trace records no tokenizer; give one with --tokenizer (a hub id or model folder)")
    try:
        return load_tokenizer(name)
    except SparsetraceError as error:
        raise InputError(f"cannot load the tokenizer {name!r} to decode the trace ({error}); give the model's "
                         "tokenizer with --tokenizer (a hub id or local folder)") from error


def trace_text(trace: Trace, tokenizer) -> TraceText:
    """Decode a trace's tokens into text with per-token char offsets (module docstring)."""
    ids = trace.token_ids.tolist()
    text = tokenizer.decode(ids)
    if getattr(tokenizer, "is_fast", False):
        tokens, offsets = token_offsets(tokenizer, text, add_special_tokens=False)
        if tokens.tolist() == ids:
            return TraceText(text, offsets, True)
    pieces = tokenizer.batch_decode([[i] for i in ids])
    offsets, position = [], 0
    for piece in pieces:
        offsets.append((position, position + len(piece)))
        position += len(piece)
    return TraceText("".join(pieces), offsets, False)


def parse_span(spec: str | tuple[int, int], tokens: int, text: TraceText | None = None) -> Span:
    """Token range of a span spec (module docstring), checked against an input of `tokens` tokens.

    Raises `InputError` naming the fix: a malformed or out-of-range range, a string not found,
    chars or a search without the input's text.
    """
    if isinstance(spec, tuple):
        start, end = spec
        spec = f"tokens:{start}-{end}"
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"span {spec!r} is empty; give {SPAN_HELP}")
    kind, _, rest = spec.partition(":")
    if kind in ("tokens", "chars"):
        match = _RANGE.fullmatch(rest)
        if not match:
            raise InputError(f"span {spec!r}: write {kind}:A-B with whole numbers A < B (B exclusive), e.g. "
                             f"{kind}:0-100; to search for this string use text:{spec}")
        start, end = int(match.group(1)), int(match.group(2))
        if end <= start:
            raise InputError(f"span {spec!r} is empty: B must be larger than A ({kind}:A-B, B exclusive)")
        if kind == "tokens":
            if end > tokens:
                raise InputError(f"span {spec!r} ends past this {tokens}-token input; use tokens:A-B with "
                                 f"B <= {tokens}")
            return Span(start, end, spec, text.of_tokens(start, end) if text else None)
        _need_text(spec, text)
        if end > len(text.text):
            raise InputError(f"span {spec!r} ends past this {len(text.text)}-character text; use "
                             f"chars:A-B with B <= {len(text.text)}")
        a, b = text.tokens_of_chars(start, end)
        if b <= a:
            raise InputError(f"span {spec!r} holds no token (only characters no token covers); widen it")
        return Span(a, b, spec, text.of_tokens(a, b))
    needle = spec[len("text:"):] if spec.startswith("text:") else spec
    _need_text(spec, text)
    found = text.text.find(needle)
    if not needle or found < 0:
        shown = shorten(needle, 60, keep_whitespace=True)
        raise InputError(f"span {shown!r} does not occur in the text (case and spaces count); give "
                         "another string, or tokens:A-B / chars:A-B")
    a, b = text.tokens_of_chars(found, found + len(needle))
    return Span(a, b, spec, text.of_tokens(a, b), text.text.count(needle))


def _need_text(spec: str, text: TraceText | None) -> None:
    if text is None:
        raise InputError(f"span {spec!r} needs the trace's text, which needs its tokenizer; give --tokenizer, "
                         "or name the span as tokens:A-B")
