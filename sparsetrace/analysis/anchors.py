"""Thought anchors (Bogdan et al. 2025): unit attention, vertical scores, receiver heads.

The defaults follow their code (github interp-reasoning/thought-anchors, `attn_funcs.py` and
`receiver_head_funcs.py`); where we differ it is said below, and `segments` says how our units and
token spans differ from theirs.

**Unit attention** A[l, h] [U, U], accumulated *during* the sparse forward pass by `UnitAttention`
(a probability reducer the tracer calls for every query chunk, so no T x T tensor and no second
pass): with p(t, s) the probability query token t gives key token s in layer l, head h (the
sparse model's own softmax, renormalised over the kept blocks),

    A[i, j] = (1 / (|i| |j|)) * sum over t in unit i, s in unit j of p(t, s)

the mean over the whole unit i x unit j block of the attention matrix, future (zero) entries
included: their `_compute_averaged_matrix` (`key_average="mean"`, the default).
`key_average="sum"` leaves out the 1 / |j|: the total probability unit i's tokens put on unit j.
Use it to ask which units receive the most attention in total when their lengths differ widely
(paragraphs, blocks): a long unit collects more, where the per-token mean lifts short ones. It is
not the paper's measure. Tokens in no unit are skipped as queries and as keys. With k covering
every key block the sparse forward is the dense one and A equals dense attention averaged the same
way. Memory O(L x H x U^2).

**Vertical score** of unit j in one head: the mean of column j over rows i >= j + proximity
(default 4, their receiver-head pipeline); NaN for the last `proximity` units. With
`control_depth` each row's entries j <= i - proximity are first replaced by their rank among
themselves divided by their count (their depth control).

**Receiver heads**: the `top` (default 20) heads with the largest Fisher kurtosis (scipy,
bias=True, NaNs omitted) of their vertical scores, the kurtosis averaged over traces. Layer 0 is
included by default, as in their `get_top_k_receiver_heads`, which picks the heads that score the
sentences (only their reliability script, `eval_receiver_head_reliability.py`, drops it);
`exclude_layer0=True` drops it. Where a head's kurtosis is undefined in some traces (constant
scores) we average the others; their `np.mean` would drop the head. A unit's **score** is its mean
vertical score over the receiver heads.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from ..blocks import num_blocks
from ..errors import InputError

DEFAULT_PROXIMITY = 4
DEFAULT_TOP_HEADS = 20
KEY_AVERAGES = ("mean", "sum")


class UnitAttention:
    """A probability reducer (`tracer.run_trace(on_probabilities=...)`): sums the sparse attention
    probabilities per (layer, head, query unit, key unit).

    Args:
        unit_of: int [T], the unit of every token (-1 = none), e.g. `segments.unit_of_tokens`.
        num_units: U.
        num_layers, num_heads: L, H of the model.
        block_q, block_k: the trace's block sizes.
    """

    def __init__(self, unit_of: Tensor, num_units: int, num_layers: int, num_heads: int, block_q: int,
                 block_k: int) -> None:
        tokens = unit_of.numel()
        self.num_units, self.block_q, self.block_k = num_units, block_q, block_k
        trash = num_units  # padding, and tokens in no unit
        owner = torch.where(unit_of >= 0, unit_of.long(), trash)
        self._query_unit = torch.full((num_blocks(tokens, block_q) * block_q,), trash, dtype=torch.long)
        self._query_unit[:tokens] = owner
        self._key_unit = torch.full((num_blocks(tokens, block_k) * block_k,), trash, dtype=torch.long)
        self._key_unit[:tokens] = owner
        self.tokens_per_unit = torch.bincount(owner, minlength=num_units + 1)[:num_units].double()
        self.sums = torch.zeros(num_layers, num_heads, (num_units + 1) ** 2, dtype=torch.float32)

    def __call__(self, layer: int, rows: int, probs: Tensor, indices: Tensor) -> None:
        """probs: float [1, H, c, block_q, K * block_k]; indices: int [1, H, c, K] (-1 = none)."""
        if probs.shape[0] != 1:
            raise InputError("unit attention traces one text at a time (batch size 1)")
        _, heads, c, bq, width = probs.shape
        size = self.num_units + 1
        probs, indices = probs[0].cpu(), indices[0].cpu()
        # 1. sum over the queries of each (query block, query unit): probs share their keys inside a block
        query_unit = self._query_unit[rows * bq : (rows + c) * bq]
        group_key = torch.arange(c).repeat_interleave(bq) * size + query_unit
        groups, inverse = torch.unique(group_key, return_inverse=True)
        summed = torch.zeros(heads, groups.numel(), width).index_add_(1, inverse, probs.reshape(heads, c * bq, width))
        # 2. scatter each (group, key token) onto (query unit, key unit)
        key_pos = (indices.clamp(min=0)[..., None] * self.block_k + torch.arange(self.block_k)).flatten(-2)
        key_unit = torch.where(indices.repeat_interleave(self.block_k, dim=-1) >= 0, self._key_unit[key_pos],
                               size - 1)  # [H, c, width]
        target = (groups % size)[None, :, None] * size + key_unit[:, groups // size]
        self.sums[layer].scatter_add_(1, target.reshape(heads, -1), summed.reshape(heads, -1))

    def matrix(self, key_average: str = "mean") -> np.ndarray:
        """float32 [L, H, U, U]: A as defined in the module docstring."""
        if key_average not in KEY_AVERAGES:
            raise InputError(f"key_average={key_average!r}; use 'mean' (per key token, as the thought-anchors "
                             "code) or 'sum' (total probability on unit j)")
        u = self.num_units
        total = self.sums.double().view(*self.sums.shape[:2], u + 1, u + 1)[:, :, :u, :u]
        count = self.tokens_per_unit.clamp(min=1)
        matrix = total / count[:, None]
        if key_average == "mean":
            matrix = matrix / count[None, :]
        return matrix.float().numpy()


def vertical_scores(matrix: np.ndarray, proximity: int = DEFAULT_PROXIMITY, control_depth: bool = False) -> np.ndarray:
    """Vertical score of every unit: float [..., U] from unit attention [..., U, U] (NaN where no row counts)."""
    if proximity < 1:
        raise InputError(f"proximity={proximity}; use at least 1 (rows i >= j + proximity count for unit j)")
    units = matrix.shape[-1]
    i, j = np.arange(units)[:, None], np.arange(units)[None, :]
    counted = (i - j) >= proximity  # [U, U]
    values = np.where(counted, matrix.astype(np.float64), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows / columns with nothing counted: NaN
        if control_depth:
            values = stats.rankdata(values, axis=-1, nan_policy="omit") / counted.sum(-1)[:, None]
        return np.nanmean(values, axis=-2)


def head_kurtosis(vertical: np.ndarray) -> np.ndarray:
    """Fisher kurtosis (bias=True, NaNs omitted) of each head's vertical scores: [L, H] from [L, H, U]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant scores: NaN
        result = stats.kurtosis(vertical, axis=-1, fisher=True, bias=True, nan_policy="omit")
    return np.ma.filled(np.ma.asarray(result, dtype=np.float64), np.nan)


