"""`sparsetrace attribute --batch PAIRS.jsonl` and `sparsetrace anchors --each INPUT...`: many inputs, one
result file each, resumable, in this process or on Ray workers (`tasks.batch_runs`)."""

from __future__ import annotations

import argparse
import contextlib
import json

from ..errors import InputError
from .batch_options import BATCH_FLAGS, batch_executor
from .common import input_options, load, output_folder, progress, read_input, read_text_file, stream_config


def run_attribute_batch(args: argparse.Namespace) -> None:
    """Every pair of --batch: DIR/pairs/NAME.json each, DIR/run.json the run."""
    from ..tasks.batch_runs import attribute_batch, read_pairs

    given = [flag for flag, value in (("CONTEXT", args.context), ("--query", args.query),
                                      ("--response", args.response)) if value is not None]
    if given:
        raise InputError(f"--batch reads every context and query from its JSONL file; drop {', '.join(given)}")
    pairs = read_pairs(read_text_file(args.batch), args.batch)
    if args.top < 1 or args.max_new_tokens < 1:
        raise InputError("--top and --max-new-tokens take positive numbers")
    head_weights = None
    if args.head_weights is not None:
        from ..analysis.head_weights import load_head_weights

        head_weights = load_head_weights(args.head_weights)
    config, executor = stream_config(args), batch_executor(args)
    folder = output_folder(args.output)
    model, tokenizer = (None, None) if executor is not None else load(args)

    def report(name: str, result: dict) -> None:
        if not args.json:
            scored = [s for s in result["sources"] if s["score"] is not None]
            top = f"top {max(scored, key=lambda s: s['score'])['text'][:70]!r}" if scored else "no scores"
            print(f"{name}: {len(result['sources'])} sources, {top} ({result['seconds']:.1f} s)", flush=True)

    with executor or contextlib.nullcontext():
        batch = attribute_batch(model, tokenizer, pairs, folder, config, executor=executor,
                                retry_failed=args.retry_failed, progress=progress(args), on_pair=report,
                                sources=args.sources, method=args.method, head_weights=head_weights,
                                max_new_tokens=args.max_new_tokens, allow_long=args.allow_long, kernel=args.kernel)
    _finish(args, batch, folder / "pairs", "pairs")


def run_anchors_each(args: argparse.Namespace) -> None:
    """Thought anchors of each INPUT on its own: DIR/texts/NAME.json each, DIR/run.json the run."""
    from ..tasks.batch_runs import anchors_each

    if args.generate is not None or args.sample or not args.inputs:
        raise InputError("--each runs the INPUT files one by one; give them as INPUT (not --generate or --sample)")
    if args.causal or args.layer is not None:
        raise InputError("--each writes one anchors JSON per text; drop --causal and --layer, or run the texts "
                         "without --each")
    if args.labels is not None and len(args.labels) != len(args.inputs):
        raise InputError(f"{len(args.labels)} --labels files for {len(args.inputs)} inputs; give one per INPUT")
    texts = [read_input(path, False) for path in args.inputs]
    names = ["stdin" if path == "-" else path for path in args.inputs]
    config, executor = stream_config(args), batch_executor(args)
    folder = output_folder(args.output)
    model, tokenizer = (None, None) if executor is not None else load(args)

    def report(name: str, result: dict) -> None:
        if not args.json:
            text = result["texts"][0]
            heads = ", ".join(f"L{layer}H{h}" for layer, h in result["receiver_heads"][:5])
            print(f"{name}: {text['tokens']:,} tokens, {text['num_units']} units; receiver heads {heads}", flush=True)

    options = input_options(args) | {"progress": progress(args)}
    with executor or contextlib.nullcontext():
        batch = anchors_each(model, tokenizer, texts, names, folder, config, labels=args.labels, executor=executor,
                             retry_failed=args.retry_failed, on_text=report, units=args.units, region=args.region,
                             proximity=args.proximity, control_depth=args.control_depth, top_heads=args.top_heads,
                             exclude_layer0=args.exclude_layer_0, key_average=args.key_average,
                             dense_check=args.dense_check, dense_max_tokens=args.dense_max_tokens, **options)
    _finish(args, batch, folder / "texts", "texts")


def refuse_batch_flags(args: argparse.Namespace, switch: str) -> None:
    """Refuse the flags of many units on a command run without `switch` (--batch, --each)."""
    given = [flag for flag, dest in BATCH_FLAGS if getattr(args, dest) not in (None, False)]
    if given:
        raise InputError(f"{', '.join(given)} run many inputs as units; add {switch}, or drop them")


def _finish(args: argparse.Namespace, batch, results, what: str) -> None:
    """Print where the results are (or them, with --json), then raise the failures, if any."""
    if args.json:
        print(json.dumps({"results": {name: str(results / f"{name}.json") for name in batch.results},
                          "failures": batch.failures, "summary": str(batch.summary_path)}, indent=1))
    else:
        print(f"wrote        {results}/ ({len(batch.results)} {what}), {batch.summary_path}"
              + (f"; {len(batch.failures)} failed" if batch.failures else ""))
    batch.check()
