"""Coverage budgets against fixed k: recall, honesty of the estimate, kept blocks, behaviour.

For every model, text (benchmarks/texts, as benchmarks/fidelity: a RULER-style needle prompt, a
chain of thought by the default model, a natural essay) and length:

1. The dense model's greedy 2-token continuation, and one dense-forward trace of the prompt plus
   its first continuation token that records every layer's q, k and exact block masses
   (`benchmarks/fidelity/run.py`'s `capture`), with the dense logits of the last 64 positions.
2. For each coverage target p: the selection of every layer on those q and k
   (`select_blocks`, default estimator, k_max = --k-max), its exact recall (the dense attention
   inside the kept blocks, mean over queries; per layer and worst layer), the **honesty** of its
   estimate (share of rows whose exact recall reaches the estimated coverage; mean and mean
   absolute gap estimate - exact), kept blocks per row (mean, max); then one sparse forward at
   that budget: token-pair and block sparsity, compression, whether the next 2 tokens stay the
   dense model's, and KL(dense || sparse) averaged over the last 64 positions (teacher-forced).
3. Fixed k at the same mean kept blocks per row (the k whose mean selected blocks is nearest
   coverage's): the same numbers. Fixed k's recall for k in K_CURVE (selection only).
4. The smallest k that keeps the 2 tokens (fixed k, binary search) and the smallest p of
   `fidelity.COVERAGE_GRID` that does, with the mean kept blocks per row at each.

Cells are cached in cells/ (one JSON each, written atomically, git-ignored) and kept in results.json:
an interrupted run resumes from either.

    python benchmarks/coverage/run.py --lengths 1024 2048 4096 8192
    python benchmarks/coverage/run.py --model gemma-3-270m --lengths 1024 2048 4096 8192 16384 32768 --k-max 64
    python benchmarks/coverage/run.py --table      # results.json and coverage.png from cells/
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from sparsetrace import StreamConfig, load_model, select_blocks
from sparsetrace.blocks import row_key_range
from sparsetrace.dense import recall
from sparsetrace.fidelity import COVERAGE_GRID, layer_recall, search_min_coverage, search_min_k
from sparsetrace.files import atomic_write
from sparsetrace.models import forward_logits
from sparsetrace.selection import searched_range, selected_counts
from sparsetrace.tracer import run_trace

HERE = Path(__file__).parent
TARGETS = [0.8, 0.9, 0.95, 0.99]
K_CURVE = [1, 2, 4, 8, 16, 32]
TEXTS = ["needle", "cot", "natural"]
BLOCK = 64
KL_POSITIONS = 64


def _fidelity_module():
    """benchmarks/fidelity/run.py: its texts (`token_ids`) and its dense capture, shared, not copied."""
    spec = importlib.util.spec_from_file_location("fidelity_run", HERE.parent / "fidelity" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIDELITY = _fidelity_module()


def capture(model, tokenizer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """(prompt + first continuation token, the 2-token continuation, layer -> (q, k, scaling, window,
    block mass), dense log-probabilities of the last KL_POSITIONS positions [P, vocab])."""
    extended, continuation, layers = FIDELITY.capture(model, tokenizer, ids)
    logits = forward_logits(model, extended, keep=KL_POSITIONS).double().cpu()
    return extended, continuation, layers, torch.log_softmax(logits, dim=-1)


def selection_numbers(layers: dict, config: StreamConfig, tokens: int) -> dict:
    """Recall and (under coverage) the estimate's honesty, on the captured dense q and k of every layer."""
    per_layer, kept, selected, estimated, exact = [], [], [], [], []
    for _, (q, key, scaling, window, mass) in sorted(layers.items()):
        selection = select_blocks(q, key, config, scaling=scaling, sliding_window=window)
        per_layer.append(float(layer_recall(selection.indices, mass, tokens, BLOCK).mean()))
        kept.append((selection.indices >= 0).sum(-1).flatten().float())
        visible = row_key_range(tokens, BLOCK, BLOCK, window)
        selected.append(selected_counts(selection.indices, *visible, config).flatten().float())
        if selection.coverage is not None:
            estimated.append(selection.coverage.flatten().double())
            exact.append(recall(selection.indices, mass).flatten().double())
    kept = torch.cat(kept)
    numbers = {"recall": sum(per_layer) / len(per_layer), "recall_worst_layer": min(per_layer),
               "recall_per_layer": per_layer, "kept_per_row_mean": float(kept.mean()),
               "kept_per_row_max": int(kept.max()), "selected_per_row_mean": float(torch.cat(selected).mean())}
    if estimated:
        estimate, truth = torch.cat(estimated), torch.cat(exact)
        numbers |= {"estimated_coverage_mean": float(estimate.mean()),
                    "honest_rows": float((truth >= estimate - 1e-6).double().mean()),
                    "gap_mean": float((estimate - truth).mean()),
                    "gap_abs_mean": float((estimate - truth).abs().mean()),
                    "rows_below_target": float((estimate < config.coverage - 1e-6).double().mean())}
    return numbers


