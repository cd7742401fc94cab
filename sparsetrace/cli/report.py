"""`sparsetrace report` (a trace as one HTML page) and `sparsetrace demo` (the newcomer's first run)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..choices import SIBLING_FIDELITY, SIBLING_FIGURES
from ..errors import InputError
from .common import add_dtype_argument, add_kernel_arguments, load, output_folder, output_path, progress, subcommand

REPORT_EXAMPLES = """examples:
  sparsetrace report run.sptrace -o report.html
  sparsetrace report niah/trace.sptrace -o niah/report.html    # adds niah/route.png, needle_heads.png, fidelity.json
  sparsetrace report run.sptrace -o r.html --figure flow.png --fidelity check.json --no-text
"""

DEMO_EXAMPLES = """examples:
  sparsetrace demo                      # ~4k-token needle prompt on the default model, into sparsetrace-demo/
  sparsetrace demo -o /tmp/demo --length 2048
"""


def register(sub) -> None:
    report = subcommand(
        sub, "report", run_report, REPORT_EXAMPLES,
        help="one self-contained HTML page of a trace: summary, per layer/head block map, results",
        description="Write one HTML file (no network: scripts, styles, data and figures inline) with the trace's "
        "summary, a query-block x key-block map of kept attention mass per layer and head (hover: block text; "
        "click a query block: the key blocks each head reads), and the fidelity, needle and figure results given "
        "or found next to the trace. Its size grows with the trace, not with T^2.",
    )
    report.add_argument("trace", help="a .sptrace file")
    report.add_argument("-o", "--output", required=True, help="the HTML file to write")
    report.add_argument("--figure", action="append", default=[], metavar="PNG", help="a PNG figure to embed "
                        "(repeatable)")
    report.add_argument("--fidelity", default=None, metavar="JSON", help="`sparsetrace check --json` output to show")
    report.add_argument("--only-trace", action="store_true", help=f"do not add {', '.join(SIBLING_FIGURES)} and "
                        f"{SIBLING_FIDELITY} found next to the trace")
    report.add_argument("--no-text", action="store_true", help="no block text (token ranges only; no tokenizer)")
    report.add_argument("--title", default=None, help="the page's title")

    demo = subcommand(
        sub, "demo", run_demo, DEMO_EXAMPLES,
        help="the first run: needle in a haystack on the default model, its trace, fidelity, route and HTML report",
        description="On the default model: a ~4k-token needle-in-a-haystack prompt, the dense answer, the trace at "
        "the smallest k that keeps it, a fidelity check at that k (attention recall vs the oracle, behaviour), the "
        "route from the needle to the answer, and report.html with all of it. About 5 minutes on 2 CPU cores.",
    )
    demo.add_argument("-o", "--output", default="sparsetrace-demo", help="folder for the outputs (default "
                      "sparsetrace-demo/, created if missing)")
    demo.add_argument("--length", type=int, default=4096, help="prompt length in tokens (default 4096)")
    demo.add_argument("--depth", type=float, default=0.5, help="needle position, 0 = start .. 1 = end (default 0.5)")
    demo.add_argument("--model", default=None, help="Hugging Face causal LM (default: SmolLM2-135M-Instruct)")
    add_dtype_argument(demo)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_kernel_arguments(demo)


def run_report(args: argparse.Namespace) -> None:
    from ..report import report
    from ..trace import load_trace

    output = output_path(args.output)
    extras = _report_extras(args)
    trace = load_trace(args.trace)
    path = report(trace, output, None if args.no_text else "auto", extras=extras, title=args.title)
    found = [Path(name).name for name in extras.get("figures", {}).values()] + (["fidelity"] if "fidelity" in extras
                                                                                   else [])
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB; {trace.num_layers} layers x {trace.num_heads} heads, "
          f"{trace.num_query_blocks} query blocks" + (f"; with {', '.join(found)}" if found else "") + ")")


def _report_extras(args: argparse.Namespace) -> dict:
    """Figures and fidelity given on the command line, plus a needle run's files next to the trace."""
    figures: dict[str, str] = {}
    for name in args.figure:
        if not Path(name).is_file():
            raise InputError(f"--figure {name}: no such file; give PNG files that exist")
        figures[Path(name).name] = name
    fidelity = args.fidelity
    if fidelity is not None and not Path(fidelity).is_file():
        raise InputError(f"--fidelity {fidelity}: no such file; give the JSON that `sparsetrace check --json` wrote")
    folder = Path(args.trace).parent
    if not args.only_trace:
        for name, caption in SIBLING_FIGURES.items():
            if (folder / name).is_file():
                figures.setdefault(caption, str(folder / name))
        if fidelity is None and (folder / SIBLING_FIDELITY).is_file():
            fidelity = str(folder / SIBLING_FIDELITY)
    extras: dict = {"figures": figures} if figures else {}
    if fidelity is not None:
        try:
            extras["fidelity"] = json.loads(Path(fidelity).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{fidelity} is not JSON ({error}); give the output of `sparsetrace check --json`") \
                from error
        if not isinstance(extras["fidelity"], dict) or "recall" not in extras["fidelity"]:
            raise InputError(f"{fidelity} has no recall numbers; give the output of `sparsetrace check --json`")
    return extras


def run_demo(args: argparse.Namespace) -> None:
    from ..tasks.demo import demo

    if not 0 <= args.depth <= 1:
        raise InputError(f"--depth {args.depth} must lie in [0, 1]; 0 puts the needle first, 1 last")
    started = time.perf_counter()
    folder = output_folder(args.output)
    print(f"demo: needle in a haystack, {args.length:,} tokens, needle at depth {args.depth}; writing to {folder}/",
          flush=True)
    model, tokenizer = load(args)
    result = demo(model, tokenizer, folder, length=args.length, depth=args.depth, progress=progress(args),
                  kernel=args.kernel, log=lambda line: print(line, flush=True))
    prompt, run, fidelity, paths = result.prompt, result.run, result.fidelity, result.paths
    summary = run.summary()
    route = summary["route"]
    readers = sorted(((m, int(layer), h) for layer, heads in route["heads_reading_needle"].items() for h, m in heads),
                     reverse=True)[:3]
    recall = sum(fidelity.recall) / len(fidelity.recall)
    oracle = sum(fidelity.oracle_recall) / len(fidelity.oracle_recall)
    answer_block = route["answer_blocks"][-1] if route["answer_blocks"] else None
    lines = [
        "",
        f"prompt       {prompt.num_tokens:,} tokens; needle {prompt.key} = {prompt.answer} in blocks "
        f"{route['needle_blocks']}",
        f"dense answer {run.answer.text!r} ({'right' if run.answer.correct else 'WRONG'}); sparse model at k = {run.k}"
        f" {'keeps' if run.answer_kept else 'LOSES'} it, computing {summary['kept_fraction']:.1%} of token pairs",
        f"fidelity     recall {recall:.3f} of the dense attention in the kept blocks (oracle {oracle:.3f}); next "
        f"tokens {'match' if fidelity.match else 'DO NOT match'}, KL {fidelity.kl_next_token:.4f}",
        f"route        needle -> answer {'connected' if route['connected'] else 'NOT connected'}; top readers: "
        + (", ".join(f"layer {layer} head {h} ({m:.2f})" for m, layer, h in readers) or "none"),
        f"files        {paths['route']}, {paths['heads']}, {paths['json']}, {paths['fidelity']}, {paths['trace']}",
        f"time         {time.perf_counter() - started:.0f} s",
        "",
        "where to look: in the report pick " + (f"layer {readers[0][1]} head {readers[0][2]}" if readers else
                                                "a layer and head") + f", then click query block {answer_block} "
        "(the answer; or its button) to see which blocks it reads: the needle's are among them",
        f"open {result.report}",
    ]
    print("\n".join(lines))
