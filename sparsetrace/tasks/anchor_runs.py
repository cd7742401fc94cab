"""`anchors()`: thought anchors on one or more reasoning texts, from one sparse trace pass each.

Per text: split into units (`analysis.segments`), trace it once on sparse attention while
`UnitAttention` sums the probabilities per unit pair, take vertical scores and the kurtosis of
every head (`analysis.anchors`), and tag the units (`analysis.categories`, or labels given).
Over all texts: the receiver heads (kurtosis averaged over texts) and each unit's score.

Fidelity, next to the result, per text:

- the trace's pruning (share of causal token pairs not kept), block sparsity, compression and
  storage ratio against dense attention patterns (`Trace.stats`);
- **answer preserved**: the tokens of the last unit (where a chain of thought emits its answer)
  are teacher-forced; the sparse model's greedy prediction at each of them is compared with the
  dense model's (one extra dense forward pass, logits of those positions only). `answer_preserved`
  is True when all agree (the behaviour check of `fidelity.check`, applied to the answer);
- where dense is affordable (`dense_check`: "auto" = inputs up to `dense_max_tokens` tokens,
  "always", "never"): the same pipeline on a trace whose k covers every key block (which is the
  dense attention), with its own receiver heads, and the Spearman correlation of sparse and
  dense unit scores.

With `causal` ("sparse" or "dense"), each text also gets its causal check: the attention-suppression
matrix (`tasks.suppression`: one pass per unit with no later token attending to it, the KL of the
later units' next-token distributions), each unit's causal score (its mean effect on the later
units), and the Spearman correlation of the causal scores with the receiver-head scores.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.anchors import (
    DEFAULT_PROXIMITY,
    DEFAULT_TOP_HEADS,
    UnitAttention,
    head_kurtosis,
    receiver_heads,
    spearman,
    unit_scores,
    vertical_scores,
)
from ..analysis.categories import RULES_SOURCE, load_labels, tag_units
from ..analysis.segments import Unit, split_units, unit_of_tokens
from ..blocks import num_blocks
from ..config import StreamConfig
from ..errors import InputError, MemoryRequestError
from ..files import atomic_write, save_figure, write_json
from ..models import describe_model, forward_logits
from ..notebook import facts_html, facts_repr
from ..text import shorten
from ..trace import Trace
from ..tracer import available_memory, prepare_input, run_trace
from .suppression import SUPPRESSION_FORWARDS, SuppressionResult, suppression_matrix

DENSE_CHECKS = ("auto", "always", "never")
DEFAULT_DENSE_MAX_TOKENS = 2048
ANSWER_MAX_POSITIONS = 1024  # logits kept for the answer check (vocab floats each)


@dataclass
class AnchorText:
    """One text's result. Arrays: unit_attention [L, H, U, U], vertical [L, H, U], kurtosis [L, H]."""

    name: str
    units: list[Unit]
    unit_attention: np.ndarray
    vertical: np.ndarray
    kurtosis: np.ndarray
    trace: Trace
    fidelity: dict[str, Any]
    categories_source: str
    dense_vertical: np.ndarray | None = None
    dense_kurtosis: np.ndarray | None = None
    suppression: SuppressionResult | None = None

    @property
    def causal(self) -> dict[str, Any] | None:
        """The causal check (`suppression`), with its Spearman correlations against the unit scores."""
        if self.suppression is None:
            return None
        return self.suppression.to_dict() | {
            "spearman_vs_receiver_scores": spearman(self.suppression.scores, self.scores),
            "spearman_log_scores_vs_receiver_scores": spearman(self.suppression.log_scores, self.scores),
        }

    @property
    def scores(self) -> np.ndarray:
        return np.array([np.nan if u.score is None else u.score for u in self.units])

    def _facts(self) -> dict[str, Any]:
        """The key numbers a notebook shows: size, the answer check, pruning, the top unit."""
        top = _top_units(self.units, 1)
        return {"name": self.name, "tokens": self.trace.num_tokens, "units": len(self.units),
                "answer_preserved": self.fidelity.get("answer_preserved"),
                "token_pairs_pruned": f"{self.fidelity['sparsity']:.1%}" if "sparsity" in self.fidelity else None,
                "top_unit": (top[0]["unit"], top[0]["score"]) if top else None}

    def __repr__(self) -> str:
        return facts_repr("AnchorText", self._facts())

    def _repr_html_(self) -> str:
        return facts_html("AnchorText", self._facts(), _top_units(self.units), rows_title="top units by score")


