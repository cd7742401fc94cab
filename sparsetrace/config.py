"""`StreamConfig`: every knob of the Stream estimator, validated once, with errors that name the fix.

The defaults follow `stream-spec.md`: k = 8 selected key blocks per query block, 64-token blocks,
one attention-sink block and one local (diagonal) block forced on top of the k selected,
branches split over each row's own causal range and scored against the centre block of each
branch. Four defaults differ from the paper's (HiP's) estimator because they measured better:
the logsumexp of the scaled scores instead of their max, a beam of 2k branches in all rounds
but the last, scoring with every 8th query, and scoring every candidate block on rows where that
costs no more than the search (`search="auto"`). benchmarks/estimator_choice measures them
against the paper's settings on the default model (recall against the oracle, estimator time).
`StreamConfig(score="max", beam=k, query_stride=1, search="hierarchical")` is the paper's estimator.

>>> StreamConfig(k=4, block_size=32).block_k
32
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

PARTITIONS = ("row", "global")
REPRESENTATIVES = ("block", "token")
SCORES = ("max", "logsumexp")
HEAD_SHARING = ("head", "kv_group")
K_SCHEDULES = ("fixed", "log", "linear", "mass")
SEARCHES = ("auto", "hierarchical", "exhaustive")


@dataclass(frozen=True)
class StreamConfig:
    """How many key blocks each query block keeps, and how Stream picks them.

    Args:
        k: key blocks selected per query block (the paper's "sparsity constant"), on top of the
            forced sink and local blocks.
        block_size: tokens per block, for queries and keys unless `block_q` / `block_k` are given.
        block_q: tokens per query block (defaults to `block_size`).
        block_k: tokens per key block (defaults to `block_size`).
        sinks: leading key blocks always kept (attention sinks); 0 turns them off.
        local: trailing causal key blocks always kept (the diagonal); 0 turns them off.
        partition: "row" splits each row's own causal range into k branches (HiP, every row
            keeps exactly min(k, available) blocks); "global" splits the whole key axis the same
            way for every row (the paper's Figure 1), clipped by causality.
        representative: what scores a branch: "block" = its whole centre key block,
            "token" = the centre block's middle token only (cheapest).
        score: how a branch's q.k values are reduced: "logsumexp" of the scaled scores (default;
            closer to the attention mass the branch would receive) or "max" (HiP, the paper).
        query_stride: score with every s-th query of a block (default 8, at most block_q;
            HiP uses 2); 1 uses all.
        beam: branches kept per halving round before the last (default 2k; the paper: k); the
            last round always keeps k. A wider beam recovers blocks the narrow search misses.
        head_sharing: "head" = one mask per query head (the paper); "kv_group" = one mask per
            key/value head, scores summed over its query-head group.
        k_schedule: "fixed" = k blocks for every query block (the paper); "log" / "linear" = the
            same total budget redistributed in proportion to log2(1 + candidates) / candidates, so
            later query blocks, which choose among more key blocks, keep more (the paper names
            fixed k as its weakness on late needles); "mass" = each row searches 2k candidates,
            their attention mass among themselves is computed exactly, and per head the same
            total goes to the candidates of largest mass over all rows (costs one extra pass of
            query-key products over the candidates). All need partition="row".
        search: "hierarchical" = the halving search on every row (the paper); "exhaustive" = score
            every candidate block of every row and keep the best (exact for the score; O(T^2 / b^2)
            scores, a reference); "auto" (default) = exhaustive on the rows with few enough
            candidates that scoring them all costs no more than the search (a densely scored block
            is cheaper than a searched one), the search on the others: better selections at lower
            cost, still O(T log T).
        coverage: None (default) = a fixed budget (k, or the k schedule's); p in (0, 1] = each row
            keeps the fewest searched blocks whose estimated share of its attention, with the
            forced blocks, reaches p, within [k_min, k_max] (`coverage.keep_to_coverage`): rows
            that read few blocks keep few, spread rows keep more. Needs score="logsumexp" and
            k_schedule="fixed".
        k_min: with coverage, the fewest searched blocks a row keeps (default 1; 0 = only the
            forced ones may do).
        k_max: with coverage, the most searched blocks a row keeps (default 4k); the search looks
            for this many candidates, so time and trace size grow with it.
    """

    k: int = 8
    block_size: int = 64
    block_q: int | None = None
    block_k: int | None = None
    sinks: int = 1
    local: int = 1
    partition: str = "row"
    representative: str = "block"
    score: str = "logsumexp"
    query_stride: int | None = None
    beam: int | None = None
    head_sharing: str = "head"
    k_schedule: str = "fixed"
    search: str = "auto"
    coverage: float | None = None
    k_min: int | None = None
    k_max: int | None = None

    def __post_init__(self) -> None:
        if self.block_q is None:
            object.__setattr__(self, "block_q", self.block_size)
        if self.block_k is None:
            object.__setattr__(self, "block_k", self.block_size)
        if self.coverage is not None:
            if self.k_min is None:
                object.__setattr__(self, "k_min", 1)
            if self.k_max is None and isinstance(self.k, int):
                object.__setattr__(self, "k_max", 4 * self.k)
        if self.beam is None and isinstance(self.k, int):
            object.__setattr__(self, "beam", 2 * self.k)
        if self.query_stride is None and isinstance(self.block_q, int):
            object.__setattr__(self, "query_stride", min(8, self.block_q))
        _check_int("k", self.k, 1, "k is the number of key blocks kept per query block; use k >= 1")
        for name in ("block_size", "block_q", "block_k"):
            _check_int(name, getattr(self, name), 1, f"{name} is in tokens; use a positive size such as 64")
        _check_int("sinks", self.sinks, 0, "sinks counts leading key blocks; use 0 to turn them off")
        _check_int("local", self.local, 0, "local counts diagonal key blocks; use 0 to turn them off")
        _check_int("query_stride", self.query_stride, 1, "use query_stride >= 1 (1 scores with every query)")
        if self.query_stride > self.block_q:
            raise ConfigError(
                f"query_stride={self.query_stride} is larger than block_q={self.block_q}; "
                f"use a stride of at most block_q"
            )
        _check_int("beam", self.beam, 1, "beam counts branches kept per round; use beam >= k")
        if self.beam < self.k:
            raise ConfigError(f"beam={self.beam} is smaller than k={self.k}; use beam >= k (or leave it unset)")
        _check_choice("partition", self.partition, PARTITIONS)
        _check_choice("representative", self.representative, REPRESENTATIVES)
        _check_choice("score", self.score, SCORES)
        _check_choice("head_sharing", self.head_sharing, HEAD_SHARING)
        _check_choice("k_schedule", self.k_schedule, K_SCHEDULES)
        _check_choice("search", self.search, SEARCHES)
        self._check_coverage()
        if self.k_schedule != "fixed" and self.partition != "row":
            raise ConfigError(f"k_schedule={self.k_schedule!r} needs partition='row' (each row splits its own "
                              "range into its own number of branches)")

    def _check_coverage(self) -> None:
        if self.coverage is None:
            if self.k_min is not None or self.k_max is not None:
                raise ConfigError("k_min and k_max bound a coverage budget; set coverage too (e.g. coverage=0.95), "
                                  "or use k alone for a fixed budget")
            return
        if isinstance(self.coverage, bool) or not isinstance(self.coverage, (int, float)) or not (
                0 < self.coverage <= 1):
            raise ConfigError(f"coverage={self.coverage!r} is the share of each row's attention to keep; "
                              "use a number with 0 < coverage <= 1, such as 0.95")
        _check_int("k_min", self.k_min, 0, "k_min counts searched blocks a row keeps at least; use k_min >= 0")
        _check_int("k_max", self.k_max, 1, "k_max counts searched blocks a row keeps at most; use k_max >= 1")
        if self.k_min > self.k_max:
            raise ConfigError(f"k_min={self.k_min} is larger than k_max={self.k_max}; use k_min <= k_max")
        if self.score != "logsumexp":
            raise ConfigError(f"coverage estimates attention shares from scaled scores; use score='logsumexp' "
                              f"(not {self.score!r}) with coverage")
        if self.k_schedule != "fixed":
            raise ConfigError(f"coverage sets each row's budget itself; use k_schedule='fixed' (not "
                              f"{self.k_schedule!r}) with coverage")

    def budget_text(self) -> str:
        """The budget in words, as the commands print it: "k = 8" or "coverage 0.95 (1-32 blocks a row)"."""
        if self.coverage is None:
            return f"k = {self.k}"
        return f"coverage {self.coverage} ({self.k_min}-{self.k_max} blocks a row)"

    @property
    def searched_k(self) -> int:
        """Blocks each row's search looks for: k, or k_max under a coverage budget."""
        return self.k if self.coverage is None else self.k_max

    def with_k(self, k: int) -> StreamConfig:
        """The same settings with a fixed budget of k (a coverage budget's bounds dropped); a beam at
        its default (2k) follows k."""
        beam = 2 * k if self.beam == 2 * self.k else max(self.beam, k)
        return dataclasses.replace(self, k=k, beam=beam, coverage=None, k_min=None, k_max=None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StreamConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown StreamConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)


def field_help() -> dict[str, str]:
    """Each field's description from `StreamConfig`'s docstring (its Args), whitespace collapsed: the
    one text that the API docs and every command's --help show."""
    entries: dict[str, list[str]] = {}
    for line in StreamConfig.__doc__.split("Args:", 1)[1].splitlines():
        entry = re.match(r"^ {8}(\w+): (.*)", line)
        if entry:
            entries[entry[1]] = [entry[2]]
        elif line.strip() and entries:
            entries[next(reversed(entries))].append(line.strip())
    return {name: " ".join(words) for name, words in entries.items()}


def _check_int(name: str, value: Any, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}; {fix}")
    if value < minimum:
        raise ConfigError(f"{name}={value} is out of range; {fix}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
