"""`response_logprobs`: how likely a response stays under causal interventions, dense or sparse.

The question every causal check asks: knock something out (a span, a head, a piece of text) and
measure the per-token log-probability of a fixed response, teacher-forced after the prompt. One
call takes many interventions on one input and returns one row per intervention next to the
unchanged pass (`base`).

Shared work is done once where that is cheap: the unchanged pass fills a key/value cache of every
position, and an intervention whose first affected position is p (a span knockout: the end of its
first span; a text removal: the first token that differs) reuses the cache's first p positions and
runs only the rest. On the dense forward ("dense": the model's own attention, `dense.dense_attention`
in layers that knock out a span) that is exact. On the sparse forward the reused prefix ends on a
query block boundary at or before p: a query block's selection reads all of its queries, so the
block holding p is recomputed, and every row before it is what a whole pass computes (the
`k_schedule="mass"`, which shares its budget over all rows, runs whole passes). Head knockouts
change every position and run whole.

>>> result = response_logprobs(model, tokenizer, prompt, " Paris", [Intervention(knockout=[(5, 9)])])  # doctest: +SKIP
>>> result.drop                                                                   # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .backend import sparse_attention
from .config import StreamConfig
from .errors import InputError, UnsupportedModelError
from .interventions import Intervention
from .models import cached_keys_values, describe_model, forward_logits, full_kv_cache
from .notebook import facts_html, facts_repr
from .tracer import prepare_input

ABLATION_FORWARDS = ("sparse", "dense")


@dataclass
class AblationResult:
    """Per-token log-probabilities of one response under each intervention.

    Attributes:
        prompt_ids: int64 [P]; response_ids: int64 [R].
        base: float32 [R] log p of each response token without intervention.
        logprobs: float32 [N, R], one row per intervention.
        interventions: the N interventions, in order.
        reused: per intervention, the prompt positions taken from the unchanged pass's cache.
    """

    prompt_ids: Tensor
    response_ids: Tensor
    base: Tensor
    logprobs: Tensor
    interventions: list[Intervention]
    forward: str
    config: dict[str, Any]
    reused: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def drop(self) -> Tensor:
        """float32 [N]: how much the response's total log-probability falls under each intervention."""
        return self.base.sum() - self.logprobs.sum(dim=-1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "forward": self.forward,
            "config": self.config,
            "prompt_tokens": len(self.prompt_ids),
            "response_ids": self.response_ids.tolist(),
            "base_logprob": float(self.base.sum()),
            "base_token_logprobs": self.base.tolist(),
            "interventions": [
                {"intervention": iv.describe(), "logprob": float(row.sum()), "drop": float(drop),
                 "token_logprobs": row.tolist(), "reused_positions": reused}
                for iv, row, drop, reused in zip(self.interventions, self.logprobs, self.drop, self.reused, strict=True)
            ],
            "seconds": round(self.seconds, 3),
        }

    def _facts(self) -> dict[str, Any]:
        """The key numbers a notebook shows: sizes, the base log-probability, the largest drop."""
        drops = self.drop
        top = int(drops.argmax()) if len(drops) else None
        return {"forward": self.forward, "prompt_tokens": len(self.prompt_ids),
                "response_tokens": len(self.response_ids), "base_logprob": float(self.base.sum()),
                "interventions": len(self.interventions),
                "largest_drop": None if top is None else (self.interventions[top].describe(), float(drops[top]))}

    def __repr__(self) -> str:
        return facts_repr("AblationResult", self._facts())

    def _repr_html_(self) -> str:
        rows = [{"intervention": iv.describe(), "logprob": float(row.sum()), "drop": float(drop)}
                for iv, row, drop in list(zip(self.interventions, self.logprobs, self.drop, strict=True))[:20]]
        return facts_html("AblationResult", self._facts(), rows, rows_title="the response's log-probability under "
                          "each intervention (the first 20); drop: base - it (nats)")


def response_logprobs(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    response: str | Sequence[int],
    interventions: Sequence[Intervention] = (),
    *,
    forward: str = "sparse",
    config: StreamConfig | None = None,
    add_special_tokens: bool = True,
    allow_long: bool = False,
    progress: bool | None = None,
    kernel: str = "auto",
) -> AblationResult:
    """Log-probabilities of `response` after `prompt` without and with each intervention.

    Args:
        prompt: the prompt text (required for text removal) or its token ids.
        response: the response text (tokenized without special tokens) or its token ids.
        interventions: `Intervention`s; spans of a knockout are prompt token positions, spans of a
            text removal prompt characters.
        forward: "sparse" (Stream sparse attention with `config`) or "dense" (the model's own).
        add_special_tokens: how the prompt text is tokenized (False for a chat-templated prompt
            that already holds its special tokens).
        progress: a bar over interventions (default: more than 4 of them).
        kernel: as `trace` (knockout layers always run the eager block attention).
    Returns:
        the `AblationResult`.
    """
    if forward not in ABLATION_FORWARDS:
        raise InputError(f"forward={forward!r}; use 'sparse' (Stream's sparse attention) or 'dense' (the model's own)")
    config = config or StreamConfig()
    interventions = list(interventions)
    text = prompt if isinstance(prompt, str) else None
    prompt_ids = _ids(tokenizer, prompt, add_special_tokens, "prompt")
    response_ids = _ids(tokenizer, response, False, "response")
    info = describe_model(model)
    for iv in interventions:
        iv.check(info["num_layers"], info["num_heads"], len(prompt_ids), None if text is None else len(text))
    full = torch.cat([prompt_ids, response_ids])
    prepare_input(model, tokenizer, None, full, config, allow_long=allow_long)
    inputs = []
    for iv in interventions:
        if iv.remove:
            ablated = _ids(tokenizer, _without(text, iv.remove), add_special_tokens, "prompt with the spans removed")
            inputs.append((torch.cat([ablated, response_ids]), len(ablated), _common_prefix(ablated, prompt_ids)))
        else:
            inputs.append((full, len(prompt_ids), iv.first_affected(len(prompt_ids))))

    started = time.perf_counter()
    run = _Runner(model, config, forward, kernel, len(response_ids))
    base, cached = run.logprobs(full, None, keep_cache=caches(forward, config))
    rows, reused = [], []
    show = len(interventions) > 4 if progress is None else progress
    for iv, (ids, prompt_len, affected) in tqdm(list(zip(interventions, inputs, strict=True)), desc="interventions",
                                                unit="run", disable=not show):
        # the first logit needed is P - 1's
        start = reusable_prefix(min(affected, prompt_len - 1), forward, config) if cached is not None else 0
        if iv.is_empty:
            rows.append(base)
            reused.append(len(prompt_ids))
            continue
        prefix = None if start == 0 else [(k[:, :, :start], v[:, :, :start]) for k, v in cached]
        knockouts = iv.layer_knockouts(info["num_layers"], info["num_heads"], len(ids) - 1) if not iv.remove else None
        rows.append(run.logprobs(ids, knockouts, prefix=prefix)[0])
        reused.append(start)
    logprobs = torch.stack(rows) if rows else base.new_zeros(0, len(response_ids))
    return AblationResult(prompt_ids, response_ids, base, logprobs, interventions, forward, config.to_dict(), reused,
                          time.perf_counter() - started)


