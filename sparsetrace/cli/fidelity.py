"""`sparsetrace check` and `sparsetrace min-k`: how faithful a trace is, and the smallest k that keeps the answer."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..errors import InputError
from .common import add_run_arguments, input_options, mean, prepare, progress, subcommand

CHECK_EXAMPLES = """examples:
  sparsetrace check --sample                            # recall vs oracle and next-token behaviour, k = 8
  sparsetrace check paper.txt --k 4 --block-size 32 --json > fidelity.json
  sparsetrace check notes.txt --score max --beam 8 --query-stride 1   # the paper's estimator
"""

MIN_K_EXAMPLES = """examples:
  sparsetrace min-k --sample                            # smallest k that keeps the next 2 tokens
  sparsetrace min-k needle.txt                          # a RULER needle prompt: its whole answer
  sparsetrace min-k prompt.txt --answer Paris           # the answer up to where it holds "Paris"
  sparsetrace min-k prompt.txt --n-match 4 --block-size 32 --json
  sparsetrace min-k --sample --budget coverage          # smallest coverage target p instead of k
"""


def register(sub) -> None:
    check = subcommand(
        sub, "check", run_check, CHECK_EXAMPLES, text_input=True,
        help="fidelity report: recall vs the oracle, next-token behaviour",
        description="Measure how faithful a trace of INPUT is: per layer, the share of the dense attention inside "
        "the kept blocks (recall) against the best selection of the same budget (oracle), and whether the sparse "
        "model reproduces the dense model's greedy next tokens (the paper's check), with KL and top-1 agreement.",
    )
    check.add_argument("--n-match", type=int, default=2, help="next tokens to compare (default 2, the paper's)")
    add_run_arguments(check)

    min_k = subcommand(
        sub, "min-k", run_min_k, MIN_K_EXAMPLES, text_input=True, help="smallest k that keeps the model's next tokens",
        description="Binary search over k for the smallest k whose sparse model reproduces the dense model's "
        "greedy next N tokens on INPUT; both neighbours of the answer are checked.",
    )
    min_k.add_argument("--n-match", type=int, default=None,
                       help="N: how many tokens of the dense model's greedy continuation, from the first one on, the "
                       "sparse model must reproduce (tokens, not characters: the space before a number is often one "
                       "of them). Default: the whole answer where one is known (--answer, or the value a RULER needle "
                       "prompt asks for), up to the token that completes it; else 2 (the paper's)")
    min_k.add_argument("--answer", default=None, help="the expected answer (e.g. a needle's value): N is the dense "
                       "continuation's tokens up to where it holds this text")
    min_k.add_argument("--budget", choices=["k", "coverage"], default="k", help="what to search: k (default), a "
                       "fixed number of blocks a row; or coverage, the smallest target p (of 0.5 ... 1.0) of a "
                       "coverage budget, each row keeping the fewest blocks whose estimated share of its attention "
                       "reaches p (rows bounded by --k-max blocks, default all)")
    min_k.add_argument("--k-max", dest="coverage_k_max", type=int, default=None,
                       help="with --budget coverage: the most blocks a row may "
                       "keep (default: every key block, so p = 1 is dense attention)")
    add_run_arguments(min_k, with_k=False)


def run_check(args: argparse.Namespace) -> None:
    from ..fidelity import check
    from ..models import describe_model

    model, tokenizer, text, config = prepare(args)
    report = check(model, tokenizer, text, config, n_match=args.n_match, **input_options(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    ratio = report.recall_ratio
    worst = min(range(len(ratio)), key=ratio.__getitem__)

    def shown(ids: list[int]) -> str:
        return " ".join(repr(tokenizer.decode([t])) for t in ids)

    lines = [
        f"model        {describe_model(model)['name']}   tokens {report.tokens:,}   {config.budget_text()}, blocks "
        f"{config.block_q}/{config.block_k}",
        f"behaviour    next {len(report.continuation)} tokens kept: {'yes' if report.match else 'NO'}   "
        f"(dense {shown(report.continuation)}; sparse {shown(report.sparse_predictions)})",
        f"             KL(dense || sparse) of the next token {report.kl_next_token:.4f}   "
        f"top-1 agreement {report.top1_agreement:.0%}",
        f"recall       {mean(report.recall):.3f} of the dense attention inside the kept blocks (oracle "
        f"{mean(report.oracle_recall):.3f}); recall / oracle: mean {mean(ratio):.3f}, worst {ratio[worst]:.3f} "
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
    from ..fidelity import min_coverage, min_k
    from ..tasks.niah import needle_value

    if args.answer is not None and args.n_match is not None:
        raise InputError("--answer sets how many tokens --n-match compares; give one of them")
    if args.coverage_k_max is not None and args.budget != "coverage":
        raise InputError(f"--k-max {args.coverage_k_max} bounds a coverage budget's rows; add --budget coverage, "
                         "or drop it")
    model, tokenizer, text, config = prepare(args)
    if args.coverage_k_max is not None:
        config = dataclasses.replace(config, coverage=1.0, k_min=1, k_max=args.coverage_k_max)
    answer = None if args.n_match is not None else args.answer or needle_value(text)
    if answer is None:
        n_match = args.n_match or 2
        search = min_coverage if args.budget == "coverage" else min_k
        result = search(model, tokenizer, text, config, n_match=n_match, **input_options(args))
        compared = f"the next {n_match} tokens"
    else:
        result, continuation = _min_k_of_answer(model, tokenizer, text, config, answer, args)
        n_match = len(continuation)
        compared = f"the next {n_match} tokens, the dense answer {tokenizer.decode(continuation)!r} " + \
            (f"up to {answer!r}" if answer.lower() in tokenizer.decode(continuation).lower() else
             f"(it never says {answer!r})")
    if args.json:
        print(json.dumps(result.to_dict() | {"n_match": n_match, "answer": answer}, indent=2))
        return
    print(_format_search(result, compared))


def _format_search(result, compared: str) -> str:
    """min-k's printout, for a search over k (`MinKResult`) or over p (`MinCoverageResult`)."""
    over_k = hasattr(result, "min_k")
    name, found = ("k", result.min_k) if over_k else ("p", result.min_coverage)
    tried = ", ".join(f"{name}={value} {'keeps' if ok else 'loses'}" for value, ok in sorted(result.passed.items()))
    if found is None:
        limit = f"up to {result.k_max}" if over_k else f"up to 1.0 (rows of at most {result.k_max} blocks)"
        return f"no {name} {limit} reproduces {compared} ({tried})"
    stats = result.stats_at_min_k if over_k else result.stats_at_min_coverage
    what = "k" if over_k else "coverage target p"
    lines = [
        f"min {name}        {found}: the smallest {what} whose sparse model keeps {compared}",
        f"at min {name}     sparsity {stats['sparsity']:.1%} of causal token pairs, block grid "
        f"{stats['block_sparsity']:.1%}, compression {stats['compression']:,.0f}x, "
        f"{stats['kept_per_row_mean']:.1f} blocks a row on average",
        f"tried        {tried}",
    ]
    if not result.monotone_near_answer:
        lines.append(f"note         the next {name} after {found} loses the tokens again: not monotone on this input")
    return "\n".join(lines)


def _min_k_of_answer(model, tokenizer, text: str, config, answer: str, args: argparse.Namespace):
    """`min_k` over the dense continuation up to where it holds `answer` (all of it if it never does):
    (MinKResult, int64 [N] the compared tokens)."""
    import torch

    from ..fidelity import greedy_continuation, search_min_coverage, search_min_k
    from ..models import eos_token_ids
    from ..tasks.niah import ANSWER_TOKENS, answer_end
    from ..tracer import prepare_input

    budget = ANSWER_TOKENS + len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    ids = prepare_input(model, tokenizer, text, None, config, max_tokens=args.max_tokens, allow_long=args.allow_long,
                        continuation=budget - 1)
    _, continuation, _ = greedy_continuation(model, ids, budget)
    continuation = continuation[:answer_end(tokenizer, continuation, answer, eos_token_ids(model))]
    search = search_min_coverage if args.budget == "coverage" else search_min_k
    result = search(model, tokenizer, torch.cat([ids, continuation[:-1]]), continuation, config,
                    progress=progress(args), kernel=args.kernel)
    return result, continuation