def _top_units(units: list[Unit], n: int = 5) -> list[dict[str, Any]]:
    """The n units of highest receiver-head score, highest first, as table rows."""
    scored = sorted((u for u in units if u.score is not None), key=lambda u: -u.score)[:n]
    return [{"rank": i + 1, "unit": u.index, "score": u.score, "category": u.category, "text": shorten(u.text, 90)}
            for i, u in enumerate(scored)]


@dataclass
class AnchorsResult:
    """All texts; `kurtosis` [L, H] averaged over texts; `receiver_heads` [(layer, head)], largest first.
    `units`, `vertical_scores`, `scores` are the first text's (the only one for a single text)."""

    texts: list[AnchorText]
    kurtosis: np.ndarray
    receiver_heads: list[tuple[int, int]]
    settings: dict[str, Any]
    dense: dict[str, Any] | None = field(default=None)

    @property
    def units(self) -> list[Unit]:
        return self.texts[0].units

    @property
    def vertical_scores(self) -> np.ndarray:
        return self.texts[0].vertical

    @property
    def scores(self) -> np.ndarray:
        return self.texts[0].scores

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "receiver_heads": [list(x) for x in self.receiver_heads],
            "kurtosis": _json_array(self.kurtosis),
            "dense_reference": self.dense,
            "texts": [{
                "name": t.name, "tokens": t.trace.num_tokens, "num_units": len(t.units),
                "categories_source": t.categories_source, "fidelity": t.fidelity,
                "units": [u.to_dict() for u in t.units],
                "kurtosis": _json_array(t.kurtosis),
                "vertical_scores": _json_array(t.vertical),
                **({"causal": t.causal} if t.suppression is not None else {}),
            } for t in self.texts],
        }

    def _facts(self) -> dict[str, Any]:
        """The key numbers a notebook shows: the first text's, the receiver heads, the dense check."""
        first = self.texts[0]._facts()
        del first["name"]
        facts = {"texts": len(self.texts), **first, "receiver_heads": self.receiver_heads[:5]}
        if self.dense is not None:
            facts["spearman_vs_dense"] = self.dense["texts"][0]["spearman_scores"]
        return facts

    def __repr__(self) -> str:
        return facts_repr("AnchorsResult", self._facts())

    def _repr_html_(self) -> str:
        return facts_html("AnchorsResult", self._facts(), _top_units(self.units), rows_title="top units by score",
                          note=f"the first text's units; receiver heads: (layer, head), the first 5 of "
                               f"{len(self.receiver_heads)}, largest kurtosis first")


