"""`sparsetrace niah` and `sparsetrace sweep`: needle-in-a-haystack routes, one prompt or a length x depth grid."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path

from ..errors import InputError
from .batch_options import add_batch_arguments, batch_executor
from .common import add_run_arguments, load, output_folder, progress, read_text_file, stream_config, subcommand

NIAH_EXAMPLES = """examples:
  sparsetrace niah -o niah/                             # RULER's 4k prompt, needle at depth 0.5, k = auto
  sparsetrace niah --length 2048 --depth 0.9 --k 8 -o late/
  sparsetrace niah --prompts niah_single_1/validation.jsonl --row 3 -o ruler3/   # RULER's own prompt
  sparsetrace niah --haystack essay.txt --length 8192 --k-schedule mass -o essay/
  sparsetrace niah --length 2048 --causal --causal-forward dense -o causal/   # knock out the reader heads
"""

SWEEP_EXAMPLES = """examples:
  sparsetrace sweep --lengths 1024 2048 --depths 0.1 0.5 0.9 -o sweep/
  sparsetrace sweep -o sweep/          # 1k-8k x 5 depths; run it again to resume
  sparsetrace sweep --prompts niah_single_1/validation.jsonl -o ruler/   # every prompt of a RULER jsonl
  sparsetrace sweep --ray --workers 2 -o sweep/                     # on a local Ray: 2 workers, a model each
  sparsetrace sweep --ray-address auto --num-cpus 4 -o sweep/       # on the Ray cluster this node is part of