def behaviour(model, tokenizer, extended, continuation, dense_logp: torch.Tensor, config: StreamConfig) -> dict:
    """One sparse forward: its stats, the 2-token match and the mean KL over the last positions."""
    trace, logits = run_trace(model, tokenizer, extended, config, logits_to_keep=KL_POSITIONS, progress=False)
    sparse_logp = torch.log_softmax(logits.double(), dim=-1)
    kl = (dense_logp.exp() * (dense_logp - sparse_logp)).sum(-1)
    stats = trace.stats()
    return {"keeps_next_2": bool(torch.equal(logits[-2:].argmax(-1), continuation)),
            "kl_last_64": float(kl.mean()), "kl_next_token": float(kl[-1]),
            "sparsity": stats["sparsity"], "block_sparsity": stats["block_sparsity"],
            "compression": stats["compression"], "trace_kept_per_row_mean": stats["kept_per_row_mean"]}


def fixed_k_like(layers: dict, tokens: int, selected_mean: float, k_max: int) -> int:
    """The fixed k whose mean selected (non-forced) blocks per row is nearest `selected_mean`."""
    config = StreamConfig(block_size=BLOCK)
    counts = []
    for _, (_, _, _, window, _) in sorted(layers.items()):
        lo, hi = searched_range(*row_key_range(tokens, BLOCK, BLOCK, window), config)
        counts.append(torch.clamp(hi - lo + 1, min=0))
    counts = torch.cat(counts).double()
    return min(range(1, k_max + 1), key=lambda k: abs(float(torch.clamp(counts, max=k).mean()) - selected_mean))


def measure_cell(model, tokenizer, ids: torch.Tensor, k_max: int) -> dict:
    started = time.perf_counter()
    extended, continuation, layers, dense_logp = capture(model, tokenizer, ids)
    tokens = len(extended)
    cell = {"tokens": tokens, "continuation": tokenizer.decode(continuation), "k_max": k_max, "coverage": {},
            "fixed_k_curve": {}}
    for p in TARGETS:
        config = StreamConfig(block_size=BLOCK, coverage=p, k_max=k_max)
        numbers = selection_numbers(layers, config, tokens)
        numbers |= behaviour(model, tokenizer, extended, continuation, dense_logp, config)
        k = fixed_k_like(layers, tokens, numbers["selected_per_row_mean"], k_max)
        fixed = StreamConfig(k=k, block_size=BLOCK)
        numbers["fixed_k_same_budget"] = {"k": k} | selection_numbers(layers, fixed, tokens) | behaviour(
            model, tokenizer, extended, continuation, dense_logp, fixed)
        cell["coverage"][str(p)] = numbers
        print(f"  p={p}: kept {numbers['kept_per_row_mean']:.1f}/row, recall {numbers['recall']:.3f} "
              f"(est {numbers['estimated_coverage_mean']:.3f}, honest {numbers['honest_rows']:.2f}), next 2 "
              f"{numbers['keeps_next_2']}, KL {numbers['kl_last_64']:.4f} | fixed k={k}: recall "
              f"{numbers['fixed_k_same_budget']['recall']:.3f}, next 2 {numbers['fixed_k_same_budget']['keeps_next_2']}"
              f", KL {numbers['fixed_k_same_budget']['kl_last_64']:.4f}", flush=True)
    for k in K_CURVE:
        cell["fixed_k_curve"][str(k)] = selection_numbers(layers, StreamConfig(k=k, block_size=BLOCK), tokens)
    found = search_min_k(model, tokenizer, extended, continuation, StreamConfig(block_size=BLOCK), progress=False)
    cell["min_k"] = {"k": found.min_k, "tried": {str(k): v for k, v in sorted(found.passed.items())},
                     "kept_per_row_mean": found.stats_at_min_k.get("kept_per_row_mean")}
    base = StreamConfig(block_size=BLOCK, coverage=1.0, k_max=k_max)
    found = search_min_coverage(model, tokenizer, extended, continuation, base, progress=False)
    cell["min_coverage"] = {"p": found.min_coverage, "tried": {str(p): v for p, v in sorted(found.passed.items())},
                            "kept_per_row_mean": found.stats_at_min_coverage.get("kept_per_row_mean"),
                            "grid": list(COVERAGE_GRID)}
    print(f"  min k {cell['min_k']['k']} ({cell['min_k']['kept_per_row_mean']} blocks/row), min p "
          f"{cell['min_coverage']['p']} ({cell['min_coverage']['kept_per_row_mean']} blocks/row)", flush=True)
    cell["seconds"] = round(time.perf_counter() - started, 1)
    return cell


