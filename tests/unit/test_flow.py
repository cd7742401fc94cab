"""Flow between spans: span parsing, the route against brute-force path enumeration, GraphML round trip,
and the `salience` / `flow` commands end to end on a tiny model's trace."""

import itertools
import json

import networkx as nx
import numpy as np
import pytest
import torch
from test_routes import BLOCK, HEADS, LAYERS, N_BLOCKS
from test_routes import hand_built_trace as routes_trace
from tiny_models import tiny_model

from sparsetrace.analysis.flow import flow, node_id, read_flow_graphml, save_flow
from sparsetrace.analysis.spans import TraceText, parse_span, trace_text
from sparsetrace.cli import main
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError
from sparsetrace.trace import Trace, load_trace

TEXT = "The lamp. The keeper."  # 21 characters: one byte token each with the tiny tokenizer


def hand_built_trace(seed: int, token_ids: torch.Tensor, keep: float = 0.5) -> Trace:
    """test_routes' random causal trace, over these tokens."""
    return routes_trace(seed, keep, token_ids=token_ids)


@pytest.fixture
def text_trace(tiny_tokenizer):
    ids = torch.tensor(tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    trace = hand_built_trace(0, ids)
    return trace, trace_text(trace, tiny_tokenizer)


def test_trace_text_and_span_parsing(text_trace):
    trace, text = text_trace
    assert text.exact and text.text == TEXT and text.offsets[4] == (4, 5)
    assert parse_span("tokens:2-5", trace.num_tokens, text).tokens == (2, 5)
    assert parse_span("chars:10-13", trace.num_tokens, text).text == "The"
    found = parse_span("The", trace.num_tokens, text)
    assert found.tokens == (0, 3) and found.occurrences == 2
    assert parse_span("keeper", trace.num_tokens, text).tokens == (14, 20)
    assert parse_span((3, 7), trace.num_tokens).tokens == (3, 7)
    assert parse_span("tokens:0-4", trace.num_tokens).text is None
    literal = TraceText("a tokens:1-2 b", [(c, c + 1) for c in range(14)], True)
    assert parse_span("text:tokens:1-2", 14, literal).tokens == (2, 12)


@pytest.mark.parametrize("spec,message", [
    ("tokens:5-2", "is empty"), ("tokens:0-99", "ends past this 21-token input"), ("tokens:3", "write tokens:A-B"),
    ("chars:a-b", "write chars:A-B"), ("chars:0-500", "ends past"), ("zebra", "does not occur"), ("", "is empty"),
])
def test_bad_spans_name_the_fix(text_trace, spec, message):
    trace, text = text_trace
    with pytest.raises(InputError, match=message):
        parse_span(spec, trace.num_tokens, text)


def test_text_spans_need_the_text(text_trace):
    trace, _ = text_trace
    with pytest.raises(InputError, match="--tokenizer"):
        parse_span("lamp", trace.num_tokens, None)


def brute_force_route(trace: Trace, sources: list[int], targets: list[int], min_flow: float) -> set:
    """Every edge on a path (0, s) -> (L, t) all of whose edges carry >= min_flow, by enumerating paths.

    Edge weights straight from the trace: the largest head mass on (j -> i), 1 on the residual (i -> i).
    An edge's flow = weight x the best product of weights over all paths from a source to its tail."""
    weight = []
    for layer in range(LAYERS):
        idx, mass = trace.blocks(layer)
        w = {}
        for h, i, slot in itertools.product(range(HEADS), range(idx.shape[1]), range(idx.shape[2])):
            j = int(idx[h, i, slot])
            if j >= 0 and j != i:
                w[(j, i)] = max(w.get((j, i), 0.0), float(mass[h, i, slot]))
        w.update({(i, i): 1.0 for i in range(idx.shape[1])})
        weight.append(w)
    blocks = trace.num_query_blocks

    def paths(start: int, length: int):
        if length == 0:
            yield [start]
            return
        for path in paths(start, length - 1):
            for nxt in range(blocks):
                if (path[-1], nxt) in weight[length - 1]:
                    yield [*path, nxt]

    content = {(0, b): float(b in sources) for b in range(blocks)}
    for layer, s in itertools.product(range(1, LAYERS + 1), sources):
        for path in paths(s, layer):
            product = np.prod([weight[step][(path[step], path[step + 1])] for step in range(layer)])
            content[(layer, path[-1])] = max(content.get((layer, path[-1]), 0.0), float(product))
    edges = set()
    for s in sources:
        for path in paths(s, LAYERS):
            if path[-1] not in targets:
                continue
            steps = [((k, path[k]), (k + 1, path[k + 1])) for k in range(LAYERS)]
            flows = [weight[k][(path[k], path[k + 1])] * content[(k, path[k])] for k in range(LAYERS)]
            if all(f > 0 and f >= min_flow for f in flows):
                edges |= set(steps)
    return edges


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_flow", [0.0, 0.2])
def test_flow_equals_brute_force_enumeration(seed, min_flow, tiny_tokenizer):
    ids = torch.tensor(tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"])[:N_BLOCKS * BLOCK]
    trace = hand_built_trace(seed, ids, keep=0.6)
    text = trace_text(trace, tiny_tokenizer)
    result = flow(trace, "lamp", "tokens:16-20", text=text, min_flow=min_flow)  # "lamp": tokens 4-8, block 1
    assert result.route.sources == [1] and result.route.targets == [4]
    expected = brute_force_route(trace, [1], [4], min_flow)
    assert set(result.route.graph.edges) == expected
    assert result.route.connected == any(u[1] != v[1] for u, v in expected)
    assert result.to_dict()["attention_edges"] == sum(u[1] != v[1] for u, v in expected)


def test_graphml_round_trip(tmp_path, text_trace):
    trace, text = text_trace
    result = flow(trace, "tokens:0-4", text=text, min_flow=0.0)
    assert result.target.tokens == (20, 21)  # default: the last token
    paths = save_flow(result, tmp_path)
    loaded = nx.read_graphml(paths["graphml"])
    assert set(loaded.edges) == {(node_id(u), node_id(v)) for u, v in result.route.graph.edges}
    for u, v, d in result.route.graph.edges(data=True):
        got = loaded.edges[node_id(u), node_id(v)]
        assert got["weight"] == pytest.approx(d["weight"], abs=1e-6) and got["residual"] == d["residual"]
    back = read_flow_graphml(paths["graphml"])
    assert set(back.edges) == set(result.route.graph.edges)
    for u, v, d in result.route.graph.edges(data=True):
        assert back.edges[u, v]["heads"] == d["heads"]
        assert back.edges[u, v]["flow"] == pytest.approx(d["flow"], abs=1e-6)
    assert back.nodes[(0, 0)]["role"] == "source" and back.graph["layers"] == LAYERS
    data = json.loads((tmp_path / "flow.json").read_text())
    assert {(e["from"], e["to"]) for e in data["edges"]} == set(loaded.edges)
    assert (tmp_path / "flow.png").stat().st_size > 0


def test_flow_needs_square_blocks():
    ids = torch.zeros(16, dtype=torch.long)
    info = {"name": "hand", "architecture": "H", "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "head_dim": 4,
            "sliding_windows": [None]}
    config = StreamConfig(k=1, block_q=8, block_k=4, sinks=0, local=1)
    idx = torch.tensor([[[1, -1], [3, -1]]], dtype=torch.int32)
    trace = Trace(token_ids=ids, config=config, indices=[idx], mass=[torch.tensor([[[1.0, 0], [1.0, 0]]])],
                  model_info=info)
    with pytest.raises(InputError, match="block_q"):
        flow(trace, "tokens:0-4")
    with pytest.raises(InputError, match="min_flow"):
        flow(trace, "tokens:0-4", min_flow=2)


# The commands end to end on a tiny model's trace (the tokenizer is found from the trace).

CLI_TEXT = "The keeper lit the lamp at dusk. The lamp burned until dawn. " * 4


@pytest.fixture(scope="module")
def cli_trace(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    text = folder / "input.txt"
    text.write_text(CLI_TEXT)
    out = folder / "run.sptrace"
    assert main(["trace", str(text), "-o", str(out), "--model", str(folder), "--k", "2", "--block-size", "16",
                 "--no-progress"]) == 0
    return str(out)


def test_salience_command(capsys, tmp_path, cli_trace):
    capsys.readouterr()
    assert main(["salience", cli_trace, "-o", str(tmp_path / "s"), "--top", "3", "--min-readers", "2"]) == 0
    out = capsys.readouterr().out
    assert "  1. block" in out and "wrote" in out
    data = json.loads((tmp_path / "s" / "salience.json").read_text())
    assert len(data["top"]) == 3 and data["top"][0]["text"] in CLI_TEXT
    assert main(["salience", cli_trace, "-o", str(tmp_path / "u"), "--units", "sentences", "--json",
                 "--min-readers", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["top_units"] and all(u["text"].strip() in CLI_TEXT for u in printed["top_units"])
    assert all(p.endswith((".png", ".json")) for p in printed["files"].values())


def test_flow_command(capsys, tmp_path, cli_trace):
    capsys.readouterr()
    assert main(["flow", cli_trace, "--from", "lit the lamp", "--to", "until dawn", "--min-flow", "0", "-o",
                 str(tmp_path / "f"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["source"]["text"] == "lit the lamp" and printed["source"]["occurrences"] == 4
    assert printed["target"]["tokens"] == [CLI_TEXT.index("until dawn"), CLI_TEXT.index("until dawn") + 10]
    graph = read_flow_graphml(tmp_path / "f" / "flow.graphml")
    assert graph.number_of_edges() == printed["attention_edges"] + printed["residual_edges"]
    assert load_trace(cli_trace).num_tokens == len(CLI_TEXT)


@pytest.mark.parametrize("argv,message", [
    (["flow", "{trace}", "--from", "zebra", "-o", "{tmp}/f"], "does not occur"),
    (["flow", "{trace}", "--from", "tokens:9-3", "-o", "{tmp}/f"], "is empty"),
    (["flow", "{trace}", "--from", "tokens:0-4", "--min-flow", "3", "-o", "{tmp}/f"], "--min-flow"),
    (["salience", "{trace}", "-o", "{tmp}/s", "--top", "0"], "--top"),
    (["salience", "{tmp}/missing.sptrace", "-o", "{tmp}/s"], "no such file"),
    (["salience", "{trace}", "-o", "{tmp}/s", "--tokenizer", "{tmp}/no-tokenizer"], "--tokenizer"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, cli_trace, argv, message):
    capsys.readouterr()
    code = main([a.format(trace=cli_trace, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
