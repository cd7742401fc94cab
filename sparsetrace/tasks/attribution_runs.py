"""`attribute()`: which sources of a context a response relies on, from ONE sparse traced pass.

The prompt is built exactly as ContextCite builds it (Cohen-Wang et al. 2024, MadryLab/context-cite,
`ContextCiter._get_prompt_ids`), so the two compare source by source: `PROMPT_TEMPLATE` filled with
the context and the query is one user message, the tokenizer's chat template is applied with the
generation prompt, and the text is tokenized with `add_special_tokens=False` (`attribution_prompt`).
Or the caller gives the whole prompt text and the char span of the context in it (`prompt=`,
`context_span=`), for prompts built another way.

The response is given, or the dense model answers greedily (`max_new_tokens`, stopping at its end
of turn). As in ContextCite its token ids are those after the prompt's in the tokenized
prompt + response text, and a generated response keeps the special tokens the model wrote (its
end-of-turn token). prompt + response[:-1] is traced once on sparse attention while
`analysis.attribution.SourceMass` sums, for the positions that predict the response's tokens,
the attention on each source per layer and head: `Attribution.mass` [L, H, n]. A method turns it
into one score per source: by default the model's learned per-head weights (AT2,
`analysis.head_weights`; the package ships the default model's), else a method of
`analysis.attribution.METHODS` (max_head where no weights exist).

>>> result = st.attribute(model, tokenizer, context, "Who wrote it?")      # doctest: +SKIP
>>> result.top(3)                                                          # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis.attribution import (
    Source,
    SourceMass,
    aggregate,
    context_sources,
    source_of_tokens,
)
from ..analysis.head_weights import HeadWeights, bundled_head_weights, load_head_weights
from ..choices import ATTRIBUTION_METHODS, AUTO, DEFAULT_METHOD, FALLBACK_METHOD, LEARNED, SOURCE_KINDS
from ..config import StreamConfig
from ..errors import InputError
from ..files import save_figure, write_json
from ..models import describe_model, eos_token_ids, greedy_decode
from ..notebook import facts_html, facts_repr
from ..text import shorten, token_offsets
from ..trace import Trace
from ..tracer import prepare_input, run_trace

# ContextCite's DEFAULT_PROMPT_TEMPLATE (context_cite/context_citer.py), one user message.
PROMPT_TEMPLATE = "Context: {context}\n\nQuery: {query}"
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass
class Attribution:
    """The result of `attribute`. `mass` float32 [L, H, n]: per layer and head, the attention the
    response's positions put on each source (mean over those positions); `sources[j].score` is
    `method` applied to it. `context_start`: char offset of the context in `prompt`."""

    prompt: str
    context: str
    context_start: int
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    sources: list[Source]
    mass: np.ndarray
    method: str
    config: dict[str, Any]
    seconds: float
    query: str | None = None
    trace: Trace | None = field(default=None, repr=False)
    head_weights: HeadWeights | None = field(default=None, repr=False)

    @property
    def scores(self) -> np.ndarray:
        """float64 [n]: each source's score, in text order."""
        return np.array([s.score for s in self.sources], dtype=np.float64)

    @property
    def num_tokens(self) -> np.ndarray:
        """int64 [n]: each source's token count."""
        return np.array([s.num_tokens for s in self.sources], dtype=np.int64)

    def scores_by(self, method: str) -> np.ndarray:
        """float64 [n]: the scores another method of `METHODS` (or "learned", with this result's
        weights) gives on the same mass."""
        return aggregate(self.mass, self.num_tokens, method, self.head_weights)

    def top(self, k: int = 5) -> list[Source]:
        """The k sources of highest score, highest first (ties in text order)."""
        order = np.argsort(-np.nan_to_num(self.scores, nan=-np.inf), kind="stable")
        return [self.sources[i] for i in order[:k]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; "sources" in text order with text, span (chars in the context), tokens, score:
        ContextCite's table (`get_attributions(as_dataframe=True)`: Score, Source)."""
        stats = self.trace.stats() if self.trace is not None else {}
        return {"prompt": self.prompt, "context": self.context, "context_start": self.context_start,
                "query": self.query, "response": self.response, "prompt_ids": self.prompt_ids,
                "response_ids": self.response_ids, "method": self.method, "config": self.config,
                "trace": {key: _finite(stats[key]) for key in ("tokens", "sparsity", "compression") if key in stats},
                "seconds": round(self.seconds, 3), "sources": [s.to_dict() for s in self.sources]}

    def _facts(self) -> dict[str, Any]:
        """The key numbers a notebook shows: the question, the response, the method, the top source."""
        top = self.top(1)
        return {"query": self.query, "response": shorten(self.response, 60, keep_whitespace=True),
                "sources": len(self.sources), "prompt_tokens": len(self.prompt_ids), "method": self.method,
                "top_source": (shorten(top[0].text, 60), top[0].score) if top else None,
                "seconds": round(self.seconds, 2)}

    def __repr__(self) -> str:
        return facts_repr("Attribution", self._facts())

    def _repr_html_(self) -> str:
        rows = [{"rank": i + 1, "score": s.score, "tokens": s.tokens, "text": shorten(s.text, 90)}
                for i, s in enumerate(self.top(5))]
        return facts_html("Attribution", self._facts(), rows, rows_title=f"top sources ({self.method})")


def attribution_prompt(tokenizer, context: str, query: str) -> tuple[str, int]:
    """The prompt text ContextCite builds (module docstring) and the char offset of the context in it.

    Tokenize it with `tokenizer.encode(prompt, add_special_tokens=False)`, as ContextCite does.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the tokenizer has no chat template; give the whole prompt text and the context's char "
                         "span instead (prompt=..., context_span=(start, end))")
    user = PROMPT_TEMPLATE.format(context=context, query=query)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                           add_generation_prompt=True)
    at = prompt.find(user)
    if at >= 0:
        return prompt, at + PROMPT_TEMPLATE.index("{context}")
    at = prompt.find(context)
    if at < 0:
        raise InputError("the chat template changes the context's text, so its sources cannot be located; give "
                         "the prompt text and the context's char span instead (prompt=..., context_span=(start, end))")
    return prompt, at


def attribute(
    model,
    tokenizer,
    context: str | None = None,
    query: str | None = None,
    config: StreamConfig | None = None,
    *,
    response: str | None = None,
    prompt: str | None = None,
    context_span: tuple[int, int] | None = None,
    sources: str = "sentences",
    method: str = DEFAULT_METHOD,
    head_weights: HeadWeights | str | Path | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    allow_long: bool = False,
    progress: bool | None = None,
    kernel: str = "auto",
) -> Attribution:
    """Attribute a response to the sources of its context from one sparse traced pass.

    Args:
        context, query: the ContextCite form: the prompt is `attribution_prompt(tokenizer, context, query)`.
        config: the estimator's settings (default `StreamConfig()`); k covering every key block
            gives dense attention.
        response: the response text; None: the dense model answers greedily.
        prompt, context_span: the other form, instead of context and query: the whole prompt text
            (chat template included, tokenized with add_special_tokens=False) and the context's
            char range [start, end) in it.
        sources: "sentences", "paragraphs" or "blocks" (`analysis.attribution`).
        method: the aggregation of `mass` into scores: "auto" ("learned" where head weights exist for
            the model, else "max_head"), "learned", or a key of `analysis.attribution.METHODS`.
        head_weights: per-head weights for "learned" (a `HeadWeights` or its file, from
            `fit_attribution_heads` / `sparsetrace attribute-fit`); default the package's for the model.
        max_new_tokens: the greedy response's token limit.
        allow_long, progress, kernel: as `tracer.trace` ("flex" runs eager: the reducer needs the
            probabilities).
    Returns:
        an `Attribution`. Every input is checked before the first forward pass.
    """
    started = time.perf_counter()
    config = config or StreamConfig()
    if method not in ATTRIBUTION_METHODS:
        raise InputError(f"method={method!r}; use one of {', '.join(ATTRIBUTION_METHODS)}")
    info = describe_model(model)
    head_weights = _head_weights(head_weights, info)
    if method == AUTO:
        method = LEARNED if head_weights is not None else FALLBACK_METHOD
    elif method == LEARNED and head_weights is None:
        raise InputError(f"no learned head weights for {info['name']!r}; fit them with `sparsetrace attribute-fit` "
                         "and pass the file (head_weights= / --head-weights), or use --method max_head")
    if sources not in SOURCE_KINDS:
        raise InputError(f"sources={sources!r}; use one of {', '.join(SOURCE_KINDS)}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens}; use a positive number of tokens")
    prompt, span, query = _prompt_and_span(tokenizer, context, query, prompt, context_span)
    tokens, offsets = token_offsets(tokenizer, prompt, add_special_tokens=False, subject="attribution needs")
    prompt_ids = tokens.tolist()
    split = context_sources(prompt, offsets, span, sources, config.block_k)
    if not split:
        raise InputError(f"the context has no {sources} (no token of the prompt falls in it); give a context with "
                         "some text")
    generated = response is None
    if generated:
        _check_length(model, len(prompt_ids), max_new_tokens, allow_long, generated=True)
        prepare_input(model, tokenizer, None, prompt_ids, config, allow_long=True, continuation=max_new_tokens - 1)
        response = _greedy_response(model, tokenizer, prompt_ids, max_new_tokens)
    elif not response.strip():
        raise InputError("the response is empty; give the response text, or leave it out to let the model answer")
    response_ids = response_token_ids(tokenizer, prompt, prompt_ids, response)
    if not response_ids:
        raise InputError("the response has no tokens; give a non-empty response")
    _check_length(model, len(prompt_ids), len(response_ids), allow_long, generated=False)
    ids = prepare_input(model, tokenizer, None, prompt_ids, config, allow_long=True,
                        continuation=len(response_ids) - 1)  # the memory check
    ids = torch.cat([ids, torch.tensor(response_ids[:-1], dtype=torch.long)])
    reducer = SourceMass(source_of_tokens(split, len(ids)), len(split), len(prompt_ids) - 1, info["num_layers"],
                         info["num_heads"], config.block_q, config.block_k)
    traced, _ = run_trace(model, tokenizer, ids, config, progress=progress, on_probabilities=reducer, kernel=kernel)
    mass = reducer.mass
    result = Attribution(
        prompt=prompt, context=prompt[span[0] : span[1]], context_start=span[0], response=response,
        prompt_ids=prompt_ids, response_ids=response_ids, sources=split, mass=mass, method=method,
        config={"stream": config.to_dict(), "sources": sources, "model": info.get("name"),
                "prompt_template": PROMPT_TEMPLATE if query is not None else None, "generated": generated,
                "max_new_tokens": max_new_tokens if generated else None,
                "head_weights": head_weights.describe() if method == LEARNED else None},
        seconds=0.0, query=query, trace=traced, head_weights=head_weights,
    )
    for source, score in zip(split, result.scores_by(method), strict=True):
        source.score = float(score)
    result.seconds = time.perf_counter() - started
    return result


def _head_weights(given: HeadWeights | str | Path | None, info: dict) -> HeadWeights | None:
    """The weights to use: those given (loaded if a path; checked against the model's shape), else the
    package's for this model, else None."""
    if given is None:
        return bundled_head_weights(info.get("name"), info["num_layers"], info["num_heads"])
    weights = given if isinstance(given, HeadWeights) else load_head_weights(given)
    if weights.weights.shape != (info["num_layers"], info["num_heads"]):
        raise InputError(f"the head weights ({weights.model!r}) are [{weights.weights.shape[0]} layers, "
                         f"{weights.weights.shape[1]} heads] but the model has [{info['num_layers']}, "
                         f"{info['num_heads']}]; fit weights for this model with `sparsetrace attribute-fit`")
    return weights


def _prompt_and_span(tokenizer, context, query, prompt, context_span) -> tuple[str, tuple[int, int], str | None]:
    """(prompt text, context char span in it, query or None) for either form, checked."""
    if prompt is None:
        if context is None or query is None or context_span is not None:
            raise InputError("give context and query (ContextCite's prompt), or prompt and context_span; not a mix")
        if not context.strip():
            raise InputError("the context is empty; give the text the response should be attributed to")
        if not query.strip():
            raise InputError("the query is empty; give the question asked about the context")
        text, start = attribution_prompt(tokenizer, context, query)
        return text, (start, start + len(context)), query
    if context is not None or query is not None or context_span is None:
        raise InputError("give prompt together with context_span (the context's chars in it), without context and "
                         "query")
    start, end = context_span
    if not 0 <= start < end <= len(prompt):
        raise InputError(f"context_span={tuple(context_span)} is not a char range [start, end) inside the "
                         f"{len(prompt):,}-char prompt")
    if not prompt[start:end].strip():
        raise InputError("the context is empty; give the text the response should be attributed to")
    return prompt, (start, end), None


def _check_length(model, prompt_tokens: int, response_tokens: int, allow_long: bool, generated: bool) -> None:
    """Refuse a prompt + response (all but its last token is input) longer than the model's context."""
    context = describe_model(model).get("max_positions")
    need = prompt_tokens + response_tokens - 1
    if allow_long or context is None or need <= context:
        return
    what = f"up to {response_tokens} generated" if generated else f"the response's {response_tokens}"
    fix = "lower max_new_tokens (--max-new-tokens)" if generated else "shorten the response"
    raise InputError(f"the prompt's {prompt_tokens:,} tokens and {what} tokens need {need:,} positions, more than "
                     f"the model's {context:,}-token context; shorten the context, {fix}, or run past the trained "
                     "context anyway (allow_long=True / --allow-long)")


def response_token_ids(tokenizer, prompt: str, prompt_ids: list[int], response: str) -> list[int]:
    """The response's ids as ContextCite takes them: those after the prompt's in the tokenized
    prompt + response; the response tokenized alone where the two merge across the boundary."""
    full = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
    if full[: len(prompt_ids)] == prompt_ids:
        return list(full[len(prompt_ids) :])
    return list(tokenizer(response, add_special_tokens=False)["input_ids"])


def _greedy_response(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """The dense model's greedy answer as text, special tokens kept (ContextCite decodes them too)."""
    tokens, _ = greedy_decode(model, torch.tensor(prompt_ids), max_new_tokens, stop=eos_token_ids(model, tokenizer))
    return tokenizer.decode(tokens.tolist())


def save_attribution(result: Attribution, folder: str | Path, tokenizer=None, *, top: int = 5) -> dict[str, str]:
    """Write attribution.json, attribution.png, trace.sptrace and report.html into `folder`."""
    from ..plots import attribution_figure
    from ..report import report

    folder = Path(folder)
    paths = {"json": write_json(folder / "attribution.json", result.to_dict())}
    figure = attribution_figure(result.context, [(s.start, s.end) for s in result.sources], result.scores, top=top,
                                title=f"Context attribution ({result.method}): {shorten(result.response, 60)!r}")
    paths["figure"] = save_figure(figure, folder / "attribution.png")
    if result.trace is not None:
        paths["trace"] = result.trace.save(folder / "trace.sptrace")
        paths["report"] = report(result.trace, folder / "report.html", tokenizer,
                                 extras={"attribution": result, "figures": {
                                     "context attribution: sources shaded by score": paths["figure"]}},
                                 title=f"sparsetrace attribution: {len(result.sources)} sources")
    return {name: str(path) for name, path in paths.items()}


def _finite(value):
    """JSON has no NaN or infinity: None instead."""
    return None if isinstance(value, float) and not np.isfinite(value) else value