"""


def register(sub) -> None:
    niah = subcommand(
        sub, "niah", run_niah, NIAH_EXAMPLES,
        help="needle in a haystack: the dense answer, min k, and the route from needle to answer",
        description="Build RULER's single-needle prompt (niah_single_1: noise haystack, 7-digit value; or read one "
        "from RULER's jsonl with --prompts), get the dense model's answer, trace it (with --k auto: the smallest k "
        "that keeps the whole answer teacher-forced), let the sparse model answer on its own, score both answers "
        "with RULER's string_match_all, and draw the route the needle takes to the answer through the layers, with "
        "the heads that read it.",
    )
    niah.add_argument("--length", type=int, default=None, help="prompt length in tokens, RULER's 128-token "
                      "generation budget included (default 4096)")
    niah.add_argument("--depth", type=float, default=None, help="needle position, 0 = start .. 1 = end (default 0.5)")
    niah.add_argument("--row", type=int, default=None, help="with --prompts: which prompt, 0 = the file's first "
                      "(default 0)")
    niah.add_argument("--k", dest="needle_k", default=None,
                      help="key blocks per query block, or auto (default): the smallest k that keeps the dense answer")
    niah.add_argument("-o", "--output", required=True, help="folder for niah.json, route.png, needle_heads.png, "
                      "trace.sptrace (created if missing)")
    niah.add_argument("--causal", action="store_true", help="causal check of the reader heads: knock out the top-N "
                      "reader heads and N random heads, measure the RULER accuracy of the greedy answer and the drop "
                      "of the answer's log-probability (niah.json 'causal', causal.png)")
    niah.add_argument("--causal-n", type=int, nargs="+", default=None, metavar="N",
                      help="numbers of heads to knock out (default 5 10 20); each needs 2N <= layers x heads")
    niah.add_argument("--causal-seeds", type=int, default=None, metavar="S",
                      help="random head draws per N, seeds 0..S-1 (default 5)")
    niah.add_argument("--causal-forward", choices=["sparse", "dense"], default=None,
                      help="sparse: Stream's sparse attention at the run's k (default); dense: the model's own "
                      "attention")
    _add_needle_arguments(niah)
    add_run_arguments(niah, with_k=False, input_options=False)

    sweep = subcommand(
        sub, "sweep", run_sweep, SWEEP_EXAMPLES,
        help="needle sweep over lengths x depths: correctness, min k, sparsity, routes",
        description="For every length x depth (or every prompt of --prompts FILE.jsonl): the dense answer's "
        "correctness, the smallest k that keeps it, the sparse model's own answer there and both answers' RULER "
        "scores, the kept fraction and compression, and whether a route joins needle and answer; heatmaps of each. "
        "Resumable: finished cells (DIR/cells/) are kept and skipped; DIR/run.json counts done / failed / "
        "remaining cells and holds each failure's error. Cells run in this process, or on Ray workers (--ray).",
    )
    sweep.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths, RULER's generation "
                       "budget included (default 1024 2048 4096 8192)")
    sweep.add_argument("--depths", type=float, nargs="+", default=None, help="needle depths (default 0.1 0.3 0.5 0.7 "
                       "0.9)")
    sweep.add_argument("-o", "--output", required=True, help="folder for sweep.json, sweep.png and cells/")
    _add_needle_arguments(sweep)
    add_batch_arguments(sweep)
    add_run_arguments(sweep, with_k=False, input_options=False)


def _add_needle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", default=None, metavar="FILE.jsonl", help="RULER's own prompts: the jsonl its "
                        "prepare.py writes (fields input, answer_prefix, outputs), run as they are")
    parser.add_argument("--seed", type=int, default=None, help="chooses the needle's key and value (default 0)")
    parser.add_argument("--haystack", default=None, help="text file whose sentences replace RULER's noise haystack")
    parser.add_argument("--no-chat-template", action="store_true", help="plain prompt even if the model has a "
                        "chat template (base models)")
    parser.add_argument("--form", choices=["ruler", "legacy"], default=None, help="ruler (default): RULER's "
                        "niah_single_1 prompt; legacy: sparsetrace's earlier prompt (plural wording, space joins, "
                        "400 keys, no generation budget in --length), to reproduce earlier results")
    parser.add_argument("--k-max", type=int, default=None, help="largest k the min-k search tries (default: all)")
    parser.add_argument("--coverage", type=float, default=None, metavar="P",
                        help="a coverage budget instead of a k: each row keeps the fewest blocks whose estimated share "
                        "of its attention reaches P (e.g. 0.95; at most 4k blocks a row), traced once, no k search")
    parser.add_argument("--threshold", type=float, default=None, help="smallest needle flow a route edge carries "
                        "(default 0.05: mass x the share of the needle its source block holds)")


def run_niah(args: argparse.Namespace) -> None:
    from ..tasks.needle_runs import run_niah as run
    from ..tasks.needle_runs import save_niah

    if args.coverage is not None and args.needle_k is not None:
        raise InputError(f"--k {args.needle_k} and --coverage {args.coverage} are two budgets; give one of them")
    k, threshold = _needle_k(args.needle_k or "auto"), _threshold(args)
    causal_options = _causal_options(args)
    build = _prompt_options(args, length=args.length, depth=args.depth)
    if args.row is not None and (args.row < 0 or args.prompts is None):
        raise InputError(f"--row {args.row}: give a prompt's position in --prompts FILE.jsonl, 0 for the first")
    config = _with_coverage(stream_config(args), args)
    output_folder(args.output, create=False)  # created once the prompt and the run are accepted
    model, tokenizer = load(args)
    if causal_options is not None:
        from ..models import describe_model
        from ..tasks.needle_causal import check_knockout_sizes

        info = describe_model(model)  # refuse an N the model cannot hold before any forward pass
        check_knockout_sizes(causal_options["n"], info["num_layers"], info["num_heads"])
    prompt = _one_prompt(tokenizer, args, build)
    result = run(model, tokenizer, prompt, config, k=k, k_max=args.k_max, allow_long=args.allow_long,
                 progress=progress(args), kernel=args.kernel, **threshold)
    causal = None
    if causal_options is not None:
        from ..tasks.needle_causal import reader_head_knockout

        causal = reader_head_knockout(model, tokenizer, prompt, result, allow_long=args.allow_long,
                                      progress=progress(args), kernel=args.kernel, **causal_options)
    paths = save_niah(result, tokenizer, output_folder(args.output), causal=causal)
    summary = result.summary() | ({} if causal is None else {"causal": causal.to_dict()})
    if args.json:
        print(json.dumps(summary | {"files": paths}, indent=2))
        return
    route = summary["route"]
    readers = sorted(((m, int(layer), h) for layer, heads in route["heads_reading_needle"].items() for h, m in heads),
                     reverse=True)[:5]
    needle = f"{prompt.key} = {prompt.answer}" if prompt.key else repr(prompt.answer)
    lines = [
        f"prompt       {prompt.num_tokens:,} tokens, needle {needle} at depth {prompt.depth} "
        f"(tokens {prompt.needle_tokens[0]}-{prompt.needle_tokens[1]}, blocks {route['needle_blocks']})",
        f"dense answer {result.answer.text!r}: {'right' if result.answer.correct else 'WRONG'} (RULER score "
        f"{result.dense_score:g})",
        f"trace        {result.budget}" + (" (smallest k that keeps the answer)" if summary["min_k"] is not None else
                                           " (no k up to k-max keeps the answer)" if k == "auto" and result.k else
                                           f", {summary['kept_per_row_mean']:.1f} blocks a row" if result.k is None
                                           else "")
        + f": answer {'kept' if result.answer_kept else 'LOST'} teacher-forced; kept "
        f"{summary['kept_fraction']:.1%} of token pairs, compression {summary['compression']:,.0f}x",
        f"sparse answer {result.sparse_answer.text!r}: the sparse model's own at {result.budget}, RULER score "
        f"{result.sparse_score:g}",
        f"route        needle -> answer {'connected' if route['connected'] else 'NOT connected'}: "
        f"{len(route['route_attention_edges'])} attention edges carry >= {route['threshold']} of the needle",
        "readers      " + (", ".join(f"layer {layer} head {h} ({m:.2f})" for m, layer, h in readers) or "none")
        + "  (mass the answer block puts on the needle)",
    ]
    if causal is not None:
        where = f"sparse forward at {result.budget}" if causal.forward == "sparse" else "dense forward"
        lines.append(f"causal       {causal.head_mode} knockout, {where}; unchanged: accuracy "
                     f"{causal.base.accuracy:.0%}, answer {causal.base.prediction!r}")
        for row in causal.per_n():
            lines.append(f"  N = {row['n']:<3}     top heads: accuracy {row['top_accuracy']:.0%}, drop "
                         f"{row['top_drop']:.2f} nats | {row['random_seeds']} random draws: accuracy "
                         f"{row['random_accuracy_mean']:.0%} ± {row['random_accuracy_std']:.0%}, drop "
                         f"{row['random_drop_mean']:.2f} ± {row['random_drop_std']:.2f} nats")
    lines.append(f"wrote        {paths['route']} (the route), {paths['heads']}, {paths['json']}, {paths['trace']}"
                 + (f", {paths['causal']}" if causal is not None else ""))
    print("\n".join(lines))


def run_sweep(args: argparse.Namespace) -> None:
    from ..tasks.needle_runs import sweep

    config, threshold = _with_coverage(stream_config(args), args), _threshold(args)
    build = _prompt_options(args, lengths=args.lengths, depths=args.depths)
    lengths, depths = (None, None) if args.prompts else (args.lengths or [1024, 2048, 4096, 8192],
                                                        args.depths or [0.1, 0.3, 0.5, 0.7, 0.9])
    if any(not 0 <= d <= 1 for d in depths or []):
        raise InputError(f"depths {depths} must lie in [0, 1]; 0 puts the needle first, 1 last")
    executor = batch_executor(args)
    folder = output_folder(args.output)
    if executor is None:
        model, tokenizer = load(args)
    else:  # the workers load the model; here only the tokenizer RULER's prompts need
        from ..models import load_tokenizer

        model, tokenizer = None, load_tokenizer(args.model) if args.prompts else None
    prompts = None
    if args.prompts:
        from ..tasks.niah import ruler_prompts

        prompts = ruler_prompts(tokenizer, args.prompts)

    def report(cell: dict) -> None:
        if not args.json:
            where = f"row {cell['row']:>3}  {cell['tokens']:>6} tokens" if "row" in cell else \
                f"length {cell['length']:>6}"
            print(f"{where}  depth {cell['depth']:.2f}: answer {cell['dense_answer']!r} "
                  f"({'right' if cell['correct'] else 'wrong'}), "
                  + (f"min k {cell['min_k']}" if config.coverage is None else
                     f"{cell['kept_per_row_mean']:.1f} blocks a row, answer "
                     f"{'kept' if cell['answer_kept'] else 'LOST'}")
                  + ", sparse model's own answer "
                  f"{cell['sparse_answer']!r} (score {cell['sparse_score']:g}), route "
                  f"{'connected' if cell['connected'] else 'not connected'}  ({cell['seconds']:.0f} s)", flush=True)

    with executor or contextlib.nullcontext():
        cells = sweep(model, tokenizer, lengths, depths, folder, config, k_max=args.k_max, prompts=prompts, **build,
                      allow_long=args.allow_long, progress=progress(args), kernel=args.kernel, on_cell=report,
                      executor=executor, retry_failed=args.retry_failed, **threshold)
    if args.json:
        print(json.dumps(cells, indent=2))
    else:
        print(f"wrote        {folder / 'sweep.png'}, {folder / 'sweep.json'} ({len(cells)} cells)")


def _with_coverage(config, args: argparse.Namespace):
    """The config with the --coverage budget, if given (its k_min and k_max at their defaults)."""
    if args.coverage is None:
        return config
    if args.k_max is not None:
        raise InputError(f"--k-max {args.k_max} bounds the min-k search, which a --coverage budget does not run; "
                         "drop one of them")
    return dataclasses.replace(config, coverage=args.coverage)


def _needle_k(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"--k {value}: use a positive number of key blocks or auto")
    return int(value)


def _causal_options(args: argparse.Namespace) -> dict | None:
    """The reader_head_knockout options of --causal, checked before the model loads (None: no --causal)."""
    given = [name for name, value in (("--causal-n", args.causal_n), ("--causal-seeds", args.causal_seeds),
                                      ("--causal-forward", args.causal_forward)) if value is not None]
    if not args.causal:
        if given:
            raise InputError(f"{', '.join(given)} set the causal check; add --causal to run it")
        return None
    from ..tasks.needle_causal import DEFAULT_N, DEFAULT_SEEDS

    n = args.causal_n if args.causal_n is not None else list(DEFAULT_N)
    if any(x < 1 for x in n):
        raise InputError(f"--causal-n {' '.join(map(str, n))}: use positive numbers of heads, e.g. --causal-n 5 10 20")
    seeds = args.causal_seeds if args.causal_seeds is not None else DEFAULT_SEEDS
    if seeds < 1:
        raise InputError(f"--causal-seeds {seeds}: use a positive number of random draws per N")
    return {"n": n, "seeds": seeds, "forward": args.causal_forward or "sparse"}


def _threshold(args: argparse.Namespace) -> dict:
    if args.threshold is None:
        return {}
    if not 0 <= args.threshold <= 1:
        raise InputError(f"--threshold {args.threshold}: a flow is a share of attention; use a value in [0, 1]")
    return {"threshold": args.threshold}


def _prompt_options(args: argparse.Namespace, **given) -> dict:
    """niah_prompt's options from the flags, checked before the model loads; --prompts excludes them."""
    if args.prompts is not None:
        chosen = {"--seed": args.seed, "--haystack": args.haystack, "--form": args.form,
                  "--no-chat-template": args.no_chat_template or None}
        chosen |= {"--" + name: value for name, value in given.items()}
        clash = [name for name, value in chosen.items() if value is not None]
        if clash:
            raise InputError(f"--prompts runs the file's prompts as they are; drop {', '.join(clash)}")
        if not Path(args.prompts).is_file():
            raise InputError(f"--prompts {args.prompts}: no such file; give the jsonl RULER's prepare.py wrote")
        return {}
    return {"seed": args.seed or 0, "haystack": None if args.haystack is None else read_text_file(args.haystack),
            "chat_template": False if args.no_chat_template else None, "form": args.form or "ruler"}


def _one_prompt(tokenizer, args: argparse.Namespace, build: dict):
    """The prompt of `niah`: row --row of --prompts, or niah_prompt at --length and --depth."""
    from ..tasks.niah import niah_prompt, ruler_prompts

    if args.prompts is None:
        return niah_prompt(tokenizer, 4096 if args.length is None else args.length,
                           0.5 if args.depth is None else args.depth, **build)
    prompts = ruler_prompts(tokenizer, args.prompts)
    row = args.row or 0
    if row >= len(prompts):
        raise InputError(f"--row {row}: {args.prompts} holds {len(prompts)} prompts; use a row of 0.."
                         f"{len(prompts) - 1}")
    return prompts[row]
