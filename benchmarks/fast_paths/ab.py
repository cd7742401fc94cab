"""The estimator of a git revision and of the working tree in ONE process, calls interleaved.

`compare.py` runs each checkout in its own processes, and on this shared machine the same code
differs by 10-20% from process to process. Here the revision's package is extracted under another
name (`sparsetrace_base`: its modules import each other relatively, so the copy is self-contained)
and both `select_blocks` run on the same q and k (one layer of the default model, standard normal,
default StreamConfig), alternating old-new / new-old for --calls rounds after two warm-up calls
each; the median per version, and the selections checked equal. Writes ab.json.

    python benchmarks/fast_paths/ab.py --base 091ee48 --lengths 4096 8192 16384 --calls 15
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from sparsetrace import stream
from sparsetrace.config import StreamConfig

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
HEADS, KV_HEADS, DIM = 9, 3, 64


def base_package(revision: str, folder: Path):
    """The revision's `sparsetrace` package as `sparsetrace_base`: (its stream module, its StreamConfig)."""
    archive = subprocess.run(["git", "archive", revision, "sparsetrace"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "sparsetrace").rename(folder / "sparsetrace_base")
    sys.path.insert(0, str(folder))
    return (importlib.import_module("sparsetrace_base.stream"),
            importlib.import_module("sparsetrace_base.config").StreamConfig)


def measure(base_stream, base_config, tokens: int, compiled: bool, calls: int) -> dict:
    generator = torch.Generator().manual_seed(tokens)
    q = torch.randn(1, HEADS, tokens, DIM, generator=generator)
    k = torch.randn(1, KV_HEADS, tokens, DIM, generator=generator)
    versions = {"base": lambda: base_stream.select_blocks(q, k, base_config(), compiled=compiled),
                "this": lambda: stream.select_blocks(q, k, StreamConfig(), compiled=compiled)}
    equal = torch.equal(versions["base"]().indices, versions["this"]().indices)
    for call in versions.values():
        call()
    times = {name: [] for name in versions}
    for r in range(calls):
        for name in ("base", "this") if r % 2 else ("this", "base"):
            started = time.perf_counter()
            versions[name]()
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"tokens": tokens, "path": "compile" if compiled else "eager", "indices_equal": equal, "times_s": times,
            "median_s": median, "ratio_this_to_base": median["this"] / median["base"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        base_stream, base_config = base_package(args.base, Path(folder))
        for tokens in args.lengths:
            for compiled in (False, True):
                rows.append(measure(base_stream, base_config, tokens, compiled, args.calls))
                row = rows[-1]
                print(tokens, row["path"], {n: round(t, 4) for n, t in row["median_s"].items()},
                      f"this/base {row['ratio_this_to_base']:.3f}", "equal" if row["indices_equal"] else "DIFFER",
                      flush=True)
    result = {"command": "python benchmarks/fast_paths/ab.py " + " ".join(sys.argv[1:]), "base": args.base,
              "loadavg_after": os.getloadavg(), "rows": rows}
    (HERE / "ab.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
