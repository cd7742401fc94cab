"""Attention restricted to the kept key blocks, and the mass each kept block receives.

Each query attends only to the keys of its row's kept blocks: the softmax is renormalised
over them, causality (and the sliding window) is applied token by token inside them. The
same probabilities give the attention **mass** of each kept block: the mean over the query
block's tokens of the probability summed over the block's keys. One computation yields both,
so a trace costs no second pass.

An optional `on_probabilities(rows, probs, indices)` hook sees every chunk's probabilities over
its kept keys before they are reduced (e.g. to sum them per sentence, `analysis.anchors`): rows is
the chunk's first query block, probs float32 [B, H, c, block_q, K * block_k] (key slot
k * block_k + a is token indices[..., k] * block_k + a; padded queries and slots are included,
masked keys have probability 0), indices int64 [B, H, c, K] (-1 = none). Without a hook nothing
extra runs.

Query blocks are processed in chunks so the working memory is bounded: for a chunk of c query
blocks the score tensor is [B, H, c, block_q, K, block_k], never T x T. A query that sees none
of its kept keys (possible only with block_q > block_k and no local block) gets a zero output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .blocks import gather_blocks, num_blocks, split_blocks

# Elements of the per-chunk score tensor (4 MB fp32): measured fastest on 2 cores at 4k-8k tokens.
_CHUNK_ELEMENTS = 1 << 20


def kept_block_mass(
    q: Tensor,
    k: Tensor,
    indices: Tensor,
    *,
    block_q: int,
    block_k: int,
    scaling: float | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """The mass each kept block receives under attention restricted to the kept blocks (no values
    read, no output): float32 [B, H, n_q, K]. Arguments as `block_sparse_attention`."""
    return block_sparse_attention(q, k, None, indices, block_q=block_q, block_k=block_k, scaling=scaling,
                                  sliding_window=sliding_window)[1]


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    indices: Tensor,
    *,
    block_q: int,
    block_k: int,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    on_probabilities: Callable[[int, Tensor, Tensor], None] | None = None,
) -> tuple[Tensor | None, Tensor]:
    """Softmax attention over the kept key blocks only.

    Args:
        q: [B, H, T, d] queries.
        k: [B, H_kv, T, d] keys; query head h reads kv head h // (H / H_kv).
        v: [B, H_kv, T, d_v] values; None computes the mass only (`kept_block_mass`).
        indices: int [B, H, n_q, K] kept key blocks per query block, -1 = none.
        block_q, block_k: block sizes in tokens.
        scaling: score scale (default d ** -0.5).
        sliding_window: keys s visible to query t satisfy t - w < s <= t (None: s <= t).
        softcap: logit soft-capping, cap * tanh(score / cap) (Gemma 2).
        on_probabilities: optional hook called once per query chunk (see the module docstring).
    Returns:
        out: [B, H, T, d_v] in q's dtype (None without v), a transposed view of [B, T, H, d_v] memory.
        mass: float32 [B, H, n_q, K], 0 where the index is -1.
    """
    batch, heads, tokens, dim = q.shape
    scaling = dim**-0.5 if scaling is None else scaling
    n_q = num_blocks(tokens, block_q)
    kept = indices.shape[-1]
    query_blocks = split_blocks(q, block_q)
    key_blocks = split_blocks(k, block_k)
    value_blocks = None if v is None else split_blocks(v, block_k)
    # key offset minus query offset inside a (query block, key block) pair: [block_q, 1, block_k]
    offset = (torch.arange(block_k, device=q.device) - torch.arange(block_q, device=q.device)[:, None])[:, None]
    never = torch.iinfo(torch.int64).min // 2  # a start difference that no key satisfies

    chunk = max(1, _CHUNK_ELEMENTS // (batch * heads * block_q * kept * block_k))
    # the output in the [B, T, H, d_v] memory layout the model wants next: one copy per chunk,
    # no concatenation and no transposed copy afterwards
    out = None if v is None else q.new_empty(batch, n_q, block_q, heads, v.shape[-1])
    masses = []
    for rows in range(0, n_q, chunk):
        idx = indices[:, :, rows : rows + chunk].long()
        safe = idx.clamp(min=0)
        c = idx.shape[2]
        keys = gather_blocks(key_blocks, safe, heads).flatten(3, 4)  # [B, H, c, K * bk, d]
        scores = torch.matmul(query_blocks[:, :, rows : rows + chunk] * scaling, keys.transpose(-1, -2)).float()
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        # key s = j*bk + a is visible to query t = i*bq + b iff a - b <= i*bq - j*bk (and > that - w)
        row_start = (torch.arange(rows, rows + c, device=q.device) * block_q)[:, None]
        gap = torch.where(idx >= 0, row_start - safe * block_k, never)[:, :, :, None, :, None]
        seen = offset <= gap
        if sliding_window is not None:
            seen = seen & (offset > gap - sliding_window)
        scores = scores.view(batch, heads, c, block_q, kept, block_k).masked_fill_(~seen, float("-inf"))
        probs = torch.softmax(scores.flatten(-2), dim=-1).nan_to_num_(0.0)  # a query may see no kept key
        if on_probabilities is not None:
            on_probabilities(rows, probs, idx)
        if value_blocks is not None:
            values = gather_blocks(value_blocks, safe, heads).flatten(3, 4)
            out[:, rows : rows + c] = torch.matmul(probs.to(values.dtype), values).permute(0, 2, 3, 1, 4)
        real = ((row_start + torch.arange(block_q, device=q.device)) < tokens).float()  # [c, bq]: not padding
        block_mass = probs.view(batch, heads, c, block_q, kept, block_k).sum(dim=-1)  # [B, H, c, bq, K]
        masses.append((block_mass * real[..., None]).sum(dim=3) / real.sum(dim=-1)[:, None])
    if value_blocks is None:
        return None, torch.cat(masses, dim=2)
    return out.view(batch, n_q * block_q, heads, -1)[:, :tokens].transpose(1, 2), torch.cat(masses, dim=2)