Prefix = list[tuple[Tensor, Tensor]]  # per layer: keys, values [B, H_kv, p, d] of the first p positions


def caches(forward: str, config: StreamConfig) -> bool:
    """Whether passes of this forward can share a prefix (not the "mass" schedule, which shares its
    budget over all query blocks)."""
    return forward == "dense" or config.k_schedule != "mass"


def reusable_prefix(position: int, forward: str, config: StreamConfig) -> int:
    """Leading positions a pass may take from the unchanged pass's cache when `position` is the first
    whose computation changes: all of them on the dense forward; on the sparse one, down to a query
    block boundary (a query block's selection reads every query of the block)."""
    return position if forward == "dense" else position // config.block_q * config.block_q


def intervened_logits(
    model,
    ids: Tensor,
    *,
    config: StreamConfig,
    forward: str,
    keep: int,
    knockouts=None,
    prefix: Prefix | None = None,
    keep_cache: bool = False,
    kernel: str = "auto",
) -> tuple[Tensor, Prefix | None]:
    """One forward pass ("sparse" or "dense") with per-layer knockouts, from a cached prefix if given.

    Args:
        ids: int64 [T] the whole input (the prefix's positions included).
        keep: how many final positions' logits to return.
        knockouts: per layer, `interventions.LayerKnockout` or None (`Intervention.layer_knockouts`).
        prefix: the first p positions' keys and values (of a pass they are unchanged in).
        keep_cache: also return every layer's keys and values of `ids`.
    Returns:
        logits [keep, vocab] (the model's dtype and device), and with keep_cache the `Prefix` of ids.
    """
    num_layers = describe_model(model)["num_layers"]
    cache = full_kv_cache(model, prefix) if keep_cache or prefix is not None else None
    skip = 0 if prefix is None else prefix[0][0].shape[2]
    mode = "exact" if forward == "dense" else "sparse"
    switched = sparse_attention(model, config, lambda record: None, forward=mode, kernel=kernel, knockouts=knockouts,
                                prefix_cache=mode == "sparse" and cache is not None)
    with switched as run:
        logits = forward_logits(model, ids[skip:], keep=keep, cache=cache)
    if len(run.layers_seen) != num_layers:
        raise UnsupportedModelError(f"{type(model).__name__}: attention layers "
                                    f"{sorted(set(range(num_layers)) - run.layers_seen)} never called the "
                                    "sparsetrace attention, so interventions would miss them")
    return logits, cached_keys_values(cache) if keep_cache else None


@dataclass
class _Runner:
    """One teacher-forced pass: the response's log-probabilities, from a cached prefix if given."""

    model: Any
    config: StreamConfig
    forward: str
    kernel: str
    response_len: int

    def logprobs(self, ids: Tensor, knockouts, *, prefix: Prefix | None = None, keep_cache: bool = False):
        """Args: ids int64 [T] prompt + response; prefix of ids[:p].
        Returns float32 [R] and, with keep_cache, the `Prefix` of ids[:-1]."""
        # the last response token predicts nothing we need
        logits, cache = intervened_logits(self.model, ids[:-1], config=self.config, forward=self.forward,
                                          keep=self.response_len, knockouts=knockouts, prefix=prefix,
                                          keep_cache=keep_cache, kernel=self.kernel)
        targets = ids[-self.response_len:]
        return torch.log_softmax(logits.float().cpu(), dim=-1).gather(-1, targets[:, None])[:, 0], cache


def _ids(tokenizer, value: str | Sequence[int], add_special_tokens: bool, what: str) -> Tensor:
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"the {what} is empty; give a non-empty text")
        ids = tokenizer(value, add_special_tokens=add_special_tokens)["input_ids"]
    else:
        ids = list(value)
    if not ids:
        raise InputError(f"the {what} has no tokens; give a non-empty text")
    return torch.as_tensor(ids, dtype=torch.int64)


def _without(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """`text` with the characters of `spans` deleted (overlaps allowed)."""
    keep = [True] * len(text)
    for a, b in spans:
        keep[a:b] = [False] * (b - a)
    return "".join(c for c, k in zip(text, keep, strict=True) if k)


def _common_prefix(a: Tensor, b: Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n
