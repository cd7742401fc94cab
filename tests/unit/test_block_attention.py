"""Block-sparse attention against plain dense softmax attention written in the test."""

import pytest
import torch
from reference import dense_attention, kept_token_mask

from sparsetrace.block_attention import block_sparse_attention
from sparsetrace.config import StreamConfig
from sparsetrace.stream import select_blocks

CASES = [
    # (config, sliding window, softcap)
    (StreamConfig(k=3, block_size=16), None, None),
    (StreamConfig(k=2, block_q=32, block_k=16), 50, None),
    (StreamConfig(k=3, block_q=16, block_k=32, sinks=0), None, 5.0),
    (StreamConfig(k=1, block_size=16, sinks=0, local=0), 70, None),
]


@pytest.mark.parametrize("cfg,window,softcap", CASES)
def test_equals_dense_attention_over_the_kept_blocks(cfg, window, softcap):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 203, 16), torch.randn(2, 2, 203, 16), torch.randn(2, 2, 203, 8)
    idx = select_blocks(q, k, cfg, sliding_window=window).indices
    out, mass = block_sparse_attention(
        q, k, v, idx, block_q=cfg.block_q, block_k=cfg.block_k, sliding_window=window, softcap=softcap
    )
    allowed = kept_token_mask(idx, 203, cfg.block_q, cfg.block_k)
    ref, probs = dense_attention(q, k, v, sliding_window=window, softcap=softcap, allowed=allowed)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # mass of kept block j in row i: mean over the row's queries of the probability on block j's keys
    n_q = idx.shape[2]
    for b, h, i in [(0, 0, 0), (1, 3, n_q // 2), (0, 2, n_q - 1)]:  # the last row is partial
        queries = probs[b, h, i * cfg.block_q : (i + 1) * cfg.block_q]
        for slot, j in enumerate(idx[b, h, i].tolist()):
            expected = queries[:, j * cfg.block_k : (j + 1) * cfg.block_k].sum(-1).mean() if j >= 0 else 0.0
            assert mass[b, h, i, slot].item() == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("window", [None, 40])
def test_full_k_equals_plain_causal_attention(window):
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 6, 150, 16), torch.randn(1, 3, 150, 16), torch.randn(1, 3, 150, 16)
    cfg = StreamConfig(k=20, block_size=16)
    idx = select_blocks(q, k, cfg, sliding_window=window).indices
    out, mass = block_sparse_attention(q, k, v, idx, block_q=16, block_k=16, sliding_window=window)
    ref, _ = dense_attention(q, k, v, sliding_window=window)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass[..., 0]))


def test_low_precision_inputs_keep_their_dtype():
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.bfloat16) for _ in range(3))
    idx = select_blocks(q, k, StreamConfig(k=2, block_size=16)).indices
    out, mass = block_sparse_attention(q, k, v, idx, block_q=16, block_k=16)
    ref, _ = dense_attention(q.float(), k.float(), v.float())
    assert out.dtype == torch.bfloat16 and mass.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_transposed_views_as_models_pass_them_give_the_same_result():
    """Models hand q, k, v over as [B, T, H, d] memory viewed as [B, H, T, d]; nothing may depend on it."""
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 150, 4, 16), torch.randn(1, 150, 2, 16), torch.randn(1, 150, 2, 8)
    cfg = StreamConfig(k=2, block_size=16)
    views = [x.transpose(1, 2) for x in (q, k, v)]
    copies = [x.contiguous() for x in views]
    assert not views[1].is_contiguous()
    from_view, from_copy = (select_blocks(x, y, cfg) for x, y, _ in (views, copies))
    assert torch.equal(from_view.indices, from_copy.indices)
    assert torch.equal(from_view.scores.nan_to_num(-7), from_copy.scores.nan_to_num(-7))
    out_view, mass_view = block_sparse_attention(*views, from_view.indices, block_q=16, block_k=16)
    out_copy, mass_copy = block_sparse_attention(*copies, from_view.indices, block_q=16, block_k=16)
    assert torch.equal(out_view, out_copy) and torch.equal(mass_view, mass_copy)
