"""The execution paths of `sparsetrace.kernels` side by side on one layer's shapes, 4k to 32k tokens.

Input: standard normal q [1, 9, T, 64], k and v [1, 3, T, 64] float32 (one layer of the default
model, SmolLM2-135M); the default StreamConfig() (k = 8, 64-token blocks). Timed: the estimator
(`select_blocks`) eager and compiled, and the block attention with its per-block mass on the
eager estimator's selection: eager, compiled (`block_sparse_attention(compiled=True)`) and flex
(`flex_block_attention`); and `kept_block_mass` alone ("mass_only"), the eager pass inside flex.

All paths run in one process. At each length the first call of every path is timed on its own
("first_call_s": the compile, at the first length, plus one run), with the count of graphs dynamo
had compiled after it (a recompile for a new length would raise it). Then --runs rounds call every
path once each, in turn, rotating the order every round, so that a load the shared machine puts
on one moment spreads over all paths; the median per path is reported. Each path's result is
compared with eager (indices equal, largest difference of output and mass). os.getloadavg() is
recorded before and after every length.

    python benchmarks/fast_paths/run.py --lengths 4096 8192 16384 32768 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from sparsetrace.block_attention import block_sparse_attention, flex_block_attention, kept_block_mass
from sparsetrace.config import StreamConfig
from sparsetrace.stream import select_blocks

HERE = Path(__file__).parent
PATHS = ("estimator_eager", "estimator_compile", "attention_eager", "attention_compile", "attention_flex",
         "attention_mass_only")
BATCH, HEADS, KV_HEADS, DIM = 1, 9, 3, 64  # one layer of SmolLM2-135M


def paths(q, k, v, indices, config: StreamConfig) -> dict:
    """Name -> a call of that path (estimator paths return a Selection, attention paths (out, mass))."""
    blocks = dict(block_q=config.block_q, block_k=config.block_k)
    return {
        "estimator_eager": lambda: select_blocks(q, k, config),
        "estimator_compile": lambda: select_blocks(q, k, config, compiled=True),
        "attention_eager": lambda: block_sparse_attention(q, k, v, indices, **blocks),
        "attention_compile": lambda: block_sparse_attention(q, k, v, indices, **blocks, compiled=True),
        "attention_flex": lambda: flex_block_attention(q, k, v, indices, **blocks),
        # the part of flex's time that is the eager mass pass (CPU flex gives no logsumexp)
        "attention_mass_only": lambda: kept_block_mass(q, k, indices, **blocks),
    }


def difference(result, reference) -> dict:
    """How far a path's result is from eager's."""
    if hasattr(result, "indices"):
        return {"indices_equal": bool(torch.equal(result.indices, reference.indices))}
    return {"max_abs_out": float((result[0] - reference[0]).abs().max()),
            "max_abs_mass": float((result[1] - reference[1]).abs().max())}


def measure(tokens: int, runs: int, config: StreamConfig, only: list[str] | None = None) -> dict:
    gen = torch.Generator().manual_seed(tokens)
    q = torch.randn(BATCH, HEADS, tokens, DIM, generator=gen)
    k, v = (torch.randn(BATCH, KV_HEADS, tokens, DIM, generator=gen) for _ in range(2))
    row = {"tokens": tokens, "loadavg_before": os.getloadavg()}
    indices = select_blocks(q, k, config).indices
    calls = {name: call for name, call in paths(q, k, v, indices, config).items() if not only or name in only}
    first, graphs, reference = {}, {}, {}
    for name, call in calls.items():
        started = time.perf_counter()
        reference[name] = call()
        first[name] = time.perf_counter() - started
        graphs[name] = counters["stats"]["unique_graphs"]
    row["first_call_s"], row["graphs_compiled_after_first_call"] = first, graphs
    eager = {name: name.split("_")[0] + "_eager" for name in calls if name.endswith(("compile", "flex"))}
    row["vs_eager"] = {name: difference(reference[name], reference[base])
                       for name, base in eager.items() if base in calls}
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(runs):
        for name in names[r % len(names):] + names[: r % len(names)]:
            started = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - started)
    row["times_s"] = times
    row["median_s"] = {name: statistics.median(t) for name, t in times.items()}
    row["graphs_compiled_after_runs"] = counters["stats"]["unique_graphs"]
    row["loadavg_after"] = os.getloadavg()
    return row


def plot(result: dict, folder: Path = HERE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, part, title in ((axes[0], "estimator", "estimator (select_blocks)"),
                            (axes[1], "attention", "block attention + mass")):
        for name in rows[0]["median_s"]:
            if name.startswith(part):
                ax.plot(tokens, [r["median_s"][name] for r in rows], marker="o", label=name.split("_", 1)[1])
        ax.set(xscale="log", yscale="log", xlabel="tokens T", title=title)
        ax.set_xticks(tokens, [f"{t // 1024}k" for t in tokens], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("seconds per call, one layer (median)")
    fig.suptitle("sparsetrace kernels on CPU (2 cores, shared): B=1, 9 q heads, 3 kv heads, d=64, fp32, k=8, b=64")
    fig.tight_layout()
    fig.savefig(folder / "fast_paths.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--runs", type=int, default=3, help="alternating rounds per length (median)")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from results.json")
    parser.add_argument("--paths", nargs="+", choices=PATHS, help="time only these paths (default: all)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for results.json and fast_paths.png")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((HERE / "results.json").read_text()))
        return
    config = StreamConfig()
    result = {
        "command": "python benchmarks/fast_paths/run.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "shared": "other benchmarks ran at the same time (see loadavg)"},
        "input": {"batch": BATCH, "heads": HEADS, "kv_heads": KV_HEADS, "dim": DIM, "dtype": "float32",
                  "data": "standard normal q, k, v"},
        "config": config.to_dict(),
        "rows": [],
    }
    for tokens in args.lengths:
        row = measure(tokens, args.runs, config, args.paths)
        result["rows"].append(row)
        print(tokens, {name: round(t, 3) for name, t in row["median_s"].items()},
              "first", {name: round(t, 2) for name, t in row["first_call_s"].items()}, flush=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out)


if __name__ == "__main__":
    main()
