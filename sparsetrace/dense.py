"""Exact references: dense block mass, oracle top-k, recall, and dense attention with knockouts.

The only O(T^2)-time code of the package, and still O(T) memory beyond its [B, H, n_q, n_k]
result: queries are taken a chunk of query blocks at a time, and for each chunk the keys are
streamed twice, a key chunk at a time: once for the softmax normaliser of every query (online
max and sum of exponentials), once for the probability mass each key block receives. Key chunks
that are entirely in the future (or entirely outside a sliding window) are skipped.

    mass[b, h, i, j] = mean over the queries t of query block i of
                       sum over the keys s of key block j of softmax(q_t . k_s)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .blocks import num_blocks, row_key_range, visible
from .config import StreamConfig
from .selection import Selection, keep_largest_overall, row_budgets, searched_range, with_forced_blocks

# Score elements per (query chunk x key chunk) step: bounds the working memory (~64 MB fp32).
_STEP_ELEMENTS = 1 << 24


def dense_block_mass(
    q: Tensor,
    k: Tensor,
    *,
    block_q: int,
    block_k: int,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Exact attention mass of every (query block, key block) pair.

    Args:
        q: [B, H, T, d] queries; k: [B, H_kv, T, d] keys (query head h reads kv head h // (H / H_kv)).
        block_q, block_k: block sizes in tokens.
        scaling, sliding_window, softcap: as the model's attention (see `block_sparse_attention`).
    Returns:
        float32 [B, H, n_q, n_k]; each row sums to 1, future blocks are 0.
    """
    batch, heads, tokens, dim = q.shape
    scaling = dim**-0.5 if scaling is None else scaling
    keys = k.repeat_interleave(heads // k.shape[1], dim=1)
    n_q, n_k = num_blocks(tokens, block_q), num_blocks(tokens, block_k)
    rows_per_chunk = max(1, int((_STEP_ELEMENTS / (batch * heads * tokens)) ** 0.5) // block_q)
    span_q = rows_per_chunk * block_q
    span_k = max(block_k, (_STEP_ELEMENTS // (batch * heads * span_q)) // block_k * block_k)
    mass = torch.zeros(batch, heads, n_q, n_k, device=q.device)
    for q_start in range(0, tokens, span_q):
        q_end = min(q_start + span_q, tokens)
        query = q[:, :, q_start:q_end].float() * scaling
        lowest = 0 if sliding_window is None else max(0, q_start - sliding_window + 1)
        key_chunks = [(s, min(s + span_k, q_end)) for s in range(lowest // block_k * block_k, q_end, span_k)]
        step = dict(query=query, keys=keys, q_start=q_start, tokens=tokens, sliding_window=sliding_window,
                    softcap=softcap)

        peak = torch.full((batch, heads, q_end - q_start, 1), float("-inf"), device=q.device)
        total = torch.zeros_like(peak)
        for k_start, k_end in key_chunks:  # pass 1: online softmax normaliser of every query
            s = _masked_scores(k_start=k_start, k_end=k_end, **step)
            peak_now = torch.maximum(peak, s.amax(dim=-1, keepdim=True))
            shift = torch.where(peak_now == float("-inf"), 0.0, peak_now)  # a query that saw no key yet
            total = total * torch.exp(peak - shift) + torch.exp(s - shift).sum(dim=-1, keepdim=True)
            peak = peak_now

        first_row = q_start // block_q
        row_of_query = torch.arange(q_start, q_end, device=q.device) // block_q - first_row
        queries_per_row = torch.bincount(row_of_query).float()[:, None]
        for k_start, k_end in key_chunks:  # pass 2: probability mass per key block
            p = torch.exp(_masked_scores(k_start=k_start, k_end=k_end, **step) - peak) / total
            p = torch.nn.functional.pad(p, (0, -(k_end - k_start) % block_k))  # the last block may be partial
            block_sums = p.unflatten(-1, (-1, block_k)).sum(dim=-1)  # [B, H, tq, key blocks]
            rows = torch.zeros(batch, heads, len(queries_per_row), block_sums.shape[-1], device=q.device)
            rows.index_add_(2, row_of_query, block_sums)
            j0 = k_start // block_k
            mass[:, :, first_row : first_row + len(queries_per_row), j0 : j0 + block_sums.shape[-1]] = (
                rows / queries_per_row
            )
    return mass


def _masked_scores(
    *, query: Tensor, keys: Tensor, q_start: int, k_start: int, k_end: int, tokens: int,
    sliding_window: int | None, softcap: float | None,
) -> Tensor:
    """Scaled scores of a query chunk against keys k_start..k_end, invisible pairs -inf: [B, H, tq, tk]."""
    s = query @ keys[:, :, k_start:k_end].float().transpose(-1, -2)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    query_pos = torch.arange(q_start, q_start + query.shape[2], device=query.device)[:, None]
    key_pos = torch.arange(k_start, k_end, device=query.device)[None, :]
    return s.masked_fill(~visible(query_pos, key_pos, tokens, sliding_window), float("-inf"))


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    hidden_from: Tensor | None = None,
) -> Tensor:
    """Plain softmax attention, a chunk of queries at a time, with knocked-out keys (`interventions`).

    The dense reference of a causal check: what the model's own attention computes when key s is
    hidden from the queries t >= hidden_from[h, s] of head h. The queries may be the last T_q of the
    T_k positions (decoding on a cache): query i sits at position T_k - T_q + i.

    Args:
        q: [B, H, T_q, d]; k, v: [B, H_kv, T_k, d] / d_v (query head h reads kv head h // (H / H_kv)).
        scaling, sliding_window, softcap: as the model's attention (see `block_sparse_attention`).
        hidden_from: int64 [H, T_k] or None.
    Returns:
        [B, T_q, H, d_v] in q's dtype (the layout the model's output projection reads).
    """
    batch, heads, queries, dim = q.shape
    keys_total = k.shape[2]
    scaling = dim**-0.5 if scaling is None else scaling
    group = heads // k.shape[1]
    keys = k.repeat_interleave(group, dim=1).float()
    values = v.repeat_interleave(group, dim=1)
    out = q.new_empty(batch, queries, heads, v.shape[-1])
    chunk = max(1, _STEP_ELEMENTS // (batch * heads * keys_total))
    key_pos = torch.arange(keys_total, device=q.device)
    for start in range(0, queries, chunk):
        query_pos = keys_total - queries + torch.arange(start, min(start + chunk, queries), device=q.device)
        s = (q[:, :, start : start + chunk].float() * scaling) @ keys.transpose(-1, -2)  # [B, H, c, T_k]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        seen = visible(query_pos[:, None], key_pos[None, :], keys_total, sliding_window)
        if hidden_from is not None:
            seen = seen & (query_pos[:, None] < hidden_from[:, None, :])  # [H, c, T_k]
        probs = torch.softmax(s.masked_fill(~seen, float("-inf")), dim=-1).nan_to_num_(0.0)
        out[:, start : start + chunk] = (probs.to(values.dtype) @ values).transpose(1, 2)
    return out


def oracle_selection(mass: Tensor, config: StreamConfig, tokens: int, sliding_window: int | None = None,
                     budget: Tensor | None = None) -> Selection:
    """The best possible selection of the same budget: the same forced (sink and local) blocks as
    Stream, plus each row's budget (k, or the k_schedule's) of searchable key blocks of largest
    true mass; for the "mass" schedule, the same total per head over all rows (at most 2k a row).

    Args:
        mass: float [B, H, n_q, n_k] from `dense_block_mass`.
        budget: int [B, H, n_q] searched blocks per row, instead of the config's: a coverage
            budget's own counts (`selection.selected_counts` of the trace), so the oracle keeps as many.
    """
    n_k = mass.shape[-1]
    first, last = row_key_range(tokens, config.block_q, config.block_k, sliding_window, mass.device)
    lo, hi = searched_range(first, last, config)
    j = torch.arange(n_k, device=mass.device)
    searchable = (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])  # [n_q, n_k]
    if budget is None:
        budget = row_budgets(tokens, config).to(mass.device)  # [n_q]: k per row, or the k_schedule's
    max_budget = max(int(budget.max()), 1)
    best = mass.masked_fill(~searchable, -1.0).topk(min(max_budget, n_k), dim=-1)
    rank = torch.arange(best.indices.shape[-1], device=mass.device)
    chosen = torch.where((best.values >= 0) & (rank < budget[..., None]), best.indices, -1)
    chosen = torch.nn.functional.pad(chosen, (0, max_budget - chosen.shape[-1]), value=-1)
    scores = torch.full(chosen.shape, float("nan"), device=mass.device)
    best_per_row = with_forced_blocks(chosen, scores, first, last, n_k, config)
    if config.k_schedule != "mass":
        return best_per_row
    value = mass.gather(-1, best_per_row.indices.long().clamp(min=0))
    return keep_largest_overall(best_per_row, value, first, last, n_k, config)


def recall(indices: Tensor, mass: Tensor) -> Tensor:
    """Fraction of the dense attention mass inside the kept blocks, per row.

    Args:
        indices: int [B, H, n_q, K] kept key blocks (-1 = none); mass: float [B, H, n_q, n_k].
    Returns:
        float [B, H, n_q].
    """
    idx = indices.long()
    return (mass.gather(-1, idx.clamp(min=0)) * (idx >= 0)).sum(dim=-1)
