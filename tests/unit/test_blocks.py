"""Block geometry against token-level brute force."""

import pytest

from sparsetrace.blocks import queries_per_row, row_key_range


@pytest.mark.parametrize("tokens,block_q,block_k,window", [(100, 16, 16, None), (100, 16, 8, 37), (67, 8, 32, 20),
                                                           (1, 64, 64, None), (130, 32, 16, 1)])
def test_row_key_range_is_the_span_of_visible_keys(tokens, block_q, block_k, window):
    first, last = row_key_range(tokens, block_q, block_k, window)
    for i in range(len(first)):
        keys = {s // block_k for t in range(i * block_q, min((i + 1) * block_q, tokens)) for s in range(t + 1)
                if window is None or s > t - window}
        assert (int(first[i]), int(last[i])) == (min(keys), max(keys))
    assert queries_per_row(tokens, block_q).sum() == tokens
