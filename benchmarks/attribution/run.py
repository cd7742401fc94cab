"""Context attribution side by side: sparsetrace's `attribute` (one sparse traced pass) against
ContextCite (Cohen-Wang et al. 2024, the `context-cite` package), dense attention, leave-one-out
and random scores, scored against the dense model's behaviour under text removal.

Run with this benchmark's venv (ContextCite lives there; `setup.sh` makes it):

    benchmarks/attribution/.venv/bin/python benchmarks/attribution/run.py            # all of data.jsonl
    benchmarks/attribution/.venv/bin/python benchmarks/attribution/run.py --table    # README tables

Per example (data.jsonl, made by make_data.py):

1. prepare: ContextCite generates the response (the dense model's greedy answer, `max_new_tokens`
   tokens at most, do_sample=False) with our sentence sources as its partitioner (SourcePartitioner);
   that response is handed to every method.
2. methods, each in a fresh process (wall time of the method's call; peak RSS of the process from
   wait4, and its rise over the loaded model):
   - ours: `attribute(...)` once; every aggregation of `analysis.attribution.METHODS` on its one
     `.mass` (the time is the one call's, shared by all aggregations);
   - contextcite_N: `ContextCiter(num_ablations=N).get_attributions()` (its LASSO surrogate);
   - dense_attention: eager attention on prompt + response, the attention of the positions that
     predict the response on each source's tokens, mean over layers, heads and positions;
   - loo: leave-one-out, f(full) - f(without source i), dense model, one forward per source;
   - random: uniform random scores (seeded).
3. truth: the dense model (sdpa) scores the response under text removal: `masks` random masks
   (ContextCite's `_create_mask`, keep probability 0.5, seeds from TRUTH_SEED, far from
   ContextCite's own 0..255), and the removal of each method's top-k sources (k = 1, 3, 5).
   Response score = ContextCite's `aggregate_logit_probs` of its `_compute_logit_probs` per token,
   from plain HF forward passes (no batching, so no padding).

Metrics (ContextCite's definitions): LDS = Spearman between predicted (sum of a method's scores
over the kept sources) and actual logit-probability of the response over the truth masks; top-k
drop = log-probability of the response with the full context minus with its top-k sources
removed (also stored in logit-probability); the average rank (1 = top) of the known support sentence.

Results go to results.json after every example (a finished example is not redone), cached steps to
cells/ (git-ignored), the figure to attribution.png.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data.jsonl"
CELLS = HERE / "cells"
TRUTH_SEED = 1_000_000  # ContextCite's training masks use seeds 0 .. num_ablations - 1
KS = (1, 3, 5)
COMMAND = "benchmarks/attribution/.venv/bin/python benchmarks/attribution/run.py"


# ---------------------------------------------------------------------------------------------
# ContextCite, imported in the benchmark venv


def import_context_cite():
    """context_cite.utils calls nltk.download("punkt") at import, which needs the network; our
    partitioner never uses nltk's sentence splitter, so the download is stubbed out."""
    import nltk

    nltk.download = lambda *args, **kwargs: True
    import context_cite  # noqa: F401
    import context_cite.context_partitioner  # noqa: F401
    import context_cite.utils  # noqa: F401

    return context_cite


