"""The README's sweep tables from a sweep.json, with the paper's block sparsity added.

sweep.json records each cell's compression (dense pairs / kept blocks) but not its block sparsity
(1 - kept blocks / (layers x heads x n_q x n_k)). Both come from the same kept-block count, over the
traced tokens: the prompt plus the dense answer but its last token (teacher-forced). The answer's
length comes from the default model's tokenizer, and the derived count of kept blocks must come out
a whole number, which checks that length. Single `niah` runs (their niah.json) can join the
comparison with the paper.

    python benchmarks/niah/tables.py
    python benchmarks/niah/tables.py --model gemma-3-270m --sweep benchmarks/gemma/sweep/sweep.json \
        --runs benchmarks/gemma/niah_*/niah.json
"""

import argparse
import json
import math
from pathlib import Path

from sparsetrace import load_tokenizer

HERE = Path(__file__).parent
SHAPES = {None: ("SmolLM2-135M", 30, 9), "gemma-3-270m": ("Gemma 3 270M", 18, 4)}  # name, layers, heads
PAPER = ("| paper: Gemma 3 1B | 32 | 0.9k / 9.9k / 19.9k | 6 / 55 / 75 | 89.7 / 93.2 / 96.1% "
         "| 4,608x / 5,726x / 8,473x |")


def block_sparsity(cell: dict, tokenizer, block: int, layers: int, heads: int) -> float:
    traced = cell["tokens"] + len(tokenizer(cell["dense_answer"], add_special_tokens=False)["input_ids"]) - 1
    kept = layers * heads * traced**2 / cell["compression"]
    if abs(kept - round(kept)) > 1e-3 * kept:
        raise SystemExit(f"cell {cell['length']}/{cell['depth']}: {kept:.2f} kept blocks is not a whole number; "
                         "the traced length is not prompt + answer - 1")
    n = math.ceil(traced / block)
    return 1 - round(kept) / (layers * heads * n * n)


def span(values: list[float], fmt: str) -> str:
    return fmt.format(min(values)) + ("" if min(values) == max(values) else "-" + fmt.format(max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, choices=[m for m in SHAPES if m], help="default: the default model")
    parser.add_argument("--sweep", type=Path, default=HERE / "sweep" / "sweep.json")
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="niah.json files of single runs to add")
    args = parser.parse_args()
    name, layers, heads = SHAPES[args.model]
    sweep = json.loads(args.sweep.read_text())
    block = sweep["config"]["block_size"]
    tokenizer = load_tokenizer(args.model)
    cells = [c | {"block_sparsity": block_sparsity(c, tokenizer, block, layers, heads)} for c in sweep["cells"]]
    print("| tokens | depth | dense answer | min k | kept token pairs at min k | block sparsity | compression "
          "| route connected |\n|---|---|---|---|---|---|---|---|")
    for c in cells:
        print(f"| {c['tokens']:,} | {c['depth']} | {'right' if c['correct'] else 'wrong'} | {c['min_k']} | "
              f"{100 * c['kept_fraction']:.1f}% | {100 * c['block_sparsity']:.1f}% | {c['compression']:,.0f}x | "
              f"{'yes' if c['connected'] else 'no'} |")
    print("\n| model | blocks | tokens | min k | block sparsity | compression |\n|---|---|---|---|---|---|\n" + PAPER)
    for length in sorted({c["length"] for c in cells}):
        row = [c for c in cells if c["length"] == length]
        print(f"| ours: {name} | {block} | {length // 1024}k | {span([c['min_k'] for c in row], '{}')} | "
              f"{span([100 * c['block_sparsity'] for c in row], '{:.1f}')}% | "
              f"{span([c['compression'] for c in row], '{:,.0f}')}x |")
    for path in args.runs:
        run = json.loads(path.read_text())
        stats = run["stats"]
        print(f"| ours: {name}, depth {run['prompt']['depth']} | {stats['block_k']} | {stats['tokens'] / 1024:.0f}k | "
              f"{run['min_k']} | {100 * stats['block_sparsity']:.1f}% | {stats['compression']:,.0f}x |")


if __name__ == "__main__":
    main()