def anchors(
    model,
    tokenizer,
    texts: str | list[str],
    config: StreamConfig | None = None,
    *,
    units: str = "sentences",
    regions: list | None = None,
    names: list[str] | None = None,
    labels: list | None = None,
    proximity: int = DEFAULT_PROXIMITY,
    control_depth: bool = False,
    top_heads: int = DEFAULT_TOP_HEADS,
    exclude_layer0: bool = False,
    key_average: str = "mean",
    dense_check: str = "auto",
    dense_max_tokens: int = DEFAULT_DENSE_MAX_TOKENS,
    causal: str | None = None,
    max_tokens: int | None = None,
    allow_long: bool = False,
    progress: bool | None = None,
    kernel: str = "auto",
) -> AnchorsResult:
    """Thought anchors of one or more reasoning texts (module docstring).

    Args:
        texts: one text or several (receiver heads are chosen on their averaged kurtosis).
        units: "sentences", "paragraphs" or "blocks" (the trace's key blocks).
        regions: per text, the part split into units ("auto", "think", "assistant", "all" or a
            (start, end) char range; default "auto").
        labels: per text None (rule-based tags), a labels JSON path, or a list of category names.
        proximity, control_depth, top_heads, exclude_layer0, key_average: see `analysis.anchors`.
        kernel: as `tracer.trace` ("flex" runs eager here: the unit reducer needs the probabilities).
        causal: None, or the forward of the causal check ("sparse": with `config`; "dense"): one
            suppression pass per unit (module docstring).
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise InputError("no texts given; give at least one reasoning text")
    if dense_check not in DENSE_CHECKS:
        raise InputError(f"dense_check={dense_check!r}; use one of {', '.join(DENSE_CHECKS)}")
    if causal is not None and causal not in SUPPRESSION_FORWARDS:
        raise InputError(f"causal={causal!r}; use None (no causal check), 'sparse' or 'dense'")
    config = config or StreamConfig()
    regions = regions or ["auto"] * len(texts)
    names = names or [f"text {i}" for i in range(len(texts))]
    labels = labels or [None] * len(texts)
    if not len(regions) == len(names) == len(labels) == len(texts):
        raise InputError(f"{len(texts)} texts but {len(regions)} regions, {len(names)} names and {len(labels)} "
                         "label sets; give one of each per text")
    settings = {"units": units, "proximity": proximity, "control_depth": control_depth, "top_heads": top_heads,
                "exclude_layer0": exclude_layer0, "key_average": key_average, "config": config.to_dict(),
                "model": describe_model(model).get("name"), "dense_check": dense_check,
                "dense_max_tokens": dense_max_tokens, "causal": causal}
    results = []
    for text, region, name, given in zip(texts, regions, names, labels, strict=True):
        started = time.perf_counter()
        split, ids = split_units(text, tokenizer, units, region=region, block_size=config.block_k)
        ids = prepare_input(model, tokenizer, None, ids, config, max_tokens=max_tokens, allow_long=allow_long)
        split = [u for u in split if u.token_end <= len(ids)]
        for i, u in enumerate(split):
            u.index = i
        if len(split) < proximity + 2:
            raise InputError(f"{name}: only {len(split)} units, too few for vertical scores with proximity "
                             f"{proximity}; give a longer text, finer units or a smaller proximity")
        matrix, traced, fidelity = _traced_unit_attention(model, tokenizer, ids, split, config, key_average,
                                                          progress, kernel, check_answer=True)
        if given is None:
            tags, source = tag_units([u.text for u in split]), RULES_SOURCE
        elif isinstance(given, str | Path):
            tags, source = load_labels(given, len(split)), f"labels file {given}"
        else:
            tags, source = list(given), "labels given"
            if len(tags) != len(split):
                raise InputError(f"{name}: {len(tags)} labels for {len(split)} units")
        for unit, tag in zip(split, tags, strict=True):
            unit.category = tag
        vertical = vertical_scores(matrix, proximity, control_depth)
        item = AnchorText(name, split, matrix, vertical, head_kurtosis(vertical), traced, fidelity, source)
        if dense_check == "always" or (dense_check == "auto" and len(ids) <= dense_max_tokens):
            full = config.with_k(num_blocks(len(ids), config.block_k))
            dense_matrix, _, _ = _traced_unit_attention(model, tokenizer, ids, split, full, key_average, progress,
                                                           kernel)
            item.dense_vertical = vertical_scores(dense_matrix, proximity, control_depth)
            item.dense_kurtosis = head_kurtosis(item.dense_vertical)
        if causal is not None:
            item.suppression = suppression_matrix(model, tokenizer, ids, split, forward=causal, config=config,
                                                  progress=progress)
        fidelity["seconds"] = round(time.perf_counter() - started, 2)
        results.append(item)
    heads = receiver_heads([t.kurtosis for t in results], top_heads, exclude_layer0)
    for t in results:
        for unit, score in zip(t.units, unit_scores(t.vertical, heads), strict=True):
            unit.score = None if np.isnan(score) else float(score)
    mean = np.nanmean(np.stack([t.kurtosis for t in results]), axis=0) if len(results) > 1 else results[0].kurtosis
    return AnchorsResult(results, mean, heads, settings, _dense_comparison(results, heads, top_heads, exclude_layer0))


def _traced_unit_attention(model, tokenizer, ids, split, config, key_average, progress, kernel, check_answer=False):
    """One sparse trace with the unit reducer: (A [L, H, U, U], the trace, fidelity facts)."""
    info = describe_model(model)
    layers, heads, tokens = info["num_layers"], info["num_heads"], len(ids)
    need = layers * heads * (len(split) + 1) ** 2 * 4 * 2
    if need > available_memory():
        raise MemoryRequestError(f"unit attention for {len(split):,} units needs about {need / 2**30:.1f} GiB; use "
                                 "coarser units (--units paragraphs or blocks) or a shorter text")
    reducer = UnitAttention(unit_of_tokens(split, tokens), len(split), layers, heads, config.block_q, config.block_k)
    answer = split[-1]
    keep = min(tokens - answer.token_start + 1, ANSWER_MAX_POSITIONS) if check_answer else 1
    traced, logits = run_trace(model, tokenizer, ids, config, logits_to_keep=keep, progress=progress,
                               on_probabilities=reducer, kernel=kernel)
    fidelity = {}
    if check_answer:
        stats = traced.stats()
        fidelity = {key: stats[key] for key in ("tokens", "sparsity", "block_sparsity", "compression", "trace_bytes",
                                                "dense_pattern_bytes", "dense_to_trace_ratio")}
        fidelity["trace_seconds"] = traced.extra.get("seconds")
        fidelity |= _answer_check(model, ids, logits, keep, answer)
    return reducer.matrix(key_average), traced, fidelity


def _answer_check(model, ids, sparse_logits, keep, answer: Unit) -> dict[str, Any]:
    """Sparse vs dense greedy predictions of the answer unit's tokens (teacher-forced)."""
    tokens = len(ids)
    dense_logits = forward_logits(model, ids, keep=keep)
    sparse, dense = sparse_logits.argmax(-1), dense_logits.float().cpu().argmax(-1)
    facts = {"next_token_match": bool(sparse[-1] == dense[-1]), "answer_unit": answer.index,
             "answer_text": answer.text}
    first = answer.token_start - 1 - (tokens - keep)  # logits row predicting the answer's first token
    if answer.token_start < 1 or first < 0:
        return facts | {"answer_preserved": None, "answer_note": "answer unit too early or first in the text"}
    rows = slice(first, first + answer.num_tokens)
    agree = (sparse[rows] == dense[rows]).float()
    return facts | {"answer_preserved": bool(agree.all()), "answer_token_agreement": float(agree.mean()),
                    "answer_tokens": answer.num_tokens,
                    "dense_predicts_text": float((dense[rows] == ids[answer.token_start:answer.token_end]).float()
                                                 .mean())}


