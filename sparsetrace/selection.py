"""What every selector of key blocks shares: the `Selection` of a layer, each row's budget, its
forced (sink and local) blocks, and the "mass" schedule's cut to one total per head.

The Stream estimator (`stream.py`), the oracle (`dense.oracle_selection`) and the trace's layout
(`trace.py`, `tracer.py`) all read these, so "k", "the forced blocks" and "the trace's width" mean
the same thing in each. Pure integer bookkeeping on tensors: no scores are computed here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import num_blocks, row_key_range
from .config import StreamConfig


@dataclass(frozen=True)
class Selection:
    """Kept key blocks of one layer.

    Attributes:
        indices: int32 [B, H, n_q, K], K = `kept_width`: ascending per row, -1 padded at the end.
        scores: float32, same shape: each selected block's score (the search's last round, or
            the score of every candidate on rows that score them all); NaN for forced blocks,
            padding, and searched rows whose branches were single blocks from the start.
        coverage: float32 [B, H, n_q] under a coverage budget: each row's estimated share of its
            attention in the kept blocks (`coverage.keep_to_coverage`); None for a fixed budget.
    """

    indices: Tensor
    scores: Tensor
    coverage: Tensor | None = None


def searched_range(first: Tensor, last: Tensor, config: StreamConfig) -> tuple[Tensor, Tensor]:
    """lo, hi: int64 [n_q] the key blocks each row chooses among: its visible blocks first .. last
    (`blocks.row_key_range`) without the forced ones (the first `sinks` blocks, the last `local`).
    Empty where hi < lo."""
    return torch.clamp(first, min=config.sinks), last - config.local


def selectable_blocks(tokens: int, config: StreamConfig) -> int:
    """The most key blocks any row of a `tokens`-token input can select on top of its forced ones (at
    least 1): n_k - sinks - local with "row" partitions (a row's own causal range), n_k - sinks with
    "global" ones (branches split the whole key axis, the local blocks' range included)."""
    forced = config.sinks + (config.local if config.partition == "row" else 0)
    return max(1, num_blocks(tokens, config.block_k) - forced)


def fit_to_input(tokens: int, config: StreamConfig) -> StreamConfig:
    """`config` with its budget clamped to the blocks a `tokens`-token input has: k (and k_max, k_min,
    beam) above `selectable_blocks` become it. The selection is the same (a row keeps every candidate
    either way), but a width of sinks + k + local with a huge k would pad every row of the trace
    and the search's buffers to it. The same config when nothing exceeds the blocks.

    `select_blocks` selects with it, and `tracer.run_trace` records it, so a trace's `kept_width`
    is its own; traces saved before the clamp keep their recorded (wider) k and load as they are.
    """
    cap = selectable_blocks(tokens, config)
    changes = {}
    if config.k > cap:
        changes |= {"k": cap, "beam": min(config.beam, 2 * cap)}
    if config.coverage is not None and config.k_max > cap:
        changes |= {"k_max": cap, "k_min": min(config.k_min, cap)}
    return dataclasses.replace(config, **changes) if changes else config


@torch.compiler.disable
def row_budgets(tokens: int, config: StreamConfig) -> Tensor:
    """Key blocks each query block may select, on top of its forced blocks: int64 [n_q].

    "fixed": k for every row (a row with fewer candidates keeps them all). "log" and "linear": the
    same total as "fixed", sum_i min(k, n_i) over rows with n_i causal candidates, redistributed in
    proportion to log2(1 + n_i) or to n_i (each row capped at n_i): later rows, which choose among
    more blocks, get more of the budget; "linear" keeps about the same fraction of every row.
    "mass": 2k, the candidates each row searches for; `keep_largest_overall` then cuts the total
    back to the fixed schedule's. A coverage budget: k_max, the candidates each row searches for;
    `stream` then keeps as many as its coverage needs.
    Depends on T and the config only, so every layer (sliding or not) has the same budgets and
    the trace keeps one width, `kept_width`.
    """
    n_q = num_blocks(tokens, config.block_q)
    if config.coverage is not None:
        return torch.full((n_q,), config.k_max, dtype=torch.int64)
    if config.k_schedule in ("fixed", "mass"):
        return torch.full((n_q,), config.k * (2 if config.k_schedule == "mass" else 1), dtype=torch.int64)
    lo, hi = searched_range(*row_key_range(tokens, config.block_q, config.block_k, None), config)
    candidates = torch.clamp(hi - lo + 1, min=0).double()
    total = float(torch.clamp(candidates, max=config.k).sum())
    weight = torch.log2(1 + candidates) if config.k_schedule == "log" else candidates

    def budgets(scale: float) -> Tensor:
        return torch.minimum(torch.floor(scale * weight + 0.5), candidates)

    low, high = 0.0, float(config.k) * n_q + 1
    for _ in range(60):  # the largest scale whose total stays within the fixed schedule's
        middle = (low + high) / 2
        low, high = (middle, high) if float(budgets(middle).sum()) <= total else (low, middle)
    return budgets(low).long()


def kept_width(tokens: int, config: StreamConfig) -> int:
    """K, the last dimension of a selection: sinks + the largest row budget + local. (`select_blocks`
    selects with `fit_to_input(tokens, config)`, whose width this is.)"""
    budget = row_budgets(tokens, config)
    return config.sinks + (int(budget.max()) if budget.numel() else config.k) + config.local


def selected_counts(indices: Tensor, first: Tensor, last: Tensor, config: StreamConfig) -> Tensor:
    """int64 [B, H, n_q]: the kept blocks of each row that are not forced, from indices [B, H, n_q, K]
    (-1 = none) and each row's visible blocks first, last [n_q]."""
    lo, hi = searched_range(first, last, config)
    idx = indices.long()
    return ((idx >= lo[:, None]) & (idx <= hi[:, None])).sum(dim=-1)


def with_forced_blocks(
    selected: Tensor, score: Tensor, first: Tensor, last: Tensor, n_k: int, config: StreamConfig
) -> Selection:
    """Add the sink and local blocks to the selected ones, sort each row, pad with -1.

    Args:
        selected: int [B, H, n_q, m] (-1 = none); score: float [B, H, n_q, m];
        first, last: int [n_q] each row's visible key blocks (`row_key_range`).
    """
    batch, heads, n_q, _ = selected.shape
    lo, _ = searched_range(first, last, config)
    sinks = torch.arange(config.sinks, device=first.device).expand(n_q, -1)
    sinks = torch.where((sinks >= first[:, None]) & (sinks <= last[:, None]), sinks, -1)
    local = last[:, None] - config.local + 1 + torch.arange(config.local, device=first.device)
    local = torch.where(local >= lo[:, None], local, -1)
    indices = torch.cat(
        [sinks.expand(batch, heads, -1, -1), selected, local.expand(batch, heads, -1, -1)], dim=-1
    )
    nan = torch.full((batch, heads, n_q, config.sinks + config.local), float("nan"), device=score.device)
    scores = torch.cat([nan[..., : config.sinks], score, nan[..., config.sinks :]], dim=-1)
    return sorted_rows(indices, scores, n_k)


def keep_largest_overall(
    candidates: Selection, value: Tensor, first: Tensor, last: Tensor, n_k: int, config: StreamConfig
) -> Selection:
    """The "mass" schedule's allocation: per head, the fixed schedule's total budget goes to the
    searched candidates of largest `value` over all rows; forced blocks stay.

    A row's recall grows by the mass of each block it keeps, so keeping the blocks of largest mass
    across rows maximises the mean recall for the total (rows whose attention is spread out get
    more blocks, rows that read one sink get fewer).

    Args:
        candidates: up to 2k searched blocks per row plus the forced ones (indices, scores [B, H, n_q, K]).
        value: float [B, H, n_q, K] the attention mass of each candidate (its share of the row).
        first, last: int [n_q] each row's visible key blocks (`row_key_range`).
    """
    idx = candidates.indices.long()
    lo, hi = searched_range(first, last, config)
    searched = (idx >= lo[:, None]) & (idx <= hi[:, None])  # not padding, not a sink or local block
    total = int(torch.clamp(hi - lo + 1, min=0, max=config.k).sum())  # the fixed schedule's budget
    flat = value.masked_fill(~searched, float("-inf")).flatten(2)
    best = flat.topk(min(total, flat.shape[-1]), dim=-1).indices
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, best, True).view_as(searched) & searched
    keep = chosen | (~searched & (idx >= 0))
    return sorted_rows(torch.where(keep, idx, -1), torch.where(chosen, candidates.scores, float("nan")), n_k)


def sorted_rows(indices: Tensor, scores: Tensor, n_k: int) -> Selection:
    """Each row's blocks in ascending order, empty slots (-1) last, scores alongside."""
    order = torch.where(indices >= 0, indices, n_k).argsort(dim=-1, stable=True)
    return Selection(indices.gather(-1, order).to(torch.int32), scores.gather(-1, order))
