"""How faithful a trace is: attention recall against the best possible selection, and behaviour.

Two questions, answered on the same input:

- **Recall**: how much of the model's real (dense) attention falls inside the kept blocks? The
  selection is measured on the unmodified model's q and k (a `forward="dense"` trace of the
  prompt, which is also the first pass of the dense continuation below), against
  the exact dense block masses, and against the **oracle**: the same forced blocks plus the k
  blocks of largest true mass, the best any selection of the same budget can do.
- **Behaviour** (the paper's check): does the sparse model reproduce the dense model's greedy
  continuation of `n_match` tokens? The continuation is teacher-forced in one sparse pass, which
  is equivalent to greedy decoding as long as every earlier token matches. We also report
  KL(dense || sparse) of the next-token distribution and top-1 agreement over the continuation.

`min_k` finds the smallest k whose sparse model keeps the continuation, by binary search.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .backend import LayerRecord
from .blocks import num_blocks, queries_per_row, row_key_range
from .config import StreamConfig
from .dense import oracle_selection, recall
from .errors import InputError
from .models import greedy_decode, kv_cache
from .notebook import facts_html, facts_repr
from .selection import selected_counts
from .trace import Trace
from .tracer import prepare_input, run_trace


@dataclass
class FidelityReport:
    """What `check` measured. Per-layer lists are indexed by layer; per-head ones by [layer][head].

    `tokens` is the length of the teacher-forced sparse pass (the prompt and all but the last
    continuation token); recall is measured over the prompt.
    """

    tokens: int
    config: dict[str, Any]
    recall: list[float]
    oracle_recall: list[float]
    recall_per_head: list[list[float]]
    oracle_recall_per_head: list[list[float]]
    continuation: list[int]
    sparse_predictions: list[int]
    kl_next_token: float
    kl_mean: float
    top1_agreement: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def match(self) -> bool:
        """The sparse model reproduces the dense greedy continuation (the paper's criterion)."""
        return self.sparse_predictions == self.continuation

    @property
    def recall_ratio(self) -> list[float]:
        """Per layer: recall / oracle recall."""
        return [r / o if o > 0 else 1.0 for r, o in zip(self.recall, self.oracle_recall, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"match": self.match, "recall_ratio": self.recall_ratio}

    def _facts(self) -> dict[str, Any]:
        """The key numbers a notebook shows: recall means over layers, the worst layer, behaviour."""
        worst = min(range(len(self.recall)), key=self.recall.__getitem__)
        recall, oracle = sum(self.recall) / len(self.recall), sum(self.oracle_recall) / len(self.oracle_recall)
        return {"tokens": self.tokens, "budget": StreamConfig.from_dict(self.config).budget_text(),
                "recall": recall, "oracle_recall": oracle, "recall_ratio": recall / oracle if oracle > 0 else 1.0,
                "worst_layer": (worst, self.recall[worst]), "match": self.match,
                "kl_next_token": self.kl_next_token, "top1_agreement": self.top1_agreement}

    def __repr__(self) -> str:
        return facts_repr("FidelityReport", self._facts())

    def _repr_html_(self) -> str:
        return facts_html("FidelityReport", self._facts(), note="recall: mean over layers of the dense attention "
                          "inside the kept blocks; match: the sparse model keeps the dense next tokens")


def check(
    model,
    tokenizer,
    text: str | None = None,
    config: StreamConfig | None = None,
    *,
    input_ids: Tensor | list[int] | None = None,
    n_match: int = 2,
    max_tokens: int | None = None,
    allow_long: bool = False,
    progress: bool | None = None,
    kernel: str = "auto",
) -> FidelityReport:
    """Measure recall (vs the oracle) and next-token behaviour of `config` on one input.

    Costs one dense forward pass (plus `n_match` - 1 cached one-token steps), one dense-forward
    trace (with exact block masses, O(T^2) time but O(T) memory per layer beyond its block grid)
    and one sparse trace. `kernel`: as `trace`.
    """
    config = config or StreamConfig()
    _check_n_match(n_match)
    ids = prepare_input(model, tokenizer, text, input_ids, config, max_tokens=max_tokens, allow_long=allow_long,
                        forward="dense", continuation=n_match - 1)
    per_head: dict[int, tuple[Tensor, Tensor]] = {}

    def measure(layer: LayerRecord) -> None:
        mass = layer.block_mass.cpu()
        budget = None  # a coverage budget: the oracle keeps as many blocks as each row did
        if config.coverage is not None:
            budget = selected_counts(layer.selection.indices.cpu(), *row_key_range(
                len(ids), config.block_q, config.block_k, layer.sliding_window), config)
        best = oracle_selection(mass, config, len(ids), layer.sliding_window, budget).indices
        per_head[layer.layer] = (layer_recall(layer.selection.indices.cpu(), mass, len(ids), config.block_q),
                                 layer_recall(best, mass, len(ids), config.block_q))

    # the dense-forward trace of the prompt is also the first pass of the dense greedy continuation
    cache = kv_cache(model)
    _, first = run_trace(model, tokenizer, ids, config, forward="dense", progress=progress, on_layer=measure,
                         kernel=kernel, cache=cache)
    extended, continuation, dense_logits = greedy_continuation(model, ids, n_match, prefilled=(first[-1], cache))
    sparse, sparse_logits = run_trace(model, tokenizer, extended, config, logits_to_keep=n_match, progress=progress,
                                      kernel=kernel)
    layers = range(len(per_head))
    dense_p = torch.log_softmax(dense_logits, dim=-1)
    sparse_p = torch.log_softmax(sparse_logits, dim=-1)
    kl = (dense_p.exp() * (dense_p - sparse_p)).sum(-1)
    return FidelityReport(
        tokens=len(extended),
        config=config.to_dict(),
        recall=[float(per_head[i][0].mean()) for i in layers],
        oracle_recall=[float(per_head[i][1].mean()) for i in layers],
        recall_per_head=[per_head[i][0].tolist() for i in layers],
        oracle_recall_per_head=[per_head[i][1].tolist() for i in layers],
        continuation=continuation.tolist(),
        sparse_predictions=sparse_logits.argmax(-1).tolist(),
        kl_next_token=float(kl[0]),
        kl_mean=float(kl.mean()),
        top1_agreement=float((sparse_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean()),
        stats=sparse.stats(),
    )


def greedy_continuation(
    model, ids: Tensor, n: int, *, prefilled: tuple[Tensor, dict] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The dense model's greedy continuation of `ids`, for teacher forcing.

    One dense pass over the prompt, then n - 1 one-token steps on its key/value cache
    (`models.greedy_decode`): at long contexts this costs one dense forward instead of n.

    Args:
        ids: int64 [T] the prompt.
        prefilled: (float32 [vocab] last-position logits, `kv_cache`) of a dense pass over `ids`
            that already ran (e.g. a dense-forward trace); then only the n - 1 steps run.
    Returns:
        extended: int64 [T + n - 1], the prompt and all but the last continuation token (the
        input whose last n positions predict the continuation); continuation: int64 [n];
        logits: float32 [n, vocab], the dense model's logits at those n positions.
    """
    _check_n_match(n)
    continuation, logits = greedy_decode(model, ids, n, prefilled=prefilled)
    return torch.cat([ids, continuation[:-1]]), continuation, logits


def _check_n_match(n: int) -> None:
    if n < 1:
        raise InputError(f"n_match={n}; compare at least one next token (the paper uses 2)")


class _SearchFacts:
    """`to_dict` of a budget search's result: every field but the trace, `passed` keyed by text."""

    def to_dict(self) -> dict[str, Any]:
        facts = dataclasses.asdict(dataclasses.replace(self, trace=None))
        del facts["trace"]
        return facts | {"passed": {str(value): ok for value, ok in sorted(self.passed.items())}}

    def _facts(self, name: str, found, stats: dict[str, Any]) -> dict[str, Any]:
        """The key numbers a notebook shows: the smallest passing value, every value tried, and the
        kept token pairs and compression there."""
        facts = {name: found, "tried": dict(sorted(self.passed.items())),
                 "monotone_near_answer": self.monotone_near_answer, "k_max": self.k_max}
        if stats:
            facts |= {"kept_token_pairs": f"{1 - stats['sparsity']:.1%}", "compression": stats["compression"]}
        return facts


def _continued_input(model, tokenizer, text, input_ids, config: StreamConfig, n_match: int, max_tokens: int | None,
                     allow_long: bool) -> tuple[Tensor, Tensor]:
    """The checked input extended by its dense greedy continuation but the last token, and the
    continuation of `n_match` tokens a budget search must keep (`greedy_continuation`)."""
    _check_n_match(n_match)
    ids = prepare_input(model, tokenizer, text, input_ids, config, max_tokens=max_tokens, allow_long=allow_long,
                        continuation=n_match - 1)
    extended, continuation, _ = greedy_continuation(model, ids, n_match)
    return extended, continuation


@dataclass
class MinKResult(_SearchFacts):
    """The smallest k that keeps the dense greedy continuation, and every k tried on the way.

    `trace`: the search's trace at min k (at k_max when no k keeps it), so that callers need not trace
    again; not in `to_dict`.
    """

    min_k: int | None
    passed: dict[int, bool]
    monotone_near_answer: bool
    k_max: int
    stats_at_min_k: dict[str, Any]
    trace: Trace | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return facts_repr("MinKResult", self._facts("min_k", self.min_k, self.stats_at_min_k))

    def _repr_html_(self) -> str:
        return facts_html("MinKResult", self._facts("min_k", self.min_k, self.stats_at_min_k))


def min_k(
    model,
    tokenizer,
    text: str | None = None,
    config: StreamConfig | None = None,
    *,
    input_ids: Tensor | list[int] | None = None,
    n_match: int = 2,
    k_max: int | None = None,
    max_tokens: int | None = None,
    allow_long: bool = False,
    progress: bool | None = None,
    kernel: str = "auto",
) -> MinKResult:
    """Binary search for the smallest k whose sparse model reproduces the next `n_match` tokens.

    `config` supplies everything but k (block sizes, sinks, ...). The answer's neighbours are both
    checked: k passes, k - 1 fails, and k + 1 is tried too; `monotone_near_answer` is False when
    k + 1 fails again (the pass/fail relation is then not monotone in k on this input).
    `min_k` is None if not even k_max (default: every key block) reproduces the continuation.
    `kernel`: as `trace`.
    """
    config = config or StreamConfig()
    extended, continuation = _continued_input(model, tokenizer, text, input_ids, config, n_match, max_tokens,
                                              allow_long)
    return search_min_k(model, tokenizer, extended, continuation, config, k_max=k_max, progress=progress,
                        kernel=kernel)


def search_min_k(
    model,
    tokenizer,
    extended: Tensor,
    continuation: Tensor,
    config: StreamConfig,
    *,
    k_max: int | None = None,
    progress: bool | None = None,
    kernel: str = "auto",
) -> MinKResult:
    """`min_k` on an input already extended by its dense continuation (see `greedy_continuation`)."""
    k_max = k_max or num_blocks(len(extended), config.block_k)
    passes = _Attempts(model, tokenizer, extended, continuation, config.with_k, progress, kernel)
    found, monotone = _smallest_passing(range(1, k_max + 1), passes)
    if found is None:
        return MinKResult(None, passes.passed, True, k_max, {}, passes.kept_trace())
    return MinKResult(found, passes.passed, monotone, k_max, passes.stats[found], passes.kept_trace())


# Coverage targets `min_coverage` tries (a binary search over them): finer near 1, where the last
# few percent of a row's attention decide.
COVERAGE_GRID = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)


@dataclass
class MinCoverageResult(_SearchFacts):
    """The smallest coverage target p (of `grid`) that keeps the dense greedy continuation.

    `trace`: the search's trace at that p (at the grid's last when none keeps it); not in `to_dict`.
    """

    min_coverage: float | None
    passed: dict[float, bool]
    monotone_near_answer: bool
    k_max: int
    stats_at_min_coverage: dict[str, Any]
    trace: Trace | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return facts_repr("MinCoverageResult",
                          self._facts("min_coverage", self.min_coverage, self.stats_at_min_coverage))

    def _repr_html_(self) -> str:
        return facts_html("MinCoverageResult",
                          self._facts("min_coverage", self.min_coverage, self.stats_at_min_coverage))


def min_coverage(
    model,
    tokenizer,
    text: str | None = None,
    config: StreamConfig | None = None,
    *,
    input_ids: Tensor | list[int] | None = None,
    n_match: int = 2,
    grid: tuple[float, ...] = COVERAGE_GRID,
    max_tokens: int | None = None,
    allow_long: bool = False,
    progress: bool | None = None,
    kernel: str = "auto",
) -> MinCoverageResult:
    """`min_k`'s counterpart for a coverage budget: binary search over `grid` for the smallest p
    whose sparse model reproduces the next `n_match` tokens. `config` supplies everything but p;
    its k_max (default: every key block, so that p = 1 is dense attention) bounds each row."""
    config = config or StreamConfig()
    extended, continuation = _continued_input(model, tokenizer, text, input_ids, config, n_match, max_tokens,
                                              allow_long)
    return search_min_coverage(model, tokenizer, extended, continuation, config, grid=grid, progress=progress,
                               kernel=kernel)


def search_min_coverage(
    model,
    tokenizer,
    extended: Tensor,
    continuation: Tensor,
    config: StreamConfig,
    *,
    grid: tuple[float, ...] = COVERAGE_GRID,
    progress: bool | None = None,
    kernel: str = "auto",
) -> MinCoverageResult:
    """`min_coverage` on an input already extended by its dense continuation (see `greedy_continuation`)."""
    if not grid or list(grid) != sorted(set(grid)) or not all(0 < p <= 1 for p in grid):
        raise InputError(f"coverage grid {list(grid)}: give distinct values in (0, 1], ascending")
    k_max = config.k_max if config.coverage is not None else num_blocks(len(extended), config.block_k)
    k_min = config.k_min if config.coverage is not None else 1

    def at(p: float) -> StreamConfig:
        return dataclasses.replace(config, coverage=p, k_min=k_min, k_max=k_max)

    passes = _Attempts(model, tokenizer, extended, continuation, at, progress, kernel)
    found, monotone = _smallest_passing(grid, passes)
    if found is None:
        return MinCoverageResult(None, passes.passed, True, k_max, {}, passes.kept_trace())
    return MinCoverageResult(found, passes.passed, monotone, k_max, passes.stats[found], passes.kept_trace())


class _Attempts:
    """Traces at a budget value (k or p) once each: did it keep the continuation; its stats; the
    trace of the smallest passing value so far (the largest tried first)."""

    def __init__(self, model, tokenizer, extended: Tensor, continuation: Tensor, config_at, progress, kernel) -> None:
        self.run = lambda value: run_trace(model, tokenizer, extended, config_at(value),
                                           logits_to_keep=len(continuation), progress=progress, kernel=kernel)
        self.continuation = continuation
        self.passed: dict = {}
        self.stats: dict = {}
        self.kept: dict = {}

    def __call__(self, value) -> bool:
        if value not in self.passed:
            result, logits = self.run(value)
            self.passed[value] = bool(torch.equal(logits.argmax(-1), self.continuation))
            self.stats[value] = result.stats()
            if not self.kept or (self.passed[value] and value < min(self.kept)):
                self.kept = {value: result}
        return self.passed[value]

    def kept_trace(self) -> Trace | None:
        return next(iter(self.kept.values()), None)


def _smallest_passing(values, passes) -> tuple[Any, bool]:
    """Binary search over ascending `values` for the smallest that passes, assuming monotone; its
    lower neighbour is checked to fail and its upper one tried too. Returns (value or None when not
    even the largest passes, whether the upper neighbour passes again)."""
    if not passes(values[-1]):
        return None, True
    low, high = 0, len(values) - 1
    while low < high:
        middle = (low + high) // 2
        if passes(values[middle]):
            high = middle
        else:
            low = middle + 1
    if low > 0:
        passes(values[low - 1])
    monotone = low >= len(values) - 1 or passes(values[low + 1])
    return values[low], monotone


def layer_recall(indices: Tensor, block_mass: Tensor, tokens: int, block_q: int) -> Tensor:
    """Per head: the fraction of the dense attention inside the kept blocks, mean over queries.

    Args:
        indices: int [1, H, n_q, K]; block_mass: float [1, H, n_q, n_k] from `dense_block_mass`.
    Returns:
        float [H] (rows weighted by their number of queries: the last block may be partial).
    """
    weights = queries_per_row(tokens, block_q)
    return (recall(indices, block_mass)[0] * weights).sum(-1) / weights.sum()
