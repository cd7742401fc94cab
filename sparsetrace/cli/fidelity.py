"""`sparsetrace check` and `sparsetrace min-k`: how faithful a trace is, and the smallest k that keeps the answer."""

from __future__ import annotations

import argparse
import json

from .common import add_run_arguments, input_options, mean, prepare, subcommand

CHECK_EXAMPLES = """examples:
  sparsetrace check --sample                            # recall vs oracle and next-token behaviour, k = 8
  sparsetrace check paper.txt --k 4 --block-size 32 --json > fidelity.json
  sparsetrace check notes.txt --score max --beam 8 --query-stride 1   # the paper's estimator
"""

MIN_K_EXAMPLES = """examples:
  sparsetrace min-k --sample                            # smallest k that keeps the next 2 tokens
  sparsetrace min-k prompt.txt --n-match 4 --block-size 32 --json
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
    min_k.add_argument("--n-match", type=int, default=2, help="next tokens to compare (default 2, the paper's)")
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
        f"model        {describe_model(model)['name']}   tokens {report.tokens:,}   k = {config.k}, blocks "
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
    from ..fidelity import min_k

    model, tokenizer, text, config = prepare(args)
    result = min_k(model, tokenizer, text, config, n_match=args.n_match, **input_options(args))
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
