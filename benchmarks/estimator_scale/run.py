"""Time and peak memory of the Stream estimator alone (`select_blocks`) on one layer, 4k to 1M tokens.

Input: synthetic q/k shaped like one layer of the default model (SmolLM2-135M: B=1, H=9 query
heads, H_kv=3 key/value heads, d=64, float32). Keys and queries are standard normal, plus
`NEEDLES` planted needle keys: each is a random direction of norm 3 sqrt(d) written into all kv
heads at a fixed position, and one query in 64 after it (positions drawn at random) gets that
direction added, so those queries attend sharply to the needle and the search has something
real to find. The estimator's work does not depend on the values (static shapes, a fixed round
count), so this only keeps the scores from being pure noise.

Each length runs in a fresh process: it builds q/k and warms up on the first 4096 tokens; then
before each run it hands freed heap pages back to the OS (glibc malloc_trim) and resets the peak
RSS (Linux: "5" into /proc/self/clear_refs sets VmHWM to the current RSS), and after it records
the wall time (time.perf_counter) and VmHWM minus the RSS just before the call. Times come from a
child with the default allocator. The peak comes from a second child (one run) with
MALLOC_MMAP_THRESHOLD_=131072: with glibc's dynamic threshold, freed chunk temporaries fragment
the heap and the RSS growth of one call varies between runs (see tests/unit/test_memory_bound.py);
a fixed one maps every large tensor on its own, so the RSS follows what is live, but every fresh
mapping is page-faulted in again, which makes that child about 3x slower.
Lengths below --one-run-from get --runs runs (median reported), longer ones one run. Before each
length the parent compares an estimate of the need with MemAvailable and skips the length (with
the reason) if it does not fit. results.json is rewritten (atomically) after every length; then
estimator_scale.png. Fits are least squares on log-log: time ~ T^a, time ~ c T log2 T (with its
residual next to the power law's), peak memory ~ T^b.

    python benchmarks/estimator_scale/run.py \\
        --lengths 4096 8192 16384 32768 65536 131072 262144 524288 1048576 --runs 3 --one-run-from 131072
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsetrace.tracer import available_memory  # MemAvailable, as the tracer's own memory pre-check reads it

HERE = Path(__file__).parent
BATCH, HEADS, KV_HEADS, DIM = 1, 9, 3, 64  # one layer of SmolLM2-135M
NEEDLES = 16
WARMUP_TOKENS = 4096
# Working memory of select_blocks beyond q and k, for the pre-check only: generous (about 1.6 x (q + k)
# was measured at 32k tokens); it only has to stay above the measured peak_above_base.
WORKING_FRACTION, WORKING_FIXED = 3.0, 1 << 30
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ}


def synthetic_qk(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, 9, T, 64], k [1, 3, T, 64] float32: standard normal plus planted needles (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HEADS, tokens, DIM, generator=gen)
    k = torch.randn(BATCH, KV_HEADS, tokens, DIM, generator=gen)
    positions = torch.randint(0, tokens, (NEEDLES,), generator=gen)
    directions = torch.nn.functional.normalize(torch.randn(NEEDLES, DIM, generator=gen), dim=-1) * 3 * DIM**0.5
    for pos, direction in zip(positions.tolist(), directions, strict=True):
        k[:, :, pos] = direction
        later = torch.randint(pos, tokens, (max(1, (tokens - pos) // 64),), generator=gen)
        q[:, :, later] += direction
    return q, k


def _status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def input_bytes(tokens: int) -> int:
    """Bytes of q plus k (float32): the O(T) input every run must hold."""
    return (HEADS + KV_HEADS) * BATCH * tokens * DIM * 4


def memory_need(tokens: int) -> int:
    """Pre-check estimate: q + k + the estimator's working memory (WORKING_FRACTION, WORKING_FIXED)."""
    return int(input_bytes(tokens) * (1 + WORKING_FRACTION)) + WORKING_FIXED


