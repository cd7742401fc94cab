"""Coverage budgets: each row keeps the fewest blocks whose estimated attention share reaches p."""

import math

import pytest
import torch
from reference import dense_attention, kept_token_mask

from sparsetrace.blocks import row_key_range
from sparsetrace.config import StreamConfig
from sparsetrace.errors import ConfigError
from sparsetrace.stream import select_blocks


def exact_recall(q, k, indices, cfg, window=None):
    """Each row's share of its dense attention (plain softmax) inside its kept blocks, averaged over
    the row's queries: float64 [B, H, n_q]."""
    tokens = q.shape[2]
    _, probs = dense_attention(q.double(), k.double(), torch.zeros_like(k).double(), sliding_window=window)
    inside = (probs * kept_token_mask(indices, tokens, cfg.block_q, cfg.block_k)).sum(-1)  # [B, H, T]
    n_q = math.ceil(tokens / cfg.block_q)
    return torch.stack([inside[:, :, i * cfg.block_q : (i + 1) * cfg.block_q].mean(-1) for i in range(n_q)], dim=-1)


def inputs(seed, tokens=160, heads=4, kv_heads=2, dim=8, scale=2.0):
    torch.manual_seed(seed)
    return torch.randn(1, heads, tokens, dim) * scale, torch.randn(1, kv_heads, tokens, dim) * scale


@pytest.mark.parametrize("window", [None, 70])
@pytest.mark.parametrize("search", ["auto", "hierarchical", "exhaustive"])
def test_full_coverage_keeps_every_visible_block(window, search):
    q, k = inputs(0)
    sel = select_blocks(q, k, StreamConfig(block_size=16, coverage=1.0, k_max=20, search=search),
                        sliding_window=window)
    first, last = row_key_range(160, 16, 16, window)
    for i in range(sel.indices.shape[2]):
        for h in range(4):
            kept = [j for j in sel.indices[0, h, i].tolist() if j >= 0]
            assert kept == list(range(int(first[i]), int(last[i]) + 1))
    torch.testing.assert_close(sel.coverage, torch.ones_like(sel.coverage))


@pytest.mark.parametrize("k_min", [0, 1, 3])
def test_tiny_coverage_keeps_k_min_blocks(k_min):
    q, k = inputs(1)
    cfg = StreamConfig(block_size=16, coverage=1e-9, k_min=k_min, k_max=6)
    sel = select_blocks(q, k, cfg)
    first, last = row_key_range(160, 16, 16, None)
    for i in range(sel.indices.shape[2]):
        candidates = max(int(last[i]) - 1 - max(int(first[i]), 1) + 1, 0)  # less the sink and the local block
        forced = len({0, int(last[i])})
        for h in range(4):
            kept = (sel.indices[0, h, i] >= 0).sum().item()
            assert kept == forced + min(k_min, candidates)


@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("seed", range(3))
def test_kept_counts_stay_within_bounds_and_the_window(window, seed):
    q, k = inputs(seed, tokens=300)
    cfg = StreamConfig(block_size=16, coverage=0.9, k_min=2, k_max=5)
    sel = select_blocks(q, k, cfg, sliding_window=window)
    assert sel.indices.shape[-1] == 1 + 5 + 1
    first, last = row_key_range(300, 16, 16, window)
    for i in range(sel.indices.shape[2]):
        lo, hi = max(int(first[i]), 1), int(last[i]) - 1
        for h in range(4):
            kept = [j for j in sel.indices[0, h, i].tolist() if j >= 0]
            searched = [j for j in kept if lo <= j <= hi]
            assert all(int(first[i]) <= j <= int(last[i]) for j in kept), "inside the row's window"
            assert min(2, hi - lo + 1) <= len(searched) <= min(5, max(hi - lo + 1, 0))


@pytest.mark.parametrize("seed", range(3))
def test_estimated_coverage_is_a_share_and_grows_with_p(seed):
    q, k = inputs(seed, tokens=400)
    previous_coverage, previous_kept = None, None
    for p in (0.05, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0):
        sel = select_blocks(q, k, StreamConfig(block_size=16, coverage=p, k_max=8))
        kept = (sel.indices >= 0).sum(-1)
        assert bool((sel.coverage >= 0).all()) and bool((sel.coverage <= 1).all())
        if previous_coverage is not None:
            assert bool((sel.coverage >= previous_coverage - 1e-6).all()), f"coverage fell at p = {p}"
            assert bool((kept >= previous_kept).all())
        previous_coverage, previous_kept = sel.coverage, kept


