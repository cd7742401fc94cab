r"""Block geometry shared by the estimator, the sparse attention and the dense references.

Tokens are cut into query blocks of `block_q` tokens and key blocks of `block_k` tokens; the
last block of each may be partial. Query block i can see key blocks `first(i) .. last(i)`:

    keys ->   0   1   2   3          (block_q = block_k, no window)
    q 0     [ \ ]
    q 1     [   ] [ \ ]
    q 2     [   ] [   ] [ \ ]
    q 3     [   ] [   ] [   ] [ \ ]   <- last(3) = 3: the diagonal block is causal inside

With a sliding window of w tokens (query t sees keys t - w < s <= t), `first(i)` is the key
block of the oldest key any query of block i can still see.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def num_blocks(num_tokens: int, block: int) -> int:
    return math.ceil(num_tokens / block)


def row_key_range(
    num_tokens: int, block_q: int, block_k: int, sliding_window: int | None, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """First and last key block each query block can see.

    Returns:
        first, last: int64 [n_q].
    """
    starts = torch.arange(num_blocks(num_tokens, block_q), device=device) * block_q
    ends = torch.clamp(starts + block_q, max=num_tokens) - 1
    last = ends // block_k
    if sliding_window is None:
        first = torch.zeros_like(last)
    else:
        first = torch.clamp(starts - sliding_window + 1, min=0) // block_k
    return first, last


def queries_per_row(num_tokens: int, block_q: int) -> Tensor:
    """float [n_q]: how many queries each query block holds (the last may be partial)."""
    starts = torch.arange(num_blocks(num_tokens, block_q)) * block_q
    return (torch.clamp(starts + block_q, max=num_tokens) - starts).float()


def split_blocks(x: Tensor, block: int) -> Tensor:
    """Cut the token axis into blocks, zero-padding the last one.

    The result is contiguous: models hand q and k over as transposed views ([B, T, H, d] memory),
    and `gather_blocks` would otherwise copy the whole tensor on every call (one copy here instead;
    benchmarks/scale measures the trace with it).

    Args:
        x: [B, H, T, d].
    Returns:
        contiguous [B, H, n, block, d] with n = ceil(T / block).
    """
    batch, heads, tokens, dim = x.shape
    n = num_blocks(tokens, block)
    pad = n * block - tokens
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.contiguous().view(batch, heads, n, block, dim)


def gather_blocks(blocks: Tensor, index: Tensor, num_query_heads: int) -> Tensor:
    """Pick key (or value) blocks for every query head without repeating K/V over the head group.

    Args:
        blocks: [B, H_kv, n_k, b, d] from `split_blocks`.
        index: int [B, H, ...] key block per query head (must be valid: >= 0).
        num_query_heads: H; query head h reads kv head h // (H / H_kv).
    Returns:
        [B, H, ..., b, d].
    """
    batch, kv_heads, n_k, block, dim = blocks.shape
    group = num_query_heads // kv_heads
    kv_of_head = torch.arange(num_query_heads, device=index.device) // group
    base = (torch.arange(batch, device=index.device)[:, None] * kv_heads + kv_of_head[None, :]) * n_k
    flat_index = index.long() + base.view(batch, num_query_heads, *([1] * (index.dim() - 2)))
    # rows of a 2-D table: index_select copies them ~20x faster than slices of a 3-D one (torch 2.13 CPU)
    picked = blocks.reshape(batch * kv_heads * n_k, block * dim).index_select(0, flat_index.reshape(-1))
    return picked.view(*index.shape, block, dim)


def visible(query_pos: Tensor, key_pos: Tensor, num_tokens: int, sliding_window: int | None) -> Tensor:
    """Whether query position t may attend key position s (broadcasting): s <= t, t - w < s, both < T."""
    ok = (key_pos <= query_pos) & (query_pos < num_tokens)
    if sliding_window is not None:
        ok = ok & (key_pos > query_pos - sliding_window)
    return ok
