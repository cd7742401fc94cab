"""Load time, trace time and peak memory of a k = 8 trace on Gemma 3 270M, one length per process.

Prints one JSON line (appended to results.jsonl by the command in README.md): the prompt is a
RULER-style needle prompt without chat template (`sparsetrace.niah_prompt`), depth 0.5.

    for n in 4096 8192; do python benchmarks/gemma/run.py $n >> benchmarks/gemma/results.jsonl; done
"""

import json
import os
import resource
import sys
import time

import torch

from sparsetrace import StreamConfig, load_model, niah_prompt, trace


def peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    length = int(sys.argv[1])
    started = time.perf_counter()
    model, tokenizer = load_model("gemma-3-270m")
    load_s = time.perf_counter() - started
    ids = niah_prompt(tokenizer, length, 0.5, chat_template=False).token_ids
    before = peak_rss_mb()
    started, cpu = time.perf_counter(), time.process_time()
    result = trace(model, tokenizer, input_ids=ids, config=StreamConfig(k=8), progress=False)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    stats = result.stats()
    print(json.dumps({"tokens": ids.numel(), "load_s": round(load_s, 1), "trace_wall_s": round(wall, 1),
                      "trace_cpu_s": round(cpu, 1), "peak_rss_mb_before_trace": before, "peak_rss_mb": peak_rss_mb(),
                      "sparsity": round(stats["sparsity"], 3), "trace_bytes": stats["trace_bytes"],
                      "loadavg": os.getloadavg()[0], "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
