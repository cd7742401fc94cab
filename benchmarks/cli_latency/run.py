"""How long the `sparsetrace` command takes to answer when it has no work to do (issue #21).

`--help`, `--version` and an argument error should come back in under 1.5 s: building the parser
imports no torch or transformers. Each case runs as a whole process (the installed console script,
as a user types it), wall clock from start to exit, one warm-up run then --runs counted ones;
`python -c "import torch"` is the contrast, the price every command paid before. With --base REV
the same `--help` also runs on the package of git revision REV (exported into a temporary folder,
the editable install of this checkout set aside), to compare before and after on one machine.
Checks each exit status (0, or 2 for the argument error). Writes results.json and latency.png next
to itself and prints the Markdown table of README.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cli_latency/run.py [--runs 5] [--base REV]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
TARGET_S = 1.5
SCRIPT = Path(sys.executable).with_name("sparsetrace")  # the console script pip installed next to python
# (name, arguments after the command, expected exit status)
CASES = [
    ("sparsetrace --help", ["--help"], 0),
    ("sparsetrace trace --help", ["trace", "--help"], 0),
    ("sparsetrace --version", ["--version"], 0),
    ("sparsetrace trace --k notanumber", ["trace", "--k", "notanumber"], 2),
]
TORCH = ('python -c "import torch"', [sys.executable, "-c", "import torch"], 0)
# `sparsetrace` from the package in the folder argv[1] instead of the editable install of this checkout.
BASE_BOOT = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
             "getattr(f, '__module__', '')]; sys.path.insert(0, sys.argv.pop(1)); "
             "from sparsetrace.cli import main; sys.exit(main())")


def time_process(argv: list[str], expected: int, runs: int) -> dict:
    """Wall seconds of `runs` runs of argv after one warm-up; fails if an exit status is not `expected`."""
    seconds = []
    for i in range(runs + 1):
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, cwd=ROOT)
        elapsed = time.perf_counter() - start
        if done.returncode != expected:
            sys.exit(f"{' '.join(argv)} exited {done.returncode}, expected {expected}: {done.stderr.decode()[-500:]}")
        if i:
            seconds.append(elapsed)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "runs_s": seconds, "exit_status": expected}


def export(rev: str, folder: Path) -> str:
    """The package of git revision `rev` under `folder`; its full commit id."""
    commit = subprocess.run(["git", "rev-parse", rev], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    archive = subprocess.run(["git", "archive", rev, "sparsetrace"], capture_output=True, check=True, cwd=ROOT)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return commit.strip()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    median = [r["median_s"] for r in rows]
    spread = [[r["median_s"] - r["min_s"] for r in rows], [r["max_s"] - r["median_s"] for r in rows]]
    figure, axes = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    colors = ["tab:gray" if not r["name"].startswith("sparsetrace") else "tab:orange" if " at " in r["name"]
              else "tab:blue" for r in rows]
    axes.barh(names, median, xerr=spread, color=colors, capsize=3)
    axes.axvline(TARGET_S, color="tab:red", linestyle="--", label=f"target {TARGET_S} s")
    for y, row in enumerate(rows):
        axes.text(row["max_s"], y, f"  {row['median_s']:.2f} s", va="center", ha="left", fontsize=8)
    axes.set_xlim(0, 1.15 * max(r["max_s"] for r in rows))
    axes.invert_yaxis()
    axes.set_xlabel("wall seconds, whole process (median; bars: min-max)")
    axes.set_title("sparsetrace answering without work")
    axes.legend(loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=130)


def table(results: dict) -> str:
    lines = ["| command | exit | median | min | max |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| `{r['name']}` | {r['exit_status']} | {r['median_s']:.3f} s | {r['min_s']:.3f} s | "
                     f"{r['max_s']:.3f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="counted runs per command, after one warm-up")
    parser.add_argument("--base", default=None, metavar="REV", help="also time `sparsetrace --help` on the package "
                        "of git revision REV (e.g. the commit before the lazy imports)")
    args = parser.parse_args()
    if not SCRIPT.exists():
        sys.exit(f"{SCRIPT} is missing; install the package first (pip install -e .)")
    load_before = os.getloadavg()
    rows = [{"name": name, "argv": [SCRIPT.name, *argv]} | time_process([str(SCRIPT), *argv], expected, args.runs)
            for name, argv, expected in CASES]
    name, argv, expected = TORCH
    rows.append({"name": name, "argv": ["python", *argv[1:]]} | time_process(argv, expected, args.runs))
    base = None
    if args.base:
        with tempfile.TemporaryDirectory() as folder:
            commit = export(args.base, Path(folder))
            argv = [sys.executable, "-c", BASE_BOOT, folder, "--help"]
            base = {"rev": args.base, "commit": commit}
            rows.append({"name": f"sparsetrace --help at {commit[:7]}", "argv": ["sparsetrace", "--help"]}
                        | time_process(argv, 0, args.runs))
    results = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cli_latency/run.py" + " ".join(
            [""] + sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "target_s": TARGET_S, "runs": args.runs, "warmup": 1, "base": base, "rows": rows,
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(rows, HERE / "latency.png")
    print(table(results))


if __name__ == "__main__":
    main()
