"""The Stream estimator: against a plain per-row reimplementation, and its properties."""

import math

import pytest
import torch
from reference import dense_attention, kept_token_mask

from sparsetrace import stream
from sparsetrace.blocks import row_key_range
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError
from sparsetrace.selection import row_budgets
from sparsetrace.stream import select_blocks


def reference_select(q, k, cfg, window=None, scaling=None):
    """One row at a time, with Python lists: the algorithm of stream-spec.md written out."""
    batch, heads, tokens, dim = q.shape
    group = heads // k.shape[1]
    scaling = dim**-0.5 if scaling is None else scaling
    n_q, n_k = math.ceil(tokens / cfg.block_q), math.ceil(tokens / cfg.block_k)
    budgets = reference_budgets(tokens, cfg)
    out = torch.full((batch, heads, n_q, cfg.sinks + max(budgets) + cfg.local), -1, dtype=torch.int32)
    every_candidate_below = _every_candidate_below(tokens, cfg, window)
    for b in range(batch):
        for h in range(heads):
            for i in range(n_q):
                queries = list(range(i * cfg.block_q, min((i + 1) * cfg.block_q, tokens)))[:: cfg.query_stride]
                last = (min((i + 1) * cfg.block_q, tokens) - 1) // cfg.block_k
                first = 0 if window is None else max(0, i * cfg.block_q - window + 1) // cfg.block_k

                def score(block, b=b, h=h, queries=queries, first=first):
                    if cfg.representative == "block":
                        keys = range(block * cfg.block_k, min((block + 1) * cfg.block_k, tokens))
                    else:
                        keys = [min(block * cfg.block_k + (cfg.block_k - 1) // 2, tokens - 1)]
                    values = [
                        float(q[b, h, t] @ k[b, h // group, s])
                        for t in queries
                        for s in keys
                        if s <= t and (window is None or s > t - window)
                    ]
                    if not values:
                        return -1e30
                    if cfg.score == "max":
                        return max(values)
                    return float(torch.logsumexp(torch.tensor(values, dtype=torch.float64) * scaling, 0))

                lo, hi = max(first, cfg.sinks), last - cfg.local
                n = max(hi - lo + 1, 0)
                budget = int(budgets[i])
                beam = max(budget * cfg.beam // cfg.k, budget)
                if n <= every_candidate_below:  # score them all, keep the best (ties: lower index)
                    chosen = {j for _, j in sorted((-score(j), j) for j in range(lo, hi + 1))[:budget]}
                    chosen |= _forced(cfg, first, last)
                    out[b, h, i, : len(chosen)] = torch.tensor(sorted(chosen), dtype=torch.int32)
                    continue
                if cfg.partition == "row":
                    bounds = [lo + j * n // budget for j in range(budget + 1)] if budget else [lo]
                    branches = [(bounds[j], bounds[j + 1] - bounds[j]) for j in range(budget)]
                else:
                    axis = n_k - cfg.sinks
                    bounds = [cfg.sinks + j * axis // cfg.k for j in range(cfg.k + 1)]
                    branches = []
                    for j in range(cfg.k):
                        s, e = max(bounds[j], lo), min(bounds[j + 1], hi + 1)
                        branches.append((s, max(e - s, 0)))
                rounds_needed = max(
                    math.ceil(math.log2(w)) if w > 1 else 0
                    for w in [_widest(tokens, cfg, window)]
                )
                for r in range(rounds_needed):
                    children = []
                    for s, w in branches:
                        half = (w + 1) // 2
                        children += [(s, half), (s + half, w - half)]
                    scored = [
                        (-(score(s + (w - 1) // 2)) if w > 0 else math.inf, s if w > 0 else math.inf, s, w)
                        for s, w in children
                    ]
                    keep = budget if r == rounds_needed - 1 else beam
                    kept = sorted(scored)[:keep]
                    branches = sorted(((s, w) for _, _, s, w in kept), key=lambda x: (x[1] == 0, x[0]))
                chosen = {s for s, w in branches if w == 1} | _forced(cfg, first, last)
                row = sorted(chosen)
                out[b, h, i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return out


def reference_budgets(tokens, cfg):
    """Each row's budget by the k schedule's definition, found exactly: row i's budget under a scale s
    is min(floor(s w_i + 1/2), n_i), which steps up at s = (m - 1/2) / w_i for m = 1 .. n_i; the
    largest s whose total stays within sum_i min(k, n_i) lies just below the (total + 1)-th step."""
    n_q = math.ceil(tokens / cfg.block_q)
    if cfg.k_schedule in ("fixed", "mass"):
        return [cfg.k * (2 if cfg.k_schedule == "mass" else 1)] * n_q
    lasts = [(min((i + 1) * cfg.block_q, tokens) - 1) // cfg.block_k for i in range(n_q)]
    candidates = [max(last - cfg.local - cfg.sinks + 1, 0) for last in lasts]
    total = sum(min(cfg.k, n) for n in candidates)
    weights = [math.log2(1 + n) if cfg.k_schedule == "log" else n for n in candidates]
    steps = sorted((m - 0.5) / w for n, w in zip(candidates, weights, strict=True) for m in range(1, n + 1))
    cut = steps[total] if total < len(steps) else math.inf
    return [sum((m - 0.5) / w < cut for m in range(1, n + 1)) for n, w in zip(candidates, weights, strict=True)]


@pytest.mark.parametrize(("schedule", "expected"), [
    ("fixed", [2] * 10),
    ("mass", [4] * 10),
    # 10 rows with n = 0, 0, 1, ..., 8 candidates (1 sink, 1 local), fixed total 0 + 0 + 1 + 2 * 7 = 15;
    # linear: budgets round(s n) at s just below 7 / 16 (where n = 8 would reach 4)
    ("linear", [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]),
    # log: round(s log2(1 + n)) at s just below 5 / 6 (where n = 7 would reach 3)
    ("log", [0, 0, 1, 1, 2, 2, 2, 2, 2, 3]),
])
def test_row_budgets_by_hand(schedule, expected):
    cfg = StreamConfig(k=2, block_size=64, k_schedule=schedule)
    assert row_budgets(640, cfg).tolist() == expected
    assert reference_budgets(640, cfg) == expected


@pytest.mark.parametrize("tokens", [1, 100, 1000, 4096, 8192])
@pytest.mark.parametrize("cfg", [StreamConfig(k=8, k_schedule="log"), StreamConfig(k=3, k_schedule="linear"),
                                 StreamConfig(k=5, block_q=32, block_k=64, sinks=2, local=2, k_schedule="log")])
def test_row_budgets_match_the_exact_reference(tokens, cfg):
    assert row_budgets(tokens, cfg).tolist() == reference_budgets(tokens, cfg)


def _forced(cfg, first, last):
    """The sink and local blocks a row keeps whatever the search finds."""
    sinks = {j for j in range(cfg.sinks) if first <= j <= last}
    return sinks | {j for j in range(last - cfg.local + 1, last + 1) if j >= max(first, cfg.sinks)}


def _every_candidate_below(tokens, cfg, window):
    """Rows with at most this many candidates score them all (`search`): under "auto", the number
    of blocks the halving search scores per row (2 per initial branch, then 2 per beam branch)
    times how much cheaper a densely scored block is."""
    if cfg.search != "auto":
        return math.inf if cfg.search == "exhaustive" else -1
    widest = _widest(tokens, cfg, window)
    rounds = math.ceil(math.log2(widest)) if widest > 1 else 0
    budgets = reference_budgets(tokens, cfg)
    beam = max(max(b * cfg.beam // cfg.k, b) for b in budgets)
    return stream._DENSE_SCORE_SPEEDUP * (2 * max(budgets) + 2 * beam * (rounds - 1)) if rounds else 0


def _widest(tokens, cfg, window):
    """Widest initial branch over all rows (what fixes the round count)."""
    first, last = row_key_range(tokens, cfg.block_q, cfg.block_k, window)
    lo = torch.clamp(first, min=cfg.sinks)
    n = torch.clamp(last - cfg.local - lo + 1, min=0)
    if cfg.partition == "row":
        budget = torch.tensor(reference_budgets(tokens, cfg))
        return int(max((-(-n // budget.clamp(min=1))) * (budget > 0)).item()) if n.numel() else 0
    axis = math.ceil(tokens / cfg.block_k) - cfg.sinks
    widths = []
    bounds = [cfg.sinks + j * axis // cfg.k for j in range(cfg.k + 1)]
    for i in range(len(lo)):
        for j in range(cfg.k):
            widths.append(max(min(bounds[j + 1], int(last[i]) - cfg.local + 1) - max(bounds[j], int(lo[i])), 0))
    return max(widths)


CONFIGS = [
    StreamConfig(k=3, block_size=8),
    StreamConfig(k=3, block_size=8, score="max", beam=3, query_stride=1),  # the paper's estimator
    StreamConfig(k=2, block_size=8, sinks=0, local=0),
    StreamConfig(k=3, block_size=8, partition="global"),
    StreamConfig(k=2, block_q=16, block_k=8, query_stride=4, score="logsumexp", beam=5),
    StreamConfig(k=4, block_q=8, block_k=16, sinks=2, local=2, representative="token"),
    StreamConfig(k=1, block_size=8, sinks=0, local=1),
    StreamConfig(k=3, block_size=8, k_schedule="log"),
    StreamConfig(k=2, block_size=8, k_schedule="linear", beam=3, score="max", query_stride=2),
    StreamConfig(k=3, block_size=8, search="hierarchical"),
    StreamConfig(k=2, block_size=8, score="max", beam=3, query_stride=1, search="hierarchical"),
    StreamConfig(k=2, block_size=8, partition="global", search="hierarchical"),
    StreamConfig(k=3, block_size=8, search="exhaustive"),
    StreamConfig(k=2, block_q=8, block_k=16, representative="token", head_sharing="head", search="exhaustive"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("one_row_chunks", [False, True])
def test_matches_plain_reference(cfg, window, one_row_chunks, monkeypatch):
    if one_row_chunks:  # exercises the unmasked fast path on rows whose searched keys are all in the past
        monkeypatch.setattr(stream, "_CHUNK_ELEMENTS", 1)
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 101, 8, dtype=torch.float64), torch.randn(1, 2, 101, 8, dtype=torch.float64)
    got = select_blocks(q, k, cfg, sliding_window=window).indices
    assert torch.equal(got, reference_select(q, k, cfg, window))


def _rows(indices):
    for row in indices.reshape(-1, indices.shape[-1]).tolist():
        yield [j for j in row if j >= 0], row


@pytest.mark.parametrize("partition", ["row", "global"])
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 500])
def test_properties(partition, window, tokens):
    cfg = StreamConfig(k=4, block_size=16, sinks=1, local=1, partition=partition)
    torch.manual_seed(tokens)
    q, k = torch.randn(2, 6, tokens, 8), torch.randn(2, 3, tokens, 8)
    sel = select_blocks(q, k, cfg, sliding_window=window)
    n_q = math.ceil(tokens / 16)
    assert sel.indices.shape == (2, 6, n_q, 1 + 4 + 1) and sel.indices.dtype == torch.int32
    first, last = row_key_range(tokens, 16, 16, window)
    for b in range(2):
        for h in range(6):
            for i in range(n_q):
                row = sel.indices[b, h, i].tolist()
                kept = [j for j in row if j >= 0]
                assert row == kept + [-1] * (len(row) - len(kept)), "padding only at the end"
                assert kept == sorted(set(kept)), "ascending and distinct"
                lo, hi = int(first[i]), int(last[i])
                assert all(lo <= j <= hi for j in kept), "causal and inside the window"
                assert hi in kept, "the local block is always kept"
                if lo == 0:
                    assert 0 in kept, "the sink block is always kept when visible"
                searchable = max(hi - 1 - max(lo, 1) + 1, 0)
                forced = len({j for j in (0, hi) if lo <= j})
                assert len(kept) == forced + min(cfg.k, searchable), "exactly min(k, available) selected"


@pytest.mark.parametrize("schedule", ["fixed", "log", "mass"])
def test_full_k_keeps_every_visible_block(schedule):
    q, k = torch.randn(1, 2, 130, 8), torch.randn(1, 1, 130, 8)
    sel = select_blocks(q, k, StreamConfig(k=50, block_size=16, k_schedule=schedule), sliding_window=40)
    first, last = row_key_range(130, 16, 16, 40)
    for i in range(sel.indices.shape[2]):
        kept = [j for j in sel.indices[0, 0, i].tolist() if j >= 0]
        assert kept == list(range(int(first[i]), int(last[i]) + 1))


def test_ties_go_to_the_lower_index():
    q, k = torch.zeros(1, 1, 256, 4), torch.randn(1, 1, 256, 4)  # every score is 0
    sel = select_blocks(q, k, StreamConfig(k=3, block_size=16, sinks=0, local=0))
    assert sel.indices[0, 0, -1].tolist() == [0, 1, 2]


def test_kv_group_sharing_gives_one_mask_per_group():
    torch.manual_seed(0)
    q, k = torch.randn(1, 6, 200, 8), torch.randn(1, 2, 200, 8)
    idx = select_blocks(q, k, StreamConfig(k=2, block_size=16, head_sharing="kv_group")).indices
    assert torch.equal(idx[:, 0], idx[:, 1]) and torch.equal(idx[:, 0], idx[:, 2])
    assert torch.equal(idx[:, 3], idx[:, 5])
    assert not torch.equal(idx[:, 0], idx[:, 3])


def test_compiled_equals_eager():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16)
    cfg = StreamConfig(k=3, block_size=16, score="logsumexp", query_stride=2)
    eager = select_blocks(q, k, cfg, sliding_window=120)
    compiled = torch.compile(select_blocks)(q, k, cfg, sliding_window=120)
    assert torch.equal(eager.indices, compiled.indices)
    torch.testing.assert_close(eager.scores, compiled.scores, equal_nan=True)


def test_mismatched_shapes_are_refused():
    with pytest.raises(InputError, match="do not match"):
        select_blocks(torch.randn(1, 4, 10, 8), torch.randn(1, 3, 10, 8), StreamConfig())


@pytest.mark.parametrize("tokens", [1, 100, 1000, 4096, 8192])
@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("schedule", ["log", "linear"])
def test_variable_schedules_keep_the_total_and_favour_later_rows(tokens, k, schedule):
    fixed = row_budgets(tokens, StreamConfig(k=k))
    log = row_budgets(tokens, StreamConfig(k=k, k_schedule=schedule))
    _, last = row_key_range(tokens, 64, 64, None)
    candidates = torch.clamp(last - 1, min=0)  # minus the sink and the local block
    assert bool((log <= candidates).all()) and bool((fixed == k).all())
    fixed_total = int(torch.minimum(fixed, candidates).sum())
    assert fixed_total - len(log) // 2 - 1 <= int(log.sum()) <= fixed_total, "the same total, up to rounding"
    assert bool((log[1:] >= log[:-1]).all()), "rows with more candidates never get less"
    if tokens >= 4096 and k > 1:
        assert int(log[-1]) > k, "the last rows get more than k"


def reference_mass_schedule(q, k, cfg, window):
    """The "mass" schedule written out: 2k candidates a row (a fixed search), their mass under
    attention restricted to them (plain dense softmax), then the fixed total per head to the
    candidates of largest mass over all rows, by sorting a Python list."""
    tokens = q.shape[2]
    search = StreamConfig(k=2 * cfg.k, block_size=cfg.block_q, beam=max(cfg.beam, 2 * cfg.k),
                          query_stride=cfg.query_stride, head_sharing=cfg.head_sharing, search=cfg.search)
    candidates = select_blocks(q, k, search, sliding_window=window).indices
    allowed = kept_token_mask(candidates, tokens, cfg.block_q, cfg.block_k)
    _, probs = dense_attention(q, k, torch.zeros_like(k), sliding_window=window, allowed=allowed)
    first, last = row_key_range(tokens, cfg.block_q, cfg.block_k, window)
    searchable = [max(int(hi) - cfg.local - max(int(lo), cfg.sinks) + 1, 0) for lo, hi in zip(first, last, strict=True)]
    total = sum(min(cfg.k, n) for n in searchable)
    kept = set()
    for h in range(q.shape[1]):
        ranked = []
        for i in range(candidates.shape[2]):
            queries = slice(i * cfg.block_q, min((i + 1) * cfg.block_q, tokens))
            for j in candidates[0, h, i].tolist():
                forced = j < cfg.sinks or j > int(last[i]) - cfg.local
                if j >= 0 and forced:
                    kept.add((h, i, j))
                elif j >= 0:
                    keys = slice(j * cfg.block_k, (j + 1) * cfg.block_k)
                    ranked.append((-float(probs[0, h, queries, keys].sum(-1).mean()), i, j))
        kept |= {(h, i, j) for _, i, j in sorted(ranked)[:total]}
    return kept, total


@pytest.mark.parametrize("window", [None, 70])
@pytest.mark.parametrize("seed", range(3))
def test_mass_schedule_matches_plain_reference(window, seed):
    torch.manual_seed(seed)
    q, k = torch.randn(1, 4, 200, 8, dtype=torch.float64) * 2, torch.randn(1, 2, 200, 8, dtype=torch.float64)
    cfg = StreamConfig(k=2, block_size=16, k_schedule="mass")
    sel = select_blocks(q, k, cfg, sliding_window=window)
    got = {(h, i, j) for h in range(4) for i in range(sel.indices.shape[2]) for j in sel.indices[0, h, i].tolist()
           if j >= 0}
    expected, total = reference_mass_schedule(q, k, cfg, window)
    assert got == expected
    first, last = row_key_range(200, 16, 16, window)
    searched = (sel.indices >= torch.clamp(first, min=1)[:, None]) & (sel.indices < last[:, None])
    assert searched.sum(dim=(0, 2, 3)).tolist() == [total] * 4, "every head keeps the fixed schedule's total"
    assert int(searched.sum(-1).max()) > cfg.k, "some row keeps more than k"
    assert sel.indices.shape[-1] == 1 + 2 * cfg.k + 1


def test_mass_schedule_with_kv_group_sharing_gives_one_mask_per_group():
    torch.manual_seed(0)
    q, k = torch.randn(1, 6, 200, 8), torch.randn(1, 2, 200, 8)
    idx = select_blocks(q, k, StreamConfig(k=2, block_size=16, head_sharing="kv_group", k_schedule="mass")).indices
    assert torch.equal(idx[:, 0], idx[:, 1]) and torch.equal(idx[:, 0], idx[:, 2])
    assert torch.equal(idx[:, 3], idx[:, 5])


@pytest.mark.parametrize("window", [None, 770])
def test_auto_search_mixes_both_methods_and_matches_reference(window):
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 800, 8, dtype=torch.float64), torch.randn(1, 1, 800, 8, dtype=torch.float64)
    cfg = StreamConfig(k=2, block_size=8)
    score_all = stream._plan(800, cfg, window, "cpu").score_all
    assert bool(score_all.any()) and not bool(score_all.all()), "some rows score all candidates, others search"
    assert torch.equal(select_blocks(q, k, cfg, sliding_window=window).indices, reference_select(q, k, cfg, window))


def test_exhaustive_search_keeps_at_least_the_hierarchical_score():
    torch.manual_seed(4)
    q, k = torch.randn(1, 3, 2000, 16), torch.randn(1, 3, 2000, 16)
    exhaustive = select_blocks(q, k, StreamConfig(k=4, block_size=16, search="exhaustive")).scores
    searched = select_blocks(q, k, StreamConfig(k=4, block_size=16, search="hierarchical")).scores
    assert bool((exhaustive.nan_to_num(0).sum(-1) >= searched.nan_to_num(0).sum(-1) - 1e-4).all())
    assert bool((exhaustive.nan_to_num(0).sum(-1) > searched.nan_to_num(0).sum(-1) + 1e-4).any())


@pytest.mark.parametrize(("tokens", "scored", "widest_row", "all_rows"), [
    (4096, 80, 62, True), (8192, 112, 126, True), (22528, 176, 350, True), (32768, 176, 510, False),
])
def test_default_auto_search_scores_every_candidate_up_to_about_22k_tokens(tokens, scored, widest_row, all_rows):
    """The README's and estimator_choice's numbers: blocks the search scores a row, the most
    candidates a row has, and whether every row scores all of them (twice the search's count)."""
    plan = stream._plan(tokens, StreamConfig(), None, "cpu")
    assert 2 * plan.start.shape[1] + (plan.rounds - 1) * 2 * plan.beam_width == scored
    assert int((plan.hi - plan.lo + 1).max()) == widest_row
    assert bool(plan.score_all.all()) == all_rows
