"""What each sparsetrace command costs on Gemma 3 270M, 4k-32k tokens: wall time and peak memory.

Every (command, length) runs in a fresh process exactly as a user would type it
(`sparsetrace COMMAND ... --model gemma-3-270m`, default settings, k = 8), on a RULER-style needle
prompt without chat template (at 32k tokens shortened by the positions check and niah append,
see `prompt_tokens`), needle at depth 0.5 (`niah_prompt`; `niah` builds the same prompt
itself); `anchors` reads the built-in sample essay repeated to the length instead, and runs without
its optional dense reference (`--dense-check never`), so that every length does the same work.
Measured: wall time from start to exit (model load included; a load-only process gives that part
alone), the CPU time of the process (user + system: what the work costs whatever else runs on the
machine; on 2 cores it can exceed the wall time) and its peak RSS (`os.wait4`). results.json is
rewritten after every run (finished runs are kept and skipped when the command is run again);
cost.png plots time and memory against T per command.

    python benchmarks/gemma/run.py --lengths 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

HERE = Path(__file__).parent
MODEL = "gemma-3-270m"
CONTEXT = 32768
COMMANDS = ("load", "trace", "check", "anchors", "niah")


def command_line(command: str, tokens: int, text: Path, scratch: Path) -> list[str]:
    """The CLI call of `command` at `tokens` tokens (`load`: the model load alone)."""
    if command == "load":
        return [sys.executable, "-c", f"from sparsetrace import load_model; load_model({MODEL!r})"]
    common = ["--model", MODEL, "--no-progress", "--json"]
    cli = [str(Path(sys.executable).with_name("sparsetrace")), command]
    return cli + {
        "trace": [str(text), "-o", str(scratch / "run.sptrace")],
        "check": [str(text)],
        "anchors": [str(text), "-o", str(scratch / "anchors"), "--dense-check", "never"],
        "niah": ["--length", str(prompt_tokens(command, tokens)), "--depth", "0.5", "--k", "8",
                 "--no-chat-template", "-o", str(scratch / "niah")],
    }[command] + common


def run_once(argv: list[str], scratch: Path) -> dict:
    """Run `argv` in a fresh process: wall seconds, peak RSS in bytes, exit code, the JSON it printed."""
    out, err = scratch / "stdout", scratch / "stderr"
    started = time.perf_counter()
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(argv, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (wait() would discard it)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    row = {"seconds": round(seconds, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
           "peak_rss_bytes": usage.ru_maxrss * 1024, "exit_code": process.returncode,
           "loadavg_after": round(os.getloadavg()[0], 2)}
    if process.returncode != 0:
        row["error"] = (err.read_text().strip().splitlines() or ["no output"])[-1]
    printed = out.read_text()
    row["output"] = json.loads(printed[printed.find("{"):]) if process.returncode == 0 and "{" in printed else None
    return row


def prompt_tokens(command: str, tokens: int) -> int:
    """The prompt length for `tokens`: check and niah append their teacher-forced answer (1 and up
    to 11 positions), so at the full context their prompt is that much shorter."""
    from sparsetrace.tasks.niah import ANSWER_TOKENS

    return min(tokens, CONTEXT - {"check": 1, "niah": ANSWER_TOKENS - 1}.get(command, 0))


def input_text(command: str, tokens: int, tokenizer) -> str:
    """The needle prompt; for `anchors` the built-in sample essay repeated (the haystack's 10-token
    sentences would make a unit of every sentence: a worst case, not a chain of thought)."""
    from sparsetrace import niah_prompt

    if command != "anchors":
        return niah_prompt(tokenizer, prompt_tokens(command, tokens), 0.5, chat_template=False, form="legacy").text
    essay = resources.files("sparsetrace").joinpath("data/sample.txt").read_text()
    ids = tokenizer(essay, add_special_tokens=False)["input_ids"]
    return tokenizer.decode((ids * (tokens // len(ids) + 1))[: tokens - 1])


def measure(command: str, tokens: int, tokenizer) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        text = scratch / "prompt.txt"
        text.write_text(input_text(command, tokens, tokenizer))
        return {"command": command, "tokens": tokens, "argv": command_line(command, tokens, text, Path("DIR")),
                **run_once(command_line(command, tokens, text, scratch), scratch)}


def summary(row: dict) -> str:
    if row["exit_code"] != 0:
        return f"failed: {row['error']}"
    return f"{row['seconds']:.0f} s ({row['cpu_seconds']:.0f} s CPU), {row['peak_rss_bytes'] / 2**30:.2f} GiB"


def table(result: dict) -> str:
    """The README's table: one row per length, one column per command."""
    rows = {(r["command"], r["tokens"]): r for r in result["runs"]}
    lengths = sorted({tokens for _, tokens in rows})
    commands = [c for c in COMMANDS if any(c == command for command, _ in rows)]
    lines = ["| tokens | " + " | ".join(commands) + " |", "|---" * (len(commands) + 1) + "|"]
    for tokens in lengths:
        cells = [summary(rows[c, tokens]) if (c, tokens) in rows else "-" for c in commands]
        lines.append(f"| {tokens:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for command, marker in zip(COMMANDS, "xos^v", strict=True):
        done = sorted((r["tokens"], r) for r in result["runs"] if r["command"] == command and r["exit_code"] == 0)
        if done:
            tokens = [t for t, _ in done]
            ax_time.plot(tokens, [r["seconds"] for _, r in done], marker + "-", label=command)
            ax_mem.plot(tokens, [r["peak_rss_bytes"] / 2**30 for _, r in done], marker + "-", label=command)
    lengths = sorted({r["tokens"] for r in result["runs"]})
    for ax, label in ((ax_time, "seconds (wall, model load included)"), (ax_mem, "peak RSS, GiB")):
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel=label)
        ax.set_xticks(lengths, [f"{t // 1024}k" for t in lengths])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_time.set_title("Time per command (k = 8)")
    ax_mem.set_title("Peak memory of the process")
    fig.suptitle("Gemma 3 270M on 2 CPU cores, float32: each command in a fresh process")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    parser.add_argument("--table", action="store_true", help="print the README's table and redraw cost.png")
    args = parser.parse_args()
    path = HERE / "results.json"
    result = json.loads(path.read_text()) if path.exists() else {"runs": []}
    if not args.table:
        from sparsetrace import load_tokenizer

        tokenizer = load_tokenizer(MODEL)
        result |= {"command": "python benchmarks/gemma/run.py " + " ".join(sys.argv[1:]), "model": MODEL,
                   "cpus": os.cpu_count(), "platform": sys.platform}
        for tokens in args.lengths:
            for command in args.commands:
                if any(r["command"] == command and r["tokens"] == tokens for r in result["runs"]):
                    continue
                row = measure(command, tokens, tokenizer)
                result["runs"].append(row)
                partial = path.with_suffix(".partial")
                partial.write_text(json.dumps(result, indent=1) + "\n")
                os.replace(partial, path)
                print(f"{command:8s} {tokens:6d} tokens: {summary(row)}", flush=True)
    plot(result, HERE / "cost.png")
    print(table(result))


if __name__ == "__main__":
    main()
