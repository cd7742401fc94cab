"""`sparsetrace attribute`: which sentences of a context a response relies on, from one traced pass."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..choices import ATTRIBUTION_METHODS, DEFAULT_METHOD, SOURCE_KINDS
from ..errors import InputError
from .common import add_run_arguments, load, output_folder, progress, read_input, stream_config, subcommand

EXAMPLES = """examples:
  sparsetrace attribute paper.txt --query "Who proposed the method?" -o attr/    # the model answers greedily
  sparsetrace attribute notes.txt --query "When did it open?" --response "It opened in 1851." -o attr/ --json
  cat doc.txt | sparsetrace attribute - --query "Why?" -o attr/ --sources paragraphs --method max_head --top 10
"""


def register(sub) -> None:
    parser = subcommand(
        sub, "attribute", run, EXAMPLES,
        help="context attribution: the sources of a context a response reads, from one sparse traced pass",
        description="Build ContextCite's prompt (\"Context: ...\\n\\nQuery: ...\" as one user turn of the chat "
        "template), take the given response or the dense model's greedy answer, trace prompt + response once on "
        "sparse attention and score each source of the context by the attention the response's positions put on "
        "it. Writes attribution.json, attribution.png, trace.sptrace and report.html to DIR.",
    )
    parser.add_argument("context", metavar="CONTEXT", help="the context: a text file, or - for standard input")
    parser.add_argument("--query", required=True, help="the question asked about the context")
    parser.add_argument("--response", default=None, help="the response to attribute (default: the model answers "
                        "greedily)")
    parser.add_argument("-o", "--output", required=True, help="folder for the outputs (created if missing)")
    group = parser.add_argument_group("attribution")
    group.add_argument("--sources", default="sentences", choices=SOURCE_KINDS,
                       help="what a source is (default sentences; blocks: the trace's key blocks in the context)")
    group.add_argument("--method", default=DEFAULT_METHOD, choices=ATTRIBUTION_METHODS,
                       help="how per layer/head masses become one score: max_head (default: the largest head per "
                       "layer, mean over layers), mean (over layers and heads), mean_per_token (the same per token "
                       "of the source), focused (heads weighted by how few sources they read)")
    group.add_argument("--max-new-tokens", type=int, default=64, help="token limit of the greedy answer (default 64)")
    group.add_argument("--top", type=int, default=5, help="sources printed and numbered in the figure (default 5)")
    add_run_arguments(parser, input_options=False)


def run(args: argparse.Namespace) -> None:
    from ..tasks.attribution_runs import attribute, save_attribution

    context = read_input(args.context, False)
    if not args.query.strip():
        raise InputError("--query is empty; give the question asked about the context")
    if args.response is not None and not args.response.strip():
        raise InputError("--response is empty; give the response text, or leave --response out to let the model "
                         "answer")
    if args.top < 1 or args.max_new_tokens < 1:
        raise InputError("--top and --max-new-tokens take positive numbers")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise InputError(f"{args.output} is a file; -o takes a folder for the outputs")
    config = stream_config(args)
    model, tokenizer = load(args)
    result = attribute(model, tokenizer, context, args.query, config, response=args.response, sources=args.sources,
                       method=args.method, max_new_tokens=args.max_new_tokens, allow_long=args.allow_long,
                       progress=progress(args), kernel=args.kernel)
    folder = output_folder(args.output)  # only now: every input was checked before the forward passes
    paths = save_attribution(result, folder, tokenizer, top=args.top)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return
    print(format_result(result, paths, args.top))


def format_result(result, paths: dict[str, str], top: int) -> str:
    from ..text import shorten

    context_tokens = sum(s.num_tokens for s in result.sources)
    lines = [
        f"prompt       {len(result.prompt_ids):,} tokens; context {len(result.context):,} chars, "
        f"{len(result.sources)} {result.config['sources']} over {context_tokens:,} tokens",
        f"response     {len(result.response_ids)} tokens ({'greedy answer' if result.config['generated'] else 'given'})"
        f": {shorten(result.response, 90)!r}",
        f"top sources  ({result.method}: the response's attention on the source, over layers and heads)",
        *[f"  {rank:>2}. {s.score:.4f}  {shorten(s.text, 80)}" for rank, s in enumerate(result.top(top), 1)],
        f"time         {result.seconds:.1f} s",
        f"wrote        {', '.join(paths.values())}",
    ]
    return "\n".join(lines)
