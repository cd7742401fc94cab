"""Independent dense references for the tests: plain softmax attention, O(T^2), small inputs only."""

import torch


def dense_attention(q, k, v, *, scaling=None, sliding_window=None, softcap=None, allowed=None):
    """Causal softmax attention written out in full; returns (out [B,H,T,dv], probs [B,H,T,T]).

    `allowed` is an optional bool [B, H, T, T] mask of extra key restrictions (e.g. kept blocks).
    """
    heads, tokens = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1).double()
    v = v.repeat_interleave(group, dim=1).double()
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = q.double() @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    t = torch.arange(tokens)[:, None]
    s = torch.arange(tokens)[None, :]
    mask = s <= t
    if sliding_window is not None:
        mask = mask & (s > t - sliding_window)
    mask = mask.expand(scores.shape)
    if allowed is not None:
        mask = mask & allowed
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ v, probs


def kept_token_mask(indices, tokens, block_q, block_k):
    """bool [B, H, T, T]: key s is inside a kept block of query t's row (built with plain loops)."""
    batch, heads = indices.shape[:2]
    mask = torch.zeros(batch, heads, tokens, tokens, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(indices.shape[2]):
                for j in indices[b, h, i].tolist():
                    if j >= 0:
                        mask[b, h, i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k] = True
    return mask
