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

`hidden_from` (optional, int64 [H, T]) hides keys from later queries, for causal checks
(`interventions`): key s is invisible to query t of head h when t >= hidden_from[h, s].

Query blocks are processed in chunks so the working memory is bounded: for a chunk of c query
blocks the score tensor is [B, H, c, block_q, K, block_k], never T x T. A query that sees none
of its kept keys (possible only with block_q > block_k and no local block) gets a zero output.

`flex_block_attention` computes the same with torch's flex_attention (`kernels`, the "flex" path).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .blocks import gather_blocks, num_blocks, split_blocks
from .kernels import compiled_version

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
    softcap: float | None = None,
) -> Tensor:
    """The mass each kept block receives under attention restricted to the kept blocks (no values
    read, no output): float32 [B, H, n_q, K]. Arguments as `block_sparse_attention`."""
    return block_sparse_attention(q, k, None, indices, block_q=block_q, block_k=block_k, scaling=scaling,
                                  sliding_window=sliding_window, softcap=softcap)[1]


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
    compiled: bool = False,
    hidden_from: Tensor | None = None,
    first_row: int = 0,
) -> tuple[Tensor | None, Tensor]:
    """Softmax attention over the kept key blocks only.

    Args:
        q: [B, H, T_q, d] queries: every query (T_q = T), or those from query block `first_row` on
            (decoding a suffix on a cache; indices then hold those rows only).
        k: [B, H_kv, T, d] keys; query head h reads kv head h // (H / H_kv).
        v: [B, H_kv, T, d_v] values; None computes the mass only (`kept_block_mass`).
        indices: int [B, H, n_q, K] kept key blocks per query block, -1 = none.
        block_q, block_k: block sizes in tokens.
        scaling: score scale (default d ** -0.5).
        sliding_window: keys s visible to query t satisfy t - w < s <= t (None: s <= t).
        softcap: logit soft-capping, cap * tanh(score / cap) (Gemma 2).
        on_probabilities: optional hook called once per query chunk (see the module docstring).
        compiled: run each chunk compiled (`kernels`, the "compile" path); the same result.
        hidden_from: int64 [H, T] or None: key s is hidden from the queries t >= hidden_from[h, s] of
            head h (a knockout; see the module docstring). Eager only.
        first_row: the query block of q's first query.
    Returns:
        out: [B, H, T_q, d_v] in q's dtype (None without v), a transposed view of [B, T_q, H, d_v] memory.
        mass: float32 [B, H, n_q, K], 0 where the index is -1.
    """
    batch, heads, queries, dim = q.shape
    tokens = k.shape[2]
    scaling = dim**-0.5 if scaling is None else scaling
    n_q = num_blocks(queries, block_q)
    query_blocks = split_blocks(q, block_q)
    key_blocks = split_blocks(k, block_k)
    value_blocks = None if v is None else split_blocks(v, block_k)
    attend = compiled_version(_attend_chunk) if compiled else _attend_chunk
    if hidden_from is not None:  # [1, H, n_k, bk, 1], gathered like the keys
        hidden_blocks = split_blocks(hidden_from[None, :, :, None], block_k)
        attend = partial(_attend_chunk, hidden_blocks=hidden_blocks)

    chunk = max(1, _CHUNK_ELEMENTS // (batch * heads * block_q * indices.shape[-1] * block_k))
    # the output in the [B, T, H, d_v] memory layout the model wants next: one copy per chunk,
    # no concatenation and no transposed copy afterwards
    out = None if v is None else q.new_empty(batch, n_q, block_q, heads, v.shape[-1])
    masses = []
    for rows in range(0, n_q, chunk):
        idx = indices[:, :, rows : rows + chunk].long()
        row_start = torch.arange(first_row + rows, first_row + rows + idx.shape[2], device=q.device) * block_q
        probs, chunk_out, mass = attend(query_blocks[:, :, rows : rows + chunk], key_blocks, value_blocks, idx,
                                        row_start, tokens, scaling, sliding_window, softcap)
        if on_probabilities is not None:
            on_probabilities(rows, probs, idx)
        if out is not None:
            out[:, rows : rows + idx.shape[2]] = chunk_out
        masses.append(mass)
    if out is None:
        return None, torch.cat(masses, dim=2)
    return out.view(batch, n_q * block_q, heads, -1)[:, :queries].transpose(1, 2), torch.cat(masses, dim=2)


def _attend_chunk(
    query_blocks: Tensor,
    key_blocks: Tensor,
    value_blocks: Tensor | None,
    idx: Tensor,
    row_start: Tensor,
    tokens: int,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
    hidden_blocks: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One chunk of c query blocks: the hot function, and what the "compile" path compiles.

    Args:
        query_blocks: [B, H, c, bq, d]; key_blocks, value_blocks: [B, H_kv, n_k, bk, d] / d_v.
        idx: int64 [B, H, c, K] kept key blocks (-1 = none); row_start: int64 [c] first query of each row.
        hidden_blocks: int64 [1, H, n_k, bk, 1] or None: `hidden_from` cut into key blocks.
    Returns:
        probs float32 [B, H, c, bq, K * bk]; out [B, c, bq, H, d_v] (None without values);
        mass float32 [B, H, c, K].
    """
    batch, heads, c, block_q, _ = query_blocks.shape
    block_k, kept = key_blocks.shape[3], idx.shape[-1]
    safe = idx.clamp(min=0)
    keys = gather_blocks(key_blocks, safe, heads).flatten(3, 4)  # [B, H, c, K * bk, d]
    scores = torch.matmul(query_blocks * scaling, keys.transpose(-1, -2)).float()
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    # key s = j*bk + a is visible to query t = i*bq + b iff a - b <= i*bq - j*bk (and > that - w)
    offset = (torch.arange(block_k, device=idx.device) - torch.arange(block_q, device=idx.device)[:, None])[:, None]
    never = torch.iinfo(torch.int64).min // 2  # a start difference that no key satisfies
    gap = torch.where(idx >= 0, row_start[:, None] - safe * block_k, never)[:, :, :, None, :, None]
    seen = offset <= gap
    if sliding_window is not None:
        seen = seen & (offset > gap - sliding_window)
    if hidden_blocks is not None:  # knocked-out keys: hidden from the queries at or after their limit
        limit = gather_blocks(hidden_blocks, safe, heads)[..., 0]  # [B, H, c, K, bk]
        query = row_start[:, None] + torch.arange(block_q, device=idx.device)  # [c, bq]
        seen = seen & (query[:, :, None, None] < limit[:, :, :, None])
    scores = scores.view(batch, heads, c, block_q, kept, block_k).masked_fill_(~seen, float("-inf"))
    probs = torch.softmax(scores.flatten(-2), dim=-1).nan_to_num_(0.0)  # a query may see no kept key
    out = None
    if value_blocks is not None:
        values = gather_blocks(value_blocks, safe, heads).flatten(3, 4)
        out = torch.matmul(probs.to(values.dtype), values).permute(0, 2, 3, 1, 4)
    real = ((row_start[:, None] + torch.arange(block_q, device=idx.device)) < tokens).float()  # [c, bq]: not padding
    block_mass = probs.view(batch, heads, c, block_q, kept, block_k).sum(dim=-1)  # [B, H, c, bq, K]
    return probs, out, (block_mass * real[..., None]).sum(dim=3) / real.sum(dim=-1)[:, None]


def flex_block_attention(
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
    """`block_sparse_attention` by torch's `flex_attention` (the "flex" path): the same out and mass.

    The kept blocks become a `BlockMask.from_kv_blocks`, causality and the window its mask_mod, the
    softcap a score_mod. flex_attention always runs compiled: uncompiled, it ignores the block
    indices and builds the full score matrix. torch 2.13's CPU kernel wants the index table as wide
    as the key axis (int32 [B, H, n_q, n_k]: 9 MB for 9 heads at 32k tokens in 64-token blocks, but
    it grows as (T / b)^2, one more reason "auto" never picks flex on CPU) and cannot return the
    logsumexp, so the mass of each kept block comes from `kept_block_mass` (this module's own code,
    without values). Arguments and results as `block_sparse_attention` (v required; out
    [B, H, T, d_v] contiguous).
    """
    batch, heads, tokens, _ = q.shape
    n_q, n_k = indices.shape[2], num_blocks(tokens, block_k)
    kept = min(indices.shape[-1], n_k)
    count = (indices >= 0).sum(dim=-1, dtype=torch.int32)  # ascending, -1 padded: the first `count` are kept
    table = indices.new_zeros(batch, heads, n_q, n_k, dtype=torch.int32)
    table[..., :kept] = indices[..., :kept].clamp(min=0)

    def visible(b: Tensor, h: Tensor, query: Tensor, key: Tensor) -> Tensor:
        if sliding_window is None:
            return key <= query
        return (key <= query) & (key > query - sliding_window)

    capped = None
    if softcap is not None:
        cap = torch.tensor(softcap, device=q.device)  # a tensor: a captured float breaks the dynamic shapes

        def capped(score: Tensor, b: Tensor, h: Tensor, query: Tensor, key: Tensor) -> Tensor:
            return cap * torch.tanh(score / cap)

    mask = BlockMask.from_kv_blocks(count, table, BLOCK_SIZE=(block_q, block_k), mask_mod=visible,
                                    seq_lengths=(tokens, tokens), compute_q_blocks=False)
    out = compiled_version(flex_attention)(q, k, v, score_mod=capped, block_mask=mask,
                                           scale=scaling, enable_gqa=heads != k.shape[1])
    mass = kept_block_mass(q, k, indices, block_q=block_q, block_k=block_k, scaling=scaling,
                           sliding_window=sliding_window, softcap=softcap)
    return out, mass