def source_partitioner_class():
    from context_cite.context_partitioner import BaseContextPartitioner

    from sparsetrace.analysis.segments import sentence_spans

    class SourcePartitioner(BaseContextPartitioner):
        """ContextCite partitioner over sparsetrace's sentence sources (`segments.sentence_spans`).

        Source i is context[start_i:end_i]; its separator is the text between the previous
        source's end and its start (whitespace: the splitter covers every other character). The
        ablated context is the kept sources in order, each after its own separator, the first kept
        one without it: ContextCite's SimpleContextPartitioner scheme. All kept gives the context
        itself (contexts here have no leading or trailing whitespace).
        """

        def __init__(self, context: str) -> None:
            super().__init__(context)
            self.spans = sentence_spans(context)
            self.separators = [context[(self.spans[i - 1][1] if i else s):s] for i, (s, _) in enumerate(self.spans)]
            if self.get_context() != context:
                raise ValueError("the partitioner does not rebuild the context (leading or trailing whitespace?)")

        @property
        def num_sources(self) -> int:
            return len(self.spans)

        def split_context(self) -> None:
            pass

        def get_source(self, index: int) -> str:
            s, e = self.spans[index]
            return self.context[s:e]

        def get_context(self, mask=None) -> str:
            keep = range(self.num_sources) if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool))
            parts = []
            for i in keep:
                parts.append((self.separators[i] if parts else "") + self.get_source(i))
            return "".join(parts)

    return SourcePartitioner


def citer(model, tokenizer, row: dict, num_ablations: int, max_new_tokens: int, output: str | None = None):
    from context_cite import ContextCiter

    cc = ContextCiter(model, tokenizer, row["context"], row["query"], num_ablations=num_ablations,
                      generate_kwargs={"max_new_tokens": max_new_tokens, "do_sample": False},
                      partitioner=source_partitioner_class()(row["context"]))
    if output is not None:  # the response generated once in the prepare step (greedy, so the same text)
        cc._cache["output"] = output
    return cc


# ---------------------------------------------------------------------------------------------
# the dense model's response score


def response_logit_probs(model, prompt_ids: list[int], response_ids: list[int]) -> np.ndarray:
    """float32 [R]: ContextCite's per-token logit-probabilities of the response after the prompt."""
    import torch
    from context_cite.utils import _compute_logit_probs

    r = len(response_ids)
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.inference_mode():
        logits = model(input_ids=ids, logits_to_keep=r + 1).logits[:, :-1].float()
    return _compute_logit_probs(logits, torch.tensor([list(response_ids)]))[0].numpy()


def aggregate(logit_probs, output_type: str = "logit_prob") -> np.ndarray:
    from context_cite.utils import aggregate_logit_probs

    return aggregate_logit_probs(np.atleast_2d(np.asarray(logit_probs, dtype=np.float32)), output_type)


# ---------------------------------------------------------------------------------------------
# worker steps (each in its own process)


def load_row(example_id: str) -> dict:
    for line in DATA.read_text().splitlines():
        row = json.loads(line)
        if row["id"] == example_id:
            return row
    raise SystemExit(f"{example_id}: not in {DATA}")


def load_model():
    import sparsetrace as st

    return st.load_model()


def attribute_function():
    import sparsetrace as st

    if hasattr(st, "attribute"):
        return st.attribute
    try:
        from sparsetrace.attribution import attribute
    except ImportError:
        from sparsetrace.tasks.attribution_runs import attribute
    return attribute


def source_token_spans(tokenizer, prompt: str, context_start: int, spans: list[tuple[int, int]]) -> list[list[int]]:
    """[first, last + 1) prompt tokens of each source: a token belongs to the source holding its first
    non-whitespace character ([0, 0) for a source no token starts in)."""
    import bisect

    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [context_start + s for s, _ in spans]
    result = [[None, None] for _ in spans]
    for t, (a, b) in enumerate(offsets):
        anchor = next((c for c in range(a, b) if not prompt[c].isspace()), None)
        if anchor is None:
            continue
        j = bisect.bisect_right(starts, anchor) - 1
        if j >= 0 and anchor < context_start + spans[j][1]:
            result[j][0] = t if result[j][0] is None else result[j][0]
            result[j][1] = t + 1
    return [[a, b] if a is not None else [0, 0] for a, b in result]


