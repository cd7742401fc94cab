"""`sparsetrace trace` and `sparsetrace info`: make a trace, summarise a saved one."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..config import StreamConfig
from .common import add_run_arguments, input_options, output_path, prepare, subcommand

TRACE_EXAMPLES = """examples:
  sparsetrace trace --sample -o sample.sptrace          # the built-in ~4k-token sample, default model
  sparsetrace trace paper.txt -o paper.sptrace --k 16 --block-size 32
  cat notes.txt | sparsetrace trace - -o notes.sptrace --model HuggingFaceTB/SmolLM2-360M-Instruct
"""

INFO_EXAMPLES = """examples:
  sparsetrace info sample.sptrace
  sparsetrace info sample.sptrace --json | python -m json.tool
"""


def register(sub) -> None:
    trace = subcommand(
        sub, "trace", run_trace, TRACE_EXAMPLES, text_input=True,
        help="trace a text through the model on sparse attention and save it",
        description="Run the model once on Stream sparse attention over INPUT and save, for every layer, head "
        "and query block, the kept key blocks and the attention mass they received.",
    )
    trace.add_argument("-o", "--output", required=True, help="where to write the trace (.sptrace)")
    trace.add_argument("--forward", default="sparse", choices=["sparse", "dense"],
                       help="sparse (default): the model runs on the kept blocks; dense: the model keeps its own "
                       "attention and the trace records the selection with its dense attention mass")
    add_run_arguments(trace)

    info = subcommand(sub, "info", run_info, INFO_EXAMPLES, help="summarise a saved trace",
                      description="Print what a trace holds: model, tokens, estimator settings, sparsity and sizes.")
    info.add_argument("trace", help="a .sptrace file")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_trace(args: argparse.Namespace) -> None:
    from ..tracer import trace

    output = output_path(args.output)
    started = time.perf_counter()
    model, tokenizer, text, config = prepare(args)
    result = trace(model, tokenizer, text, config, forward=args.forward, **input_options(args))
    result.save(output)
    summary = trace_summary(result) | {"output": str(output),
                                       "total_seconds": round(time.perf_counter() - started, 2)}
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))


def run_info(args: argparse.Namespace) -> None:
    from ..trace import load_trace

    result = load_trace(args.trace)
    summary = trace_summary(result) | {"file": args.trace, "file_bytes": Path(args.trace).stat().st_size}
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))


def trace_summary(result) -> dict:
    info = result.model_info
    return {
        "model": info.get("name"),
        "config": result.config.to_dict(),
        "seconds": result.extra.get("seconds"),
        **result.stats(),
    }


def format_summary(summary: dict) -> str:
    s = summary
    config = s["config"]
    budget = StreamConfig.from_dict(config).budget_text()
    lines = [
        f"model        {s['model']}",
        f"tokens       {s['tokens']:,}   layers x heads {s['layers']} x {s['heads']}   "
        f"blocks {s['block_q']}/{s['block_k']} tokens, {budget}",
        f"kept blocks  {s['kept_blocks']:,} ({s['selected_blocks']:,} selected + {s['forced_blocks']:,} sink/local); "
        f"per row {s['kept_per_row_mean']:.1f} on average, at most {s['kept_per_row_max']}",
    ]
    if "coverage_mean" in s:
        lines.append(f"coverage     estimated {s['coverage_mean']:.3f} of each row's attention kept on average "
                     f"(lowest {s['coverage_min']:.3f}); {s['rows_short_of_coverage']:.1%} of rows ran out of "
                     f"candidates before {config['coverage']}")
    lines += [
        f"sparsity     {s['sparsity']:.1%} of causal token pairs pruned   "
        f"(block grid {s['block_sparsity']:.1%}; estimator's own picks only: {s['sparsity_selected_only']:.1%})",
        f"compression  {s['compression']:,.0f}x  (T^2 / kept blocks per head and layer, as the paper)",
        f"size         trace {human_bytes(s['trace_bytes'])} vs dense fp16 attention patterns "
        f"{human_bytes(s['dense_pattern_bytes'])} ({s['dense_to_trace_ratio']:,.0f}x smaller)",
    ]
    if s.get("seconds") is not None:
        lines.append(f"time         {s['seconds']:.1f} s forward pass" + (
            f", {s['total_seconds']:.1f} s in all" if "total_seconds" in s else ""))
    if "output" in s:
        lines.append(f"wrote        {s['output']}")
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
