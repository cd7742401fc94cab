"""`sparsetrace ablate`: a response's log-probability with spans, heads or text knocked out."""

from __future__ import annotations

import argparse
import json

from ..errors import InputError
from .common import add_run_arguments, load, progress, read_input, stream_config, subcommand

EXAMPLES = """examples:
  sparsetrace ablate prompt.txt --response " 1679215" --knockout "tide-step = 1679215"   # cut the needle off
  sparsetrace ablate prompt.txt --head 7:7 --head 17:3 --json       # the model's own 8-token answer, 2 heads zeroed
  sparsetrace ablate prompt.txt --knockout chars:0-400 --layers 0 1 2 --heads 0 4 --forward dense
  sparsetrace ablate doc.txt --response " yes" --remove "First sentence." --remove "tokens:40-60" --separately

A SPAN is tokens:A-B (prompt tokens, B exclusive), chars:A-B, or a string (its first occurrence).
"""


def register(sub) -> None:
    parser = subcommand(
        sub, "ablate", run_ablate, EXAMPLES, text_input=True,
        help="causal check: a response's log-probability with spans, heads or text knocked out",
        description="Teacher-force a response after the prompt INPUT and report its per-token log-probabilities "
        "without and with an intervention: attention knockout of spans (later queries may not read them; the "
        "tokens stay), head knockout (a head's output zeroed or replaced by its mean), or text removal (the "
        "span's characters deleted, the prompt tokenized again: ContextCite's ablation). Runs on Stream's sparse "
        "attention (default) or the model's dense attention (--forward dense).",
    )
    what = parser.add_argument_group("intervention (one, or one per span with --separately)")
    what.add_argument("--response", default=None,
                      help="the response to score (default: the dense model's greedy continuation of "
                      "--response-tokens tokens)")
    what.add_argument("--response-tokens", type=int, default=8,
                      help="length of the greedy response when --response is not given (default 8)")
    what.add_argument("--knockout", action="append", default=[], metavar="SPAN",
                      help="a span later queries may not attend to (repeatable)")
    what.add_argument("--layers", type=int, nargs="+", default=None, help="layers of the knockout (default: all)")
    what.add_argument("--heads", type=int, nargs="+", default=None, help="heads of the knockout (default: all)")
    what.add_argument("--head", action="append", default=[], metavar="L:H",
                      help="remove the output of head H of layer L (repeatable)")
    what.add_argument("--head-mode", default="zero", choices=["zero", "mean"],
                      help="replace a removed head's output by zero (default) or by its mean over the positions")
    what.add_argument("--remove", action="append", default=[], metavar="SPAN",
                      help="delete a span's text from the prompt and tokenize it again (repeatable)")
    what.add_argument("--separately", action="store_true",
                      help="one intervention per --knockout / --remove span / --head, instead of all at once")
    what.add_argument("--forward", default="sparse", choices=["sparse", "dense"],
                      help="run on Stream's sparse attention (default, with the estimator flags) or the model's own")
    add_run_arguments(parser, input_options=False)


def run_ablate(args: argparse.Namespace) -> None:
    from ..ablation import response_logprobs
    from ..analysis.spans import TraceText, parse_span
    from ..fidelity import greedy_continuation
    from ..interventions import Intervention
    from ..models import describe_model, load_tokenizer
    from ..text import token_offsets
    from ..tracer import prepare_input

    text = read_input(args.input, args.sample)
    config = stream_config(args)
    heads = [_head(spec) for spec in args.head]
    if not (args.knockout or heads or args.remove):
        raise InputError("nothing to ablate; give --knockout SPAN, --head L:H or --remove SPAN")
    if args.response is not None and not args.response.strip():
        raise InputError("--response is empty; give the response text, or leave it out for the model's own")
    if args.response_tokens < 1:
        raise InputError(f"--response-tokens {args.response_tokens}; use a positive number of tokens")
    ids, offsets = token_offsets(load_tokenizer(args.model), text)  # spans are checked before the weights load
    prompt = TraceText(text, offsets, True)
    knockout = [parse_span(spec, len(ids), prompt) for spec in args.knockout]
    removed = [parse_span(spec, len(ids), prompt) for spec in args.remove]
    model, tokenizer = load(args)
    removed_chars = [(offsets[s.start][0], offsets[s.end - 1][1]) for s in removed]
    where = dict(layers=args.layers, heads=args.heads) if knockout else {}
    if args.separately:
        interventions = [Intervention(knockout=[s.tokens], **where, label=f"knockout {s.spec}") for s in knockout]
        interventions += [Intervention(heads_out=[h], head_mode=args.head_mode, label=f"head {h[0]}:{h[1]}")
                          for h in heads]
        interventions += [Intervention(remove=[c], label=f"remove {s.spec}") for s, c in zip(removed, removed_chars,
                                                                                            strict=True)]
    else:
        interventions = []
        if knockout or heads:
            interventions.append(Intervention(knockout=[s.tokens for s in knockout], **where, heads_out=heads,
                                              head_mode=args.head_mode))
        if removed:
            interventions.append(Intervention(remove=removed_chars))
    info = describe_model(model)
    for iv in interventions:  # before the greedy answer: bad layers or heads fail at once
        iv.check(info["num_layers"], info["num_heads"], len(ids), len(text))
    response = args.response
    if response is None:
        prepare_input(model, tokenizer, None, ids, config, allow_long=args.allow_long,
                      continuation=args.response_tokens)
        response = greedy_continuation(model, ids, args.response_tokens)[1].tolist()
    result = response_logprobs(model, tokenizer, text, response, interventions, forward=args.forward, config=config,
                               allow_long=args.allow_long, progress=progress(args), kernel=args.kernel)
    spans = {"knockout": [s.to_dict() for s in knockout], "remove": [s.to_dict() for s in removed]}
    if args.json:
        print(json.dumps(result.to_dict() | {"spans": spans, "response": tokenizer.decode(result.response_ids)},
                         indent=2))
        return
    print(f"prompt       {len(ids):,} tokens; response {tokenizer.decode(result.response_ids)!r} "
          f"({len(result.response_ids)} tokens), {args.forward} attention"
          + (f", {config.budget_text()}" if args.forward == "sparse" else ""))
    print(f"unchanged    log p = {float(result.base.sum()):.3f}")
    for iv, row, drop in zip(result.interventions, result.logprobs, result.drop, strict=True):
        print(f"{iv.describe()}\n             log p = {float(row.sum()):.3f}   drop {float(drop):+.3f}")
    print(f"time         {result.seconds:.1f} s")


def _head(spec: str) -> tuple[int, int]:
    layer, sep, head = spec.partition(":")
    if not sep or not layer.strip().isdigit() or not head.strip().isdigit():
        raise InputError(f"--head {spec!r}: write LAYER:HEAD with whole numbers, e.g. --head 7:3")
    return int(layer), int(head)