def step_prepare(row: dict, cfg: dict) -> dict:
    model, tokenizer = load_model()
    cc = citer(model, tokenizer, row, 1, cfg["max_new_tokens"])
    started = time.perf_counter()
    response = cc.response
    seconds = time.perf_counter() - started
    prompt_ids, prompt = cc._get_prompt_ids(return_prompt=True)
    context_start = prompt.index("Context: " + row["context"]) + len("Context: ")
    spans = cc.partitioner.spans
    a, b = row["support_chars"]
    support = next((i for i, (s, e) in enumerate(spans) if s <= a < e), None)
    return {"output": cc._output, "response": response, "prompt": prompt, "context_start": context_start,
            "prompt_ids": list(prompt_ids), "response_ids": list(cc._response_ids),
            "spans": [list(s) for s in spans], "support": support,
            "tokens": source_token_spans(tokenizer, prompt, context_start, spans),
            "answer_in_response": row["answer"].lower() in response.lower(), "generate_seconds": seconds}


def step_ours(row: dict, cfg: dict, prep: dict) -> dict:
    import sparsetrace as st
    from sparsetrace.analysis.attribution import METHODS
    from sparsetrace.analysis.attribution import aggregate as aggregate_mass

    attribute = attribute_function()
    model, tokenizer = load_model()
    config = st.StreamConfig(**cfg["stream"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    quiet = {"progress": False} if "progress" in inspect.signature(attribute).parameters else {}
    result = attribute(model, tokenizer, row["context"], row["query"], response=prep["response"],
                       sources="sentences", config=config, **quiet)
    seconds = time.perf_counter() - started
    index = {tuple(s): i for i, s in enumerate(prep["spans"])}
    ours = [index.get((s.start, s.end)) for s in result.sources]
    num_tokens = np.array([s.tokens[1] - s.tokens[0] for s in result.sources])
    scores = {}
    learned = ["learned"] if getattr(result, "head_weights", None) is not None else []  # the package's weights
    for method in [*METHODS, *learned]:
        full = np.zeros(len(prep["spans"]))  # a source no token starts in gets no attention
        values = aggregate_mass(result.mass, num_tokens, method, *([result.head_weights] if learned else []))
        for j, value in zip(ours, values, strict=True):
            if j is not None:
                full[j] = value
        scores[method] = full.tolist()
    stats = result.trace.stats() if getattr(result, "trace", None) is not None else {}
    return {"scores": scores, "seconds": seconds, "rss_before_kb": before,
            "attribute_seconds": getattr(result, "seconds", None),
            "same_response_ids": list(result.response_ids) == prep["response_ids"],
            "same_prompt_ids": list(result.prompt_ids) == prep["prompt_ids"],
            "unmatched_sources": sum(j is None for j in ours),
            "missing_sources": len(prep["spans"]) - sum(j is not None for j in ours),
            "trace": {k: stats[k] for k in ("tokens", "sparsity", "compression") if k in stats},
            "stream": config.to_dict() if hasattr(config, "to_dict") else cfg["stream"]}


def step_contextcite(row: dict, cfg: dict, prep: dict, num_ablations: int) -> dict:
    model, tokenizer = load_model()
    cc = citer(model, tokenizer, row, num_ablations, cfg["max_new_tokens"], output=prep["output"])
    assert list(cc._response_ids) == prep["response_ids"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    scores = cc.get_attributions(verbose=False)
    seconds = time.perf_counter() - started
    return {"scores": {"scores": np.asarray(scores, dtype=float).tolist()}, "seconds": seconds,
            "rss_before_kb": before}


def step_dense_attention(row: dict, cfg: dict, prep: dict) -> dict:
    import torch

    model, _ = load_model()
    model.set_attn_implementation("eager")
    p, r = len(prep["prompt_ids"]), len(prep["response_ids"])
    ids = torch.tensor([prep["prompt_ids"] + prep["response_ids"][:-1]])  # as ours: the last token predicts nothing
    layers = model.config.num_hidden_layers
    per_key = torch.zeros(ids.shape[1], dtype=torch.float64)  # attention summed over layers, heads, response rows

    def take(weights) -> None:
        per_key.add_(weights[0, :, p - 1 : p - 1 + r].double().sum(dim=(0, 1)))

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with torch.inference_mode():
        if cfg["dense_attention"] == "output_attentions":
            out = model(input_ids=ids, output_attentions=True, logits_to_keep=1)
            for weights in out.attentions:
                take(weights)
            del out
        else:  # the same eager weights, reduced layer by layer as each attention module returns them
            hooks = [layer.self_attn.register_forward_hook(lambda module, args, output: take(output[1]))
                     for layer in model.model.layers]
            try:
                model(input_ids=ids, logits_to_keep=1)
            finally:
                for hook in hooks:
                    hook.remove()
    heads = model.config.num_attention_heads
    scores = [float(per_key[a:b].sum()) / (layers * heads * r) for a, b in prep["tokens"]]
    seconds = time.perf_counter() - started
    return {"scores": {"scores": scores}, "seconds": seconds, "rss_before_kb": before, "mode": cfg["dense_attention"]}


def step_loo(row: dict, cfg: dict, prep: dict) -> dict:
    model, tokenizer = load_model()
    cc = citer(model, tokenizer, row, 1, cfg["max_new_tokens"], output=prep["output"])
    n = len(prep["spans"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    full = aggregate(response_logit_probs(model, prep["prompt_ids"], prep["response_ids"]))[0]
    scores = []
    for i in range(n):
        mask = np.ones(n, dtype=bool)
        mask[i] = False
        ablated = aggregate(response_logit_probs(model, cc._get_prompt_ids(mask=mask), prep["response_ids"]))[0]
        scores.append(float(full - ablated))
    seconds = time.perf_counter() - started
    return {"scores": {"scores": scores}, "seconds": seconds, "rss_before_kb": before}


def top_sets(scores: np.ndarray) -> dict[int, list[int]]:
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    return {k: sorted(order[:k].tolist()) for k in KS}


def step_truth(row: dict, cfg: dict, prep: dict, folder: Path) -> dict:
    """Fill the truth caches: the full context and the random masks (truth_m{M}_t{T}.json), and every
    removal asked for in removals.json not yet scored (removed_t{T}.json)."""
    from context_cite.utils import _create_mask

    model, tokenizer = load_model()
    cc = citer(model, tokenizer, row, 1, cfg["max_new_tokens"], output=prep["output"])
    n = len(prep["spans"])
    masks_file, removed_file = truth_files(folder, cfg)
    if not masks_file.exists():
        started = time.perf_counter()
        full = response_logit_probs(model, prep["prompt_ids"], prep["response_ids"])
        masks = np.stack([_create_mask(n, 0.5, TRUTH_SEED + i) for i in range(cfg["masks"])])
        lp = [response_logit_probs(model, cc._get_prompt_ids(mask=m), prep["response_ids"]) for m in masks]
        masks_file.write_text(json.dumps({"full": full.tolist(), "masks": masks.astype(int).tolist(),
                                          "mask_logit_probs": np.stack(lp).tolist(),
                                          "seconds": time.perf_counter() - started}))
    removed = json.loads(removed_file.read_text()) if removed_file.exists() else {}
    for kept_out in json.loads((folder / "removals.json").read_text()):
        if json.dumps(kept_out) in removed:
            continue
        mask = np.ones(n, dtype=bool)
        mask[kept_out] = False
        removed[json.dumps(kept_out)] = response_logit_probs(model, cc._get_prompt_ids(mask=mask),
                                                             prep["response_ids"]).tolist()
        removed_file.write_text(json.dumps(removed))
    return {}


def truth_files(folder: Path, cfg: dict) -> tuple[Path, Path]:
    return (folder / f"truth_m{cfg['masks']}_t{cfg['max_new_tokens']}.json",
            folder / f"removed_t{cfg['max_new_tokens']}.json")


def worker(step: str, example_id: str, cell: Path, cfg: dict) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import_context_cite()
    row = load_row(example_id)
    prep = json.loads((cell.parent / "prepare.json").read_text()) if step != "prepare" else None
    if step == "prepare":
        out = step_prepare(row, cfg)
    elif step == "ours":
        out = step_ours(row, cfg, prep)
    elif step.startswith("contextcite_"):
        out = step_contextcite(row, cfg, prep, int(step.split("_")[1]))
    elif step == "dense_attention":
        out = step_dense_attention(row, cfg, prep)
    elif step == "loo":
        out = step_loo(row, cfg, prep)
    elif step == "truth":
        out = step_truth(row, cfg, prep, cell.parent)
    else:
        raise SystemExit(f"unknown step {step}")
    cell.write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# orchestration


def run_step(step: str, example_id: str, cell: Path, cfg: dict, cache: bool = True) -> dict:
    """Run one step in a fresh process (cached in `cell`); its peak RSS from wait4."""
    if cache and cell.exists():
        return json.loads(cell.read_text())
    cell.parent.mkdir(parents=True, exist_ok=True)
    tmp = cell.with_suffix(".tmp")
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--worker", step, example_id, str(tmp), json.dumps(cfg)],
                             env=env)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0 or not tmp.exists():
        raise SystemExit(f"{example_id} {step}: worker failed (status {status})")
    data = json.loads(tmp.read_text())
    data["peak_rss_gb"] = round(usage.ru_maxrss / 2**20, 3)
    if "rss_before_kb" in data:
        data["rss_rise_gb"] = round(max(0, usage.ru_maxrss - data.pop("rss_before_kb")) / 2**20, 3)
    data["process_seconds"] = round(time.perf_counter() - started, 2)
    cell.write_text(json.dumps(data))
    tmp.unlink()
    return data


def methods_for(length: int, cfg: dict) -> list[str]:
    steps = ["ours"]
    steps += [f"contextcite_{n}" for n, limit in cfg["contextcite"] if limit is None or length <= limit]
    if length <= cfg["dense_attention_max"]:
        steps.append("dense_attention")
    if length <= cfg["loo_max"]:
        steps.append("loo")
    return steps


def cell_name(step: str, cfg: dict) -> str:
    if step == "ours":
        return f"ours_{digest(json.dumps(cfg['stream'], sort_keys=True), package_digest())}.json"
    if step == "dense_attention":
        return f"dense_attention_{cfg['dense_attention']}.json"
    return f"{step}.json"


def spearman(x, y) -> float | None:
    from scipy.stats import spearmanr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None  # constant predictions (e.g. an all-zero LASSO) or responses: undefined
    return float(spearmanr(x, y).statistic)


def digest(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:10]


def example_folder(row: dict) -> Path:
    """cells/<id>/<digest of the context, query and its sentence spans>: a changed example or splitter
    does not reuse old cells."""
    from sparsetrace.analysis.segments import sentence_spans

    return CELLS / row["id"] / digest(row["context"], row["query"], json.dumps(sentence_spans(row["context"])))


def package_digest() -> str:
    """Of the package's attribution code: a changed `attribute` or aggregation is run again."""
    import sparsetrace

    root = Path(sparsetrace.__file__).parent
    files = ["attribution.py", "analysis/attribution.py", "tasks/attribution_runs.py", "tracer.py", "stream.py",
             "backend.py", "block_attention.py", "config.py", "analysis/head_weights.py",
             "data/head_weights/SmolLM2-135M-Instruct.json"]
    return digest(*[(root / f).read_text() for f in files if (root / f).exists()])


def evaluate_example(row: dict, cfg: dict) -> dict:
    folder = example_folder(row)
    t0 = time.perf_counter()
    prep = run_step("prepare", row["id"], folder / f"prepare_t{cfg['max_new_tokens']}.json", cfg)
    (folder / "prepare.json").write_text(json.dumps(prep))
    n = len(prep["spans"])
    results: dict[str, dict] = {}
    for step in methods_for(row["length"], cfg):
        data = run_step(step, row["id"], folder / cell_name(step, cfg), cfg)
        for name, scores in data["scores"].items():
            label = f"ours_{name}" if step == "ours" else step
            results[label] = {"scores": scores, "seconds": data["seconds"], "peak_rss_gb": data["peak_rss_gb"],
                              "rss_rise_gb": data.get("rss_rise_gb")}
        if step == "ours":
            results["_ours_checks"] = {k: data.get(k) for k in ("same_response_ids", "same_prompt_ids",
                                                                "missing_sources", "trace", "stream")}
    checks = results.pop("_ours_checks", None)
    rng = np.random.default_rng(cfg["random_seed"] + sum(map(ord, row["id"])))
    results["random"] = {"scores": rng.random(n).tolist(), "seconds": 0.0, "peak_rss_gb": None, "rss_rise_gb": None}
    removals = sorted({json.dumps(s) for r in results.values() for s in top_sets(np.array(r["scores"])).values()})
    (folder / "removals.json").write_text(json.dumps([json.loads(s) for s in removals]))
    masks_file, removed_file = truth_files(folder, cfg)
    done = json.loads(removed_file.read_text()) if removed_file.exists() else {}
    if not masks_file.exists() or any(r not in done for r in removals):
        run_step("truth", row["id"], folder / "truth_run.json", cfg, cache=False)
    truth = json.loads(masks_file.read_text()) | {"removed": json.loads(removed_file.read_text())}

    full_logit = float(aggregate(truth["full"])[0])
    full_log = float(aggregate(truth["full"], "log_prob")[0])
    masks = np.array(truth["masks"], dtype=bool)
    actual = aggregate(truth["mask_logit_probs"])
    support = prep["support"]
    out_methods = {}
    for label, r in results.items():
        scores = np.array(r["scores"], dtype=float)
        drops = {}
        for k, removed in top_sets(scores).items():
            lp = truth["removed"][json.dumps(removed)]
            drops[k] = {"log_prob": full_log - float(aggregate(lp, "log_prob")[0]),
                        "logit_prob": full_logit - float(aggregate(lp)[0]), "removed": removed}
        rank = None
        if support is not None:
            from scipy.stats import rankdata

            rank = float(rankdata(-np.nan_to_num(scores, nan=-np.inf), method="average")[support])
        out_methods[label] = {
            "lds": spearman(masks.astype(float) @ scores, actual),
            "top_k_drop": {str(k): round(d["log_prob"], 4) for k, d in drops.items()},
            "top_k_drop_logit": {str(k): round(d["logit_prob"], 4) for k, d in drops.items()},
            "top_k_removed": {str(k): d["removed"] for k, d in drops.items()},
            "support_rank": rank, "seconds": round(r["seconds"], 3), "peak_rss_gb": r["peak_rss_gb"],
            "rss_rise_gb": r["rss_rise_gb"], "scores": [round(float(s), 6) for s in scores],
        }
    return {"id": row["id"], "kind": row["kind"], "length": row["length"], "prompt_tokens": len(prep["prompt_ids"]),
            "response_tokens": len(prep["response_ids"]), "num_sources": n, "query": row["query"],
            "answer": row["answer"], "response": prep["response"], "answer_in_response": prep["answer_in_response"],
            "support": support, "full_logit_prob": full_logit, "full_log_prob": full_log,
            "actual_logit_prob_spread": float(np.ptp(actual)), "generate_seconds": round(prep["generate_seconds"], 2),
            "truth_seconds": round(truth["seconds"], 2), "ours_checks": checks, "methods": out_methods,
            "wall_seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# summary: tables and figure


def method_order(examples: list[dict]) -> list[str]:
    names = {m for e in examples for m in e["methods"]}

    def key(name: str):
        group = 0 if name.startswith("ours_") else 1 if name.startswith("contextcite_") else 2
        number = int(name.split("_")[1]) if group == 1 else 0
        return (group, number, ["dense_attention", "loo", "random"].index(name) if group == 2 else 0, name)

    return sorted(names, key=key)


def summarise(examples: list[dict]) -> list[dict]:
    rows = []
    for kind in sorted({e["kind"] for e in examples}):
        for length in sorted({e["length"] for e in examples if e["kind"] == kind}):
            cell = [e for e in examples if e["kind"] == kind and e["length"] == length]
            for name in method_order(cell):
                got = [e["methods"][name] for e in cell if name in e["methods"]]
                lds = [g["lds"] if g["lds"] is not None else 0.0 for g in got]
                ranks = [g["support_rank"] for g in got if g["support_rank"] is not None]
                rows.append({
                    "kind": kind, "length": length, "method": name, "examples": len(got),
                    "lds": float(np.mean(lds)), "lds_undefined": sum(g["lds"] is None for g in got),
                    **{f"drop_{k}": float(np.mean([g["top_k_drop"][str(k)] for g in got])) for k in KS},
                    "support_rank": float(np.mean(ranks)) if ranks else None,
                    "sources": float(np.mean([e["num_sources"] for e in cell])),
                    "seconds": float(np.median([g["seconds"] for g in got])),
                    "peak_rss_gb": None if got[0]["peak_rss_gb"] is None else
                    float(np.median([g["peak_rss_gb"] for g in got])),
                    "rss_rise_gb": None if got[0]["rss_rise_gb"] is None else
                    float(np.median([g["rss_rise_gb"] for g in got])),
                })
    return rows


def table(examples: list[dict]) -> str:
    lines = []
    for kind in sorted({e["kind"] for e in examples}):
        lines += [f"\n{kind}\n", "| tokens | method | n | LDS | top-1 drop | top-3 drop | top-5 drop | support rank "
                  "(of sources) | time | peak RSS (rise) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in summarise(examples):
            if r["kind"] != kind:
                continue
            undefined = f" ({r['lds_undefined']} undef.)" if r["lds_undefined"] else ""
            rank = "-" if r["support_rank"] is None else f"{r['support_rank']:.1f} (of {r['sources']:.0f})"
            memory = "-" if r["peak_rss_gb"] is None else f"{r['peak_rss_gb']:.2f} GB ({r['rss_rise_gb']:.2f})"
            lines.append(f"| {r['length']:,} | {r['method']} | {r['examples']} | {r['lds']:.3f}{undefined} | "
                         f"{r['drop_1']:.2f} | {r['drop_3']:.2f} | {r['drop_5']:.2f} | {rank} | "
                         f"{r['seconds']:.2f} s | {memory} |")
    return "\n".join(lines)


def figure(examples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(examples)
    kinds = sorted({r["kind"] for r in rows})
    names = method_order(examples)
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    panels = [("lds", "LDS (Spearman)", False), ("drop_1", "top-1 drop (log-prob)", False),
              ("drop_5", "top-5 drop (log-prob)", False), ("seconds", "time per example (s)", True)]
    fig, axes = plt.subplots(len(kinds), len(panels), figsize=(4.2 * len(panels), 3.4 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, (key, label, log) in enumerate(panels):
            ax = axes[i][j]
            for name in names:
                got = sorted((r["length"], r[key]) for r in rows if r["kind"] == kind and r["method"] == name
                             and r[key] is not None and not (log and r[key] <= 0))
                if got:
                    ax.plot([g[0] for g in got], [g[1] for g in got], marker="o", color=colors[name], label=name,
                            linestyle="--" if name.startswith("contextcite") else "-")
            ax.set_xscale("log", base=2)
            ax.set_xticks([1024, 2048, 4096, 8192], ["1k", "2k", "4k", "8k"])
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{kind}: {label}", fontsize=10)
            ax.set_xlabel("prompt tokens")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_contextcite(items: list[str]) -> list[list]:
    """'64' or '256@4096' (only up to 4,096 tokens)."""
    out = []
    for item in items:
        n, _, limit = item.partition("@")
        out.append([int(n), int(limit) if limit else None])
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, step, example_id, cell, cfg = sys.argv
        return worker(step, example_id, Path(cell), json.loads(cfg))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", nargs="+", help="only these examples of data.jsonl")
    parser.add_argument("--lengths", type=int, nargs="+", help="only these lengths")
    parser.add_argument("--kinds", nargs="+", help="only these kinds (natural, haystack)")
    parser.add_argument("--masks", type=int, default=32, help="ground-truth random masks per example")
    parser.add_argument("--contextcite", nargs="+", default=["16", "64", "256@4096"],
                        help="ablation counts, N or N@MAX_TOKENS")
    parser.add_argument("--loo-max", type=int, default=2048, help="leave-one-out up to this length")
    parser.add_argument("--dense-attention-max", type=int, default=4096, help="dense attention up to this length")
    parser.add_argument("--dense-attention", choices=["hooks", "output_attentions"], default="hooks",
                        help="eager weights reduced layer by layer (hooks) or all kept (output_attentions)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, help="StreamConfig k for ours (default: the package's)")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--table", action="store_true",
                        help="print the tables from --out, redraw the figure (and fill README.md from results.json)")
    args = parser.parse_args()
    if args.table:
        examples = list(json.loads(args.out.read_text())["examples"].values())
        figure(examples, args.out.with_name("attribution.png") if args.out.name == "results.json"
               else args.out.with_suffix(".png"))
        text = table(examples)
        print(text)
        readme = HERE / "README.md"
        start, end = "<!-- table: run.py --table -->", "<!-- /table -->"
        if args.out == HERE / "results.json" and start in readme.read_text():
            before, rest = readme.read_text().split(start, 1)
            readme.write_text(before + start + "\n" + text.strip() + "\n" + end + rest.split(end, 1)[1])
            print(f"tables written into {readme}")
        return
    try:
        import_context_cite()
    except ImportError:
        raise SystemExit("context_cite is missing: run benchmarks/attribution/setup.sh and use "
                         "benchmarks/attribution/.venv/bin/python") from None
    cfg = {"masks": args.masks, "contextcite": parse_contextcite(args.contextcite), "loo_max": args.loo_max,
           "dense_attention_max": args.dense_attention_max, "dense_attention": args.dense_attention,
           "max_new_tokens": args.max_new_tokens, "stream": {} if args.k is None else {"k": args.k},
           "random_seed": 0}
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if results and results.get("config") != cfg:
        raise SystemExit(f"{args.out} was made with another configuration ({results.get('config')}); "
                         "give another --out (or delete it)")
    import platform

    import torch

    results.setdefault("config", cfg)
    results.setdefault("command", COMMAND + " " + " ".join(sys.argv[1:]))
    results.setdefault("machine", {"cpus": os.cpu_count(), "python": platform.python_version(),
                                   "torch": torch.__version__, "threads": torch.get_num_threads()})
    examples = results.setdefault("examples", {})
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    rows = [r for r in rows if (not args.ids or r["id"] in args.ids) and (not args.lengths or r["length"] in
            args.lengths) and (not args.kinds or r["kind"] in args.kinds)]
    for row in rows:
        if row["id"] in examples:
            continue
        print(f"{row['id']}: {row['prompt_tokens']} tokens, {methods_for(row['length'], cfg)}", flush=True)
        examples[row["id"]] = evaluate_example(row, cfg)
        args.out.write_text(json.dumps(results, indent=1))
        e = examples[row["id"]]
        print(f"  response {e['response'][:70]!r} (answer in it: {e['answer_in_response']}); {e['wall_seconds']} s",
              flush=True)
        for name, m in e["methods"].items():
            lds = "undef" if m["lds"] is None else f"{m['lds']:.3f}"
            print(f"  {name:>22}: LDS {lds:>6}  top-1 drop {m['top_k_drop']['1']:7.3f}  support rank "
                  f"{m['support_rank']}  {m['seconds']:.2f} s  peak {m['peak_rss_gb']} GB", flush=True)
        figure(list(examples.values()), args.out.with_name("attribution.png") if args.out.name == "results.json"
               else args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
