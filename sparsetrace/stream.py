"""Stream: pick, per head and query block, the k key blocks that matter, in O(T log T).

`select_blocks` runs the steps of `stream-spec.md` (after HiP attention, Lee et al. 2024), in this
file's order:

1. Plan (`_plan`). Query block i can see key blocks first(i) .. last(i) (`blocks.py`). The first
   `sinks` blocks and the last `local` blocks of that range are forced (always kept); the rest,
   lo(i) .. hi(i), is searched for the row's budget (k, or the k schedule's: `selection.py`).
2. Branches (`_initial_branches`). The searched range is split into budget contiguous branches of
   nearly equal width: the row's own range (`partition="row"`, every row then keeps min(k,
   available) blocks) or the whole key axis clipped by causality (`partition="global"`, the
   paper's Figure 1).
3. Search (`_Search.hierarchical`, `_search_round`, `_score_children`). Each round halves every
   kept branch, scores every child by its representative (the centre key block, or its middle
   token) against the block's queries, future keys masked, and keeps the best `beam` children
   (the budget in the last round; ties go to the lower index). After ceil(log2(widest branch))
   rounds every branch is a single key block.
   With `search="auto"` (default) a row with few candidates skips the search
   (`_Search.every_candidate`, `_rank_span`): it scores every candidate (one dense product over a
   contiguous key span, no gather) and keeps the best, cheaper there and exact for the score;
   `_DENSE_SCORE_SPEEDUP` sets where the search takes over.
4. Output (`selection.with_forced_blocks`): the kept blocks of each row with the forced ones,
   sorted, -1 padded. The "mass" k schedule then cuts the 2k candidates of every row to the fixed
   schedule's total per head, by their attention mass (`_cut_by_mass`); a coverage budget keeps
   as many of its k_max candidates as the row's estimated coverage needs (`coverage.py`).

Everything is batched over heads and query blocks; query blocks are processed in chunks of a
fixed size, so the working memory is bounded whatever T is, and no T x T tensor is ever built:
each round scores 2 x beam children of `block_k` keys per query block. Shapes are static and
the round count is fixed before the loop, so `torch.compile` can fuse a round (`kernels`).
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
from .coverage import keep_to_coverage
from .errors import InputError
from .kernels import compiled_version
from .selection import Selection, keep_largest_overall, row_budgets, searched_range, with_forced_blocks

# Score of a non-empty child none of whose keys the scoring queries can see: below any real
# score, above empty children (-inf), and finite when summed over a head group.
_UNSEEN = -1e30
# Gathered key and score elements per chunk of query blocks (16 MB fp32): bounds the working memory
# whatever T is, yet amortises the per-chunk overhead (chosen by timing on 2 CPU cores; see
# benchmarks/fast_paths for what a layer costs).
_CHUNK_ELEMENTS = 1 << 22
# How many times cheaper a block is to score when every candidate of a row is scored (one dense
# product, no gather) than inside the search: "auto" scores every candidate on rows with at most
# this many times the blocks the search would score. Chosen by timing; benchmarks/estimator_choice
# and benchmarks/estimator_scale measure the result.
_DENSE_SCORE_SPEEDUP = 2


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
    plan = _plan(tokens, config, sliding_window, q.device).from_row(first_row)  # steps 1-2
    search = _Search.of(q, k, config, plan, scaling=scaling, first_row=first_row,
                        sliding_window=sliding_window, compiled=compiled)

    n_q, max_budget = search.query_pos.shape[0], plan.start.shape[1]  # step 3
    selected = torch.full((batch, heads, n_q, max_budget), -1, dtype=torch.int64, device=q.device)
    score = torch.full((batch, heads, n_q, max_budget), float("nan"), device=q.device)
    log_total = search._no_total(n_q)
    all_rows = torch.arange(n_q, device=q.device)
    for rows, method in ((all_rows[~plan.score_all], search.hierarchical),
                         (all_rows[plan.score_all], search.every_candidate)):
        if len(rows):
            selected[:, :, rows], score[:, :, rows], total = method(rows)
            if log_total is not None:
                log_total[:, :, rows] = total
    n_k = num_blocks(tokens, config.block_k)
    kept = with_forced_blocks(selected, score, plan.first, plan.last, n_k, config)  # step 4
    if config.coverage is not None:
        key_blocks = search.keys if config.representative == "block" else split_blocks(k, config.block_k)
        return keep_to_coverage(kept, search.query_blocks, search.query_pos, key_blocks, log_total, plan.lo, plan.hi,
                                config, tokens=tokens, sliding_window=sliding_window)
    if config.k_schedule != "mass":
        return kept
    return _cut_by_mass(q, k, kept, plan, config, scaling=scaling, sliding_window=sliding_window)


# Steps 1-2: the plan.

@dataclass(frozen=True)
class _Plan:
    """Steps 1-2 for one layer: integer bookkeeping, done once before the search.

    first, last: int64 [n_q] each row's visible key blocks; lo, hi: int64 [n_q] its searched ones;
    budget: int64 [n_q] blocks each row selects (`row_budgets`); keep_beam: int64 [n_q] branches
    each row keeps in all rounds but the last, beam_width its maximum; start, width: int64
    [n_q, max budget] the initial branches; rounds: halvings until the widest branch of any row is
    a single block; causal_safe: no window and every searched key block ends before its row's
    first query, so scoring needs no mask; score_all: bool [n_q] rows that score every candidate
    instead of searching (`config.search`).
    """

    first: Tensor
    last: Tensor
    lo: Tensor
    hi: Tensor
    budget: Tensor
    keep_beam: Tensor
    beam_width: int
    start: Tensor
    width: Tensor
    rounds: int
    causal_safe: bool
    score_all: Tensor

    def from_row(self, row: int) -> _Plan:
        """The plan of rows `row` .. n_q - 1 (the same rounds and beam as the whole plan)."""
        if row == 0:
            return self
        per_row = ("first", "last", "lo", "hi", "budget", "keep_beam", "start", "width", "score_all")
        return dataclasses.replace(self, **{name: getattr(self, name)[row:] for name in per_row})


@torch.compiler.disable  # plain ints for static shapes; and clamp-then-floordiv trips inductor (torch 2.13)
def _plan(tokens: int, config: StreamConfig, sliding_window: int | None, device: torch.device) -> _Plan:
    first, last = row_key_range(tokens, config.block_q, config.block_k, sliding_window, device)
    lo, hi = searched_range(first, last, config)
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
        first=first, last=last, lo=lo, hi=hi, budget=budget, keep_beam=keep_beam, beam_width=beam_width,
        start=start, width=width, rounds=rounds,
        causal_safe=sliding_window is None and bool(searched_before.all()), score_all=score_all,
    )


def _initial_branches(
    lo: Tensor, hi: Tensor, n_k: int, config: StreamConfig, budget: Tensor
) -> tuple[Tensor, Tensor]:
    """budget[i] contiguous branches for row i over lo .. hi. Returns start, width: int64 [n_q, max budget]."""
    max_budget = max(int(budget.max()), 1) if budget.numel() else 1
    j = torch.arange(max_budget + 1, device=lo.device)
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


# Step 3: the search.

@dataclass(frozen=True)
class _Scoring:
    """What scoring a candidate needs besides the tensors (one object through every round).

    tokens: T; key_block: tokens per scored key block (1 when the representative is one token);
    masked: apply the token-level causal (and window) mask; False only when the caller knows every
    searched key is older than every scoring query of the chunk (no window, no padding rows).
    """

    config: StreamConfig
    tokens: int
    key_block: int
    sliding_window: int | None
    masked: bool


@dataclass(frozen=True)
class _Search:
    """Step 3 for a set of rows, in chunks of bounded memory, by one of two methods.

    query_blocks: [B, H, n_q, q', d] the scoring queries and query_pos int64 [n_q, q'] their
    positions; keys: [B, H_kv, n, key_block, d] key blocks (or single tokens, key_block = 1).
    Both methods return, for the rows `rows` (int64 [r]), the kept blocks int64 [B, H, r, m]
    (-1 = none), their scores [B, H, r, m], m = the largest row budget, and under a coverage budget
    each scoring query's log attention mass on all the row's candidates [B, H, r, q'] (exact for
    every_candidate, an estimate for hierarchical; -inf where nothing was estimated), else None.
    """

    query_blocks: Tensor
    query_pos: Tensor
    keys: Tensor
    plan: _Plan
    scoring: _Scoring
    compiled: bool

    @classmethod
    def of(cls, q: Tensor, k: Tensor, config: StreamConfig, plan: _Plan, *, scaling: float, first_row: int,
           sliding_window: int | None, compiled: bool) -> _Search:
        """The scoring queries (every `query_stride`-th of a block) and keys of q [B, H, T_q, d], k [B, H_kv, T, d]."""
        query_blocks = split_blocks(q, config.block_q)[:, :, :, :: config.query_stride]
        if config.score == "logsumexp":  # scale the few scoring queries once, not every score
            query_blocks = query_blocks * scaling
        query_pos = (
            torch.arange(first_row, first_row + query_blocks.shape[2], device=q.device)[:, None] * config.block_q
            + torch.arange(0, config.block_q, config.query_stride, device=q.device)[None, :]
        )
        if config.representative == "block":
            keys, key_block = split_blocks(k, config.block_k), config.block_k
        else:  # the middle token of the centre block: key "blocks" of one token
            keys, key_block = split_blocks(k, 1), 1
        scoring = _Scoring(config, k.shape[2], key_block, sliding_window, masked=not plan.causal_safe)
        return cls(query_blocks, query_pos, keys, plan, scoring, compiled)

    def _scoring_for(self, query_pos: Tensor) -> _Scoring:
        """The scoring of a chunk: masked also where padding rows (positions >= T) are in it."""
        if self.scoring.masked or not bool((query_pos >= self.scoring.tokens).any()):
            return self.scoring
        return dataclasses.replace(self.scoring, masked=True)

    def _no_total(self, rows: int) -> Tensor | None:
        """Under a coverage budget, a log mass of -inf for `rows` rows: [B, H, rows, q'] (nothing
        estimated beyond the kept blocks); None under a fixed budget, which estimates nothing."""
        if self.scoring.config.coverage is None:
            return None
        batch, heads, _, strided, _ = self.query_blocks.shape
        return torch.full((batch, heads, rows, strided), float("-inf"), device=self.query_blocks.device)

    def hierarchical(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The halving search: O(log n) rounds of 2 x beam children per row."""
        plan, tokens = self.plan, self.scoring.tokens
        batch, heads = self.query_blocks.shape[:2]
        per_row = batch * heads * 2 * plan.beam_width * self.scoring.key_block * (self.query_blocks.shape[-1]
                                                                                  + self.query_pos.shape[1])
        chunk = max(1, _CHUNK_ELEMENTS // per_row)
        padding = math.ceil(len(rows) / chunk) * chunk - len(rows)
        query_blocks = torch.nn.functional.pad(self.query_blocks[:, :, rows], (0, 0, 0, 0, 0, padding))
        # padding rows see nothing: empty branches, positions past the end
        query_pos = torch.cat([self.query_pos[rows], self.query_pos.new_full((padding, self.query_pos.shape[1]),
                                                                             tokens)])
        start, width, budget, keep_beam = (
            torch.cat([x[rows], x.new_zeros((padding, *x.shape[1:]))])
            for x in (plan.start, plan.width, plan.budget, plan.keep_beam)
        )
        search_round = compiled_version(_search_round) if self.compiled else _search_round
        max_budget = plan.start.shape[1]
        kept, totals = [], []
        for first in range(0, len(rows) + padding, chunk):
            window = slice(first, first + chunk)
            scoring = self._scoring_for(query_pos[window])
            # the strides of later rounds: one compiled graph for all rounds
            branch_start = start[window].expand(batch, heads, -1, -1).contiguous()
            branch_width = width[window].expand(batch, heads, -1, -1).contiguous()
            score = torch.full(branch_start.shape, float("nan"), device=branch_start.device)
            log_total = self._no_total(branch_start.shape[2])
            for r in range(plan.rounds):
                last_round = r == plan.rounds - 1
                branch_start, branch_width, score, round_total = search_round(
                    query_blocks[:, :, window], query_pos[window], branch_start, branch_width, self.keys, scoring,
                    keep=max_budget if last_round else plan.beam_width,
                    row_keep=budget[window] if last_round else keep_beam[window],  # per-row budgets (k_schedule)
                )
                if r == 0 and round_total is not None:  # the first round's children cover every candidate
                    log_total = round_total
            kept.append((branch_start, branch_width, score))
            totals.append(log_total)
        start, width, score = (torch.cat(x, dim=2)[:, :, : len(rows)] for x in zip(*kept, strict=True))
        log_total = _joined(totals)
        # width 0: a branch beyond the row's budget
        return (torch.where(width == 1, start, -1), torch.where(width == 1, score, float("nan")),
                None if log_total is None else log_total[:, :, : len(rows)])

    def every_candidate(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Score every candidate block of the rows and keep each row's best `budget`.

        The rows of a chunk see one contiguous span of key blocks, so their scores are one dense
        product of the chunk's scoring queries with the span's keys (no gather): cheaper than the
        search on rows with few candidates, and exact for the score (what the search approximates).
        """
        plan, scoring, config = self.plan, self.scoring, self.scoring.config
        batch, heads, _, strided, _ = self.query_blocks.shape
        max_budget = plan.start.shape[1]
        rank = compiled_version(_rank_span) if self.compiled else _rank_span
        widest = int((plan.hi[rows] - plan.lo[rows]).max()) + 1
        chunk = max(1, _CHUNK_ELEMENTS // (batch * heads * strided * max(widest, 1) * scoring.key_block))
        selected, scores, totals = [], [], []
        for chunk_rows in rows.split(chunk):
            lo, hi = plan.lo[chunk_rows], plan.hi[chunk_rows]
            first, last = int(lo.min()), int(hi.max())
            if last < first:  # no row of the chunk has a candidate
                selected.append(chunk_rows.new_full((batch, heads, len(chunk_rows), max_budget), -1))
                scores.append(torch.full((batch, heads, len(chunk_rows), max_budget), float("nan"),
                                         device=chunk_rows.device))
                totals.append(self._no_total(len(chunk_rows)))
                continue
            span = torch.arange(first, last + 1, device=chunk_rows.device)
            if config.representative == "block":
                keys = self.keys[:, :, first : last + 1]
                key_pos = span[:, None] * scoring.key_block + torch.arange(scoring.key_block, device=span.device)
            else:
                middle = span * config.block_k + (config.block_k - 1) // 2
                key_pos = torch.clamp(middle, max=scoring.tokens - 1)[:, None]
                keys = self.keys.index_select(2, key_pos[:, 0])
            query_pos = self.query_pos[chunk_rows]
            best, value, log_total = rank(self.query_blocks[:, :, chunk_rows], query_pos, keys, key_pos, span, lo,
                                          hi, plan.budget[chunk_rows], self._scoring_for(query_pos),
                                          max_budget=max_budget)
            selected.append(best)
            scores.append(value)
            totals.append(self._no_total(len(chunk_rows)) if log_total is None else log_total)
        return torch.cat(selected, dim=2), torch.cat(scores, dim=2), _joined(totals)


def _joined(totals: list[Tensor | None]) -> Tensor | None:
    """Chunks' log masses [B, H, c, q'] joined along the rows; None under a fixed budget (all None)."""
    return None if totals[0] is None else torch.cat(totals, dim=2)


def _search_round(
    query_blocks: Tensor,
    query_pos: Tensor,
    start: Tensor,
    width: Tensor,
    keys: Tensor,
    scoring: _Scoring,
    *,
    keep: int,
    row_keep: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One halving round for a chunk of c query blocks: split every branch in two, score the
    children, keep the best `keep` (row i: its best row_keep[i]).

    Args:
        query_blocks: [B, H, c, q', d] the scoring queries; query_pos: int64 [c, q'] their positions
            (>= T for padding rows).
        start, width: int64 [B, H, c, m'] the kept branches.
        keys: [B, H_kv, n, key_block, d] key blocks (or single tokens) to score against.
        keep: a static width; row_keep: int64 [c] each row's own number of branches to keep.
    Returns:
        start, width, score of the kept children: [B, H, c, keep], key order, widths 0 past row_keep;
        under a coverage budget also each scoring query's estimated log attention mass on all the
        children [B, H, c, q'] (`_log_branch_total`; the first round's covers every candidate), else None.
    """
    half = (width + 1) // 2
    child_start = torch.stack([start, start + half], dim=-1).flatten(-2)
    child_width = torch.stack([half, width - half], dim=-1).flatten(-2)
    child_score, per_query = _score_children(query_blocks, query_pos, child_start, child_width, keys, scoring)
    log_total = _log_branch_total(per_query, child_width, scoring) if scoring.config.coverage is not None else None
    keep = min(keep, child_score.shape[-1])
    best = torch.sort(child_score, dim=-1, descending=True, stable=True).indices[..., :keep]
    start, width, score = (x.gather(-1, best) for x in (child_start, child_width, child_score))
    width = torch.where(torch.arange(keep, device=width.device) < row_keep[:, None], width, 0)
    # back to key order, so that equal scores keep preferring the lower block index
    order = torch.where(width > 0, start, torch.iinfo(start.dtype).max).argsort(dim=-1, stable=True)
    start, width, score = (x.gather(-1, order) for x in (start, width, score))
    return start, width, score, log_total


def _log_branch_total(per_query: Tensor, child_width: Tensor, scoring: _Scoring) -> Tensor:
    """Each scoring query's log attention mass on all the children, estimated: a child of w blocks
    as w times its representative's ([B, H, c, q', C] and [B, H, c, C] -> [B, H, c, q'])."""
    blocks = child_width.clamp(min=1) * (scoring.config.block_k / scoring.key_block)  # token representatives
    estimate = (per_query + torch.log(blocks)[:, :, :, None, :]).masked_fill(child_width[:, :, :, None, :] == 0,
                                                                             float("-inf"))
    return estimate.logsumexp(dim=-1)


def _score_children(
    query_blocks: Tensor, query_pos: Tensor, child_start: Tensor, child_width: Tensor, keys: Tensor, scoring: _Scoring
) -> tuple[Tensor, Tensor]:
    """Score each child by its representative; arguments as `_search_round`, children [B, H, c, C].
    Returns the scores float32 [B, H, c, C] (empty children -inf) and their per-query reduction
    [B, H, c, q', C] (`_reduce_scores`)."""
    config, key_block = scoring.config, scoring.key_block
    centre = child_start + torch.clamp(child_width - 1, min=0) // 2
    if config.representative == "block":
        rep = torch.clamp(centre, max=keys.shape[2] - 1)
        key_pos = rep[..., None] * key_block + torch.arange(key_block, device=rep.device)
    else:
        rep = torch.clamp(centre * config.block_k + (config.block_k - 1) // 2, max=scoring.tokens - 1)
        key_pos = rep[..., None]
    rep_keys = gather_blocks(keys, rep, query_blocks.shape[1]).flatten(3, 4)  # [B, H, c, C * kb, d]
    raw = torch.matmul(query_blocks, rep_keys.transpose(-1, -2)).float()  # [B, H, c, q', C * kb]
    raw = raw.unflatten(-1, (child_start.shape[-1], key_block))  # [B, H, c, q', C, kb]
    if scoring.masked:
        seen = visible(query_pos[None, None, :, :, None, None], key_pos[:, :, :, None], scoring.tokens,
                       scoring.sliding_window)
        raw = raw.masked_fill(~seen, float("-inf"))
    score, per_query = _reduce_scores(raw, config, keys.shape[1])
    return torch.where(child_width > 0, score, float("-inf")), per_query


def _rank_span(
    query_blocks: Tensor,
    query_pos: Tensor,
    keys: Tensor,
    key_pos: Tensor,
    span: Tensor,
    lo: Tensor,
    hi: Tensor,
    budget: Tensor,
    scoring: _Scoring,
    *,
    max_budget: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Score every candidate of c rows against one contiguous span of n key blocks, keep each row's best.

    Args:
        query_blocks: [B, H, c, q', d] and query_pos int64 [c, q']: the rows' scoring queries.
        keys: [B, H_kv, n, kb, d] the span's key blocks (or representative tokens, kb = 1), at
            positions key_pos int64 [n, kb]; span: int64 [n] their block indices.
        lo, hi, budget: int64 [c] each row's searched blocks and how many it keeps.
        max_budget: the largest row budget (the width of the result).
    Returns:
        kept blocks int64 [B, H, c, max_budget] (-1 = none) and their scores (NaN = none); under a
        coverage budget also each scoring query's log attention mass on all the rows' candidates
        [B, H, c, q'], else None.
    """
    batch, heads, c, strided, dim = query_blocks.shape
    kv_heads = keys.shape[1]
    queries = query_blocks.reshape(batch, kv_heads, -1, dim)  # head h reads kv h // group
    raw = torch.matmul(queries, keys.flatten(2, 3).transpose(-1, -2)).float()
    raw = raw.view(batch, heads, c, strided, len(span), key_pos.shape[1])
    if scoring.masked:
        seen = visible(query_pos[:, :, None, None], key_pos, scoring.tokens, scoring.sliding_window)
        raw = raw.masked_fill(~seen, float("-inf"))
    score, per_query = _reduce_scores(raw, scoring.config, kv_heads)
    outside = (span < lo[:, None]) | (span > hi[:, None])
    score = score.masked_fill(outside, float("-inf"))
    log_total = None
    if scoring.config.coverage is not None:  # each scoring query's log attention mass on all candidates
        log_total = per_query.masked_fill(outside[:, None, :], float("-inf")).logsumexp(dim=-1)
    # max_budget more empty columns: a span narrower than max_budget needs no branch of its own
    score = torch.nn.functional.pad(score, (0, max_budget), value=float("-inf"))
    ranked = torch.sort(score, dim=-1, descending=True, stable=True)  # ties: the lower index first
    best, value = ranked.indices[..., :max_budget], ranked.values[..., :max_budget]
    valid = (value > float("-inf")) & (torch.arange(max_budget, device=span.device) < budget[:, None])
    return torch.where(valid, best + span[0], -1), torch.where(valid, value, float("nan")), log_total


def _reduce_scores(raw: Tensor, config: StreamConfig, kv_heads: int) -> tuple[Tensor, Tensor]:
    """One score per candidate from its q.k values `raw` [B, H, c, q', C, kb] (already scaled for
    "logsumexp"): float32 [B, H, c, C]; a candidate no scoring query can see gets `_UNSEEN`.
    Also the per-query reduction [B, H, c, q', C] (for "logsumexp": each scoring query's log
    attention mass on the candidate, unnormalised; -inf where it sees none of it), which coverage
    budgets read. Reduced over the contiguous key axis first, then over the queries: far faster
    than one reduction over two strided axes, and the same value."""
    per_query = raw.amax(dim=-1) if config.score == "max" else raw.logsumexp(dim=-1)
    score = per_query.amax(dim=3) if config.score == "max" else per_query.logsumexp(dim=3)
    score = torch.where(score == float("-inf"), _UNSEEN, score)  # non-empty but unseen by these queries
    if config.head_sharing == "kv_group":
        batch, heads, c, n = score.shape
        shared = score.view(batch, kv_heads, heads // kv_heads, c, n).sum(dim=2, keepdim=True)
        score = shared.expand(batch, kv_heads, heads // kv_heads, c, n).reshape(batch, heads, c, n)
    return score, per_query


# Step 4's "mass" schedule.

def _cut_by_mass(q: Tensor, k: Tensor, candidates: Selection, plan: _Plan, config: StreamConfig, *,
                 scaling: float, sliding_window: int | None) -> Selection:
    """The "mass" schedule: each candidate's share of its row's attention restricted to the
    candidates (one pass over the kept blocks), averaged over a KV group under "kv_group" sharing,
    then the fixed schedule's total per head to the largest (`selection.keep_largest_overall`)."""
    mass = kept_block_mass(q, k, candidates.indices, block_q=config.block_q, block_k=config.block_k,
                           scaling=scaling, sliding_window=sliding_window)
    if config.head_sharing == "kv_group":
        group = mass.unflatten(1, (k.shape[1], q.shape[1] // k.shape[1]))
        mass = group.mean(dim=2, keepdim=True).expand_as(group).flatten(1, 2)
    n_k = num_blocks(k.shape[2], config.block_k)
    return keep_largest_overall(candidates, mass, plan.first, plan.last, n_k, config)

