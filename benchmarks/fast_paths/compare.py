"""The estimator of two checkouts side by side: did a change of `stream.py` cost time or compiles?

Runs this folder's `run.py` (the same harness for both) on the package of the working tree and on
the package of git revision --base (checked out into a temporary worktree), in turns:
base, this, base, this, ... --rounds times, each a fresh process, only the estimator paths
(eager and compiled). Per checkout and length: the median over rounds of run.py's per-call
medians, and the count of graphs dynamo compiled (equal counts: the compiled graphs are reused
as before). Writes `NAME.json` and `NAME.png` next to itself (--name, default "checkouts").

    python benchmarks/fast_paths/compare.py --base HEAD --lengths 4096 8192 16384 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
PATHS = ["estimator_eager", "estimator_compile"]
# The package of `checkout` wins over the editable install of this one (a meta-path finder).
BOOT = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
        "getattr(f, '__module__', '')]; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = sys.argv[1]; "
        "runpy.run_path(sys.argv.pop(1), run_name='__main__')")


def run_once(checkout: Path, lengths: list[int], runs: int) -> dict:
    """One process of run.py on `checkout`'s package; its results.json."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-c", BOOT, str(checkout), str(HERE / "run.py"), "--paths", *PATHS,
                   "--runs", str(runs), "--out", out, "--lengths", *map(str, lengths)]
        subprocess.run(command, check=True, cwd=ROOT)
        return json.loads((Path(out) / "results.json").read_text())


def summary(results: list[dict]) -> list[dict]:
    """Per length: median seconds per path over the rounds, and the graph counts of each round."""
    rows = []
    for i, tokens in enumerate(r["tokens"] for r in results[0]["rows"]):
        per_round = [r["rows"][i] for r in results]
        rows.append({
            "tokens": tokens,
            "median_s": {p: statistics.median(r["median_s"][p] for r in per_round) for p in PATHS},
            "graphs_compiled_after_runs": [r["graphs_compiled_after_runs"] for r in per_round],
            "indices_equal_compiled_vs_eager": [r["vs_eager"]["estimator_compile"]["indices_equal"] for r in per_round],
        })
    return rows


def plot(result: dict, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("base", "--"), ("this", "-")):
        rows = result[name]["rows"]
        for path in PATHS:
            ax.plot([r["tokens"] for r in rows], [r["median_s"][path] for r in rows], style, marker="o",
                    label=f"{name} ({result[name]['revision'][:7]}): {path.split('_')[1]}")
    ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="seconds per call, one layer (median)",
           title="select_blocks before and after (in turns)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / f"{stem}.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git revision to compare the working tree with")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--rounds", type=int, default=2, help="processes per checkout, in turns")
    parser.add_argument("--runs", type=int, default=3, help="run.py's calls per path and length")
    parser.add_argument("--name", default="checkouts", help="file name (no suffix) of the JSON and PNG written")
    args = parser.parse_args()
    revision = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), revision], cwd=ROOT, check=True)
        try:
            results = {"base": [], "this": []}
            for _ in range(args.rounds):
                for name, checkout in (("base", base), ("this", ROOT)):
                    results[name].append(run_once(checkout, args.lengths, args.runs))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=True)
    result = {
        "command": "python benchmarks/fast_paths/compare.py " + " ".join(sys.argv[1:]),
        "loadavg_after": os.getloadavg(),
        "base": {"revision": revision, "rows": summary(results["base"])},
        "this": {"revision": "working tree on " + revision, "rows": summary(results["this"])},
    }
    (HERE / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.name)


if __name__ == "__main__":
    main()
