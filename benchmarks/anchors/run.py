"""Thought anchors on the default model: sparse vs dense unit scores as k grows, pruning, time, memory.

On chains of thought written by the default model itself (../texts/cot.txt, 4,349 tokens, made by
../texts/make_cot.py through `sparsetrace.generation`; and its first 2,048 tokens) the sentence
pipeline (`sparsetrace.anchors` with its defaults, the thought-anchors definitions: A[i, j] the mean
over the sentence i x sentence j block (`key_average="mean"`), proximity 4, top 20 receiver heads,
layer 0 included) runs once per cell:

- dense: k covering every key block (the sparse forward is then exact dense attention);
- sparse: b = 64 with k = 2, 4, 8, 16, and the paper's b = 32, k = 4.

Each cell runs in its own process, so its peak memory (ru_maxrss from wait4) is its own. Per cell:
Spearman of its unit scores with the dense ones (each with its own receiver heads, and with the
dense receiver heads applied to the sparse vertical scores), receiver heads shared with dense,
pruning (share of causal token pairs not kept), compression, storage ratio vs dense patterns,
whether the sparse model keeps the final answer's greedy tokens, time and peak memory.

    python benchmarks/anchors/run.py            # resumable: finished cells are cached in cells/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The committed results were measured with the halving search on every row (the default before
# search="auto", which scores every candidate on short rows instead; see estimator_choice).
SEARCH = "hierarchical"

HERE = Path(__file__).parent
COT = HERE.parent / "texts" / "cot.txt"
TEXTS = {"cot_2k": (COT, 2048), "cot_4k": (COT, None)}  # name: (file, first N tokens)
CELLS = [("dense", 64, None), ("k2", 64, 2), ("k4", 64, 4), ("k8", 64, 8), ("k16", 64, 16), ("b32_k4", 32, 4)]


def run_cell(text_name: str, cell: str, block: int, k: int | None, out: Path) -> None:
    """One pipeline run in this process; writes its JSON to `out`."""
    import sparsetrace as st
    from sparsetrace.blocks import num_blocks

    model, tokenizer = st.load_model()
    path, max_tokens = TEXTS[text_name]
    text = path.read_text()
    tokens = min(len(tokenizer(text)["input_ids"]), max_tokens or 10**9)
    config = st.StreamConfig(k=k or num_blocks(tokens, block), block_size=block, search=SEARCH)
    started = time.perf_counter()
    result = st.anchors(model, tokenizer, text, config, dense_check="never", max_tokens=max_tokens, progress=False)
    seconds = time.perf_counter() - started
    t = result.texts[0]
    out.write_text(json.dumps({
        "text": text_name, "cell": cell, "block": block, "k": config.k, "tokens": t.trace.num_tokens,
        "units": len(t.units), "seconds": round(seconds, 1), "fidelity": t.fidelity,
        "key_average": result.settings["key_average"], "exclude_layer0": result.settings["exclude_layer0"],
        "receiver_heads": result.receiver_heads, "scores": [u.score for u in t.units],
        "vertical": np.round(t.vertical, 7).tolist(),
        "categories": [u.category for u in t.units],
    }))


def summarise(cells: dict) -> list[dict]:
    from sparsetrace.analysis.anchors import spearman, unit_scores

    rows = []
    for text_name in TEXTS:
        dense = cells.get((text_name, "dense"))
        if dense is None:
            continue
        dense_scores = np.array([np.nan if s is None else s for s in dense["scores"]])
        dense_heads = [tuple(x) for x in dense["receiver_heads"]]
        for cell, _, _ in CELLS:
            c = cells.get((text_name, cell))
            if c is None:
                continue
            scores = np.array([np.nan if s is None else s for s in c["scores"]])
            vertical = np.array(c["vertical"], dtype=float)
            f = c["fidelity"]
            rows.append({
                "text": text_name, "cell": cell, "block": c["block"], "k": c["k"], "tokens": c["tokens"],
                "units": c["units"], "key_average": c["key_average"], "exclude_layer0": c["exclude_layer0"],
                "spearman_vs_dense": spearman(scores, dense_scores),
                "spearman_vs_dense_same_heads": spearman(unit_scores(vertical, dense_heads), dense_scores),
                "receivers_shared_with_dense": len({tuple(x) for x in c["receiver_heads"]} & set(dense_heads)),
                "pruned": f["sparsity"], "block_sparsity": f["block_sparsity"], "compression": f["compression"],
                "storage_ratio": f["dense_to_trace_ratio"], "trace_bytes": f["trace_bytes"],
                "answer_preserved": f.get("answer_preserved"),
                "answer_token_agreement": f.get("answer_token_agreement"),
                "next_token_match": f.get("next_token_match"), "seconds": c["seconds"],
                "trace_seconds": f.get("trace_seconds"), "peak_rss_gb": c["peak_rss_gb"],
                "top_anchors": _top(c, 3),
            })
    return rows


def _top(c: dict, n: int) -> list[dict]:
    order = sorted((i for i, s in enumerate(c["scores"]) if s is not None), key=lambda i: -c["scores"][i])[:n]
    return [{"unit": i, "score": c["scores"][i], "category": c["categories"][i]} for i in order]


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for text_name, marker in zip(TEXTS, "os", strict=False):
        sparse = [r for r in rows if r["text"] == text_name and r["block"] == 64 and r["cell"] != "dense"]
        if not sparse:
            continue
        tokens = sparse[0]["tokens"]
        ks = [r["k"] for r in sparse]
        label = f"{text_name} ({tokens:,} tokens)"
        axes[0].plot(ks, [r["spearman_vs_dense"] for r in sparse], marker=marker, label=label)
        axes[0].plot(ks, [r["spearman_vs_dense_same_heads"] for r in sparse], marker=marker, ls="--", alpha=0.6,
                     label=f"{text_name}, dense receiver heads")
        axes[1].plot(ks, [100 * r["pruned"] for r in sparse], marker=marker, label=label)
        axes[2].plot(ks, [r["seconds"] for r in sparse], marker=marker, label=f"{text_name} time")
        dense = next(r for r in rows if r["text"] == text_name and r["cell"] == "dense")
        axes[2].axhline(dense["seconds"], ls=":", color=axes[2].lines[-1].get_color(), label=f"{text_name} dense")
    axes[0].set_ylabel("Spearman(sparse, dense) of unit scores")
    axes[1].set_ylabel("token interactions pruned (%)")
    axes[2].set_ylabel("pipeline time (s, 2-core CPU)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (key blocks per query block, b = 64)")
        ax.legend(fontsize=7)
    fig.suptitle("Thought anchors on SmolLM2-135M-Instruct: sparse traces vs dense attention", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", nargs=4, metavar=("TEXT", "CELL", "BLOCK", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    args = parser.parse_args()
    if args.cell:
        text_name, cell, block, k = args.cell
        run_cell(text_name, cell, int(block), None if k == "none" else int(k), Path(args.out))
        return
    cache = HERE / "cells"
    cache.mkdir(exist_ok=True)
    cells = {}
    for text_name in args.texts:
        for cell, block, k in CELLS:
            path = cache / f"{text_name}_{cell}.json"
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                child = subprocess.Popen([sys.executable, __file__, "--cell", text_name, cell, str(block),
                                          str(k).lower(), "--out", str(tmp)])
                _, status, usage = os.wait4(child.pid, 0)
                if status != 0:
                    raise SystemExit(f"cell {text_name} {cell} failed")
                data = json.loads(tmp.read_text()) | {"peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}
                path.write_text(json.dumps(data))
                tmp.unlink()
                print(f"{text_name} {cell}: {data['seconds']} s, {data['peak_rss_gb']} GB", flush=True)
            cells[(text_name, cell)] = json.loads(path.read_text())
    rows = summarise(cells)
    previous = HERE / "results.json"  # rows of texts not run now stay (cells/ is a local cache)
    if previous.exists():
        kept = [r for r in json.loads(previous.read_text())["cells"] if r["text"] not in args.texts]
        rows = sorted(kept + rows, key=lambda r: list(TEXTS).index(r["text"]))
    (HERE / "results.json").write_text(json.dumps({"cells": rows}, indent=1) + "\n")
    figure(rows, HERE / "anchors_vs_k.png")
    for r in rows:
        rho = r["spearman_vs_dense"]
        rho = rho if rho is None else round(rho, 3)
        print(f"{r['text']:>9} {r['cell']:>7} T={r['tokens']:,} U={r['units']} rho={rho}"
              f" pruned={r['pruned']:.1%} ratio={r['storage_ratio']:,.0f}x answer={r['answer_preserved']} "
              f"{r['seconds']} s {r['peak_rss_gb']} GB")


if __name__ == "__main__":
    main()