def markdown(results: dict) -> str:
    """The README's tables: per cell and p, coverage against fixed k at the same mean kept blocks,
    then each cell's smallest k and smallest p that keep the next 2 tokens."""
    lines = ["| text | tokens | p | blocks a row (mean / max) | recall (worst layer) | estimated | honest rows | "
             "next 2 kept | KL last 64 | fixed k, same budget: k, blocks a row, recall, next 2, KL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, cell in results["cells"].items():
        text = name.rsplit("_", 1)[0]
        for p, v in cell["coverage"].items():
            f = v["fixed_k_same_budget"]
            lines.append(
                f"| {text} | {cell['tokens']:,} | {p} | {v['kept_per_row_mean']:.1f} / {v['kept_per_row_max']} | "
                f"{v['recall']:.3f} ({v['recall_worst_layer']:.3f}) | {v['estimated_coverage_mean']:.3f} | "
                f"{v['honest_rows']:.2f} (gap {v['gap_mean']:+.3f}) | {'yes' if v['keeps_next_2'] else 'no'} | "
                f"{v['kl_last_64']:.4f} | k = {f['k']}, {f['kept_per_row_mean']:.1f}, {f['recall']:.3f}, "
                f"{'yes' if f['keeps_next_2'] else 'no'}, {f['kl_last_64']:.4f} |")
    lines += ["", "| text | tokens | min k (blocks a row) | min p (blocks a row) |", "|---|---|---|---|"]
    for name, cell in results["cells"].items():
        k, p = cell["min_k"], cell["min_coverage"]
        blocks = [f"{x['kept_per_row_mean']:.1f}" if x["kept_per_row_mean"] is not None else "-" for x in (k, p)]
        lines.append(f"| {name.rsplit('_', 1)[0]} | {cell['tokens']:,} | {k['k']} ({blocks[0]}) | "
                     f"{p['p']} ({blocks[1]}) |")
    return "\n".join(lines)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"needle": "tab:blue", "cot": "tab:orange", "natural": "tab:green"}
    for name, cell in cells.items():
        text, length = name.rsplit("_", 1)
        marker = {"1024": "o", "2048": "s", "4096": "^", "8192": "D"}.get(length, "x")
        points = [(v["kept_per_row_mean"], v["recall"]) for v in cell["coverage"].values()]
        axes[0].plot(*zip(*points, strict=True), "-", marker=marker, color=colours.get(text), alpha=0.8,
                     label=f"{text} {length}: coverage")
        curve = [(v["kept_per_row_mean"], v["recall"]) for v in cell["fixed_k_curve"].values()]
        axes[0].plot(*zip(*curve, strict=True), ":", marker=marker, color=colours.get(text), alpha=0.5, mfc="none")
        axes[1].scatter([v["estimated_coverage_mean"] for v in cell["coverage"].values()],
                        [v["recall"] for v in cell["coverage"].values()], color=colours.get(text), marker=marker,
                        label=f"{text} {length}")
    axes[0].set(xscale="log", xlabel="blocks kept per row (mean)", ylabel="exact recall (mean over layers)",
                title="coverage p = 0.8 .. 0.99 (solid) vs fixed k = 1 .. 32 (dotted)")
    axes[0].grid(True, alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].plot([0.75, 1.0], [0.75, 1.0], "k--", lw=0.8)
    axes[1].set(xlabel="estimated coverage (mean over rows)", ylabel="exact recall (mean)",
                title="honesty: estimate vs exact (on the diagonal = honest)")
    axes[1].grid(True, alpha=0.3)
    fig.suptitle(f"{results['model']}: coverage budgets vs fixed k (64-token blocks, k_max {results['k_max']})")
    fig.tight_layout()
    fig.savefig(HERE / results["folder"] / "coverage.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="gemma-3-270m for the second model (default: the default)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--texts", nargs="+", default=TEXTS, choices=TEXTS)
    parser.add_argument("--k-max", type=int, default=32, help="most selected blocks a coverage row keeps")
    parser.add_argument("--table", action="store_true", help="only rebuild results.json and the plot from cells/")
    args = parser.parse_args()
    folder = HERE / (args.model or "default")
    cells_dir = folder / "cells"  # a local cache (git-ignored); results.json, committed, also resumes
    cells_dir.mkdir(parents=True, exist_ok=True)
    summary = folder / "results.json"
    cells = json.loads(summary.read_text())["cells"] if summary.exists() else {}
    cells |= {p.stem: json.loads(p.read_text()) for p in cells_dir.glob("*.json")}
    if not args.table:
        model, tokenizer = load_model(args.model)
        context = model.config.max_position_embeddings
        for length in args.lengths:
            for text in args.texts:
                name = f"{text}_{length}"
                if name in cells:
                    continue
                ids = FIDELITY.token_ids(tokenizer, text, length, context, default_model=args.model is None)
                if ids is None:
                    print(f"{text} {length}: text too short, skipped", flush=True)
                    continue
                print(f"{text} {length}", flush=True)
                cells[name] = measure_cell(model, tokenizer, ids, args.k_max)
                atomic_write(cells_dir / f"{name}.json", (json.dumps(cells[name], indent=1) + "\n").encode(),
                             what="a cell")
    cells = dict(sorted(cells.items(), key=lambda item: (int(item[0].rsplit("_", 1)[1]), item[0])))
    results = {"command": "python benchmarks/coverage/run.py " + " ".join(sys.argv[1:]),
               "model": FIDELITY.MODELS[args.model], "folder": folder.name, "k_max": args.k_max,
               "targets": TARGETS, "cells": cells}
    atomic_write(folder / "results.json", (json.dumps(results, indent=1) + "\n").encode(), what="results")
    if cells:
        plot(results)
        print(markdown(results))


if __name__ == "__main__":
    main()
