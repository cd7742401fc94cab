"""Stream: pick, per head and query block, the k key blocks that matter, in O(T log T).

The steps are those of `stream-spec.md` (after HiP attention, Lee et al. 2024):

1. Query block i can see key blocks first(i) .. last(i) (see `blocks.py`). The first
   `sinks` blocks and the last `local` blocks of that range are forced (always kept); the
   rest, lo(i) .. hi(i), is searched.
2. The searched range is split into k contiguous branches of nearly equal width: the row's
   own range (`partition="row"`, every row then keeps min(k, available) blocks) or the whole
   key axis clipped by causality (`partition="global"`, the paper's Figure 1).
3. Each round halves every kept branch, scores every child by its representative (the
   centre key block, or its middle token) against the block's queries, future keys masked,
   and keeps the best `beam` children (k in the last round; ties go to the lower index).
   After ceil(log2(widest branch)) rounds every branch is a single key block.
4. The result is the kept blocks of each row, sorted, -1 padded: `Selection.indices`.

Everything is batched over heads and query blocks; query blocks are processed in chunks of a
fixed size, so the working memory is bounded whatever T is, and no T x T tensor is ever built:
each round scores 2 x beam children of `block_k` keys per query block. Shapes are static and
the round count is fixed before the loop, so `torch.compile` can fuse it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .block_attention import kept_block_mass
from .blocks import gather_blocks, num_blocks, row_key_range, split_blocks, visible
from .config import StreamConfig
from .errors import InputError

# Score of a non-empty child none of whose keys the scoring queries can see: below any real
# score, above empty children (-inf), and finite when summed over a head group.
_UNSEEN = -1e30
# Gathered key and score elements per chunk of query blocks (16 MB fp32): amortises the per-chunk
# overhead yet stays small; measured fastest on 2 cores at 4k-8k tokens (4x smaller or larger is slower).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Selection:
    """Kept key blocks of one layer.

    Attributes:
        indices: int32 [B, H, n_q, sinks + k + local], ascending per row, -1 padded at the end.
        scores: float32, same shape: the last round's score of each selected block; NaN for
            forced blocks, padding, and rows that needed no search.
    """

    indices: Tensor
    scores: Tensor


def select_blocks(
    q: Tensor,
    k: Tensor,
    config: StreamConfig,
    *,
    scaling: float | None = None,
    sliding_window: int | None = None,
) -> Selection:
    """Select the key blocks each query block of each head keeps.

    Args:
        q: [B, H, T, d] queries as the attention sees them (after RoPE and any q norm).
        k: [B, H_kv, T, d] keys, likewise; H must be a multiple of H_kv (grouped-query).
        config: the estimator's settings.
        scaling: softmax scale (default d ** -0.5); only the "logsumexp" score uses it.
        sliding_window: the layer's window in tokens (None = full causal attention).
    Returns:
        the `Selection` of this layer.
    """
    batch, heads, tokens, dim = q.shape
    if k.dim() != 4 or k.shape[0] != batch or k.shape[2] != tokens or k.shape[3] != dim or heads % k.shape[1]:
        raise InputError(f"keys of shape {tuple(k.shape)} do not match queries {tuple(q.shape)}; "
                         "expected [B, H_kv, T, d] with H a multiple of H_kv")
    scaling = dim**-0.5 if scaling is None else scaling
    device = q.device
    n_k = num_blocks(tokens, config.block_k)
    plan = _plan(tokens, config, sliding_window, device)
    start, width, budget, keep_beam = plan.start, plan.width, plan.budget, plan.keep_beam

    query_blocks = split_blocks(q, config.block_q)[:, :, :, :: config.query_stride]
    query_pos = (
        torch.arange(query_blocks.shape[2], device=device)[:, None] * config.block_q
        + torch.arange(0, config.block_q, config.query_stride, device=device)[None, :]
    )
    if config.representative == "block":
        keys, key_block = split_blocks(k, config.block_k), config.block_k
    else:  # the middle token of the centre block: key "blocks" of one token
        keys, key_block = k.unsqueeze(3), 1

    most = start.shape[1]  # the largest row budget
    per_row = batch * heads * 2 * plan.beam_width * key_block * (dim + query_pos.shape[1])
    chunk = max(1, _CHUNK_ELEMENTS // per_row)
    n_q = query_pos.shape[0]
    padded = math.ceil(n_q / chunk) * chunk
    if padded > n_q:  # padding rows see nothing: empty branches, positions past the end
        query_blocks = torch.nn.functional.pad(query_blocks, (0, 0, 0, 0, 0, padded - n_q))
        query_pos = torch.cat([query_pos, query_pos.new_full((padded - n_q, query_pos.shape[1]), tokens)])
        start = torch.cat([start, start.new_zeros(padded - n_q, most)])
        width = torch.cat([width, width.new_zeros(padded - n_q, most)])
        budget = torch.cat([budget, budget.new_zeros(padded - n_q)])
        keep_beam = torch.cat([keep_beam, keep_beam.new_zeros(padded - n_q)])

    found_start, found_width, found_score = [], [], []
    for rows in range(0, padded, chunk):
        s, w, sc = _search_chunk(
            query_blocks[:, :, rows : rows + chunk],
            query_pos[rows : rows + chunk],
            start[rows : rows + chunk].expand(batch, heads, -1, -1),
            width[rows : rows + chunk].expand(batch, heads, -1, -1),
            keys,
            config,
            keep_final=budget[rows : rows + chunk],
            keep_beam=keep_beam[rows : rows + chunk],
            beam_width=plan.beam_width,
            rounds=plan.rounds,
            tokens=tokens,
            key_block=key_block,
            scaling=scaling,
            sliding_window=sliding_window,
            masked=not plan.causal_safe or (rows + chunk) * config.block_q > tokens,
        )
        found_start.append(s)
        found_width.append(w)
        found_score.append(sc)
    start = torch.cat(found_start, dim=2)[:, :, :n_q]
    width = torch.cat(found_width, dim=2)[:, :, :n_q]
    score = torch.cat(found_score, dim=2)[:, :, :n_q]
    selected = torch.where(width == 1, start, -1)
    score = torch.where(width == 1, score, float("nan"))  # padding: a branch beyond the row's budget
    found = with_forced_blocks(selected, score, plan.first, plan.last, n_k, config)
    if config.k_schedule != "mass":
        return found
    share = kept_block_mass(q, k, found.indices, block_q=config.block_q, block_k=config.block_k,
                            scaling=scaling, sliding_window=sliding_window)
    if config.head_sharing == "kv_group":
        group = share.unflatten(1, (k.shape[1], heads // k.shape[1]))
        share = group.mean(dim=2, keepdim=True).expand_as(group).flatten(1, 2)
    return keep_largest_overall(found, share, plan.first, plan.last, n_k, config)


@dataclass(frozen=True)
class _Plan:
    """Steps 1-2 for one layer: integer bookkeeping, done once before the search.

    first, last: int64 [n_q] each row's visible key blocks; budget: int64 [n_q] blocks each row
    selects (`row_budgets`); keep_beam: int64 [n_q] branches each row keeps in all rounds but the
    last, beam_width its maximum; start, width: int64 [n_q, max budget] the initial branches;
    rounds: halvings until the widest branch of any row is a single block; causal_safe: no window
    and every searched key block ends before its row's first query, so scoring needs no mask.
    """

    first: Tensor
    last: Tensor
    budget: Tensor
    keep_beam: Tensor
    beam_width: int
    start: Tensor
    width: Tensor
    rounds: int
    causal_safe: bool


@torch.compiler.disable  # plain ints for static shapes; and clamp-then-floordiv trips inductor (torch 2.13)
def _plan(tokens: int, config: StreamConfig, sliding_window: int | None, device: torch.device) -> _Plan:
    first, last = row_key_range(tokens, config.block_q, config.block_k, sliding_window, device)
    lo = torch.clamp(first, min=config.sinks)
    hi = last - config.local
    budget = row_budgets(tokens, config).to(device)
    searched_per_k = 2 if config.k_schedule == "mass" else 1  # "mass" searches 2k a row, with the same beam
    keep_beam = torch.clamp(budget * config.beam // (searched_per_k * config.k), min=budget)
    start, width = _initial_branches(lo, hi, num_blocks(tokens, config.block_k), config, budget)
    widest = int(width.max()) if width.numel() else 0
    row_start = torch.arange(len(first), device=device) * config.block_q
    searched_before = ((hi + 1) * config.block_k <= row_start) | (hi < lo)
    return _Plan(
        first=first, last=last, budget=budget, keep_beam=keep_beam,
        beam_width=max(int(keep_beam.max()) if keep_beam.numel() else 1, 1),
        start=start, width=width,
        rounds=math.ceil(math.log2(widest)) if widest > 1 else 0,
        causal_safe=sliding_window is None and bool(searched_before.all()),
    )


def _initial_branches(
    lo: Tensor, hi: Tensor, n_k: int, config: StreamConfig, budget: Tensor
) -> tuple[Tensor, Tensor]:
    """budget[i] contiguous branches for row i over lo .. hi. Returns start, width: int64 [n_q, max budget]."""
    most = max(int(budget.max()), 1) if budget.numel() else 1
    j = torch.arange(most + 1, device=lo.device)
    if config.partition == "row":
        n = torch.clamp(hi - lo + 1, min=0)[:, None]
        parts = torch.clamp(budget, min=1)[:, None]
        bounds = lo[:, None] + (torch.minimum(j[None, :], parts) * n) // parts
        width = torch.where(j[None, :-1] < budget[:, None], bounds[:, 1:] - bounds[:, :-1], 0)
        return bounds[:, :-1], width
    axis = max(n_k - config.sinks, 0)
    bounds = config.sinks + (j * axis) // config.k
    begin = torch.maximum(bounds[None, :-1], lo[:, None])
    end = torch.minimum(bounds[None, 1:], hi[:, None] + 1)
    return begin, torch.clamp(end - begin, min=0)


@torch.compiler.disable
def row_budgets(tokens: int, config: StreamConfig) -> Tensor:
    """Key blocks each query block may select, on top of its forced blocks: int64 [n_q].

    "fixed": k for every row (a row with fewer candidates keeps them all). "log" and "linear": the
    same total as "fixed", sum_i min(k, n_i) over rows with n_i causal candidates, redistributed in
    proportion to log2(1 + n_i) or to n_i (each row capped at n_i): later rows, which choose among
    more blocks, get more of the budget; "linear" keeps about the same fraction of every row.
    "mass": 2k, the candidates each row searches for; `keep_largest_overall` then cuts the total
    back to the fixed schedule's.
    Depends on T and the config only, so every layer (sliding or not) has the same budgets and
    the trace keeps one width, `kept_width`.
    """
    n_q = num_blocks(tokens, config.block_q)
    if config.k_schedule in ("fixed", "mass"):
        return torch.full((n_q,), config.k * (2 if config.k_schedule == "mass" else 1), dtype=torch.int64)
    _, last = row_key_range(tokens, config.block_q, config.block_k, None)
    candidates = torch.clamp(last - config.local - config.sinks + 1, min=0).double()
    total = float(torch.clamp(candidates, max=config.k).sum())
    weight = torch.log2(1 + candidates) if config.k_schedule == "log" else candidates

    def budgets(scale: float) -> Tensor:
        return torch.minimum(torch.floor(scale * weight + 0.5), candidates)

    low, high = 0.0, float(config.k) * n_q + 1
    for _ in range(60):  # the largest scale whose total stays within the fixed schedule's
        middle = (low + high) / 2
        low, high = (middle, high) if float(budgets(middle).sum()) <= total else (low, middle)
    return budgets(low).long()


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
    lo, hi = torch.clamp(first, min=config.sinks), last - config.local
    searched = (idx >= lo[:, None]) & (idx <= hi[:, None])  # not padding, not a sink or local block
    total = int(torch.clamp(hi - lo + 1, min=0, max=config.k).sum())  # the fixed schedule's budget
    flat = value.masked_fill(~searched, float("-inf")).flatten(2)
    best = flat.topk(min(total, flat.shape[-1]), dim=-1).indices
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, best, True).view_as(searched) & searched
    keep = chosen | (~searched & (idx >= 0))
    indices = torch.where(keep, idx, -1)
    order = torch.where(keep, idx, n_k).argsort(dim=-1, stable=True)
    scores = torch.where(chosen, candidates.scores, float("nan"))
    return Selection(indices.gather(-1, order).to(torch.int32), scores.gather(-1, order))


def kept_width(tokens: int, config: StreamConfig) -> int:
    """K, the last dimension of a selection: sinks + the largest row budget + local."""
    budget = row_budgets(tokens, config)
    return config.sinks + (int(budget.max()) if budget.numel() else config.k) + config.local


def _search_chunk(
    query_blocks: Tensor,
    query_pos: Tensor,
    start: Tensor,
    width: Tensor,
    keys: Tensor,
    config: StreamConfig,
    *,
    keep_final: Tensor,
    keep_beam: Tensor,
    beam_width: int,
    rounds: int,
    tokens: int,
    key_block: int,
    scaling: float,
    sliding_window: int | None,
    masked: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 3 for a chunk of c query blocks.

    Args:
        query_blocks: [B, H, c, q', d] the scoring queries (every `query_stride`-th).
        query_pos: int64 [c, q'] their positions (>= T for padding).
        start, width: int64 [B, H, c, m] the initial branches (m = the largest row budget).
        keys: [B, H_kv, n, key_block, d] key blocks (or single tokens) to score against.
        keep_final, keep_beam: int64 [c] branches each row keeps in the last round / the others;
            beam_width: the largest of keep_beam (a static shape).
    Returns:
        start, width, score of the kept branches: [B, H, c, m], widths <= 1.
    """
    heads = query_blocks.shape[1]
    most = start.shape[-1]
    score = torch.full(start.shape, float("nan"), device=start.device)
    for r in range(rounds):
        half = (width + 1) // 2
        child_start = torch.stack([start, start + half], dim=-1).flatten(-2)
        child_width = torch.stack([half, width - half], dim=-1).flatten(-2)
        child_score = _score_children(
            query_blocks, query_pos, child_start, child_width, keys, config,
            tokens=tokens, key_block=key_block, scaling=scaling, sliding_window=sliding_window, heads=heads,
            masked=masked,
        )
        last_round = r == rounds - 1
        keep = min(most if last_round else beam_width, child_score.shape[-1])
        best = torch.sort(child_score, dim=-1, descending=True, stable=True).indices[..., :keep]
        start, width, score = (x.gather(-1, best) for x in (child_start, child_width, child_score))
        row_keep = keep_final if last_round else keep_beam  # per-row budgets (k_schedule)
        width = torch.where(torch.arange(keep, device=width.device) < row_keep[:, None], width, 0)
        # back to key order, so that equal scores keep preferring the lower block index
        order = torch.where(width > 0, start, torch.iinfo(start.dtype).max).argsort(dim=-1, stable=True)
        start, width, score = (x.gather(-1, order) for x in (start, width, score))
    return start, width, score