def _dense_comparison(results, heads, top_heads, exclude_layer0) -> dict[str, Any] | None:
    checked = [t for t in results if t.dense_vertical is not None]
    if not checked:
        return None
    dense_heads = receiver_heads([t.dense_kurtosis for t in checked], top_heads, exclude_layer0)
    first = 1 if exclude_layer0 else 0
    per_text = []
    for t in checked:
        dense_scores = unit_scores(t.dense_vertical, dense_heads)
        same_heads = unit_scores(t.dense_vertical, heads)
        per_text.append({"name": t.name, "spearman_scores": spearman(t.scores, dense_scores),
                         "spearman_scores_same_heads": spearman(t.scores, same_heads),
                         "spearman_kurtosis": spearman(t.kurtosis[first:].ravel(), t.dense_kurtosis[first:].ravel())})
    return {"receiver_heads": [list(x) for x in dense_heads],
            "receiver_overlap": len(set(heads) & set(dense_heads)), "texts": per_text,
            "note": "dense = the same pipeline on a trace whose k covers every key block (exact dense attention)"}


def save_anchors(result: AnchorsResult, folder: str | Path, *, layer: int | None = None) -> dict[str, str]:
    """Write anchors.json, unit_attention.npz, the four figures and each text's trace into `folder`."""
    from ..plots import anchor_categories_figure, kurtosis_figure, unit_attention_figure, vertical_scores_figure

    folder = Path(folder)
    top_layer, top_head = result.receiver_heads[0] if result.receiver_heads else (1, 0)
    layer = top_layer if layer is None else layer
    if not 0 <= layer < result.kurtosis.shape[0]:
        raise InputError(f"layer {layer} does not exist; the model has layers 0-{result.kurtosis.shape[0] - 1}")
    paths = {"json": write_json(folder / "anchors.json", result.to_dict())}
    arrays = {}
    for i, t in enumerate(result.texts):
        arrays[f"unit_attention_{i}"] = t.unit_attention
        arrays[f"vertical_{i}"] = t.vertical
        if t.suppression is not None:
            arrays[f"suppression_{i}"] = t.suppression.effects
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    paths["arrays"] = atomic_write(folder / "unit_attention.npz", buffer.getvalue(), what="the arrays")
    source = result.texts[0].categories_source
    paths["kurtosis"] = save_figure(kurtosis_figure(result.kurtosis, result.receiver_heads), folder / "kurtosis.png")
    pooled = [(u.category, u.index / max(len(t.units) - 1, 1), u.score) for t in result.texts for u in t.units]
    paths["categories"] = save_figure(anchor_categories_figure(
        [c for c, _, _ in pooled], [p for _, p, _ in pooled], [s for _, _, s in pooled], source=source),
        folder / "categories.png")
    for i, t in enumerate(result.texts):
        suffix = "" if len(result.texts) == 1 else f"_{i}"
        best = int(np.nanargmax(np.where(np.isnan(t.kurtosis[layer]), -np.inf, t.kurtosis[layer])))
        paths[f"vertical{suffix}"] = save_figure(vertical_scores_figure(
            t.vertical[layer], layer, best, title=f"{t.name}: vertical score per unit, layer {layer}"),
            folder / f"vertical_scores{suffix}.png")
        paths[f"unit_attention{suffix}"] = save_figure(unit_attention_figure(
            t.unit_attention[top_layer, top_head], [u.category for u in t.units],
            title=f"{t.name}: unit attention, top receiver head (layer {top_layer}, head {top_head})"),
            folder / f"unit_attention{suffix}.png")
        paths[f"trace{suffix}"] = t.trace.save(folder / f"trace{suffix}.sptrace")
        if t.suppression is not None:
            from ..plots import suppression_figure

            paths[f"suppression{suffix}"] = save_figure(suppression_figure(
                t.suppression.effects, t.suppression.scores, t.scores, forward=t.suppression.forward,
                title=f"{t.name}: attention suppression ({t.suppression.forward} forward)"),
                folder / f"suppression{suffix}.png")
    return {name: str(path) for name, path in paths.items()}


def _json_array(x: np.ndarray) -> list:
    """Nested lists with NaN as null (JSON has no NaN), 6 significant digits."""
    return np.vectorize(lambda v: None if np.isnan(v) else float(f"{v:.6g}"), otypes=[object])(x).tolist()
