"""`sparsetrace anchors`: thought anchors of reasoning texts (given, or written by the model with --generate)."""

from __future__ import annotations

import argparse
import json

from ..errors import InputError
from .batch_options import add_batch_arguments
from .common import add_run_arguments, input_options, load, output_folder, read_input, stream_config, subcommand

EXAMPLES = """examples:
  sparsetrace anchors cot.txt -o anchors/                      # sentences, receiver heads, figures
  sparsetrace anchors a.txt b.txt c.txt -o anchors/ --top-heads 10      # receiver heads over 3 traces
  sparsetrace anchors --generate "What is 17 * 23? Think step by step." -o gen/ --max-new-tokens 800
  sparsetrace anchors cot.txt -o anchors/ --units paragraphs --labels cot_labels.json --k 4 --block-size 32
  sparsetrace anchors cot.txt -o anchors/ --causal --causal-forward dense  # + attention-suppression check
  sparsetrace anchors cots/*.txt --each -o many/ [--ray --workers 2]   # one result per text, resumable
"""


def register(sub) -> None:
    parser = subcommand(
        sub, "anchors", run, EXAMPLES,
        help="thought anchors: the sentences later reasoning keeps reading (receiver heads, vertical scores)",
        description="Split each reasoning text into units, trace it once on sparse attention while summing the "
        "attention between units, and find the receiver heads (largest kurtosis of vertical scores) and the units "
        "they read (Bogdan et al. 2025). Writes anchors.json, unit_attention.npz, figures and the traces to DIR.",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="reasoning text file(s), or - for standard input")
    parser.add_argument("--sample", action="store_true", help="use the built-in ~4k-token sample text")
    parser.add_argument("--generate", metavar="PROBLEM", default=None,
                        help="let the model write its own chain of thought on PROBLEM first (chat template)")
    parser.add_argument("-o", "--output", required=True, help="folder for the outputs (created if missing)")
    parser.add_argument("--each", action="store_true",
                        help="each INPUT on its own: its own receiver heads and one DIR/texts/NAME.json (NAME: the "
                        "file's name and a hash of its text), resumable, on Ray with --ray; without it the receiver "
                        "heads are chosen once over all texts (their kurtosis averaged)")
    units = parser.add_argument_group("thought anchors")
    units.add_argument("--units", default="sentences", choices=["sentences", "paragraphs", "blocks"],
                       help="unit of analysis (default sentences, split as the thought-anchors work)")
    units.add_argument("--region", default="auto", choices=["auto", "think", "assistant", "all"],
                       help="part of the text split into units (default auto: inside <think> if present, else the "
                       "assistant turns of a ChatML transcript, else all)")
    units.add_argument("--proximity", type=int, default=4, help="rows i >= j + N count for unit j (default 4)")
    units.add_argument("--control-depth", action="store_true", help="rank-normalise each row first (depth control)")
    units.add_argument("--top-heads", type=int, default=20, help="number of receiver heads (default 20)")
    units.add_argument("--exclude-layer-0", action="store_true",
                       help="never pick layer 0 heads as receiver heads (default: they may be, as in the "
                       "thought-anchors code that scores sentences)")
    units.add_argument("--key-average", default="mean", choices=["mean", "sum"],
                       help="A[i, j] averages the probability over the unit i x unit j block (mean, default: the "
                       "thought-anchors definition) or sums it over unit j's tokens (sum: the total attention a "
                       "unit receives, for units of very different lengths; not the paper's measure)")
    units.add_argument("--labels", nargs="+", default=None, metavar="FILE",
                       help="JSON category labels, one file per INPUT (default: the rule-based tagger)")
    units.add_argument("--layer", type=int, default=None,
                       help="layer of the vertical-score figure (default: the top receiver head's)")
    units.add_argument("--dense-check", default="auto", choices=["auto", "always", "never"],
                       help="also run the dense reference (k covering every block) and report Spearman(sparse, "
                       "dense) of unit scores (auto: inputs up to --dense-max-tokens)")
    units.add_argument("--dense-max-tokens", type=int, default=2048, help="auto dense check up to N tokens")
    causal = parser.add_argument_group("causal check (--causal)")
    causal.add_argument("--causal", action="store_true",
                        help="also run the attention-suppression check (Bogdan et al.): one pass per unit in which no "
                        "later token may attend to it; writes the matrix of KL effects on later units, each unit's "
                        "causal score, its Spearman correlation with the receiver-head scores, and suppression.png")
    causal.add_argument("--causal-forward", default="sparse", choices=["sparse", "dense"],
                        help="attention of the suppression passes: sparse (default: Stream's sparse attention with "
                        "the same --k and blocks as the trace; every pass runs whole) or dense (the model's own "
                        "attention; each pass reuses the cached prefix before the suppressed unit)")
    gen = parser.add_argument_group("generation (--generate)")
    gen.add_argument("--max-new-tokens", type=int, default=1024, help="token limit of the reply (default 1024)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="(default 1.0 = none)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_batch_arguments(parser)
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> None:
    from .batches import refuse_batch_flags, run_anchors_each

    if args.each:
        return run_anchors_each(args)
    refuse_batch_flags(args, "--each")
    from ..tasks.anchor_runs import anchors, save_anchors

    sources = len(args.inputs) + bool(args.sample) + (args.generate is not None)
    if sources == 0 or (args.generate is not None and sources > 1) or (args.sample and args.inputs):
        raise InputError("give the reasoning text(s) as INPUT files (or - / --sample), or --generate PROBLEM; not both")
    if args.labels is not None and len(args.labels) != max(len(args.inputs), 1):
        raise InputError(f"{len(args.labels)} --labels files for {max(len(args.inputs), 1)} inputs; give one per INPUT")
    texts = [read_input(None, True)] if args.sample else [read_input(path, False) for path in args.inputs]
    names = ["sample"] if args.sample else list(args.inputs)
    config = stream_config(args)
    folder = output_folder(args.output)
    model, tokenizer = load(args)
    regions = [args.region] * len(texts)
    generation = None
    if args.generate is not None:
        from ..files import write_json
        from ..generation import generate_reasoning

        generation = generate_reasoning(model, tokenizer, args.generate, max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_p=args.top_p,
                                        repetition_penalty=args.repetition_penalty, seed=args.seed,
                                        progress=not args.no_progress)
        (folder / "reasoning.txt").write_text(generation.text, encoding="utf-8")
        write_json(folder / "generation.json", {"problem": args.generate, **generation.settings,
                                                "new_tokens": generation.new_tokens})
        texts, names = [generation.text], ["generated"]
        regions = [generation.reply_spans[0]] if generation.reply_spans and args.region == "auto" else [args.region]
    options = input_options(args)
    result = anchors(model, tokenizer, texts, config, units=args.units, regions=regions, names=names,
                     labels=args.labels, proximity=args.proximity, control_depth=args.control_depth,
                     top_heads=args.top_heads, exclude_layer0=args.exclude_layer_0, key_average=args.key_average,
                     dense_check=args.dense_check, dense_max_tokens=args.dense_max_tokens,
                     causal=args.causal_forward if args.causal else None, **options)
    paths = save_anchors(result, folder, layer=args.layer)
    if args.json:
        print(json.dumps({"receiver_heads": result.receiver_heads, "dense_reference": result.dense,
                          "texts": [{"name": t.name, "fidelity": t.fidelity,
                                     **({"causal": _causal_summary(t)} if t.suppression is not None else {})}
                                    for t in result.texts],
                          "files": paths}, indent=2))
        return
    print(format_result(result, paths))


def format_result(result, paths: dict[str, str]) -> str:
    import numpy as np

    from ..text import shorten

    heads = ", ".join(f"L{layer}H{h}" for layer, h in result.receiver_heads[:8])
    lines = [f"receivers    {heads}{' ...' if len(result.receiver_heads) > 8 else ''} "
             f"(top {len(result.receiver_heads)} by kurtosis of vertical scores)"]
    for t in result.texts:
        f = t.fidelity
        ranked = sorted((u for u in t.units if u.score is not None), key=lambda u: -u.score)[:3]
        answer = {True: "preserved", False: "NOT preserved", None: "not checked"}[f.get("answer_preserved")]
        lines += [
            f"{t.name}: {f['tokens']:,} tokens, {len(t.units)} units; pruned {f['sparsity']:.1%} of token "
            f"interactions, compression {f['compression']:,.0f}x, trace {f['dense_to_trace_ratio']:,.0f}x smaller "
            f"than dense patterns; final answer {answer} by the sparse model",
            *[f"  anchor     {u.score:.4f}  [{u.category}] {shorten(u.text, 70)}" for u in ranked],
            f"  categories {t.categories_source}",
        ]
    if result.dense:
        for d in result.dense["texts"]:
            rho = d["spearman_scores"]
            lines.append(f"dense check  {d['name']}: Spearman(sparse, dense) of unit scores "
                         f"{'n/a' if rho is None else f'{rho:.3f}'}; receiver heads shared "
                         f"{result.dense['receiver_overlap']}/{len(result.receiver_heads)}")
    for t in result.texts:
        if t.suppression is None:
            continue
        c = _causal_summary(t)
        rho = c["spearman_vs_receiver_scores"]
        lines.append(f"causal       {t.name}: {c['forward']} suppression, {len(t.units) - 1} passes, "
                     f"{c['seconds_per_unit']:.2f} s per unit; Spearman(causal, receiver-head scores) "
                     f"{'n/a' if rho is None else f'{rho:.3f}'} over the units with both")
        ranked = [i for i in np.argsort(-np.nan_to_num(t.suppression.scores, nan=-np.inf))[:3]
                  if np.isfinite(t.suppression.scores[i])]
        lines += [f"  causal     {t.suppression.scores[i]:.4g}  [{t.units[i].category}] {shorten(t.units[i].text, 70)}"
                  for i in ranked]
    lines.append(f"wrote        {paths['json']}, figures and traces in the same folder")
    return "\n".join(lines)


def _causal_summary(t) -> dict:
    c = t.causal
    return {key: c[key] for key in ("forward", "seconds", "seconds_per_unit", "spearman_vs_receiver_scores",
                                    "spearman_log_scores_vs_receiver_scores")}
