"""Salience on hand-built traces: hand-computed values, sink/local separation, brute-force sums."""

import itertools
import json

import numpy as np
import pytest
import torch

from sparsetrace.analysis.salience import KINDS, salience, save_salience
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError
from sparsetrace.selection import kept_width
from sparsetrace.trace import Trace


def make_trace(rows: list[list[dict[int, float]]], config: StreamConfig, tokens: int, extra=None) -> Trace:
    """rows[layer][head * n_q + i] = {key block: mass} (the layer's rows, head-major)."""
    n_q = -(-tokens // config.block_q)
    heads = len(rows[0]) // n_q
    width = kept_width(tokens, config)
    indices, masses = [], []
    for layer_rows in rows:
        idx = torch.full((heads, n_q, width), -1, dtype=torch.int32)
        mass = torch.zeros(heads, n_q, width)
        for r, row in enumerate(layer_rows):
            h, i = divmod(r, n_q)
            for slot, j in enumerate(sorted(row)):
                idx[h, i, slot], mass[h, i, slot] = j, row[j]
        indices.append(idx)
        masses.append(mass)
    info = {"name": "hand", "architecture": "H", "num_layers": len(rows), "num_heads": heads, "num_kv_heads": 1,
            "head_dim": 4, "sliding_windows": [None] * len(rows)}
    return Trace(token_ids=torch.zeros(tokens, dtype=torch.int64), config=config, indices=indices, mass=masses,
                 model_info=info, extra=extra)


# 4 blocks of 4 tokens, sinks = 1, local = 1, k = 1: block 0 is the sink, block i the diagonal of row i.
HAND_CONFIG = StreamConfig(k=1, block_size=4, sinks=1, local=1)
HAND_ROWS = [[
    {0: 1.0}, {0: 0.6, 1: 0.4}, {0: 0.5, 1: 0.2, 2: 0.3}, {0: 0.3, 2: 0.5, 3: 0.2},  # head 0
    {0: 1.0}, {0: 0.5, 1: 0.5}, {0: 0.4, 1: 0.2, 2: 0.4}, {0: 0.1, 1: 0.7, 3: 0.2},  # head 1
]]


def test_hand_computed_values():
    result = salience(make_trace(HAND_ROWS, HAND_CONFIG, 16), min_readers=1)
    # selected: row 2 picks block 1, row 3 picks block 2 (head 0) or block 1 (head 1).
    assert result.total["selected"][0] == pytest.approx(np.array([[0, 0.2, 0.5, 0], [0, 0.9, 0, 0]]))
    # block 1 could be selected by rows 2 and 3, block 2 by row 3 only, blocks 0 and 3 by none.
    assert result.readers["selected"].tolist() == [0, 2, 1, 0]
    assert result.mean["selected"][0, :, 1:3] == pytest.approx(np.array([[0.1, 0.5], [0.45, 0.0]]))
    assert np.isnan(result.mean["selected"][0, :, [0, 3]]).all()
    assert result.aggregate()[1:3] == pytest.approx([0.275, 0.25])
    # the sink and the diagonal are reported apart
    assert result.total["sink"][0, :, 0] == pytest.approx([2.4, 2.0])
    assert result.readers["sink"].tolist() == [4, 0, 0, 0]
    assert result.total["local"][0, 0] == pytest.approx([0, 0.4, 0.3, 0.2])
    assert result.readers["local"].tolist() == [0, 1, 1, 1]
    assert [row["block"] for row in result.top] == [1, 2]
    assert result.top[0]["selected_mean"] == pytest.approx(0.275)
    assert [row["block"] for row in salience(make_trace(HAND_ROWS, HAND_CONFIG, 16), min_readers=2).top] == [1]


def test_units_take_their_blocks_share():
    trace = make_trace(HAND_ROWS, HAND_CONFIG, 16)
    result = salience(trace, units=[(4, 12), (6, 8), (0, 4)], min_readers=1)
    whole, half, sink = result.units
    totals = result.aggregate("selected", "total")
    assert whole["selected_total"] == pytest.approx(totals[1] + totals[2])
    assert whole["selected_mean"] == pytest.approx((0.275 + 0.25) / 2)  # 4 tokens in each block
    assert half["selected_total"] == pytest.approx(totals[1] / 2) and half["selected_mean"] == pytest.approx(0.275)
    assert sink["selected_mean"] is None and sink["sink_total"] == pytest.approx(2.2) and not sink["ranked"]
    assert [u["unit"] for u in result.top_units] == [1, 0]
    carried = salience(make_trace(HAND_ROWS, HAND_CONFIG, 16, extra={"units": [{"tokens": [6, 8]}]}), min_readers=1)
    assert carried.units[0]["selected_total"] == pytest.approx(half["selected_total"])


def random_trace(seed: int, block_q: int, block_k: int, sinks: int, local: int, tokens: int = 40) -> Trace:
    """Random causal kept sets (every forced block, each other block with probability 1/2), random masses."""
    rng = np.random.default_rng(seed)
    config = StreamConfig(k=tokens // block_k, block_q=block_q, block_k=block_k, sinks=sinks, local=local)
    n_q = -(-tokens // block_q)
    rows = []
    for _ in range(2):
        layer = []
        for _h, i in itertools.product(range(3), range(n_q)):
            last = (min((i + 1) * block_q, tokens) - 1) // block_k
            kept = [j for j in range(last + 1) if j < sinks or j > last - local or rng.random() < 0.5]
            layer.append(dict(zip(kept, rng.dirichlet(np.ones(len(kept))) * rng.uniform(0.5, 1), strict=True)))
        rows.append(layer)
    return make_trace(rows, config, tokens)


@pytest.mark.parametrize("seed,block_q,block_k,sinks,local", [(0, 4, 4, 1, 1), (1, 4, 4, 2, 2), (2, 8, 4, 1, 1),
                                                                (3, 4, 8, 0, 1), (4, 4, 4, 1, 0)])
def test_against_brute_force(seed, block_q, block_k, sinks, local):
    trace = random_trace(seed, block_q, block_k, sinks, local)
    result = salience(trace)
    expected = {kind: np.zeros_like(result.total["selected"]) for kind in KINDS}
    readers = {kind: np.zeros(trace.num_key_blocks, dtype=int) for kind in KINDS}
    for i in range(trace.num_query_blocks):
        last = (min((i + 1) * block_q, trace.num_tokens) - 1) // block_k
        for j in range(last + 1):
            readers["sink" if j < sinks else "local" if j > last - local else "selected"][j] += 1
    for layer in range(trace.num_layers):
        idx, mass = trace.blocks(layer)
        for h, i, slot in itertools.product(*(range(n) for n in idx.shape)):
            j = int(idx[h, i, slot])
            if j >= 0:
                last = (min((i + 1) * block_q, trace.num_tokens) - 1) // block_k
                kind = "sink" if j < sinks else "local" if j > last - local else "selected"
                expected[kind][layer, h, j] += float(mass[h, i, slot])
    for kind in KINDS:
        assert result.total[kind] == pytest.approx(expected[kind], abs=1e-6)
        assert result.readers[kind].tolist() == readers[kind].tolist()
    # every kept mass is counted exactly once
    row_sums = sum(float(trace.blocks(layer)[1].sum()) for layer in range(trace.num_layers))
    assert sum(result.total[kind].sum() for kind in KINDS) == pytest.approx(row_sums, rel=1e-6)
    score = result.aggregate()
    ranked = [row["block"] for row in result.top]
    assert all(result.readers["selected"][j] >= result.min_readers for j in ranked)
    assert [score[j] for j in ranked] == sorted((score[j] for j in ranked), reverse=True)
    eligible = [j for j in range(trace.num_key_blocks) if result.readers["selected"][j] >= result.min_readers]
    assert len(ranked) == min(len(eligible), 10)


def test_json_and_figures(tmp_path):
    result = salience(random_trace(0, 4, 4, 1, 1), units=[(0, 10), (10, 40)])
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert "mean over layers and heads" in data["aggregation"]
    assert len(data["blocks"]) == 10 and len(data["per_head_total"]["selected"]) == 2
    assert data["blocks"][0]["selected_mean"] is None  # the sink block is never selected
    paths = save_salience(result, tmp_path)
    assert all((tmp_path / name).stat().st_size > 0 for name in ("salience.json", "salience.png",
                                                                  "salience_layers.png"))
    assert set(paths) == {"json", "along_text", "layers"}


@pytest.mark.parametrize("kwargs,message", [({"top": 0}, "top=0"), ({"min_readers": 0}, "min_readers"),
                                            ({"units": [(5, 3)]}, "not a token span"),
                                            ({"units": [(0, 99)]}, "not a token span")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(InputError, match=message):
        salience(make_trace(HAND_ROWS, HAND_CONFIG, 16), **kwargs)
