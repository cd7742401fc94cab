"""Context attribution from attention: which sources of a context the response's positions read.

**Sources** are sentences (the thought-anchors splitter of `segments.sentence_spans`), paragraphs,
or the trace's key blocks clipped to the context. A token belongs to the source holding its first
non-whitespace character (the rule of `segments.split_units`), so a token such as " The" that
starts at the space before the context still counts for the context's first sentence; a source's
token span runs from its first to its last such token.

**Mass**, accumulated during the sparse forward pass by `SourceMass` (a probability reducer, as
`anchors.UnitAttention`; no T x T tensor, no second pass): with p(t, s) the probability query
token t gives key token s in layer l, head h (the sparse model's softmax over its kept blocks),

    mass[l, h, j] = (1 / |Q|) * sum over t in Q, s in source j of p(t, s)

where Q are the positions that predict the response's tokens (teacher-forced). Each query's row
sums to 1 over all keys, so mass[l, h].sum() <= 1; the rest (`SourceMass.other`) went to the
template, the query and the response. With k covering every key block it is dense attention.

**Aggregations** (`METHODS`) turn mass [L, H, n] into one score per source; they are pure
functions of the mass and the sources' token counts, so a benchmark can try each on one pass.
"learned" is a weighted sum over heads with weights fit once per model (`head_weights`, AT2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..blocks import num_blocks
from ..choices import FALLBACK_METHOD, LEARNED, MASS_METHODS, SOURCE_KINDS
from ..errors import InputError
from ..text import anchored_token_spans, chars_of_tokens, token_anchors
from .head_weights import HeadWeights
from .segments import paragraph_spans, sentence_spans


@dataclass
class Source:
    """One source: `text`, chars [start, end) in the context, token span `tokens` [a, b) in the prompt ids."""

    text: str
    start: int
    end: int
    tokens: tuple[int, int]
    score: float = float("nan")

    @property
    def num_tokens(self) -> int:
        return self.tokens[1] - self.tokens[0]

    def to_dict(self) -> dict:
        return {"text": self.text, "span": [self.start, self.end], "tokens": list(self.tokens),
                "score": None if np.isnan(self.score) else float(self.score)}


def context_sources(
    prompt: str,
    offsets: list[tuple[int, int]],
    context_span: tuple[int, int],
    kind: str = "sentences",
    block_k: int = 64,
) -> list[Source]:
    """The sources of prompt[context_span] (module docstring), in text order.

    Args:
        offsets: each prompt token's char span, from the tokenizer's offset mapping.
        kind: "sentences", "paragraphs" or "blocks" (key blocks of `block_k` tokens, clipped to
            the context's tokens).
    Returns:
        the sources, possibly empty (a context whose characters no token anchors).
    """
    if kind not in SOURCE_KINDS:
        raise InputError(f"sources={kind!r}; use one of {', '.join(SOURCE_KINDS)}")
    a, b = context_span
    if kind == "blocks":
        return _block_sources(prompt, offsets, context_span, block_k)
    spans = (sentence_spans if kind == "sentences" else paragraph_spans)(prompt, a, b)
    return [Source(prompt[s:e], s - a, e - a, tokens)
            for (s, e), tokens in zip(spans, anchored_token_spans(prompt, offsets, spans), strict=True) if tokens]


def _block_sources(prompt, offsets, context_span, block_k) -> list[Source]:
    a, b = context_span
    inside = [t for t, anchor in enumerate(token_anchors(prompt, offsets)) if anchor is not None and a <= anchor < b]
    if not inside:
        return []
    first, last = inside[0], inside[-1] + 1
    sources = []
    for block in range(first // block_k, (last - 1) // block_k + 1):
        t0, t1 = max(block * block_k, first), min((block + 1) * block_k, last)
        s, e = chars_of_tokens(offsets, t0, t1) or (a, a)
        s, e = max(s, a), min(e, b)
        sources.append(Source(prompt[s:e], s - a, e - a, (t0, t1)))
    return sources


def source_of_tokens(sources: list[Source], num_tokens: int) -> Tensor:
    """int64 [T]: the source of every token (-1 = none)."""
    owner = torch.full((num_tokens,), -1, dtype=torch.long)
    for j, source in enumerate(sources):
        owner[source.tokens[0] : source.tokens[1]] = j
    return owner


class SourceMass:
    """A probability reducer (`tracer.run_trace(on_probabilities=...)`): the attention mass the
    query positions from `first_query` to the end put on each source, summed per layer and head.

    Args:
        source_of: int [T], the source of every token (-1 = none), e.g. `source_of_tokens`.
        num_sources: n.
        first_query: the first query position counted (prompt length - 1 for a response).
        num_layers, num_heads: L, H of the model.
        block_q, block_k: the trace's block sizes.
    """

    def __init__(self, source_of: Tensor, num_sources: int, first_query: int, num_layers: int, num_heads: int,
                 block_q: int, block_k: int) -> None:
        self.tokens = source_of.numel()
        if not 0 <= first_query < self.tokens:
            raise InputError(f"first query position {first_query} is outside the {self.tokens}-token input")
        self.num_sources, self.first_query, self.block_k = num_sources, first_query, block_k
        trash = num_sources  # tokens in no source, and padding
        self._key_source = torch.full((num_blocks(self.tokens, block_k) * block_k,), trash, dtype=torch.long)
        self._key_source[: self.tokens] = torch.where(source_of >= 0, source_of.long(), trash)
        self.sums = torch.zeros(num_layers, num_heads, num_sources + 1, dtype=torch.float64)

    def __call__(self, layer: int, rows: int, probs: Tensor, indices: Tensor) -> None:
        """probs: float [1, H, c, block_q, K * block_k]; indices: int [1, H, c, K] (-1 = none)."""
        if probs.shape[0] != 1:
            raise InputError("source attribution traces one text at a time (batch size 1)")
        _, heads, c, bq, width = probs.shape
        low = rows * bq
        start, end = max(self.first_query, low), min(self.tokens, low + c * bq)
        if start >= end:  # no counted query in this chunk
            return
        chosen = probs[0].reshape(heads, c * bq, width)[:, start - low : end - low].cpu().double()  # [H, m, W]
        indices = indices[0].cpu()
        key_pos = (indices.clamp(min=0)[..., None] * self.block_k + torch.arange(self.block_k)).flatten(-2)
        key_source = torch.where(indices.repeat_interleave(self.block_k, dim=-1) >= 0, self._key_source[key_pos],
                                 self.num_sources)  # [H, c, W]
        block_of_query = torch.arange(start, end) // bq - rows  # [m]
        target = key_source[:, block_of_query]  # [H, m, W]
        self.sums[layer].scatter_add_(1, target.reshape(heads, -1), chosen.reshape(heads, -1))

    @property
    def num_queries(self) -> int:
        return self.tokens - self.first_query

    @property
    def mass(self) -> np.ndarray:
        """float32 [L, H, n]: the mean over the counted queries of the mass on each source."""
        return (self.sums[..., : self.num_sources] / self.num_queries).float().numpy()

    @property
    def other(self) -> np.ndarray:
        """float32 [L, H]: the mean mass on tokens in no source (template, query, response)."""
        return (self.sums[..., self.num_sources] / self.num_queries).float().numpy()


def mean_score(mass: np.ndarray, num_tokens: np.ndarray) -> np.ndarray:
    """float [n]: the mass on each source, mean over layers and heads. mass [L, H, n], num_tokens [n]."""
    return mass.mean(axis=(0, 1))


def mean_per_token_score(mass: np.ndarray, num_tokens: np.ndarray) -> np.ndarray:
    """`mean_score` per token of the source: long sources do not win by length alone."""
    return mean_score(mass, num_tokens) / np.maximum(np.asarray(num_tokens, dtype=np.float64), 1.0)


def max_head_score(mass: np.ndarray, num_tokens: np.ndarray) -> np.ndarray:
    """The largest mass any head of a layer puts on the source, mean over layers: a retrieval head
    that reads one fact is not averaged away by the heads that read the template."""
    return mass.max(axis=1).mean(axis=0)


def focused_score(mass: np.ndarray, num_tokens: np.ndarray) -> np.ndarray:
    """Mean over heads weighted by each head's concentration on few sources, 1 - H(p) / log(n)
    with p the head's mass over the sources normalised; heads spread evenly weigh 0."""
    n = mass.shape[-1]
    total = mass.sum(axis=-1, keepdims=True)
    if n < 2 or not (total > 0).any():
        return mean_score(mass, num_tokens)
    p = np.divide(mass, total, out=np.zeros_like(mass, dtype=np.float64), where=total > 0)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1) / np.log(n)
    weight = np.where(total[..., 0] > 0, 1.0 - entropy, 0.0)  # [L, H]
    if weight.sum() <= 0:
        return mean_score(mass, num_tokens)
    return (weight[..., None] * mass).sum(axis=(0, 1)) / weight.sum()


# Keyed by the names in `choices` (the command line lists them without importing numpy); the default
# method's reasons are there too.
METHODS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = dict(
    zip(MASS_METHODS, (mean_score, mean_per_token_score, max_head_score, focused_score), strict=True))


def aggregate(mass: np.ndarray, num_tokens: np.ndarray | list[int], method: str = FALLBACK_METHOD,
              head_weights: HeadWeights | None = None) -> np.ndarray:
    """float64 [n]: one score per source from mass [L, H, n] by `method`: a key of `METHODS`, or
    "learned" (the weighted sum over heads of `head_weights`, `head_weights.HeadWeights`)."""
    if method == LEARNED:
        if head_weights is None:
            raise InputError("method 'learned' needs head weights for the model: the package's (default model) or "
                             "a file from `sparsetrace attribute-fit` (--head-weights FILE)")
        return head_weights.scores(mass)
    if method not in METHODS:
        raise InputError(f"method={method!r}; use one of {', '.join([*METHODS, LEARNED])}")
    return np.asarray(METHODS[method](np.asarray(mass, dtype=np.float64), np.asarray(num_tokens)), dtype=np.float64)
