"""Needle runs: one prompt (answers, min k, trace, route, figures) and length x depth sweeps.

A run asks the dense model for its greedy answer, then traces the prompt with the answer
teacher-forced (prompt + answer tokens but the last), so that the sparse model is checked on the
whole answer, not only its first token. With k = "auto" the k is the smallest that keeps the answer
(`search_min_k`, whose trace at that k is the run's). The route goes from the needle's blocks to the
blocks of the positions that predict the answer.

A route that connects, or an answer kept under teacher forcing, is not yet an answer the sparse
model gives: a run also lets the sparse model answer on its own (`sparse_answer`, free-running
greedy decoding on sparse attention), and scores both answers with RULER's `string_match_all`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..ablation import caches, intervened_logits, reusable_prefix
from ..analysis.routes import DEFAULT_THRESHOLD, NeedleRoute, needle_route
from ..config import StreamConfig
from ..errors import InputError
from ..fidelity import MinKResult, search_min_k
from ..files import save_figure, write_json
from ..models import eos_token_ids
from ..notebook import facts_html, facts_repr
from ..text import decoded_blocks, shorten
from ..trace import Trace
from ..tracer import prepare_input, run_trace
from .needle_causal import string_match_all
from .niah import ANSWER_TOKENS, DenseAnswer, NiahPrompt, dense_answer, niah_prompt

SWEEP_PANELS = {
    "correct": "dense answer right (1 = yes)",
    "sparse_score": "sparse model's own answer at min k:\nRULER score",
    "min_k": "smallest k that keeps the answer",
    "kept_fraction": "kept token pairs at min k",
    "compression": "compression at min k (x)",
    "connected": "route needle -> answer (1 = yes)",
}
# A coverage budget has no k to search: each cell is traced once at the budget.
COVERAGE_PANELS = {
    "correct": "dense answer right (1 = yes)",
    "sparse_score": "sparse model's own answer:\nRULER score",
    "answer_kept": "answer kept (teacher-forced, 1 = yes)",
    "kept_per_row_mean": "blocks kept per row (mean)",
    "kept_fraction": "kept token pairs",
    "connected": "route needle -> answer (1 = yes)",
}


@dataclass
class NiahRun:
    """One needle prompt, traced at `k` (None under a coverage budget: the trace's config says it).

    `answer`: the dense model's greedy answer; `answer_kept`: the sparse model reproduces it with the
    answer teacher-forced; `sparse_answer`: the sparse model's own greedy answer, free-running.
    """

    prompt: NiahPrompt
    answer: DenseAnswer
    k: int | None
    min_k: MinKResult | None
    trace: Trace
    answer_kept: bool
    route: NeedleRoute
    seconds: float
    sparse_answer: DenseAnswer

    @property
    def budget(self) -> str:
        """The trace's budget in words: "k = 8" or "coverage 0.95 (1-32 blocks a row)"."""
        return self.trace.config.budget_text()

    @property
    def dense_score(self) -> float:
        """RULER's `string_match_all` of the dense answer (1 = it holds the needle's value)."""
        return string_match_all(self.answer.text, [self.prompt.answer])

    @property
    def sparse_score(self) -> float:
        """RULER's `string_match_all` of the sparse model's own answer."""
        return string_match_all(self.sparse_answer.text, [self.prompt.answer])

    def summary(self) -> dict[str, Any]:
        stats = self.trace.stats()
        return {
            "prompt": self.prompt.to_dict(),
            "dense_answer": self.answer.text,
            "correct": self.answer.correct,
            "dense_score": self.dense_score,
            "sparse_answer": self.sparse_answer.text,
            "sparse_score": self.sparse_score,
            "k": self.k,
            "budget": self.budget,
            "coverage": self.trace.config.coverage,
            "kept_per_row_mean": stats["kept_per_row_mean"],
            "min_k": None if self.min_k is None else self.min_k.min_k,
            "min_k_search": None if self.min_k is None else self.min_k.to_dict(),
            "answer_kept": self.answer_kept,
            "kept_fraction": 1.0 - stats["sparsity"],
            "compression": stats["compression"],
            "stats": stats,
            "route": self.route.to_dict(),
            "seconds": round(self.seconds, 1),
        }

    def _facts(self) -> dict[str, Any]:
        """The key numbers a notebook shows: the needle, both answers and scores, the budget, the route."""
        return {"tokens": self.prompt.num_tokens, "needle": f"{self.prompt.key} = {self.prompt.answer}".lstrip(" ="),
                "depth": self.prompt.depth, "dense_answer": self.answer.text, "dense_score": self.dense_score,
                "budget": self.budget, "answer_kept": self.answer_kept, "sparse_answer": self.sparse_answer.text,
                "sparse_score": self.sparse_score,
                "token_pairs_kept": f"{1 - self.trace.stats()['sparsity']:.1%}",
                "route_connected": self.route.route.connected,
                "top_readers": self.route._facts()["top_readers"], "seconds": round(self.seconds, 1)}

    def __repr__(self) -> str:
        return facts_repr("NiahRun", self._facts())

    def _repr_html_(self) -> str:
        return facts_html("NiahRun", self._facts(), note="scores: RULER's string_match_all; answer kept: with the "
                          "answer teacher-forced; top readers: (layer, head, mass on the needle)")


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
    """Answers, (min k,) trace and route for one prompt. `config` gives everything but k; `kernel`: as `trace`.
    Under a coverage budget (`config.coverage`) there is no k: the prompt is traced once at the budget.

    `prompt`: from `niah_prompt`, `ruler_prompts` (a RULER jsonl) or `NiahPrompt.from_text` (any text).
    """
    if not isinstance(prompt, NiahPrompt):
        raise InputError(f"prompt is a {type(prompt).__name__}, not a NiahPrompt; build one with niah_prompt(...), "
                         "NiahPrompt.from_text(tokenizer, text, needle=...) or ruler_prompts(tokenizer, 'x.jsonl')")
    if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise InputError(f"k={k!r}; use a positive number of key blocks or 'auto' (the smallest that keeps the answer)")
    started = time.perf_counter()
    config = config or StreamConfig()
    prepare_input(model, tokenizer, None, prompt.token_ids, config, allow_long=allow_long,
                  continuation=ANSWER_TOKENS - 1)  # refuse before the dense answer, not after it
    answer = dense_answer(model, tokenizer, prompt)
    extended = torch.cat([prompt.token_ids, answer.tokens[:-1]])
    found = None
    if config.coverage is not None:
        k = None
        traced, logits = run_trace(model, tokenizer, extended, config, logits_to_keep=len(answer.tokens),
                                   progress=progress, kernel=kernel)
        kept = bool(torch.equal(logits.argmax(-1), answer.tokens))
    elif k == "auto":
        found = search_min_k(model, tokenizer, extended, answer.tokens, config, k_max=k_max, progress=progress,
                             kernel=kernel)
        k = found.min_k if found.min_k is not None else found.k_max
        traced, kept = found.trace, found.passed[k]
    else:
        traced, logits = run_trace(model, tokenizer, extended, config.with_k(k), logits_to_keep=len(answer.tokens),
                                   progress=progress, kernel=kernel)
        kept = bool(torch.equal(logits.argmax(-1), answer.tokens))
    route = needle_route(traced, prompt.needle_tokens, (prompt.num_tokens - 1, len(extended)), threshold=threshold)
    own = sparse_answer(model, tokenizer, prompt, traced.config, kernel=kernel)
    return NiahRun(prompt, answer, k, found, traced, kept, route, time.perf_counter() - started, own)


def sparse_answer(
    model,
    tokenizer,
    prompt: NiahPrompt,
    config: StreamConfig,
    *,
    max_new_tokens: int = ANSWER_TOKENS,
    kernel: str = "auto",
) -> DenseAnswer:
    """The sparse model's own greedy answer: each token from a sparse pass over the prompt and the tokens
    it chose before, as a sparse model serving the prompt would answer (teacher forcing feeds it the
    dense answer instead, and Stream's last query block reads every query in it, so the two can differ).

    Stops as `dense_answer` does: where the expected value is complete, at the end of text, or after
    `max_new_tokens`. The prompt's full query blocks are computed once: every later pass takes their
    keys and values from the first one (`ablation.reusable_prefix`) and recomputes only the rest.
    """
    stop = set(eos_token_ids(model))
    ids, prefix = prompt.token_ids, None
    start = reusable_prefix(len(ids), "sparse", config) if caches("sparse", config) else 0
    generated: list[int] = []
    while True:
        logits, cache = intervened_logits(model, torch.cat([ids, torch.tensor(generated, dtype=torch.int64)]),
                                          config=config, forward="sparse", keep=1, kernel=kernel, prefix=prefix,
                                          keep_cache=prefix is None and start > 0)
        if cache is not None:
            prefix = [(keys[:, :, :start], values[:, :, :start]) for keys, values in cache]
        generated.append(int(logits[-1].argmax()))
        text = tokenizer.decode(generated)
        if generated[-1] in stop or len(generated) >= max_new_tokens or prompt.answer.lower() in text.lower():
            return DenseAnswer(torch.tensor(generated, dtype=torch.int64), text, prompt.answer in text)


def block_labels(trace: Trace, tokenizer, blocks: list[int], width: int = 24) -> dict[int, str]:
    """Short text of each block: its tokens decoded, whitespace collapsed, cut to `width` characters."""
    texts = decoded_blocks(trace.token_ids, tokenizer, trace.config.block_q)
    return {b: shorten(texts[b], width) for b in blocks}


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
             f"{run.budget}: route to the answer {status}\ndense answer{run.answer.text!r} "
             f"({'right' if run.answer.correct else 'wrong'}), {'kept' if run.answer_kept else 'LOST'} teacher-forced; "
             f"sparse model's own answer{run.sparse_answer.text!r} (RULER score {run.sparse_score:g})")
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
        where = "sparse, " + run.budget if causal.forward == "sparse" else "dense"
        title = (f"{run.prompt.num_tokens:,} tokens, needle at depth {run.prompt.depth}: top-N reader heads vs N "
                 f"random heads knocked out ({causal.head_mode}, {where} forward)")
        paths["causal"] = save_figure(knockout_figure(causal.per_n(), title=title), folder / "causal.png")
    run.trace.extra["niah"] = {key: summary[key] for key in ("prompt", "dense_answer", "correct", "dense_score", "k",
                                                            "budget",
                                                            "min_k", "answer_kept", "sparse_answer", "sparse_score")
                               } | {"route": summary["route"]}
    paths["trace"] = run.trace.save(folder / "trace.sptrace")
    return {name: str(path) for name, path in paths.items()}