def measure(tokens: int, runs: int) -> None:
    """Child process: build the input, time `runs` calls, print times and peaks as JSON."""
    from sparsetrace.config import StreamConfig
    from sparsetrace.stream import select_blocks

    config = StreamConfig()
    started = time.perf_counter()
    q, k = synthetic_qk(tokens)
    build_s = time.perf_counter() - started
    select_blocks(q[:, :, :WARMUP_TOKENS], k[:, :, :WARMUP_TOKENS], config)  # one-time setup is not measured
    times, peaks, bases = [], [], []
    selection = None
    for _ in range(runs):
        selection = None  # the previous run's output is freed before the next is measured
        # hand freed heap pages back to the OS, so the call cannot reuse resident memory unseen
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:  # reset the peak (VmHWM) to the current RSS
            clear.write("5")
        base = _status_bytes("VmRSS")
        started = time.perf_counter()
        selection = select_blocks(q, k, config)
        times.append(time.perf_counter() - started)
        peaks.append(_status_bytes("VmHWM") - base)
        bases.append(base)
    output = sum(t.numel() * t.element_size() for t in (selection.indices, selection.scores))
    print(json.dumps({
        "times_s": times, "peak_above_base_runs": peaks, "base_rss_runs": bases,
        "q_bytes": q.numel() * q.element_size(), "k_bytes": k.numel() * k.element_size(),
        "output_bytes": output, "indices_shape": list(selection.indices.shape), "build_input_s": build_s,
        "config": config.to_dict(), "threads": torch.get_num_threads(),
    }))


def _fit_power(x: list[float], y: list[float]) -> dict:
    """y ~ c x^a by least squares on log-log; rms residual in natural-log units."""
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    a = sum((u - mx) * (v - my) for u, v in zip(lx, ly, strict=True)) / sum((u - mx) ** 2 for u in lx)
    c = math.exp(my - a * mx)
    residual = [v - (math.log(c) + a * u) for u, v in zip(lx, ly, strict=True)]
    return {"exponent": a, "coefficient": c, "rms_log_residual": math.sqrt(statistics.fmean(r * r for r in residual))}


def _fit_t_log_t(tokens: list[int], y: list[float]) -> dict:
    """y ~ c T log2 T (one free parameter, least squares on log y); rms residual in natural-log units."""
    basis = [math.log(t * math.log2(t)) for t in tokens]
    log_c = statistics.fmean(math.log(v) - b for v, b in zip(y, basis, strict=True))
    residual = [math.log(v) - log_c - b for v, b in zip(y, basis, strict=True)]
    return {"coefficient": math.exp(log_c), "rms_log_residual": math.sqrt(statistics.fmean(r * r for r in residual))}


def fits(rows: list[dict], fit_from: int) -> dict | None:
    """Exponents over the lengths from `fit_from` on: below it the default search="auto" scores every
    candidate of most rows (cheaper there, but growing as T^2 until rows get long enough to search)
    and the fixed chunk memory dominates the peak."""
    done = [r for r in rows if "time_median_s" in r and r["tokens"] >= fit_from]
    if len(done) < 2:
        return None
    tokens = [r["tokens"] for r in done]
    times = [r["time_median_s"] for r in done]
    return {
        "lengths": tokens,
        "time_power": _fit_power(tokens, times),
        "time_t_log2_t": _fit_t_log_t(tokens, times),
        "memory_power": _fit_power(tokens, [max(r["peak_above_base"], 1) for r in done]),
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096 * 2**i for i in range(9)])
    parser.add_argument("--runs", type=int, default=3, help="runs per length below --one-run-from (median)")
    parser.add_argument("--one-run-from", type=int, default=524288, help="lengths from this on run once")
    parser.add_argument("--child", nargs=2, type=int, metavar=("TOKENS", "RUNS"), help=argparse.SUPPRESS)
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from results.json")
    parser.add_argument("--fit-from", type=int, default=65536, help="fit exponents over lengths from this on")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((HERE / "results.json").read_text()))
        return
    if args.child:
        measure(*args.child)
        return
    result = {
        "command": "python benchmarks/estimator_scale/run.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
                    "torch": torch.__version__, "malloc_mmap_threshold": CHILD_ENV["MALLOC_MMAP_THRESHOLD_"]},
        "input": {"batch": BATCH, "heads": HEADS, "kv_heads": KV_HEADS, "dim": DIM, "dtype": "float32",
                  "data": f"standard normal q/k plus {NEEDLES} planted needle keys (see run.py docstring)"},
        "rows": [],
    }
    for tokens in sorted(args.lengths):
        runs = args.runs if tokens < args.one_run_from else 1
        row = {"tokens": tokens, "runs": runs, "memory_need_estimate": memory_need(tokens),
               "mem_available": available_memory()}
        if row["memory_need_estimate"] > row["mem_available"]:
            row["skipped"] = (f"estimated need {row['memory_need_estimate'] / 2**30:.1f} GiB > MemAvailable "
                              f"{row['mem_available'] / 2**30:.1f} GiB")
            print(f"{tokens:>8} tokens: skipped, {row['skipped']}", flush=True)
        else:
            timed, peaked = (subprocess.run([sys.executable, __file__, "--child", str(tokens), str(n)],
                                            capture_output=True, text=True, env=env)
                             for n, env in ((runs, os.environ), (1, CHILD_ENV)))
            failed = next((c for c in (timed, peaked) if c.returncode), None)
            if failed:
                row["error"] = f"exit {failed.returncode}: {failed.stderr.strip()[-2000:]}"
                print(f"{tokens:>8} tokens: failed, {row['error']}", flush=True)
            else:
                row.update(json.loads(timed.stdout.strip().splitlines()[-1]))
                memory = json.loads(peaked.stdout.strip().splitlines()[-1])
                row |= {key: memory[key] for key in ("peak_above_base_runs", "base_rss_runs")}
                row["time_median_s"] = statistics.median(row["times_s"])
                row["peak_above_base"] = max(row["peak_above_base_runs"])
                print(f"{tokens:>8} tokens: {row['time_median_s']:.2f} s (median of {runs}), peak above base "
                      f"{row['peak_above_base'] / 2**20:.0f} MiB, input q+k "
                      f"{(row['q_bytes'] + row['k_bytes']) / 2**20:.0f} MiB, output "
                      f"{row['output_bytes'] / 2**20:.1f} MiB", flush=True)
        result["rows"].append(row)
        result["fits"] = fits(result["rows"], args.fit_from)
        _write_atomic(HERE / "results.json", json.dumps(result, indent=2) + "\n")
    if result["fits"]:
        f = result["fits"]
        print(f"time ~ T^{f['time_power']['exponent']:.2f} (rms log residual "
              f"{f['time_power']['rms_log_residual']:.3f}); time ~ c T log2 T: rms log residual "
              f"{f['time_t_log2_t']['rms_log_residual']:.3f}; memory ~ T^{f['memory_power']['exponent']:.2f}")
        plot(result)