def receiver_heads(kurtosis: np.ndarray | list[np.ndarray], top: int = DEFAULT_TOP_HEADS,
                   exclude_layer0: bool = False) -> list[tuple[int, int]]:
    """The `top` (layer, head) pairs of largest kurtosis, averaged over traces, largest first.

    Args:
        kurtosis: [L, H], or one [L, H] per trace (averaged, NaN-aware).
    """
    if top < 1:
        raise InputError(f"top heads = {top}; use at least 1 receiver head")
    table = mean_kurtosis(kurtosis) if isinstance(kurtosis, list) else np.asarray(kurtosis, dtype=np.float64)
    table = table.copy()
    if exclude_layer0:
        table[0] = np.nan
    flat = table.ravel()
    valid = np.flatnonzero(~np.isnan(flat))
    order = valid[np.argsort(-flat[valid], kind="stable")][:top]
    return [(int(x // table.shape[1]), int(x % table.shape[1])) for x in order]


def mean_kurtosis(tables: list[np.ndarray]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(tables), axis=0)


def unit_scores(vertical: np.ndarray, heads: list[tuple[int, int]]) -> np.ndarray:
    """float [U]: each unit's mean vertical score over `heads` (NaN for the last `proximity` units)."""
    if not heads:
        raise InputError("no receiver heads (every head's kurtosis is undefined); use more units or a longer text")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack([vertical[layer, head] for layer, head in heads]), axis=0)


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman correlation over the units where both are finite (None if fewer than 3)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return None
    return float(stats.spearmanr(a[ok], b[ok]).statistic)
