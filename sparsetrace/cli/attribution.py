"""`sparsetrace attribute`: which sentences of a context a response relies on, from one traced pass;
`sparsetrace attribute-fit`: the per-head weights that pass is scored with, fit on a model's own ablations."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..choices import ATTRIBUTION_METHODS, DEFAULT_METHOD, SOURCE_KINDS
from ..errors import InputError
from .batch_options import add_batch_arguments
from .common import (
    add_run_arguments,
    load,
    output_folder,
    output_path,
    progress,
    read_input,
    stream_config,
    subcommand,
)

EXAMPLES = """examples:
  sparsetrace attribute paper.txt --query "Who proposed the method?" -o attr/    # the model answers greedily
  sparsetrace attribute notes.txt --query "When did it open?" --response "It opened in 1851." -o attr/ --json
  cat doc.txt | sparsetrace attribute - --query "Why?" -o attr/ --sources paragraphs --method max_head --top 10
  sparsetrace attribute doc.txt --query "Who?" -o attr/ --model org/name --head-weights name_heads.json
  sparsetrace attribute --batch pairs.jsonl -o many/ [--ray --workers 2]   # one {"context", "query"} a line
"""

FIT_EXAMPLES = """examples:
  sparsetrace attribute-fit train.jsonl -o heads.json --model org/name     # one {"context", "query"} per line
  sparsetrace attribute-fit train.jsonl -o heads.json --masks 32 --json

