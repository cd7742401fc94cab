"""Coverage budgets: each row keeps the fewest of its candidate blocks whose estimated share of the
row's attention, with the forced blocks, reaches p (`StreamConfig.coverage`), within [k_min, the
candidates the search found].

The estimate reads the estimator's scoring queries (every `query_stride`-th of a block). For each
such query: its attention over each kept block (exact: one pass over the k_max candidates and the
forced blocks of every row), normalised by its attention over the forced blocks and over all the
row's candidates (`log_total`: exact on rows that score every candidate, from the halving search's
first round on rows that search); the shares are then averaged over the row's scoring queries. A
row keeps candidates in order of estimated share until p is reached; a row whose candidates run
out first keeps them all and reports an estimate below p. Nothing T x T: the pass is chunked over
rows, and it is O(T k_max) like the block attention itself.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .blocks import gather_blocks, num_blocks, visible
from .config import StreamConfig
from .selection import Selection, sorted_rows

# Logit elements per chunk of rows (16 MB fp32): bounds the pass's working memory whatever T is.
_CHUNK_ELEMENTS = 1 << 22


def keep_to_coverage(
    candidates: Selection,
    query_blocks: Tensor,
    query_pos: Tensor,
    key_blocks: Tensor,
    log_total: Tensor,
    lo: Tensor,
    hi: Tensor,
    config: StreamConfig,
    *,
    tokens: int,
    sliding_window: int | None,
) -> Selection:
    """Cut each row's candidates to what its coverage needs.

    Args:
        candidates: the search's k_max blocks a row plus the forced ones (indices [B, H, n_q, K]).
        query_blocks: [B, H, n_q, q', d] the scoring queries, already scaled; query_pos: int64 [n_q, q'].
        key_blocks: [B, H_kv, n_k, block_k, d] the layer's keys in blocks.
        log_total: [B, H, n_q, q'] each scoring query's log attention mass on all the row's searched
            candidates (-inf where not estimated: the kept candidates then stand for them all).
        lo, hi: int64 [n_q] each row's searched key blocks.
    Returns:
        the kept blocks, sorted, -1 padded, with `coverage` [B, H, n_q]: the estimated share kept.
    """
    batch, heads, n_q, width = candidates.indices.shape
    kv_heads = key_blocks.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // (batch * heads * query_blocks.shape[3] * width * config.block_k))
    shares = torch.cat([
        _kept_shares(query_blocks[:, :, rows], query_pos[rows], key_blocks, candidates.indices[:, :, rows],
                     log_total[:, :, rows], lo[rows], hi[rows], config, tokens, sliding_window)
        for rows in torch.arange(n_q, device=lo.device).split(chunk)
    ], dim=2)  # [B, H, n_q, K]
    if config.head_sharing == "kv_group":  # one mask per group: the group's mean share
        group = shares.unflatten(1, (kv_heads, heads // kv_heads))
        shares = group.mean(dim=2, keepdim=True).expand_as(group).flatten(1, 2)
    idx = candidates.indices.long()
    searched = (idx >= lo[:, None]) & (idx <= hi[:, None])
    forced_share = (shares * (~searched & (idx >= 0))).sum(dim=-1)
    ranked = shares.masked_fill(~searched, -1.0).sort(dim=-1, descending=True, stable=True)
    gains = ranked.values.clamp(min=0)
    before = forced_share[..., None] + gains.cumsum(dim=-1) - gains  # the share kept before each candidate
    needed = ((before < config.coverage) & (ranked.values >= 0)).sum(dim=-1)  # fewest reaching p, or all found
    count = torch.minimum(torch.clamp(needed, min=config.k_min), searched.sum(dim=-1))
    keep_ranked = torch.arange(width, device=idx.device) < count[..., None]
    keep = torch.zeros_like(searched).scatter(-1, ranked.indices, keep_ranked) | (~searched & (idx >= 0))
    coverage = (shares * keep).sum(dim=-1).clamp(0.0, 1.0)
    kept = sorted_rows(torch.where(keep, idx, -1), torch.where(keep, candidates.scores, float("nan")),
                       num_blocks(tokens, config.block_k))
    return dataclasses.replace(kept, coverage=coverage)


def _kept_shares(queries: Tensor, query_pos: Tensor, key_blocks: Tensor, indices: Tensor, log_total: Tensor,
                 lo: Tensor, hi: Tensor, config: StreamConfig, tokens: int, sliding_window: int | None) -> Tensor:
    """Each kept block's estimated share of its row's attention, for c rows.

    Args:
        queries: [B, H, c, q', d] scaled; query_pos: int64 [c, q'] (>= T: padding);
        indices: int [B, H, c, K] kept blocks (-1 = none), forced ones included; log_total, lo, hi:
            the rows' slices of `keep_to_coverage`'s.
    Returns:
        float32 [B, H, c, K]: the mean over the rows' scoring queries of the block's attention
        probability under a softmax over the forced blocks and all candidates (0 for padding).
    """
    idx = indices.long()
    valid = idx >= 0
    keys = gather_blocks(key_blocks, idx.clamp(min=0), queries.shape[1])  # [B, H, c, K, kb, d]
    logits = torch.einsum("bhcqd,bhckjd->bhcqkj", queries, keys).float()
    key_pos = idx[..., None] * config.block_k + torch.arange(config.block_k, device=idx.device)  # [B, H, c, K, kb]
    seen = visible(query_pos[None, None, :, :, None, None], key_pos[:, :, :, None], tokens,
                   sliding_window) & valid[:, :, :, None, :, None]
    per_block = logits.masked_fill(~seen, float("-inf")).logsumexp(dim=-1)  # [B, H, c, q', K]
    searched = ((idx >= lo[:, None]) & (idx <= hi[:, None]))[:, :, :, None, :]
    forced = per_block.masked_fill(searched | ~valid[:, :, :, None, :], float("-inf")).logsumexp(dim=-1)
    kept_candidates = per_block.masked_fill(~searched, float("-inf")).logsumexp(dim=-1)
    log_z = torch.logaddexp(forced, torch.maximum(kept_candidates, log_total))  # [B, H, c, q']
    probability = torch.exp(per_block - log_z[..., None]).nan_to_num(0.0)  # a query that sees nothing: 0
    real = (query_pos < tokens).float()  # [c, q']
    return (probability * real[None, None, :, :, None]).sum(dim=3) / real.sum(dim=-1).clamp(min=1)[None, None, :, None]
