"""Information flow through a trace: the layered block graph, and routes from one span to another.

Node (l, i) is the residual stream of block i after l attention layers (l = 0: the embeddings,
l = L: the last layer's output). Layer l's attention writes into (l + 1, i) what query block i
read from the kept key blocks j, so every kept (head, i, j) gives an edge (l, j) -> (l + 1, i);
its `weight` is the largest mass any head put on it, `heads` lists those heads and `mass` their
masses. The residual stream gives (l, i) -> (l + 1, i) (`residual=True`; weight 1, plus the
attention on the diagonal block when there is any). Block i is both query block i and key block
i, so the graph needs block_q == block_k.

A **route** from source blocks to target blocks is every edge that lies on some path from a
source at layer 0 to a target at layer L (tail reachable from the sources, head reaching the
targets). Read that way almost every later block is on the route, since blocks read each other;
so a route may also require each edge to carry a minimum flow of the sources' content (`route`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from ..errors import InputError
from ..notebook import facts_html, facts_repr
from ..trace import Trace

# Route edges carry at least this much of the needle's content by default (mass x content of the
# reading block's source): a direct read of the needle with 5% of a head's attention, or a relay
# through a block that read it with ~22% and is read with ~22%.
DEFAULT_THRESHOLD = 0.05


def flow_graph(trace: Trace, *, threshold: float = 0.0) -> nx.DiGraph:
    """The layered graph of a trace: nodes (layer, block) for layers 0..L; attention edges of
    weight >= `threshold` (the largest head mass) and every residual edge."""
    config = trace.config
    if config.block_q != config.block_k:
        raise InputError(f"flow graphs need equal query and key blocks (block_q={config.block_q}, "
                         f"block_k={config.block_k}); trace with --block-size only")
    n = trace.num_query_blocks
    graph = nx.DiGraph(layers=trace.num_layers, blocks=n, block_size=config.block_q, threshold=threshold)
    graph.add_nodes_from((layer, i) for layer in range(trace.num_layers + 1) for i in range(n))
    for layer in range(trace.num_layers):
        graph.add_edges_from((((layer, i), (layer + 1, i)) for i in range(n)), residual=True, weight=1.0,
                             heads=[], mass=[])
        indices, mass = (x.numpy() for x in trace.blocks(layer))
        head, row, slot = np.nonzero(indices >= 0)
        key, value = indices[head, row, slot], mass[head, row, slot]
        order = np.lexsort((head, key, row))  # group by (row, key), heads ascending
        head, row, key, value = head[order], row[order], key[order], value[order]
        starts = np.flatnonzero(np.r_[True, (row[1:] != row[:-1]) | (key[1:] != key[:-1])])
        for group in np.split(np.arange(len(row)), starts[1:]):
            i, j = int(row[group[0]]), int(key[group[0]])
            heads, masses = head[group].tolist(), [float(m) for m in value[group]]
            if max(masses) < threshold and i != j:
                continue
            if i == j:  # the residual edge also carries this attention
                graph.edges[(layer, j), (layer + 1, i)].update(heads=heads, mass=masses)
            else:
                graph.add_edge((layer, j), (layer + 1, i), residual=False, weight=max(masses), heads=heads,
                               mass=masses)
    return graph


@dataclass(frozen=True)
class Route:
    """Edges of the flow graph on some path from the sources to the targets.

    Attributes:
        graph: the route as a subgraph (edges with the flow graph's attributes).
        sources, targets: block indices at layer 0 and at layer L.
        connected: whether some path joins them through at least one attention edge (a block's own
            residual stream alone does not count).
    """

    graph: nx.DiGraph
    sources: list[int]
    targets: list[int]
    connected: bool

    def attention_edges(self) -> list[tuple[tuple[int, int], tuple[int, int], dict]]:
        """The route's attention edges (residual edges left out), largest flow first."""
        edges = [(u, v, d) for u, v, d in self.graph.edges(data=True) if not d["residual"]]
        return sorted(edges, key=lambda e: -e[2]["flow"])

    def _facts(self) -> dict[str, Any]:
        """The key numbers a notebook shows."""
        attention = len(self.attention_edges())
        return {"sources": self.sources, "targets": self.targets, "connected": self.connected,
                "attention_edges": attention, "residual_edges": self.graph.number_of_edges() - attention}

    def __repr__(self) -> str:
        return facts_repr("Route", self._facts())

    def _repr_html_(self) -> str:
        return facts_html("Route", self._facts(), note="blocks at layer 0 (sources) and after the last layer "
                          "(targets); edges on some path between them")


def route(graph: nx.DiGraph, sources: list[int], targets: list[int], *, min_flow: float = 0.0) -> Route:
    """Every edge on a path from (0, s) for s in `sources` to (L, t) for t in `targets` that carries
    at least `min_flow` of the sources' content.

    Content: c = 1 at the sources, and along an edge c(head) >= weight x c(tail) (residual weight
    1), the strongest chain from a source: an edge carries flow = weight x c(tail). With
    min_flow = 0 the route is every edge on any source-to-target path; above 0, edges between
    blocks that hold little of the sources' content drop out (haystack blocks reading each other).
    """
    layers, blocks = graph.graph["layers"], graph.graph["blocks"]
    for name, values in (("source", sources), ("target", targets)):
        if not values or any(not 0 <= b < blocks for b in values):
            raise InputError(f"{name} blocks {values} are empty or outside 0..{blocks - 1}")
    content = {(0, b): (1.0 if b in sources else 0.0) for b in range(blocks)}
    carrying = nx.DiGraph(**graph.graph)
    for layer in range(layers):
        for i in range(blocks):
            node = (layer + 1, i)
            content[node] = 0.0
            for tail, _, data in graph.in_edges(node, data=True):
                flow = data["weight"] * content[tail]
                content[node] = max(content[node], flow)
                if flow > 0 and flow >= min_flow:
                    carrying.add_edge(tail, node, **data, flow=flow)
    end = {(layers, t) for t in targets} & set(carrying)
    backward = set(end).union(*(nx.ancestors(carrying, t) for t in end))
    sub = carrying.subgraph(backward).copy()
    through_attention = any(not residual for _, _, residual in sub.edges(data="residual"))  # each edge is on a path
    return Route(sub, sorted(sources), sorted(targets), through_attention)


def reader_heads(trace: Trace, query_blocks: list[int], key_blocks: list[int]) -> np.ndarray:
    """float [L, H]: the kept mass `query_blocks` put on `key_blocks` (mean over those query blocks,
    summed over those key blocks), per layer and head: which heads read the needle from the answer."""
    out = np.zeros((trace.num_layers, trace.num_heads))
    wanted = np.array(sorted(set(key_blocks)))
    for layer in range(trace.num_layers):
        indices, mass = (x.numpy() for x in trace.blocks(layer))
        rows_i, rows_m = indices[:, query_blocks], mass[:, query_blocks]  # [H, q, K]
        out[layer] = (rows_m * np.isin(rows_i, wanted)).sum(-1).mean(-1)
    return out


def blocks_of(tokens: tuple[int, int], block: int) -> list[int]:
    """The blocks that hold tokens [start, end)."""
    start, end = tokens
    if end <= start:
        raise InputError(f"token span [{start}, {end}) is empty")
    return list(range(start // block, (end - 1) // block + 1))


@dataclass(frozen=True)
class NeedleRoute:
    """How the needle reaches the answer in one trace.

    Attributes:
        needle_blocks, answer_blocks: the blocks holding the needle's tokens and the positions that
            predict the answer.
        threshold: the smallest needle flow an edge of the route carries (`route`'s min_flow).
        route: the `Route` from the needle blocks (layer 0) to the answer blocks (layer L).
        readers: float [L, H] the kept mass the answer blocks put on the needle blocks, per head.
    """

    needle_blocks: list[int]
    answer_blocks: list[int]
    threshold: float
    route: Route
    readers: np.ndarray

    def to_dict(self) -> dict:
        edges = [{"from": list(u), "to": list(v), "weight": round(d["weight"], 5), "flow": round(d["flow"], 5),
                  "heads": d["heads"]}
                 for u, v, d in self.route.attention_edges()]
        return {
            "needle_blocks": self.needle_blocks,
            "answer_blocks": self.answer_blocks,
            "threshold": self.threshold,
            "connected": self.route.connected,
            "route_attention_edges": edges,
            "route_residual_edges": self.route.graph.number_of_edges() - len(edges),
            "answer_to_needle_mass": np.round(self.readers, 5).tolist(),
            "heads_reading_needle": {
                str(layer): [[h, round(float(self.readers[layer, h]), 5)] for h in np.flatnonzero(row > 0).tolist()]
                for layer, row in enumerate(self.readers) if (row > 0).any()
            },
        }

    def _facts(self) -> dict[str, Any]:
        """The key numbers a notebook shows; top readers: the 3 heads whose answer blocks put the most
        mass on the needle blocks, (layer, head, mass)."""
        top = np.argsort(-self.readers, axis=None, kind="stable")[:3]
        readers = [(int(layer), int(head), float(self.readers[layer, head]))
                   for layer, head in zip(*np.unravel_index(top, self.readers.shape), strict=True)]
        return {"needle_blocks": self.needle_blocks, "answer_blocks": self.answer_blocks,
                "threshold": self.threshold, "connected": self.route.connected,
                "attention_edges": len(self.route.attention_edges()), "top_readers": readers}

    def __repr__(self) -> str:
        return facts_repr("NeedleRoute", self._facts())

    def _repr_html_(self) -> str:
        return facts_html("NeedleRoute", self._facts(), note="top readers: (layer, head, mass the answer blocks put "
                          "on the needle blocks)")


def needle_route(
    trace: Trace,
    needle_tokens: tuple[int, int],
    answer_tokens: tuple[int, int] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> NeedleRoute:
    """The route from the needle's tokens [start, end) to the answer positions (default: the last
    token, which predicts the answer's first token), and which heads read the needle directly."""
    block = trace.config.block_q
    answer_tokens = answer_tokens or (trace.num_tokens - 1, trace.num_tokens)
    for name, (start, end) in (("needle", needle_tokens), ("answer", answer_tokens)):
        if not 0 <= start < end <= trace.num_tokens:
            raise InputError(f"{name} tokens [{start}, {end}) are outside this {trace.num_tokens}-token trace")
    needle, answer = blocks_of(needle_tokens, block), blocks_of(answer_tokens, block)
    found = route(flow_graph(trace), needle, answer, min_flow=threshold)
    return NeedleRoute(needle, answer, threshold, found, reader_heads(trace, answer, needle))
