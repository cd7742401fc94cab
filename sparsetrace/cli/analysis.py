"""`sparsetrace salience` and `sparsetrace flow`: analyses of any saved trace, without the model."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError
from .common import output_folder, subcommand

SALIENCE_EXAMPLES = """examples:
  sparsetrace salience run.sptrace -o salience/                 # top 10 most-read blocks, JSON + 2 figures
  sparsetrace salience run.sptrace -o salience/ --units sentences --top 20
  sparsetrace salience run.sptrace -o s/ --json --tokenizer HuggingFaceTB/SmolLM2-135M-Instruct
"""

FLOW_EXAMPLES = """examples:
  sparsetrace flow run.sptrace --from "the lighthouse keeper" --to tokens:4000-4096 -o flow/
  sparsetrace flow run.sptrace --from chars:1200-1400 -o flow/      # to the last token
  sparsetrace flow run.sptrace --from tokens:0-64 --to "Article 12" --min-flow 0.1 -o flow/ --json
"""


def register(sub) -> None:
    sal = subcommand(
        sub, "salience", run_salience, SALIENCE_EXAMPLES,
        help="which key blocks (and sentences) later text keeps reading, per layer and head",
        description="Per key block of a saved trace: the kept attention mass later query blocks put on it, per "
        "layer and head and averaged over them, with sink and local blocks reported apart from the blocks the "
        "estimator selected. Writes salience.json, salience.png (along the text) and salience_layers.png "
        "(layer x position) to -o; prints the top spans with their text.",
    )
    sal.add_argument("trace", help="a .sptrace file")
    sal.add_argument("-o", "--output", required=True, help="folder for the outputs (created if missing)")
    sal.add_argument("--top", type=int, default=10, help="how many spans to list (default 10)")
    sal.add_argument("--units", choices=["sentences", "paragraphs"], default=None,
                     help="also score sentences or paragraphs of the decoded text (default: the units the trace "
                     "carries, if any)")
    sal.add_argument("--min-readers", type=int, default=4, help="rank only blocks that at least this many query "
                     "blocks could select (default 4)")
    _common(sal)

    flo = subcommand(
        sub, "flow", run_flow, FLOW_EXAMPLES,
        help="the route information takes from one span to another, as a picture, GraphML and JSON",
        description="The layered information-flow graph of a saved trace (block b after layer l; an edge per kept "
        "block a head reads), restricted to the edges on paths from the --from span to the --to span that carry at "
        "least --min-flow of the source's content. A span is tokens:A-B, chars:A-B (B exclusive) or a string to "
        "search for (its first occurrence; text:STRING for strings starting with tokens: or chars:). Writes "
        "flow.png, flow.graphml and flow.json to -o.",
    )
    flo.add_argument("trace", help="a .sptrace file")
    flo.add_argument("--from", dest="source", required=True, help="the source span")
    flo.add_argument("--to", dest="target", default=None, help="the target span (default: the last token)")
    flo.add_argument("--min-flow", type=float, default=None, help="smallest share of the source's content a route "
                     "edge carries (default 0.05; 0 = every edge on any path)")
    flo.add_argument("-o", "--output", required=True, help="folder for the outputs (created if missing)")
    _common(flo)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default=None, help="tokenizer to decode the trace's text (hub id or folder; "
                        "default: the one the trace records)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run_salience(args: argparse.Namespace) -> None:
    from ..analysis.salience import salience, save_salience
    from ..trace import load_trace

    if args.top < 1 or args.min_readers < 1:
        raise InputError("--top and --min-readers take positive numbers")
    trace = load_trace(args.trace)
    output_folder(args.output, create=False)  # created once the analysis is done: a refusal leaves none
    text, tokenizer, note = _text(trace, args.tokenizer, required=args.units is not None)
    units = None
    if args.units is not None:
        from ..analysis.segments import split_units

        split, ids = split_units(text.text, tokenizer, args.units, region="all")
        if not text.exact or ids.tolist() != trace.token_ids.tolist():
            raise InputError("--units needs the decoded text to tokenize back to the trace's tokens, and it does "
                             "not here; leave --units out (block salience still works)")
        units = split
    result = salience(trace, text=text, units=units, top=args.top, min_readers=args.min_readers)
    paths = save_salience(result, output_folder(args.output))
    if note:
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps({"top": result.top, "top_units": result.top_units, "aggregation": result.to_dict()[
            "aggregation"], "files": paths}, indent=2))
        return
    print(f"salience of {len(result.readers['selected'])} key blocks ({trace.num_tokens:,} tokens, "
          f"{trace.num_layers} layers x {trace.num_heads} heads): mean selected mass per query block that could "
          f"select it, averaged over layers and heads")
    for row in result.top:
        print(f"{row['rank']:>3}. block {row['block']:>4} (tokens {row['tokens'][0]}-{row['tokens'][1]}) "
              f"{row['selected_mean']:.4f}  {_quote(row['text'])}")
    if result.top_units:
        print("top units:")
        for row in result.top_units:
            print(f"     unit {row['unit']:>4} (tokens {row['tokens'][0]}-{row['tokens'][1]}) "
                  f"{row['selected_mean']:.4f}  {_quote(row['text'])}")
    print(f"wrote {paths['along_text']}, {paths['layers']}, {paths['json']}")


def run_flow(args: argparse.Namespace) -> None:
    from ..analysis.flow import flow, save_flow
    from ..analysis.routes import DEFAULT_THRESHOLD
    from ..trace import load_trace

    min_flow = DEFAULT_THRESHOLD if args.min_flow is None else args.min_flow
    if not 0 <= min_flow <= 1:
        raise InputError(f"--min-flow {min_flow}: a flow is a share of attention; use a value in [0, 1]")
    trace = load_trace(args.trace)
    output_folder(args.output, create=False)  # created once the spans are found: a refusal leaves none
    needs_text = any(s is not None and not s.startswith("tokens:") for s in (args.source, args.target))
    text, _, note = _text(trace, args.tokenizer, required=needs_text)
    result = flow(trace, args.source, args.target, text=text, min_flow=min_flow)
    paths = save_flow(result, output_folder(args.output))
    summary = result.to_dict()
    if note:
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps({k: summary[k] for k in ("source", "target", "min_flow", "connected", "attention_edges",
                                                  "residual_edges", "strongest_edges")} | {"files": paths}, indent=2))
        return
    for name, span in (("from", summary["source"]), ("to", summary["target"])):
        print(f"{name:<5} {span['spec']!r}: tokens {span['tokens'][0]}-{span['tokens'][1]}, blocks "
              f"{span['blocks']}  {_quote(span['text'])}"
              + (f" (first of {span['occurrences']} occurrences)" if span.get("occurrences", 1) > 1 else ""))
    print(f"route {'connected' if result.route.connected else 'NOT connected'}: {summary['attention_edges']} "
          f"attention edges carry >= {min_flow} of the source")
    for edge in summary["strongest_edges"][:5]:
        print(f"      layer {edge['from'][0]} block {edge['from'][1]} -> block {edge['to'][1]}: flow "
              f"{edge['flow']:.3f} (heads {edge['heads']})")
    print(f"wrote {paths['picture']}, {paths['graphml']}, {paths['json']}")


def _text(trace, name: str | None, *, required: bool):
    """(TraceText or None, tokenizer or None, note): without a tokenizer, salience still works on token ranges."""
    from ..analysis.spans import resolve_tokenizer, trace_text

    try:
        tokenizer = resolve_tokenizer(trace, name)
    except InputError as error:
        if required or name is not None:
            raise
        return None, None, f"sparsetrace: note: no text ({error}); showing token ranges only"
    return trace_text(trace, tokenizer), tokenizer, None


def _quote(text: str | None, width: int = 70) -> str:
    from ..text import shorten

    return "" if text is None else repr(shorten(text, width))
