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
   With `search="auto"` (default) a row with few candidates skips the search: it scores every
   candidate (one dense product over a contiguous key span, no gather) and keeps the best, which
   is cheaper there and exact for the score; `_DENSE_SCORE_SPEEDUP` sets where the search takes over.
4. The result is the kept blocks of each row, sorted, -1 padded: `Selection.indices`.

Everything is batched over heads and query blocks; query blocks are processed in chunks of a
fixed size, so the working memory is bounded whatever T is, and no T x T tensor is ever built:
each round scores 2 x beam children of `block_k` keys per query block. Shapes are static and
the round count is fixed before the loop, so `torch.compile` can fuse it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .block_attention import kept_block_mass
from .blocks import gather_blocks, num_blocks, row_key_range, split_blocks, visible
from .config import StreamConfig
from .errors import InputError
from .kernels import compiled_version

# Score of a non-empty child none of whose keys the scoring queries can see: below any real
# score, above empty children (-inf), and finite when summed over a head group.
_UNSEEN = -1e30
# Gathered key and score elements per chunk of query blocks (16 MB fp32): amortises the per-chunk
# overhead yet stays small; measured fastest on 2 cores at 4k-8k tokens (4x smaller or larger is slower).
_CHUNK_ELEMENTS = 1 << 22
# How many times cheaper a block is to score when every candidate of a row is scored (one dense
# product, no gather) than inside the search. "auto" scores every candidate on rows with at most
# this many times the blocks the search would score. 2 gave the fastest estimator of 0, 0.5, 1,
# 1.5, 2, 3, 4, 6 and "every row" in a probe on 2 CPU cores at 16k and 32k tokens (32k: 1.3-1.4 s a
# layer, 1.5 within 5%, the others 1.6-2.1 s); benchmarks/estimator_choice and estimator_scale
# measure the result.
_DENSE_SCORE_SPEEDUP = 2


