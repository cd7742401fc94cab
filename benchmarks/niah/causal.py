"""Knock out the needle's top-N reader heads vs N random heads on the default model (resumable).

For each length x depth: the RULER needle prompt (seed 0, as the sweep), the niah run at the sweep's
min k (sweep/sweep.json, `--search hierarchical`: the same estimator; the run records whether the
answer is kept there, else k = auto searches again), its reader heads (the mass the answer block
puts on the needle, per head), then `reader_head_knockout`: top N vs N random heads (seeds 0..S-1),
zero mode, on the chosen forward. Each finished cell is written to OUT/cell_LENGTH_DEPTH.json and skipped next time;
causal.json and causal.png are rewritten after every cell.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/niah/causal.py --lengths 1024 2048 --forward dense
"""

import argparse
import json
from pathlib import Path

import numpy as np

import sparsetrace as st
from sparsetrace.files import save_figure, write_json
from sparsetrace.plots import knockout_figure
from sparsetrace.tasks.needle_causal import reader_head_knockout
from sparsetrace.tasks.needle_runs import run_niah
from sparsetrace.tasks.niah import niah_prompt

HERE = Path(__file__).parent


def pooled(cells: list[dict]) -> list[dict]:
    """Per N over every cell: top heads' mean accuracy and drop (± std over cells); random heads' mean ±
    std over every (cell, seed) draw."""
    out = []
    for i, n in enumerate(row["n"] for row in cells[0]["causal"]["per_n"]):
        top = [c["causal"]["per_n"][i] for c in cells]
        rand = [r for c in cells for r in c["causal"]["rows"] if r["kind"] == "random" and r["n"] == n]
        out.append({
            "n": n, "cells": len(cells),
            "top_accuracy": float(np.mean([t["top_accuracy"] for t in top])),
            "top_drop": float(np.mean([t["top_drop"] for t in top])),
            "top_accuracy_std": float(np.std([t["top_accuracy"] for t in top])),
            "top_drop_std": float(np.std([t["top_drop"] for t in top])),
            "random_accuracy_mean": float(np.mean([r["accuracy"] for r in rand])),
            "random_accuracy_std": float(np.std([r["accuracy"] for r in rand], ddof=1)),
            "random_drop_mean": float(np.mean([r["drop"] for r in rand])),
            "random_drop_std": float(np.std([r["drop"] for r in rand], ddof=1)),
        })
    return out


def print_tables(summary: dict) -> None:
    print("| tokens | depth | k | N | top heads: accuracy | top heads: drop (nats) | random: accuracy (mean ± std) "
          "| random: drop (mean ± std) |\n|---|---|---|---|---|---|---|---|")
    for cell in summary["cells"]:
        for r in cell["causal"]["per_n"]:
            print(f"| {cell['tokens']:,} | {cell['depth']} | {cell['k']} | {r['n']} | {r['top_accuracy']:.0%} | "
                  f"{r['top_drop']:.2f} | {r['random_accuracy_mean']:.0%} ± {r['random_accuracy_std']:.0%} | "
                  f"{r['random_drop_mean']:.2f} ± {r['random_drop_std']:.2f} |")
    print("\n| N | prompts | top heads: accuracy | top heads: drop (mean ± std over prompts) | random: accuracy "
          "(mean ± std over prompts x seeds) | random: drop |\n|---|---|---|---|---|---|")
    for r in summary["pooled"]:
        print(f"| {r['n']} | {r['cells']} | {r['top_accuracy']:.0%} | {r['top_drop']:.2f} ± {r['top_drop_std']:.2f} | "
              f"{r['random_accuracy_mean']:.0%} ± {r['random_accuracy_std']:.0%} | "
              f"{r['random_drop_mean']:.2f} ± {r['random_drop_std']:.2f} |")


def write_summary(args: argparse.Namespace, config: st.StreamConfig, cells: list[dict]) -> None:
    """causal.json and causal.png from the finished cells."""
    per_n = pooled(cells)
    write_json(args.output / "causal.json", {"forward": args.forward, "head_mode": "zero", "seeds": args.seeds,
                                             "config": config.to_dict(), "pooled": per_n, "cells": cells})
    tokens = ", ".join(f"{t:,}" for t in sorted({c["tokens"] for c in cells}))
    depths = ", ".join(str(d) for d in sorted({c["depth"] for c in cells}))
    title = (f"SmolLM2-135M-Instruct, {len(cells)} needle prompts ({tokens} tokens x depths {depths}), "
             f"{args.forward} forward, "
             "zero ablation: top-N reader heads vs N random heads")
    save_figure(knockout_figure(per_n, title=title, random_label="N random heads (mean ± std over prompts x seeds)"),
                args.output / "causal.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--n", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--forward", choices=["sparse", "dense"], default="dense")
    parser.add_argument("-o", "--output", type=Path, default=HERE / "causal")
    parser.add_argument("--table", action="store_true",
                        help="rebuild OUT/causal.json, causal.png from the finished cells (OUT/cell_*.json); "
                        "print tables")
    args = parser.parse_args()
    if args.table:  # rebuild causal.json / causal.png from every finished cell, print the tables
        found = [json.loads(p.read_text()) for p in args.output.glob("cell_*.json")]
        if found:
            found.sort(key=lambda c: (c["length"], c["depth"]))
            write_summary(args, st.StreamConfig(search="hierarchical"), found)
        return print_tables(json.loads((args.output / "causal.json").read_text()))
    args.output.mkdir(parents=True, exist_ok=True)
    sweep = json.loads((HERE / "sweep" / "sweep.json").read_text())
    min_k = {(c["length"], c["depth"]): c["min_k"] for c in sweep["cells"]}
    config = st.StreamConfig(search="hierarchical")
    model, tokenizer = st.load_model()
    grid = [(length, depth) for length in args.lengths for depth in args.depths]
    done = {}
    for length, depth in grid:
        path = args.output / f"cell_{length}_{depth}.json"
        if path.exists():
            done[length, depth] = json.loads(path.read_text())
            continue
        prompt = niah_prompt(tokenizer, length, depth, seed=0, form="legacy")
        k = min_k.get((length, depth), "auto")
        run = run_niah(model, tokenizer, prompt, config, k=k, progress=False)
        if not run.answer_kept and k != "auto":
            run = run_niah(model, tokenizer, prompt, config, k="auto", progress=False)
        causal = reader_head_knockout(model, tokenizer, prompt, run, n=args.n, seeds=args.seeds,
                                      forward=args.forward, progress=False)
        cell = {"length": length, "depth": depth, "tokens": prompt.num_tokens, "expected": prompt.answer,
                "dense_answer": run.answer.text, "correct": run.answer.correct, "k": run.k,
                "answer_kept_at_k": run.answer_kept, "niah_seconds": round(run.seconds, 1),
                "causal": causal.to_dict()}
        write_json(path, cell)
        done[length, depth] = cell
        write_summary(args, config, [done[g] for g in grid if g in done])
        line = " | ".join(f"N={r['n']}: top acc {r['top_accuracy']:.0%} drop {r['top_drop']:.2f}, random acc "
                          f"{r['random_accuracy_mean']:.0%}±{r['random_accuracy_std']:.0%} drop "
                          f"{r['random_drop_mean']:.2f}±{r['random_drop_std']:.2f}" for r in causal.per_n())
        print(f"{length} {depth} k={run.k} ({causal.seconds:.0f} s): {line}", flush=True)
    cells = [done[g] for g in grid if g in done]
    if cells:
        write_summary(args, config, cells)


if __name__ == "__main__":
    main()