Each line of the JSONL file is {"context": ..., "query": ...} (optionally "response": ...; default the
model's greedy answer). Per example: one sparse traced pass and --masks dense passes with random
halves of the sentences removed; then AT2's fit (Pearson correlation with the ablations). Use texts
and questions like the ones you will attribute, but not the same ones. 30-60 examples of ~1k tokens
are enough for a 30-layer model (the default model's shipped weights: benchmarks/attribution/heads).
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
    parser.add_argument("context", metavar="CONTEXT", nargs="?", help="the context: a text file, or - for standard "
                        "input")
    parser.add_argument("--query", default=None, help="the question asked about the context (required with CONTEXT)")
    parser.add_argument("--batch", default=None, metavar="PAIRS.jsonl",
                        help="many pairs instead of CONTEXT and --query: one {\"context\", \"query\"[, \"response\", "
                        "\"id\"]} a line; DIR/pairs/NAME.json each (NAME: its id or a hash of its texts), resumable, "
                        "on Ray with --ray")
    parser.add_argument("--response", default=None, help="the response to attribute (default: the model answers "
                        "greedily)")
    parser.add_argument("-o", "--output", required=True, help="folder for the outputs (created if missing)")
    group = parser.add_argument_group("attribution")
    group.add_argument("--sources", default="sentences", choices=SOURCE_KINDS,
                       help="what a source is (default sentences; blocks: the trace's key blocks in the context)")
    group.add_argument("--method", default=DEFAULT_METHOD, choices=ATTRIBUTION_METHODS,
                       help="how per layer/head masses become one score: auto (default: learned where head weights "
                       "exist for the model, else max_head), learned (per-head weights fit on the model's own "
                       "ablations, AT2; shipped for the default model, or --head-weights), max_head (the largest head "
                       "per layer, mean over layers), mean (over layers and heads), mean_per_token (the same per "
                       "token of the source), focused (heads weighted by how few sources they read)")
    group.add_argument("--head-weights", default=None, metavar="FILE",
                       help="per-head weights from `sparsetrace attribute-fit` for --method learned/auto (default: "
                       "the package's for the model, where it has them)")
    group.add_argument("--max-new-tokens", type=int, default=64, help="token limit of the greedy answer (default 64)")
    group.add_argument("--top", type=int, default=5, help="sources printed and numbered in the figure (default 5)")
    add_batch_arguments(parser)
    add_run_arguments(parser, input_options=False)
    register_fit(sub)


def run(args: argparse.Namespace) -> None:
    from .batches import refuse_batch_flags, run_attribute_batch

    if args.batch is not None:
        return run_attribute_batch(args)
    refuse_batch_flags(args, "--batch")
    if args.context is None or args.query is None:
        raise InputError("give CONTEXT and --query Q (one pair), or --batch PAIRS.jsonl (many pairs)")
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
    head_weights = None
    if args.head_weights is not None:
        from ..analysis.head_weights import load_head_weights

        head_weights = load_head_weights(args.head_weights)  # a bad file is refused before the model loads
    config = stream_config(args)
    model, tokenizer = load(args)
    result = attribute(model, tokenizer, context, args.query, config, response=args.response, sources=args.sources,
                       method=args.method, head_weights=head_weights, max_new_tokens=args.max_new_tokens,
                       allow_long=args.allow_long, progress=progress(args), kernel=args.kernel)
    folder = output_folder(args.output)  # only now: every input was checked before the forward passes
    paths = save_attribution(result, folder, tokenizer, top=args.top)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return
    print(format_result(result, paths, args.top))


METHOD_MEANING = {"learned": "the response's attention on the source, heads weighted by the learned weights",
                  "max_head": "the response's attention on the source, the largest head of each layer"}


def format_result(result, paths: dict[str, str], top: int) -> str:
    from ..text import shorten

    context_tokens = sum(s.num_tokens for s in result.sources)
    lines = [
        f"prompt       {len(result.prompt_ids):,} tokens; context {len(result.context):,} chars, "
        f"{len(result.sources)} {result.config['sources']} over {context_tokens:,} tokens",
        f"response     {len(result.response_ids)} tokens ({'greedy answer' if result.config['generated'] else 'given'})"
        f": {shorten(result.response, 90)!r}",
        f"top sources  ({result.method}: {METHOD_MEANING.get(result.method, 'the response attention on the source')})",
        *[f"  {rank:>2}. {s.score:.4f}  {shorten(s.text, 80)}" for rank, s in enumerate(result.top(top), 1)],
        f"time         {result.seconds:.1f} s",
        f"wrote        {', '.join(paths.values())}",
    ]
    return "\n".join(lines)


def register_fit(sub) -> None:
    parser = subcommand(
        sub, "attribute-fit", run_fit, FIT_EXAMPLES,
        help="fit the per-head weights `attribute --method learned` scores with, on the model's own ablations",
        description="AT2 (Cohen-Wang et al. 2025) on the sparse pass: for each example, the attention mass of one "
        "traced pass and the dense model's response log-probability with random halves of the sources removed; "
        "the weights maximise the correlation between the two. Writes the weights (JSON) to -o.",
    )
    parser.add_argument("examples", metavar="EXAMPLES", help="JSONL file: one {\"context\", \"query\"[, "
                        "\"response\"]} per line, or - for standard input")
    parser.add_argument("-o", "--output", required=True, help="the weights file to write (.json)")
    group = parser.add_argument_group("fit")
    group.add_argument("--masks", type=int, default=32, help="random ablations per example (default 32, AT2's)")
    group.add_argument("--iterations", type=int, default=1000, help="Adam steps of the fit (default 1000)")
    group.add_argument("--seed", type=int, default=0, help="seed of the masks and the fit (default 0)")
    add_run_arguments(parser, input_options=False)


def run_fit(args: argparse.Namespace) -> None:
    from ..tasks.attribution_fit import check_examples, fit_attribution_heads

    examples = read_examples(read_input(args.examples, False), args.examples)
    check_examples(examples)
    if args.masks < 3 or args.iterations < 1:
        raise InputError("--masks takes at least 3 (a correlation needs them) and --iterations a positive number")
    output = output_path(args.output)
    config = stream_config(args)
    model, tokenizer = load(args)
    weights, samples = fit_attribution_heads(model, tokenizer, examples, masks=args.masks, seed=args.seed,
                                             config=config, iterations=args.iterations,
                                             progress=progress(args) is not False)
    weights.save(output)
    summary = {"output": str(output), "model": weights.model, **weights.training}
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"fit          {len(samples)} examples x {args.masks} ablations; mean Pearson correlation with the "
          f"ablations {weights.training['pearson_start']:.3f} (uniform weights) -> "
          f"{weights.training['pearson_fit']:.3f} (fit, on the training examples)")
    print(f"wrote        {output}")


def read_examples(text: str, name: str) -> list[dict]:
    """The JSONL training examples (`check_examples` checks their fields)."""
    examples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{name} line {number} is not JSON ({error.msg}); give one JSON object per line") from None
        examples.append(example)
    return examples
