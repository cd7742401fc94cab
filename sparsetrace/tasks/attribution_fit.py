"""Fit per-head attribution weights for a model (AT2, `analysis.head_weights`) from its own ablations.

For each training example (a context and a query, optionally the response): one `attribute` pass
gives the mass [L, H, n]; then `masks` random subsets of the sources are removed from the text
(ContextCite's ablation: a removed source goes with the whitespace before it, and the first kept
source loses its own) and the dense model scores the same response teacher-forced on each
(`ablation.response_logprobs`, text removal). The response's logit-probability under each mask,
log p - log(1 - p) of the whole response (ContextCite's `aggregate_logit_probs`), is the target.

Costs one sparse pass and `masks` dense passes per example, once per model; scoring a new input
with the weights is then the one sparse pass of `attribute`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..ablation import response_logprobs
from ..analysis.attribution import Source
from ..analysis.head_weights import AblationSample, HeadWeights, fit_head_weights, mean_pearson
from ..config import StreamConfig
from ..errors import InputError
from ..interventions import Intervention
from ..models import describe_model
from .attribution_runs import attribute

DEFAULT_MASKS = 32


def removal_spans(sources: Sequence[Source], keep: np.ndarray, context_start: int) -> list[tuple[int, int]]:
    """Prompt char spans [a, b) to delete so that only the kept sources remain, as ContextCite's
    ablated context: each kept source after the first keeps the whitespace before it.

    Args:
        sources: the context's sources in text order (char spans relative to the context).
        keep: bool [n], True = kept.
        context_start: char offset of the context in the prompt.
    """
    spans, first_kept = [], True
    for j, source in enumerate(sources):
        gap_start = sources[j - 1].end if j > 0 else source.start  # the whitespace before source j
        if not keep[j]:
            spans.append((gap_start, source.end))
        elif first_kept:
            if gap_start < source.start:
                spans.append((gap_start, source.start))
            first_kept = False
    merged: list[tuple[int, int]] = []
    for a, b in spans:  # adjacent removals as one span
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return [(context_start + a, context_start + b) for a, b in merged if b > a]


def logit_probability(token_logprobs) -> np.ndarray:
    """float64 [N]: log p - log(1 - p) of each whole response from its per-token log p [N, R]."""
    total = np.asarray(token_logprobs, dtype=np.float64).sum(axis=-1)
    return total - np.log(-np.expm1(np.minimum(total, -1e-12)))


def ablation_sample(model, tokenizer, context: str, query: str, *, response: str | None = None,
                    masks: int = DEFAULT_MASKS, seed: int = 0, config: StreamConfig | None = None,
                    max_new_tokens: int = 32) -> tuple[AblationSample, Any]:
    """One training example (module docstring). Returns the sample and the `Attribution` it came from."""
    if masks < 3:
        raise InputError(f"masks={masks}; a correlation needs at least 3 ablations (32 is AT2's default)")
    result = attribute(model, tokenizer, context, query, config, response=response, max_new_tokens=max_new_tokens,
                       progress=False)
    n = len(result.sources)
    keep = np.random.default_rng(seed).random((masks, n)) < 0.5  # keep probability 0.5, ContextCite's
    interventions = [Intervention(remove=removal_spans(result.sources, row, result.context_start)) for row in keep]
    ablated = response_logprobs(model, tokenizer, result.prompt, result.response_ids, interventions, forward="dense",
                                add_special_tokens=False, progress=False)
    return AblationSample(result.mass, keep, logit_probability(ablated.logprobs.numpy())), result


def check_examples(examples: Sequence[dict]) -> None:
    """Refuse training examples that are not {"context", "query"[, "response"]} with text in each."""
    if not examples:
        raise InputError("no training examples; give a JSONL file with one {\"context\", \"query\"} per line")
    for i, example in enumerate(examples, 1):
        if not isinstance(example, dict) or not all(isinstance(example.get(k), str) and example[k].strip()
                                                    for k in ("context", "query")):
            raise InputError(f"training example {i} needs a non-empty \"context\" and \"query\" (strings)")
        if "response" in example and not (isinstance(example["response"], str) and example["response"].strip()):
            raise InputError(f"training example {i} has an empty \"response\"; give its text or leave it out")


def fit_attribution_heads(model, tokenizer, examples: Sequence[dict], *, masks: int = DEFAULT_MASKS, seed: int = 0,
                          config: StreamConfig | None = None, iterations: int = 1000, progress: bool = True,
                          samples: list[AblationSample] | None = None) -> tuple[HeadWeights, list[AblationSample]]:
    """Per-head weights for `model` from `examples` (dicts with "context", "query", optional "response").

    `samples` already collected (e.g. resumed) are used as they are; only the rest are collected.
    Returns the weights and every sample.
    """
    check_examples(examples)
    samples = list(samples or [])
    for i in tqdm(range(len(samples), len(examples)), desc="ablations", unit="example", disable=not progress):
        example = examples[i]
        sample, _ = ablation_sample(model, tokenizer, example["context"], example["query"],
                                    response=example.get("response"), masks=masks, seed=seed + i, config=config)
        samples.append(sample)
    weights = fit_head_weights(samples, iterations=iterations, seed=seed)
    info = describe_model(model)
    uniform = np.full(weights.shape, 1.0 / weights.size)
    training = {"examples": len(samples), "masks": masks,
                "method": "AT2 linear weights, non-negative, Pearson loss, Adam",
                "iterations": iterations, "seed": seed, "stream": (config or StreamConfig()).to_dict(),
                "pearson_start": round(mean_pearson(samples, uniform), 4),
                "pearson_fit": round(mean_pearson(samples, weights), 4)}
    return HeadWeights(weights, str(info["name"]), training), samples