def sweep(
    model,
    tokenizer,
    lengths: list[int] | None,
    depths: list[float] | None,
    folder: str | Path,
    config: StreamConfig | None = None,
    *,
    seed: int = 0,
    k_max: int | None = None,
    haystack: str | None = None,
    chat_template: bool | None = None,
    form: str = "ruler",
    prompts: list[NiahPrompt] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    allow_long: bool = False,
    progress: bool | None = None,
    kernel: str = "auto",
    on_cell=None,
    executor=None,
    retry_failed: bool = False,
) -> list[dict[str, Any]]:
    """Every length x depth cell (`niah_prompt` with `seed`, `haystack`, `chat_template`, `form`), or every
    prompt of `prompts` (e.g. `ruler_prompts`; then lengths and depths are None): both answers and their
    RULER scores, min k, kept fraction, compression, route.

    Each cell is a unit of `batch.run_units` (`needle_cell`), run in this process on `model` or on the
    workers of `executor` (a started `batch.RayExecutor`; then `model` and `tokenizer` may be None).
    Resumable: each finished cell is written to folder/cells/ atomically and skipped next time (as is
    every cell of an existing sweep.json; prompts are matched by their position in the list), and
    sweep.json, sweep.png and run.json (done / failed / remaining) are rewritten after every cell, so an
    interrupted sweep leaves what it finished. A cell that fails is reported in run.json and, after the
    others, raised (`batch.UnitsFailedError`); `retry_failed` runs it again. The heatmaps of prompts place
    each at its token count and needle depth."""
    import json
    from functools import partial

    from ..batch import InProcess, Unit, run_units
    from ..plots import sweep_figure

    grid = lengths is not None and depths is not None
    if grid == (prompts is not None) or (not grid and (lengths, depths) != (None, None)):
        raise InputError("give lengths and depths (a grid of niah_prompt prompts), or prompts alone")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config or StreamConfig()
    if prompts is None:
        units = [Unit(f"{length}_{depth}", {"length": length, "depth": depth})
                 for length in lengths for depth in depths]
    else:
        units = [Unit(f"row_{row}", {"row": row, "prompt": prompt}) for row, prompt in enumerate(prompts)]

    def name(cell: dict) -> str:
        return f"row_{cell['row']}" if "row" in cell else f"{cell['length']}_{cell['depth']}"

    summary = folder / "sweep.json"  # cells/ is a local cache; a committed sweep.json alone also resumes
    known = {name(cell): cell for cell in json.loads(summary.read_text()).get("cells", [])} if summary.exists() else {}
    cells: dict[str, dict] = {}  # name -> cell, every cell done so far

    def write_summary() -> list[dict[str, Any]]:
        ordered = [cells[u.name] for u in units if u.name in cells]
        write_json(summary, {"config": config.to_dict(), "seed": seed, "threshold": threshold, "cells": ordered})
        rows, columns = (lengths, depths) if prompts is None else \
            (sorted({c["length"] for c in ordered}), sorted({c["depth"] for c in ordered}))
        panels = SWEEP_PANELS if config.coverage is None else COVERAGE_PANELS
        save_figure(sweep_figure(ordered, rows, columns, panels), folder / "sweep.png")
        return ordered

    def finished(unit, cell: dict, done: dict[str, dict]) -> None:
        cells.update(done)
        write_summary()
        if on_cell is not None:
            on_cell(cell)

    task = partial(needle_cell, config=config, seed=seed, k_max=k_max, haystack=haystack, chat_template=chat_template,
                   form=form, threshold=threshold, allow_long=allow_long, progress=progress, kernel=kernel)
    first = run_units(units, task, folder / "cells", executor or InProcess(model, tokenizer), known=known,
                      retry_failed=retry_failed, progress=progress, on_result=finished)
    cells = dict(first.results)
    ordered = write_summary()
    first.check()
    return ordered


