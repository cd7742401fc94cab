"""Does knocking out a flow's source span move its target more than random spans of the same size?

Pairs come from the built-in sample (the Hallin Skerry history, ~4k tokens): two-word names and
words of 5+ letters, of at least two tokens, that occur exactly twice, at least 128 tokens apart.
The target is the second occurrence's tail (every token after its first), which a model can copy
from the first occurrence (induction); the source is the first occurrence. Only pairs whose tail
the dense model predicts better from the whole text than from its last 48 tokens alone (by at least
1 nat: the tail depends on something far back, not only on a common phrase) are kept, up to
`--pairs`, in text order. For each pair:

- flow: `st.flow` on one sparse trace of the whole sample (k = 8): is the route from the source's
  blocks to the target's blocks connected, and how many attention edges carry >= 0.02 of it;
- causal: the target tail's log-probability, teacher-forced after the text before it, without and
  with the source span knocked out (every layer and head), against `--random` spans of the same
  number of tokens drawn (seeded) from the text before the target, outside the source and the
  first block (the sink). Sparse (k = 8) and dense (`--forward`).

    .venv/bin/python benchmarks/salience/causal.py            # writes causal.json and causal.png here
    .venv/bin/python benchmarks/salience/causal.py --table    # the summary and the figure again
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

import sparsetrace as st
from sparsetrace.analysis.spans import TraceText

HERE = Path(__file__).parent
MIN_GAP = 128  # tokens between the two occurrences
SINK = 64  # random spans stay out of the first block (the attention sink)


def find_pairs(text: str, ids: list[int], offsets: list[tuple[int, int]], most: int) -> list[dict]:
    """Names and words of >= 2 tokens occurring exactly twice, >= MIN_GAP tokens apart: source and target spans."""
    def tokens_of(a: int, b: int) -> tuple[int, int]:
        hit = [t for t, (x, y) in enumerate(offsets) if x < b and y > a]
        return hit[0], hit[-1] + 1

    pairs, seen = [], set()
    candidates = re.findall(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b", text) + re.findall(r"\b[A-Za-z][A-Za-z-]{4,}\b", text)
    for word in candidates:
        if word in seen:
            continue
        seen.add(word)
        where = [m.start() for m in re.finditer(rf"\b{re.escape(word)}\b", text)]
        if len(where) != 2:
            continue
        source = tokens_of(where[0], where[0] + len(word))
        target = tokens_of(where[1], where[1] + len(word))
        if target[1] - target[0] < 2 or target[0] - source[1] < MIN_GAP or source[0] < SINK:
            continue
        if any(target[0] < p["target"][1] and p["target"][0] < target[1] for p in pairs):
            continue  # "Calder" inside "Robert Calder": one pair
        pairs.append({"word": word, "source": source, "target": target})
    pairs.sort(key=lambda p: p["target"][0])
    return pairs[:most]


def induction_gain(model, tokenizer, ids: list[int], pairs: list[dict], window: int = 48) -> list[float]:
    """Per pair: log p(tail | the whole text before it) - log p(tail | its last `window` tokens), dense."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        whole = torch.log_softmax(logits, dim=-1)
        gains = []
        for pair in pairs:
            a, b = pair["target"]
            tail = torch.tensor(ids[a + 1 : b])
            far = whole[a : b - 1].gather(-1, tail[:, None]).sum()
            local = torch.log_softmax(model(input_ids=torch.tensor([ids[a + 1 - window : b - 1]])).logits[0].float(),
                                      dim=-1)[-len(tail):].gather(-1, tail[:, None]).sum()
            gains.append(float(far - local))
    return gains