@pytest.mark.parametrize("window", [None, 60])
@pytest.mark.parametrize("p", [0.5, 0.9])
def test_estimate_equals_exact_recall_when_every_query_and_candidate_is_scored(window, p):
    """query_stride = 1 and rows that score every candidate: the estimate is no estimate."""
    q, k = inputs(3, tokens=200)
    cfg = StreamConfig(block_size=16, coverage=p, k_max=13, query_stride=1, search="exhaustive")
    sel = select_blocks(q.double(), k.double(), cfg, sliding_window=window)
    exact = exact_recall(q, k, sel.indices, cfg, window)
    torch.testing.assert_close(sel.coverage.double(), exact, atol=1e-5, rtol=0)
    assert bool((exact >= p - 1e-6).all()), "with enough candidates every row reaches p"


def test_rows_that_run_out_report_less_than_p():
    q, k = inputs(4, tokens=320, scale=0.3)  # flat attention: 2 blocks cannot hold 90%
    cfg = StreamConfig(block_size=16, coverage=0.9, k_max=2, query_stride=1, search="exhaustive")
    sel = select_blocks(q.double(), k.double(), cfg)
    exact = exact_recall(q, k, sel.indices, cfg)
    assert bool((sel.coverage[..., -1] < 0.9).all())
    torch.testing.assert_close(sel.coverage.double(), exact, atol=1e-5, rtol=0)


def test_kv_group_sharing_gives_one_mask_per_group():
    q, k = inputs(5, tokens=300, heads=6)
    idx = select_blocks(q, k, StreamConfig(block_size=16, coverage=0.8, head_sharing="kv_group")).indices
    assert torch.equal(idx[:, 0], idx[:, 1]) and torch.equal(idx[:, 0], idx[:, 2])
    assert torch.equal(idx[:, 3], idx[:, 5])


def test_compiled_equals_eager():
    q, k = inputs(6, tokens=300)
    cfg = StreamConfig(block_size=16, coverage=0.9, k_max=6)
    eager = select_blocks(q, k, cfg, sliding_window=120)
    compiled = select_blocks(q, k, cfg, sliding_window=120, compiled=True)
    assert torch.equal(eager.indices, compiled.indices)
    torch.testing.assert_close(eager.coverage, compiled.coverage)


def test_a_cached_prefix_gives_the_rows_a_whole_pass_gives():
    q, k = inputs(7, tokens=200)
    cfg = StreamConfig(block_size=16, coverage=0.9, k_max=6)
    whole = select_blocks(q, k, cfg)
    suffix = select_blocks(q[:, :, 5 * 16 :], k, cfg, first_row=5)
    assert torch.equal(whole.indices[:, :, 5:], suffix.indices)
    torch.testing.assert_close(whole.coverage[:, :, 5:], suffix.coverage)


@pytest.mark.parametrize(("settings", "message"), [
    ({"coverage": 0.0}, "0 < coverage <= 1"),
    ({"coverage": 1.5}, "0 < coverage <= 1"),
    ({"coverage": 0.9, "k_min": 5, "k_max": 3}, "use k_min <= k_max"),
    ({"k_max": 12}, "set coverage too"),
    ({"coverage": 0.9, "score": "max"}, "score='logsumexp'"),
    ({"coverage": 0.9, "k_schedule": "log"}, "k_schedule='fixed'"),
    ({"coverage": 0.9, "k_min": -1}, "k_min >= 0"),
])
def test_bad_values_name_the_fix(settings, message):
    with pytest.raises(ConfigError, match=message):
        StreamConfig(**settings)


def test_defaults_follow_k():
    cfg = StreamConfig(k=6, coverage=0.95)
    assert (cfg.k_min, cfg.k_max, cfg.searched_k) == (1, 24, 24)
    fixed = cfg.with_k(40)
    assert (fixed.k, fixed.coverage, fixed.k_min, fixed.k_max, fixed.searched_k) == (40, None, None, None, 40)
