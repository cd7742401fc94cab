"""A needle sweep as units: in this process vs a local Ray with 2 workers of 1 thread, and the cost model
of RULER's niah on a cluster (issue #23).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/batch/run.py            # 24 units (the lead's run)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/batch/run.py --units 4  # a check that it works

Each executor runs in a fresh child process (this script with --executor), over the same units
(`needle_cell`: dense answer, min-k search, trace, route, the sparse model's own answer) into its own
temporary folder, so neither reuses the other's results or memory. A child reports its wall time and,
per worker, the units it ran, the seconds in them, its CPU time and peak memory (for the in-process run
the one process is the worker). Writes results.json and batch.png next to itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
LENGTHS = [512, 1024, 1536, 2048]
DEPTHS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
# RULER's niah: 500 samples x 6 lengths x 5 depths (its default lengths; past the default model's 8k context).
RULER_SAMPLES, RULER_LENGTHS, RULER_DEPTHS = 500, [4096, 8192, 16384, 32768, 65536, 131072], 5
CLUSTERS = [8, 64]


def units(count: int):
    from sparsetrace.batch import Unit

    grid = [(length, depth) for length in LENGTHS for depth in DEPTHS][:count]
    return [Unit(f"{length}_{depth}", {"length": length, "depth": depth}) for length, depth in grid]


def child(args: argparse.Namespace) -> None:
    """One executor over the units; prints its measurements as JSON."""
    import torch

    from sparsetrace.batch import InProcess, RayExecutor, run_units
    from sparsetrace.config import StreamConfig
    from sparsetrace.tasks.needle_runs import needle_cell

    torch.set_num_threads(1)
    started = time.perf_counter()
    task = partial(needle_cell, config=StreamConfig(), progress=False)
    folder = Path(tempfile.mkdtemp(prefix=f"batch-{args.executor}-"))
    if args.executor == "in-process":
        from sparsetrace.models import load_model

        executor = InProcess(*load_model(args.model))
        batch = run_units(units(args.units), task, folder / "cells", executor, progress=False)
    else:
        with RayExecutor(args.model, workers=args.workers, num_cpus=1) as executor:
            batch = run_units(units(args.units), task, folder / "cells", executor, progress=False)
    batch.check()
    own = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"executor": args.executor, "wall_seconds": round(time.perf_counter() - started, 1),
                      "driver": {"cpu_seconds": round(own.ru_utime + own.ru_stime, 1),
                                 "peak_rss_mib": round(own.ru_maxrss / 1024, 1)},
                      "workers": executor.usage,
                      "cells": [{k: c[k] for k in ("length", "depth", "tokens", "min_k", "seconds")}
                                for c in batch.results.values()]}))


def cost_model(cells: list[dict]) -> dict:
    """Units per hour per worker at the measured cost, and RULER's niah on 8 and 64 workers: the measured mean,
    and a per-length cost c * T log2 T fit to the measured cells (a sparse forward's growth)."""
    per_unit = sum(c["seconds"] for c in cells) / len(cells)
    scale = sum(c["seconds"] for c in cells) / sum(c["tokens"] * math.log2(c["tokens"]) for c in cells)
    ruler_units = RULER_SAMPLES * len(RULER_LENGTHS) * RULER_DEPTHS
    scaled = RULER_SAMPLES * RULER_DEPTHS * sum(scale * t * math.log2(t) for t in RULER_LENGTHS)
    return {"seconds_per_unit": round(per_unit, 2), "units_per_hour_per_worker": round(3600 / per_unit, 1),
            "ruler_units": ruler_units, "seconds_per_token_log_token": scale,
            "ruler_hours": {str(w): {"at_measured_mean": round(ruler_units * per_unit / w / 3600, 1),
                                     "scaled_by_T_log_T": round(scaled / w / 3600, 1)} for w in CLUSTERS}}


def figure(result: dict):
    from matplotlib.figure import Figure

    runs = result["runs"]
    fig = Figure(figsize=(13, 4), layout="constrained")
    wall, cpu, memory, cluster = fig.subplots(1, 4)
    names = [r["executor"] for r in runs]
    wall.bar(names, [r["wall_seconds"] for r in runs], color=["tab:blue", "tab:orange"])
    wall.set(title=f"{result['units']} units: wall time", ylabel="seconds")
    for axis, key, title, unit in ((cpu, "cpu_seconds", "CPU time per worker", "seconds"),
                                   (memory, "peak_rss_mib", "peak memory per worker", "MiB")):
        labels, values = [], []
        for r in runs:
            for i, w in enumerate(r["workers"]):
                labels.append(f"{r['executor']}\nworker {i}")
                values.append(w[key])
        axis.bar(labels, values, color=["tab:blue" if label.startswith("in") else "tab:orange" for label in labels])
        axis.set(title=title, ylabel=unit)
        axis.tick_params(axis="x", labelsize=7)
    model = result["cost_model"]
    hours = [[model["ruler_hours"][str(w)][kind] for w in CLUSTERS] for kind in ("at_measured_mean",
                                                                                  "scaled_by_T_log_T")]
    x = range(len(CLUSTERS))
    cluster.bar([i - 0.2 for i in x], hours[0], 0.4, label="at the measured mean")
    cluster.bar([i + 0.2 for i in x], hours[1], 0.4, label="cost ~ T log T")
    cluster.set(xticks=list(x), xticklabels=[f"{w} workers" for w in CLUSTERS], yscale="log", ylabel="hours",
                title=f"RULER niah on paper: {model['ruler_units']:,} units")
    cluster.legend(fontsize=7)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=24, help="units of the sweep (default 24; at most 24)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers, 1 thread each (default 2)")
    parser.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--executor", choices=["in-process", "ray"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.executor is not None:
        return child(args)
    runs = []
    for executor in ("in-process", "ray"):
        command = [sys.executable, __file__, "--executor", executor, "--units", str(args.units), "--workers",
                   str(args.workers)] + (["--model", args.model] if args.model else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True,
                              env=os.environ | {"OMP_NUM_THREADS": "1"})
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{executor:<10}  {runs[-1]['wall_seconds']:>7.1f} s wall  " + "  ".join(
            f"worker {i}: {w['units']} units in {w['unit_seconds']:.1f} s, {w['cpu_seconds']:.1f} s CPU, "
            f"{w['peak_rss_mib']:.0f} MiB"
            for i, w in enumerate(runs[-1]["workers"])), flush=True)
    same = [{k: c[k] for k in ("length", "depth", "min_k")} for c in runs[0]["cells"]] == \
        [{k: c[k] for k in ("length", "depth", "min_k")} for c in runs[1]["cells"]]
    result = {"command": " ".join(["benchmarks/batch/run.py", *sys.argv[1:]]), "units": args.units,
              "workers": args.workers, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "same_min_k": same, "runs": runs, "cost_model": cost_model(runs[0]["cells"])}
    (HERE / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    from sparsetrace.files import save_figure

    save_figure(figure(result), HERE / "batch.png")
    print(json.dumps(result["cost_model"], indent=1))


if __name__ == "__main__":
    main()