def random_spans(length: int, limit: int, avoid: tuple[int, int], count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    spans = []
    while len(spans) < count:
        a = rng.randrange(SINK, limit - length)
        if a + length <= avoid[0] or a >= avoid[1]:
            spans.append((a, a + length))
    return spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--random", type=int, default=8, help="random spans per pair")
    parser.add_argument("--forward", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    parser.add_argument("--out", default=str(HERE / "causal.json"))
    parser.add_argument("--table", action="store_true", help="summarize --out and redraw its figure")
    args = parser.parse_args()
    if args.table:
        results = json.loads(Path(args.out).read_text())
        summarize(results)
        Path(args.out).write_text(json.dumps(results, indent=1))
        plot(results, Path(args.out).with_suffix(".png"))
        return

    model, tokenizer = st.load_model()
    config = st.StreamConfig(k=8)
    text = (Path(st.__file__).parent / "data" / "sample.txt").read_text()
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], [tuple(x) for x in encoded["offset_mapping"]]
    pairs = find_pairs(text, ids, offsets, 100)
    for pair, gain in zip(pairs, induction_gain(model, tokenizer, ids, pairs), strict=True):
        pair["induction_gain"] = gain
        print(f"{pair['word']:>20}  tokens {pair['target']}  gain {gain:+.2f}", flush=True)
    pairs = [p for p in pairs if p["induction_gain"] >= 1.0][: args.pairs]
    trace = st.trace(model, tokenizer, text, config, progress=False)
    trace_text = TraceText(text, offsets, True)
    results = {"model": "SmolLM2-135M-Instruct", "config": config.to_dict(), "tokens": len(ids),
               "random_per_pair": args.random, "pairs": []}
    for n, pair in enumerate(pairs):
        source, target = pair["source"], pair["target"]
        found = st.flow(trace, source, target, text=trace_text, min_flow=0.02)
        row = {"word": pair["word"], "source": list(source), "target": list(target),
               "induction_gain": pair["induction_gain"],
               "flow_connected": found.route.connected, "flow_edges": len(found.route.attention_edges())}
        prompt, response = ids[: target[0] + 1], ids[target[0] + 1 : target[1]]
        controls = random_spans(source[1] - source[0], target[0], source, args.random, seed=n)
        interventions = [st.Intervention(knockout=[source])] + [st.Intervention(knockout=[c]) for c in controls]
        for forward in args.forward:
            started = time.perf_counter()
            result = st.response_logprobs(model, tokenizer, prompt, response, interventions, forward=forward,
                                          config=config, progress=False)
            drop = result.drop.tolist()
            row[forward] = {"base_logprob": float(result.base.sum()), "source_drop": drop[0],
                            "random_drops": drop[1:], "random_spans": [list(c) for c in controls],
                            "source_beats_all_random": drop[0] > max(drop[1:]),
                            "source_rank": 1 + sum(d >= drop[0] for d in drop[1:]),
                            "seconds": round(time.perf_counter() - started, 1)}
            print(f"{pair['word']:>14} {forward:6} base {row[forward]['base_logprob']:7.3f}  source drop "
                  f"{drop[0]:+7.3f}  random mean {np.mean(drop[1:]):+7.3f} max {max(drop[1:]):+7.3f}  "
                  f"rank {row[forward]['source_rank']}/{len(drop)}  flow "
                  f"{'connected' if found.route.connected else '-'}", flush=True)
        results["pairs"].append(row)
        Path(args.out).write_text(json.dumps(results, indent=1))
    summarize(results)
    Path(args.out).write_text(json.dumps(results, indent=1))
    plot(results, Path(args.out).with_suffix(".png"))


def summarize(results: dict) -> None:
    for forward in ("sparse", "dense"):
        rows = [p[forward] for p in results["pairs"] if forward in p]
        if not rows:
            continue
        results[f"summary_{forward}"] = {
            "pairs": len(rows),
            "source_beats_every_random": sum(r["source_beats_all_random"] for r in rows),
            "source_above_random_mean": int(sum(r["source_drop"] > np.mean(r["random_drops"]) for r in rows)),
            "median_source_drop": float(np.median([r["source_drop"] for r in rows])),
            "median_random_drop": float(np.median([d for r in rows for d in r["random_drops"]])),
            "flow_connected": sum(p["flow_connected"] for p in results["pairs"]),
        }
        print(forward, results[f"summary_{forward}"])


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    forwards = [f for f in ("sparse", "dense") if f"summary_{f}" in results]
    fig = Figure(figsize=(5.5 * len(forwards), 4.2), layout="constrained")
    for ax, forward in zip(np.atleast_1d(fig.subplots(1, len(forwards))), forwards, strict=True):
        pairs = [p for p in results["pairs"] if forward in p]
        for i, p in enumerate(pairs):
            ax.scatter([i] * len(p[forward]["random_drops"]), p[forward]["random_drops"], s=12, color="0.6",
                       label="random span" if i == 0 else None)
            ax.scatter([i], [p[forward]["source_drop"]], s=40, color="tab:red", marker="D",
                       label="flow source" if i == 0 else None)
        ax.set_xticks(range(len(pairs)), [p["word"] for p in pairs], rotation=60, ha="right", fontsize=8)
        ax.axhline(0, color="black", lw=0.5)
        s = results[f"summary_{forward}"]
        ax.set_title(f"{forward}: source beats every random span in {s['source_beats_every_random']}/{s['pairs']}",
                     fontsize=10)
        ax.set_ylabel("drop in the target's log-probability")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