def needle_cell(model, tokenizer, inputs: dict[str, Any], *, config: StreamConfig, seed: int = 0,
                k_max: int | None = None, haystack: str | None = None, chat_template: bool | None = None,
                form: str = "ruler", threshold: float = DEFAULT_THRESHOLD, allow_long: bool = False,
                progress: bool | None = None, kernel: str = "auto") -> dict[str, Any]:
    """One sweep cell, a `batch` task: `inputs` {"length", "depth"} (a `niah_prompt`) or {"row", "prompt"}; the
    cell's row of sweep.json."""
    prompt = inputs["prompt"] if "prompt" in inputs else niah_prompt(
        tokenizer, inputs["length"], inputs["depth"], seed=seed, haystack=haystack, chat_template=chat_template,
        form=form)
    run = run_niah(model, tokenizer, prompt, config, k="auto", k_max=k_max, threshold=threshold,
                   allow_long=allow_long, progress=progress, kernel=kernel)
    summary = run.summary()
    where = {"length": inputs["length"], "depth": inputs["depth"]} if "prompt" not in inputs else \
        {"row": inputs["row"], "length": prompt.num_tokens, "depth": round(prompt.depth, 2)}
    return where | {
        "tokens": prompt.num_tokens, "correct": run.answer.correct, "dense_answer": run.answer.text,
        "expected": prompt.answer, "dense_score": run.dense_score, "sparse_answer": run.sparse_answer.text,
        "sparse_score": run.sparse_score, "min_k": summary["min_k"], "kept_fraction": summary["kept_fraction"],
        "kept_per_row_mean": summary["kept_per_row_mean"],
        "compression": summary["compression"], "connected": run.route.route.connected,
        "answer_kept": run.answer_kept, "needle_blocks": run.route.needle_blocks, "seconds": summary["seconds"]}
