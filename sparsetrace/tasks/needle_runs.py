"""Needle runs: one prompt (answer, min k, trace, route, figures) and length x depth sweeps.

A run asks the dense model for its greedy answer, then traces the prompt with the answer
teacher-forced (prompt + answer tokens but the last), so that the sparse model is checked on the
whole answer, not only its first token. With k = "auto" the k is the smallest that keeps the answer
(`search_min_k`). The route goes from the needle's blocks to the blocks of the positions that
predict the answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..analysis.routes import DEFAULT_THRESHOLD, NeedleRoute, needle_route
from ..config import StreamConfig
from ..errors import InputError
from ..fidelity import MinKResult, search_min_k
from ..files import save_figure, write_json
from ..trace import Trace
from ..tracer import prepare_input, run_trace
from .niah import ANSWER_TOKENS, DenseAnswer, NiahPrompt, dense_answer, niah_prompt

SWEEP_PANELS = {
    "correct": "dense answer right (1 = yes)",
    "min_k": "smallest k that keeps the answer",
    "kept_fraction": "kept token pairs at min k",
    "compression": "compression at min k (x)",
    "connected": "route needle -> answer (1 = yes)",
}


@dataclass
class NiahRun:
    """One needle prompt, traced at `k`; `answer_kept`: the sparse model reproduces the dense answer."""

    prompt: NiahPrompt
    answer: DenseAnswer
    k: int
    min_k: MinKResult | None
    trace: Trace
    answer_kept: bool
    route: NeedleRoute
    seconds: float

    def summary(self) -> dict[str, Any]:
        stats = self.trace.stats()
        return {
            "prompt": self.prompt.to_dict(),
            "dense_answer": self.answer.text,
            "correct": self.answer.correct,
            "k": self.k,
            "min_k": None if self.min_k is None else self.min_k.min_k,
            "min_k_search": None if self.min_k is None else self.min_k.to_dict(),
            "answer_kept": self.answer_kept,
            "kept_fraction": 1.0 - stats["sparsity"],
            "compression": stats["compression"],
            "stats": stats,
            "route": self.route.to_dict(),
            "seconds": round(self.seconds, 1),
        }


def run_niah(
    model,
    tokenizer,
    prompt: NiahPrompt,
    config: StreamConfig | None = None,
    *,
    k: int | str = "auto",
    k_max: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    allow_long: bool = False,
    progress: bool | None = None,
    kernel: str = "auto",
) -> NiahRun:
    """Answer, (min k,) trace and route for one prompt. `config` gives everything but k; `kernel`: as `trace`."""
    if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise InputError(f"k={k!r}; use a positive number of key blocks or 'auto' (the smallest that keeps the answer)")
    started = time.perf_counter()
    config = config or StreamConfig()
    prepare_input(model, tokenizer, None, prompt.token_ids, config, allow_long=allow_long,
                  continuation=ANSWER_TOKENS - 1)  # refuse before the dense answer, not after it
    answer = dense_answer(model, tokenizer, prompt)
    extended = torch.cat([prompt.token_ids, answer.tokens[:-1]])
    found = None
    if k == "auto":
        found = search_min_k(model, tokenizer, extended, answer.tokens, config, k_max=k_max, progress=progress,
                             kernel=kernel)
        k = found.min_k if found.min_k is not None else found.k_max
    traced, logits = run_trace(model, tokenizer, extended, config.with_k(k), logits_to_keep=len(answer.tokens),
                               progress=progress, kernel=kernel)
    route = needle_route(traced, prompt.needle_tokens, (prompt.num_tokens - 1, len(extended)), threshold=threshold)
    return NiahRun(prompt, answer, k, found, traced, bool(torch.equal(logits.argmax(-1), answer.tokens)), route,
                   time.perf_counter() - started)


def block_labels(trace: Trace, tokenizer, blocks: list[int], width: int = 24) -> dict[int, str]:
    """Short text of each block: its tokens decoded, whitespace collapsed, cut to `width` characters."""
    size = trace.config.block_q
    labels = {}
    for b in blocks:
        text = " ".join(tokenizer.decode(trace.token_ids[b * size : (b + 1) * size]).split())
        labels[b] = text if len(text) <= width else text[: width - 1] + "…"
    return labels


def save_niah(run: NiahRun, tokenizer, folder: str | Path, causal=None) -> dict[str, str]:
    """Write niah.json, route.png, needle_heads.png and trace.sptrace (the summary in its `extra`);
    with `causal` (a `needle_causal.ReaderKnockout`) also its fields in niah.json ("causal") and causal.png."""
    from ..plots import knockout_figure, reader_heads_figure, route_figure

    folder = Path(folder)
    summary = run.summary()
    if causal is not None:
        summary["causal"] = causal.to_dict()
    route = run.route
    on_route = [block for u, v, _ in route.route.attention_edges() for block in (v[1], u[1])]
    labelled = list(dict.fromkeys([0, *route.needle_blocks, *route.answer_blocks, *on_route]))[:30]
    status = "connected" if route.route.connected else "not connected"
    title = (f"{run.prompt.num_tokens:,} tokens, needle at depth {run.prompt.depth} (blocks {route.needle_blocks}), "
             f"k = {run.k}: route to the answer {status}\ndense answer{run.answer.text!r} "
             f"({'right' if run.answer.correct else 'wrong'}), "
             f"{'kept' if run.answer_kept else 'LOST'} by the sparse model")
    figure = route_figure(route.route, run.trace.num_layers, run.trace.num_query_blocks,
                          block_labels(run.trace, tokenizer, labelled), title=title)
    heads = reader_heads_figure(route.readers, colorbar="kept attention mass",
                                title="mass the answer block puts on the needle block (kept blocks, per head)")
    paths = {
        "json": write_json(folder / "niah.json", summary),
        "route": save_figure(figure, folder / "route.png"),
        "heads": save_figure(heads, folder / "needle_heads.png"),
    }
    if causal is not None:
        where = "sparse, k = " + str(run.k) if causal.forward == "sparse" else "dense"
        title = (f"{run.prompt.num_tokens:,} tokens, needle at depth {run.prompt.depth}: top-N reader heads vs N "
                 f"random heads knocked out ({causal.head_mode}, {where} forward)")
        paths["causal"] = save_figure(knockout_figure(causal.per_n(), title=title), folder / "causal.png")
    run.trace.extra["niah"] = {key: summary[key] for key in ("prompt", "dense_answer", "correct", "k", "min_k",
                                                            "answer_kept")} | {"route": summary["route"]}
    paths["trace"] = run.trace.save(folder / "trace.sptrace")
    return {name: str(path) for name, path in paths.items()}


def sweep(
    model,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    folder: str | Path,
    config: StreamConfig | None = None,
    *,
    seed: int = 0,
    k_max: int | None = None,
    haystack: str | None = None,
    chat_template: bool | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    allow_long: bool = False,
    progress: bool | None = None,
    kernel: str = "auto",
    on_cell=None,
) -> list[dict[str, Any]]:
    """Every length x depth cell: correctness, min k, kept fraction, compression, route. Resumable:
    each finished cell is written to folder/cells/ atomically and skipped next time (as is every cell
    of an existing sweep.json), and sweep.json
    and sweep.png are rewritten after every cell, so an interrupted sweep leaves what it finished."""
    import json

    from ..plots import sweep_figure

    cells_dir = Path(folder) / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    config = config or StreamConfig()
    grid = [(length, depth, cells_dir / f"{length}_{depth}.json") for length in lengths for depth in depths]
    done = {(length, depth): json.loads(path.read_text()) for length, depth, path in grid if path.exists()}
    summary = Path(folder) / "sweep.json"
    if summary.exists():  # cells/ is a local cache; a committed sweep.json alone also resumes
        for cell in json.loads(summary.read_text()).get("cells", []):
            done.setdefault((cell["length"], cell["depth"]), cell)

    def write_summary() -> list[dict[str, Any]]:
        cells = [done[length, depth] for length, depth, _ in grid if (length, depth) in done]
        write_json(Path(folder) / "sweep.json", {"config": config.to_dict(), "seed": seed, "threshold": threshold,
                                                 "cells": cells})
        save_figure(sweep_figure(cells, lengths, depths, SWEEP_PANELS), Path(folder) / "sweep.png")
        return cells

    for length, depth, path in grid:
        if (length, depth) in done:
            continue
        write_summary()  # what is finished so far, before the long work of a new cell
        prompt = niah_prompt(tokenizer, length, depth, seed=seed, haystack=haystack, chat_template=chat_template)
        run = run_niah(model, tokenizer, prompt, config, k="auto", k_max=k_max, threshold=threshold,
                       allow_long=allow_long, progress=progress, kernel=kernel)
        summary = run.summary()
        cell = {"length": length, "depth": depth, "tokens": prompt.num_tokens, "correct": run.answer.correct,
                "dense_answer": run.answer.text, "expected": prompt.answer, "min_k": summary["min_k"],
                "kept_fraction": summary["kept_fraction"], "compression": summary["compression"],
                "connected": run.route.route.connected, "answer_kept": run.answer_kept,
                "needle_blocks": run.route.needle_blocks, "seconds": summary["seconds"]}
        write_json(path, cell)
        done[length, depth] = cell
        write_summary()
        if on_cell is not None:
            on_cell(cell)
    return write_summary()