def plot(result: dict) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "time_median_s" in r]
    f = result["fits"]
    tokens = [r["tokens"] for r in rows]
    line = [tokens[0] * 2 ** (i / 4) for i in range(int(4 * math.log2(tokens[-1] / tokens[0])) + 1)]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.4))

    times = [r["time_median_s"] for r in rows]
    tp, tl = f["time_power"], f["time_t_log2_t"]
    ax_time.plot(tokens, times, "o", label="select_blocks (median)")
    ax_time.plot(line, [tp["coefficient"] * t ** tp["exponent"] for t in line], "-",
                 label=f"fit T^{tp['exponent']:.2f} (rms {tp['rms_log_residual']:.3f})")
    ax_time.plot(line, [tl["coefficient"] * t * math.log2(t) for t in line], "--",
                 label=f"fit c T log2 T (rms {tl['rms_log_residual']:.3f})")
    ax_time.plot(line, [times[0] * (t / tokens[0]) ** 2 for t in line], ":", color="grey", label="T^2 reference")
    ax_time.set(ylabel="seconds", title="Time per layer")

    peaks = [r["peak_above_base"] / 2**20 for r in rows]
    mp = f["memory_power"]
    ax_mem.plot(tokens, peaks, "o", label="peak RSS above base")
    ax_mem.plot(line, [mp["coefficient"] * t ** mp["exponent"] / 2**20 for t in line], "-",
                label=f"fit T^{mp['exponent']:.2f}")
    ax_mem.plot(tokens, [(r["q_bytes"] + r["k_bytes"]) / 2**20 for r in rows], "s--", label="input q + k")
    ax_mem.plot(tokens, [r["output_bytes"] / 2**20 for r in rows], "^--", label="output (indices + scores)")
    ax_mem.plot(line, [4 * t * t / 2**20 for t in line], ":", color="grey", label="one T x T float32 matrix")
    ax_mem.set(ylabel="MiB", title="Peak memory (RSS)")
    for ax in (ax_time, ax_mem):
        ax.set(xscale="log", yscale="log", xlabel="tokens")
        ax.set_xticks(tokens, [f"{t // 1024}k" for t in tokens])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    inp = result["input"]
    fig.suptitle(f"Stream estimator alone, one layer (B={inp['batch']}, H={inp['heads']}, H_kv={inp['kv_heads']}, "
                 f"d={inp['dim']}, fp32), StreamConfig(), torch threads: {result['machine']['torch_threads']}")
    fig.tight_layout()
    fig.savefig(HERE / "estimator_scale.png", dpi=130)


if __name__ == "__main__":
    main()
