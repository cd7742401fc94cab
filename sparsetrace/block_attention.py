"""Attention restricted to the kept key blocks, and the mass each kept block receives.

Each query attends only to the keys of its row's kept blocks: the softmax is renormalised
over them, causality (and the sliding window) is applied token by token inside them. The
same probabilities give the attention **mass** of each kept block: the mean over the query
block's tokens of the probability summed over the block's keys. One computation yields both,
so a trace costs no second pass.

Query blocks are processed in chunks so the working memory is bounded: for a chunk of c query
blocks the score tensor is [B, H, c, block_q, K, block_k], never T x T. A query that sees none
of its kept keys (possible only with block_q > block_k and no local block) gets a zero output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .blocks import gather_blocks, num_blocks, split_blocks, visible

# Elements of the per-chunk score tensor (16 MB fp32): keeps the working set small and hot.
_CHUNK_ELEMENTS = 1 << 22


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    *,
    block_q: int,
    block_k: int,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention over the kept key blocks only.

    Args:
        q: [B, H, T, d] queries.
        k: [B, H_kv, T, d] keys; query head h reads kv head h // (H / H_kv).
        v: [B, H_kv, T, d_v] values.
        indices: int [B, H, n_q, K] kept key blocks per query block, -1 = none.
        block_q, block_k: block sizes in tokens.
        scaling: score scale (default d ** -0.5).
        sliding_window: keys s visible to query t satisfy t - w < s <= t (None: s <= t).
        softcap: logit soft-capping, cap * tanh(score / cap) (Gemma 2).
    Returns:
        out: [B, H, T, d_v] in q's dtype.
        mass: float32 [B, H, n_q, K], 0 where the index is -1.
    """
    batch, heads, tokens, dim = q.shape
    scaling = dim**-0.5 if scaling is None else scaling
    n_q = num_blocks(tokens, block_q)
    kept = indices.shape[-1]
    query_blocks = split_blocks(q, block_q)
    key_blocks = split_blocks(k, block_k)
    value_blocks = split_blocks(v, block_k)
    query_pos = torch.arange(n_q * block_q, device=q.device).view(n_q, block_q)

    chunk = max(1, _CHUNK_ELEMENTS // (batch * heads * block_q * kept * block_k))
    outputs, masses = [], []
    for rows in range(0, n_q, chunk):
        idx = indices[:, :, rows : rows + chunk].long()
        safe = idx.clamp(min=0)
        keys = gather_blocks(key_blocks, safe, heads).float()  # [B, H, c, K, bk, d]
        values = gather_blocks(value_blocks, safe, heads).float()
        scores = torch.einsum("bhcqd,bhcnkd->bhcqnk", query_blocks[:, :, rows : rows + chunk].float(), keys)
        scores = scores * scaling
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        key_pos = safe[..., None] * block_k + torch.arange(block_k, device=q.device)  # [B, H, c, K, bk]
        seen = visible(query_pos[rows : rows + chunk][None, None, :, :, None, None],
                       key_pos[:, :, :, None], tokens, sliding_window)
        seen = seen & (idx >= 0)[:, :, :, None, :, None]
        scores = scores.masked_fill(~seen, float("-inf"))
        c, q_len = scores.shape[2], scores.shape[3]
        probs = torch.softmax(scores.view(batch, heads, c, q_len, -1), dim=-1)
        probs = probs.nan_to_num(0.0).view_as(scores)  # queries that see no kept key
        outputs.append(torch.einsum("bhcqnk,bhcnkd->bhcqd", probs, values))
        valid_queries = (query_pos[rows : rows + chunk] < tokens).sum(dim=-1).clamp(min=1)  # [c]
        masses.append(probs.sum(dim=-1).sum(dim=3) / valid_queries[:, None])
    out = torch.cat(outputs, dim=2).reshape(batch, heads, n_q * block_q, -1)[:, :, :tokens]
    return out.to(q.dtype), torch.cat(masses, dim=2)

