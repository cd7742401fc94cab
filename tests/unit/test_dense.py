"""Dense references: block mass against a brute-force softmax, oracle and recall properties."""

import math

import pytest
import torch
from reference import dense_attention

from sparsetrace import dense
from sparsetrace.blocks import row_key_range
from sparsetrace.config import StreamConfig
from sparsetrace.dense import dense_block_mass, oracle_selection, recall
from sparsetrace.stream import select_blocks


def brute_force_mass(probs, block_q, block_k):
    """[B, H, T, T] probabilities -> [B, H, n_q, n_k] with explicit loops over blocks."""
    tokens = probs.shape[-1]
    n_q, n_k = math.ceil(tokens / block_q), math.ceil(tokens / block_k)
    out = torch.zeros(*probs.shape[:2], n_q, n_k, dtype=torch.float64)
    for i in range(n_q):
        for j in range(n_k):
            rows = probs[:, :, i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k]
            out[:, :, i, j] = rows.sum(-1).mean(-1)
    return out


@pytest.mark.parametrize("block_q,block_k,window,softcap", [(16, 16, None, None), (16, 8, 37, None),
                                                            (8, 16, None, 4.0), (32, 32, 50, None)])
@pytest.mark.parametrize("small_steps", [False, True])
def test_block_mass_equals_brute_force(block_q, block_k, window, softcap, small_steps, monkeypatch):
    if small_steps:  # many query and key chunks
        monkeypatch.setattr(dense, "_STEP_ELEMENTS", 2000)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 123, 8), torch.randn(2, 2, 123, 8), torch.randn(2, 2, 123, 8)
    _, probs = dense_attention(q, k, v, sliding_window=window, softcap=softcap)
    got = dense_block_mass(q, k, block_q=block_q, block_k=block_k, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(got.double(), brute_force_mass(probs, block_q, block_k), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), atol=1e-5, rtol=0)


def test_full_k_recall_is_one():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 200, 8), torch.randn(1, 2, 200, 8)
    mass = dense_block_mass(q, k, block_q=16, block_k=16)
    idx = select_blocks(q, k, StreamConfig(k=20, block_size=16)).indices
    torch.testing.assert_close(recall(idx, mass), torch.ones(1, 4, 13))


@pytest.mark.parametrize("window", [None, 60])
@pytest.mark.parametrize("seed", range(4))
def test_oracle_recall_bounds_the_estimator_row_by_row(window, seed):
    torch.manual_seed(seed)
    q, k = torch.randn(1, 4, 333, 8) * 2, torch.randn(1, 2, 333, 8)
    cfg = StreamConfig(k=3, block_size=16, score="max", beam=3, query_stride=1)
    mass = dense_block_mass(q, k, block_q=16, block_k=16, sliding_window=window)
    estimated = recall(select_blocks(q, k, cfg, sliding_window=window).indices, mass)
    best = recall(oracle_selection(mass, cfg, 333, window).indices, mass)
    assert bool((best >= estimated - 1e-6).all())
    assert float(best.mean()) > float(estimated.mean()) - 1e-6


@pytest.mark.parametrize("window", [None, 60])
@pytest.mark.parametrize("seed", range(3))
def test_mass_schedule_oracle_bounds_the_estimator_per_head(window, seed):
    """The oracle of the "mass" schedule (same per-head total, same 2k cap a row) keeps at least
    the estimator's total recall, head by head (not row by row: the total moves between rows)."""
    torch.manual_seed(seed)
    q, k = torch.randn(1, 4, 333, 8) * 2, torch.randn(1, 2, 333, 8)
    cfg = StreamConfig(k=3, block_size=16, k_schedule="mass")
    mass = dense_block_mass(q, k, block_q=16, block_k=16, sliding_window=window)
    estimated = recall(select_blocks(q, k, cfg, sliding_window=window).indices, mass).sum(-1)
    best_selection = oracle_selection(mass, cfg, 333, window)
    assert bool((recall(best_selection.indices, mass).sum(-1) >= estimated - 1e-5).all())
    fixed_best = recall(oracle_selection(mass, StreamConfig(k=3, block_size=16), 333, window).indices, mass)
    assert bool((recall(best_selection.indices, mass).sum(-1) >= fixed_best.sum(-1) - 1e-5).all()), \
        "moving the budget between rows never loses (the fixed oracle is one allocation)"


def test_oracle_keeps_forced_blocks_and_the_true_top_k():
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 160, 8), torch.randn(1, 1, 160, 8)
    cfg = StreamConfig(k=2, block_size=16)
    mass = dense_block_mass(q, k, block_q=16, block_k=16)
    idx = oracle_selection(mass, cfg, 160).indices
    first, last = row_key_range(160, 16, 16, None)
    for h in range(2):
        for i in range(10):
            kept = [j for j in idx[0, h, i].tolist() if j >= 0]
            searchable = list(range(1, i))
            top = sorted(searchable, key=lambda j: -float(mass[0, h, i, j]))[:2]
            assert kept == sorted({0, i} | set(top))