@dataclass(frozen=True)
class Selection:
    """Kept key blocks of one layer.

    Attributes:
        indices: int32 [B, H, n_q, sinks + k + local], ascending per row, -1 padded at the end.
        scores: float32, same shape: each selected block's score (the search's last round, or
            the score of every candidate on rows that score them all); NaN for forced blocks,
            padding, and searched rows whose branches were single blocks from the start.
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
    compiled: bool = False,
    first_row: int = 0,
) -> Selection:
    """Select the key blocks each query block of each head keeps.

    Args:
        q: [B, H, T_q, d] queries as the attention sees them (after RoPE and any q norm): every query
            (T_q = T), or those from query block `first_row` on (T_q = T - first_row * block_q).
        k: [B, H_kv, T, d] keys, likewise; H must be a multiple of H_kv (grouped-query).
        config: the estimator's settings.
        scaling: softmax scale (default d ** -0.5); only the "logsumexp" score uses it.
        sliding_window: the layer's window in tokens (None = full causal attention).
        compiled: run the hot per-chunk functions under `torch.compile` (`kernels`, the "compile"
            path); the same result.
        first_row: the query block of q's first query (decoding a suffix on a cache, `ablation`): rows
            before it are not selected; the others get what a whole pass gives them (fixed, log and
            linear schedules: a row's choice depends on its own queries and older keys only).
    Returns:
        the `Selection` of this layer (rows from `first_row` on).
    """
    batch, heads, queries, dim = q.shape
    tokens = k.shape[2]
    if (k.dim() != 4 or k.shape[0] != batch or queries != tokens - first_row * config.block_q or k.shape[3] != dim
            or heads % k.shape[1]):
        raise InputError(f"keys of shape {tuple(k.shape)} do not match queries {tuple(q.shape)}; "
                         "expected [B, H_kv, T, d] with H a multiple of H_kv")
    if first_row and config.k_schedule == "mass":
        raise InputError("k_schedule='mass' shares its budget over all query blocks; select every row (first_row=0)")
    scaling = dim**-0.5 if scaling is None else scaling
    device = q.device
    n_k = num_blocks(tokens, config.block_k)
    plan = _plan(tokens, config, sliding_window, device).from_row(first_row)

    query_blocks = split_blocks(q, config.block_q)[:, :, :, :: config.query_stride]
    if config.score == "logsumexp":  # scale the few scoring queries once, not every score
        query_blocks = query_blocks * scaling
    query_pos = (
        torch.arange(first_row, first_row + query_blocks.shape[2], device=device)[:, None] * config.block_q
        + torch.arange(0, config.block_q, config.query_stride, device=device)[None, :]
    )
    if config.representative == "block":
        keys, key_block = split_blocks(k, config.block_k), config.block_k
    else:  # the middle token of the centre block: key "blocks" of one token
        keys, key_block = split_blocks(k, 1), 1
    search = _Search(query_blocks, query_pos, keys, key_block, plan, config, tokens, sliding_window, compiled)

    n_q, most = query_pos.shape[0], plan.start.shape[1]
    selected = torch.full((batch, heads, n_q, most), -1, dtype=torch.int64, device=device)
    score = torch.full((batch, heads, n_q, most), float("nan"), device=device)
    rows = torch.arange(n_q, device=device)
    for part, run in ((rows[~plan.score_all], search.hierarchical), (rows[plan.score_all], search.every_candidate)):
        if len(part):
            selected[:, :, part], score[:, :, part] = run(part)
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
    and every searched key block ends before its row's first query, so scoring needs no mask;
    lo, hi: int64 [n_q] each row's searched key blocks; score_all: bool [n_q] rows that score
    every candidate instead of searching (`config.search`).
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
    lo: Tensor
    hi: Tensor
    score_all: Tensor

    def from_row(self, row: int) -> _Plan:
        """The plan of rows `row` .. n_q - 1 (the same rounds and beam as the whole plan)."""
        if row == 0:
            return self
        per_row = ("first", "last", "budget", "keep_beam", "start", "width", "lo", "hi", "score_all")
        return dataclasses.replace(self, **{name: getattr(self, name)[row:] for name in per_row})


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
    rounds = math.ceil(math.log2(widest)) if widest > 1 else 0
    beam_width = max(int(keep_beam.max()) if keep_beam.numel() else 1, 1)
    row_start = torch.arange(len(first), device=device) * config.block_q
    searched_before = ((hi + 1) * config.block_k <= row_start) | (hi < lo)
    candidates = torch.clamp(hi - lo + 1, min=0)
    if config.search == "auto":  # the blocks a row's search scores: 2 per branch, then 2 per beam branch
        scored = 2 * width.shape[1] + max(rounds - 1, 0) * 2 * beam_width if rounds else 0
        score_all = candidates <= _DENSE_SCORE_SPEEDUP * scored
    else:
        score_all = torch.full_like(candidates, config.search == "exhaustive", dtype=torch.bool)
    return _Plan(
        first=first, last=last, budget=budget, keep_beam=keep_beam, beam_width=beam_width,
        start=start, width=width, rounds=rounds,
        causal_safe=sliding_window is None and bool(searched_before.all()),
        lo=lo, hi=hi, score_all=score_all,
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


@dataclass(frozen=True)
class _Search:
    """Step 3 for a set of rows, in chunks of bounded memory, by one of two methods.

    query_blocks: [B, H, n_q, q', d] the scoring queries and query_pos int64 [n_q, q'] their
    positions; keys: [B, H_kv, n, key_block, d] key blocks (or single tokens, key_block = 1).
    Both methods return, for rows `part` (int64 [r]), the kept blocks int64 [B, H, r, m]
    (-1 = none) and their scores [B, H, r, m], m = the largest row budget.
    """

    query_blocks: Tensor
    query_pos: Tensor
    keys: Tensor
    key_block: int
    plan: _Plan
    config: StreamConfig
    tokens: int
    sliding_window: int | None
    compiled: bool

    def hierarchical(self, part: Tensor) -> tuple[Tensor, Tensor]:
        """The halving search: O(log n) rounds of 2 x beam children per row."""
        plan, config = self.plan, self.config
        batch, heads = self.query_blocks.shape[:2]
        per_row = batch * heads * 2 * plan.beam_width * self.key_block * (self.query_blocks.shape[-1]
                                                                          + self.query_pos.shape[1])
        chunk = max(1, _CHUNK_ELEMENTS // per_row)
        padding = math.ceil(len(part) / chunk) * chunk - len(part)
        query_blocks = torch.nn.functional.pad(self.query_blocks[:, :, part], (0, 0, 0, 0, 0, padding))
        # padding rows see nothing: empty branches, positions past the end
        query_pos = torch.cat([self.query_pos[part], self.query_pos.new_full((padding, self.query_pos.shape[1]),
                                                                             self.tokens)])
        start, width, budget, keep_beam = (
            torch.cat([x[part], x.new_zeros((padding, *x.shape[1:]))])
            for x in (plan.start, plan.width, plan.budget, plan.keep_beam)
        )
        found = []
        for rows in range(0, len(part) + padding, chunk):
            window = slice(rows, rows + chunk)
            found.append(_search_chunk(
                query_blocks[:, :, window],
                query_pos[window],
                start[window].expand(batch, heads, -1, -1).contiguous(),  # the strides of later rounds:
                width[window].expand(batch, heads, -1, -1).contiguous(),  # one compiled graph for all rounds
                self.keys,
                config,
                keep_final=budget[window],
                keep_beam=keep_beam[window],
                beam_width=plan.beam_width,
                rounds=plan.rounds,
                tokens=self.tokens,
                key_block=self.key_block,
                sliding_window=self.sliding_window,
                masked=not plan.causal_safe or bool((query_pos[window] >= self.tokens).any()),
                compiled=self.compiled,
            ))
        start, width, score = (torch.cat(x, dim=2)[:, :, : len(part)] for x in zip(*found, strict=True))
        # width 0: a branch beyond the row's budget
        return torch.where(width == 1, start, -1), torch.where(width == 1, score, float("nan"))

    def every_candidate(self, part: Tensor) -> tuple[Tensor, Tensor]:
        """Score every candidate block of the rows and keep each row's best `budget`.

        The rows of a chunk see one contiguous span of key blocks, so their scores are one dense
        product of the chunk's scoring queries with the span's keys (no gather): cheaper than the
        search on rows with few candidates, and exact for the score (what the search approximates).
        """
        plan, config = self.plan, self.config
        batch, heads, _, strided, _ = self.query_blocks.shape
        most = plan.start.shape[1]
        rank = compiled_version(_rank_span) if self.compiled else _rank_span
        widest = int((plan.hi[part] - plan.lo[part]).max()) + 1
        chunk = max(1, _CHUNK_ELEMENTS // (batch * heads * strided * max(widest, 1) * self.key_block))
        selected, scores = [], []
        for rows in part.split(chunk):
            lo, hi = plan.lo[rows], plan.hi[rows]
            first, last = int(lo.min()), int(hi.max())
            if last < first:  # no row of the chunk has a candidate
                selected.append(rows.new_full((batch, heads, len(rows), most), -1))
                scores.append(torch.full((batch, heads, len(rows), most), float("nan"), device=rows.device))
                continue
            span = torch.arange(first, last + 1, device=rows.device)
            if config.representative == "block":
                keys = self.keys[:, :, first : last + 1]
                key_pos = span[:, None] * self.key_block + torch.arange(self.key_block, device=rows.device)
            else:
                key_pos = torch.clamp(span * config.block_k + (config.block_k - 1) // 2, max=self.tokens - 1)[:, None]
                keys = self.keys.index_select(2, key_pos[:, 0])
            query_pos = self.query_pos[rows]
            best, value = rank(
                self.query_blocks[:, :, rows], query_pos, keys, key_pos, span, lo, hi, plan.budget[rows], config,
                most=most, tokens=self.tokens, sliding_window=self.sliding_window,
                masked=not plan.causal_safe or bool((query_pos >= self.tokens).any()),
            )
            selected.append(best)
            scores.append(value)
        return torch.cat(selected, dim=2), torch.cat(scores, dim=2)


def _rank_span(
    query_blocks: Tensor,
    query_pos: Tensor,
    keys: Tensor,
    key_pos: Tensor,
    span: Tensor,
    lo: Tensor,
    hi: Tensor,
    budget: Tensor,
    config: StreamConfig,
    *,
    most: int,
    tokens: int,
    sliding_window: int | None,
    masked: bool,
) -> tuple[Tensor, Tensor]:
    """Score every candidate of c rows against one contiguous span of n key blocks, keep each row's best.

    Args:
        query_blocks: [B, H, c, q', d] and query_pos int64 [c, q']: the rows' scoring queries.
        keys: [B, H_kv, n, kb, d] the span's key blocks (or representative tokens, kb = 1), at
            positions key_pos int64 [n, kb]; span: int64 [n] their block indices.
        lo, hi, budget: int64 [c] each row's searched blocks and how many it keeps.
        most: the largest row budget (the width of the result); masked: as `_score_children`.
    Returns:
        kept blocks int64 [B, H, c, most] (-1 = none) and their scores [B, H, c, most] (NaN = none).
    """
    batch, heads, c, strided, dim = query_blocks.shape
    kv_heads = keys.shape[1]
    queries = query_blocks.reshape(batch, kv_heads, -1, dim)  # head h reads kv h // group
    raw = torch.matmul(queries, keys.flatten(2, 3).transpose(-1, -2)).float()
    raw = raw.view(batch, heads, c, strided, len(span), key_pos.shape[1])
    if masked:
        seen = visible(query_pos[:, :, None, None], key_pos, tokens, sliding_window)
        raw = raw.masked_fill(~seen, float("-inf"))
    score = _reduce_scores(raw, config, kv_heads)
    outside = (span < lo[:, None]) | (span > hi[:, None])
    score = score.masked_fill(outside, float("-inf"))
    # `most` more empty columns: a span narrower than `most` needs no branch of its own
    score = torch.nn.functional.pad(score, (0, most), value=float("-inf"))
    ranked = torch.sort(score, dim=-1, descending=True, stable=True)  # ties: the lower index first
    best, value = ranked.indices[..., :most], ranked.values[..., :most]
    valid = (value > float("-inf")) & (torch.arange(most, device=span.device) < budget[:, None])
    return torch.where(valid, best + span[0], -1), torch.where(valid, value, float("nan"))


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
    sliding_window: int | None,
    masked: bool,
    compiled: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 3 for a chunk of c query blocks.

    Args:
        query_blocks: [B, H, c, q', d] the scoring queries (every `query_stride`-th).
        query_pos: int64 [c, q'] their positions (>= T for padding).
        start, width: int64 [B, H, c, m] the initial branches (m = the largest row budget).
        keys: [B, H_kv, n, key_block, d] key blocks (or single tokens) to score against.
        keep_final, keep_beam: int64 [c] branches each row keeps in the last round / the others;
            beam_width: the largest of keep_beam (a static shape).
        compiled: run each round compiled (`kernels`).
    Returns:
        start, width, score of the kept branches: [B, H, c, m], widths <= 1.
    """
    search_round = compiled_version(_search_round) if compiled else _search_round
    most = start.shape[-1]
    score = torch.full(start.shape, float("nan"), device=start.device)
    for r in range(rounds):
        last_round = r == rounds - 1
        start, width, score = search_round(
            query_blocks, query_pos, start, width, keys, config,
            keep=most if last_round else beam_width,
            row_keep=keep_final if last_round else keep_beam,  # per-row budgets (k_schedule)
            tokens=tokens, key_block=key_block, sliding_window=sliding_window, masked=masked,
        )
    return start, width, score


def _search_round(
    query_blocks: Tensor,
    query_pos: Tensor,
    start: Tensor,
    width: Tensor,
    keys: Tensor,
    config: StreamConfig,
    *,
    keep: int,
    row_keep: Tensor,
    tokens: int,
    key_block: int,
    sliding_window: int | None,
    masked: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One halving round: split every branch in two, score the children, keep the best `keep`
    (row i: its best row_keep[i]). Arguments as `_search_chunk`; start, width [B, H, c, m'].
    Returns start, width, score of the kept children: [B, H, c, keep]."""
    half = (width + 1) // 2
    child_start = torch.stack([start, start + half], dim=-1).flatten(-2)
    child_width = torch.stack([half, width - half], dim=-1).flatten(-2)
    child_score = _score_children(
        query_blocks, query_pos, child_start, child_width, keys, config,
        tokens=tokens, key_block=key_block, sliding_window=sliding_window, heads=query_blocks.shape[1],
        masked=masked,
    )
    keep = min(keep, child_score.shape[-1])
    best = torch.sort(child_score, dim=-1, descending=True, stable=True).indices[..., :keep]
    start, width, score = (x.gather(-1, best) for x in (child_start, child_width, child_score))
    width = torch.where(torch.arange(keep, device=width.device) < row_keep[:, None], width, 0)
    # back to key order, so that equal scores keep preferring the lower block index
    order = torch.where(width > 0, start, torch.iinfo(start.dtype).max).argsort(dim=-1, stable=True)
    return tuple(x.gather(-1, order) for x in (start, width, score))


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
    score = _reduce_scores(raw, config, keys.shape[1])
    return torch.where(child_width > 0, score, float("-inf"))


def _reduce_scores(raw: Tensor, config: StreamConfig, kv_heads: int) -> Tensor:
    """One score per candidate from its q.k values `raw` [B, H, c, q', C, kb] (already scaled for
    "logsumexp"): float32 [B, H, c, C]; a candidate no scoring query can see gets `_UNSEEN`.
    Reduced over the contiguous key axis first, then over the queries: far faster than one
    reduction over two strided axes, and the same value."""
    if config.score == "max":
        score = raw.amax(dim=-1).amax(dim=3)
    else:
        score = raw.logsumexp(dim=-1).logsumexp(dim=3)
    score = torch.where(score == float("-inf"), _UNSEEN, score)  # non-empty but unseen by these queries
    if config.head_sharing == "kv_group":
        batch, heads, c, n = score.shape
        shared = score.view(batch, kv_heads, heads // kv_heads, c, n).sum(dim=2, keepdim=True)
        score = shared.expand(batch, kv_heads, heads // kv_heads, c, n).reshape(batch, heads, c, n)
    return score


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
