"""Flow graphs and routes on hand-built traces, against brute-force path enumeration."""

import itertools

import networkx as nx
import numpy as np
import pytest
import torch

from sparsetrace.analysis.routes import blocks_of, flow_graph, needle_route, reader_heads, route
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError
from sparsetrace.trace import Trace

BLOCK, N_BLOCKS, LAYERS, HEADS = 4, 5, 3, 2


def hand_built_trace(seed: int, keep: float = 0.5, token_ids: torch.Tensor | None = None) -> Trace:
    """Random causal selections (each earlier block kept with probability `keep`, the diagonal always)
    with random masses summing to 1 per row; N_BLOCKS blocks of zeros unless `token_ids` are given."""
    if token_ids is None:
        token_ids = torch.zeros(N_BLOCKS * BLOCK, dtype=torch.int64)
    rng = np.random.default_rng(seed)
    n = -(-len(token_ids) // BLOCK)
    config = StreamConfig(k=n, block_size=BLOCK, sinks=0, local=1)
    indices, masses = [], []
    for _ in range(LAYERS):
        idx = torch.full((HEADS, n, n + 1), -1, dtype=torch.int32)
        mass = torch.zeros(HEADS, n, n + 1)
        for h, i in itertools.product(range(HEADS), range(n)):
            kept = [j for j in range(i) if rng.random() < keep] + [i]
            idx[h, i, : len(kept)] = torch.tensor(kept, dtype=torch.int32)
            mass[h, i, : len(kept)] = torch.from_numpy(rng.dirichlet(np.ones(len(kept)))).float()
        indices.append(idx)
        masses.append(mass)
    info = {"name": "hand", "architecture": "H", "num_layers": LAYERS, "num_heads": HEADS, "num_kv_heads": 1,
            "head_dim": 4, "sliding_windows": [None] * LAYERS}
    return Trace(token_ids=token_ids, config=config, indices=indices, mass=masses, model_info=info)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_flow_graph_has_exactly_the_kept_blocks(seed, threshold):
    trace = hand_built_trace(seed)
    graph = flow_graph(trace, threshold=threshold)
    expected = {}
    for layer in range(LAYERS):
        idx, mass = trace.blocks(layer)
        for h, i, slot in itertools.product(range(HEADS), range(N_BLOCKS), range(idx.shape[-1])):
            j = int(idx[h, i, slot])
            if j >= 0:
                edge = ((layer, j), (layer + 1, i))
                expected[edge] = max(expected.get(edge, 0.0), float(mass[h, i, slot]))
    attention = {(u, v): d["weight"] for u, v, d in graph.edges(data=True) if not d["residual"]}
    assert attention == pytest.approx({e: w for e, w in expected.items() if e[0][1] != e[1][1] and w >= threshold})
    residual = {(u, v) for u, v, d in graph.edges(data=True) if d["residual"]}
    assert residual == {((layer, i), (layer + 1, i)) for layer in range(LAYERS) for i in range(N_BLOCKS)}
    assert graph.number_of_nodes() == (LAYERS + 1) * N_BLOCKS


@pytest.mark.parametrize("seed", range(6))
def test_route_is_every_edge_on_a_source_to_target_path(seed):
    trace = hand_built_trace(seed)
    graph = flow_graph(trace)
    sources, targets = [1], [3, 4]
    found = route(graph, sources, targets)
    on_paths = set()
    for s, t in itertools.product(sources, targets):
        for path in nx.all_simple_paths(graph, (0, s), (LAYERS, t)):
            on_paths |= set(zip(path, path[1:], strict=False))
    assert set(found.graph.edges) == on_paths
    assert found.connected == any(not graph.edges[e]["residual"] for e in on_paths)


@pytest.mark.parametrize("seed", range(6))
def test_min_flow_keeps_the_edges_that_carry_the_source(seed):
    trace = hand_built_trace(seed, keep=0.7)
    graph = flow_graph(trace)
    sources, targets, min_flow = [0, 1], [4], 0.15
    content = {}  # brute force: the best product of weights over every path from a source
    for node in graph.nodes:
        best = 0.0
        for s in sources:
            for path in nx.all_simple_paths(graph, (0, s), node) if node != (0, s) else [[node]]:
                best = max(best, float(np.prod([graph.edges[e]["weight"] for e in zip(path, path[1:], strict=False)])))
        content[node] = best
    carrying = nx.DiGraph([(u, v) for u, v, d in graph.edges(data=True) if d["weight"] * content[u] >= min_flow > 0
                           or (d["weight"] * content[u] > 0 and min_flow == 0)])
    expected = {(u, v) for u, v in carrying.edges
                if any(v == (LAYERS, t) or (v in carrying and (LAYERS, t) in carrying
                                            and nx.has_path(carrying, v, (LAYERS, t))) for t in targets)}
    found = route(graph, sources, targets, min_flow=min_flow)
    assert set(found.graph.edges) == expected
    for u, v, flow in found.graph.edges(data="flow"):
        assert flow == pytest.approx(graph.edges[u, v]["weight"] * content[u])


def test_a_block_nobody_reads_has_no_route():
    trace = hand_built_trace(0, keep=0.0)  # every row keeps only its own block
    found = route(flow_graph(trace), [1], [4])
    assert found.graph.number_of_edges() == 0 and not found.connected
    assert not route(flow_graph(trace), [2], [2]).connected, "a block's own residual stream is no route"


def test_reader_heads_and_needle_route():
    trace = hand_built_trace(5, keep=1.0)
    readers = reader_heads(trace, [4], [1, 2])
    for layer, h in itertools.product(range(LAYERS), range(HEADS)):
        idx, mass = trace.blocks(layer)
        expected = sum(float(m) for j, m in zip(idx[h, 4].tolist(), mass[h, 4], strict=True) if j in (1, 2))
        assert readers[layer, h] == pytest.approx(expected)
    result = needle_route(trace, (5, 11), threshold=0.0)  # tokens 5..10: blocks 1 and 2; answer: the last token
    assert result.needle_blocks == [1, 2] and result.answer_blocks == [4] and result.route.connected
    assert np.allclose(result.to_dict()["answer_to_needle_mass"], readers, atol=1e-5)
    with pytest.raises(InputError, match="outside this 20-token trace"):
        needle_route(trace, (15, 30))
    assert blocks_of((3, 9), 4) == [0, 1, 2]
