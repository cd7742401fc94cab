"""Information flow between any two spans of a trace: the routes graph, exported for other tools.

`flow` maps both spans to blocks (`spans.parse_span`, `routes.blocks_of`) and takes the route
of `routes.flow_graph` from the source blocks (layer 0) to the target blocks (layer L) with the
same minimum-flow rule as the needle routes (`routes.route`): nothing here re-implements the graph.

Export: GraphML (networkx `write_graphml`; node ids "L{layer}:B{block}", node attributes layer,
block, role ("source", "target" or ""), text; edge attributes residual, weight, flow, and heads /
mass as comma-separated strings, since GraphML holds scalars only) and JSON (the same nodes and
edges). `read_flow_graphml` turns a GraphML file back into the route's (layer, block) graph.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from ..errors import InputError, SparsetraceWarning
from ..notebook import facts_html, facts_repr
from ..text import shorten
from ..trace import Trace
from .routes import DEFAULT_THRESHOLD, Route, blocks_of, flow_graph, route
from .spans import Span, TraceText, parse_span

_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class Flow:
    """The route from one span to another.

    Attributes:
        source, target: the spans (token ranges, how they were named, their text).
        min_flow: the smallest share of the source's content a route edge carries.
        route: the `routes.Route` (source blocks at layer 0 to target blocks at layer L).
        block_text: block -> text, for labels (empty without the trace's text).
    """

    source: Span
    target: Span
    min_flow: float
    route: Route
    block_text: dict[int, str]

    def nodes(self) -> list[dict[str, Any]]:
        sources, targets = set(self.route.sources), set(self.route.targets)
        layers = self.route.graph.graph["layers"]
        out = []
        for layer, block in sorted(self.route.graph.nodes):
            role = "source" if layer == 0 and block in sources else "target" if (
                layer == layers and block in targets) else ""
            out.append({"id": node_id((layer, block)), "layer": layer, "block": block, "role": role,
                        "text": self.block_text.get(block, "")})
        return out

    def edges(self) -> list[dict[str, Any]]:
        return [{"from": node_id(u), "to": node_id(v), "residual": bool(d["residual"]), "weight": round(d["weight"], 6),
                 "flow": round(d["flow"], 6), "heads": list(d["heads"]), "mass": [round(m, 6) for m in d["mass"]]}
                for u, v, d in sorted(self.route.graph.edges(data=True), key=lambda e: (e[0], e[1]))]

    def to_dict(self) -> dict[str, Any]:
        attention = self.route.attention_edges()
        return {
            "source": self.source.to_dict() | {"blocks": self.route.sources},
            "target": self.target.to_dict() | {"blocks": self.route.targets},
            "min_flow": self.min_flow,
            "connected": self.route.connected,
            "block_size": self.route.graph.graph["block_size"],
            "layers": self.route.graph.graph["layers"],
            "attention_edges": len(attention),
            "residual_edges": self.route.graph.number_of_edges() - len(attention),
            "strongest_edges": [{"from": list(u), "to": list(v), "flow": round(d["flow"], 6), "heads": d["heads"]}
                                for u, v, d in attention[:20]],
            "nodes": self.nodes(),
            "edges": self.edges(),
        }

    def _facts(self) -> dict[str, Any]:
        """The key numbers a notebook shows: both spans, the rule and the route's size."""
        attention = len(self.route.attention_edges())
        return {"source": _span_text(self.source), "target": _span_text(self.target), "min_flow": self.min_flow,
                "connected": self.route.connected, "attention_edges": attention,
                "residual_edges": self.route.graph.number_of_edges() - attention}

    def __repr__(self) -> str:
        return facts_repr("Flow", self._facts())

    def _repr_html_(self) -> str:
        return facts_html("Flow", self._facts(), note="edges on a path from the source's blocks to the target's "
                          "that carry at least min_flow of the source's content")

    def to_graphml(self) -> bytes:
        """The route as GraphML (module docstring): scalar attributes only."""
        graph = nx.DiGraph(layers=self.route.graph.graph["layers"], blocks=self.route.graph.graph["blocks"],
                           block_size=self.route.graph.graph["block_size"], min_flow=self.min_flow,
                           source=self.source.spec, target=self.target.spec)
        for node in self.nodes():
            graph.add_node(node["id"], **{k: v for k, v in node.items() if k != "id"} | {"text": _xml(node["text"])})
        for edge in self.edges():
            graph.add_edge(edge["from"], edge["to"], residual=edge["residual"], weight=edge["weight"],
                           flow=edge["flow"], heads=",".join(map(str, edge["heads"])),
                           mass=",".join(map(str, edge["mass"])))
        return ("\n".join(nx.generate_graphml(graph)) + "\n").encode()


def node_id(node: tuple[int, int]) -> str:
    return f"L{node[0]}:B{node[1]}"


def flow(
    trace: Trace,
    source: str | tuple[int, int],
    target: str | tuple[int, int] | None = None,
    *,
    text: TraceText | None = None,
    min_flow: float = DEFAULT_THRESHOLD,
) -> Flow:
    """The route from `source` to `target` (span specs, see `spans`; default target: the last token).

    Args:
        text: the trace's text (`spans.trace_text`), needed for chars: and search spans.
        min_flow: smallest share of the source's content an edge carries (`routes.route`); 0 keeps
            every edge on any path.

    Flow runs forward only (a token reads earlier ones): a source that starts at or after the
    target's end gets a `SparsetraceWarning` saying so, besides its route's "not connected".
    """
    if isinstance(min_flow, bool) or not isinstance(min_flow, int | float) or not 0 <= min_flow <= 1:
        raise InputError(f"min_flow={min_flow!r}: a flow is a share of attention; use a value in [0, 1]")
    src = parse_span(source, trace.num_tokens, text)
    last = (trace.num_tokens - 1, trace.num_tokens)
    dst = parse_span(target if target is not None else last, trace.num_tokens, text)
    if src.start >= dst.end:
        warnings.warn(f"flow runs forward only (a token reads earlier ones), and the source (tokens {src.start}-"
                      f"{src.end}) comes after the target (tokens {dst.start}-{dst.end}); swap --from and --to "
                      "(source and target) to follow it", SparsetraceWarning, stacklevel=2)
    graph = flow_graph(trace)  # checks block_q == block_k
    block = trace.config.block_q
    found = route(graph, blocks_of(src.tokens, block), blocks_of(dst.tokens, block), min_flow=min_flow)
    labels = {}
    if text is not None:
        labels = {b: text.of_tokens(b * block, (b + 1) * block) for b in range(trace.num_query_blocks)}
    return Flow(src, dst, float(min_flow), found, labels)


def read_flow_graphml(path: str | Path) -> nx.DiGraph:
    """A GraphML file written by `save_flow` as a graph on (layer, block) nodes, heads and mass as lists."""
    loaded = nx.read_graphml(path)
    graph = nx.DiGraph(**loaded.graph)
    key = {n: (int(d["layer"]), int(d["block"])) for n, d in loaded.nodes(data=True)}
    graph.add_nodes_from((key[n], d) for n, d in loaded.nodes(data=True))
    for u, v, d in loaded.edges(data=True):
        heads = [int(h) for h in d["heads"].split(",") if h]
        mass = [float(m) for m in d["mass"].split(",") if m]
        graph.add_edge(key[u], key[v], **(d | {"heads": heads, "mass": mass}))
    return graph


def save_flow(result: Flow, folder: str | Path, *, title: str = "", max_labels: int = 30) -> dict[str, str]:
    """Write flow.json, flow.graphml and flow.png (the route picture)."""
    from ..files import atomic_write, save_figure, write_json
    from ..plots import route_figure

    folder = Path(folder)
    on_route = [b for u, v, _ in result.route.attention_edges() for b in (v[1], u[1])]
    labelled = list(dict.fromkeys([*result.route.sources, *result.route.targets, *on_route]))[:max_labels]
    labels = {b: shorten(result.block_text.get(b, ""), 24) for b in labelled}
    graph = result.route.graph.graph
    status = "connected" if result.route.connected else "not connected"
    title = title or (f"Flow from {shorten(result.source.text or result.source.spec, 40)!r} ("
                      f"{_blocks(result.route.sources)}) to {shorten(result.target.text or result.target.spec, 40)!r} "
                      f"({_blocks(result.route.targets)}): {status}\n{len(result.route.attention_edges())} "
                      f"attention edges carry >= {result.min_flow} of the source")
    figure = route_figure(result.route, graph["layers"], graph["blocks"], labels, title=title,
                          source_name="source", target_name="target")
    paths = {
        "json": write_json(folder / "flow.json", result.to_dict()),
        "graphml": atomic_write(folder / "flow.graphml", result.to_graphml(), what="the GraphML"),
        "picture": save_figure(figure, folder / "flow.png"),
    }
    return {name: str(path) for name, path in paths.items()}


def _xml(text: str) -> str:
    """Drop the characters XML 1.0 cannot hold (control characters, lone surrogates)."""
    return _NOT_XML.sub("", text)


def _blocks(blocks: list[int]) -> str:
    listed = f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 2 else ", ".join(map(str, blocks))
    return ("blocks " if len(blocks) > 1 else "block ") + listed


def _span_text(span: Span) -> str:
    """`tokens A-B` and the span's text, shortened: how a notebook names a span."""
    return f"tokens {span.start}-{span.end}" + (f" {shorten(span.text, 40)!r}" if span.text else "")