def _score_children(
    query_blocks: Tensor,
    query_pos: Tensor,
    child_start: Tensor,
    child_width: Tensor,
    keys: Tensor,
    config: StreamConfig,
    *,
    tokens: int,
    key_block: int,
    scaling: float,
    sliding_window: int | None,
    heads: int,
    masked: bool,
) -> Tensor:
    """Score each child by its representative. Returns float32 [B, H, c, C]; empty children -inf.

    `masked=False` skips the token-level causal mask: the caller knows every searched key is
    older than every scoring query of the chunk (no window, no padding).
    """
    centre = child_start + torch.clamp(child_width - 1, min=0) // 2
    if config.representative == "block":
        rep = torch.clamp(centre, max=keys.shape[2] - 1)
        key_pos = rep[..., None] * key_block + torch.arange(key_block, device=rep.device)
    else:
        rep = torch.clamp(centre * config.block_k + (config.block_k - 1) // 2, max=tokens - 1)
        key_pos = rep[..., None]
    rep_keys = gather_blocks(keys, rep, heads).flatten(3, 4)  # [B, H, c, C * kb, d]
    raw = torch.matmul(query_blocks, rep_keys.transpose(-1, -2)).float()  # [B, H, c, q', C * kb]
    raw = raw.unflatten(-1, (child_start.shape[-1], key_block))  # [B, H, c, q', C, kb]
    if masked:
        seen = visible(query_pos[None, None, :, :, None, None], key_pos[:, :, :, None], tokens, sliding_window)
        raw = raw.masked_fill(~seen, float("-inf"))
    if config.score == "max":
        score = raw.amax(dim=(3, 5))
    else:
        score = (raw * scaling).logsumexp(dim=(3, 5))
    score = torch.where(score == float("-inf"), _UNSEEN, score)  # non-empty but unseen by these queries
    if config.head_sharing == "kv_group":
        batch, _, c, n = score.shape
        kv_heads = keys.shape[1]
        shared = score.view(batch, kv_heads, heads // kv_heads, c, n).sum(dim=2, keepdim=True)
        score = shared.expand(batch, kv_heads, heads // kv_heads, c, n).reshape(batch, heads, c, n)
    return torch.where(child_width > 0, score, float("-inf"))


def with_forced_blocks(
    selected: Tensor, score: Tensor, first: Tensor, last: Tensor, n_k: int, config: StreamConfig
) -> Selection:
    """Step 4: add sink and local blocks to the selected ones, sort each row, pad with -1.

    Args:
        selected: int [B, H, n_q, k] (-1 = none); score: float [B, H, n_q, k];
        first, last: int [n_q] each row's visible key blocks (`row_key_range`).
    """
    batch, heads, n_q, _ = selected.shape
    sinks = torch.arange(config.sinks, device=first.device).expand(n_q, -1)
    sinks = torch.where((sinks >= first[:, None]) & (sinks <= last[:, None]), sinks, -1)
    local = last[:, None] - config.local + 1 + torch.arange(config.local, device=first.device)
    local = torch.where(local >= torch.clamp(first, min=config.sinks)[:, None], local, -1)
    indices = torch.cat(
        [sinks.expand(batch, heads, -1, -1), selected, local.expand(batch, heads, -1, -1)], dim=-1
    )
    nan = torch.full((batch, heads, n_q, config.sinks + config.local), float("nan"), device=score.device)
    scores = torch.cat([nan[..., : config.sinks], score, nan[..., config.sinks :]], dim=-1)
    order = torch.where(indices >= 0, indices, n_k).argsort(dim=-1, stable=True)
    return Selection(indices.gather(-1, order).to(torch.int32), scores.gather(-1, order))
